"""Attributions on the training side: Captum's Integrated Gradients, Grad-CAM and Occlusion on a bundle's weights.

    explainer = TorchExplainer("bundle/")                   # weights.safetensors (hash-checked), rebuilt in torch
    result = explainer.attribute("ig", pixels, targets)     # pixels uint8 (N, H, W, C) -> result.maps (N, H, W)
    result.convergence_delta                                # IG: sum of attributions - (f(x) - f(black)), per image

    options = AttributionOptions(baseline="blur", steps=100, smooth=16, layer="13")   # tandem.explain.options
    result = explainer.attribute("gradcam", pixels, targets, options=options)

Every method explains the same quantity as the runtime's occlusion (tandem.explain.occlusion): the softmax
probability of the target class, by default against black (raw pixel 0, then the bundle's preprocessing); the
options choose a blurred or mean image instead. Maps are (H, W): Integrated Gradients summed over channels (so a
map still sums to f(x) - f(baseline)); Grad-CAM (tandem.explain.gradcam) on the last convolutional block or the
named layer, zero on the cells that cannot reach the output, upsampled bilinearly to the image; Captum's
Occlusion gives every channel of a pixel the same value, so its map is one channel.
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
from tandem.explain.baselines import data_mean_image, fill_images
from tandem.explain.gradcam import grad_cam, grad_cam_layer, last_conv_block, probability_model, reach_mask
from tandem.explain.options import IG_STEPS, AttributionOptions
from tandem.runtime.preprocess import preprocess

__all__ = ["Attribution", "TorchExplainer", "captum_occlusion", "integrated_gradients", "last_conv_block",
           "load_model", "probability_model"]
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


def _targets(targets, n: int) -> torch.Tensor:
    return torch.as_tensor(np.broadcast_to(np.asarray(targets, np.int64), (n,)).copy())


def integrated_gradients(model: nn.Module, inputs: torch.Tensor, targets, baseline: torch.Tensor,
                         n_steps: int = IG_STEPS, internal_batch_size: int = IG_INTERNAL_BATCH, smooth: int = 0,
                         noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(attributions (N, C, H, W), convergence delta (N,)) of the target classes' softmax probabilities; baseline:
    one image or one per input. smooth > 0: SmoothGrad over IG (NoiseTunnel, that many samples of Gaussian noise
    of sigma `noise` in input units), and no convergence delta (None): each noisy copy has its own."""
    from captum.attr import IntegratedGradients, NoiseTunnel

    ig = IntegratedGradients(probability_model(model))
    kwargs = {"baselines": baseline.expand_as(inputs), "target": _targets(targets, len(inputs)), "n_steps": n_steps,
              "internal_batch_size": max(internal_batch_size, len(inputs))}
    if smooth:
        return NoiseTunnel(ig).attribute(inputs, nt_type="smoothgrad", nt_samples=smooth, stdevs=noise,
                                         **kwargs), None
    return ig.attribute(inputs, return_convergence_delta=True, **kwargs)


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
        self.bundle = bundle
        self.manifest = manifest if manifest is not None else read_manifest(bundle, verify=False)
        self.model = load_model(bundle, self.manifest)
        self.name = f"this bundle's model ({(self.manifest.get('config') or {}).get('model', {}).get('name', '?')})"
        pre = self.manifest["preprocessing"]
        self.mean, self.std, self.channels = pre["mean"], pre["std"], int(pre["channels"])
        self.image_size = int(pre["image_size"])
        self._data_mean: tuple[np.ndarray | None] | None = None   # (mean image or None), once looked for
        self._reach: dict[tuple[int, str | None], torch.Tensor] = {}

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.channels, self.image_size, self.image_size

    def inputs(self, pixels: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(preprocess(pixels, self.mean, self.std))

    def data_mean(self) -> np.ndarray | None:
        """The training split's mean image (float (H, W, C)), or None where the bundle's data is not reachable."""
        if self._data_mean is None:
            self._data_mean = (data_mean_image(self.bundle, self.manifest),)
        return self._data_mean[0]

    def mean_source(self) -> str:
        """What --baseline mean is for this bundle, in words."""
        return ("the training split's mean image" if self.data_mean() is not None else
                "each image's own mean value (the training data is not reachable here)")

    def reference_pixels(self, pixels: np.ndarray, baseline: str = "black") -> np.ndarray:
        """uint8 (N, H, W, C): the reference image of each image under --baseline (black, blur, mean)."""
        return fill_images(baseline, pixels, self.data_mean() if baseline == "mean" else None)

    def baseline(self, pixels: np.ndarray, baseline: str = "black") -> torch.Tensor:
        """The preprocessed reference: one black image, or one per image (blur, mean)."""
        if baseline == "black":
            return self.inputs(np.zeros((1, *pixels.shape[1:]), np.uint8))
        return self.inputs(self.reference_pixels(pixels, baseline))

    def noise(self, options: AttributionOptions) -> float:
        """SmoothGrad's sigma in the network's input units: options.noise of the pixel range (0..255)."""
        std = np.atleast_1d(np.asarray(self.std, np.float64))
        return float(options.noise / std.mean())

    def grad_cam_layer(self, layer: str | None = None) -> nn.Module:
        return grad_cam_layer(self.model, layer, self.input_shape, self.name)

    def reach(self, layer: str | None = None) -> torch.Tensor:
        """bool (h, w): the Grad-CAM layer's cells that reach the output (tandem.explain.gradcam.reach_mask)."""
        key = (id(self.model), layer)
        if key not in self._reach:
            self._reach[key] = reach_mask(self.model, self.grad_cam_layer(layer), self.input_shape)
        return self._reach[key]

    def check(self, method: str, options: AttributionOptions | None = None) -> None:
        """A UserError now, before any work, if the method cannot run on this model."""
        if method not in self.METHODS:
            raise UserError(f"unknown method {method!r}; choose one of {', '.join(self.METHODS)}")
        if method == "gradcam":
            self.grad_cam_layer(options.layer if options else None)

    def attribute(self, method: str, pixels: np.ndarray, targets, window: int = 4, stride: int = 2,
                  progress: Callable[[int], None] | None = None, options: AttributionOptions | None = None,
                  model: nn.Module | None = None) -> Attribution:
        """Maps (N, H, W) of uint8 images (N, H, W, C) for the target classes (one index, or one per image).

        model: another network of the same shape to explain instead (the randomisation check's)."""
        options = options or AttributionOptions()
        self.check(method, options)
        net = self.model if model is None else model
        targets = np.broadcast_to(np.asarray(targets, np.int64), (len(pixels),))
        one_reference = options.baseline == "black"
        reference = self.baseline(pixels, options.baseline) if method != "gradcam" else None
        maps, deltas = [], []
        for start in range(0, len(pixels), _IMAGES_PER_CALL):
            part = slice(start, start + _IMAGES_PER_CALL)
            x = self.inputs(pixels[part])
            t = targets[part]
            base = None if reference is None else reference if one_reference else reference[part]
            if method == "ig":
                attributions, delta = integrated_gradients(net, x, t, base, options.steps, smooth=options.smooth,
                                                           noise=self.noise(options))
                maps.append(attributions.sum(1).detach())
                if delta is not None:
                    deltas.append(delta.detach())
            elif method == "gradcam":
                layer = grad_cam_layer(net, options.layer, self.input_shape, self.name)
                reach = self.reach(options.layer)  # structural: the same for a randomised copy of the network
                maps.append(grad_cam(net, x, _targets(t, len(x)), layer, reach, options.smooth,
                                     self.noise(options)).detach())
            else:
                maps.append(captum_occlusion(net, x, t, base, window, stride).detach())
            if progress:
                progress(len(x))
        stacked = torch.cat(maps).numpy().astype(np.float32)
        return Attribution(stacked, torch.cat(deltas).numpy().astype(np.float32) if deltas else None)
