"""The model zoo, written for one device; parallelism is applied from outside.

    model = create_model("cnn", in_channels=1, image_size=28, num_classes=10, width=16)

Every model takes float32 (N, C, H, W) and returns logits (N, classes), and exports to ONNX. Every model is a
top-level nn.Sequential (train/parallel/pipeline.py cuts it into pipeline stages between its children), and a model may
have a tensor-parallel plan in TENSOR_PLANS (which children train/parallel/tensor.py shards, and how).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def mlp(in_channels: int, image_size: int, num_classes: int, width: int = 16, dropout: float = 0.0) -> nn.Module:
    hidden = 16 * width
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def cnn(in_channels: int, image_size: int, num_classes: int, width: int = 16, dropout: float = 0.0,
        ceil: bool = True) -> nn.Module:
    """Small batch-norm CNN: one cheap conv at full resolution, two at 1/2 and two at 1/4, then a linear
    head on the 1/8 grid (keeps where the parts of a silhouette are, which global pooling would lose).

    The pools round up (`ceil_mode`), so every pixel reaches the head: on 28 x 28 images the last pool maps
    7 x 7 to 4 x 4. Bundles trained before this (`ceil=False`, see `build_model`) map it to 3 x 3 and never
    see the last row and column of the 7 x 7 map, a 4-pixel strip on the right and bottom of every image."""
    w = width
    grid = cnn_grid(image_size, ceil)
    if grid < 1:
        raise ValueError(f"cnn needs images of at least 8 pixels, got {image_size}")
    return nn.Sequential(
        *conv_bn_relu(in_channels, w), nn.MaxPool2d(2, ceil_mode=ceil),
        *conv_bn_relu(w, 2 * w), *conv_bn_relu(2 * w, 2 * w), nn.MaxPool2d(2, ceil_mode=ceil),
        *conv_bn_relu(2 * w, 4 * w), *conv_bn_relu(4 * w, 4 * w), nn.MaxPool2d(2, ceil_mode=ceil),
        nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * w * grid * grid, num_classes),
    )


def cnn_grid(image_size: int, ceil: bool = True) -> int:
    """The side of the cnn's last feature map: three halvings, rounded up (today) or down (earlier bundles)."""
    return -(-image_size // 8) if ceil and image_size >= 8 else image_size // 8


def cnn_fpga(in_channels: int, image_size: int, num_classes: int, width: int = 16, dropout: float = 0.0) -> nn.Module:
    """The cnn's shape at FPGA size (about 3,000 parameters at width 16): one conv per stage, w/4, w/2 and w
    channels, then the same linear head on the 1/8 grid. Only layers hls4ml converts (Conv2d, BatchNorm2d,
    folded into the conv, ReLU, MaxPool2d, Flatten, Linear), small enough that every weight stays on chip
    (`tandem export RUN --out B --fpga`, export/fpga.py)."""
    w = width
    grid = image_size // 8
    if grid < 1:
        raise ValueError(f"cnn-fpga needs images of at least 8 pixels, got {image_size}")
    a, b = max(2, w // 4), max(2, w // 2)
    return nn.Sequential(
        *conv_bn_relu(in_channels, a), nn.MaxPool2d(2),
        *conv_bn_relu(a, b), nn.MaxPool2d(2),
        *conv_bn_relu(b, w), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(dropout), nn.Linear(w * grid * grid, num_classes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut, He et al. 2016."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn_relu(c_in, c_out, stride),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


def resnet(in_channels: int, image_size: int, num_classes: int, width: int = 16, dropout: float = 0.0) -> nn.Module:
    """A small residual net for larger RGB images: four stages of basic blocks, global average pool."""
    w = width
    stem_stride = 2 if image_size >= 64 else 1
    return nn.Sequential(
        *conv_bn_relu(in_channels, w, stem_stride),
        BasicBlock(w, w, 1),
        BasicBlock(w, 2 * w, 2),
        BasicBlock(2 * w, 4 * w, 2),
        BasicBlock(4 * w, 8 * w, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(8 * w, num_classes),
    )


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "cnn-fpga": cnn_fpga, "resnet": resnet}


def mlp_tensor_plan(model: nn.Module) -> dict:
    """Megatron-style MLP: Linear 1 column-wise (each rank holds a slice of the hidden units, no communication),
    Linear 2 row-wise (consumes that slice; its partial sums are all-reduced into a replicated output), the head
    column-wise (each rank computes a slice of the classes; the logits are all-gathered, replicated). Every
    weight and bias is sharded except the row-wise Linear's bias (replicated)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    linears = [name for name, child in model.named_children() if isinstance(child, nn.Linear)]
    first, second, head = linears
    # The Linears hand on DTensors: the in-place ReLUs after them may not modify the plain view that
    # use_local_output would return.
    return {first: ColwiseParallel(use_local_output=False), second: RowwiseParallel(use_local_output=False),
            head: ColwiseParallel(output_layouts=Replicate())}


def cnn_tensor_plan(model: nn.Module) -> dict:
    """The head Linear column-wise (each rank computes a slice of the classes from the whole flattened feature
    map; the logits are all-gathered, replicated). The convs and batch norms have no Linear-style split: they are
    replicated (every rank holds all of them and runs them on the same batch). The Flatten's output leaves
    DTensor as a plain tensor, so the head's partial input gradient is all-reduced there, at its smallest."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleOutput

    children = list(model.named_children())
    head = [name for name, child in children if isinstance(child, nn.Linear)][-1]
    flatten = [name for name, child in children if isinstance(child, nn.Flatten)][-1]
    return {flatten: PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Replicate()),
            head: ColwiseParallel(output_layouts=Replicate())}


# Tensor-parallel plans: model name -> (built model -> {child name: torch ParallelStyle}). What a plan leaves out
# is replicated. A model without a plan (resnet: its residual blocks have no Linear pairs to split) trains with
# ddp or pipeline instead.
TENSOR_PLANS: dict[str, Callable[[nn.Module], dict]] = {"mlp": mlp_tensor_plan, "cnn": cnn_tensor_plan}


def create_model(name: str, in_channels: int, image_size: int, num_classes: int, width: int = 16,
                 dropout: float = 0.0) -> nn.Module:
    if name not in MODELS:
        raise KeyError(f"unknown model '{name}'; choose one of {sorted(MODELS)}")
    return MODELS[name](in_channels, image_size, num_classes, width=width, dropout=dropout)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(cfg, num_classes: int, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The run's model (its config: name, channels, size, width, dropout) with these weights, in eval mode.

    A cnn whose head reads the smaller grid of earlier bundles (pools that rounded down) is built that way, so
    a bundle keeps working as it was trained."""
    name, size, width = cfg.model.name, cfg.data.image_size, cfg.model.width
    if name == "cnn" and floor_pooled(weights, size, width):
        model = cnn(cfg.data.channels, size, num_classes, width, cfg.model.dropout, ceil=False)
    else:
        model = create_model(name, cfg.data.channels, size, num_classes, width, cfg.model.dropout)
    model.load_state_dict(weights)
    return model.eval()


def floor_pooled(weights: dict[str, torch.Tensor], image_size: int, width: int) -> bool:
    """Whether these cnn weights come from the earlier cnn whose pools rounded down (a smaller head)."""
    floor, ceil = cnn_grid(image_size, ceil=False), cnn_grid(image_size)
    heads = [t for key, t in weights.items() if key.endswith(".weight") and t.dim() == 2]
    return floor != ceil and bool(heads) and heads[-1].shape[1] == 4 * width * floor * floor
