"""Backends: where a model lives while it is pruned (`base.Backend`). `memory` holds a PyTorch model,
`stream` prunes a checkpoint on disk layer by layer, `onnx` rewrites an ONNX file; `choose` picks one
for a source and the options."""

from .base import Backend, Capabilities, Stage, StageResult, available, choose, get, register

__all__ = ["Backend", "Capabilities", "Stage", "StageResult", "available", "choose", "get", "register"]
