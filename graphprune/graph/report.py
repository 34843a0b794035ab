"""Human-readable rendering of a GroupSet (`graphprune inspect`), and its coupling graph as GraphML."""

from __future__ import annotations

from pathlib import Path

from .groups import BLOCKED, FIXED, GroupSet, coupling_graph, prunable_params


def write_graphml(groups: GroupSet, path: str | Path) -> Path:
    """Write the coupling graph of `groups` (`groups.coupling_graph`) to `path` as GraphML,
    atomically (`io.atomic.atomic_file`); an unwritable path is one `OutputError` line."""
    import networkx as nx

    from ..errors import OutputError
    from ..io.atomic import atomic_file, environment_errors

    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"--graph {path} is a directory; give a file name (e.g. {path / 'coupling.graphml'})")
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: directory {path.parent} does not exist")
    graph = coupling_graph(groups)
    with environment_errors(path):
        atomic_file(path, lambda tmp: nx.write_graphml(graph, str(tmp)))
    return path


def _num(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}" if isinstance(x, float) and x != int(x) else str(int(x))


def _member(param: str, scope: str) -> str:
    return param[len(scope) + 1:] if scope and param.startswith(scope + ".") else param


def describe_group(group, groups: GroupSet) -> list[str]:
    unit = f"{group.units} units"
    if group.kind == "kv-group":
        heads = [groups.by_id(c) for c in group.children]
        per = heads[0].units if heads else 1
        unit += f" (each {per} query heads + 1 kv head, head_dim {group.unit_size // max(per, 1)})"
    elif group.kind == "head":
        unit += f" (head_dim {group.unit_size})" + (f", per kv-group of {group.parent}" if group.parent else "")
    elif group.kind == "expert":
        unit += " (experts" + (f", per expert-group of {group.parent})" if group.parent else ")")
    elif group.kind == "expert-group":
        children = [groups.by_id(c) for c in group.children]
        unit += f" (each {children[0].units if children else '?'} experts)"
    experts = {s.expert for s in group.slices if s.expert is not None}
    if len(experts) == 1:
        unit += f" inside expert {experts.pop()}"
    head = (f"[{group.id}] {group.kind:<8} {group.scope or '<model>'}  {unit}  "
            f"params/unit {_num(group.params_per_unit)}  FLOPs/unit/token {_num(group.flops_per_unit)}  {group.status}")
    members = ", ".join(
        _member(s.param, group.scope) + (f"[{s.expert_axis}={s.expert}]" if s.expert is not None else "")
        + f"[{s.axis}]" + (f"×{s.width}" if s.width > 1 else "") for s in group.slices)
    lines = [head, f"      {members}"]
    if group.reason:
        lines.append(f"      why: {group.reason}")
    return lines


def render(groups: GroupSet, *, show_fixed: bool = False) -> str:
    lines = [f"{groups.graph.source}: traced with {groups.graph.frontend}; {groups.graph.summary()}"]
    lines += [f"note: {n}" for n in groups.graph.notes]
    lines.append("")
    for g in groups:
        if g.status == FIXED and not show_fixed:
            continue
        lines += describe_group(g, groups)
    statuses = ("prunable", "opt-in", FIXED, BLOCKED)
    lines += ["", f"{'kind':<13}" + "".join(f"{s:>10}" for s in statuses) + f"{'units':>10}{'prunable params':>18}"]
    for kind in sorted({g.kind for g in groups}):
        members = [g for g in groups if g.kind == kind]
        per_status = "".join(f"{sum(1 for g in members if g.status == s):>10}" for s in statuses)
        units = sum(g.units for g in members if g.status in ("prunable", "opt-in"))
        params = prunable_params(g for g in members if g.status in ("prunable", "opt-in"))
        lines.append(f"{kind:<13}{per_status}{units:>10}{params:>18,}")
    counts = {s: sum(1 for g in groups if g.status == s) for s in ("prunable", "opt-in", FIXED, BLOCKED)}
    lines.append("")
    lines.append("groups: " + ", ".join(f"{n} {s}" for s, n in counts.items())
                 + ("" if show_fixed else "  (fixed groups hidden; --all shows them)"))
    blocked = [g for g in groups if g.status == BLOCKED]
    if blocked or groups.blocked_ops:
        lines.append("")
        lines.append("BLOCKED (an op without a dimension rule touches these; they will not be pruned):")
        for b in groups.blocked_ops:
            lines.append(f"  op {b.source_op} at {b.location}: {b.why}")
        for g in blocked:
            lines.append(f"  group {g.id} {g.kind} {g.scope}: {', '.join(g.members())}")
    else:
        lines.append("blocked groups: none")
    return "\n".join(lines)
