"""Every model in the registry exports to ONNX and ONNX Runtime agrees with torch (max abs logit <= 1e-4)."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tandem.train.onnx_graph import export_onnx
from tandem.train.models import MODELS, create_model

SHAPES = {"mlp": (1, 28), "cnn": (1, 28), "cnn-fpga": (1, 28), "resnet": (3, 32)}


def _trained_statistics(model, channels, size):
    """A few training-mode forward passes so batch norm has non-trivial running statistics."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, channels, size, size) * 2 + 0.3)
    return model.eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_onnx_matches_torch(name, tmp_path):
    assert set(SHAPES) == set(MODELS), "add the new model to SHAPES"
    torch.manual_seed(0)
    channels, size = SHAPES[name]
    model = _trained_statistics(create_model(name, channels, size, num_classes=7, width=8), channels, size)
    export_onnx(model, torch.randn(2, channels, size, size), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5, 33):  # the batch dimension is dynamic
        x = torch.randn(batch, channels, size, size)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == (batch, 7)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_dynamo_exporter_matches_torch(tmp_path):
    torch.manual_seed(0)
    model = _trained_statistics(create_model("cnn", 1, 28, num_classes=10, width=8), 1, 28)
    export_onnx(model, torch.randn(2, 1, 28, 28), tmp_path / "m.onnx", exporter="dynamo")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(9, 1, 28, 28)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-4, rtol=0)
