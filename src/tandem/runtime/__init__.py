"""The inference system: ONNX Runtime + NumPy, never torch.

    from tandem.runtime import Predictor
    predictor = Predictor.load("bundle/")                    # int8 when the bundle has model.int8.onnx
    predictor = Predictor.load("bundle/", precision="fp32")  # auto (default), fp32 or int8
    predictor.top_k(["cat.png"], k=3)
"""

from tandem.runtime.predictor import PRECISIONS, Prediction, Predictor

__all__ = ["PRECISIONS", "Prediction", "Predictor"]
