from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..calibrate import read_cache_entry, write_cache_tensors
from ..errors import UserError
from ..passes import lsq
from . import register
from .base import Criterion, MissingStatistics

SCALES = ("residual", "output", "none")


@dataclass
class GroupPath:
    """One group's greedy OBS removal: units in removal order, the error each removal added, and
    the energies a global ranking may divide that error by."""

    order: np.ndarray
    step_error: np.ndarray
    scale: dict[str, float]


def save_paths(key: str, paths: dict[str, GroupPath]) -> None:
    tensors = {}
    for gid, p in paths.items():
        tensors[f"order/{gid}"] = torch.as_tensor(p.order, dtype=torch.int64)
        tensors[f"error/{gid}"] = torch.as_tensor(p.step_error, dtype=torch.float64)
        tensors[f"scale/{gid}"] = torch.tensor([p.scale[k] for k in SCALES[:2]], dtype=torch.float64)
    write_cache_tensors(key, tensors)


def load_paths(key: str, groups) -> dict[str, GroupPath] | None:
    tensors = read_cache_entry(key)
    if tensors is None or any(f"order/{g.id}" not in tensors for g in groups):
        return None
    return {g.id: GroupPath(tensors[f"order/{g.id}"].numpy(), tensors[f"error/{g.id}"].numpy(),
                            dict(zip(SCALES[:2], tensors[f"scale/{g.id}"].tolist()))) for g in groups}


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

    The greedy path runs every group down to its floor whatever the sparsity, so it is cached
    (safetensors, keyed by model, calibration and options): pruning again at another sparsity or
    with another ``scale`` skips the search.
    """

    name = "obs"
    needs = frozenset({"gram"})

    def __init__(self, **options) -> None:
        super().__init__(**options)
        scale = str(self.options.get("scale", "residual"))
        if scale not in SCALES:  # checked here, before any calibration runs
            raise UserError(f"obs option scale={scale!r}: choose one of {', '.join(SCALES)}")

    def score(self, group, ctx):
        raise MissingStatistics(group)  # scored block by block in `score_blocks`

    def score_blocks(self, runner, groups, params, *, floor: int = 1, cache_key: str | None = None):
        """Scores from the greedy OBS paths (computed block by block, or read from the cache);
        returns (scores, comparable)."""
        scale_kind = str(self.options.get("scale", "residual"))
        paths = load_paths(cache_key, groups) if cache_key else None
        if paths is None:
            paths = self.paths(runner, groups, params, floor=floor)
            if cache_key:
                save_paths(cache_key, paths)
        scores: dict[str, np.ndarray] = {}
        comparable: dict[str, np.ndarray] = {}
        for g in groups:
            if g.id not in paths:
                raise MissingStatistics(g)
            path = paths[g.id]
            count = len(path.order)
            position = np.full(g.units, float(count))
            position[path.order] = np.arange(count, dtype=np.float64)
            scale = 1.0 if scale_kind == "none" else path.scale[scale_kind]
            per_param = (np.maximum.accumulate(path.step_error / max(scale, 1e-30) / max(g.params_per_unit, 1))
                         if count else np.zeros(0))
            # strictly increasing, so ties never reorder a group's units in the global ranking
            per_param = per_param + np.arange(count) * 1e-9 * (float(per_param.max()) if count else 0.0)
            ceiling = (per_param.max() if count else 0.0) * 2 + 1.0  # floor units: never first
            comp = np.full(g.units, ceiling)
            comp[path.order] = per_param
            scores[g.id] = position
            comparable[g.id] = comp
        return scores, comparable

    def paths(self, runner, groups, params, *, floor: int = 1) -> dict[str, GroupPath]:
        """Run the calibration set block by block (dense activations) and remove each group's units
        greedily down to `floor`: the removal order does not depend on the sparsity, so one run
        serves every sparsity (and is cached)."""
        from ..passes.layerwise import dense_block_runs

        damp = float(self.options.get("damp", lsq.DEFAULT_DAMP))
        steps = int(self.options.get("steps", 64))
        found: dict[str, GroupPath] = {}
        for _, stages, run, inputs in dense_block_runs(runner, groups, "obs block"):
            residual = float(sum((x.double() ** 2).sum() for x in inputs) / sum(x[..., 0].numel() for x in inputs))
            for module, members in stages:
                gram = run.grams[module].matrix
                w_aug = lsq.augmented_weight(params[f"{module}.weight"], params.get(f"{module}.bias"))
                output = float(torch.einsum("oi,ij,oj->", w_aug, gram, w_aug))
                for g, s in members:
                    count = max(0, g.units - floor)
                    path = lsq.obs_greedy(w_aug, gram, s.indices, count, damp=damp, steps=steps)
                    found[g.id] = GroupPath(np.asarray(path.order, dtype=np.int64),
                                            np.asarray(path.step_error, dtype=np.float64),
                                            {"residual": residual, "output": output})
        return found

    def reselect(self, group, consumer, weight_aug, gram, count, dead_columns):
        path = lsq.obs_greedy(weight_aug, gram.matrix, consumer.indices, count,
                              damp=float(self.options.get("damp", lsq.DEFAULT_DAMP)),
                              steps=int(self.options.get("steps", 64)), dead_columns=dead_columns)
        return np.asarray(path.order, dtype=np.int64)
