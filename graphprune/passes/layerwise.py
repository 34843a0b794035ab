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

from ..criteria.base import Criterion, Need, consumer_slices, module_of
from ..errors import PruningError
from ..graph.groups import Group, ParamSlice
from ..calibration.blocks import BlockRunner, Gram, Replacement
from ..solvers import lsq


@dataclass
class LayerwiseResult:
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> new [W | b] (float64)
    removed: dict[str, np.ndarray] = field(default_factory=dict)  # possibly re-chosen units per group
    relative_error: dict[str, dict[str, float]] = field(default_factory=dict)  # module -> {uncompensated, compensated}

    def report(self, *, method: str, sequential: bool, damp: float) -> dict:
        """The run report's `layerwise` section (every backend writes the same one)."""
        errors = list(self.relative_error.values())

        def mean(key: str) -> float:
            return float(np.mean([e[key] for e in errors])) if errors else 0.0

        return {"method": method, "sequential": sequential, "damp": damp, "layers": len(errors),
                "mean_relative_error_uncompensated": mean("uncompensated"),
                "mean_relative_error_compensated": mean("compensated")}


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

    @staticmethod
    def check(plan) -> None:
        """Refuse consumers this pass cannot refit: it reads their weights as [out, in], and GPT-2's
        Conv1D stores [in, out]."""
        transposed = sorted({s.param for g in plan.chosen for s in consumer_slices(g)
                             if s.expert is None and s.axis != plan.model.get_parameter(s.param).dim() - 1})
        if transposed:
            stage = plan.stage
            asked = [what for what, on in (("--compensate lsq", stage.compensate == "lsq"),
                                           ("--sequential", stage.sequential),
                                           (f"criterion '{stage.criterion}'", Need.GRAMS in stage.scorer.needs)) if on]
            raise PruningError(f"{' and '.join(asked)} cannot handle weights stored as [in, out] yet (e.g. "
                               f"{transposed[0]}, a Conv1D): use --compensate bias or none, without --sequential")

    def run(self, runner: BlockRunner, groups: list[Group], removed: dict[str, np.ndarray],
            params: dict[str, torch.Tensor]) -> LayerwiseResult:
        result = LayerwiseResult(removed=dict(removed))
        for _ in self.blocks(runner, groups, result, params):
            pass
        return result

    def blocks(self, runner, groups: list[Group], result: LayerwiseResult, params):
        """Compensate block by block, yielding each block index once its consumers are done (their new
        [W | b] in `result.weights`, their units in `result.removed`): a caller may write a block out
        and drop its weights before the next is computed (the streaming backend does). Blocks after the
        last pruned one are not run."""
        plan = consumers_by_block(runner, groups)
        if not self.sequential:
            for index, stages, run, _ in dense_block_runs(runner, groups, "block"):
                for module, members in stages:
                    self._compensate(module, members, run.grams[module], params, result)
                yield index
            return
        inputs = runner.inputs
        last = max(plan, default=-1)
        for index in range(last + 1):
            replacements: dict[str, Replacement] = {}
            stages = plan.get(index, [])
            for k, (module, members) in enumerate(stages):
                final = k == len(stages) - 1
                # an inner consumer needs only its own input: the block stops there; the last one's run
                # also gives the block's outputs, corrected below for its new weights
                run = runner.run_block(index, inputs, gram_modules=(module,), replacements=replacements,
                                       keep_outputs=final and index < last, stop_after=None if final else module,
                                       capture_inputs=(module,) if final and index < last else (),
                                       desc=f"block {index} {module.rsplit('.', 1)[-1]}")
                replacements[module] = self._compensate(module, members, run.grams[module], params, result)
                if final and index < last:
                    inputs = corrected_outputs(runner, index, inputs, run, module, params, replacements)
            if not stages and index < last:
                inputs = runner.run_block(index, inputs).outputs
            yield index

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


def corrected_outputs(runner, index: int, inputs: list[torch.Tensor], run, module: str, params,
                      replacements: dict[str, Replacement]) -> list[torch.Tensor]:
    """The block's outputs with `module` given its new weights, from the outputs of the run that used
    its old ones: y + (W' - W) x + (b' - b), where x is the module's captured input. Exact when the
    block's output is linear in that module's output (a residual add right after it, as in Llama);
    checked on the first batch against a real run, and a block that is not (a norm after its FFN,
    as in Gemma) is run again with the new weights."""
    rep = replacements[module]
    weight = params[f"{module}.weight"]
    bias = params.get(f"{module}.bias")
    delta_w = rep.weight.to("cpu", torch.float64) - weight.detach().to("cpu", torch.float64)
    delta_b = (rep.bias.to("cpu", torch.float64) if rep.bias is not None else 0.0) - \
        (bias.detach().to("cpu", torch.float64) if bias is not None else 0.0)
    corrected = []
    if isinstance(delta_b, torch.Tensor):
        delta_b = delta_b.to(run.outputs[0].device)
    delta_w = delta_w.to(run.outputs[0].device)
    for y, x in zip(run.outputs, run.captured[module]):
        change = x.to(torch.float64) @ delta_w.T + delta_b
        corrected.append((y.to(torch.float64) + change.reshape(y.shape)).to(y.dtype))
    check = runner.run_block(index, inputs[:1], replacements=replacements).outputs[0]
    scale = float(check.abs().max()) or 1.0
    if float((check - corrected[0]).abs().max()) > 1e-4 * scale:
        return runner.run_block(index, inputs, replacements=replacements).outputs
    return corrected
