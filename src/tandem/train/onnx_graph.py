"""A trained (or fresh) model as the ONNX graph a bundle carries: one writer, used by `tandem export`
(tandem.export.onnx_bundle) and by `tandem plan --train` (tandem.hardware.train_memory), so the planner analyses
exactly the graph an export would write.

    export_onnx(model, torch.zeros(2, 1, 28, 28), Path("model.onnx"), metadata={"tandem.labels": "[...]"})
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

INPUT, OUTPUT = "input", "logits"


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, exporter: str = "torchscript",
                metadata: dict[str, str] | None = None) -> None:
    """Write model.onnx with a dynamic batch dimension (and `metadata` in its metadata_props)."""
    _export_graph(model, example, path, exporter)
    if metadata:
        import onnx

        graph = onnx.load(str(path))
        onnx.helper.set_model_props(graph, metadata)
        onnx.save(graph, str(path))


def _export_graph(model: torch.nn.Module, example: torch.Tensor, path: Path, exporter: str) -> None:
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamo=True, dynamic_shapes=({0: batch},), optimize=True, verbose=False,
                          external_data=False)
        return
    # The TorchScript exporter is deprecated but ~15x faster for these models; parity is checked either way.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamo=False, opset_version=17,
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
