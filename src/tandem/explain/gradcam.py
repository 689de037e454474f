"""Grad-CAM (Selvaraju et al. 2017) through Captum, on a layer the user may name, weighing only the cells of that
layer that can reach the output.

    layer = grad_cam_layer(model, None)            # the last convolutional block, or model.get_submodule(name)
    reach = reach_mask(model, layer, (1, 28, 28))  # bool (h, w): cells whose value can change the output
    maps = grad_cam(model, inputs, targets, layer, reach)   # (N, H, W), upsampled bilinearly

Why the mask: a layer's cell that no path leads from to the output has a gradient of exactly 0 for every input
(the default cnn's last MaxPool, floor mode, maps 7 x 7 to 3 x 3 and never reads row 6 and column 6), yet Grad-CAM's
sum of activations times channel weights is not 0 there: without the mask the map puts weight where the network
does not look. The mask is found generically, from gradients: a cell reaches the output when the gradient of a
random mix of the logits with respect to it is non-zero for at least one of 16 random inputs, in any channel.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.errors import UserError

REACH_INPUTS = 16


def probability_model(model: nn.Module) -> nn.Module:
    """model's softmax probabilities: what every method here attributes."""
    return nn.Sequential(model, nn.Softmax(dim=1)).eval()


def last_conv_block(model: nn.Module, name: str = "this model") -> nn.Module:
    """The module whose output Grad-CAM weighs: the last top-level block holding a Conv2d, taken through the
    batch norm and ReLU that follow it (the cnn's last conv-bn-relu, the resnet's last residual block)."""
    children = list(model.children()) if isinstance(model, nn.Sequential) else []
    with_conv = [i for i, child in enumerate(children) if any(isinstance(m, nn.Conv2d) for m in child.modules())]
    if not with_conv:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise UserError(f"Grad-CAM needs a convolutional layer and {name} has none; explain it with ig or occlusion")
        return convs[-1]
    i = with_conv[-1]
    while i + 1 < len(children) and isinstance(children[i + 1], (nn.BatchNorm2d, nn.ReLU)):
        i += 1
    return children[i]


def feature_map_layers(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, str]:
    """{name: "Conv2d 32x7x7"} of every named module whose output is a feature map (N, C, h, w): the layers Grad-CAM
    can weigh, in the model's order."""
    shapes: dict[str, tuple[int, ...]] = {}

    def keep(name: str):
        def hook(_module, _inputs, out) -> None:  # returns None: a forward hook's value would replace the output
            if isinstance(out, torch.Tensor):
                shapes.setdefault(name, tuple(out.shape))
        return hook

    hooks = [module.register_forward_hook(keep(name)) for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        for hook in hooks:
            hook.remove()
    modules = dict(model.named_modules())
    return {name: f"{type(modules[name]).__name__} {'x'.join(map(str, shape[1:]))}"
            for name, shape in shapes.items() if len(shape) == 4}


def grad_cam_layer(model: nn.Module, layer: str | None, input_shape: tuple[int, ...],
                   name: str = "this model") -> nn.Module:
    """The module Grad-CAM weighs: `layer` by name (a one-line UserError naming the valid ones when it is not one
    with a feature map), or the last convolutional block."""
    if layer is None:
        return last_conv_block(model, name)
    valid = feature_map_layers(model, input_shape)
    if layer not in valid:
        listed = ", ".join(f"{n} ({kind})" for n, kind in valid.items()) or "none"
        what = "is not a layer of" if layer not in dict(model.named_modules()) else "gives no feature map in"
        raise UserError(f"--layer {layer!r} {what} {name}; Grad-CAM can weigh: {listed}")
    return model.get_submodule(layer)


def reach_mask(model: nn.Module, layer: nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """bool (h, w): the cells of `layer`'s output whose gradient of the output is non-zero for some input (a random
    mix of the logits, over REACH_INPUTS random inputs, in any channel). A structurally unreached cell has a
    gradient of exactly 0 whatever the input, so it is never marked."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn((REACH_INPUTS, *input_shape), generator=generator)
    kept: list[torch.Tensor] = []
    def hook_fn(_module, _inputs, out) -> None:
        kept.append(out)
        out.retain_grad()

    hook = layer.register_forward_hook(hook_fn)
    was_training = model.training
    model.eval()
    try:
        logits = model(inputs)
        mix = torch.randn(logits.shape[1:], generator=generator)
        (logits * mix).sum().backward()
    finally:
        hook.remove()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    grad = kept[-1].grad
    if grad is None or grad.dim() != 4:
        raise UserError("Grad-CAM's layer must give a feature map (N, C, h, w)")
    return (grad != 0).any(dim=0).any(dim=0)


def grad_cam(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, layer: nn.Module,
             reach: torch.Tensor | None = None, smooth: int = 0, noise: float = 0.0,
             upsample: bool = True) -> torch.Tensor:
    """(N, H, W) Grad-CAM of the target classes' softmax probabilities on `layer`, zero on unreached cells, then
    upsampled bilinearly to the input (upsample=False: (N, h, w), the layer's own cells). smooth > 0: the mean
    over that many noisy copies (NoiseTunnel, sigma `noise` in input units)."""
    from captum.attr import LayerAttribution, LayerGradCam, NoiseTunnel

    method = LayerGradCam(probability_model(model), layer)
    if smooth:
        cam = NoiseTunnel(method).attribute(inputs, nt_type="smoothgrad", nt_samples=smooth, stdevs=noise,
                                            target=targets, relu_attributions=True)
    else:
        cam = method.attribute(inputs, target=targets, relu_attributions=True)
    if reach is not None:
        cam = cam * reach.to(cam.dtype)
    if not upsample:
        return cam[:, 0]
    return LayerAttribution.interpolate(cam, tuple(inputs.shape[2:]), interpolate_mode="bilinear")[:, 0]
