"""Dependency groups: the connected components of coupled axes, described for people and code.

The coupling graph (`Propagation.atoms.coupling`, a `networkx.Graph`: nodes are axis atoms, edges
the couplings the dimension rules made; see `graph.layout`) is partitioned into its connected
components; every component of leaf atoms (atoms not refined into finer parts) that a parameter
axis resolves to is one `Group` (`Group.atoms` is that component; a per-expert class gives one
group per expert, all with the same component). `coupling_graph` returns the graph with each
node's group, for `graphprune inspect --graph`. Unit ``u`` of
the group is index ``u`` of the class; removing it removes, from every member parameter, the
indices listed in ``ParamSlice.indices[u]``. Kinds are read off the structure, not off names:

* ``hidden``   - touches the embedding dimension (the residual stream),
* ``expert``   - addressed through router choices (top-k / argmax indices),
* ``expert-group`` - a routed factor with another routed factor nested inside it (group-limited
  routing: ``[E]`` scores viewed as ``[groups, E / groups]``); its ``expert`` group is its child,
* ``kv-group`` - a head-like factor with another head-like factor nested inside it (GQA),
* ``head``     - a major factor of a reshaped axis (attention heads),
* ``head_dim`` - the minor factor of a reshaped axis,
* ``channel``  - everything else (FFN channels, conv channels, ...).

Stacked expert weights (``gate_up_proj [E, 2I, H]`` read through ``W[expert_ids]`` and a batched
matmul) hold the channels of all experts on one axis, but no op mixes channel c of one expert
with channel c of another: every tensor that carries those channels also carries the routed axis
(the expert axis of a weight, or the token-slot axis of a gathered one). Such a class becomes one
group per expert, its slices fixed to that expert (``ParamSlice.expert``). Experts of one stacked
tensor must keep equal widths, so they are pruned by equal counts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .ir import INPUT, PARAM, STATE, Graph
from .layout import Layout, Prod, Sum
from .rules import BlockedOp, Propagation, propagate

EXPERT, EXPERT_GROUP = "expert", "expert-group"

PRUNABLE, OPT_IN, FIXED, BLOCKED = "prunable", "opt-in", "fixed", "blocked"


@dataclass
class ParamSlice:
    """Unit u of a group covers `indices[u]` along `axis` of parameter `param`."""

    param: str
    axis: int
    indices: np.ndarray  # [units, width]
    role: str  # how the consuming op reads this axis: linear.in, linear.out, bias, norm, ...
    op: str | None = None  # name of the IR op that reads the parameter
    shape: tuple[int, ...] = ()
    # Set for a slice inside one expert of a stacked [E, ...] tensor: the indices apply to
    # `param.select(expert_axis, expert)` only (`axis` still counts the full tensor's axes).
    expert_axis: int | None = None
    expert: int | None = None

    @property
    def width(self) -> int:
        return int(self.indices.shape[1])

    def local(self, tensor):
        """(the part of `tensor` this slice indexes, the axis of its units there): the expert's
        own [out, in] matrix for a slice inside one expert, the tensor itself otherwise."""
        if self.expert is None:
            return tensor, self.axis
        return tensor.select(self.expert_axis, self.expert), self.axis - int(self.axis > self.expert_axis)

    def units_first(self, tensor):
        """`tensor` restricted to this slice's expert with the unit axis moved first (a view)."""
        part, axis = self.local(tensor)
        return part.movedim(axis, 0)

    def describe(self) -> str:
        where = f"[{self.expert_axis}={self.expert}]" if self.expert is not None else ""
        return f"{self.param}{where}[{self.axis}]" + (f"×{self.width}" if self.width > 1 else "")


@dataclass
class Group:
    id: str
    kind: str
    units: int
    unit_size: int  # contiguous indices per unit in its widest member (head_dim for a head)
    slices: list[ParamSlice]
    scope: str  # common module prefix of the members
    layer: int | None
    status: str
    reason: str | None = None
    params_per_unit: int = 0
    flops_per_unit: float = 0.0  # per token (per example for non-token inputs)
    parent: str | None = None  # a head group's kv-group
    children: list[str] = field(default_factory=list)
    root: int = -1  # atom class (internal)
    atoms: frozenset = frozenset()  # the group's connected component of the coupling graph (internal)

    @property
    def prunable(self) -> bool:
        return self.status == PRUNABLE

    def members(self) -> list[str]:
        return [s.describe() for s in self.slices]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "scope": self.scope, "layer": self.layer,
            "units": self.units, "unit_size": self.unit_size, "status": self.status,
            "reason": self.reason, "params_per_unit": self.params_per_unit,
            "flops_per_unit": self.flops_per_unit, "parent": self.parent, "children": self.children,
            "members": [{"param": s.param, "axis": s.axis, "width": s.width, "role": s.role,
                         **({"expert_axis": s.expert_axis, "expert": s.expert} if s.expert is not None else {})}
                        for s in self.slices],
        }


@dataclass
class GroupSet:
    graph: Graph
    groups: list[Group]
    blocked_ops: list[BlockedOp]
    tokens: int
    propagation: Propagation | None = None

    def __iter__(self):
        return iter(self.groups)

    def by_id(self, gid: str) -> Group:
        return next(g for g in self.groups if g.id == gid)

    def select(self, kind: str | None = None, status: str | None = None) -> list[Group]:
        return [g for g in self.groups if (kind is None or g.kind == kind) and (status is None or g.status == status)]

    def summary(self) -> dict[str, Any]:
        by_kind: dict[str, dict[str, int]] = {}
        for g in self.groups:
            entry = by_kind.setdefault(g.kind, {"groups": 0, "units": 0, "prunable_params": 0})
            entry["groups"] += 1
            entry["units"] += g.units
        for kind, entry in by_kind.items():
            entry["prunable_params"] = prunable_params(
                g for g in self.groups if g.kind == kind and g.status in (PRUNABLE, OPT_IN))
        blocked = [{"group": g.id, "scope": g.scope, "reason": g.reason} for g in self.groups if g.status == BLOCKED]
        return {"frontend": self.graph.frontend, "by_kind": by_kind, "blocked_groups": blocked,
                "ops_without_rule": [{"op": b.source_op, "location": b.location, "why": b.why} for b in self.blocked_ops],
                "notes": self.graph.notes}

    def to_json(self) -> str:
        return json.dumps({"source": self.graph.source, "summary": self.summary(),
                           "groups": [g.to_dict() for g in self.groups]}, indent=1)


def prunable_params(groups) -> int:
    """Elements of the parameters that pruning `groups` can remove, each element counted once.

    `units * params_per_unit` summed over groups is not that: a weight is a member once per axis (a
    conv's filters in one group, its input channels in another, or both in one group when an
    initializer several nodes read couples them), so every conv weight counted twice (a resnet18
    showed 22.8M "prunable" of 11.7M). An element is removable when any of its axes holds a unit of
    one of the groups; what is left is the product, over axes, of the indices no group covers."""
    shapes: dict[str, tuple[int, ...]] = {}
    dense: dict[str, dict[int, set[int]]] = {}  # param -> axis -> covered indices
    per_expert: dict[str, dict[tuple[int, int], dict[int, set[int]]]] = {}  # param -> (axis, expert) -> ...
    for g in groups:
        for s in g.slices:
            if not s.indices.size or not s.shape:
                continue
            shapes[s.param] = tuple(s.shape)
            if s.expert is None:
                axes = dense.setdefault(s.param, {})
            else:
                axes = per_expert.setdefault(s.param, {}).setdefault((s.expert_axis, s.expert), {})
            axes.setdefault(s.axis, set()).update(int(i) for i in s.indices.reshape(-1))
    total = 0
    for name, shape in shapes.items():
        numel = int(np.prod(shape, dtype=np.int64))
        base = dense.get(name, {})
        experts = per_expert.get(name, {})

        def free(axes: range | list[int], extra: dict[int, set[int]]) -> int:
            return int(np.prod([shape[k] - len(base.get(k, set()) | extra.get(k, set())) for k in axes],
                               dtype=np.int64))

        if not experts:
            untouched = free(range(len(shape)), {})
        else:
            # the indices of a per-expert slice apply inside its expert only
            expert_axis = next(iter(experts))[0]
            rest = [k for k in range(len(shape)) if k != expert_axis]
            untouched = sum(0 if e in base.get(expert_axis, set()) else free(rest, experts.get((expert_axis, e), {}))
                            for e in range(shape[expert_axis]))
        total += numel - untouched
    return total


def coupling_graph(groups: GroupSet):
    """The coupling graph of `groups` (a copy) with, on every node, its class (``class``: the
    union-find root), the ``group`` ids of its component (comma-separated: one per expert for a
    per-expert class), their ``group_kind`` and ``status``, why it is pinned (``pinned``) and a
    ``label`` for viewers; edges say which op coupled the two atoms and by which rule. Attribute
    values are strings and ints, as GraphML needs. Groups are its connected components."""
    atoms = groups.propagation.atoms
    out = atoms.coupling.copy()
    out.graph.update(source=str(groups.graph.source), frontend=str(groups.graph.frontend))
    names: dict[int, list[str]] = {}
    for g in groups:
        for atom in g.atoms:
            names.setdefault(atom, []).append(g.id)
    by_id = {g.id: g for g in groups}
    for node, data in out.nodes(data=True):
        data["class"] = atoms.find(node)
        reason = atoms.pin_reason(node)
        if reason:
            data["pinned"] = reason
        if "tensor" in data:
            label = f"{data.get('param', data['tensor'])}[{data['axis']}]"
        elif "part_of" in data:
            label = f"{data['part']} part of a{data['part_of']}"
        else:
            label = f"a{node}" + (f" from {data['op']}" if "op" in data else "")
        data["label"] = f"{label} ({data['size']})"
        ids = names.get(node)
        if ids:
            first = by_id[ids[0]]
            data.update(group=",".join(ids), group_kind=first.kind, status=first.status)
    return out


# ============================================================================ construction
def _param_roles(graph: Graph) -> dict[tuple[str, int], tuple[str, str]]:
    """(tensor, axis) -> (role, op name) for the first op that reads each parameter axis."""
    roles: dict[tuple[str, int], tuple[str, str]] = {}

    def put(t: str, axis: int, role: str, op: str) -> None:
        roles.setdefault((t, axis), (role, op))

    for op in graph.ops.values():
        for pos, t in enumerate(op.inputs):
            if t is None or graph.tensors[t].kind not in (PARAM, STATE):
                continue
            nd = graph.tensors[t].ndim
            if op.op == "linear":
                if pos == 1:
                    put(t, 0, "linear.out", op.name)
                    put(t, 1, "linear.in", op.name)
                else:
                    put(t, 0, "linear.bias", op.name)
            elif op.op in ("matmul", "addmm"):
                if op.op == "addmm" and pos == 0:
                    put(t, nd - 1, "linear.bias", op.name)
                    continue
                second = pos == (2 if op.op == "addmm" else 1)
                if second and nd >= 2:
                    put(t, nd - 2, "linear.in", op.name)
                    put(t, nd - 1, "linear.out", op.name)
                elif nd >= 2:
                    put(t, nd - 1, "matmul.in", op.name)
                    put(t, nd - 2, "matmul.out", op.name)
            elif op.op == "conv":
                if pos == 1:
                    put(t, 0, "conv.out", op.name)
                    put(t, 1, "conv.in", op.name)
                else:
                    put(t, 0, "conv.bias", op.name)
            elif op.op == "embedding" and pos == 0:
                put(t, 0, "embedding.rows", op.name)
                put(t, 1, "embedding.dim", op.name)
            elif op.op in ("layer_norm", "batch_norm"):
                for a in range(nd):
                    put(t, a, "norm", op.name)
            elif op.op in ("index", "gather", "index_select"):
                put(t, 0, "indexed", op.name)
                for a, role in _gathered_matmul_roles(graph, op, nd).items():
                    put(t, a, role, op.name)
                for a in range(1, nd):
                    put(t, a, op.op, op.name)
            else:
                for a in range(nd):
                    put(t, a, op.op, op.name)
    return roles


def _gathered_matmul_roles(graph: Graph, op, nd: int) -> dict[int, str]:
    """Stacked expert weights W [E, out, in] are read as ``W[expert_ids]`` and a batched matmul:
    the gathered tensor keeps W's axes 1.. and the matmul tells which of them is contracted with
    the activations (``expert.in``, an expert's input features) and which it produces
    (``expert.out``). Empty unless W is indexed on axis 0 only and its gather feeds a matmul."""
    if op.attrs.get("positions") != [0] or op.op != "index" or nd < 3 or not op.outputs:
        return {}
    for reader in graph.consumers(op.outputs[0]):
        if reader.op != "matmul" or graph.tensors[op.outputs[0]].ndim != nd:
            continue
        first = reader.inputs.index(op.outputs[0]) == 0
        return ({nd - 1: "expert.in", nd - 2: "expert.out"} if first
                else {nd - 2: "expert.in", nd - 1: "expert.out"})
    return {}


def _positions(layout: Layout, root: int, atoms) -> list[tuple[bool, bool, int, list[int]]]:
    """Where class `root` sits in a resolved layout: (has_major, has_minor, block, minor_roots)."""
    found: list[tuple[bool, bool, int, list[int]]] = []

    def walk(node: Layout, major: bool) -> None:
        if isinstance(node, int):
            if node == root:
                found.append((major, False, 1, []))
            return
        if isinstance(node, Prod):
            parts = list(node.parts)
            for i, part in enumerate(parts):
                if part == root:
                    minors = parts[i + 1:]
                    block = int(np.prod([atoms.size(m) for m in minors])) if minors else 1
                    roots = [leaf for m in minors for leaf in atoms.leaves(m)]
                    found.append((major or i > 0, bool(minors), block, roots))
                else:
                    walk(part, major or i > 0)
            return
        for part in node.parts:  # Sum
            walk(part, major)

    walk(layout, False)
    return found


def _scope(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for items in zip(*parts):
        if all(x == items[0] for x in items):
            common.append(items[0])
        else:
            break
    return ".".join(common)


def _layer_of(scope: str) -> int | None:
    for part in scope.split("."):
        if part.isdigit():
            return int(part)
    return None


def _flop_ops(graph: Graph, prop: Propagation):
    """(total FLOPs, iteration-axis layouts) for every op that does multiply-adds."""
    for _, total, axes in flop_terms(graph, prop):
        yield total, axes


def flops_per_token(groups: "GroupSet") -> float:
    """Multiply-add FLOPs of one forward, per traced token (per example for non-token inputs)."""
    return sum(total for total, _ in _flop_ops(groups.graph, groups.propagation)) / max(groups.tokens, 1)


def flop_terms(graph: Graph, prop: Propagation):
    """(op, total FLOPs over the traced tokens, iteration-axis layouts) for every op that does
    multiply-adds."""
    def shape(t):
        return graph.tensors[t].shape

    for op in graph.ops.values():
        if op.op == "linear":
            x, w = op.inputs[0], op.inputs[1]
            y = op.outputs[0]
            yield op, 2 * int(np.prod(shape(y))) * shape(x)[-1], prop.L(y) + [prop.L(x)[-1]]
        elif op.op in ("matmul", "addmm"):
            a, b = (op.inputs[0], op.inputs[1]) if op.op == "matmul" else (op.inputs[1], op.inputs[2])
            y = op.outputs[0]
            yield op, 2 * int(np.prod(shape(y))) * shape(a)[-1], prop.L(y) + [prop.L(a)[-1]]
        elif op.op == "conv":
            x, w = op.inputs[0], op.inputs[1]
            y = op.outputs[0]
            yield op, 2 * int(np.prod(shape(y))) * int(np.prod(shape(w)[1:])), prop.L(y) + [prop.L(x)[1]]
        elif op.op == "sdpa":
            q, k, v = op.inputs[:3]
            y = op.outputs[0]
            s = shape(k)[-2]
            flops = 2 * int(np.prod(shape(q))) * s + 2 * int(np.prod(shape(y))) * s
            yield op, flops, prop.L(q) + [prop.L(k)[-2], prop.L(v)[-1]]


def _integer_member(graph: Graph, occurrences) -> str | None:
    """Why a class whose members include an integer or boolean tensor stays as it is: such a tensor
    holds indices, counts or a mask, not weights; scoring it as a weight (or slicing indices that
    point into the axis) would be guessing what its values mean."""
    for tname, _axis, _layout in occurrences:
        tensor = graph.tensors[tname]
        if not str(tensor.dtype).startswith(("float", "bfloat")):
            return (f"{tensor.source_name or tname} is a {tensor.dtype} tensor (indices or a mask, not weights): "
                    f"never scored or sliced as a weight")
    return None


def build_groups(graph: Graph, prop: Propagation | None = None) -> GroupSet:
    prop = prop or propagate(graph)
    atoms = prop.atoms
    roles = _param_roles(graph)

    inputs = [t for t in graph.tensors.values() if t.kind == INPUT]
    token_input = next((t for t in inputs if t.dtype.startswith("int") and t.ndim == 2), None)
    tokens = int(np.prod(token_input.shape)) if token_input else (inputs[0].shape[0] if inputs and inputs[0].shape else 1)

    routing_roots = {leaf for _, layout in prop.routing_axes for leaf in atoms.leaves(layout)}

    # Which classes appear where: param axes.
    members: dict[int, list[tuple[str, int, Layout]]] = {}
    read = {t for op in graph.ops.values() for t in op.inputs if t is not None}
    for t in graph.parameters():
        if t.name not in read:  # e.g. the second name of a tied weight: never read in the graph
            continue
        for axis, layout in enumerate(prop.L(t.name)):
            resolved = atoms.resolve(layout)
            for leaf in set(atoms.leaves(resolved)):
                if atoms.size(leaf) > 1:
                    members.setdefault(leaf, []).append((t.name, axis, resolved))

    indices_cache: dict[tuple[str, int], dict[int, np.ndarray]] = {}
    pinned = {root for root in members if atoms.pin_reason(root)}

    def indices_of(tname: str, axis: int, layout: Layout) -> dict[int, np.ndarray]:
        key = (tname, axis)
        if key not in indices_cache:
            wanted = {r for r in atoms.leaves(layout) if r not in pinned}
            indices_cache[key] = atoms.unit_indices(layout, only=wanted)
        return indices_cache[key]

    # FLOPs per unit: an op with F multiply-add FLOPs whose iteration axis (size n) holds the class
    # with `width` indices per unit saves F * width / n per removed unit.
    flops: dict[int, float] = {}
    for total, axes in _flop_ops(graph, prop):
        for layout in axes:
            resolved = atoms.resolve(layout)
            n = atoms.size(resolved)
            wanted = {leaf for leaf in atoms.leaves(resolved) if leaf in members and leaf not in pinned}
            if n <= 1 or not wanted:
                continue
            for leaf, idx in atoms.unit_indices(resolved, only=wanted).items():
                flops[leaf] = flops.get(leaf, 0.0) + total * idx.shape[1] / n

    groups: list[Group] = []
    head_like: dict[int, list[int]] = {}  # class -> head-like classes nested inside it
    info: dict[int, dict[str, Any]] = {}
    for root, occurrences in members.items():
        has_minor = has_major_only = False
        block = 1
        nested: list[int] = []
        embedding_dim = False
        for tname, axis, resolved in occurrences:
            role = roles.get((tname, axis), ("", ""))[0]
            embedding_dim |= role == "embedding.dim"
            for major, minor, blk, minor_roots in _positions(resolved, root, atoms):
                if minor:
                    has_minor = True
                    block = max(block, blk)
                    nested.extend(minor_roots)
                elif major:
                    has_major_only = True
        info[root] = {"embedding_dim": embedding_dim, "has_minor": has_minor,
                      "minor_only": has_major_only and not has_minor, "block": block}
        head_like[root] = nested

    def kind_of(root: int) -> str:
        i = info[root]
        if i["embedding_dim"]:
            return "hidden"
        if root in routing_roots:
            nested = [r for r in head_like[root] if r in routing_roots]
            return EXPERT_GROUP if i["has_minor"] and nested else EXPERT
        if i["has_minor"]:
            inner_heads = [r for r in head_like[root] if r in info and info[r]["has_minor"]]
            return "kv-group" if inner_heads else "head"
        if i["minor_only"]:
            return "head_dim"
        return "channel"

    # The groups are the connected components of the coupling graph that hold leaf atoms some
    # parameter axis resolves to (`members`, keyed by the union-find root of those atoms).
    component_of: dict[int, frozenset] = {}
    for component in atoms.classes():
        root = atoms.find(next(iter(component)))
        if root in members:
            component_of[root] = frozenset(component)
    assert len(component_of) == len(members), "a class of leaf atoms is not one component of the coupling graph"
    # (members' insertion order breaks ties: groups first read by the same op keep their order)
    order = sorted((r for r in members if r in component_of),
                   key=lambda r: min(_param_order(graph, t) for t, _, _ in members[r]))
    fibers = _per_expert_classes(graph, prop, members, routing_roots, pinned)
    for root in order:
        occurrences = members[root]
        kind = kind_of(root)
        reason = atoms.pin_reason(root) or _integer_member(graph, occurrences)
        if reason:
            status = BLOCKED if reason.startswith("blocked by") else FIXED
        else:
            status = OPT_IN if kind in ("hidden", "head_dim") else PRUNABLE
        units = atoms.size(root)
        fiber = fibers.get(root)
        for expert in range(fiber.experts) if fiber else [None]:
            slices: list[ParamSlice] = []
            params_per_unit = 0
            for tname, axis, resolved in occurrences:
                tensor = graph.tensors[tname]
                role, op_name = roles.get((tname, axis), ("unused", None))
                if status in (PRUNABLE, OPT_IN):
                    idx = indices_of(tname, axis, resolved)[root]
                else:
                    idx = np.zeros((units, 0), dtype=np.int64)
                expert_axis = fiber.expert_axis[tname] if fiber else None
                slices.append(ParamSlice(tensor.source_name or tname, axis, idx, role, op_name, tensor.shape,
                                         expert_axis, expert))
                width = idx.shape[1] if idx.size else tensor.shape[axis] // units
                other = int(np.prod([s for k, s in enumerate(tensor.shape) if k not in (axis, expert_axis)]))
                params_per_unit += width * other
            scope = _scope([s.param for s in slices])
            # FLOPs of a per-expert unit: the class's FLOPs shared evenly by the experts (uniform routing)
            share = fiber.experts if fiber else 1
            groups.append(Group(
                id=f"g{len(groups)}", kind=kind, units=units, unit_size=info[root]["block"], slices=slices,
                scope=scope, layer=_layer_of(scope), status=status, reason=reason,
                params_per_unit=params_per_unit, flops_per_unit=flops.get(root, 0.0) / max(tokens, 1) / share,
                root=root, atoms=component_of[root]))

    by_root = {g.root: g for g in groups}
    nested_kinds = {"kv-group": "head", EXPERT_GROUP: EXPERT}
    for g in groups:
        if g.kind in nested_kinds:
            for r in head_like[g.root]:
                child = by_root.get(r)
                if child is not None and child.kind == nested_kinds[g.kind] and child.id not in g.children:
                    g.children.append(child.id)
                    child.parent = g.id
    return GroupSet(graph, groups, prop.blocked, tokens, prop)


@dataclass
class _Fiber:
    experts: int  # size of the routed expert axis
    expert_axis: dict[str, int]  # parameter tensor -> its expert axis


def _per_expert_classes(graph: Graph, prop: Propagation, members: dict, routing_roots: set[int],
                        pinned: set[int]) -> dict[int, _Fiber]:
    """Classes that live inside stacked expert weights and never cross experts.

    A weight W [E, ...] whose expert axis is picked by router choices (``W[ids]``, see
    `IndexedGather`) gives a tensor whose slot axes (one row per token and choice) each belong to
    one expert. A class on W's other axes is per expert when every tensor that carries it also
    carries the routing: parameters on an axis that is exactly the expert axis, activations on the
    expert axis or on all slot axes of that gather. Anything that reduces over the slots, or
    broadcasts a tensor without them against the class, breaks that and keeps one shared group.
    """
    atoms = prop.atoms

    def big_leaves(layout: Layout) -> frozenset[int]:
        return frozenset(leaf for leaf in atoms.leaves(layout) if atoms.size(leaf) > 1)

    axis_leaves = {t: [big_leaves(layout) for layout in layouts] for t, layouts in prop.layouts.items()}
    routings_of: dict[str, set[tuple]] = {}  # gathered source tensor -> (expert leaves, slot leaves, index)
    for g in prop.gathers:
        experts = big_leaves(g.value_layout)
        if not experts or not experts <= routing_roots or axis_leaves[g.source][g.axis] != experts:
            continue
        slots = frozenset().union(*(axis_leaves[g.output][a] for a in g.slot_axes))
        if slots and not slots & experts:
            routings_of.setdefault(g.source, set()).add((experts, slots, g.index))

    fibers: dict[int, _Fiber] = {}
    for root, occurrences in members.items():
        if root in pinned or root in routing_roots:
            continue
        routings = set().union(*(routings_of.get(t, set()) for t, _, _ in occurrences))
        if len(routings) != 1:
            continue
        experts, slots, _ = next(iter(routings))
        if root in slots:
            continue
        expert_axis: dict[str, int] = {}
        for t, leaves in axis_leaves.items():
            if not any(root in axis for axis in leaves):
                continue
            on_expert_axis = [k for k, axis in enumerate(leaves) if axis == experts]
            if graph.tensors[t].kind in (PARAM, STATE):
                if len(on_expert_axis) != 1:
                    break
                expert_axis[t] = on_expert_axis[0]
            elif not (experts <= frozenset().union(*leaves) or slots <= frozenset().union(*leaves)):
                break
        else:
            if all(t in expert_axis for t, _, _ in occurrences):
                t, a = next(iter(expert_axis.items()))
                fibers[root] = _Fiber(graph.tensors[t].shape[a], expert_axis)
    return fibers


def _param_order(graph: Graph, tname: str) -> int:
    # Execution order of the first op reading the parameter: groups print in model order.
    if not hasattr(graph, "_param_order_cache"):
        cache: dict[str, int] = {}
        for n, op in enumerate(graph.ops.values()):
            for t in op.inputs:
                if t is not None and t not in cache:
                    cache[t] = n
        graph._param_order_cache = cache  # type: ignore[attr-defined]
    return graph._param_order_cache.get(tname, 1 << 30)  # type: ignore[attr-defined]
