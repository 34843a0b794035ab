from __future__ import annotations

import torch

from . import register
from .base import Criterion


@register
class WandaSP(Criterion):
    """Wanda-sp (structured Wanda, as in FLAP's baseline): per input channel j of the consumer layer,
    s_j = mean_i |W_ij| · ‖X_j‖₂ over calibration tokens; a unit scores the sum over its channels
    (here: the mean, which ranks identically inside a group of equal-width units).
    Source: Sun et al. 2023 (Wanda); An et al. 2024 (FLAP, `wanda_sp`).
    """

    name = "wanda-sp"
    needs = frozenset({"activations"})

    def score(self, group, ctx):
        return self.channel_stats(group, ctx, lambda st, w: w.abs().mean(0) * st.sq_norm.sqrt())
