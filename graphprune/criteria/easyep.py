from __future__ import annotations

from ..errors import UserError
from . import register
from .base import ExpertCriterion


@register
class EasyEP(ExpertCriterion):
    """EASY-EP expert importance (Dong et al. 2025, "Domain-Specific Pruning of Large Mixture-of-Experts
    Models with Few-shot Demonstrations"): output-aware routing mass weighted by how much the routed
    experts change each token,
      I(e) = Σ_t g(e, t) · ‖E_e(h_t)‖ · max(1 − cos(b_t, b_t + routed_t), 0)
    over calibration tokens t routed to e, with g the family's top-k gate weight, h_t the experts'
    (normed) input and routed_t the combined output of the token's routed experts. The token's
    base b_t is h_t by default (``token_change=input``); ``token_change=residual`` uses its
    residual-stream hidden state before the MoE block adds to it, as the authors' code does (on the
    SmolLM2 MoE fixture the default measured 0.1-1.3 PPL better, see docs/benchmarks.md). Calibrate on
    domain text to keep that domain's experts.
    """

    name = "easyep"
    option_help = {"token_change": "input (default): cos(h, h + routed) on the experts' normed input; "
                                   "residual: on the residual stream, as EASY-EP's reference code"}
    BASES = ("input", "residual")

    def __init__(self, **options) -> None:
        super().__init__(**options)
        if str(self.options.get("token_change", "input")) not in self.BASES:
            raise UserError(f"easyep option token_change={self.options['token_change']!r}: choose one of "
                            f"{', '.join(self.BASES)}")

    def from_stats(self, stats):
        residual = str(self.options.get("token_change", "input")) == "residual"
        return (stats.easyep_residual if residual else stats.easyep).numpy()
