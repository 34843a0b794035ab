from __future__ import annotations

from . import register
from .base import ExpertCriterion


@register
class REAP(ExpertCriterion):
    """REAP, router-weighted expert activation pruning (Lasby et al. 2025, "REAP the Experts: Why
    Pruning Prevails for One-Shot MoE Compression"): the mean over the tokens routed to e of
      g(e, t) · ‖E_e(h_t)‖
    with g the gate weight the token gives e. An expert never routed scores 0.
    """

    name = "reap"

    def from_stats(self, stats):
        return (stats.gate_norm / stats.routed.clamp_min(1.0)).numpy()

