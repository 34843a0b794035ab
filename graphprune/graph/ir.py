"""The graph IR shared by every frontend (torch.export/FX, ONNX).

A `Graph` is a networkx MultiDiGraph whose nodes are ops and whose edges are tensors. Frontends
translate their native ops into a small canonical vocabulary (``linear``, ``reshape``,
``elementwise``, ``sdpa``, ...; see `graphprune.graph.rules`) with canonical attributes, so the
dimension rules never look at where a graph came from.

Tensors are kept in a side table (`Graph.tensors`) because one tensor can feed many ops: an edge
``producer -> consumer`` carries the tensor's name in its ``tensor`` attribute. Parameters, buffers,
model inputs and constants are tensors with no producing op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx

# Tensor kinds
ACTIVATION = "activation"
PARAM = "param"  # trainable parameter: sliced when its axis is pruned
STATE = "state"  # persistent buffer (BatchNorm running stats): sliced like a parameter
DERIVED = "derived"  # non-persistent buffer or constant: its values depend on its shape
INPUT = "input"  # a model input: its axes are the model's interface


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    kind: str = ACTIVATION
    source_name: str | None = None  # parameter / buffer / input name in the source model
    is_output: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass
class Op:
    name: str
    op: str  # canonical op type
    inputs: list[str | None]  # tensor names; None for absent optional inputs
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    source_op: str = ""  # the frontend's own op name (aten target, ONNX op_type)
    location: str = ""  # module path or ONNX node name, for reports


class Graph:
    """Ops and tensors of one traced model."""

    def __init__(self, source: str, frontend: str) -> None:
        self.source = source  # what was traced (model class or file)
        self.frontend = frontend  # "torch.export", "torch.fx", "onnx"
        self.tensors: dict[str, Tensor] = {}
        self.ops: dict[str, Op] = {}
        self.nx = nx.MultiDiGraph()
        self.aliases: dict[str, list[str]] = {}  # source param name -> other names (tied weights)
        self.notes: list[str] = []

    def add_tensor(self, tensor: Tensor) -> Tensor:
        self.tensors[tensor.name] = tensor
        return tensor

    def add_op(self, op: Op) -> Op:
        if op.name in self.ops:
            raise ValueError(f"duplicate op name {op.name}")
        self.ops[op.name] = op
        self.nx.add_node(op.name, op=op.op)
        readers = self._consumers
        for tname in op.inputs:
            if tname is None:
                continue
            producer = self.producer(tname)
            self.nx.add_edge(producer or f"<{tname}>", op.name, tensor=tname)
            names = readers.setdefault(tname, [])
            if not names or names[-1] != op.name:  # an op reading a tensor twice is one consumer
                names.append(op.name)
        for tname in op.outputs:
            self._producers[tname] = op.name
        return op

    @property
    def _producers(self) -> dict[str, str]:
        if not hasattr(self, "_producer_table"):
            self._producer_table: dict[str, str] = {}
        return self._producer_table

    @property
    def _consumers(self) -> dict[str, list[str]]:
        if not hasattr(self, "_consumer_table"):
            self._consumer_table: dict[str, list[str]] = {}
        return self._consumer_table

    def producer(self, tensor: str) -> str | None:
        return self._producers.get(tensor)

    def consumers(self, tensor: str) -> list[Op]:
        """The ops reading `tensor`, in the order they were added (an index kept by `add_op`)."""
        return [self.ops[name] for name in self._consumers.get(tensor, ())]

    def topological_ops(self) -> Iterable[Op]:
        # Ops are added in execution order by every frontend; keep that order (stable reports).
        return self.ops.values()

    def parameters(self) -> list[Tensor]:
        return [t for t in self.tensors.values() if t.kind in (PARAM, STATE)]

    def summary(self) -> str:
        return f"{len(self.ops)} ops, {len(self.tensors)} tensors, {len(self.parameters())} parameters"
