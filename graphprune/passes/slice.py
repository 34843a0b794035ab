from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..graph.groups import Group


@dataclass
class SliceResult:
    state: dict[str, torch.Tensor]
    kept: dict[tuple[str, int], np.ndarray]  # (param, axis) -> kept indices (original numbering)


class SliceParameters:
    """Remove the chosen units from every parameter slice of their groups.

    Works on a state dict, so it is the same for any module type: the model is rebuilt from the
    rewritten config afterwards (that rebuilt model is exactly what reloads from disk). Indices
    of all groups refer to the original axes, so a parameter cut by two groups (q_proj rows by
    its kv-groups and by its heads) is cut once by the union.
    """

    def run(self, state: dict[str, torch.Tensor], groups: list[Group], removed: dict[str, np.ndarray],
            aliases: dict[str, list[str]] | None = None, release=None) -> SliceResult:
        """`release(name)`, when given, is called once a parameter's original tensor is no longer
        needed, so the caller can free it: peak memory stays near one model instead of two."""
        drop = removed_indices(groups, removed)
        names_of = _alias_table(state, aliases or {})
        out = dict(state)
        kept: dict[tuple[str, int], np.ndarray] = {}
        for (param, axis), gone in drop.items():
            names = names_of.get(param, [param])
            tensor = out[names[0]]
            keep = np.array(sorted(set(range(tensor.shape[axis])) - gone), dtype=np.int64)
            kept[(param, axis)] = keep
            sliced = tensor.index_select(axis, torch.as_tensor(keep)).contiguous()
            for name in names:
                out[name] = sliced
                if release is not None:
                    state[name] = sliced
                    release(name)
            del tensor
        # a parameter cut along two axes: index_select above used the updated tensor, which is
        # right because each (param, axis) pair is cut exactly once
        return SliceResult(out, kept)


def removed_indices(groups: list[Group], removed: dict[str, np.ndarray]) -> dict[tuple[str, int], set[int]]:
    """(parameter, axis) -> the indices the removed units of all groups take out of it (original
    numbering; a parameter cut by two groups gets the union)."""
    drop: dict[tuple[str, int], set[int]] = {}
    for g in groups:
        units = removed.get(g.id)
        if units is None or len(units) == 0:
            continue
        for s in g.slices:
            drop.setdefault((s.param, s.axis), set()).update(s.indices[units].reshape(-1).tolist())
    return drop


def _alias_table(state: dict[str, torch.Tensor], aliases: dict[str, list[str]]) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for first, others in aliases.items():
        names = [n for n in [first, *others] if n in state]
        for n in names:
            table[n] = names
    return table
