"""batchgate: an Open Inference Protocol gateway (gRPC + HTTP) over ONNX Runtime."""

__version__ = "0.1.0"
