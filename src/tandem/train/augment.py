"""Vectorised batch augmentation on tensors: per-image random shift and horizontal flip."""

from __future__ import annotations

import torch


def augment(x: torch.Tensor, shift: int, hflip: bool, generator: torch.Generator, fill: torch.Tensor) -> torch.Tensor:
    """x: (N, C, H, W). Each image gets its own flip and its own shift of up to `shift` pixels, the
    uncovered border filled with `fill` (C,), the background value of each channel after preprocessing."""
    n, _, h, w = x.shape
    if hflip:
        flip = torch.rand(n, generator=generator, device=generator.device) < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
    if shift:
        size = 2 * shift + 1
        dy = torch.randint(0, size, (n,), generator=generator, device=generator.device).to(x.device)
        dx = torch.randint(0, size, (n,), generator=generator, device=generator.device).to(x.device)
        padded = fill.to(x.dtype).view(1, -1, 1, 1).repeat(n, 1, h + 2 * shift, w + 2 * shift)
        padded[:, :, shift:shift + h, shift:shift + w] = x
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        padded = padded.gather(2, rows.expand(n, x.shape[1], h, w + 2 * shift))
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded.gather(3, cols.expand(n, x.shape[1], h, w))
    return x
