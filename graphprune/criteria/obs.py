from __future__ import annotations

import numpy as np
import torch

from ..passes import lsq
from . import register
from .base import Criterion, MissingStatistics


@register
class StructuredOBS(Criterion):
    """Structured Optimal Brain Surgeon (ZipLM, Kurtić et al. 2023; SlimGPT, Ling et al. 2024).

    Each unit of a group owns a block C of input columns of its consumer layer (an FFN channel one
    column of down_proj, a head `head_dim` columns of o_proj). With H = E[x̃ x̃ᵀ] of that layer's
    input on calibration data (x̃ = (x, 1)), removing C and optimally updating the other columns and
    the bias costs
        ε(C) = tr(W[:, C] · (H⁻¹[C, C])⁻¹ · W[:, C]ᵀ).
    Units are removed greedily by smallest ε, H⁻¹ and W updated after each removal
    (`passes/lsq.obs_greedy`), so the choice accounts for the compensation that follows (least
    squares, which is what the OBS updates amount to).

    Score of a unit = its position in the greedy removal order (removed first = lowest). For the
    global allocation a unit's comparable score is the reconstruction error its removal added,
    per parameter it frees, relative to the mean squared norm of the hidden state entering its
    block (``scale="residual"``, the default: an error in the residual stream matters relative to
    what the stream carries; ``"output"`` divides by the layer's own output energy, ``"none"``
    keeps absolute errors), made non-decreasing along the greedy order so a group's units are
    always taken in that order. Options: ``damp`` (fraction of mean diag H added, 0.01), ``steps``
    (greedy snapshots per group, 64).
    """

    name = "obs"
    needs = frozenset({"gram"})

    def score(self, group, ctx):
        raise MissingStatistics(group)  # scored block by block in `score_blocks`

    def score_blocks(self, runner, groups, params, *, floor: int = 1):
        """Run the calibration set block by block (dense activations); returns (scores, comparable)."""
        from ..passes.layerwise import consumers_by_block

        damp = float(self.options.get("damp", lsq.DEFAULT_DAMP))
        steps = int(self.options.get("steps", 64))
        scale_kind = str(self.options.get("scale", "residual"))
        scores: dict[str, np.ndarray] = {}
        comparable: dict[str, np.ndarray] = {}
        plan = consumers_by_block(runner, groups)
        inputs = runner.inputs
        for index in range(max(plan, default=-1) + 1):
            stages = plan.get(index, [])
            run = runner.run_block(index, inputs, gram_modules=tuple(m for m, _ in stages),
                                   desc=f"obs block {index}")
            residual = float(sum((x.double() ** 2).sum() for x in inputs) / sum(x[..., 0].numel() for x in inputs))
            for module, members in stages:
                gram = run.grams[module].matrix
                w_aug = lsq.augmented_weight(params[f"{module}.weight"], params.get(f"{module}.bias"))
                if scale_kind == "output":
                    scale = float(torch.einsum("oi,ij,oj->", w_aug, gram, w_aug))
                elif scale_kind == "none":
                    scale = 1.0
                else:
                    scale = residual
                for g, s in members:
                    count = max(0, g.units - floor)
                    path = lsq.obs_greedy(w_aug, gram, s.indices, count, damp=damp, steps=steps)
                    position = np.full(g.units, float(count))
                    position[path.order] = np.arange(len(path.order), dtype=np.float64)
                    per_param = np.maximum.accumulate(np.asarray(path.step_error) / max(scale, 1e-30)
                                                      / max(g.params_per_unit, 1)) if count else np.zeros(0)
                    # strictly increasing, so ties never reorder a group's units in the global ranking
                    per_param = per_param + np.arange(count) * 1e-9 * (float(per_param.max()) if count else 0.0)
                    ceiling = (per_param.max() if count else 0.0) * 2 + 1.0  # floor units: never first
                    comp = np.full(g.units, ceiling)
                    comp[path.order] = per_param
                    scores[g.id] = position
                    comparable[g.id] = comp
            inputs = run.outputs
        missing = [g for g in groups if g.id not in scores]
        if missing:
            raise MissingStatistics(missing[0])
        return scores, comparable

    def reselect(self, group, consumer, weight_aug, gram, count, dead_columns):
        path = lsq.obs_greedy(weight_aug, gram.matrix, consumer.indices, count,
                              damp=float(self.options.get("damp", lsq.DEFAULT_DAMP)),
                              steps=int(self.options.get("steps", 64)), dead_columns=dead_columns)
        return np.asarray(path.order, dtype=np.int64)
