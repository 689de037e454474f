"""Explaining image files: per image, into a folder, NAME.METHOD.png (the image beside the image with the map over
it, label and probability), NAME.METHOD.npy (the raw (H, W) map) and NAME.METHOD.json (prediction, target, the
map's values). What `tandem explain BUNDLE IMAGE...` runs."""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tandem.errors import UserError
from tandem.explain.methods import (METHODS, SCHEMA, TITLES, attribution_maps, occlusion_geometry, parse_target,
                                    torch_explainer)
from tandem.explain.options import AttributionOptions
from tandem.explain.render import legend
from tandem.files import write_bytes_atomic


class ImageExplanations:
    """Every check before any work (bundle, target, window, --out); then `explain()` writes and yields per image."""

    def __init__(self, bundle: str, images: list[str], method: str, target: str | None = None,
                 out: str | Path = "explanations", force: bool = False, window: int | None = None,
                 stride: int | None = None, options: AttributionOptions | None = None):
        from tandem.images import expand_paths
        from tandem.runtime import Predictor

        self.bundle, self.method = str(bundle), method
        self.predictor = Predictor.load(bundle, precision="fp32")  # every hash checked; the model that was explained
        self.labels = self.predictor.labels
        self.target = parse_target(target, self.labels)
        self.window, self.stride = occlusion_geometry(window, stride, self.predictor.image_size, [method])
        if method == "occlusion":
            from tandem.explain.occlusion import check_window

            check_window(self.predictor.image_size, self.predictor.image_size, self.window, self.stride)
        self.out = Path(out)
        self.files = input_files(images, self.out, expand_paths)
        self.names = dict(zip(self.files, output_names(self.files)))
        # An explanation of another class than the predicted one (--target) gets its own files: NAME.METHOD.LABEL.*
        self.kind = (method if self.target is None else
                     f"{method}.{re.sub(r'[^A-Za-z0-9_-]', '_', self.labels[self.target])}")
        self.options = options or AttributionOptions()
        self.options.check([method])
        self.explainer = torch_explainer(self.bundle, self.predictor.manifest, [method], self.options)
        check_out(self.out, list(self.names.values()), self.kind, force)
        self.data_mean, self.settings = None, self.options.settings(method)
        if self.options.baseline == "mean" and method != "gradcam":
            from tandem.explain.baselines import data_mean_image

            self.data_mean = data_mean_image(self.bundle, self.predictor.manifest)
            self.settings = self.options.settings(method, "the training split's mean image" if self.data_mean is not None
                                                  else "each image's own mean value (the training data is not "
                                                       "reachable here)")

    def explain(self) -> Iterator[tuple[Path, dict | None, str | None]]:
        """(path, record without the map's values, None) per explained image, (path, None, error) per unreadable
        one, in input order within each decoded batch (its unreadable files first)."""
        from tandem.explain.render import overlay_png
        from tandem.images import decode_file_batches

        p, out = self.predictor, self.out
        out.mkdir(parents=True, exist_ok=True)
        scale = max(1, round(224 / p.image_size))  # pictures about 224 pixels a side, whatever the model's size
        for chunk in decode_file_batches(self.files, p.image_size, p.channels, p.resize):
            good = [(path, pixels) for path, pixels, _ in chunk if pixels is not None]
            for path, _, error in chunk:
                if error is not None:
                    yield path, None, error
            if not good:
                continue
            pixels = np.stack([pixels for _, pixels in good])
            probabilities = p.probabilities(pixels)
            targets = probabilities.argmax(1) if self.target is None else np.full(len(good), self.target)
            maps, deltas = attribution_maps(self.method, p, pixels, targets, self.window, self.stride, self.explainer,
                                            options=self.options, data_mean=self.data_mean)
            for i, (path, _) in enumerate(good):
                record = image_record(self.bundle, path, self.names[path], self.method, self.window, self.stride,
                                      self.labels, probabilities[i], int(targets[i]), maps[i],
                                      None if deltas is None else float(deltas[i]), self.kind, self.settings)
                caption = _caption(self.labels, probabilities[i], int(targets[i]), self.method, self.window,
                                   self.stride)
                write_bytes_atomic(out / record["files"]["picture"], overlay_png(pixels[i], maps[i], caption, scale))
                write_bytes_atomic(out / record["files"]["map"], _npy_bytes(maps[i]))
                write_bytes_atomic(out / record["files"]["json"], (json.dumps(record, indent=1) + "\n").encode())
                yield path, ({k: v for k, v in record.items() if k != "map"}
                             | {"map": {k: v for k, v in record["map"].items() if k != "values"}}), None


def output_names(files: list[Path]) -> list[str]:
    """A distinct file-name stem per input: its own stem, or, where two inputs share one (two cat.png in different
    folders, cat.png beside cat.jpg), its path from the inputs' common folder."""
    resolved = [f.resolve() for f in files]
    common = Path(os.path.commonpath([str(r.parent) for r in resolved])) if resolved else Path("/")
    stems = Counter(f.stem for f in files)
    names = []
    for f, r in zip(files, resolved):
        if stems[f.stem] == 1:
            names.append(f.stem)
            continue
        relative = r.relative_to(common)
        names.append("_".join(relative.with_suffix("").parts))
    counted = Counter(names)
    names = [f"{name}_{f.suffix.lstrip('.')}" if counted[name] > 1 and f.suffix else name
             for name, f in zip(names, files)]
    seen: Counter = Counter()
    unique = []
    for name in names:  # anything still equal (it should not be): numbered, never overwritten
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


def check_out(out: Path, names: list[str], kind: str, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the explanations")
    if force or not out.is_dir():
        return
    taken = [f"{name}.{kind}.{ext}" for name in names for ext in ("png", "npy", "json")
             if (out / f"{name}.{kind}.{ext}").exists()]
    if taken:
        raise UserError(f"{out} already holds {len(taken)} of these files ({', '.join(taken[:2])}"
                        f"{' ...' if len(taken) > 2 else ''}); pass --force to replace them, or choose another --out")


def input_files(images: list[str], out: Path, expand_paths) -> list[Path]:
    """The image files to explain, each once, in order; a folder's pictures of an earlier run (NAME.METHOD.png in
    --out, when --out is the folder or inside it) are not inputs."""
    inside = out.resolve()
    earlier = re.compile(r".+\.(?:" + "|".join(map(re.escape, METHODS)) + r")(?:\.[A-Za-z0-9_-]+)?\.png")
    files: list[Path] = []
    for raw in images:
        found = expand_paths([raw])
        if Path(raw).is_dir():
            found = [f for f in found if not (f.resolve().is_relative_to(inside) and earlier.fullmatch(f.name))]
        files.extend(found)
    if not files:
        raise UserError(f"no images to explain: the folders given hold only earlier explanations (NAME.METHOD.png in "
                        f"{out})")
    return list(dict.fromkeys(files))  # the same file named twice is explained once


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _caption(labels: list[str], probabilities: np.ndarray, target: int, method: str, window: int, stride: int) -> str:
    best = int(np.argmax(probabilities))
    line = f"{labels[best]} {probabilities[best]:.1%}"
    if target != best:
        line += f"; explaining {labels[target]} ({probabilities[target]:.1%})"
    how = TITLES[method] + (f" (window {window}, stride {stride})" if method == "occlusion" else "")
    return f"{line}\n{how}; {legend(labels[target], signed=method != 'gradcam')}"


def image_record(bundle: str, path: Path, name: str, method: str, window: int, stride: int, labels: list[str],
                 probabilities: np.ndarray, target: int, heatmap: np.ndarray, delta: float | None,
                 kind: str | None = None, settings: dict | None = None) -> dict[str, Any]:
    """The NAME.METHOD.json of one image (schema tandem.explain/1, kind image). settings: what the method used
    (AttributionOptions.settings; default the defaults')."""
    kind = kind or method  # what the files are named by: the method, and the --target label where one was given
    order = np.argsort(-probabilities, kind="stable")[:5]
    settings = dict(settings if settings is not None else AttributionOptions().settings(method))
    if method == "occlusion":
        settings = {"window": window, "stride": stride, **settings}
    record = {
        "schema": SCHEMA, "kind": "image", "image": str(path), "bundle": str(bundle), "model_file": "model.onnx",
        "method": method,
        "settings": settings, "explains": "softmax probability of the target class",
        "prediction": {"label": labels[int(order[0])], "index": int(order[0]),
                       "probability": float(probabilities[order[0]])},
        "top_k": [{"label": labels[int(j)], "index": int(j), "probability": float(probabilities[j])} for j in order],
        "target": {"label": labels[target], "index": target, "probability": float(probabilities[target])},
        "map": {"shape": list(heatmap.shape), "sum": float(heatmap.sum(dtype=np.float64)),
                "min": float(heatmap.min()), "max": float(heatmap.max()),
                "values": [[float(f"{v:.7g}") for v in row] for row in heatmap.tolist()]},
        "files": {"picture": f"{name}.{kind}.png", "map": f"{name}.{kind}.npy", "json": f"{name}.{kind}.json"},
        "legend": legend(labels[target], signed=method != "gradcam"),
    }
    if delta is not None:
        record["convergence_delta"] = delta  # sum of the map - (f(image) - f(black)); near 0 when IG converged
    return record
