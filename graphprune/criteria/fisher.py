from __future__ import annotations

from . import register
from .base import Criterion, Need


@register
class Fisher(Criterion):
    """Fisher information of each unit's mask variable (Kwon et al. 2022, "A Fast Post-Training
    Pruning Framework"): F(u) = mean over calibration batches of (Σ_{w in unit} w · ∂L/∂w)², the
    diagonal empirical Fisher of a multiplicative mask m_u at m_u = 1. Removing a unit costs about
    ½·F(u) in loss. L is the LM loss for decoders and, for embedding models (encoders), InfoNCE
    over in-batch negatives on (query, positive) calibration pairs with the model's pooling
    (τ = 0.05, see graphprune/embedding.py).
    """

    name = "fisher"
    needs = Need.GRADIENTS

    def score(self, group, ctx):
        stats = ctx.unit_gradients[group.id]
        return stats["sumsq"] / max(stats["batches"], 1)
