from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..calibration.cache import discard, read_cache_entry, write_cache_tensors
from ..errors import UserError
from ..solvers import lsq
from . import register
from .base import Criterion, Form, MissingStatistics, Need, module_of

SCALES = ("fisher", "residual", "output", "none")
# Measured on SmolLM2-135M (docs/benchmarks.md): the loss-Fisher weighting is the best global ranking at 20%
# (28.8 PPL; residual 29.7) and at 50% (114; residual 388), so it is the default wherever the model
# computes an LM loss; models without one (encoders) fall back to the residual energy.
DEFAULT_SCALE = "fisher"
FALLBACK_SCALE = "residual"
DEFAULT_FISHER_WINDOWS = 32
_ENERGIES = ("residual", "output")  # what the unweighted scales divide by, kept per group


@dataclass
class GroupPath:
    """One group's greedy OBS removal: units in removal order, the error each removal added, and
    the energies a global ranking may divide that error by."""

    order: np.ndarray
    step_error: np.ndarray
    scale: dict[str, float]


def save_paths(key: str, paths: dict[str, GroupPath], row_weights: dict[str, torch.Tensor]) -> None:
    tensors = {f"rows/{module}": w for module, w in row_weights.items()}
    for gid, p in paths.items():
        tensors[f"order/{gid}"] = torch.as_tensor(p.order, dtype=torch.int64)
        tensors[f"error/{gid}"] = torch.as_tensor(p.step_error, dtype=torch.float64)
        tensors[f"scale/{gid}"] = torch.tensor([p.scale[k] for k in _ENERGIES], dtype=torch.float64)
    write_cache_tensors(key, tensors)


def load_paths(key: str, groups) -> tuple[dict[str, GroupPath], dict[str, torch.Tensor]] | None:
    """The paths stored under `key`; None when absent or damaged (a damaged or malformed entry is
    discarded with a one-line warning and recomputed)."""
    tensors = read_cache_entry(key)
    if tensors is None:
        return None
    try:
        paths = {}
        for g in groups:
            if not any(f"{part}/{g.id}" in tensors for part in ("order", "error", "scale")):
                continue  # no path was found for it when computed either (`score_blocks` says so)
            order, error, scale = (tensors[f"{part}/{g.id}"] for part in ("order", "error", "scale"))
            if order.dim() != 1 or error.shape != order.shape or order.numel() > g.units \
                    or scale.shape != (len(_ENERGIES),) or (order.numel() and not 0 <= int(order.min()) <= int(
                        order.max()) < g.units):
                raise ValueError(f"the path of {g.id} has shapes {tuple(order.shape)}, {tuple(error.shape)}, "
                                 f"{tuple(scale.shape)} for {g.units} units")
            paths[g.id] = GroupPath(order.numpy(), error.numpy(), dict(zip(_ENERGIES, scale.tolist())))
    except KeyError as missing:
        discard(key, f"no tensor {missing}")
        return None
    except (ValueError, RuntimeError) as error:
        discard(key, str(error))
        return None
    return paths, {k[5:]: v for k, v in tensors.items() if k.startswith("rows/")}


@register
class StructuredOBS(Criterion):
    """Structured OBS: greedy removal by the loss increase left after a least-squares update.

    Structured Optimal Brain Surgeon as in ZipLM (Kurtić et al. 2023) and SlimGPT (Ling et al.
    2024), optionally with the layer errors weighted by the loss's output Fisher (Kwon et al. 2022).

    Each unit of a group owns a block C of input columns of its consumer layer (an FFN channel one
    column of down_proj, a head `head_dim` columns of o_proj). With H = E[x̃ x̃ᵀ] of that layer's
    input on calibration data (x̃ = (x, 1)), removing C and optimally updating the other columns and
    the bias costs
        ε(C) = Σ_o f_o · (W[:, C] · (H⁻¹[C, C])⁻¹ · W[:, C]ᵀ)_oo
    where f_o = E[(∂ℓ/∂y_o)²] is the diagonal Fisher of the token loss with respect to output o
    (``scale="fisher"``, the default for causal LMs), so ε is the second-order estimate of the loss
    increase: one unit for every layer. The least-squares update is the same for every row
    weighting (rows are fitted independently), so weighting only changes which units go and how
    they compare. Units are removed greedily by smallest ε, H⁻¹ and W updated after each removal
    (`passes/lsq.obs_greedy`), so the choice accounts for the compensation that follows.

    Score of a unit = its position in the greedy removal order (removed first = lowest). For the
    global allocation a unit's comparable score is the error its removal added per parameter it
    frees, made non-decreasing along the greedy order so a group's units are always taken in that
    order. Unweighted errors are divided by an energy instead: ``"residual"`` the mean squared
    norm of the hidden state entering the block (the default where the model has no LM loss),
    ``"output"`` the layer's own output energy (relative error), ``"none"`` absolute.
    Measured on SmolLM2-135M (docs/benchmarks.md), every layer-local scale mis-allocates at 50% (a layer whose
    output or residual stream is dominated by a few massive channels looks cheap to empty); the
    loss Fisher does not, because it weighs each layer's error by what it costs at the output.
    Options: ``damp`` (fraction of mean diag H added, 0.01), ``steps`` (greedy snapshots per group,
    64), ``scale``.

    The greedy path runs every group down to its floor whatever the sparsity, so it is cached
    (safetensors, keyed by model, calibration and options): pruning again at another sparsity
    skips the search.
    """

    name = "obs"
    needs = Need.GRAMS
    form = Form.BLOCKS
    option_help = {"scale": "fisher (default; needs an LM loss), residual (default without one), output or none",
                   "damp": "fraction of mean diag H added before inverting (0.01)",
                   "steps": "greedy error snapshots per group (64)",
                   "fisher_windows": "calibration windows the loss Fisher is estimated on (32; 0: all of them)"}

    def __init__(self, **options) -> None:
        super().__init__(**options)
        scale = options.get("scale")
        if scale is not None and str(scale) not in SCALES:  # checked here, before any calibration runs
            raise UserError(f"obs option scale={scale!r}: choose one of {', '.join(SCALES)}")
        self.row_weights: dict[str, torch.Tensor] = {}
        self.scale_used: str | None = None

    def scale_for(self, model: torch.nn.Module) -> str:
        import inspect

        has_loss = "labels" in inspect.signature(model.forward).parameters and hasattr(model, "get_input_embeddings")
        if "scale" not in self.options:
            return DEFAULT_SCALE if has_loss else FALLBACK_SCALE
        scale = str(self.options["scale"])
        if scale == "fisher" and not has_loss:
            raise UserError(f"obs option scale=fisher needs a language-model loss, which {type(model).__name__} "
                            f"does not compute: use scale=output")
        return scale

    def check_model(self, model):
        self.scale_for(model)

    def check_compensation(self, compensate: str) -> None:
        if compensate != "lsq":
            raise UserError("criterion 'obs' chooses units for a least-squares update: use --compensate lsq (its "
                            "default)")

    @property
    def damp(self) -> float:
        return float(self.options.get("damp", lsq.DEFAULT_DAMP))

    @property
    def steps(self) -> int:
        return int(self.options.get("steps", 64))

    @property
    def fisher_windows(self) -> int | None:
        """The loss Fisher from the first 32 windows measured the same as from all 128 on SmolLM2 at 20%
        (wiki.test 28.44 vs 28.49, fiction 53.6 vs 53.2) in a third of the time (docs/benchmarks.md)."""
        value = int(self.options.get("fisher_windows", DEFAULT_FISHER_WINDOWS))
        return None if value <= 0 else value

    def path_options(self, model: torch.nn.Module) -> dict:
        """What the cached paths depend on besides model, calibration and groups."""
        return {"damp": self.damp, "steps": self.steps,
                "weighted": self.scale_for(model) == "fisher", "fisher_windows": self.fisher_windows}

    def score(self, group, ctx):
        raise MissingStatistics(group)  # scored block by block in `score_blocks`

    def diagnostics(self, groups, ctx):
        # the report says which weighting ranked the layers (the default depends on the model)
        if not self.scale_used:
            return None
        return {"scale": self.scale_used,
                **({"fisher_windows": self.fisher_windows} if self.scale_used == "fisher" else {})}

    def score_blocks(self, runner, groups, params, *, floor: int = 1, cache_key: str | None = None):
        """Scores from the greedy OBS paths (computed block by block, or read from the cache);
        returns (scores, comparable)."""
        scale_kind = self.scale_used = self.scale_for(runner.model)
        cached = load_paths(cache_key, groups) if cache_key else None
        if cached is None:
            paths = self.paths(runner, groups, params, floor=floor, weighted=scale_kind == "fisher")
            if cache_key:
                save_paths(cache_key, paths, self.row_weights)
        else:
            paths, self.row_weights = cached
        scores: dict[str, np.ndarray] = {}
        comparable: dict[str, np.ndarray] = {}
        for g in groups:
            if g.id not in paths:
                raise MissingStatistics(g)
            path = paths[g.id]
            count = len(path.order)
            position = np.full(g.units, float(count))
            position[path.order] = np.arange(count, dtype=np.float64)
            scale = 1.0 if scale_kind in ("none", "fisher") else path.scale[scale_kind]
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

    def paths(self, runner, groups, params, *, floor: int = 1, weighted: bool = False) -> dict[str, GroupPath]:
        """Run the calibration set block by block (dense activations) and remove each group's units
        greedily down to `floor`: the removal order does not depend on the sparsity, so one run
        serves every sparsity (and is cached)."""
        from ..calibration.blocks import DenseSweep, output_fisher_by_blocks
        from ..passes.layerwise import consumers_by_block, dense_block_runs

        damp, steps = self.damp, self.steps
        plan = consumers_by_block(runner, groups)
        if weighted:
            modules = sorted({m for stages in plan.values() for m, _ in stages})
            if getattr(runner, "holds_activations", False):
                # in memory: the Fisher's forward also measures every consumer's input (one dense sweep)
                sweep = DenseSweep()
                self.row_weights = output_fisher_by_blocks(
                    runner, modules, batches=self._fisher_batches(runner),
                    gram_modules={i: tuple(m for m, _ in stages) for i, stages in plan.items()}, sweep=sweep)
                blocks = ((i, plan[i], sweep.grams[i], sweep.residual[i]) for i in sorted(plan))
            else:
                self.row_weights = runner.output_fisher(modules, batches=self._fisher_batches(runner))
        if not weighted or not getattr(runner, "holds_activations", False):
            blocks = ((i, stages, run.grams, float(sum((x.double() ** 2).sum() for x in inputs) /
                                                    sum(x[..., 0].numel() for x in inputs)))
                      for i, stages, run, inputs in dense_block_runs(runner, groups, "obs block"))
        found: dict[str, GroupPath] = {}
        for _, stages, grams, residual in blocks:
            for module, members in stages:
                gram = grams[module].matrix
                w_aug = lsq.augmented_weight(params[f"{module}.weight"], params.get(f"{module}.bias"))
                output = float(torch.einsum("oi,ij,oj->", w_aug, gram, w_aug))
                w_rows = self._weighted(module, w_aug)
                for g, s in members:
                    count = max(0, g.units - floor)
                    path = lsq.obs_greedy(w_rows, gram, s.indices, count, damp=damp, steps=steps)
                    found[g.id] = GroupPath(np.asarray(path.order, dtype=np.int64),
                                            np.asarray(path.step_error, dtype=np.float64),
                                            {"residual": residual, "output": output})
        return found

    def _fisher_batches(self, runner) -> int | None:
        """Calibration batches covering the first `fisher_windows` windows (None: all)."""
        wanted = self.fisher_windows
        if wanted is None:
            return None
        covered, count = 0, 0
        for batch in runner.batches_by_batch:
            if covered >= wanted:
                break
            covered += batch.shape[0]
            count += 1
        return max(count, 1)

    def _weighted(self, module: str, weight_aug: torch.Tensor) -> torch.Tensor:
        """Rows scaled by √f_o, so plain squared errors of the scaled layer are Fisher-weighted ones."""
        f = self.row_weights.get(module)
        if f is None:
            return weight_aug
        # a floor keeps an output the loss never saw (f_o = 0) from dropping out of the fit entirely
        return weight_aug * (f + 1e-6 * float(f.mean()) + 1e-30).sqrt()[:, None]

    def reselect(self, group, consumer, weight_aug, gram, count, dead_columns):
        path = lsq.obs_greedy(self._weighted(module_of(consumer.param), weight_aug), gram.matrix, consumer.indices,
                              count, damp=self.damp, steps=self.steps, dead_columns=dead_columns)
        return np.asarray(path.order, dtype=np.int64)
