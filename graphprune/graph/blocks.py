"""The repeated blocks of a model, found from the structure of its graph (the sparsity denominator).

One definition for every backend and every frontend: names do not matter (an ONNX file from
`torch.onnx.export` calls a linear weight ``onnx::MatMul_123`` or ``val_42``), the dataflow does.

* A **residual add** adds two activations of the output's shape where one of them (the *skip*) is
  an ancestor of the other (the *branch*) through at least one parameterised layer (linear,
  matmul or convolution with a weight): ``h + attn(norm(h))``, ``x + conv(conv(x))``. Adds whose
  operands do not descend from each other (rotary halves, word + position embeddings, routed +
  shared experts) are not residual.
* The **stream** starts at the skip input of the first residual add (the embedding output, or
  the embedding LayerNorm's output in BERT) and ends at the last residual add; when every block
  ends with a norm on the stream (post-LN: the skip of each residual add after the first is a
  LayerNorm of the previous add), the stream ends at the norm after the last add.
* The **layer parameters** are the parameters read by the ops of the stream: the ancestors of its
  end that are not ancestors of its start (nor the op producing it). The embedding, its norm, the
  final norm and the LM head / pooler / classifier are outside; parameters the blocks read from a
  common prologue (a T5-style position bias) are inside.
* A model with fewer than two residual adds has no repeated blocks to speak of (a single skip
  connection is a part of the network, not a stack of blocks): every parameter counts.

On the PyTorch frontend parameters are `nn.Parameter`s (buffers are not counted, like
`models.structure.layer_parameter_count`); on ONNX every floating-point initializer the stream
reads counts (an exporter's float constants of a few elements included).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .ir import ACTIVATION, PARAM, Graph, Op

_ADDS = {"add", "add_", "biasadd", "skiplayernormalization", "skipsimplifiedlayernormalization"}
_LAYERS = {"linear", "matmul", "addmm", "conv", "einsum"}
_NORMS = {"layer_norm"}


@dataclass(frozen=True)
class Residual:
    op: str  # the add
    skip: str  # the stream tensor it adds to
    branch: str  # the block's output


def _is_add(op: Op) -> bool:
    if op.op != "elementwise":
        return False
    source = op.source_op.rsplit("::", 1)[-1]
    if source.startswith("aten."):
        source = source.split(".")[1]
    return source.lower() in _ADDS


class _Dataflow:
    """Execution order and backward reachability over the ops of a graph."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.index = {name: k for k, name in enumerate(graph.ops)}

    def producer_index(self, tensor: str) -> int:
        producer = self.graph.producer(tensor)
        return -1 if producer is None else self.index[producer]

    def ancestors(self, ops: Iterable[str], *, after: int = -1) -> set[str]:
        """`ops` and every op they read from (transitively), keeping ops later than index `after`."""
        graph = self.graph
        seen = {name for name in ops if self.index[name] > after}
        stack = list(seen)
        while stack:
            op = graph.ops[stack.pop()]
            for t in op.inputs:
                producer = graph.producer(t) if t is not None else None
                if producer is not None and producer not in seen and self.index[producer] > after:
                    seen.add(producer)
                    stack.append(producer)
        return seen

    def has_layer(self, op: Op) -> bool:
        tensors = self.graph.tensors
        return op.op in _LAYERS and any(t is not None and tensors[t].kind == PARAM and tensors[t].ndim >= 2
                                        for t in op.inputs)

    def descends_through_layer(self, branch: str, skip: str) -> bool:
        """Whether tensor `branch` is computed from tensor `skip` through a parameterised layer."""
        graph = self.graph
        start = graph.producer(branch)
        if start is None:
            return False
        floor = self.producer_index(skip)
        between = self.ancestors([start], after=floor)
        # ops of `between` that read `skip` (directly or through other ops of `between`)
        from_skip: set[str] = set()
        for name in sorted(between, key=self.index.__getitem__):
            op = graph.ops[name]
            if any(t == skip or (t is not None and graph.producer(t) in from_skip) for t in op.inputs):
                from_skip.add(name)
        return start in from_skip and any(self.has_layer(graph.ops[name]) for name in from_skip)


def residual_adds(graph: Graph) -> list[Residual]:
    """The residual adds of `graph` in execution order (see the module docstring)."""
    flow = _Dataflow(graph)
    tensors = graph.tensors
    found = []
    for op in graph.ops.values():
        if not _is_add(op) or not op.outputs:
            continue
        shape = tensors[op.outputs[0]].shape
        operands = [t for t in dict.fromkeys(op.inputs) if t is not None and tensors[t].kind == ACTIVATION
                    and tensors[t].shape == shape]
        if len(operands) < 2:
            continue
        operands.sort(key=flow.producer_index)
        for k, skip in enumerate(operands[:-1]):
            branch = next((b for b in operands[k + 1:] if flow.descends_through_layer(b, skip)), None)
            if branch is not None:
                found.append(Residual(op.name, skip, branch))
                break
    return found


def _stream_end(graph: Graph, adds: list[Residual]) -> str:
    """The last residual add, or the norm after it when every block ends with a norm (post-LN)."""
    last = graph.ops[adds[-1].op].outputs[0]
    post_norm = True
    for previous, following in zip(adds, adds[1:]):
        producer = graph.producer(following.skip)
        op = graph.ops[producer] if producer is not None else None
        if op is None or op.op not in _NORMS or op.inputs[0] != graph.ops[previous.op].outputs[0]:
            post_norm = False
            break
    if post_norm:
        norm = next((op for op in graph.consumers(last) if op.op in _NORMS and op.inputs[0] == last), None)
        if norm is not None:
            return norm.name
    return adds[-1].op


def layer_parameters(source) -> set[str]:
    """Names (as the source model calls them) of the parameters of the repeated blocks of `source`
    (a `Graph` or a `GroupSet`): see the module docstring."""
    graph: Graph = getattr(source, "graph", source)
    tensors = graph.tensors
    adds = residual_adds(graph)
    if len(adds) < 2:
        return {t.source_name or t.name for t in tensors.values() if t.kind == PARAM}
    flow = _Dataflow(graph)
    start = graph.producer(adds[0].skip)
    before = flow.ancestors([start]) if start is not None else set()
    stream = flow.ancestors([_stream_end(graph, adds)]) - before
    names: set[str] = set()
    for name in stream:
        for t in graph.ops[name].inputs:
            if t is not None and tensors[t].kind == PARAM:
                names.add(tensors[t].source_name or t)
    return names


def count_layer_parameters(sizes: Iterable[tuple[str, object, int]], layers: set[str], known: set[str]) -> int:
    """Elements of the layer parameters among `sizes` ((name, identity, numel) of every parameter of
    a model, tied names included: each identity counts once). A parameter not in `known` (the
    names the layer parameters were found among: a rewrite added it, say a compensation bias)
    counts when its module holds a layer parameter."""
    owners = {name.rpartition(".")[0] for name in layers}
    seen: set = set()
    total = 0
    for name, identity, numel in sizes:
        if identity in seen:
            continue
        if name in layers or (name not in known and name.rpartition(".")[0] in owners):
            seen.add(identity)
            total += int(numel)
    return total


def module_sizes(model) -> list[tuple[str, object, int]]:
    """(name, identity, numel) of every parameter of an `nn.Module`, tied names included."""
    return [(name, id(p), p.numel()) for name, p in model.named_parameters(remove_duplicate=False)]


def sizes_of(mapping: Mapping[str, int]) -> list[tuple[str, object, int]]:
    return [(name, name, n) for name, n in mapping.items()]
