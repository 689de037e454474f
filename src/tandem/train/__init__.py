"""The training system (PyTorch): models, the loop, checkpoints."""
