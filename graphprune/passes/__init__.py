"""Rewrite passes: each a small object with one job (`base.Pass`: check, requires, call, ensures),
chained by `base.PassManager`. `rewrite.rewrite_model` is the PyTorch chain; the streaming backend
runs the same passes one layer at a time; the ONNX backend has its own passes over the ModelProto."""

from .base import Pass, PassError, PassManager, PassResult, RewriteState

__all__ = ["Pass", "PassError", "PassManager", "PassResult", "RewriteState"]
