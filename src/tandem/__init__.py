"""tandem: a training system and a torch-free inference system, joined by one verified bundle."""

__version__ = "0.1.0"
