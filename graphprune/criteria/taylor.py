from __future__ import annotations

import numpy as np

from . import register
from .base import Criterion, Need


@register
class Taylor(Criterion):
    """First-order Taylor importance of a whole unit (LLM-Pruner's group-level estimate):
    score(u) = | Σ_batches Σ_{w in unit} w · ∂L/∂w |, the loss change predicted when every weight of
    the unit is zeroed. L is the language-model loss on the calibration windows (InfoNCE on pairs for
    embedding models).
    Source: Molchanov et al. 2019; Ma et al. 2023 (LLM-Pruner).
    """

    name = "taylor"
    needs = Need.GRADIENTS

    def score(self, group, ctx):
        return np.abs(ctx.unit_gradients[group.id]["sum"])
