from __future__ import annotations

from . import register
from .base import ChannelCriterion


@register
class WandaSP(ChannelCriterion):
    """Wanda-sp (structured Wanda, as in FLAP's baseline): per input channel j of the consumer layer,
    s_j = mean_i |W_ij| · ‖X_j‖₂ over calibration tokens; a unit scores the mean over its channels
    (FLAP sums them: the same ranking inside a group of equal-width units).
    Source: Sun et al. 2023 (Wanda); An et al. 2024 (FLAP, ``prune_wanda_sp``).
    """

    name = "wanda-sp"

    def column_metric(self, st, w):
        return w.abs().mean(0) * st.sq_norm.sqrt()
