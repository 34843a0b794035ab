"""Expert pruning: score the routed experts of every MoE layer, decide how many each layer keeps,
and rewrite router rows, router biases, expert tensors and the config's expert count.

The driver runs this as its experts stage (`pipeline.run`): the backend collects routing statistics
and scores the experts of each layer (`criteria.scoring.score_expert_layers`), `plan_counts` and
`choose_removed` decide which go, and the backend's rewrite removes them. ``sparsity`` here is the
fraction of routed experts removed. Allocations:

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

import numpy as np

from .. import criteria as criteria_registry
from ..allocation import lowest
from ..criteria.base import ExpertCriterion
from ..errors import PruningError, UserError
from .layers import ExpertLayer

EXPERT_ALLOCATIONS = ("uniform", "global")


def expert_criterion(name: str, **options) -> ExpertCriterion:
    """The expert criterion `name`, or a one-line refusal naming the expert criteria."""
    scorer = criteria_registry.get(name, **options)
    if not isinstance(scorer, ExpertCriterion):
        experts = ", ".join(n for n in criteria_registry.available()
                            if isinstance(criteria_registry.get(n), ExpertCriterion))
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
        return lowest(scores, count)
    per_group = layer.num_experts // layer.n_group
    picked = [g * per_group + lowest(scores[g * per_group:(g + 1) * per_group], count // layer.n_group)
              for g in range(layer.n_group)]
    return np.sort(np.concatenate(picked))
