from __future__ import annotations

import numpy as np
import torch

from ..errors import PruningError
from ..graph.groups import Group
from .base import Pass, PassError, PassResult, RewriteState


class SliceParameters(Pass[RewriteState]):
    """Remove the chosen units from every parameter slice of their groups.

    Works on a state dict, so it is the same for any module type: the model is rebuilt from the
    rewritten config afterwards (that rebuilt model is exactly what reloads from disk). Indices
    of all groups refer to the original axes, so a parameter cut by two groups (q_proj rows by
    its kv-groups and by its heads) is cut once by the union. A slice inside one expert of stacked
    weights ([E, ...]) cuts that expert only; every expert of the tensor must keep the same width.
    """

    name = "slice"

    def call(self, rewrite: RewriteState) -> PassResult[RewriteState]:
        """`rewrite.release(name)`, when set, is called once a parameter's original tensor is no
        longer needed, so the caller can free it: peak memory stays near one model instead of two."""
        state, release = rewrite.tensors, rewrite.release
        drop, per_expert = removed_indices(rewrite.groups, rewrite.removed)
        names_of = _alias_table(state, rewrite.aliases or {})
        out = dict(state)
        kept: dict[tuple[str, int], np.ndarray] = {}
        # Inside experts first: those indices count experts in the original numbering, which a cut
        # along the expert axis itself (below) would change.
        for (param, axis, expert_axis), gone_by_expert in per_expert.items():
            names = names_of.get(param, [param])
            tensor = out[names[0]]
            parts = [_keep_in_expert(tensor, axis, expert_axis, e, gone_by_expert.get(e, set()))
                     for e in range(tensor.shape[expert_axis])]
            if len({p.shape for p in parts}) != 1:
                widths = sorted({p.shape[axis - int(axis > expert_axis)] for p in parts})
                raise PruningError(f"{param}: experts of one stacked tensor must keep the same number of indices "
                                   f"along axis {axis}, got {widths}")
            self._store(out, state, names, torch.stack(parts, expert_axis).contiguous(), release)
        for (param, axis), gone in drop.items():
            names = names_of.get(param, [param])
            tensor = out[names[0]]
            keep = np.array(sorted(set(range(tensor.shape[axis])) - gone), dtype=np.int64)
            kept[(param, axis)] = keep
            sliced = tensor.index_select(axis, torch.as_tensor(keep)).contiguous()
            self._store(out, state, names, sliced, release)
            del tensor
        # a parameter cut along two axes: index_select above used the updated tensor, which is
        # right because each (param, axis) pair is cut exactly once
        rewrite.tensors, rewrite.kept = out, kept
        return PassResult(rewrite, bool(drop or per_expert))

    def ensures(self, rewrite: RewriteState) -> None:
        for (param, axis), keep in rewrite.kept.items():
            if param in rewrite.tensors and rewrite.tensors[param].shape[axis] != len(keep):
                raise PassError(f"{param} axis {axis} has {rewrite.tensors[param].shape[axis]} indices after "
                                f"slicing, expected {len(keep)}")

    @staticmethod
    def _store(out, state, names, sliced, release) -> None:
        for name in names:
            out[name] = sliced
            if release is not None:
                state[name] = sliced
                release(name)


def _keep_in_expert(tensor: torch.Tensor, axis: int, expert_axis: int, expert: int, gone: set[int]) -> torch.Tensor:
    part = tensor.select(expert_axis, expert)
    local = axis - int(axis > expert_axis)
    keep = [i for i in range(part.shape[local]) if i not in gone]
    return part.index_select(local, torch.as_tensor(keep, dtype=torch.long))


def removed_indices(groups: list[Group], removed: dict[str, np.ndarray]):
    """The indices the removed units of all groups take out, in the original numbering:
    (parameter, axis) -> indices for whole-tensor cuts (a parameter cut by two groups gets the
    union), and (parameter, axis, expert axis) -> expert -> indices for cuts inside one expert of
    stacked weights."""
    drop: dict[tuple[str, int], set[int]] = {}
    per_expert: dict[tuple[str, int, int], dict[int, set[int]]] = {}
    for g in groups:
        units = removed.get(g.id)
        if units is None or len(units) == 0:
            continue
        for s in g.slices:
            gone = s.indices[units].reshape(-1).tolist()
            if s.expert is None:
                drop.setdefault((s.param, s.axis), set()).update(gone)
            else:
                per_expert.setdefault((s.param, s.axis, s.expert_axis), {}).setdefault(s.expert, set()).update(gone)
    return drop, per_expert


def _alias_table(state: dict[str, torch.Tensor], aliases: dict[str, list[str]]) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for first, others in aliases.items():
        names = [n for n in [first, *others] if n in state]
        for n in names:
            table[n] = names
    return table
