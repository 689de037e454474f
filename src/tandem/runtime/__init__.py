"""The inference system: ONNX Runtime + NumPy, never torch.

    from tandem.runtime import Predictor
    predictor = Predictor.load("bundle/")
    predictor.top_k(["cat.png"], k=3)
"""

from tandem.runtime.predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]
