from __future__ import annotations

from . import register
from .base import ExpertCriterion


@register
class Frequency(ExpertCriterion):
    """Routing frequency: the fraction of calibration tokens that have expert e among their top-k
    choices, f(e) = |{t : e ∈ topk(t)}| / T (the usual count-based expert pruning baseline, e.g.
    Muzio et al. 2024, "SEER-MoE"). It sees routing only, not what the expert outputs.
    """

    name = "frequency"

    def from_stats(self, stats):
        return (stats.routed / max(stats.tokens, 1)).numpy()
