from __future__ import annotations

import numpy as np

from . import register
from .base import ExpertCriterion, Need


@register
class RandomExperts(ExpertCriterion):
    """Random expert scores, the baseline every expert criterion must beat: uniform draws from a
    generator seeded by (``seed`` option, default 0; layer index), so a run is reproducible.
    Needs no calibration.
    """

    name = "random"
    option_help = {"seed": "random seed (0)"}
    needs = Need.NONE

    def score_layer(self, layer, domains):
        rng = np.random.default_rng([int(self.options.get("seed", 0)), int(layer.layer)])
        return rng.random(layer.num_experts)
