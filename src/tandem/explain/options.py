"""What a user may set on the attribution methods (`tandem explain --baseline --steps --smooth --layer`), checked
before any work; torch-free, so that the command line can parse and refuse without loading torch.

    options = AttributionOptions(baseline="blur", steps=100, smooth=16, layer="13")
    options.check(["ig", "gradcam"])      # a one-line UserError for an option no chosen method takes
    options.settings("ig")                # what the JSON record says was used

baseline: the reference Integrated Gradients integrates from and occlusion's window is filled with: black (raw
0), blur (the image under a Gaussian blur, sigma = side / 10) or mean (the training split's mean image where the
bundle's data is reachable, else each image's own mean value; the record says which). steps: Integrated
Gradients' steps (Captum's n_steps). smooth: SmoothGrad through Captum's NoiseTunnel, the mean over N copies of
the image with Gaussian noise of sigma = 15% of the pixel range added (Smilkov et al. 2017 suggest 10-20%), for
Integrated Gradients and Grad-CAM. layer: the module Grad-CAM weighs (a name from the model's named_modules()).
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.errors import UserError

BASELINE_CHOICES = ("black", "blur", "mean")
IG_STEPS = 50
SMOOTH_NOISE = 0.15      # SmoothGrad's sigma as a fraction of the pixel range (0..255)
MAX_IG_STEPS = 10_000
MAX_SMOOTH = 1_000
_TAKES = {"baseline": ("ig", "occlusion"), "steps": ("ig",), "smooth": ("ig", "gradcam"), "layer": ("gradcam",)}
_FLAGS = {"baseline": "--baseline", "steps": "--steps", "smooth": "--smooth", "layer": "--layer"}


@dataclass(frozen=True)
class AttributionOptions:
    baseline: str = "black"
    steps: int = IG_STEPS
    smooth: int = 0            # 0: no noise tunnel
    layer: str | None = None   # None: Grad-CAM's default, the last convolutional block
    noise: float = SMOOTH_NOISE

    def __post_init__(self) -> None:
        if self.baseline not in BASELINE_CHOICES:
            raise UserError(f"--baseline {self.baseline!r}: choose one of {', '.join(BASELINE_CHOICES)}")
        if not (isinstance(self.steps, int) and 1 <= self.steps <= MAX_IG_STEPS):
            raise UserError(f"--steps {self.steps}: give 1 to {MAX_IG_STEPS} (Integrated Gradients' steps)")
        if not (isinstance(self.smooth, int) and 0 <= self.smooth <= MAX_SMOOTH):
            raise UserError(f"--smooth {self.smooth}: give 0 (off) to {MAX_SMOOTH} noisy samples")
        if self.layer is not None and not str(self.layer).strip():
            raise UserError("--layer: give a module name of the model (see the error listing them)")

    @classmethod
    def parse(cls, baseline: str | None = None, steps: str | int | None = None, smooth: str | int | None = None,
              layer: str | None = None) -> "AttributionOptions":
        """From the command line's text (None: the default), each bad value a one-line UserError."""
        values: dict = {}
        if baseline is not None:
            values["baseline"] = baseline
        for name, text, low, high in (("steps", steps, 1, MAX_IG_STEPS), ("smooth", smooth, 0, MAX_SMOOTH)):
            if text is None:
                continue
            try:
                values[name] = int(str(text).strip())
            except ValueError:
                raise UserError(f"{_FLAGS[name]} {text!r}: give a whole number from {low} to {high}") from None
        if layer is not None:
            values["layer"] = layer
        return cls(**values)

    def given(self) -> dict[str, object]:
        """The options set away from their defaults, by field name."""
        default = AttributionOptions()
        return {name: getattr(self, name) for name in _TAKES if getattr(self, name) != getattr(default, name)}

    def check(self, methods: list[str]) -> None:
        """A UserError for an option none of `methods` takes (--layer with only ig, --steps with only occlusion)."""
        for name, value in self.given().items():
            if not any(method in _TAKES[name] for method in methods):
                takers = " and ".join(_TAKES[name])
                raise UserError(f"{_FLAGS[name]} applies to {takers}, not to {', '.join(methods)}; drop it or "
                                f"choose {'one of those methods' if len(_TAKES[name]) > 1 else takers}")

    def settings(self, method: str, mean_source: str | None = None) -> dict:
        """The options `method` used, for its JSON record. mean_source: what --baseline mean was."""
        baseline = {"black": "black (raw 0)", "blur": "the image blurred (Gaussian, sigma = side / 10)",
                    "mean": mean_source or "the mean image"}[self.baseline]
        out: dict = {}
        if method in _TAKES["baseline"]:
            out["baseline"] = baseline
        if method == "ig":
            out["n_steps"] = self.steps
        if method in _TAKES["smooth"] and self.smooth:
            out["smoothgrad"] = {"samples": self.smooth, "noise_sigma": f"{self.noise:.0%} of the pixel range"}
        if method == "gradcam":
            out["layer"] = self.layer or "last convolutional block"
            out["upsampled"] = "bilinear"
            out["unreached_cells"] = "zero weight"
        return out
