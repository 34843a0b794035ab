"""Expert pruning: score the routed experts of every MoE layer, decide how many each layer keeps,
and rewrite router rows, router biases, expert tensors and the config's expert count.

``sparsity`` here is the fraction of routed experts removed. Allocations:

* ``uniform`` (default): every MoE layer loses the same number, so the config keeps one expert
  count and the output reloads with plain ``from_pretrained``;
* ``global``: each expert's score is divided by its layer's total (its share of the layer's
  importance) and the lowest shares over all layers go first; per-layer counts are written as
  ``graphprune_layer_overrides`` (reload with ``graphprune.load_pruned``).

A layer never keeps fewer experts than a token is routed to (top-k). With group-limited routing
(DeepSeek's ``n_group`` / ``topk_group``) every group loses the same number of experts, so the
router's ``[groups, experts per group]`` view stays valid, and each group keeps at least two
experts (the router ranks groups by the sum of their two best scores) and enough that the
``topk_group`` groups a token may use still hold top-k experts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .. import criteria as criteria_mod
from ..allocation import _lowest
from ..criteria.base import ExpertCriterion
from ..errors import PruningError, UserError
from ..graph import GroupSet
from .layers import ExpertLayer, find_expert_layers
from .routing import ExpertStats, collect_expert_stats

EXPERT_ALLOCATIONS = ("uniform", "global")


@dataclass
class ExpertPruning:
    model: torch.nn.Module
    layers: list[ExpertLayer]
    removed: dict[str, np.ndarray]  # expert group id -> removed experts (original numbering)
    scores: dict[int, np.ndarray]  # layer -> expert scores
    report: dict[str, Any] = field(default_factory=dict)  # the result: same inputs, same report
    timings: dict[str, float] = field(default_factory=dict)  # measurements of this run


def expert_criterion(name: str, **options) -> ExpertCriterion:
    scorer = criteria_mod.get(name, **options)
    if not isinstance(scorer, ExpertCriterion):
        experts = ", ".join(n for n in criteria_mod.available()
                            if isinstance(criteria_mod.get(n), ExpertCriterion))
        raise UserError(f"criterion '{name}' scores channels and heads, not experts; for --target experts use one of: "
                        f"{experts}")
    return scorer


def min_experts(layer: ExpertLayer) -> int:
    """Fewest experts `layer` may keep and still route every token to top-k distinct experts."""
    if layer.n_group > 1:
        return layer.n_group * max(2, math.ceil(layer.top_k / layer.topk_group))
    return layer.top_k


def _too_few(layer: ExpertLayer, remove: int) -> PruningError:
    floor = min_experts(layer)
    grouped = (f" and at least {floor // layer.n_group} in each of its {layer.n_group} routing groups"
               if layer.n_group > 1 else "")
    return PruningError(
        f"layer {layer.layer} ({layer.scope}): removing {remove} of {layer.num_experts} experts keeps "
        f"{layer.num_experts - remove}, but each token is routed to {layer.top_k} (num_experts_per_tok), so it must "
        f"keep at least {floor}{grouped}: at most {layer.num_experts - floor} can go (--sparsity "
        f"<= {(layer.num_experts - floor) / layer.num_experts:.3g})")


def _round_to_groups(count: float, layer: ExpertLayer) -> int:
    return int(round(count / layer.n_group)) * layer.n_group


def plan_counts(layers: list[ExpertLayer], sparsity: float, allocation: str,
                scores: dict[int, np.ndarray] | None = None) -> dict[int, int]:
    """Experts removed per layer. Without `scores` only checks that the request is possible, so an
    impossible one is refused before calibration."""
    if allocation not in EXPERT_ALLOCATIONS:
        raise UserError(f"unknown expert allocation '{allocation}' (choose from {', '.join(EXPERT_ALLOCATIONS)})")
    total = sum(layer.num_experts for layer in layers)
    if allocation == "uniform":
        counts = {layer.layer: _round_to_groups(sparsity * layer.num_experts, layer) for layer in layers}
        for layer in layers:
            if layer.num_experts - counts[layer.layer] < min_experts(layer):
                raise _too_few(layer, counts[layer.layer])
        want = sum(counts.values())
    else:
        want = round(sparsity * total)
        room = sum(layer.num_experts - min_experts(layer) for layer in layers)
        if want > room:
            raise PruningError(f"removing {want} of {total} routed experts leaves some layer fewer than it must keep "
                               f"(each token is routed to {layers[0].top_k}, num_experts_per_tok): at most {room} can "
                               f"go (--sparsity <= {room / total:.3g})")
        counts = _global_counts(layers, want, scores) if scores is not None else {}
    if want == 0:
        raise PruningError(f"--sparsity {sparsity} removes no expert (layers have "
                           f"{sorted({layer.num_experts for layer in layers})} experts): raise it")
    return counts


def _global_counts(layers: list[ExpertLayer], want: int, scores: dict[int, np.ndarray]) -> dict[int, int]:
    """Lowest shares of their layer's total score go first, respecting every layer's floor."""
    items = []
    for layer in layers:
        s = np.asarray(scores[layer.layer], dtype=np.float64)
        share = s / s.sum() if s.sum() > 0 else np.full(len(s), 1.0 / len(s))
        items += [(float(share[e]), layer.layer, e) for e in range(layer.num_experts)]
    items.sort()
    by_layer = {layer.layer: layer for layer in layers}
    counts = {layer.layer: 0 for layer in layers}
    taken = 0
    for _, index, _ in items:
        if taken >= want:
            break
        layer = by_layer[index]
        if layer.num_experts - counts[index] > min_experts(layer):
            counts[index] += 1
            taken += 1
    # group-limited routing removes equal numbers per group: round each layer's count down
    return {index: (c // by_layer[index].n_group) * by_layer[index].n_group for index, c in counts.items()}


def choose_removed(layer: ExpertLayer, scores: np.ndarray, count: int) -> np.ndarray:
    """The `count` lowest-scoring experts; with routing groups, count / n_group lowest per group."""
    if layer.n_group == 1:
        return _lowest(scores, count)
    per_group = layer.num_experts // layer.n_group
    picked = [g * per_group + _lowest(scores[g * per_group:(g + 1) * per_group], count // layer.n_group)
              for g in range(layer.n_group)]
    return np.sort(np.concatenate(picked))


def score_experts(model: torch.nn.Module, layers: list[ExpertLayer], scorer: ExpertCriterion, *,
                  calib: Sequence[str], tokenizer: Any, nsamples: int, seqlen: int, seed: int, batch_size: int,
                  progress: bool, routing_stats: dict[str, list[ExpertStats]] | None = None,
                  use_cache: bool = True, generated: dict | None = None) -> dict[int, np.ndarray]:
    """Scores per layer. `--calib none` among `calib`: the model writes its own calibration text
    (`data.selfgen`); its settings and text go into `generated` (for the run report)."""
    domains: dict[str, list[ExpertStats]] = {layer.experts: [] for layer in layers}
    if routing_stats is not None:
        domains.update(routing_stats)
    elif scorer.needs:
        if tokenizer is None:
            raise UserError(f"criterion '{scorer.name}' needs calibration text but the model has no tokenizer")
        from ..data.calibration import load_calibration, needs_bos
        from ..data.selfgen import self_generated

        for source in calib:
            if str(source) == "none":
                text = self_generated(model, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                      use_cache=use_cache, progress=progress)
                batches = text.batches
                if generated is not None:
                    generated.update(generation=text.settings, generated_text=text.texts)
            else:
                batches = load_calibration(source, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                           add_bos=needs_bos(model))
            stats = collect_expert_stats(model, layers, batches, batch_size=batch_size, progress=progress)
            for name, st in stats.items():
                domains[name].append(st)
    scores = {}
    for layer in layers:
        s = np.asarray(scorer.score_layer(layer, domains[layer.experts]), dtype=np.float64)
        if s.shape != (layer.num_experts,) or not np.all(np.isfinite(s)):
            raise PruningError(f"criterion '{scorer.name}' gave invalid scores for the experts of layer {layer.layer}")
        scores[layer.layer] = s
    return scores


def prune_experts(model: torch.nn.Module, groups: GroupSet, *, criterion: str = "easyep", sparsity: float,
                  allocation: str = "uniform", calib: Sequence[str] = ("default",), tokenizer: Any = None,
                  nsamples: int = 128, seqlen: int = 128, seed: int = 0, batch_size: int = 8, progress: bool = True,
                  criterion_options: dict | None = None, release_input: bool = False,
                  routing_stats: dict[str, list[ExpertStats]] | None = None, use_cache: bool = True
                  ) -> ExpertPruning:
    """Remove `sparsity` of the routed experts of every MoE layer of `model` (already analysed into
    `groups`); returns the rebuilt model. The input is left as it was unless `release_input`.
    `routing_stats` (experts module -> one `ExpertStats` per domain, from `collect_expert_stats`)
    skips calibration, e.g. to compare criteria on the same statistics. A `calib` source "none" is
    text the model generates itself (seeded; recorded in the report)."""
    from ..pipeline import rewrite

    timings: dict[str, float] = {}
    options = {"seed": seed, **(criterion_options or {})} if criterion == "random" else dict(criterion_options or {})
    scorer = expert_criterion(criterion, **options)
    layers = find_expert_layers(model, groups)
    plan_counts(layers, sparsity, allocation)  # refuse impossible requests before calibrating
    t = time.perf_counter()
    generated: dict = {}
    scores = score_experts(model, layers, scorer, calib=list(calib), tokenizer=tokenizer, nsamples=nsamples,
                           seqlen=seqlen, seed=seed, batch_size=batch_size, progress=progress,
                           routing_stats=routing_stats, use_cache=use_cache, generated=generated)
    timings["calibration"] = time.perf_counter() - t
    counts = plan_counts(layers, sparsity, allocation, scores)
    removed = {layer.group.id: choose_removed(layer, scores[layer.layer], counts[layer.layer]) for layer in layers}
    t = time.perf_counter()
    new_model, extra = rewrite(model, groups, [layer.group for layer in layers], removed, release_input=release_input)
    timings["rewrite"] = time.perf_counter() - t
    experts_before = sum(layer.num_experts for layer in layers)
    report = {
        "criterion": criterion, "criterion_options": dict(criterion_options or {}), "allocation": allocation,
        "requested_sparsity": float(sparsity),
        "calibration": ({"sources": [str(c) for c in calib], "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
                         **generated} if scorer.needs else None),
        "experts_before": experts_before, "experts_removed": int(sum(len(r) for r in removed.values())),
        "kept_per_layer": {str(layer.layer): layer.num_experts - len(removed[layer.group.id]) for layer in layers},
        "removed_per_layer": {str(layer.layer): removed[layer.group.id].tolist() for layer in layers},
        "uniform_layers": extra["uniform_layers"],
    }
    return ExpertPruning(new_model, layers, removed, scores, report, timings)
