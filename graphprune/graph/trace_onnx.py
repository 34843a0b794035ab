"""ONNX frontend: read an ONNX model into the graph IR.

The model is given concrete input shapes (dynamic dims get example sizes: batch 1, sequence 8,
or what ``input_shapes`` says), ONNX shape inference runs with data propagation, and then every
node is visited in order:

* **Static nodes** - ``Constant``, ``Shape``/``Size`` and any node whose inputs are all static
  (constants, non-persistent buffers, shapes) - are *folded*: their values are computed here and
  no IR op is emitted. This is how shape-computation subgraphs (``Shape -> Gather -> Concat ->
  Reshape``), the attention mask and rotary tables disappear. A static tensor that a data op reads
  becomes either a ``create`` op (its values are all equal, e.g. the zero bias the exporter builds
  for a bias-free conv: slicing it is always legal) or a DERIVED tensor (values depend on position:
  its axes are pinned, like a torch buffer). Static inputs that only give sizes or positions
  (Reshape targets, Slice starts, Unsqueeze axes, ...) are recorded in the op's attrs so that an
  ONNX-native rewrite can find and rewrite them later: ``onnx_node``, ``onnx_inputs`` and per op
  e.g. ``shape_input`` / ``shape_literal`` for Reshape.
* **Data nodes** are translated into canonical IR ops (`ONNX_TRANSLATIONS`). An op without a
  translation becomes ``unknown``: the rules pin every axis it touches and the report names it.
  Nothing is guessed to be elementwise.

Initializers are parameters unless the torch exporter's metadata says they are buffers
(persistent buffers are STATE, non-persistent ones and constants DERIVED); without that metadata,
floating-point initializers are parameters and integer/bool ones DERIVED.

Two ONNX idioms are fused back into the canonical linear ops so that parameter roles match the
PyTorch frontend: ``MatMul(x, Transpose(W))`` (the dynamo exporter's ``nn.Linear`` with
``optimize=False``) becomes ``linear(x, W[out, in])``; ``MatMul(x, W[in, out])`` stays ``matmul``
(role linear.in/out); a following ``Add`` of a 1-D bias parameter is folded into the op
(``linear`` bias, or ``addmm``). ``Gemm`` is ``linear`` (transB=1) or ``addmm``/``matmul``.

Identical deterministic nodes are merged (exporters repeat index and mask chains per use; MoE
expert gathers must read one routing index), identity ``Transpose``/``Identity``/one-input
``Concat`` are aliases, and ``GatherND``/``ScatterND`` along leading axes become ``index`` /
``slice_scatter`` / ``index_add`` with the index tuple split into per-axis index tensors.

Usage: ``graph_from_onnx(path_or_model, input_shapes={"input_ids": [1, 16]})`` gives the `Graph`;
``analyze_onnx(...)`` its dependency groups.
"""

from __future__ import annotations

import ast
import os
import re
import time
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import TraceError
from .ir import ACTIVATION, DERIVED, INPUT, PARAM, STATE, Graph, Op, Tensor

DEFAULT_BATCH_SIZE = 1
DEFAULT_SEQ_LEN = 8
FOLD_LIMIT = 1 << 22  # elements: larger static tensors are not computed here
INLINE_INITIALIZER_LIMIT = 1 << 16  # elements: initializers kept as data for shape inference

_DTYPE_NAMES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
    9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 14: "complex64",
    15: "complex128", 16: "bfloat16", 17: "float8_e4m3fn", 18: "float8_e4m3fnuz", 19: "float8_e5m2",
    20: "float8_e5m2fnuz", 21: "uint4", 22: "int4", 23: "float4_e2m1",
}
_FLOAT_TYPES = {1, 10, 11, 16, 17, 18, 19, 20, 23}

# Ops never folded even when their inputs are static: random values, control flow, sequences.
_NEVER_FOLD = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "If", "Loop", "Scan", "SequenceConstruct", "SequenceEmpty", "SequenceAt", "SequenceInsert",
    "SequenceErase", "SequenceLength", "SplitToSequence", "ConcatFromSequence", "SequenceMap",
    "Optional", "OptionalGetElement", "OptionalHasElement",
}
# Ops replayed (not folded) when a static tensor they produce is read by a data op.
_VIEW_OPS = {"Identity", "Cast", "CastLike", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand", "Transpose"}
_SHAPE_ONLY_INPUTS = {"Shape": (), "Size": (), "CastLike": (0,), "ConstantOfShape": (0,)}

_TORCH_KIND_KEY = "pkg.torch.export.graph_signature.InputSpec.kind"
_TORCH_PERSISTENT_KEY = "pkg.torch.export.graph_signature.InputSpec.persistent"
_TORCH_SIGNATURE_KEY = "pkg.torch.export.ExportedProgram.graph_signature"


def _dtype_name(elem_type: int) -> str:
    return _DTYPE_NAMES.get(elem_type, onnx.TensorProto.DataType.Name(elem_type).lower()
                            if elem_type in onnx.TensorProto.DataType.values() else f"onnx{elem_type}")


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        out[a.name] = value
    return out


def _norm_axis(axis: int, ndim: int) -> int:
    return int(axis) + ndim if int(axis) < 0 else int(axis)


# ============================================================================ loading
def _load(model: Any) -> tuple[onnx.ModelProto, str | None, str]:
    if isinstance(model, onnx.ModelProto):
        return model, None, model.graph.name or "onnx model"
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise TraceError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, RuntimeError, ...
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise TraceError(f"cannot read ONNX file {path} (truncated or not an ONNX model?): "
                         f"{type(exc).__name__}: {first}") from exc
    from pathlib import Path

    from ..io.onnx_files import check_external_data

    base_dir = os.path.dirname(os.path.abspath(path))
    check_external_data(proto, Path(base_dir), path)  # missing files, paths leaving the directory
    return proto, base_dir, os.path.basename(path)


def _opset(proto: onnx.ModelProto) -> int:
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    raise TraceError("ONNX model imports no default-domain opset")


def _initializer_kinds(proto: onnx.ModelProto) -> dict[str, str]:
    """Parameter / buffer kinds from the torch exporter's metadata (empty for other exporters)."""
    kinds: dict[str, str] = {}

    def from_props(name: str, props) -> None:
        meta = {p.key: p.value for p in props}
        kind = meta.get(_TORCH_KIND_KEY)
        if kind is None:
            return
        persistent = meta.get(_TORCH_PERSISTENT_KEY, "None")
        if kind == "PARAMETER":
            kinds[name] = PARAM
        elif kind == "BUFFER":
            kinds[name] = STATE if persistent == "True" else DERIVED
        else:  # CONSTANT_TENSOR, CUSTOM_OBJ, TOKEN
            kinds[name] = DERIVED

    signature = {p.key: p.value for p in proto.graph.metadata_props}.get(_TORCH_SIGNATURE_KEY, "")
    for line in signature.splitlines():
        m = re.match(r"\s*\S+: (PARAMETER|BUFFER|CONSTANT_TENSOR) target='([^']+)'(?: persistent=(\w+))?", line)
        if m:
            kind, target, persistent = m.groups()
            kinds[target] = (PARAM if kind == "PARAMETER" else STATE if persistent == "True" else DERIVED)
    for vi in list(proto.graph.value_info) + list(proto.graph.input):
        from_props(vi.name, vi.metadata_props)
    for init in proto.graph.initializer:
        if len(init.metadata_props):
            from_props(init.name, init.metadata_props)
    return kinds


def _concrete_input_shapes(proto: onnx.ModelProto, init_names: set[str],
                           input_shapes: dict[str, list[int]] | None, batch_size: int,
                           seq_len: int) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """A static shape for every graph input: given ones first, then dim_params shared with them,
    then batch (axis 0, or a dim named like 'batch') and sequence sizes."""
    given = {k: tuple(int(s) for s in v) for k, v in (input_shapes or {}).items()}
    inputs = [i for i in proto.graph.input if i.name not in init_names]
    unknown = set(given) - {i.name for i in inputs}
    if unknown:
        raise TraceError(f"input_shapes names unknown graph inputs {sorted(unknown)}; "
                         f"inputs are {[i.name for i in inputs]}")
    symbols: dict[str, int] = {}
    for vi in inputs:
        if vi.name not in given or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(given[vi.name]) and vi.type.tensor_type.HasField("shape"):
            raise TraceError(f"input_shapes['{vi.name}'] has rank {len(given[vi.name])}, "
                             f"the model's input has rank {len(dims)}")
        for d, s in zip(dims, given[vi.name]):
            if d.HasField("dim_value") and d.dim_value != s:
                raise TraceError(f"input_shapes['{vi.name}'] = {list(given[vi.name])} contradicts "
                                 f"the model's static dim {d.dim_value}")
            if d.HasField("dim_param"):
                symbols.setdefault(d.dim_param, s)
    out: dict[str, tuple[int, ...]] = {}
    for vi in inputs:
        if not vi.type.HasField("tensor_type"):
            raise TraceError(f"graph input '{vi.name}' is not a tensor (sequence/map inputs are not supported)")
        if vi.name in given:
            out[vi.name] = given[vi.name]
            continue
        if not vi.type.tensor_type.HasField("shape"):
            raise TraceError(f"graph input '{vi.name}' has no shape (unknown rank): pass "
                             f"input_shapes={{'{vi.name}': [...]}}")
        shape = []
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
                continue
            name = d.dim_param if d.HasField("dim_param") else ""
            if name in symbols:
                shape.append(symbols[name])
                continue
            lowered = name.lower()
            if "batch" in lowered or (k == 0 and not any(w in lowered for w in ("seq", "len", "token"))):
                value = batch_size
            else:
                value = seq_len
            if name:
                symbols[name] = value
            shape.append(value)
        out[vi.name] = tuple(shape)
    return out, symbols


def _shape_inference_model(proto: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
                           init_names: set[str]) -> onnx.ModelProto:
    """A light copy of the model for shape inference: concrete inputs, large initializers reduced
    to typed graph inputs (no weight bytes are copied)."""
    g = proto.graph
    sk = onnx.ModelProto()
    sk.ir_version = max(proto.ir_version, 4)
    sk.opset_import.extend(proto.opset_import)
    sk.functions.extend(proto.functions)
    sg = sk.graph
    sg.name = g.name
    sg.node.extend(g.node)
    for vi in g.input:
        if vi.name in init_names:
            continue
        elem = vi.type.tensor_type.elem_type
        sg.input.append(helper.make_tensor_value_info(vi.name, elem, list(input_shapes[vi.name])))
    for init in g.initializer:
        external = init.data_location == onnx.TensorProto.EXTERNAL
        numel = int(np.prod(init.dims)) if len(init.dims) else 1
        if not external and numel <= INLINE_INITIALIZER_LIMIT:
            sg.initializer.append(init)
        else:
            sg.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    for vi in g.output:  # declared output shapes may be symbolic: keep only the element type
        out = sg.output.add()
        out.name = vi.name
        if vi.type.HasField("tensor_type"):
            out.type.tensor_type.elem_type = vi.type.tensor_type.elem_type
        else:
            out.type.CopyFrom(vi.type)
    return sk


def _types_of(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    types: dict[str, onnx.TypeProto] = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        types[vi.name] = vi.type
    return types


def _static_shape(tp: onnx.TypeProto | None) -> tuple[int, ...] | None:
    if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in tp.tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return tuple(dims)


def toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Nodes in execution order; a clean error when some input is never produced."""
    known = set(available)
    in_order = True
    for node in nodes:
        if any(i and i not in known for i in node.input):
            in_order = False
            break
        known.update(o for o in node.output if o)
    if in_order:
        return nodes
    produced = {o for n in nodes for o in n.output if o}
    for node in nodes:
        missing = [i for i in node.input if i and i not in produced and i not in available]
        if missing:
            raise TraceError(f"malformed ONNX graph: input '{missing[0]}' of {node.op_type} node "
                             f"'{node.name}' is produced by no node, initializer or graph input "
                             f"(truncated file?)")
    order: list[onnx.NodeProto] = []
    known = set(available)
    pending = list(nodes)
    while pending:
        rest = []
        for node in pending:
            if all(not i or i in known for i in node.input):
                order.append(node)
                known.update(o for o in node.output if o)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise TraceError(f"malformed ONNX graph: a cycle through {rest[0].op_type} node '{rest[0].name}'")
        pending = rest
    return order


# ============================================================================ static values
def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    a = _attrs(node)
    if "value" in a:
        return numpy_helper.to_array(a["value"])
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32)
    if "value_floats" in a:
        return np.array(a["value_floats"], dtype=np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64)
    if "value_ints" in a:
        return np.array(a["value_ints"], dtype=np.int64)
    raise ValueError("unsupported Constant attribute")


_NUMPY_BINARY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Equal": np.equal, "Less": np.less,
    "Greater": np.greater, "LessOrEqual": np.less_equal, "GreaterOrEqual": np.greater_equal,
    "And": np.logical_and, "Or": np.logical_or, "Max": np.maximum, "Min": np.minimum,
}


class ConstantFolder:
    """Computes the values of static nodes (numpy for the common shape ops, the ONNX reference
    implementation for the rest)."""

    def __init__(self, opsets: dict[str, int]) -> None:
        self.opsets = opsets

    def run(self, node: onnx.NodeProto, values: list[np.ndarray | None], shapes: list[tuple | None],
            out_types: list[int | None]) -> list[np.ndarray]:
        op = node.op_type
        a = _attrs(node)
        if op == "Constant":
            return [_constant_value(node)]
        if op == "Shape":
            shape = np.array(shapes[0], dtype=np.int64)
            n = len(shape)
            start = _norm_axis(a.get("start", 0), n)
            end = _norm_axis(a["end"], n) if "end" in a else n
            return [shape[max(0, min(start, n)):max(0, min(end, n))]]
        if op == "Size":
            return [np.array(int(np.prod(shapes[0])), dtype=np.int64)]
        if op == "Identity":
            return [values[0]]
        if op == "Cast":
            return [values[0].astype(helper.tensor_dtype_to_np_dtype(a["to"]))]
        if op == "CastLike" and out_types[0] is not None:
            return [values[0].astype(helper.tensor_dtype_to_np_dtype(out_types[0]))]
        if op == "Reshape":
            target = [int(s) for s in values[1]]
            if not a.get("allowzero", 0):
                target = [values[0].shape[k] if s == 0 else s for k, s in enumerate(target)]
            return [values[0].reshape(target)]
        if op == "Concat":
            parts = [v for v in values if v is not None]
            return [np.concatenate(parts, axis=_norm_axis(a["axis"], parts[0].ndim))]
        if op in ("Unsqueeze", "Squeeze") and self.opsets.get("", 0) >= 13:
            x = values[0]
            axes = [int(v) for v in values[1]] if len(values) > 1 and values[1] is not None else None
            if op == "Unsqueeze":
                nd = x.ndim + len(axes)
                return [np.expand_dims(x, tuple(sorted(_norm_axis(v, nd) for v in axes)))]
            if axes is None:
                return [np.squeeze(x)]
            return [np.squeeze(x, axis=tuple(_norm_axis(v, x.ndim) for v in axes))]
        if op == "Gather":
            x, idx = values
            axis = _norm_axis(a.get("axis", 0), x.ndim)
            return [np.take(x, np.where(idx < 0, idx + x.shape[axis], idx), axis=axis)]
        if op == "GatherElements":  # (the reference implementation mis-shapes a smaller index)
            x, idx = values
            axis = _norm_axis(a.get("axis", 0), x.ndim)
            return [np.take_along_axis(x, np.where(idx < 0, idx + x.shape[axis], idx), axis=axis)]
        if op == "Expand":
            x, shape = values
            return [np.array(np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(int(s) for s in shape))))]
        if op == "Transpose":
            perm = a.get("perm")
            return [np.transpose(values[0], None if perm is None else list(perm))]
        if op in _NUMPY_BINARY and values[0].dtype == values[1].dtype:
            return [np.asarray(_NUMPY_BINARY[op](values[0], values[1]))]
        if op == "Not":
            return [np.logical_not(values[0])]
        from onnx.reference import ReferenceEvaluator

        feeds = {name: v for name, v in zip(node.input, values) if name}
        evaluator = ReferenceEvaluator(node, opsets=self.opsets)
        return [np.asarray(r) for r in evaluator.run(None, feeds)]


# ============================================================================ builder
Translator = Callable[["_Builder", onnx.NodeProto], None]


class _Builder:
    def __init__(self, proto: onnx.ModelProto, base_dir: str | None, source: str,
                 input_shapes: dict[str, list[int]] | None, batch_size: int, seq_len: int) -> None:
        self.proto = proto
        self.base_dir = base_dir
        self.opset = _opset(proto)
        self.opsets = {o.domain or "": int(o.version) for o in proto.opset_import}
        self.graph = Graph(source, "onnx")
        g = proto.graph
        self.inits = {i.name: i for i in g.initializer}
        self.init_kind = self._initializer_kinds()
        self.input_shapes, self.symbols = _concrete_input_shapes(proto, set(self.inits), input_shapes,
                                                                 batch_size, seq_len)
        # Shapes the file declares (value_info): the last resort for ops without a schema.
        self.declared = {vi.name: vi.type for vi in list(g.value_info) + list(g.output)}
        self.folder = ConstantFolder(self.opsets)
        self.types: dict[str, onnx.TypeProto] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.elem: dict[str, int] = {}
        self.static: dict[str, np.ndarray] = {}
        self.static_from_shape: dict[str, bool] = {}  # value computed from some tensor's shape
        self.static_roots: dict[str, set[str]] = {}  # initializers a static value is computed from
        self.static_producer: dict[str, str] = {}
        self.static_node: dict[str, onnx.NodeProto] = {}
        self.alias: dict[str, str] = {}
        self.sequences: dict[str, list[str]] = {}
        self.producer_of: dict[str, onnx.NodeProto] = {}
        self.names: dict[int, str] = {}
        self.transposed_params: dict[str, str] = {}  # Transpose output -> [out,in] parameter it reads
        self.fused_bias: dict[str, onnx.NodeProto] = {}  # MatMul/Gemm node name -> Add node folded in
        self.skip_nodes: set[int] = set()
        self.op_names: set[str] = set()
        self.counts = {"translated": 0, "folded": 0, "dead": 0, "unknown": 0, "deduplicated": 0}
        self.seen: dict[tuple, list[str]] = {}
        self.index_columns: dict[str, list[str]] = {}
        self.unknown_types: set[str] = set()
        self.shapeless: dict[str, tuple[onnx.NodeProto, str]] = {}  # output of an untraced node -> (node, why)
        self.consumed = {i for n in g.node for i in n.input if i} | {o.name for o in g.output}

    # ------------------------------------------------------------ setup
    def _initializer_kinds(self) -> dict[str, str]:
        meta = _initializer_kinds(self.proto)
        kinds = {}
        for name, init in self.inits.items():
            if name in meta:
                kinds[name] = meta[name]
            else:
                kinds[name] = PARAM if init.data_type in _FLOAT_TYPES else DERIVED
        return kinds

    def _init_value(self, init: onnx.TensorProto) -> np.ndarray | None:
        numel = int(np.prod(init.dims)) if len(init.dims) else 1
        if numel > FOLD_LIMIT:
            return None
        try:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                if self.base_dir is None:
                    return None
                return numpy_helper.to_array(init, base_dir=self.base_dir)
            return numpy_helper.to_array(init)
        except Exception:  # noqa: BLE001 - missing or short external data: treated as unknown values
            self.graph.notes.append(f"could not read the values of initializer '{init.name}'")
            return None

    def infer(self) -> None:
        sk = _shape_inference_model(self.proto, self.input_shapes, set(self.inits))
        try:
            inferred = onnx.shape_inference.infer_shapes(sk, check_type=False, strict_mode=False, data_prop=True)
        except Exception as exc:  # noqa: BLE001
            raise TraceError(f"ONNX shape inference failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        self.types = _types_of(inferred)
        for name, init in self.inits.items():
            self.shapes[name] = tuple(int(d) for d in init.dims)
            self.elem[name] = init.data_type
        for name, shape in self.input_shapes.items():
            self.shapes[name] = shape
            self.elem[name] = self.types[name].tensor_type.elem_type

    # ------------------------------------------------------------ tensors
    def resolve(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[self.resolve(name)]

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def dtype(self, name: str) -> int:
        return self.elem.get(self.resolve(name), 0)

    def value(self, name: str | None) -> np.ndarray | None:
        if not name:
            return None
        return self.static.get(self.resolve(name))

    def is_param(self, name: str | None) -> bool:
        if not name:
            return False
        name = self.resolve(name)
        return name in self.inits and self.init_kind[name] in (PARAM, STATE)

    def _add_tensor(self, name: str, kind: str = ACTIVATION, source: str | None = None) -> str:
        if name not in self.graph.tensors:
            if name not in self.shapes:
                self._blame_untraced(name)
                producer = self.producer_of.get(name)
                what = f" (output of {producer.op_type} node '{self.node_name(producer)}')" if producer else ""
                raise TraceError(f"no static shape for tensor '{name}'{what}: every tensor needs one; "
                                 f"check the input sizes (input_shapes=...)")
            self.graph.add_tensor(Tensor(name, self.shapes[name], _dtype_name(self.elem.get(name, 1)), kind, source))
        return name

    def data(self, name: str | None) -> str | None:
        """The IR tensor for a data input of an op (static values are materialized)."""
        if not name:
            return None
        name = self.resolve(name)
        if name in self.graph.tensors:
            return name
        if name in self.inits and name not in self.static:
            return self._add_tensor(name, self.init_kind[name], name)
        if name in self.static:
            return self._materialize(name)
        if name in self.sequences:
            raise _Untranslatable(f"sequence '{name}' used as a tensor")
        return self._add_tensor(name)

    def _materialize(self, name: str) -> str:
        v = self.static[name]
        if name in self.inits:
            return self._add_tensor(name, self.init_kind[name], name)
        node = self.static_node.get(name)
        where = self.location(node) if node is not None else name
        uniform = v.size > 0 and bool(np.all(v == v.flat[0]))
        big_axis = any(s > 1 for s in v.shape)
        if uniform and big_axis:
            # All values equal: no position means anything, any slice of it stays correct.
            self._add_tensor(name)
            fill = v.flat[0].item() if hasattr(v.flat[0], "item") else v.flat[0]
            self._emit_raw(Op(self._op_name(f"{name}/create"), "create", [], [name],
                              {"fill": fill, "static": True, "from_shape": self.static_from_shape.get(name, False),
                               "onnx_tensor": name}, self.static_producer.get(name, "Constant"), where))
            return name
        producer = self.static_producer.get(name)
        if (big_axis and v.ndim == 1 and producer == "Range" and np.issubdtype(v.dtype, np.integer)
                and np.array_equal(v, np.arange(v.size))):
            self._add_tensor(name)
            self._emit_raw(Op(self._op_name(f"{name}/arange"), "create", [], [name],
                              {"arange": True, "static": True, "onnx_tensor": name}, "Range", where))
            return name
        if node is not None and node.op_type in _VIEW_OPS and node.input[0] and self.resolve(node.input[0]) in self.static:
            # A view of another static tensor: replay the view so that every reader of the same
            # table (e.g. the rotary cos/sin of all layers) reads one DERIVED tensor.
            if node.op_type == "Identity":
                return self.data(node.input[0])
            ONNX_TRANSLATIONS[node.op_type](self, node)
            return self.resolve(name)
        roots = sorted(self.static_roots.get(name, ()))
        source = roots[0] if len(roots) == 1 else name
        return self._add_tensor(name, DERIVED, source)

    def new_tensor(self, name: str, shape: tuple[int, ...], elem: int) -> str:
        self.shapes[name] = tuple(shape)
        self.elem[name] = elem
        return self._add_tensor(name)

    # ------------------------------------------------------------ ops
    def _op_name(self, base: str) -> str:
        name, k = base, 1
        while name in self.op_names:
            k += 1
            name = f"{base}#{k}"
        self.op_names.add(name)
        return name

    def _emit_raw(self, op: Op) -> Op:
        return self.graph.add_op(op)

    def emit(self, node: onnx.NodeProto, op: str, inputs: list[str | None], outputs: list[str],
             attrs: dict[str, Any] | None = None, *, suffix: str = "", data_inputs: bool = True) -> Op:
        ins = [self.data(t) if data_inputs else t for t in inputs]
        outs = []
        for o in outputs:
            o = self.resolve(o) if o in self.alias else o
            if o not in self.graph.tensors:
                self._add_tensor(o)
            outs.append(o)
        base = self.node_name(node) + (f"/{suffix}" if suffix else "")
        full = {"onnx_node": self.node_name(node), "onnx_inputs": list(node.input)}
        full.update(attrs or {})
        source = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        self.counts["translated"] += 1
        return self._emit_raw(Op(self._op_name(base), op, ins, outs, full, source, self.location(node)))

    def unknown(self, node: onnx.NodeProto, why: str) -> None:
        self.counts["unknown"] += 1
        source = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        self.unknown_types.add(source)
        for o in node.output:
            if o and o not in self.shapes:
                self.shapeless[o] = (node, why)
        inputs = [i for i in node.input if i and self.resolve(i) not in self.sequences]
        outputs = [o for o in node.output if o and o in self.shapes]
        self.emit(node, "unknown", inputs, outputs, {"why": why})

    def node_name(self, node: onnx.NodeProto) -> str:
        return self.names.get(id(node)) or node.name or node.op_type

    def location(self, node: onnx.NodeProto) -> str:
        for p in node.metadata_props:
            if p.key == "pkg.torch.onnx.name_scopes":
                try:
                    scopes = ast.literal_eval(p.value)
                except (ValueError, SyntaxError):
                    break
                if len(scopes) >= 2 and scopes[-2]:
                    return str(scopes[-2])
                break
        return self.node_name(node)

    # ------------------------------------------------------------ passes
    def run(self) -> Graph:
        g = self.proto.graph
        self.infer()
        available = set(self.inits) | {i.name for i in g.input}
        nodes = toposort(list(g.node), available)
        used: set[str] = set()
        for k, node in enumerate(nodes):
            name = node.name or f"{node.op_type}_{k}"
            while name in used:
                name = f"{name}_{k}"
            used.add(name)
            self.names[id(node)] = name
            for o in node.output:
                self.producer_of[o] = node
        outputs = [o.name for o in g.output]
        missing = [o for o in outputs if o not in available and o not in self.producer_of]
        if missing:
            raise TraceError(f"malformed ONNX graph: output '{missing[0]}' is produced by no node (truncated file?)")
        for name in self.input_shapes:
            self._add_tensor(name, INPUT, name)
        for name, init in self.inits.items():
            kind = self.init_kind[name]
            if kind in (PARAM, STATE):
                self._add_tensor(name, kind, name)
            else:
                v = self._init_value(init)
                if v is not None:
                    self.static[name] = v
                    self.static_roots[name] = {name}
        live = self._live(nodes, outputs)
        self._plan_fusions(nodes, live, set(outputs))
        for k, node in enumerate(nodes):
            if k not in live:
                self.counts["dead"] += 1
                continue
            if k in self.skip_nodes:
                continue
            self._visit(node)
        for name in outputs:
            tname = self.data(name)
            self.graph.tensors[tname].is_output = True
        return self.graph

    def _live(self, nodes: list[onnx.NodeProto], outputs: list[str]) -> set[int]:
        needed = set(outputs)
        live = set()
        for k in range(len(nodes) - 1, -1, -1):
            node = nodes[k]
            if any(o in needed for o in node.output if o):
                live.add(k)
                needed.update(i for i in node.input if i)
                for a in node.attribute:  # subgraph captures (If/Loop bodies)
                    if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                        subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                        for sub in subs:
                            needed.update(i for n in sub.node for i in n.input if i)
        return live

    def _plan_fusions(self, nodes: list[onnx.NodeProto], live: set[int], graph_outputs: set[str]) -> None:
        producer: dict[str, onnx.NodeProto] = {}
        consumers: dict[str, list[tuple[int, onnx.NodeProto, int]]] = {}
        for k, node in enumerate(nodes):
            if k not in live:
                continue
            for o in node.output:
                producer[o] = node
            for pos, i in enumerate(node.input):
                if i:
                    consumers.setdefault(i, []).append((k, node, pos))

        def param_source(name: str) -> str | None:
            seen = 0
            while name not in self.inits and name in producer and seen < 8:
                p = producer[name]
                if p.op_type not in ("Identity", "Cast", "CastLike"):
                    return None
                name, seen = p.input[0], seen + 1
            return name if name in self.inits and self.init_kind[name] in (PARAM, STATE) else None

        for node in (n for k, n in enumerate(nodes) if k in live):
            if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
                continue
            w = param_source(node.input[0])
            perm = _attrs(node).get("perm")
            if w is None or len(self.shapes[w]) != 2 or (perm is not None and list(perm) != [1, 0]):
                continue
            uses = consumers.get(node.output[0], [])
            if uses and node.output[0] not in graph_outputs and all(
                    n.op_type == "MatMul" and pos == 1 for _, n, pos in uses):
                self.transposed_params[node.output[0]] = w
        for node in (n for k, n in enumerate(nodes) if k in live):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
                continue
            b = node.input[1]
            if b in self.transposed_params:
                n_out = self.shapes[self.transposed_params[b]][0]
            else:
                w = param_source(b)
                if w is None or len(self.shapes[w]) != 2:
                    continue
                n_out = self.shapes[w][1]
            out = node.output[0]
            uses = consumers.get(out, [])
            if out in graph_outputs or len(uses) != 1 or uses[0][1].op_type != "Add":
                continue
            k_add, add, pos = uses[0]
            other = add.input[1 - pos]
            bias = param_source(other)
            if bias is None or self.shapes[bias] != (n_out,):
                continue  # (a 1-D bias of the output width never changes the MatMul's shape)
            self.fused_bias[self.node_name(node)] = add
            self.skip_nodes.add(k_add)

    # ------------------------------------------------------------ one node
    def _visit(self, node: onnx.NodeProto) -> None:
        ins = [self.resolve(i) if i else "" for i in node.input]
        if self._deduplicate(node, ins):
            return
        if self._try_fold(node, ins):
            self.counts["folded"] += 1
            return
        self._set_output_types(node, ins)
        translate = None
        if node.domain in ("", "ai.onnx"):
            translate = ONNX_TRANSLATIONS.get(node.op_type)
        elif node.domain == "com.microsoft":
            translate = MS_TRANSLATIONS.get(node.op_type)
        try:
            if translate is None:
                why = (f"custom op {node.domain}::{node.op_type} has no dimension rule" if node.domain
                       not in ("", "ai.onnx") else f"no dimension rule for ONNX op {node.op_type}")
                self.unknown(node, why)
            else:
                translate(self, node)
        except _Untranslatable as exc:
            self.unknown(node, str(exc))

    def _deduplicate(self, node: onnx.NodeProto, ins: list[str]) -> bool:
        """Common subexpressions: a deterministic node computing what an earlier node computed
        (same op, inputs and attributes) is an alias of it. Exporters repeat index and mask
        chains per use; one tensor per value keeps e.g. both gathers of an MoE layer on one
        routing index."""
        if (node.op_type in _NEVER_FOLD or node.domain not in ("", "ai.onnx")
                or self.node_name(node) in self.fused_bias
                or any(o in self.transposed_params for o in node.output)):
            return False
        attrs = tuple(sorted((a.name, a.SerializeToString()) for a in node.attribute))
        key = (node.op_type, tuple(ins), attrs, len(node.output))
        first = self.seen.get(key)
        if first is None:
            self.seen[key] = list(node.output)
            return False
        for o, earlier in zip(node.output, first):
            if o and earlier:
                self.alias[o] = self.resolve(earlier)
        self.counts["deduplicated"] += 1
        return True

    def _try_fold(self, node: onnx.NodeProto, ins: list[str]) -> bool:
        op = node.op_type
        if node.domain not in ("", "ai.onnx") or op in _NEVER_FOLD:
            return False
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return False
        needs_value = [k for k, i in enumerate(ins) if i]
        if op in _SHAPE_ONLY_INPUTS:
            needs_value = [k for k in _SHAPE_ONLY_INPUTS[op] if k < len(ins) and ins[k]]
            if op in ("Shape", "Size") and ins[0] not in self.shapes:
                return False
        if any(ins[k] not in self.static for k in needs_value):
            return False
        if any(self.static[ins[k]].size > FOLD_LIMIT for k in needs_value):
            return False
        for o in node.output:
            shape = _static_shape(self.types.get(o))
            if shape is not None and int(np.prod(shape)) > FOLD_LIMIT:
                return False
        values = [self.static.get(i) if i else None for i in ins]
        shapes = [self.shapes.get(i) if i else None for i in ins]
        out_types = [self.types[o].tensor_type.elem_type if o in self.types and self.types[o].HasField("tensor_type")
                     else None for o in node.output]
        try:
            results = self.folder.run(node, values, shapes, out_types)
        except Exception:  # noqa: BLE001 - not computable here: translate it as a data op instead
            return False
        if len(results) < len([o for o in node.output if o]):
            return False
        from_shape = op in ("Shape", "Size") or any(self.static_from_shape.get(ins[k], False) for k in needs_value)
        roots = set().union(*(self.static_roots.get(ins[k], set()) for k in needs_value)) if needs_value else set()
        for o, v in zip(node.output, results):
            if not o:
                continue
            v = np.asarray(v)
            self.static[o] = v
            self.shapes[o] = tuple(int(s) for s in v.shape)
            self.elem[o] = (self.types[o].tensor_type.elem_type if o in self.types
                            and self.types[o].tensor_type.elem_type else helper.np_dtype_to_tensor_dtype(v.dtype))
            self.static_from_shape[o] = from_shape
            self.static_roots[o] = roots
            self.static_producer[o] = op
            self.static_node[o] = node
        return True

    def _set_output_types(self, node: onnx.NodeProto, ins: list[str]) -> None:
        missing = []
        for o in node.output:
            if not o:
                continue
            tp = self.types.get(o)
            if tp is not None and tp.HasField("sequence_type"):
                continue
            shape = _static_shape(tp)
            if shape is None:
                missing.append(o)
                continue
            self.shapes[o] = shape
            self.elem[o] = tp.tensor_type.elem_type
        if not missing:
            return
        inferred = self._infer_node(node, ins)
        for o in missing:
            tp = inferred.get(o)
            shape = _static_shape(tp)
            if shape is None:
                tp = self.declared.get(o)
                shape = self._declared_shape(tp)
            if shape is not None:
                self.shapes[o] = shape
                self.elem[o] = tp.tensor_type.elem_type or 1

    def _declared_shape(self, tp: onnx.TypeProto | None) -> tuple[int, ...] | None:
        """A value_info shape with its symbolic dims replaced by the sizes chosen for the inputs."""
        if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
            return None
        dims = []
        for d in tp.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param in self.symbols:
                dims.append(self.symbols[d.dim_param])
            else:
                return None
        return tuple(dims)

    def _infer_node(self, node: onnx.NodeProto, ins: list[str]) -> dict[str, onnx.TypeProto]:
        """Per-node shape inference with the static values computed here (fills what data
        propagation left symbolic)."""
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opsets.get(node.domain or "", self.opset),
                                          node.domain or "")
        except Exception:  # noqa: BLE001
            return {}
        renamed = onnx.NodeProto()
        renamed.CopyFrom(node)
        del renamed.input[:]
        renamed.input.extend(ins)
        types, data = {}, {}
        for i in ins:
            if not i or i not in self.shapes:
                continue
            types[i] = helper.make_tensor_type_proto(self.elem.get(i, 1), list(self.shapes[i]))
            if i in self.static and self.static[i].size <= 1 << 16:
                data[i] = numpy_helper.from_array(self.static[i], i)
        try:
            return dict(onnx.shape_inference.infer_node_outputs(schema, renamed, types, data,
                                                                opset_imports=list(self.proto.opset_import)))
        except Exception:  # noqa: BLE001
            return {}

    def _blame_untraced(self, name: str) -> None:
        """When `name` has no shape because a node without a rule (a custom-domain op, control flow)
        left its output shapeless somewhere upstream, raise a TraceError naming that node."""
        stack, seen = [name], set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in self.shapeless:
                node, why = self.shapeless[t]
                domain = node.domain or "ai.onnx"
                raise TraceError(f"cannot trace past {node.op_type} node '{self.node_name(node)}' (domain {domain}): "
                                 f"{why}, and the shape of its output '{t}' is unknown")
            producer = self.producer_of.get(t)
            if producer is not None:
                for i in producer.input:
                    if i and self.resolve(i) not in self.shapes:
                        stack.extend({i, self.resolve(i)})

    def require_shapes(self, node: onnx.NodeProto, outputs: list[str]) -> None:
        for o in outputs:
            if o and o not in self.shapes:
                self._blame_untraced(o)
                raise TraceError(f"no static shape for '{o}' (output of {node.op_type} node "
                                 f"'{self.node_name(node)}'): every tensor needs one; check the model's "
                                 f"input shapes (input_shapes=...)")


class _Untranslatable(Exception):
    """The node cannot be mapped exactly: it becomes an `unknown` op with this reason."""


# ============================================================================ translations
def _outs(node: onnx.NodeProto) -> list[str]:
    return [o for o in node.output if o]


def _static_arg(b: _Builder, node: onnx.NodeProto, index: int, attr: str | None = None,
                default: Any = None, what: str = "") -> Any:
    """A size/position argument given as an attribute (old opsets) or a static input."""
    a = _attrs(node)
    if attr and attr in a:
        return a[attr]
    if index < len(node.input) and node.input[index]:
        v = b.value(node.input[index])
        if v is None:
            raise _Untranslatable(f"{what or 'argument'} '{node.input[index]}' is computed from data")
        return v.tolist()
    return default


def _literal(b: _Builder, name: str | None) -> bool | None:
    if not name:
        return None
    return not b.static_from_shape.get(b.resolve(name), False)


def t_elementwise(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, _outs(node)[:1])
    b.emit(node, "elementwise", [i for i in node.input if i], _outs(node)[:1])


def t_first_input(b: _Builder, node: onnx.NodeProto) -> None:
    """Shape-preserving ops whose other inputs are options (CastLike's dtype donor, Softmax)."""
    b.require_shapes(node, _outs(node)[:1])
    b.emit(node, "elementwise", [node.input[0]], _outs(node)[:1])


def t_cast(b: _Builder, node: onnx.NodeProto) -> None:
    if b.is_param(node.input[0]):
        b.alias[node.output[0]] = b.resolve(node.input[0])  # a dtype view of the parameter
        return
    t_first_input(b, node)


def t_identity(b: _Builder, node: onnx.NodeProto) -> None:
    b.alias[node.output[0]] = b.resolve(node.input[0])


def t_dropout(b: _Builder, node: onnx.NodeProto) -> None:
    if len(node.output) > 1 and node.output[1]:
        if node.output[1] in b.consumed:
            raise _Untranslatable("Dropout mask output is used")
    b.alias[node.output[0]] = b.resolve(node.input[0])


def t_reshape(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, _outs(node))
    attrs: dict[str, Any] = {}
    op = node.op_type
    if op == "Reshape":
        target = node.input[1] if len(node.input) > 1 else ""
        v = b.value(target)
        attrs = {"shape_input": target, "target": v.tolist() if v is not None else None,
                 "shape_literal": _literal(b, target), "allowzero": _attrs(node).get("allowzero", 0)}
    elif op in ("Unsqueeze", "Squeeze"):
        a = _attrs(node)
        axes_input = node.input[1] if len(node.input) > 1 else ""
        axes = a.get("axes")
        if axes is None and axes_input:
            v = b.value(axes_input)
            axes = v.tolist() if v is not None else None
        attrs = {"axes": axes, "axes_input": axes_input or None}
    elif op == "Flatten":
        attrs = {"axis": _attrs(node).get("axis", 1)}
    b.emit(node, "reshape", [node.input[0]], _outs(node), attrs)


def t_transpose(b: _Builder, node: onnx.NodeProto) -> None:
    if node.output[0] in b.transposed_params:
        return  # folded into the MatMul that reads it (linear with weight [out, in])
    b.require_shapes(node, _outs(node))
    nd = b.rank(node.input[0])
    perm = _attrs(node).get("perm")
    perm = list(range(nd))[::-1] if perm is None else [_norm_axis(p, nd) for p in perm]
    if perm == list(range(nd)):
        b.alias[node.output[0]] = b.resolve(node.input[0])  # the exporter's identity transposes
        return
    b.emit(node, "permute", [node.input[0]], _outs(node), {"perm": perm})


def t_expand(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, _outs(node))
    b.emit(node, "expand", [node.input[0]], _outs(node),
           {"shape_input": node.input[1], "shape_literal": _literal(b, node.input[1])})


def t_tile(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, _outs(node))
    repeats = _static_arg(b, node, 1, what="Tile repeats")
    b.emit(node, "repeat", [node.input[0]], _outs(node), {"repeats": [int(r) for r in repeats],
                                                          "repeats_input": node.input[1]})


def _fused_bias(b: _Builder, node: onnx.NodeProto) -> tuple[str | None, list[str], dict]:
    add = b.fused_bias.get(b.node_name(node))
    if add is None:
        return None, _outs(node), {}
    mm_out = node.output[0]
    bias = add.input[1] if add.input[0] == mm_out else add.input[0]
    b.require_shapes(node, [mm_out])
    b.shapes[add.output[0]] = b.shapes[mm_out]
    b.elem[add.output[0]] = b.elem[mm_out]
    return bias, [add.output[0]], {"bias_add_node": b.node_name(add)}


def t_matmul(b: _Builder, node: onnx.NodeProto) -> None:
    a_in, b_in = node.input[0], node.input[1]
    bias, outs, extra = _fused_bias(b, node)
    b.require_shapes(node, outs)
    if b_in in b.transposed_params:  # x @ W.T : nn.Linear with weight [out, in]
        w = b.transposed_params[b_in]
        b.emit(node, "linear", [a_in, w, bias], outs, {"weight_transpose_output": b_in, **extra})
        return
    if bias is not None:
        b.emit(node, "addmm", [bias, a_in, b_in], outs, extra)
        return
    b.emit(node, "matmul", [a_in, b_in], outs)


def t_gemm(b: _Builder, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    trans_a, trans_b = int(a.get("transA", 0)), int(a.get("transB", 0))
    x, w = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 and node.input[2] else None
    outs = _outs(node)
    b.require_shapes(node, outs)
    attrs = {"alpha": a.get("alpha", 1.0), "beta": a.get("beta", 1.0), "transA": trans_a, "transB": trans_b}
    if trans_a:
        sx = b.shape(x)
        xt = b.new_tensor(f"{outs[0]}::A^T", (sx[1], sx[0]), b.dtype(x))
        b.emit(node, "permute", [x], [xt], {"perm": [1, 0]}, suffix="transA")
        x = xt
    n_out = b.shape(outs[0])[-1]
    c_shape = b.shape(c) if c else None
    if trans_b:
        if c is None or c_shape == (n_out,) or len(c_shape) == 0:
            bias = c if c is not None and c_shape == (n_out,) else None
            b.emit(node, "linear", [x, w, bias], outs, {**attrs, "scalar_c": c if bias is None else None})
            return
        sw = b.shape(w)
        wt = b.new_tensor(f"{outs[0]}::B^T", (sw[1], sw[0]), b.dtype(w))
        b.emit(node, "permute", [w], [wt], {"perm": [1, 0]}, suffix="transB")
        w = wt
    if c is None:
        b.emit(node, "matmul", [x, w], outs, attrs)
    else:
        b.emit(node, "addmm", [c, x, w], outs, attrs)


def t_conv(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, _outs(node))
    a = _attrs(node)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    groups = int(a.get("group", 1))
    x_shape, kernel = b.shape(node.input[0]), b.shape(node.input[1])
    c_in = x_shape[1] if len(x_shape) > 1 else -1
    # ONNX's Conv needs C_in == group * W.shape[1] (ConvTranspose: W.shape[0] == C_in, divisible by
    # group); shape inference does not check it, onnxruntime fails at run time. A file that breaks
    # it is not a model graphprune could prune or validate: say so instead of tracing a wrong layout.
    transposed = node.op_type == "ConvTranspose"
    if transposed:
        valid = groups >= 1 and len(kernel) > 1 and c_in == kernel[0] and c_in % groups == 0
    else:
        valid = groups >= 1 and len(kernel) > 1 and c_in == groups * kernel[1] and kernel[0] % groups == 0
    if not valid:
        raise TraceError(f"{node.op_type} node '{b.node_name(node)}' has group {groups} with {c_in} input channels "
                         f"and a weight of shape {list(kernel)}: not a valid ONNX model (onnxruntime would "
                         f"refuse to run it)")
    b.emit(node, "conv", [node.input[0], node.input[1], bias], _outs(node)[:1],
           {"groups": groups, "transposed": transposed})


def t_batch_norm(b: _Builder, node: onnx.NodeProto) -> None:
    if any(o in b.shapes for o in node.output[1:] if o) and _attrs(node).get("training_mode", 0):
        raise _Untranslatable("BatchNormalization in training mode (running statistics are outputs)")
    b.require_shapes(node, node.output[:1])
    b.emit(node, "batch_norm", list(node.input[:5]), node.output[:1])


def t_instance_norm(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, node.output[:1])
    b.emit(node, "batch_norm", [node.input[0], node.input[1], node.input[2], None, None], node.output[:1],
           {"instance_norm": True})


def _extra_outputs_used(b: _Builder, node: onnx.NodeProto, first: int = 1) -> bool:
    return any(o and o in b.consumed for o in node.output[first:])


def t_layer_norm(b: _Builder, node: onnx.NodeProto) -> None:
    if _extra_outputs_used(b, node):
        raise _Untranslatable(f"{node.op_type} mean/inv-std outputs are used")
    b.require_shapes(node, node.output[:1])
    nd = b.rank(node.input[0])
    axis = _norm_axis(_attrs(node).get("axis", -1), nd)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] and node.op_type == "LayerNormalization" else None
    b.emit(node, "layer_norm", [node.input[0], node.input[1], bias], node.output[:1],
           {"normalized_ndim": nd - axis})


def t_skip_layer_norm(b: _Builder, node: onnx.NodeProto) -> None:
    """com.microsoft Skip(Simplified)LayerNormalization = add(input, skip, bias) then a norm."""
    simplified = node.op_type == "SkipSimplifiedLayerNormalization"
    if any(o and o in b.consumed for o in node.output[1:3]):
        raise _Untranslatable(f"{node.op_type} mean/inv-std outputs are used")
    b.require_shapes(node, node.output[:1])
    ins = list(node.input) + [""] * 5
    beta, bias = (None, ins[3]) if simplified else (ins[3], ins[4])
    x = node.input[0]
    if len(node.output) > 3 and node.output[3]:
        total = node.output[3]
        b.shapes.setdefault(total, b.shape(x))
        b.elem.setdefault(total, b.dtype(x))
    else:
        total = b.new_tensor(f"{node.output[0]}::sum", b.shape(x), b.dtype(x))
    b.emit(node, "elementwise", [x, node.input[1]] + ([bias] if bias else []), [total], suffix="add")
    b.emit(node, "layer_norm", [total, node.input[2], beta or None], node.output[:1], {"normalized_ndim": 1})


def t_reduce(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, _outs(node))
    a = _attrs(node)
    nd = b.rank(node.input[0])
    axes = _static_arg(b, node, 1, "axes", None, "reduce axes")
    keep = bool(a.get("keepdims", 1))
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            b.emit(node, "reshape", [node.input[0]], _outs(node))
            return
        axes = list(range(nd))
    b.emit(node, "reduce", [node.input[0]], _outs(node),
           {"axes": sorted(_norm_axis(x, nd) for x in axes), "keepdim": keep})


def t_argreduce(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, _outs(node))
    a = _attrs(node)
    nd = b.rank(node.input[0])
    b.emit(node, "argreduce", [node.input[0]], _outs(node),
           {"axis": _norm_axis(a.get("axis", 0), nd), "keepdim": bool(a.get("keepdims", 1))})


def t_topk(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, list(node.output))
    nd = b.rank(node.input[0])
    k_input = node.input[1] if len(node.input) > 1 else None
    b.emit(node, "topk", [node.input[0]], list(node.output),
           {"axis": _norm_axis(_attrs(node).get("axis", -1), nd), "k_input": k_input})


def t_scan_axis(b: _Builder, node: onnx.NodeProto) -> None:
    """Ops that mix positions along one axis (CumSum, Hardmax)."""
    b.require_shapes(node, _outs(node))
    nd = b.rank(node.input[0])
    if node.op_type == "CumSum":
        axis = _static_arg(b, node, 1, what="CumSum axis")
        axis = int(np.asarray(axis).reshape(-1)[0])
    else:
        axis = _attrs(node).get("axis", -1)
    b.emit(node, "scan", [node.input[0]], _outs(node), {"axes": [_norm_axis(axis, nd)]})


def t_trilu(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, _outs(node))
    nd = b.rank(node.input[0])
    b.emit(node, "scan", [node.input[0]], _outs(node), {"axes": [nd - 2, nd - 1]})


def t_slice(b: _Builder, node: onnx.NodeProto) -> None:
    outs = _outs(node)
    b.require_shapes(node, outs)
    x = node.input[0]
    shape = b.shape(x)
    nd = len(shape)
    a = _attrs(node)
    if "starts" in a:  # opset < 10
        starts, ends = a["starts"], a["ends"]
        axes, steps = a.get("axes"), None
    else:
        starts = _static_arg(b, node, 1, what="Slice starts")
        ends = _static_arg(b, node, 2, what="Slice ends")
        axes = _static_arg(b, node, 3, what="Slice axes")
        steps = _static_arg(b, node, 4, what="Slice steps")
    axes = list(range(len(starts))) if axes is None else [_norm_axis(x_, nd) for x_ in axes]
    steps = [1] * len(starts) if steps is None else steps
    pieces = []
    for axis, start, end, step in zip(axes, starts, ends, steps):
        n = shape[axis]
        start, end, step = int(start), int(end), int(step)
        if step > 0:
            start = min(max(start + n if start < 0 else start, 0), n)
            end = min(max(end + n if end < 0 else end, 0), n)
        else:
            start = min(max(start + n if start < 0 else start, 0), n - 1)
            end = min(max(end + n if end < 0 else end, -1), n - 1)
        if step == 1 and start == 0 and end >= n:
            continue
        pieces.append((axis, start, end, step))
    literal = {"starts_input": node.input[1] if len(node.input) > 1 else None,
               "ends_input": node.input[2] if len(node.input) > 2 else None}
    if not pieces:
        b.emit(node, "reshape", [x], outs, {"identity_slice": True, **literal})
        return
    current = x
    cur_shape = list(shape)
    for k, (axis, start, end, step) in enumerate(pieces):
        length = max(0, -(-(end - start) // step)) if step > 0 else max(0, -(-(start - end) // -step))
        cur_shape[axis] = length
        last = k == len(pieces) - 1
        out = outs[0] if last else b.new_tensor(f"{outs[0]}::slice{k}", tuple(cur_shape), b.dtype(x))
        b.emit(node, "slice", [current], [out], {"axis": axis, "start": start, "end": end, "step": step, **literal},
               suffix="" if len(pieces) == 1 else f"axis{axis}")
        current = out
    if tuple(cur_shape) != b.shape(outs[0]):
        raise TraceError(f"Slice node '{b.node_name(node)}': computed shape {cur_shape} differs from "
                         f"the inferred {list(b.shape(outs[0]))}")


def t_split(b: _Builder, node: onnx.NodeProto) -> None:
    outs = list(node.output)
    b.require_shapes(node, [o for o in outs if o])
    nd = b.rank(node.input[0])
    axis = _norm_axis(_attrs(node).get("axis", 0), nd)
    if not all(outs):
        raise _Untranslatable("Split with an unnamed output")
    real = list(outs)
    sizes = [b.shape(o)[axis] for o in real]
    b.emit(node, "split", [node.input[0]], real,
           {"axis": axis, "sizes": sizes, "split_input": node.input[1] if len(node.input) > 1 else None})


def t_split_to_sequence(b: _Builder, node: onnx.NodeProto) -> None:
    x = node.input[0]
    shape = b.shape(x)
    a = _attrs(node)
    axis = _norm_axis(a.get("axis", 0), len(shape))
    keepdims = int(a.get("keepdims", 1))
    n = shape[axis]
    split = b.value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if len(node.input) > 1 and node.input[1] and split is None:
        raise _Untranslatable("SplitToSequence sizes are computed from data")
    if split is None:
        sizes, drop = [1] * n, not keepdims
    elif split.ndim == 0:
        s = int(split)
        sizes, drop = [min(s, n - i) for i in range(0, n, s)], False
    else:
        sizes, drop = [int(s) for s in split.reshape(-1)], False
    seq = node.output[0]
    pieces = []
    for k, s in enumerate(sizes):
        piece_shape = list(shape)
        if drop:
            del piece_shape[axis]
        else:
            piece_shape[axis] = s
        pieces.append(b.new_tensor(f"{seq}[{k}]", tuple(piece_shape), b.dtype(x)))
    b.sequences[seq] = pieces
    if drop:
        b.emit(node, "unbind", [x], pieces, {"axis": axis})
    else:
        b.emit(node, "split", [x], pieces, {"axis": axis, "sizes": sizes,
                                             "split_input": node.input[1] if len(node.input) > 1 else None})


def t_sequence_at(b: _Builder, node: onnx.NodeProto) -> None:
    seq = b.resolve(node.input[0])
    pos = b.value(node.input[1])
    if seq not in b.sequences or pos is None:
        raise _Untranslatable("SequenceAt of an untracked sequence or at a computed position")
    pieces = b.sequences[seq]
    b.alias[node.output[0]] = pieces[int(pos)]
    b.shapes[node.output[0]] = b.shapes[pieces[int(pos)]]


def t_sequence_construct(b: _Builder, node: onnx.NodeProto) -> None:
    b.sequences[node.output[0]] = [b.data(i) for i in node.input]


def t_concat_from_sequence(b: _Builder, node: onnx.NodeProto) -> None:
    seq = b.resolve(node.input[0])
    if seq not in b.sequences:
        raise _Untranslatable("ConcatFromSequence of an untracked sequence")
    b.require_shapes(node, _outs(node))
    a = _attrs(node)
    nd = len(b.shape(node.output[0]))
    op = "stack" if a.get("new_axis", 0) else "cat"
    b.emit(node, op, b.sequences[seq], _outs(node), {"axis": _norm_axis(a["axis"], nd)}, data_inputs=False)


def t_concat(b: _Builder, node: onnx.NodeProto) -> None:
    inputs = [i for i in node.input if i]
    if len(inputs) == 1:
        b.alias[node.output[0]] = b.resolve(inputs[0])  # a one-input Concat is the identity
        return
    b.require_shapes(node, _outs(node))
    nd = len(b.shape(node.output[0]))
    b.emit(node, "cat", [i for i in node.input if i], _outs(node),
           {"axis": _norm_axis(_attrs(node).get("axis", 0), nd)})


def t_gather(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, _outs(node))
    x, idx = node.input[0], node.input[1]
    nd = b.rank(x)
    axis = _norm_axis(_attrs(node).get("axis", 0), nd)
    int_idx = _dtype_name(b.dtype(idx)).startswith(("int", "uint"))
    if b.is_param(x) and axis == 0 and nd == 2 and int_idx:
        b.emit(node, "embedding", [x, idx], _outs(node))
        return
    v = b.value(idx)
    idx_rank = b.rank(idx)
    if idx_rank == 0:
        b.emit(node, "select", [x], _outs(node), {"axis": axis, "index": None if v is None else int(v),
                                                  "index_input": idx})
        return
    if idx_rank == 1:
        b.emit(node, "index_select", [x, idx], _outs(node), {"axis": axis})
        return
    b.emit(node, "index", [x, idx], _outs(node), {"positions": [axis]})


def _index_columns(b: _Builder, node: onnx.NodeProto, idx: str) -> list[str]:
    """GatherND/ScatterND index tensor [..., k] -> k index tensors [...] (reshape passes values).
    Made once per index tensor, so that all gathers by one index read the same tensors."""
    idx = b.resolve(idx)
    if idx in b.index_columns:
        return b.index_columns[idx]
    shape = b.shape(idx)
    k = shape[-1]
    columns = [b.data(idx)]
    if k > 1:
        columns = [b.new_tensor(f"{idx}::col{j}", shape[:-1] + (1,), b.dtype(idx)) for j in range(k)]
        b.emit(node, "split", [idx], columns, {"axis": len(shape) - 1, "sizes": [1] * k}, suffix="index_columns")
    out = []
    for j, col in enumerate(columns):
        flat = b.new_tensor(f"{idx}::index{j}", shape[:-1], b.dtype(idx))
        b.emit(node, "reshape", [col], [flat], suffix=f"index{j}", data_inputs=False)
        out.append(flat)
    b.index_columns[idx] = out
    return out


def t_gather_nd(b: _Builder, node: onnx.NodeProto) -> None:
    """GatherND(x, idx[..., k]) with batch_dims=0 is NumPy indexing x[idx[..., 0], ..., idx[..., k-1]]."""
    b.require_shapes(node, _outs(node))
    if _attrs(node).get("batch_dims", 0):
        raise _Untranslatable("GatherND with batch_dims > 0")
    x, idx = node.input[0], node.input[1]
    if b.rank(idx) < 1 or b.shape(idx)[-1] < 1:
        raise _Untranslatable("GatherND with an empty index tuple")
    columns = _index_columns(b, node, idx)
    b.emit(node, "index", [x] + columns, _outs(node), {"positions": list(range(len(columns)))})


def t_scatter_nd(b: _Builder, node: onnx.NodeProto) -> None:
    """ScatterND writing whole slices along axis 0 (index tensor [n, 1]): a window at static
    positions start, start+step, ... is `slice_scatter`; computed positions are dimensionally
    `index_add` (an indexed write along axis 0)."""
    b.require_shapes(node, _outs(node))
    x, idx, updates = node.input[0], node.input[1], node.input[2]
    sx, si, su = b.shape(x), b.shape(idx), b.shape(updates)
    reduction = _attrs(node).get("reduction", "none")
    if len(si) != 2 or si[1] != 1 or su != (si[0],) + tuple(sx[1:]):
        raise _Untranslatable("ScatterND other than whole slices along axis 0")
    v = b.value(idx)
    if v is not None:
        pos = [int(p) + sx[0] if int(p) < 0 else int(p) for p in v.reshape(-1)]
        step = pos[1] - pos[0] if len(pos) > 1 else 1
        if pos and step >= 1 and pos == list(range(pos[0], pos[0] + step * len(pos), step)) and reduction == "none":
            end = min(pos[-1] + 1, sx[0]) if step == 1 else min(pos[-1] + step, sx[0])
            b.emit(node, "slice_scatter", [x, updates], _outs(node),
                   {"axis": 0, "start": pos[0], "end": end, "step": step, "indices_input": idx})
            return
    column = _index_columns(b, node, idx)[0]
    b.emit(node, "index_add", [x, column, updates], _outs(node), {"axis": 0, "reduction": reduction})


def t_gather_elements(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, _outs(node))
    nd = b.rank(node.input[0])
    b.emit(node, "gather", [node.input[0], node.input[1]], _outs(node),
           {"axis": _norm_axis(_attrs(node).get("axis", 0), nd)})


def t_scatter_elements(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, _outs(node))
    nd = b.rank(node.input[0])
    b.emit(node, "scatter", [node.input[0], node.input[1], node.input[2]], _outs(node),
           {"axis": _norm_axis(_attrs(node).get("axis", 0), nd), "reduction": _attrs(node).get("reduction", "none")})


def t_pool(b: _Builder, node: onnx.NodeProto) -> None:
    outs = list(node.output)
    b.require_shapes(node, [o for o in outs if o])
    nd = b.rank(node.input[0])
    b.emit(node, "pool", [node.input[0]], [o for o in outs if o], {"spatial": list(range(2, nd))})


def t_resize(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, _outs(node))
    si, so = b.shape(node.input[0]), b.shape(node.output[0])
    if len(si) < 3 or si[:2] != so[:2]:
        raise _Untranslatable("Resize that changes the batch or channel axis")
    b.emit(node, "pool", [node.input[0]], _outs(node), {"spatial": list(range(2, len(si))), "resize": True})


def t_pad(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, _outs(node))
    nd = b.rank(node.input[0])
    a = _attrs(node)
    pads = a.get("pads") if "pads" in a else _static_arg(b, node, 1, what="Pad pads")
    axes = _static_arg(b, node, 3, what="Pad axes") if len(node.input) > 3 and node.input[3] else list(range(nd))
    axes = [_norm_axis(x, nd) for x in axes]
    half = len(pads) // 2
    padded = sorted({axes[i] for i in range(half) if pads[i] != 0 or pads[i + half] != 0})
    pads_input = node.input[1] if len(node.input) > 1 else None
    b.emit(node, "pad", [node.input[0]], _outs(node), {"axes": padded, "pads_input": pads_input})


def t_einsum(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, _outs(node))
    b.emit(node, "einsum", [i for i in node.input if i], _outs(node), {"equation": _attrs(node)["equation"]})


def t_one_hot(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, _outs(node))
    nd = len(b.shape(node.output[0]))
    if _norm_axis(_attrs(node).get("axis", -1), nd) != nd - 1:
        raise _Untranslatable("OneHot on an axis other than the last")
    b.emit(node, "one_hot", [node.input[0]], _outs(node), {"depth_input": node.input[1]})


def t_range(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, _outs(node))
    b.emit(node, "create", [], _outs(node), {"arange": True})


def t_create(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, _outs(node))
    b.emit(node, "create", [], _outs(node))


def t_like(b: _Builder, node: onnx.NodeProto) -> None:
    b.require_shapes(node, _outs(node))
    b.emit(node, "like", [node.input[0]], _outs(node))


def t_control_flow(b: _Builder, node: onnx.NodeProto) -> None:
    raise _Untranslatable(f"control flow ({node.op_type}) is not traced into")


ELEMENTWISE_OPS = """
Add Sub Mul Div Pow Sqrt Reciprocal Neg Exp Log Erf Tanh Sigmoid Relu LeakyRelu Elu Selu Celu Gelu
HardSigmoid HardSwish Softplus Softsign Mish Abs Sign Floor Ceil Round Clip Where Equal Less Greater
LessOrEqual GreaterOrEqual Not And Or Xor Max Min Sum Mean Mod IsNaN IsInf Sin Cos Tan Asin Acos Atan
Sinh Cosh Asinh Acosh Atanh PRelu ThresholdedRelu Shrink BitwiseAnd BitwiseOr BitwiseXor BitwiseNot
BitShift
""".split()

ONNX_TRANSLATIONS: dict[str, Translator] = {name: t_elementwise for name in ELEMENTWISE_OPS}
ONNX_TRANSLATIONS.update({
    # Softmax normalises along its axis; like the PyTorch frontend, it is treated as elementwise
    # (that axis is the key sequence in attention, or the expert axis of a router).
    "Softmax": t_first_input, "LogSoftmax": t_first_input, "CastLike": t_first_input,
    "Cast": t_cast, "Identity": t_identity, "Dropout": t_dropout,
    "Reshape": t_reshape, "Unsqueeze": t_reshape, "Squeeze": t_reshape, "Flatten": t_reshape,
    "Transpose": t_transpose, "Expand": t_expand, "Tile": t_tile,
    "MatMul": t_matmul, "Gemm": t_gemm,
    "Conv": t_conv, "ConvTranspose": t_conv,
    "BatchNormalization": t_batch_norm, "InstanceNormalization": t_instance_norm,
    "LayerNormalization": t_layer_norm, "RMSNormalization": t_layer_norm,
    "SimplifiedLayerNormalization": t_layer_norm,
    "ReduceMean": t_reduce, "ReduceSum": t_reduce, "ReduceMax": t_reduce, "ReduceMin": t_reduce,
    "ReduceProd": t_reduce, "ReduceL1": t_reduce, "ReduceL2": t_reduce, "ReduceLogSum": t_reduce,
    "ReduceLogSumExp": t_reduce, "ReduceSumSquare": t_reduce,
    "ArgMax": t_argreduce, "ArgMin": t_argreduce, "TopK": t_topk,
    "CumSum": t_scan_axis, "Hardmax": t_scan_axis, "Trilu": t_trilu,
    "Slice": t_slice, "Split": t_split, "Concat": t_concat,
    "SplitToSequence": t_split_to_sequence, "SequenceAt": t_sequence_at,
    "SequenceConstruct": t_sequence_construct, "ConcatFromSequence": t_concat_from_sequence,
    "Gather": t_gather, "GatherElements": t_gather_elements, "GatherND": t_gather_nd, "ScatterND": t_scatter_nd,
    "ScatterElements": t_scatter_elements, "Scatter": t_scatter_elements,
    "MaxPool": t_pool, "AveragePool": t_pool, "LpPool": t_pool, "GlobalAveragePool": t_pool,
    "GlobalMaxPool": t_pool, "GlobalLpPool": t_pool, "Resize": t_resize, "Upsample": t_resize,
    "Pad": t_pad, "Einsum": t_einsum, "OneHot": t_one_hot,
    "Range": t_range, "ConstantOfShape": t_create, "RandomNormal": t_create, "RandomUniform": t_create,
    "RandomNormalLike": t_like, "RandomUniformLike": t_like, "Bernoulli": t_like,
    "If": t_control_flow, "Loop": t_control_flow, "Scan": t_control_flow,
})

MS_TRANSLATIONS: dict[str, Translator] = {
    "Gelu": t_elementwise, "FastGelu": t_elementwise, "BiasGelu": t_elementwise, "QuickGelu": t_elementwise,
    "BiasAdd": t_elementwise,
    "SimplifiedLayerNormalization": t_layer_norm,
    "SkipLayerNormalization": t_skip_layer_norm, "SkipSimplifiedLayerNormalization": t_skip_layer_norm,
}


# ============================================================================ public API
def graph_from_onnx(model: onnx.ModelProto | str | os.PathLike, *,
                    input_shapes: dict[str, list[int]] | None = None,
                    batch_size: int = DEFAULT_BATCH_SIZE, seq_len: int = DEFAULT_SEQ_LEN) -> Graph:
    """Read an ONNX model (a path or a ModelProto) into a `Graph` (frontend ``"onnx"``).

    Dynamic input dims get example sizes: those given in ``input_shapes`` (``{input: shape}``),
    else ``batch_size`` for axis 0 / dims named like "batch", else ``seq_len``. Every tensor must
    end up with a static shape, or `TraceError` is raised.
    """
    from ..io.onnx_files import check_opset

    started = time.perf_counter()
    proto, base_dir, source = _load(model)
    check_opset(proto, source)
    if not proto.graph.node:
        raise TraceError(f"ONNX model {source} has no graph nodes (truncated or not an ONNX model?)")
    if len(proto.functions):
        try:
            import onnx.inliner

            proto = onnx.inliner.inline_local_functions(proto)
        except Exception as exc:  # noqa: BLE001
            raise TraceError(f"could not inline the model's local functions: {exc}") from exc
    builder = _Builder(proto, base_dir, source, input_shapes, batch_size, seq_len)
    graph = builder.run()
    # ONNX value name -> the IR tensor it is an alias of (Identity, Dropout, parameter casts, repeated
    # nodes): ONNX-native rewriting maps the file's names onto the IR with it.
    graph.onnx_aliases = {name: builder.resolve(name) for name in builder.alias}
    graph.onnx_input_shapes = dict(builder.input_shapes)
    c = builder.counts
    inputs = ", ".join(f"{k}{list(v)}" for k, v in builder.input_shapes.items())
    graph.notes.append(
        f"read ONNX (opset {builder.opset}, {len(proto.graph.node)} nodes: {c['translated']} translated, "
        f"{c['folded']} static folded, {c['deduplicated']} repeated, {c['dead']} unused) "
        f"in {time.perf_counter() - started:.1f}s; inputs {inputs}")
    if builder.unknown_types:
        graph.notes.append(f"ONNX ops without a dimension rule: {', '.join(sorted(builder.unknown_types))}")
    return graph


def analyze_onnx(path_or_model: onnx.ModelProto | str | os.PathLike, **kw: Any):
    """Read an ONNX model and return its dependency groups (`graphprune.graph.GroupSet`)."""
    from .groups import build_groups

    return build_groups(graph_from_onnx(path_or_model, **kw))
