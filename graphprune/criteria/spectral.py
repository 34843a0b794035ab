from __future__ import annotations

import numpy as np
import torch

from . import register
from .base import Criterion


def spectral_change(matrix: torch.Tensor, unit_columns: torch.Tensor) -> np.ndarray:
    """How much removing each unit's columns changes the shape of `matrix`'s singular-value spectrum.

    With λ the eigenvalues of A·Aᵀ (the squared singular values) and U its eigenvectors, removing
    columns C lowers them, to first order, to λ' = λ − Σ_{c∈C} (Uᵀ a_c)². The score is the L1
    distance between the normalised spectra λ/Σλ and λ'/Σλ' (a unit whose removal leaves the
    spectrum's shape alone scores 0).
    """
    a = matrix.to(torch.float64)
    eigenvalues, vectors = torch.linalg.eigh(a @ a.T)
    eigenvalues = eigenvalues.clamp_min(0)
    total = eigenvalues.sum().clamp_min(1e-30)
    projected = (vectors.T @ a) ** 2  # [rank, n]: energy of each column along each direction
    per_unit = projected[:, unit_columns].sum(dim=2).T  # [units, rank]
    after = (eigenvalues[None, :] - per_unit).clamp_min(0)
    after = after / after.sum(dim=1, keepdim=True).clamp_min(1e-30)
    return (after - (eigenvalues / total)[None, :]).abs().sum(dim=1).numpy()


@register
class Spectral(Criterion):
    """Weight-only, calibration-free: keep the units that shape the weights' singular-value spectrum
    (in the spirit of PruneNet, Sengupta et al. 2025, which keeps the spectrum of the pruned layer
    close to the original).

    For every 2-D weight the group touches (FFN gate/up rows and down columns, attention q/k/v rows
    and o columns) the unit's slice is seen as columns of a matrix A (rows of W become columns of
    Wᵀ) and scored by `spectral_change`: the L1 distance between the normalised spectra of A·Aᵀ
    before and after the unit's removal (first-order eigenvalue downdate). A unit scores the mean
    over its weights. Needs no data and never runs the model.
    """

    name = "spectral"

    def score(self, group, ctx):
        total = np.zeros(group.units)
        count = 0
        for s in group.slices:
            weight = ctx.params[s.param]
            if s.expert is not None or weight.dim() != 2 or s.role not in ("linear.in", "linear.out"):
                continue
            a = weight.detach().movedim(s.axis, -1)  # [rest, n]: the units' indices are columns
            total += spectral_change(a, torch.as_tensor(s.indices, dtype=torch.long))
            count += 1
        if count == 0:
            return np.zeros(group.units)
        return total / count
