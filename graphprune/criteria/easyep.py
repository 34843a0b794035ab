from __future__ import annotations

from . import register
from .base import ExpertCriterion


@register
class EasyEP(ExpertCriterion):
    """EASY-EP expert importance (Dong et al. 2025, "Domain-Specific Pruning of Large Mixture-of-Experts
    Models with Few-shot Demonstrations"): output-aware routing mass weighted by how much the routed
    experts change each token,
      I(e) = Σ_t g(e, t) · ‖E_e(h_t)‖ · max(1 − cos(h_t, h_t + routed_t), 0)
    over calibration tokens t routed to e, with g the family's top-k gate weight and routed_t the
    combined output of the token's routed experts. Calibrate on domain text to keep that domain's
    experts.
    """

    name = "easyep"

    def from_stats(self, stats):
        return stats.easyep.numpy()
