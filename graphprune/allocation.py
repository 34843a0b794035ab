"""Allocators: from unit scores to the units each group loses.

``--sparsity`` is the fraction of decoder-layer parameters removed (embeddings and the LM head
excluded). Every allocator returns ``{group id: sorted array of removed unit indices}`` and never
removes the last `floor` units of a group.

Allocators are registered by name (`@register`, or the ``graphprune.allocations`` entry-point
group) with what they need computed besides the criterion's scores (`criteria.base.Need`: cfsp
reads the block angles).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from .plugins import load_entry_points

import numpy as np

from .criteria.base import Need
from .errors import PruningError, UserError
from .graph.groups import Group


@dataclass(frozen=True)
class Allocator:
    name: str
    needs: Need
    run: Callable  # (groups, scores, comparable, target, floor, round_to, block_importance) -> Allocation
    summary: str


_REGISTRY: dict[str, Allocator] = {}


def register(name: str, *, needs: Need = Need.NONE, summary: str = ""):
    """Decorator: register an allocator function under `name`."""
    def add(run: Callable) -> Callable:
        _REGISTRY[name] = Allocator(name, needs, run, summary or (run.__doc__ or "").strip().splitlines()[0])
        return run
    return add


def _add_plugin(name: str, loaded: Allocator | Callable) -> None:
    """A plugin gives an `Allocator`, or a function with the built-ins' signature (registered as the
    decorator registers them)."""
    if isinstance(loaded, Allocator):
        _REGISTRY[name] = loaded
    elif callable(loaded):
        register(name)(loaded)
    else:
        raise TypeError(f"expected an Allocator or a function, got {type(loaded).__name__}")


def _load_entry_points() -> None:
    load_entry_points("graphprune.allocations", "allocation", _REGISTRY, _add_plugin)


def available() -> list[str]:
    _load_entry_points()
    return list(_REGISTRY)


def get(name: str) -> Allocator:
    names = available()
    if name not in _REGISTRY:
        raise UserError(f"unknown --allocation '{name}' (choose from {', '.join(names)})")
    return _REGISTRY[name]


@dataclass
class Allocation:
    removed: dict[str, np.ndarray]
    floored: list[str] = field(default_factory=list)  # groups that hit the floor
    notes: list[str] = field(default_factory=list)


def lowest(scores: np.ndarray, count: int) -> np.ndarray:
    # Stable order: ties are broken by unit index, so runs are deterministic.
    order = np.lexsort((np.arange(len(scores)), scores))
    return np.sort(order[:count])


def _keep_rounded(units: int, remove: int, floor: int, round_to: int) -> int:
    """Number removed after keeping at least `floor` units and a multiple of `round_to` kept."""
    remove = max(0, min(remove, units - floor))
    if round_to > 1:
        keep = units - remove
        keep = min(units, int(np.ceil(keep / round_to) * round_to))
        remove = units - keep
    return remove


def _standardise(values: np.ndarray) -> np.ndarray:
    std = values.std()
    return (values - values.mean()) / (std if std > 0 else 1.0)


def _standardise_per_kind(groups: list[Group], scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """z-score each kind's units over all layers together: raw scores of one kind are comparable
    across layers (same formula, same scale), different kinds are put on one scale."""
    out: dict[str, np.ndarray] = {}
    for kind in sorted({g.kind for g in groups}):
        members = [g for g in groups if g.kind == kind]
        flat = _standardise(np.concatenate([np.asarray(scores[g.id], dtype=np.float64) for g in members]))
        offset = 0
        for g in members:
            out[g.id] = flat[offset:offset + g.units]
            offset += g.units
    return out


def allocate(groups: list[Group], scores: dict[str, np.ndarray], *, method: str, sparsity: float,
             total_params: int, floor: int = 1, round_to: int = 1,
             block_importance: dict[int, float] | None = None,
             comparable: dict[str, np.ndarray] | None = None) -> Allocation:
    """Decide which units to remove so that `sparsity` × `total_params` parameters go."""
    allocator = get(method)
    target = sparsity * total_params
    prunable = sum(g.units * g.params_per_unit for g in groups)
    if prunable <= 0:
        raise PruningError("no prunable groups were selected")
    if target > prunable - sum(min(floor, g.units) * g.params_per_unit for g in groups):
        raise PruningError(f"sparsity {sparsity} needs {target:,.0f} parameters removed but the selected groups "
                           f"hold only {prunable:,} (keeping {floor} unit(s) per group): lower --sparsity or "
                           f"widen --target")
    return allocator.run(groups, scores, comparable, target, floor, round_to, block_importance)


@register("uniform")
def _uniform(groups, scores, comparable, target, floor, round_to, block_importance) -> Allocation:
    """Same fraction in every layer and kind; the coarse kinds (heads) are rounded first and the
    fine-grained channels absorb the rounding so the total lands on the target."""
    alloc = Allocation({})
    total = sum(g.units * g.params_per_unit for g in groups)
    fraction = target / total
    coarse = [g for g in groups if g.units < 64]
    fine = [g for g in groups if g.units >= 64]
    removed = 0.0
    for g in coarse:
        # Rounded down, as FLAP's uniform baselines do (int(ratio * heads)): a third of the attention
        # for 20% is far too much; the channels absorb the difference.
        n = _keep_rounded(g.units, int(fraction * g.units + 1e-9), floor, round_to if g.kind == "channel" else 1)
        alloc.removed[g.id] = lowest(scores[g.id], n)
        removed += n * g.params_per_unit
    if fine:
        fine_params = sum(g.units * g.params_per_unit for g in fine)
        fine_fraction = min(max((target - removed) / fine_params, 0.0), 1.0)
        for g in fine:
            want = int(round(fine_fraction * g.units))
            n = _keep_rounded(g.units, want, floor, round_to)
            if n < want:
                alloc.floored.append(g.id)
            alloc.removed[g.id] = lowest(scores[g.id], n)
    return alloc


@register("global")
def _global(groups, scores, comparable, target, floor, round_to, block_importance) -> Allocation:
    """FLAP's AL-AM: standardised scores (per layer, from the criterion) of every unit of every
    kind ranked together, lowest first, each weighted by its parameter cost, until the target is
    removed."""
    if comparable is None:
        comparable = _standardise_per_kind(groups, scores)
    alloc = Allocation({})
    items = []  # (comparable score, cost, group id, unit)
    for g in groups:
        z = np.asarray(comparable[g.id], dtype=np.float64)
        for u in range(g.units):
            items.append((z[u], g.params_per_unit, g.id, u))
    items.sort(key=lambda t: (t[0], t[2], t[3]))
    removed_count = {g.id: 0 for g in groups}
    units = {g.id: g.units for g in groups}
    chosen: dict[str, list[int]] = {g.id: [] for g in groups}
    removed = 0.0
    for z, cost, gid, u in items:
        if removed >= target:
            break
        if removed + cost - target > target - removed:
            continue  # would overshoot more than it closes: let cheaper units fill the gap
        if units[gid] - removed_count[gid] <= floor:
            if gid not in alloc.floored:
                alloc.floored.append(gid)
            continue
        chosen[gid].append(u)
        removed_count[gid] += 1
        removed += cost
    by_id = {g.id: g for g in groups}
    for gid, picked in chosen.items():
        g = by_id[gid]
        n = _keep_rounded(g.units, len(picked), floor, round_to if g.kind == "channel" else 1)
        # rounding can only keep more: drop the highest-scoring of the picked units first
        picked = sorted(picked, key=lambda u: scores[gid][u])[:n]
        alloc.removed[gid] = np.array(sorted(picked), dtype=np.int64)
    return alloc


@register("cfsp", needs=Need.BLOCK_ANGLES)
def _by_block(groups, scores, comparable, target, floor, round_to, importance) -> Allocation:
    """CFSP's coarse step: a block that changes its input less (small angle) is pruned harder.
    Block b gets fraction f_b ∝ 1/angle_b, scaled so the total matches the target."""
    if not importance:
        raise PruningError("the cfsp allocation needs block angles from calibration (criterion cfsp)")
    alloc = Allocation({})
    layers = sorted({g.layer for g in groups if g.layer is not None})
    inv = {l: 1.0 / max(importance.get(l, np.mean(list(importance.values()))), 1e-12) for l in layers}
    mean_inv = float(np.mean(list(inv.values())))
    weight = {l: inv[l] / mean_inv for l in layers}
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisect the base fraction so the removed parameters hit the target
        mid = (lo + hi) / 2
        total = 0
        for g in groups:
            f = min(0.95, mid * weight.get(g.layer, 1.0))
            total += _keep_rounded(g.units, int(round(f * g.units)), floor, round_to) * g.params_per_unit
        lo, hi = (mid, hi) if total < target else (lo, mid)
    for g in groups:
        f = min(0.95, hi * weight.get(g.layer, 1.0))
        n = _keep_rounded(g.units, int(round(f * g.units)), floor, round_to)
        alloc.removed[g.id] = lowest(scores[g.id], n)
    alloc.notes.append("block fractions: " + ", ".join(f"{l}:{min(0.95, hi * weight[l]):.2f}" for l in layers))
    return alloc
