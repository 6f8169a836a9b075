"""Run the real Triton server locally, with a Python stand-in for the onnxruntime backend."""

from triton_local.server import TritonServer, TritonServerError, prepare_backend_dir

__all__ = ["TritonServer", "TritonServerError", "prepare_backend_dir"]
