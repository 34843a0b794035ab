"""Which groups a target names (`--target channels,heads`, `query-heads`, `experts`, ...)."""

from __future__ import annotations

from ..errors import PruningError, UserError
from ..graph.groups import OPT_IN, PRUNABLE, Group
from .options import TARGETS


def select_groups(groups, target: str, inside_experts: bool = True) -> list[Group]:
    """The prunable groups of the target's kinds. Channels inside routed experts (one group per
    expert of stacked weights, `graphprune.moe.channels`) are "channels" unless `inside_experts`
    is False (for callers whose rewrite cannot keep the experts' widths equal)."""
    kinds: set[str] = set()
    parts = [t.strip() for t in target.split(",") if t.strip()]
    for part in parts:
        if part not in TARGETS:
            raise UserError(f"unknown --target '{part}' (choose from {', '.join(TARGETS)})")
        kinds.update(TARGETS[part])
    # "expert-channels": the channels inside routed experts only (attention, shared experts and
    # dense FFNs untouched)
    only_inside_experts = "expert-channels" in parts and "channels" not in parts

    def wanted(g: Group) -> bool:
        if g.kind == "channel" and only_inside_experts:
            return any(s.expert is not None for s in g.slices)
        if g.kind in kinds:
            return True
        # "heads" removes whole KV groups under GQA; with plain multi-head attention (no KV group
        # above the heads) it removes heads.
        return "kv-group" in kinds and g.kind == "head" and g.parent is None

    chosen = [g for g in groups if wanted(g) and g.status in (PRUNABLE, OPT_IN)]
    if not inside_experts:
        chosen = [g for g in chosen if not any(s.expert is not None for s in g.slices)]
    if not chosen:
        blocked = [g for g in groups if g.kind in kinds]
        if blocked:
            # An op without a rule is what the user can act on: name it before structural reasons.
            reasons = "; ".join(sorted({(g.reason or g.status) for g in blocked},
                                       key=lambda r: (not r.startswith("blocked by"), r))[:2])
            raise PruningError(f"no prunable {target} groups: {reasons}")
        raise PruningError(f"the model has no {target} groups to prune")
    return chosen
