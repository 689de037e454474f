"""Checkpoint -> bundle (ONNX fp32, safetensors, manifest), verified by a parity check against torch."""
