"""Dimension rules: one entry per canonical op, saying which axes of its operands are the same
channels.

A rule receives the `Propagation` state and the op and calls `couple(a, b)` for axis layouts that
must be pruned together, `pin(layout, why)` for axes that can never be pruned (an op reads positions
along them, they are the model's interface, ...), and `set_values(tensor, layout)` for integer
tensors whose *values* are indices into an axis (top-k router choices, arange): an op that then
indexes a weight with such a tensor couples the weight's axis with the axis the values point into.
That is how MoE expert weights find their router rows, without any per-family code.

`RULES` is the table. An op type missing from it, or the canonical ``unknown`` op, blocks every axis
it touches and is recorded in `Propagation.blocked` so the report can name it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .ir import DERIVED, INPUT, PARAM, STATE, Graph, Op
from .layout import AtomTable, Layout, Prod, StructureConflict, Sum


@dataclass
class BlockedOp:
    op: str
    source_op: str
    location: str
    why: str


@dataclass
class IndexedGather:
    """`output` holds rows of `source` picked along `axis` by the values of `index` (whose values
    index `value_layout`): position j of the output's `slot_axes` is row index[j] of the source.
    With router choices as the index these are per-token expert weights (MoE batched_mm)."""

    op: str
    source: str
    axis: int
    index: str
    output: str
    slot_axes: list[int]
    value_layout: Layout


class Propagation:
    """Axis layouts of every tensor, built by running the rules over the graph in order."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.atoms = AtomTable()
        self.layouts: dict[str, list[Layout]] = {}
        self.values: dict[str, Layout] = {}  # index tensor -> layout of the axis its values index
        self.routing_axes: list[tuple[Op, Layout]] = []  # (topk op, axis it selects from)
        self.gathers: list[IndexedGather] = []  # rows picked by index values (see IndexedGather)
        self.blocked: list[BlockedOp] = []
        self.conflicts: list[str] = []
        self.op: Op | None = None

    # ------------------------------------------------------------ helpers
    def L(self, tensor: str | None) -> list[Layout]:
        """Per-axis layouts of a tensor (fresh atoms on first sight)."""
        if tensor is None:
            return []
        if tensor not in self.layouts:
            t = self.graph.tensors[tensor]
            about = {"tensor": tensor, "kind": t.kind}
            if t.kind in (PARAM, STATE):
                about["param"] = t.source_name or tensor
            self.layouts[tensor] = [self.atoms.new(s, about={**about, "axis": k}) for k, s in enumerate(t.shape)]
        return self.layouts[tensor]

    def shape(self, tensor: str) -> tuple[int, ...]:
        return self.graph.tensors[tensor].shape

    def here(self) -> str:
        op = self.op
        return f"{op.source_op} at {op.location}" if op else "?"

    def couple(self, a: Layout, b: Layout) -> None:
        try:
            self.atoms.unify(a, b)
        except StructureConflict as exc:
            why = f"incompatible channel structure at {self.here()} ({exc})"
            self.conflicts.append(why)
            self.atoms.pin(a, why)
            self.atoms.pin(b, why)

    def pin(self, layout: Layout, why: str) -> None:
        self.atoms.pin(layout, why)

    def pin_tensor(self, tensor: str | None, why: str) -> None:
        for layout in self.L(tensor):
            self.pin(layout, why)

    def identity(self, a: str, b: str, skip: set[int] = frozenset()) -> None:
        """Couple axis k of `a` with axis k of `b` (same rank), except axes in `skip`."""
        for k, (la, lb) in enumerate(zip(self.L(a), self.L(b))):
            if k not in skip and self.shape(a)[k] == self.shape(b)[k]:
                self.couple(la, lb)

    def identity_without(self, full: str, reduced: str, axis: int) -> None:
        """`reduced` is `full` with `axis` removed: couple the remaining axes in order."""
        lf, lr = self.L(full), self.L(reduced)
        rest = [k for k in range(len(lf)) if k != axis]
        for j, k in enumerate(rest):
            self.couple(lf[k], lr[j])

    def broadcast(self, inp: str, out: str) -> None:
        """Right-aligned broadcasting: equal sizes are the same axis, size-1 axes are not coupled."""
        si, so = self.shape(inp), self.shape(out)
        li, lo = self.L(inp), self.L(out)
        for k in range(1, min(len(si), len(so)) + 1):
            if si[-k] == so[-k]:
                self.couple(li[-k], lo[-k])
            elif si[-k] != 1:
                self.couple(li[-k], lo[-k])  # will conflict and pin: sizes disagree

    def set_values(self, tensor: str | None, layout: Layout) -> None:
        if tensor is not None:
            self.values[tensor] = layout

    def pass_values(self, src: str | None, dst: str | None) -> None:
        if src in self.values and dst is not None:
            self.values[dst] = self.values[src]

    def indexed_by(self, axis_layout: Layout, index_tensor: str | None, what: str) -> None:
        """The axis is addressed by the values of `index_tensor`."""
        if index_tensor in self.values:
            self.couple(axis_layout, self.values[index_tensor])
        else:
            self.pin(axis_layout, f"{what} by data-dependent indices at {self.here()}")

    def block(self, why: str = "") -> None:
        op = self.op
        reason = why or f"no dimension rule for {op.source_op}"
        self.blocked.append(BlockedOp(op.name, op.source_op, op.location, reason))
        message = f"blocked by {op.source_op} at {op.location}: {reason}"
        for t in op.inputs + op.outputs:
            if t is not None:
                self.pin_tensor(t, message)

    # ------------------------------------------------------------ driver
    def run(self) -> "Propagation":
        for tensor in self.graph.tensors.values():
            if tensor.kind == INPUT:
                for k, layout in enumerate(self.L(tensor.name)):
                    self.pin(layout, f"axis {k} of model input '{tensor.source_name}'")
            elif tensor.kind == DERIVED:
                for k, layout in enumerate(self.L(tensor.name)):
                    self.pin(layout, f"axis {k} of '{tensor.source_name or tensor.name}' "
                                     f"(a buffer/constant whose values depend on its size)")
        atoms = self.atoms
        for op in self.graph.topological_ops():
            self.op = op
            # edges of the coupling graph say which op coupled two atoms, and by which rule
            atoms.context = {"op": op.name, "source_op": op.source_op, "location": op.location, "rule": op.op}
            atoms.origin = {"op": op.name}
            rule = RULES.get(op.op)
            if rule is None:
                self.block(op.attrs.get("why", ""))
                continue
            rule(self, op)
        self.op = None
        atoms.context, atoms.origin = {}, {}
        for tensor in self.graph.tensors.values():
            if tensor.is_output:
                for k, layout in enumerate(self.L(tensor.name)):
                    self.pin(layout, f"axis {k} of model output '{tensor.name}'")
        return self


def propagate(graph: Graph) -> Propagation:
    return Propagation(graph).run()


# ============================================================================ rules
def _out(op: Op, i: int = 0) -> str | None:
    return op.outputs[i] if len(op.outputs) > i else None


def _is_int(p: Propagation, tensor: str | None) -> bool:
    return tensor is not None and p.graph.tensors[tensor].dtype.startswith(("int", "uint", "bool"))


def rule_elementwise(p: Propagation, op: Op) -> None:
    out = _out(op)
    if out is None:
        return
    inputs = [t for t in op.inputs if t is not None]
    for t in inputs:
        p.broadcast(t, out)
    if len(inputs) == 1 and _is_int(p, inputs[0]) and _is_int(p, out):
        p.pass_values(inputs[0], out)  # a dtype cast or copy keeps index values


def _reshape_groups(si: tuple[int, ...], so: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input axes with runs of output axes that hold the same flat indices."""
    ai = [k for k, s in enumerate(si) if s != 1]
    ao = [k for k, s in enumerate(so) if s != 1]
    groups = []
    i = j = 0
    while i < len(ai) and j < len(ao):
        gi, go = [ai[i]], [ao[j]]
        pi, po = si[ai[i]], so[ao[j]]
        while pi != po:
            if pi < po:
                i += 1
                if i >= len(ai):
                    return None
                gi.append(ai[i])
                pi *= si[ai[i]]
            else:
                j += 1
                if j >= len(ao):
                    return None
                go.append(ao[j])
                po *= so[ao[j]]
        groups.append((gi, go))
        i, j = i + 1, j + 1
    if i != len(ai) or j != len(ao):
        return None
    return groups


def rule_reshape(p: Propagation, op: Op) -> None:
    x, y = op.inputs[0], _out(op)
    groups = _reshape_groups(p.shape(x), p.shape(y))
    if groups is None:
        p.block("reshape between incompatible shapes")
        return
    lx, ly = p.L(x), p.L(y)
    for gi, go in groups:
        p.couple(p.atoms.prod([lx[k] for k in gi]), p.atoms.prod([ly[k] for k in go]))
    p.pass_values(x, y)


def rule_permute(p: Propagation, op: Op) -> None:
    x, y = op.inputs[0], _out(op)
    lx, ly = p.L(x), p.L(y)
    for k, src in enumerate(op.attrs["perm"]):
        p.couple(ly[k], lx[src])
    p.pass_values(x, y)


def rule_expand(p: Propagation, op: Op) -> None:
    x, y = op.inputs[0], _out(op)
    p.broadcast(x, y)  # axes grown from size 1 stay fresh: a new repeat axis (e.g. repeat_kv)
    p.pass_values(x, y)


def rule_linear(p: Propagation, op: Op) -> None:
    x, w, b = op.inputs[0], op.inputs[1], op.inputs[2] if len(op.inputs) > 2 else None
    y = _out(op)
    lx, lw, ly = p.L(x), p.L(w), p.L(y)
    p.couple(lx[-1], lw[1])
    p.couple(ly[-1], lw[0])
    if b is not None:
        p.couple(ly[-1], p.L(b)[0])
    for k in range(len(lx) - 1):
        p.couple(lx[k], ly[k])


def _matmul_axes(p: Propagation, a: str, b: str, y: str) -> None:
    sa, sb = p.shape(a), p.shape(b)
    la, lb, ly = p.L(a), p.L(b), p.L(y)
    if len(sa) == 1 or len(sb) == 1:
        if len(sa) == 1 and len(sb) == 1:
            p.couple(la[0], lb[0])
            return
        if len(sa) == 1:
            p.couple(la[0], lb[-2])
            p.couple(ly[-1], lb[-1])
            return
        p.couple(la[-1], lb[0])
        for k in range(len(sa) - 1):
            p.couple(la[k], ly[k])
        return
    p.couple(la[-1], lb[-2])
    p.couple(ly[-2], la[-2])
    p.couple(ly[-1], lb[-1])
    for src_shape, src_layouts in ((sa, la), (sb, lb)):
        for k in range(3, len(src_shape) + 1):
            if src_shape[-k] == p.shape(y)[-k]:
                p.couple(src_layouts[-k], ly[-k])


def rule_matmul(p: Propagation, op: Op) -> None:
    _matmul_axes(p, op.inputs[0], op.inputs[1], _out(op))


def rule_addmm(p: Propagation, op: Op) -> None:
    bias, a, b = op.inputs
    y = _out(op)
    _matmul_axes(p, a, b, y)
    if bias is not None:
        p.broadcast(bias, y)


def rule_conv(p: Propagation, op: Op) -> None:
    x, w, b = op.inputs[0], op.inputs[1], op.inputs[2] if len(op.inputs) > 2 else None
    y = _out(op)
    lx, lw, ly = p.L(x), p.L(w), p.L(y)
    groups = op.attrs.get("groups", 1)
    p.couple(lx[0], ly[0])
    for k in range(2, len(lw)):
        p.pin(lw[k], f"convolution kernel window at {p.here()}")
    if op.attrs.get("transposed"):
        if groups != 1:
            p.block("grouped transposed convolution")
            return
        p.couple(lx[1], lw[0])
        p.couple(ly[1], lw[1])
    elif groups == 1:
        p.couple(lx[1], lw[1])
        p.couple(ly[1], lw[0])
    else:
        c_in, c_out, per_group = p.shape(x)[1], p.shape(y)[1], p.shape(w)[1]
        if groups < 1 or c_in % groups or c_out % groups or per_group * groups != c_in:
            # The weight layout [C_out, C_in/group, *kernel] is what the channel mapping below relies on.
            p.block(f"grouped convolution with {c_in} input / {c_out} output channels, group {groups} and "
                    f"{per_group} kernel channels")
            return
        # Channels are (group, channel-in-group) in mixed radix on both sides, the group index
        # shared: pruning whole groups, or the same in-group channel in every group, stays legal
        # (the ONNX rewrite recomputes `group` as C_in / W.shape[1]). A depthwise conv (one channel
        # per group) has no in-group part: input channel c, filter c and group c are one unit.
        a = p.atoms
        group = a.new(groups)
        cin = a.new(c_in // groups)
        p.couple(lx[1], a.prod((group, cin)))
        p.couple(ly[1], a.prod((group, a.new(c_out // groups))))
        p.couple(lw[0], ly[1])
        p.couple(lw[1], cin)
    if b is not None:
        p.couple(ly[1], p.L(b)[0])


def rule_batch_norm(p: Propagation, op: Op) -> None:
    x, y = op.inputs[0], _out(op)
    p.identity(x, y)
    channel = p.L(x)[1]
    for t in op.inputs[1:]:
        if t is not None:
            p.couple(channel, p.L(t)[0])


def rule_layer_norm(p: Propagation, op: Op) -> None:
    x, w, b = (op.inputs + [None, None])[:3]
    y = _out(op)
    p.identity(x, y)
    n = op.attrs.get("normalized_ndim", 1)
    lx = p.L(x)
    for t in (w, b):
        if t is not None:
            lt = p.L(t)
            for k in range(1, n + 1):
                p.couple(lx[-k], lt[-k])


def rule_reduce(p: Propagation, op: Op) -> None:
    x = op.inputs[0]
    axes = set(op.attrs["axes"])
    keep = op.attrs.get("keepdim", False)
    lx = p.L(x)
    for y in op.outputs:
        ly = p.L(y)
        j = 0
        for k in range(len(lx)):
            if k in axes:
                if keep:
                    j += 1
                continue
            if j < len(ly):
                p.couple(lx[k], ly[j])
            j += 1


def rule_slice(p: Propagation, op: Op) -> None:
    x, y = op.inputs[0], _out(op)
    axis, start, end, step = (op.attrs[k] for k in ("axis", "start", "end", "step"))
    p.identity(x, y, skip={axis})
    lx, ly = p.L(x), p.L(y)
    n = p.shape(x)[axis]
    if step != 1:
        why = f"strided slice at {p.here()}"
        p.pin(lx[axis], why)
        p.pin(ly[axis], why)
        return
    _couple_window(p, lx[axis], ly[axis], n, start, end)
    p.pass_values(x, y)


def _couple_window(p: Propagation, whole: Layout, part: Layout, n: int, start: int, end: int) -> None:
    """`part` is indices [start, end) of the n-wide axis `whole`: whole = (before | part | after)."""
    if start == 0 and end >= n:
        p.couple(whole, part)
        return
    a = p.atoms
    end = max(end, start)
    parts = []
    if start > 0:
        parts.append(a.new(start))
    if end > start:
        parts.append(part)
    if n > end:
        parts.append(a.new(n - end))
    p.couple(whole, a.sum(parts))


def rule_slice_scatter(p: Propagation, op: Op) -> None:
    """y = x with y[..., start:end:step, ...] = src: y is x's axes, src fills a window of one."""
    x, src, y = op.inputs[0], op.inputs[1], _out(op)
    axis, start, end, step = (op.attrs[k] for k in ("axis", "start", "end", "step"))
    p.identity(x, y)
    p.identity(src, y, skip={axis})
    ly, ls = p.L(y), p.L(src)
    if step != 1:
        why = f"strided slice_scatter at {p.here()}"
        p.pin(ly[axis], why)
        p.pin(ls[axis], why)
        return
    _couple_window(p, ly[axis], ls[axis], p.shape(y)[axis], start, end)


def rule_select_scatter(p: Propagation, op: Op) -> None:
    """y = x with y.select(axis, i) = src: src has every axis of y but `axis`, which is pinned."""
    x, src, y = op.inputs[0], op.inputs[1], _out(op)
    axis = op.attrs["axis"]
    p.identity(x, y)
    ly, ls = p.L(y), p.L(src)
    p.pin(ly[axis], f"select_scatter of a fixed index at {p.here()}")
    for j, k in enumerate(k for k in range(len(ly)) if k != axis):
        p.couple(ls[j], ly[k])


def rule_split(p: Propagation, op: Op) -> None:
    x = op.inputs[0]
    axis = op.attrs["axis"]
    pieces = []
    for y in op.outputs:
        p.identity(x, y, skip={axis})
        pieces.append(p.L(y)[axis])
    p.couple(p.L(x)[axis], p.atoms.sum(pieces))


def rule_unbind(p: Propagation, op: Op) -> None:
    x = op.inputs[0]
    axis = op.attrs["axis"]
    p.pin(p.L(x)[axis], f"unbind at {p.here()}")
    for y in op.outputs:
        p.identity_without(x, y, axis)


def rule_cat(p: Propagation, op: Op) -> None:
    y = _out(op)
    axis = op.attrs["axis"]
    inputs = [t for t in op.inputs if t is not None and p.shape(t)]
    for t in inputs:
        p.identity(t, y, skip={axis})
    p.couple(p.L(y)[axis], p.atoms.sum([p.L(t)[axis] for t in inputs]))


def rule_stack(p: Propagation, op: Op) -> None:
    y = _out(op)
    axis = op.attrs["axis"]
    p.pin(p.L(y)[axis], f"stack axis at {p.here()}")
    for t in op.inputs:
        p.identity_without(y, t, axis)


def rule_select(p: Propagation, op: Op) -> None:
    x, y = op.inputs[0], _out(op)
    axis = op.attrs["axis"]
    p.pin(p.L(x)[axis], f"select of a fixed index at {p.here()}")
    p.identity_without(x, y, axis)
    p.pass_values(x, y)


def rule_index(p: Propagation, op: Op) -> None:
    x, idx = op.inputs[0], op.inputs[1:]
    y = _out(op)
    positions = op.attrs["positions"]
    lx, ly = p.L(x), p.L(y)
    for pos, t in zip(positions, idx):
        p.indexed_by(lx[pos], t, "axis indexed")
    # Shape of the result: the broadcast index shape replaces the indexed axes, in place when they
    # are adjacent, at the front otherwise (NumPy advanced indexing).
    index_ndim = max(len(p.shape(t)) for t in idx if t is not None) if idx else 0
    adjacent = positions == list(range(positions[0], positions[0] + len(positions))) if positions else True
    start = positions[0] if adjacent and positions else 0
    for pos, t in zip(positions, idx):
        if t is None:
            continue
        lt = p.L(t)
        slots = []
        for k in range(1, len(lt) + 1):
            out_axis = start + index_ndim - k
            if p.shape(t)[-k] == p.shape(y)[out_axis]:
                p.couple(lt[-k], ly[out_axis])
                slots.append(out_axis)
        if t in p.values and len(idx) == 1:
            p.gathers.append(IndexedGather(op.name, x, pos, t, y, sorted(slots), p.values[t]))
    rest = [k for k in range(len(lx)) if k not in positions]
    out_rest = [k for k in range(len(ly)) if not (start <= k < start + index_ndim)]
    for k, j in zip(rest, out_rest):
        p.couple(lx[k], ly[j])
    p.pass_values(x, y)


def rule_gather(p: Propagation, op: Op) -> None:
    x, idx = op.inputs
    y = _out(op)
    axis = op.attrs["axis"]
    lx, li, ly = p.L(x), p.L(idx), p.L(y)
    p.indexed_by(lx[axis], idx, "axis gathered")
    for k in range(len(ly)):
        p.couple(li[k], ly[k])
        if k != axis and p.shape(x)[k] == p.shape(y)[k]:
            p.couple(lx[k], ly[k])
    p.pass_values(x, y)


def rule_index_select(p: Propagation, op: Op) -> None:
    x, idx = op.inputs
    y = _out(op)
    axis = op.attrs["axis"]
    p.identity(x, y, skip={axis})
    p.indexed_by(p.L(x)[axis], idx, "axis selected")
    p.couple(p.L(idx)[0], p.L(y)[axis])
    if idx in p.values:
        p.gathers.append(IndexedGather(op.name, x, axis, idx, y, [axis], p.values[idx]))
    p.pass_values(x, y)


def rule_embedding(p: Propagation, op: Op) -> None:
    w, idx = op.inputs
    y = _out(op)
    lw, li, ly = p.L(w), p.L(idx), p.L(y)
    p.indexed_by(lw[0], idx, "rows selected")
    p.couple(ly[-1], lw[1])
    for k in range(len(li)):
        p.couple(li[k], ly[k])


def rule_topk(p: Propagation, op: Op) -> None:
    x = op.inputs[0]
    axis = op.attrs["axis"]
    lx = p.L(x)
    for y in op.outputs:
        p.identity(x, y, skip={axis})
        p.pin(p.L(y)[axis], f"top-k/sort slot axis at {p.here()}")
    if len(op.outputs) > 1:
        p.set_values(op.outputs[1], lx[axis])
        p.routing_axes.append((op, lx[axis]))


def rule_argreduce(p: Propagation, op: Op) -> None:
    x, y = op.inputs[0], _out(op)
    axis = op.attrs["axis"]
    lx, ly = p.L(x), p.L(y)
    rest = [k for k in range(len(lx)) if k != axis]
    out_axes = [k for k in range(len(ly)) if not (op.attrs.get("keepdim") and k == axis)]
    for k, j in zip(rest, out_axes):
        p.couple(lx[k], ly[j])
    p.set_values(y, lx[axis])
    p.routing_axes.append((op, lx[axis]))


def rule_max_dim(p: Propagation, op: Op) -> None:
    x = op.inputs[0]
    axis = op.attrs["axis"]
    sub = Op(op.name, "argreduce", [x], [op.outputs[-1]], op.attrs, op.source_op, op.location)
    rule_argreduce(p, sub)
    if len(op.outputs) > 1:
        rule_reduce(p, Op(op.name, "reduce", [x], [op.outputs[0]],
                          {"axes": [axis], "keepdim": op.attrs.get("keepdim", False)}))


def rule_one_hot(p: Propagation, op: Op) -> None:
    idx, y = op.inputs[0], _out(op)
    li, ly = p.L(idx), p.L(y)
    for k in range(len(li)):
        p.couple(li[k], ly[k])
    p.indexed_by(ly[-1], idx, "one-hot axis")


def rule_sdpa(p: Propagation, op: Op) -> None:
    q, k, v, mask = (op.inputs + [None])[:4]
    y = _out(op)
    lq, lk, lv, ly = p.L(q), p.L(k), p.L(v), p.L(y)
    p.couple(lq[-1], lk[-1])  # E: contracted in q·kᵀ
    p.couple(lk[-2], lv[-2])  # S
    p.couple(ly[-2], lq[-2])  # L
    p.couple(ly[-1], lv[-1])  # Ev
    hq, hk = p.shape(q)[-3], p.shape(k)[-3]
    p.couple(lk[-3], lv[-3])
    p.couple(ly[-3], lq[-3])
    if hq == hk:
        p.couple(lq[-3], lk[-3])
    elif op.attrs.get("enable_gqa") and hq % hk == 0:
        p.couple(lq[-3], Prod((lk[-3], p.atoms.new(hq // hk))))
    else:
        p.block("attention with mismatched head counts")
        return
    for t in (q, k, v):
        lt = p.L(t)
        for j in range(4, len(lt) + 1):
            if p.shape(t)[-j] == p.shape(y)[-j]:
                p.couple(lt[-j], ly[-j])
    if mask is not None:
        lm, sm = p.L(mask), p.shape(mask)
        targets = [lq[-3], lq[-2], lk[-2]]
        sizes = [hq, p.shape(q)[-2], p.shape(k)[-2]]
        for j in range(1, min(3, len(sm)) + 1):
            if sm[-j] == sizes[-j]:
                p.couple(lm[-j], targets[-j])
    if not op.attrs.get("scale_given", True):
        p.pin(lq[-1], f"attention scale defaults to 1/sqrt(head_dim) at {p.here()}")


def rule_create(p: Propagation, op: Op) -> None:
    y = _out(op)
    if y is None:
        return
    p.L(y)
    if op.attrs.get("arange") and len(p.shape(y)) == 1:
        p.set_values(y, p.L(y)[0])  # arange(n)'s values index its own axis


def rule_like(p: Propagation, op: Op) -> None:
    p.identity(op.inputs[0], _out(op))


def rule_index_add(p: Propagation, op: Op) -> None:
    x, idx, src = op.inputs
    y = _out(op)
    axis = op.attrs["axis"]
    p.identity(x, y)
    lx, ls = p.L(x), p.L(src)
    p.indexed_by(lx[axis], idx, "axis accumulated into")
    p.couple(ls[axis], p.L(idx)[0])
    for k in range(len(lx)):
        if k != axis:
            p.couple(lx[k], ls[k])


def rule_scatter(p: Propagation, op: Op) -> None:
    x, idx, src = op.inputs
    y = _out(op)
    axis = op.attrs["axis"]
    p.identity(x, y)
    lx, li = p.L(x), p.L(idx)
    p.indexed_by(lx[axis], idx, "axis scattered into")
    if src is not None:
        p.identity(idx, src)
    for k in range(len(li)):
        if k != axis and p.shape(idx)[k] == p.shape(x)[k]:
            p.couple(li[k], lx[k])


def rule_scan(p: Propagation, op: Op) -> None:
    x, y = op.inputs[0], _out(op)
    axes = set(op.attrs["axes"])
    p.identity(x, y, skip=axes)
    for a in axes:
        why = f"{op.source_op} mixes positions along this axis at {op.location}"
        p.pin(p.L(x)[a], why)
        p.pin(p.L(y)[a], why)


def rule_pool(p: Propagation, op: Op) -> None:
    x, y = op.inputs[0], _out(op)
    lx, ly = p.L(x), p.L(y)
    spatial = set(op.attrs["spatial"])
    for k in range(len(lx)):
        if k not in spatial:
            p.couple(lx[k], ly[k])
    for extra in op.outputs[1:]:  # max-pool indices: positions, never prunable
        p.pin_tensor(extra, f"pooling indices at {p.here()}")


def rule_repeat(p: Propagation, op: Op) -> None:
    x, y = op.inputs[0], _out(op)
    repeats = op.attrs["repeats"]
    lx, ly = p.L(x), p.L(y)
    offset = len(ly) - len(lx)
    for k in range(len(ly)):
        r = repeats[k]
        src = lx[k - offset] if k >= offset else None
        if src is None:
            continue
        p.couple(ly[k], p.atoms.prod([p.atoms.new(r), src]) if r != 1 else src)


def rule_repeat_interleave(p: Propagation, op: Op) -> None:
    x, y = op.inputs[0], _out(op)
    axis, r = op.attrs["axis"], op.attrs["repeats"]
    p.identity(x, y, skip={axis})
    p.couple(p.L(y)[axis], p.atoms.prod([p.L(x)[axis], p.atoms.new(r)]))


def rule_einsum(p: Propagation, op: Op) -> None:
    equation = op.attrs["equation"].replace(" ", "")
    if "..." in equation or "->" not in equation:
        p.block("einsum with ellipsis or implicit output")
        return
    lhs, rhs = equation.split("->")
    letters: dict[str, Layout] = {}
    for spec, t in list(zip(lhs.split(","), op.inputs)) + [(rhs, _out(op))]:
        if t is None or len(spec) != len(p.shape(t)):
            p.block("einsum operand rank mismatch")
            return
        for ch, layout, size in zip(spec, p.L(t), p.shape(t)):
            if size == 1:
                continue
            if ch in letters:
                p.couple(letters[ch], layout)
            else:
                letters[ch] = layout


def rule_pad(p: Propagation, op: Op) -> None:
    x, y = op.inputs[0], _out(op)
    axes = set(op.attrs["axes"])
    p.identity(x, y, skip=axes)
    for a in axes:
        p.pin(p.L(x)[a], f"padding at {p.here()}")
        p.pin(p.L(y)[a], f"padding at {p.here()}")


def rule_unknown(p: Propagation, op: Op) -> None:
    p.block(op.attrs.get("why", ""))


RULES: dict[str, Callable[[Propagation, Op], None]] = {
    "elementwise": rule_elementwise,
    "reshape": rule_reshape,
    "permute": rule_permute,
    "expand": rule_expand,
    "linear": rule_linear,
    "matmul": rule_matmul,
    "addmm": rule_addmm,
    "conv": rule_conv,
    "batch_norm": rule_batch_norm,
    "layer_norm": rule_layer_norm,
    "reduce": rule_reduce,
    "slice": rule_slice,
    "slice_scatter": rule_slice_scatter,
    "select_scatter": rule_select_scatter,
    "split": rule_split,
    "unbind": rule_unbind,
    "cat": rule_cat,
    "stack": rule_stack,
    "select": rule_select,
    "index": rule_index,
    "gather": rule_gather,
    "index_select": rule_index_select,
    "embedding": rule_embedding,
    "topk": rule_topk,
    "argreduce": rule_argreduce,
    "max_dim": rule_max_dim,
    "one_hot": rule_one_hot,
    "sdpa": rule_sdpa,
    "create": rule_create,
    "like": rule_like,
    "index_add": rule_index_add,
    "scatter": rule_scatter,
    "scan": rule_scan,
    "pool": rule_pool,
    "repeat": rule_repeat,
    "repeat_interleave": rule_repeat_interleave,
    "einsum": rule_einsum,
    "pad": rule_pad,
    "unknown": rule_unknown,
}
