"""ONNX-native pruning: prune an .onnx file directly, without the PyTorch model.

The groups come from the ONNX frontend (the same IR, rules and group builder as for PyTorch), the
criteria and the allocation are the pipeline's. The rewrite then works on the ONNX graph:

1. **Initializers**: every parameter slice of a chosen group loses the removed units
   (`SliceParameters`, the same pass the PyTorch path uses, on tensors read from the file).
2. **Shape constants**: after pruning, every tensor's new shape is known from its axis layouts
   (a pruned class shrinks, products and sums of classes follow). Each ``Reshape`` / ``Expand``
   / ``Split`` whose output shape changes has its shape input re-evaluated with the new shapes
   (``Shape`` ops see the pruned tensors, so ``-1``, ``0`` and sizes read off a pruned tensor
   follow by themselves). Where the result is still wrong (a literal head count), the element is
   traced back through ``Concat`` / ``Unsqueeze`` / ``Cast`` ... to the constant that holds it,
   and that constant is copied with the new value for this consumer only (exporters share
   constants between layers, which may keep different sizes). A size computed any other way
   (``Mul`` of a shape by a literal, ...) is refused by name, as is a ``Slice`` along a pruned axis.
3. **Bias compensation** (FLAP, ``compensate="bias"``): the removed input channels' calibration
   mean times their weight columns is added to the consumer's bias, or a bias ``Add`` is inserted
   after a MatMul that has none.
4. **Validation**: onnx's checker, the ONNX frontend reading the pruned file (every tensor must
   have the shape the layouts predict) and onnxruntime running it (finite outputs of that shape).

Calibration criteria (wanda-sp, flap, ...) get their statistics from onnxruntime: the inputs of
the consumer MatMuls are added as graph outputs and accumulated over the calibration batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ..calibration.stats import Calibration, InputStats
from ..criteria.base import ExpertCriterion, Need, ScoringContext, consumer_slices, module_of
from ..criteria.scoring import Scores, score_units
from ..errors import CalibrationError, PruningError, UserError, ValidationError
from ..graph.groups import Group, GroupSet, build_groups
from ..graph.ir import PARAM, STATE
from ..graph.trace_onnx import ConstantFolder, graph_from_onnx, toposort
from ..io.onnx_files import session
from ..passes import Pass, PassError, PassManager, PassResult, RewriteState
from ..passes.slice import SliceParameters
from .base import Backend, Capabilities, StageResult, register



# ============================================================================ new shapes
class NewShapes:
    """The shape every IR tensor has once `removed` units are gone from their groups."""

    def __init__(self, groups: GroupSet, removed: dict[str, np.ndarray]) -> None:
        self.prop = groups.propagation
        self.graph = groups.graph
        atoms = self.prop.atoms
        self.sizes: dict[int, int] = {}
        for g in groups:
            r = removed.get(g.id)
            if r is not None and len(r):
                self.sizes[atoms.find(g.root)] = g.units - len(r)

    def _size(self, layout) -> int:
        atoms = self.prop.atoms
        layout = atoms.resolve(layout)
        if isinstance(layout, int):
            return self.sizes.get(atoms.find(layout), atoms.size(layout))
        parts = [self._size(p) for p in layout.parts]
        return int(np.prod(parts)) if type(layout).__name__ == "Prod" else int(sum(parts))

    def of(self, onnx_name: str) -> tuple[int, ...] | None:
        name = getattr(self.graph, "onnx_aliases", {}).get(onnx_name, onnx_name)
        layouts = self.prop.layouts.get(name)
        if layouts is None:
            return None
        return tuple(self._size(layout) for layout in layouts)

    def old(self, onnx_name: str) -> tuple[int, ...] | None:
        name = getattr(self.graph, "onnx_aliases", {}).get(onnx_name, onnx_name)
        t = self.graph.tensors.get(name)
        return t.shape if t is not None else None


# ============================================================================ shape constants
_PASS_THROUGH = ("Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten")
_SMALL = 1 << 16


class ShapeConstants:
    """Re-evaluates static shape inputs under the new shapes and rewrites the constants behind them."""

    def __init__(self, proto: onnx.ModelProto, shapes: NewShapes) -> None:
        self.proto = proto
        self.shapes = shapes
        self.opsets = {o.domain or "": int(o.version) for o in proto.opset_import}
        self.folder = ConstantFolder(self.opsets)
        self.producer = {o: n for n in proto.graph.node for o in n.output if o}
        self.inits = {i.name: i for i in proto.graph.initializer}
        self.memo: dict[str, np.ndarray | None] = {}
        self.names = set(self.producer) | set(self.inits) | {i.name for i in proto.graph.input}
        self.rewritten: list[str] = []

    def _fresh(self, base: str) -> str:
        k = 1
        while f"{base}/pruned{k}" in self.names:
            k += 1
        name = f"{base}/pruned{k}"
        self.names.add(name)
        return name

    def value(self, name: str) -> np.ndarray | None:
        """The value of a static tensor with the pruned shapes (None: depends on data)."""
        if not name:
            return None
        if name in self.memo:
            return self.memo[name]
        self.memo[name] = None  # (cycle guard)
        result = None
        if name in self.inits:
            init = self.inits[name]
            if int(np.prod(init.dims)) <= _SMALL:
                result = numpy_helper.to_array(init)
        elif name in self.producer:
            node = self.producer[name]
            if node.op_type in ("Shape", "Size"):
                shape = self.shapes.of(node.input[0]) or self.shapes.old(node.input[0])
                values, shapes = [None], [shape]
            elif node.op_type == "Constant":
                values, shapes = [], []
            else:
                values = [self.value(i) for i in node.input]
                shapes = [None if v is None else v.shape for v in values]
                if any(v is None for i, v in zip(node.input, values) if i):
                    shapes = None
            if shapes is not None and (node.op_type not in ("Shape", "Size") or shapes[0] is not None):
                try:
                    outs = self.folder.run(node, values, shapes, [None] * len(node.output))
                    for o, v in zip(node.output, outs):
                        self.memo[o] = np.asarray(v)
                    result = self.memo.get(name)
                except Exception:  # noqa: BLE001 - not a computable static op
                    result = None
        self.memo[name] = result
        return result

    def set_element(self, consumer: onnx.NodeProto, pos: int, index: int, value: int) -> None:
        """Make element `index` of `consumer`'s input `pos` equal `value`, for this consumer only."""
        name = consumer.input[pos]
        current = self.value(name)
        if current is not None and int(current.reshape(-1)[index]) == value:
            return
        producer = self.producer.get(name)
        if name in self.inits or (producer is not None and producer.op_type == "Constant"):
            array = np.array(current if current is not None else self.value(name)).copy()
            array.reshape(-1)[index] = value
            new = self._fresh(name)
            self.proto.graph.initializer.append(numpy_helper.from_array(array, new))
            self.inits[new] = self.proto.graph.initializer[-1]
            consumer.input[pos] = new
            self.rewritten.append(f"{name}[{index}] -> {value}")
            return
        if producer is not None and producer.op_type in _PASS_THROUGH and producer.input[0]:
            self._clone_then(consumer, pos, producer, 0, index, value)
            return
        if producer is not None and producer.op_type == "Concat":
            offset = 0
            for j, part in enumerate(producer.input):
                v = self.value(part)
                if v is None:
                    break
                if index < offset + v.size:
                    self._clone_then(consumer, pos, producer, j, index - offset, value)
                    return
                offset += v.size
        how = f"{producer.op_type} node '{producer.name}'" if producer is not None else "a graph input"
        raise PruningError(f"{consumer.op_type} node '{consumer.name}' needs {value} at position {index} of its "
                           f"shape input '{name}', which is computed by {how}; graphprune cannot rewrite "
                           f"that computation for the pruned size")

    def _clone_then(self, consumer, pos, producer, input_pos, index, value) -> None:
        clone = onnx.NodeProto()
        clone.CopyFrom(producer)
        clone.name = self._fresh(producer.name or producer.op_type)
        for k, o in enumerate(producer.output):
            if o:
                clone.output[k] = self._fresh(o)
        out = clone.output[list(producer.output).index(consumer.input[pos])]
        self.proto.graph.node.append(clone)
        clone = self.proto.graph.node[-1]  # protobuf's append stores a copy: edit the stored node
        for o in clone.output:
            if o:
                self.producer[o] = clone
        consumer.input[pos] = out
        self.set_element(clone, input_pos, index, value)

    # ------------------------------------------------------------ per op type
    def fix(self) -> list[str]:
        for node in list(self.proto.graph.node):
            if node.op_type in ("Reshape", "Expand") and len(node.input) > 1:
                self._fix_target(node)
            elif node.op_type == "Split":
                self._fix_split(node)
            elif node.op_type == "Slice":
                self._check_slice(node)
            elif node.op_type == "Conv":
                self._fix_group(node)
        return self.rewritten

    def _changed(self, node) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
        out, x = node.output[0], node.input[0]
        new_out, old_out, new_in = self.shapes.of(out), self.shapes.old(out), self.shapes.of(x)
        if new_out is None or old_out is None or new_in is None:
            return None
        if new_out == old_out and new_in == self.shapes.old(x):
            return None
        return new_out, old_out, new_in

    def _fix_target(self, node) -> None:
        changed = self._changed(node)
        if changed is None:
            return
        new_out, _, new_in = changed
        target = self.value(node.input[1])
        if target is None:
            return  # computed from data at run time: nothing static to rewrite
        target = [int(t) for t in target.reshape(-1)]
        if node.op_type == "Reshape":
            allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
            needed = [t if (t == -1 or (t == 0 and not allowzero and k < len(new_in) and new_in[k] == new_out[k]))
                      else new_out[k] for k, t in enumerate(target)]
        else:  # Expand: right-aligned broadcast; a 1 stays where the input already has the size
            pad = len(new_out) - len(target)
            aligned_in = (1,) * (len(new_out) - len(new_in)) + tuple(new_in)
            needed = [t if (t == 1 and aligned_in[k + pad] == new_out[k + pad]) else new_out[k + pad]
                      for k, t in enumerate(target)]
        for k, (t, want) in enumerate(zip(target, needed)):
            if t != want:
                self.set_element(node, 1, k, want)

    def _fix_split(self, node) -> None:
        changed = self._changed(node)
        if changed is None:
            return
        x_old = self.shapes.old(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % len(x_old)
        sizes = [self.shapes.of(o)[axis] for o in node.output]
        for a in node.attribute:
            if a.name == "split":
                del a.ints[:]
                a.ints.extend(sizes)
                self.rewritten.append(f"{node.name}.split -> {sizes}")
                return
        if len(node.input) > 1 and node.input[1]:
            for k, size in enumerate(sizes):
                self.set_element(node, 1, k, size)
        elif len(set(sizes)) > 1:
            raise PruningError(f"Split node '{node.name}' splits evenly but its pruned outputs differ in size {sizes}")

    def _fix_group(self, node) -> None:
        """A grouped Conv's ``group`` follows its channels: ONNX requires C_in == group * W.shape[1].

        The conv rule lays the input channels out as (group, channel-in-group) with the weight's axis 1
        the channel-in-group part, so the new count is new C_in / new W.shape[1] whichever part was
        pruned (a depthwise conv: W.shape[1] == 1, so group == its new channel count)."""
        group = next((a for a in node.attribute if a.name == "group"), None)
        if group is None or group.i == 1 or len(node.input) < 2:
            return
        x, w = self.shapes.of(node.input[0]), self.shapes.of(node.input[1])
        if x is None or w is None or len(x) < 2 or len(w) < 2:
            # A grouped Conv outside the traced graph cannot have been pruned (nothing to follow).
            return
        if x[1] == self.shapes.old(node.input[0])[1] and w[1] == self.shapes.old(node.input[1])[1]:
            return  # channels untouched: the file's own group count stands, right or wrong
        if w[1] <= 0 or x[1] % w[1]:
            raise PruningError(f"Conv node '{node.name}' would get {x[1]} input channels for a kernel of {w[1]} "
                               f"channels per group; graphprune cannot set its group count")
        new = x[1] // w[1]
        if new != group.i:
            self.rewritten.append(f"{node.name}.group {group.i} -> {new}")
            group.i = new

    def _check_slice(self, node) -> None:
        x = node.input[0]
        new_in, old_in = self.shapes.of(x), self.shapes.old(x)
        if new_in is None or old_in is None or new_in == old_in:
            return
        axes = self.value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        axes = list(range(len(old_in))) if axes is None else [int(a) % len(old_in) for a in axes.reshape(-1)]
        starts = self.value(node.input[1]) if len(node.input) > 1 else None
        for k, axis in enumerate(axes):
            if new_in[axis] == old_in[axis]:
                continue
            new_out = self.shapes.of(node.output[0])
            full = starts is not None and int(starts.reshape(-1)[k]) == 0 and new_out is not None \
                and new_out[axis] == new_in[axis]
            if not full:
                raise PruningError(f"Slice node '{node.name}' cuts axis {axis}, which pruning changes "
                                   f"({old_in[axis]} -> {new_in[axis]}); graphprune cannot rewrite its bounds")


# ============================================================================ calibration
def _activation_of(groups: GroupSet, s) -> str | None:
    """The ONNX value that is the input x of the op reading slice `s` as its input axis."""
    op = groups.graph.ops.get(s.op) if s.op else None
    if op is None:
        return None
    if op.op == "linear" or (op.op == "matmul" and op.inputs[1] is not None):
        return op.inputs[0]
    if op.op == "addmm":
        return op.inputs[1]
    return None


def collect_onnx(proto: onnx.ModelProto, groups: GroupSet, chosen: list[Group], batches: torch.Tensor, *,
                 batch_size: int = 8, progress: bool = False) -> Calibration:
    """Per-channel input statistics of the consumer layers, from onnxruntime runs."""
    from tqdm.auto import tqdm

    from ..io.onnx_files import token_feeds

    wanted: dict[str, str] = {}  # module key -> ONNX value name
    for g in chosen:
        for s in consumer_slices(g):
            value = _activation_of(groups, s)
            if value is not None:
                wanted.setdefault(module_of(s.param), value)
    if not wanted:
        return Calibration()
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    existing = {o.name for o in probe.graph.output}
    produced = {o for n in probe.graph.node for o in n.output}
    for value in sorted(set(wanted.values())):
        if value not in existing and value in produced:
            probe.graph.output.append(helper.make_tensor_value_info(value, onnx.TensorProto.FLOAT, None))
    sess = session(probe.SerializeToString())
    names = [o.name for o in sess.get_outputs()]
    result = Calibration()
    for start in tqdm(range(0, batches.shape[0], batch_size), desc="calibration (onnxruntime)",
                      disable=not progress, leave=False):
        chunk = batches[start:start + batch_size].numpy()
        outs = dict(zip(names, sess.run(names, token_feeds(sess, chunk))))
        for key, value in wanted.items():
            if value not in outs:
                continue
            x = torch.from_numpy(outs[value]).reshape(-1, outs[value].shape[-1]).to(torch.float64)
            st = result.inputs.get(key)
            if st is None:
                st = result.inputs[key] = InputStats(0, torch.zeros(x.shape[1], dtype=torch.float64),
                                                     torch.zeros(x.shape[1], dtype=torch.float64))
            st.count += x.shape[0]
            st.sum += x.sum(0)
            st.sumsq += (x * x).sum(0)
        result.tokens += int(chunk.size)
    return result


# ============================================================================ compensation
def compensate_biases(proto: onnx.ModelProto, groups: GroupSet, chosen: list[Group], removed: dict[str, np.ndarray],
                      state: dict[str, torch.Tensor], calibration: Calibration) -> int:
    """FLAP bias compensation on the ONNX graph (weights in `state` are the unpruned ones)."""
    delta: dict[str, torch.Tensor] = {}  # IR op -> added bias
    for g in chosen:
        units = removed.get(g.id)
        if units is None or not len(units):
            continue
        for s in consumer_slices(g):
            stats = calibration.inputs.get(module_of(s.param))
            if stats is None or s.op is None:
                continue
            cols = torch.as_tensor(s.indices[units].reshape(-1))
            w = state[s.param].movedim(s.axis, -1).to(torch.float64)  # [out, in]
            d = w[:, cols] @ stats.mean[cols]
            delta[s.op] = delta[s.op] + d if s.op in delta else d
    inits = {i.name: i for i in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    for op_name, d in delta.items():
        op = groups.graph.ops[op_name]
        bias = op.inputs[2] if op.op == "linear" else (op.inputs[0] if op.op == "addmm" else None)
        if bias is not None and bias in inits:
            old = numpy_helper.to_array(inits[bias])
            inits[bias].CopyFrom(numpy_helper.from_array((old.astype(np.float64) + d.numpy()).astype(old.dtype), bias))
            continue
        node = nodes.get(op.attrs.get("onnx_node"))
        if node is None or node.op_type != "MatMul":
            raise PruningError(f"cannot add a compensation bias after {op.source_op} at {op.location}")
        out = node.output[0]
        raw = f"{out}/before_bias"
        node.output[0] = raw
        bias_name = f"{op.attrs['onnx_node']}/compensation_bias"
        proto.graph.initializer.append(numpy_helper.from_array(d.numpy().astype(np.float32), bias_name))
        proto.graph.node.append(helper.make_node("Add", [raw, bias_name], [out], name=f"{op.attrs['onnx_node']}/bias"))
    return len(delta)


# ============================================================================ pipeline
def _layer_params(proto: onnx.ModelProto, groups: GroupSet) -> int:
    """Elements of the initializers of `proto` that are parameters of its repeated blocks (found from
    the graph's structure by `graph.blocks.layer_parameters`, whatever the initializers are called):
    the sparsity denominator, read off the proto itself (after a rewrite: the pruned one)."""
    from ..graph.blocks import layer_parameters

    sizes = {i.name: int(np.prod(i.dims)) for i in proto.graph.initializer}
    tensors = {t.source_name or t.name: t for t in groups.graph.tensors.values()}
    return sum(sizes[name] if name in sizes else int(np.prod(tensors[name].shape))
               for name in layer_parameters(groups))


def _example_feeds(sess, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        shape = input_shapes.get(i.name) or tuple(d if isinstance(d, int) else 1 for d in i.shape)
        if "int" in i.type:
            feeds[i.name] = (np.ones(shape, dtype=np.int64) if i.name == "attention_mask" else
                             np.zeros(shape, dtype=np.int64) if i.name == "token_type_ids" else
                             rng.integers(3, 8, size=shape).astype(np.int64))
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def validate(proto: onnx.ModelProto, groups: GroupSet, shapes: NewShapes) -> None:
    """The pruned file must check, read back with the predicted shapes, and run in onnxruntime."""
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001
        raise ValidationError(f"the pruned ONNX model fails onnx's checker: {exc}") from exc
    input_shapes = groups.graph.onnx_input_shapes
    reread = graph_from_onnx(proto, input_shapes={k: list(v) for k, v in input_shapes.items()})
    wrong = []
    for name, t in reread.tensors.items():
        want = shapes.of(name)
        if want is not None and name in groups.graph.tensors and tuple(t.shape) != want:
            wrong.append(f"{name}: {list(t.shape)} instead of {list(want)}")
    if wrong:
        raise ValidationError(f"pruned ONNX tensors have unexpected shapes ({len(wrong)}): {'; '.join(wrong[:3])}")
    sess = session(proto.SerializeToString())
    outs = sess.run(None, _example_feeds(sess, input_shapes))
    for meta, out in zip(sess.get_outputs(), outs):
        want = shapes.of(meta.name)
        if want is not None and tuple(out.shape) != want:
            raise ValidationError(f"pruned ONNX output {meta.name} has shape {out.shape}, expected {want}")
        if np.issubdtype(out.dtype, np.floating) and not np.all(np.isfinite(out)):
            raise ValidationError(f"pruned ONNX output {meta.name} has NaN/Inf values")


@dataclass
class OnnxRewrite:
    """What the ONNX passes share: the copy being rewritten and the plan."""

    proto: onnx.ModelProto
    groups: GroupSet
    chosen: list[Group]
    removed: dict[str, np.ndarray]
    statistics: Calibration | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # pruned initializers, before slicing
    shapes: NewShapes | None = None
    report: dict[str, Any] = field(default_factory=dict)
    kept: dict = field(default_factory=dict)


class OnnxBiasCompensation(Pass[OnnxRewrite]):
    """FLAP's bias compensation on the ONNX graph (a bias Add is inserted where a MatMul has none)."""

    name = "onnx-bias"

    def requires(self, state: OnnxRewrite) -> None:
        if state.statistics is None:
            raise PassError("bias compensation needs onnxruntime calibration statistics")

    def call(self, state: OnnxRewrite) -> PassResult[OnnxRewrite]:
        count = compensate_biases(state.proto, state.groups, state.chosen, state.removed, state.tensors,
                                  state.statistics)
        state.report["compensated_layers"] = count
        return PassResult(state, bool(count))


class OnnxSliceInitializers(Pass[OnnxRewrite]):
    """Every pruned initializer loses the removed units (the same `SliceParameters` as PyTorch)."""

    name = "onnx-slice"

    def call(self, state: OnnxRewrite) -> PassResult[OnnxRewrite]:
        rewrite = RewriteState(dict(state.tensors), state.chosen, state.removed)
        PassManager([SliceParameters()])(rewrite)
        inits = {i.name: i for i in state.proto.graph.initializer}
        for name in state.tensors:
            inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(rewrite.tensors[name].numpy()), name))
        state.kept = rewrite.kept
        return PassResult(state, bool(state.tensors))


class OnnxShapeConstants(Pass[OnnxRewrite]):
    """Shape constants (Reshape / Expand / Split) re-evaluated for the pruned sizes (`ShapeConstants`)."""

    name = "onnx-shape-constants"

    def call(self, state: OnnxRewrite) -> PassResult[OnnxRewrite]:
        state.shapes = NewShapes(state.groups, state.removed)
        rewritten = ShapeConstants(state.proto, state.shapes).fix()
        state.report["shape_constants_rewritten"] = rewritten
        return PassResult(state, bool(rewritten))


class OnnxTidy(Pass[OnnxRewrite]):
    """Nodes in topological order again (clones were appended), stale intermediate shapes dropped,
    graph outputs with their new static sizes."""

    name = "onnx-tidy"

    def call(self, state: OnnxRewrite) -> PassResult[OnnxRewrite]:
        out, shapes = state.proto, state.shapes
        available = {i.name for i in out.graph.initializer} | {i.name for i in out.graph.input}
        ordered = toposort(list(out.graph.node), available)
        del out.graph.node[:]
        out.graph.node.extend(ordered)
        # declared intermediate shapes are stale now; the graph outputs keep their symbolic dims
        del out.graph.value_info[:]
        for vi in out.graph.output:
            new, old = shapes.of(vi.name), shapes.old(vi.name)
            if new is not None and vi.type.tensor_type.HasField("shape"):
                for k, d in enumerate(vi.type.tensor_type.shape.dim):
                    if d.HasField("dim_value") and old is not None and new[k] != old[k]:
                        d.dim_value = new[k]
        return PassResult(state, True)


class OnnxValidate(Pass[OnnxRewrite]):
    """onnx's checker, the ONNX frontend reading the file back with the predicted shapes, onnxruntime."""

    name = "onnx-validate"

    def call(self, state: OnnxRewrite) -> PassResult[OnnxRewrite]:
        validate(state.proto, state.groups, state.shapes)
        return PassResult(state, False)


def rewrite_onnx(proto: onnx.ModelProto, groups: GroupSet, chosen: list[Group], removed: dict[str, np.ndarray], *,
                 statistics: Calibration | None = None) -> tuple[onnx.ModelProto, dict]:
    """A pruned, validated copy of `proto` (whose initializers hold their data); `statistics` asks for
    FLAP's bias compensation."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {i.name: i for i in out.graph.initializer}
    touched = {s.param for g in chosen if len(removed.get(g.id, ())) for s in g.slices}
    missing = sorted(touched - set(inits))
    if missing:
        raise PruningError(f"pruned parameters are not initializers of the ONNX file: {missing[:3]}")
    state = OnnxRewrite(out, groups, chosen, removed, statistics,
                        {name: torch.from_numpy(numpy_helper.to_array(inits[name]).copy()) for name in touched})
    passes = ([OnnxBiasCompensation()] if statistics is not None else []) + [
        OnnxSliceInitializers(), OnnxShapeConstants(), OnnxTidy(), OnnxValidate()]
    PassManager(passes)(state)
    return state.proto, {**state.report, "kept": state.kept}


ONNX_COMPUTES = ("ONNX-native pruning does not compute it (it computes activation statistics in onnxruntime: use "
                 "magnitude, spectral, wanda-sp or flap, with --compensate none or bias)")


@register
class OnnxBackend(Backend):
    """ONNX files pruned in place of the graph: see the module docstring."""

    name = "onnx"
    capabilities = Capabilities(needs=Need.ACTIVATIONS, compensations=frozenset({"none", "bias"}), sequential=False,
                                targets=frozenset({"channels", "heads", "query-heads", "kv-groups", "hidden"}),
                                experts=False, self_generated_calibration=False)

    @classmethod
    def accepts(cls, source, options) -> bool:
        if isinstance(source, onnx.ModelProto):
            return True
        if getattr(source, "kind", None) == "onnx":
            return True
        return isinstance(source, (str, Path)) and str(source).lower().endswith(".onnx")

    @classmethod
    def refusal_of(cls, scorer, compensate, *, sequential=False, target_parts=()) -> str | None:
        from ..allocation import get as allocator  # noqa: PLC0415

        if isinstance(scorer, ExpertCriterion):
            return f"criterion '{scorer.name}' scores routed experts; the ONNX backend does not prune experts"
        missing = scorer.needs & ~Need.ACTIVATIONS
        if missing:
            return f"criterion '{scorer.name}' needs {', '.join(missing.names())}; {ONNX_COMPUTES}"
        if compensate == "lsq":
            return f"--compensate lsq needs Gram matrices of layer inputs; {ONNX_COMPUTES}"
        if sequential:
            return "--sequential runs PyTorch blocks one by one; it is not available for ONNX input"
        return super().refusal_of(scorer, compensate, sequential=sequential, target_parts=target_parts)

    def refusal(self, stage, target_parts=()) -> str | None:
        from ..allocation import get as allocator

        missing = allocator(stage.allocation).needs & ~Need.ACTIVATIONS
        if missing:
            return f"allocation '{stage.allocation}' needs {', '.join(missing.names())}; {ONNX_COMPUTES}"
        return super().refusal(stage, target_parts)

    def default_pipeline(self, chosen: list) -> tuple[str, str, bool]:
        """FLAP with its bias compensation: the best this backend computes (activation statistics)."""
        return "flap", "bias", False

    def __init__(self, source: Any, options, *, tokenizer: Any = None) -> None:
        from ..io.onnx_files import load_checked_with_files

        self.options = options
        if options.export:
            raise UserError("--export applies to PyTorch models; an ONNX input is written as ONNX already")
        self.inputs: list[Path] = []
        self.tokenizer = tokenizer
        if isinstance(source, onnx.ModelProto):
            self.proto, self.name_ = source, "model"
        elif getattr(source, "kind", None) == "onnx":
            self.proto, self.name_ = source.onnx_model, source.name
            self.inputs = source.inputs
            self.tokenizer = tokenizer or source.tokenizer
        else:
            from ..models import load_model

            loaded = load_model(source)
            self.proto, self.name_, self.inputs = loaded.onnx_model, loaded.name, loaded.inputs
            self.tokenizer = tokenizer or loaded.tokenizer
        self._groups: GroupSet | None = None
        self.calib_note = None
        self.statistics = None
        self.extra: dict[str, Any] = {}

    @property
    def display_name(self) -> str:
        return self.name_

    def groups(self) -> GroupSet:
        if self._groups is None:
            self._groups = build_groups(graph_from_onnx(self.proto))
        return self._groups

    def param_counts(self) -> tuple[int, int]:
        groups = self.groups()
        params = [t for t in groups.graph.tensors.values() if t.kind in (PARAM, STATE)]
        return sum(int(np.prod(t.shape)) for t in params), _layer_params(self.proto, groups)

    def prepare_output(self, out) -> Path:
        from ..io.onnx_files import prepare_output_file

        return prepare_output_file(out, inputs=self.inputs, force=self.options.force)

    def prepare(self, stage, chosen: list) -> list:
        # the ONNX rewrite keeps no per-expert widths: channels inside stacked experts stay
        return [g for g in chosen if not any(s.expert is not None for s in g.slices)]

    def score(self, stage, chosen: list) -> Scores:
        options = self.options
        groups = self.groups()
        if stage.needs & Need.ACTIVATIONS:
            if self.tokenizer is None:
                raise CalibrationError(f"criterion '{stage.criterion}' needs calibration text: put the tokenizer "
                                       f"files next to the .onnx file")
            calib = options.calib_sources[0]
            if str(calib) == "none":
                raise CalibrationError("--calib none lets a PyTorch model write its own calibration text; for ONNX "
                                       "input give a text file or 'default'")
            from ..calibration.text import load_calibration

            batches = load_calibration(calib, self.tokenizer, nsamples=options.nsamples, seqlen=options.seqlen,
                                       seed=options.seed)
            self.statistics = collect_onnx(self.proto, groups, chosen, batches, batch_size=options.batch_size,
                                           progress=options.progress)
            self.calib_note = {"source": str(calib), "nsamples": options.nsamples, "seqlen": options.seqlen,
                               "seed": options.seed, "runtime": "onnxruntime"}
        inits = {i.name: i for i in self.proto.graph.initializer}
        params = {s.param: torch.from_numpy(numpy_helper.to_array(inits[s.param]).copy()) for g in chosen
                  for s in g.slices if s.param in inits}
        ctx = ScoringContext(None, groups, params, self.statistics)
        return score_units(stage.scorer, chosen, ctx, comparable=stage.allocation == "global")

    def calibration_note(self):
        return self.calib_note

    def apply(self, stage, chosen: list, removed: dict[str, np.ndarray], scores) -> StageResult:
        pruned, extra = rewrite_onnx(self.proto, self.groups(), chosen, removed,
                                     statistics=self.statistics if stage.compensate == "bias" else None)
        self.kept = extra.pop("kept")
        self.extra = {"shape_constants_rewritten": extra.get("shape_constants_rewritten", []),
                      "compensated_layers": extra.get("compensated_layers", 0)}
        self.proto = pruned
        self._groups = None
        return StageResult(removed, {})

    def report_extra(self) -> dict:
        return {"frontend": "onnx", "round_to": self.options.round_to, **self.extra}

    def finish(self, report: dict, out) -> onnx.ModelProto:
        import json

        entry = self.proto.metadata_props.add()
        entry.key, entry.value = "graphprune_report", json.dumps(report, sort_keys=True, default=str)
        if out is not None:
            from ..io.onnx_files import save_model_atomically

            save_model_atomically(self.proto, out, force=self.options.force)
        return self.proto
