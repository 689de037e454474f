"""Vectorised batch augmentation on tensors: per-image random shift and horizontal flip.

The random draws and their use are separate: the loop draws for the whole global batch and each process
applies the rows of its share, so 2 processes augment every image exactly as one process does.
"""

from __future__ import annotations

import torch


def draw(n: int, shift: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """(n, 3) int64: flip (0/1), row offset and column offset (0 .. 2*shift) for each of n images."""
    flip = torch.rand(n, generator=generator, device=generator.device) < 0.5 if hflip else None
    size = 2 * shift + 1
    dy = torch.randint(0, size, (n,), generator=generator, device=generator.device) if shift else None
    dx = torch.randint(0, size, (n,), generator=generator, device=generator.device) if shift else None
    zeros = torch.full((n,), shift, dtype=torch.long, device=generator.device)
    return torch.stack([flip.long() if flip is not None else torch.zeros_like(zeros),
                        dy if dy is not None else zeros, dx if dx is not None else zeros], dim=1)


def apply(x: torch.Tensor, params: torch.Tensor, shift: int, fill: torch.Tensor, hflip: bool = True) -> torch.Tensor:
    """x: (N, C, H, W) with params (N, 3) from draw(); the uncovered border takes `fill` (C,), the background
    value of each channel after preprocessing. No host sync (nothing here reads a value back), so the whole
    augmentation can live inside a captured CUDA graph."""
    n, _, h, w = x.shape
    params = params.to(x.device)
    if hflip:
        x = torch.where(params[:, 0].bool()[:, None, None, None], x.flip(3), x)
    if shift:
        dy, dx = params[:, 1], params[:, 2]
        padded = fill.to(x.dtype).view(1, -1, 1, 1).repeat(n, 1, h + 2 * shift, w + 2 * shift)
        padded[:, :, shift:shift + h, shift:shift + w] = x
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        padded = padded.gather(2, rows.expand(n, x.shape[1], h, w + 2 * shift))
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded.gather(3, cols.expand(n, x.shape[1], h, w))
    return x


def augment(x: torch.Tensor, shift: int, hflip: bool, generator: torch.Generator, fill: torch.Tensor) -> torch.Tensor:
    """Each image of x gets its own flip and its own shift of up to `shift` pixels."""
    return apply(x, draw(len(x), shift, hflip, generator), shift, fill, hflip)
