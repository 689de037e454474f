"""Load a bundle (hashes verified) and classify arrays, PIL images, files and folders. Never imports torch.

    tandem predict bundle/ cat.png photos/ --top-k 3 [--json]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tandem.bundle import read_manifest
from tandem.errors import UserError
from tandem.runtime.preprocess import expand_paths, preprocess, to_pixels


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    probability: float


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class Predictor:
    """A bundle ready to run: `logits`, `probabilities`, `top_k` over batches of any image form."""

    def __init__(self, session: Any, manifest: dict, batch_size: int = 256) -> None:
        self.session = session
        self.manifest = manifest
        self.labels: list[str] = manifest["labels"]
        pre = manifest["preprocessing"]
        self.image_size, self.channels = int(pre["image_size"]), int(pre["channels"])
        self.mean, self.std = float(pre["mean"]), float(pre["std"])
        self.input_name = manifest["inputs"][0]["name"]
        self.batch_size = batch_size

    @classmethod
    def load(cls, bundle: str | Path, verify: bool = True, threads: int | None = None,
             batch_size: int = 256) -> "Predictor":
        """Verify every file's sha256 (unless verify=False), then open model.onnx in ONNX Runtime."""
        import onnxruntime as ort

        bundle = Path(bundle)
        manifest = read_manifest(bundle, verify=verify)
        options = ort.SessionOptions()
        # The arena keeps every peak allocation for ever; without it RSS follows the work (onnxruntime #11627).
        options.enable_cpu_mem_arena = False
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise UserError(f"bundle {bundle}: ONNX Runtime cannot load model.onnx ({err})") from None
        return cls(session, manifest, batch_size)

    def pixels(self, images: Any) -> np.ndarray:
        """Any supported image form -> uint8 (N, H, W, C) at the bundle's size and channels."""
        return to_pixels(images, self.image_size, self.channels)

    def logits(self, images: Any) -> np.ndarray:
        pixels = self.pixels(images)
        out = [self.session.run(None, {self.input_name: preprocess(pixels[i:i + self.batch_size], self.mean, self.std)})[0]
               for i in range(0, len(pixels), self.batch_size)]
        return np.concatenate(out)

    def probabilities(self, images: Any) -> np.ndarray:
        return softmax(self.logits(images))

    def top_k(self, images: Any, k: int = 5) -> list[list[Prediction]]:
        if k < 1:
            raise UserError(f"top-k must be at least 1, got {k}")
        probs = self.probabilities(images)
        k = min(k, probs.shape[1])
        best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[Prediction(self.labels[j], int(j), float(row[j])) for j in order] for row, order in zip(probs, best)]

    def predict_paths(self, paths: list[str | Path], k: int = 5) -> list[tuple[Path, list[Prediction]]]:
        """Files and folders (recursively) -> (file, top-k) in a stable order, in batches."""
        files = expand_paths(paths)
        results = []
        for i in range(0, len(files), self.batch_size):
            chunk = files[i:i + self.batch_size]
            results.extend(zip(chunk, self.top_k(chunk, k)))
        return results
