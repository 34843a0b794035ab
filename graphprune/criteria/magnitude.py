from __future__ import annotations

import numpy as np
import torch

from . import register
from .base import Criterion


@register
class Magnitude(Criterion):
    """Weight magnitude of each unit over every parameter slice of its group.

    score(u) = (Σ_slices Σ |W[slice_u]|^p)^(1/p), p = 2 by default (``norm=1`` for L1).
    Calibration-free. Source: Li et al. 2017 (filter L1 norm), Torch-Pruning's MagnitudeImportance
    (group reduction: sum over the coupled parameters).
    """

    name = "magnitude"
    option_help = {"norm": "p of the Lp norm over a unit's slices (2)"}

    def __init__(self, **options) -> None:
        super().__init__(**options)
        try:
            p = float(self.options.get("norm", 2))
        except (TypeError, ValueError):
            p = float("nan")
        if not p > 0 or p == float("inf"):  # also refuses NaN
            from ..errors import UserError

            raise UserError(f"magnitude option norm={self.options.get('norm')!r}: the p of an Lp norm must be a "
                            f"finite number greater than 0 (1 or 2)")

    def score(self, group, ctx):
        p = float(self.options.get("norm", 2))
        total = torch.zeros(group.units, dtype=torch.float64)
        for s in group.slices:
            w = ctx.weight(s)
            total += w.abs().pow(p).reshape(group.units, -1).sum(1)
        return total.pow(1.0 / p).numpy()
