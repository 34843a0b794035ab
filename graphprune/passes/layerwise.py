"""Compensation applied block by block, optionally sequentially (`--sequential`).

For every consumer layer whose input columns lose pruned units (o_proj, down_proj, ...), in block
order and, inside a block, in module order:

1. its input Gram matrix is accumulated over the calibration set (`layerwise.BlockRunner`): from the
   dense model's activations, or with `sequential=True` from the activations of the already pruned
   and compensated blocks (and earlier layers of the same block), so errors do not pile up unseen;
2. in sequential mode the criterion may re-choose *which* units go, keeping the number the allocator
   gave the group (`Criterion.reselect`): OBS re-runs its greedy search, activation criteria re-score;
3. the layer is compensated: least squares (`passes/lsq.refit`) or FLAP's bias (`lsq.bias_only`).

The result maps each consumer module to its new full-width [W | b] (removed columns are zero; the
slicing pass drops them) and reports the reconstruction error before and after compensation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..criteria.base import Criterion, consumer_slices, module_of
from ..graph.groups import Group, ParamSlice
from ..calibration.blocks import BlockRunner, Gram, Replacement
from ..solvers import lsq


@dataclass
class LayerwiseResult:
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> new [W | b] (float64)
    removed: dict[str, np.ndarray] = field(default_factory=dict)  # possibly re-chosen units per group
    relative_error: dict[str, dict[str, float]] = field(default_factory=dict)  # module -> {uncompensated, compensated}


def consumers_by_block(runner: BlockRunner, groups: list[Group]) -> dict[int, list[tuple[str, list[tuple[Group, ParamSlice]]]]]:
    """{block: [(consumer module, [(group, its slice on that module)]), ...] in module order}."""
    order = {name: i for i, name in enumerate(runner.modules)}
    found: dict[int, dict[str, list]] = {}
    for g in groups:
        for s in consumer_slices(g):
            if s.expert is not None:
                continue  # stacked expert weights are not plain linear layers
            module = module_of(s.param)
            for index in range(len(runner)):
                if module.startswith(runner.block_name(index) + "."):
                    found.setdefault(index, {}).setdefault(module, []).append((g, s))
                    break
    return {i: sorted(mods.items(), key=lambda kv: order.get(kv[0], 0)) for i, mods in sorted(found.items())}


def dense_block_runs(runner: BlockRunner, groups: list[Group], desc: str):
    """Run the dense model block by block up to the last block with a consumer of `groups`, with the
    Gram matrices of that block's consumers; yields (block index, its consumers as in
    `consumers_by_block`, the BlockRun, the block's inputs)."""
    plan = consumers_by_block(runner, groups)
    inputs = runner.inputs
    for index in range(max(plan, default=-1) + 1):
        stages = plan.get(index, [])
        run = runner.run_block(index, inputs, gram_modules=tuple(m for m, _ in stages), desc=f"{desc} {index}")
        yield index, stages, run, inputs
        inputs = run.outputs


def removed_columns(members: list[tuple[Group, ParamSlice]], removed: dict[str, np.ndarray]) -> np.ndarray:
    cols = [s.indices[np.asarray(removed.get(g.id, []), dtype=np.int64)].reshape(-1) for g, s in members]
    return np.unique(np.concatenate(cols)) if cols else np.zeros(0, dtype=np.int64)


class LayerwiseCompensation:
    """See the module docstring. `method` is "lsq" or "bias"."""

    def __init__(self, method: str = "lsq", *, sequential: bool = False, damp: float = lsq.DEFAULT_DAMP,
                 criterion: Criterion | None = None) -> None:
        if method not in ("lsq", "bias"):
            raise ValueError(f"unknown layerwise compensation '{method}'")
        self.method = method
        self.sequential = sequential
        self.damp = damp
        self.criterion = criterion

    def run(self, runner: BlockRunner, groups: list[Group], removed: dict[str, np.ndarray],
            params: dict[str, torch.Tensor]) -> LayerwiseResult:
        result = LayerwiseResult(removed=dict(removed))
        if not self.sequential:
            for _, stages, run, _ in dense_block_runs(runner, groups, "block"):
                for module, members in stages:
                    self._compensate(module, members, run.grams[module], params, result)
            return result
        plan = consumers_by_block(runner, groups)
        inputs = runner.inputs
        for index in range(max(plan, default=-1) + 1):  # blocks after the last pruned one need not run
            replacements: dict[str, Replacement] = {}
            for module, members in plan.get(index, []):
                run = runner.run_block(index, inputs, gram_modules=(module,), replacements=replacements,
                                       keep_outputs=False, desc=f"block {index} {module.rsplit('.', 1)[-1]}")
                replacements[module] = self._compensate(module, members, run.grams[module], params, result)
            inputs = runner.run_block(index, inputs, replacements=replacements).outputs
        return result

    def _compensate(self, module: str, members: list[tuple[Group, ParamSlice]], gram: Gram,
                    params: dict[str, torch.Tensor], result: LayerwiseResult) -> Replacement:
        weight = params[f"{module}.weight"]
        w_aug = lsq.augmented_weight(weight, params.get(f"{module}.bias"))
        h = gram.matrix
        if self.sequential and self.criterion is not None:
            dead = np.zeros(0, dtype=np.int64)
            for g, s in members:
                count = len(result.removed.get(g.id, ()))
                chosen = self.criterion.reselect(g, s, w_aug, gram, count, dead) if count else None
                if chosen is not None:
                    result.removed[g.id] = np.sort(np.asarray(chosen, dtype=np.int64))
                dead = np.union1d(dead, removed_columns([(g, s)], result.removed))
        cols = removed_columns(members, result.removed)
        if cols.size == 0:
            # nothing of this layer's input goes: it stays as it is (no refit, no bias it never had)
            return Replacement(weight, params.get(f"{module}.bias"))
        if self.method == "lsq":
            new = lsq.refit(w_aug, h, cols, self.damp)
        else:
            new = lsq.bias_only(w_aug, h, cols)
        dropped = w_aug.clone()
        dropped[:, torch.as_tensor(cols, dtype=torch.long)] = 0
        energy = max(float(torch.einsum("oi,ij,oj->", w_aug, h, w_aug)), 1e-30)
        result.relative_error[module] = {
            "uncompensated": lsq.reconstruction_error(w_aug, dropped, h) / energy,
            "compensated": lsq.reconstruction_error(w_aug, new, h) / energy,
        }
        result.weights[module] = new
        return Replacement(new[:, :-1].to(weight.dtype), new[:, -1].to(weight.dtype))
