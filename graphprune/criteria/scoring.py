"""The one scoring contract: every backend scores through these functions, in the form the
criterion declares (`Criterion.form`).

- ``Form.UNITS``: `score_units` asks the criterion for each group's unit scores from a
  `ScoringContext` (weights, activation statistics, gradient statistics). The in-memory and ONNX
  backends call it once for all groups; streaming calls it for one layer's groups at a time.
- ``Form.BLOCKS``: `score_blocks` hands the criterion a block source (the model's repeated blocks
  with their calibration inputs) and it scores every group of a block together (structured OBS).
- ``Form.EXPERT_LAYERS``: `score_expert_layers` scores the routed experts of each MoE layer from
  routing statistics.

A criterion that cannot score a group (`MissingStatistics`) or returns a non-finite or misshapen
score ends the run with one line naming the group; never a silent zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import PruningError
from .base import Criterion, MissingStatistics, ScoringContext


@dataclass
class Scores:
    """Unit scores per group id (higher = kept first), and where the allocation ranks units across
    groups, scores comparable across them."""

    raw: dict[str, np.ndarray] = field(default_factory=dict)
    comparable: dict[str, np.ndarray] = field(default_factory=dict)
    diagnostics: Any = None

    def update(self, other: "Scores") -> None:
        self.raw.update(other.raw)
        self.comparable.update(other.comparable)


def _checked(scorer: Criterion, group, values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (group.units,):
        raise PruningError(f"criterion '{scorer.name}' gave {values.shape} scores for {group.scope} ({group.kind}), "
                           f"which has {group.units} units")
    if not np.all(np.isfinite(values)):
        raise PruningError(f"criterion '{scorer.name}' gave non-finite scores for {group.scope} ({group.kind})")
    return values


def score_units(scorer: Criterion, groups: list, ctx: ScoringContext, *, comparable: bool) -> Scores:
    """Form.UNITS: each group's scores, and with `comparable` the criterion's global ranking."""
    out = Scores()
    for g in groups:
        try:
            raw = _checked(scorer, g, scorer.score(g, ctx))
        except MissingStatistics as exc:
            raise PruningError(f"criterion '{scorer.name}' cannot score {exc}") from exc
        out.raw[g.id] = raw
        if comparable:
            ranked = scorer.global_score(g, ctx, raw)
            if ranked is not None:
                out.comparable[g.id] = _checked(scorer, g, ranked)
    return out


def score_blocks(scorer: Criterion, blocks, groups: list, params: dict, *, floor: int, comparable: bool,
                 cache_key: str | None = None) -> Scores:
    """Form.BLOCKS: the criterion runs over the block source and scores every group at once."""
    try:
        raw, ranked = scorer.score_blocks(blocks, groups, params, floor=floor, cache_key=cache_key)
    except MissingStatistics as exc:
        raise PruningError(f"criterion '{scorer.name}' cannot score {exc}") from exc
    by_id = {g.id: g for g in groups}
    out = Scores({gid: _checked(scorer, by_id[gid], v) for gid, v in raw.items()})
    if comparable:
        out.comparable = {gid: _checked(scorer, by_id[gid], v) for gid, v in ranked.items()}
    return out


def score_expert_layers(scorer: Criterion, layers: list, domains: dict[str, list]) -> dict[int, np.ndarray]:
    """Form.EXPERT_LAYERS: expert scores per MoE layer from each calibration domain's routing
    statistics (`domains[layer.experts]`)."""
    scores = {}
    for layer in layers:
        s = np.asarray(scorer.score_layer(layer, domains.get(layer.experts, [])), dtype=np.float64)
        if s.shape != (layer.num_experts,) or not np.all(np.isfinite(s)):
            raise PruningError(f"criterion '{scorer.name}' gave invalid scores for the experts of layer {layer.layer}")
        scores[layer.layer] = s
    return scores
