"""Attributions on the training side: Captum's Integrated Gradients, Grad-CAM and Occlusion on a bundle's weights.

    explainer = TorchExplainer("bundle/")                   # weights.safetensors (hash-checked), rebuilt in torch
    result = explainer.attribute("ig", pixels, targets)     # pixels uint8 (N, H, W, C) -> result.maps (N, H, W)
    result.convergence_delta                                # IG: sum of attributions - (f(x) - f(black)), per image

Every method explains the same quantity as the runtime's occlusion (tandem.explain.occlusion): the softmax
probability of the target class, with black (raw pixel 0, then the bundle's preprocessing) as the reference.
Maps are (H, W): Integrated Gradients summed over channels (so a map still sums to f(x) - f(black)); Grad-CAM
(Selvaraju et al. 2017) on the last convolutional block, upsampled bilinearly to the image; Captum's Occlusion
gives every channel of a pixel the same value, so its map is one channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from tandem.bundle import read_bundle_file, read_manifest
from tandem.errors import UserError
from tandem.runtime.preprocess import preprocess

IG_STEPS = 50
IG_INTERNAL_BATCH = 512   # images x steps per backward pass: bounds IG's memory (captum issues 245, 538)
_IMAGES_PER_CALL = 64


@dataclass(frozen=True)
class Attribution:
    maps: np.ndarray                             # float32 (N, H, W)
    convergence_delta: np.ndarray | None = None  # IG only: (N,), sum(attributions) - (f(x) - f(baseline))


def load_model(bundle: str | Path, manifest: dict | None = None) -> nn.Module:
    """The bundle's network in torch, in eval mode, from its hash-verified weights.safetensors and the training
    config in its manifest."""
    from pydantic import ValidationError
    from safetensors.torch import load as load_safetensors

    from tandem.config import TrainConfig
    from tandem.train.models import build_model

    manifest = manifest if manifest is not None else read_manifest(bundle, verify=False)
    if "weights.safetensors" not in (manifest.get("files") or {}):
        raise UserError(f"bundle {bundle} has no weights.safetensors, which Integrated Gradients and Grad-CAM need; "
                        "explain it with --method occlusion (the runtime's model.onnx)")
    weights = load_safetensors(read_bundle_file(bundle, manifest, "weights.safetensors"))
    try:
        cfg = TrainConfig.model_validate(manifest["config"])
        model = build_model(cfg, len(manifest["labels"]), weights)
    except (KeyError, TypeError, ValidationError) as err:
        raise UserError(f"bundle {bundle}: its manifest has no readable training config or labels "
                        f"({str(err).splitlines()[0]}); re-export it, or use --method occlusion") from None
    except RuntimeError as err:  # load_state_dict: the weights are not those of the configured model
        raise UserError(f"bundle {bundle}: weights.safetensors does not fit the model its manifest describes "
                        f"({str(err).splitlines()[-1].strip()}); re-export it") from None
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # Captum's hooks read layer outputs that an in-place ReLU would overwrite
    return model


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


def _targets(targets, n: int) -> torch.Tensor:
    return torch.as_tensor(np.broadcast_to(np.asarray(targets, np.int64), (n,)).copy())


def integrated_gradients(model: nn.Module, inputs: torch.Tensor, targets, baseline: torch.Tensor,
                         n_steps: int = IG_STEPS, internal_batch_size: int = IG_INTERNAL_BATCH
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(attributions (N, C, H, W), convergence delta (N,)) of the target classes' softmax probabilities."""
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(probability_model(model))
    return ig.attribute(inputs, baselines=baseline.expand_as(inputs), target=_targets(targets, len(inputs)),
                        n_steps=n_steps, internal_batch_size=max(internal_batch_size, len(inputs)),
                        return_convergence_delta=True)


def grad_cam(model: nn.Module, inputs: torch.Tensor, targets, name: str = "this model") -> torch.Tensor:
    """(N, H, W) Grad-CAM of the target classes' softmax probabilities, upsampled to the input."""
    from captum.attr import LayerAttribution, LayerGradCam

    layer = last_conv_block(model, name)
    cam = LayerGradCam(probability_model(model), layer).attribute(inputs, target=_targets(targets, len(inputs)),
                                                                  relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(inputs.shape[2:]), interpolate_mode="bilinear")[:, 0]


def captum_occlusion(model: nn.Module, inputs: torch.Tensor, targets, baseline: torch.Tensor, window: int = 4,
                     stride: int = 2) -> torch.Tensor:
    """(N, H, W) Captum's Occlusion of the target classes' softmax probabilities: the reference for the runtime's."""
    from captum.attr import Occlusion

    channels = inputs.shape[1]
    attributions = Occlusion(probability_model(model)).attribute(
        inputs, sliding_window_shapes=(channels, window, window), strides=(channels, stride, stride),
        baselines=baseline.expand_as(inputs), target=_targets(targets, len(inputs)), perturbations_per_eval=64)
    return attributions[:, 0]  # the window spans every channel: each holds the same value


class TorchExplainer:
    """A bundle's network rebuilt in torch, with its preprocessing, ready for Captum."""

    METHODS = ("ig", "gradcam", "occlusion")

    def __init__(self, bundle: str | Path, manifest: dict | None = None) -> None:
        self.manifest = manifest if manifest is not None else read_manifest(bundle, verify=False)
        self.model = load_model(bundle, self.manifest)
        self.name = f"this bundle's model ({(self.manifest.get('config') or {}).get('model', {}).get('name', '?')})"
        pre = self.manifest["preprocessing"]
        self.mean, self.std, self.channels = pre["mean"], pre["std"], int(pre["channels"])

    def inputs(self, pixels: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(preprocess(pixels, self.mean, self.std))

    def baseline(self, pixels: np.ndarray) -> torch.Tensor:
        """Preprocessed black, one image."""
        return self.inputs(np.zeros((1, *pixels.shape[1:]), np.uint8))

    def check(self, method: str) -> None:
        """A UserError now, before any work, if the method cannot run on this model."""
        if method not in self.METHODS:
            raise UserError(f"unknown method {method!r}; choose one of {', '.join(self.METHODS)}")
        if method == "gradcam":
            last_conv_block(self.model, self.name)

    def attribute(self, method: str, pixels: np.ndarray, targets, window: int = 4, stride: int = 2,
                  progress: Callable[[int], None] | None = None) -> Attribution:
        """Maps (N, H, W) of uint8 images (N, H, W, C) for the target classes (one index, or one per image)."""
        self.check(method)
        targets = np.broadcast_to(np.asarray(targets, np.int64), (len(pixels),))
        baseline = self.baseline(pixels)
        maps, deltas = [], []
        for start in range(0, len(pixels), _IMAGES_PER_CALL):
            x = self.inputs(pixels[start:start + _IMAGES_PER_CALL])
            t = targets[start:start + _IMAGES_PER_CALL]
            if method == "ig":
                attributions, delta = integrated_gradients(self.model, x, t, baseline)
                maps.append(attributions.sum(1).detach())
                deltas.append(delta.detach())
            elif method == "gradcam":
                maps.append(grad_cam(self.model, x, t, self.name).detach())
            else:
                maps.append(captum_occlusion(self.model, x, t, baseline, window, stride).detach())
            if progress:
                progress(len(x))
        stacked = torch.cat(maps).numpy().astype(np.float32)
        return Attribution(stacked, torch.cat(deltas).numpy().astype(np.float32) if deltas else None)
