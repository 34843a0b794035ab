"""Trace models into the graph IR, propagate dimension rules and build dependency groups."""

from .groups import BLOCKED, FIXED, OPT_IN, PRUNABLE, Group, GroupSet, ParamSlice, build_groups
from .ir import Graph, Op, Tensor
from .rules import RULES, propagate
from .trace_torch import trace

__all__ = ["BLOCKED", "FIXED", "OPT_IN", "PRUNABLE", "Graph", "Group", "GroupSet", "Op", "ParamSlice",
           "RULES", "Tensor", "build_groups", "propagate", "trace", "analyze", "analyze_onnx"]


def analyze_onnx(model, **kwargs) -> GroupSet:
    """Dependency groups of an ONNX model (a path or an onnx.ModelProto)."""
    from .trace_onnx import analyze_onnx as _analyze_onnx

    return _analyze_onnx(model, **kwargs)


def analyze(model, example_inputs=None, *, seq_len: int = 8) -> GroupSet:
    """Trace `model` and return its dependency groups."""
    return build_groups(trace(model, example_inputs, seq_len=seq_len))
