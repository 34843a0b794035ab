from __future__ import annotations

import numpy as np

from . import register
from .base import Criterion, Need


def _mean_fisher(stats: dict) -> np.ndarray:
    return np.asarray(stats["sumsq"], dtype=np.float64) / max(int(stats["batches"]), 1)


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.lexsort((np.arange(len(values)), values))
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return 1.0
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 1.0
    return float(np.corrcoef(ra, rb)[0, 1])


@register
class GAPrune(Criterion):
    """Domain-alignment importance (Tang & Yang 2025, "GAPrune: Gradient-Alignment Pruning for
    Domain-Aware Embeddings"), lifted to structured units.

    Per unit u (a channel or head: all the weights of its group slices), from a domain calibration
    set D (``--calib``) and a general one G (``--calib-general``), with the loss L of the model
    (InfoNCE over in-batch negatives for encoders, the LM loss for decoders):
      * F_S(u) = mean_b (Σ_{w in u} w · ∂L_b/∂w)² over the batches b of set S: the Fisher
        information of a mask on the unit (as the ``fisher`` criterion), for S = D and S = G;
      * A(u) = cos(Σ_b ∂L^D_b/∂w, Σ_b ∂L^G_b/∂w) restricted to the unit's weights, in [-1, 1]: do
        the domain and the general objective pull the unit's weights the same way?
      * F̂_S = F_S / mean F_S over all units of the same kind (channels, heads) in the model, so
        the two Fisher terms are dimensionless and on one scale;
      * DAI(u) = B(u) + α · A(u) · |B(u)|   with B(u) = F̂_D(u) + λ · F̂_G(u).
    Units with the lowest DAI are removed. Options: ``general_weight`` λ (default 0.5),
    ``alignment_weight`` α (default 0.5).

    Differences from the public code, and why: it scores single weights as
    softplus((F_D − β·F_G)·|w| · clamp(1 + 0.2·a, 0.8, 1.2) + 0.5·sqrt|w|), where a is the
    element-wise product of the two unit-normalised gradients of a whole tensor. That product is
    of order 1/numel: measured on MiniLM-L6's FFN matrices (``python -m bench.encoder_gaprune
    public-alignment``) its mean |a| is 1e-6 and its maximum 4e-3, so the factor stays within
    0.1% of 1 and changes nothing; and the Fisher terms (squared gradients, ~1e-5 here) vanish
    beside 0.5·sqrt|w| (~0.15), which makes the score magnitude pruning in effect. Here the alignment is a
    cosine per unit (order 1) and the terms are normalised before they are combined; the run
    report's ``criterion_diagnostics`` gives each term's scale and how much the ranking moves
    without it. The paper's information-bottleneck form subtracts the general Fisher (λ = −β);
    a negative ``general_weight`` reproduces it, but it prunes first what the general task needs,
    while the default keeps it (λ > 0). The alignment enters as A·|B| so that a conflicting unit
    always loses importance, whatever the sign of B.
    """

    name = "gaprune"
    option_help = {"general_weight": "weight λ of the general-domain Fisher (0.5)",
                   "alignment_weight": "weight α of the domain/general gradient alignment (0.5)"}
    needs = Need.GRADIENTS | Need.GENERAL_GRADIENTS

    def _weights(self) -> tuple[float, float]:
        return float(self.options.get("general_weight", 0.5)), float(self.options.get("alignment_weight", 0.5))

    def _normalisers(self, ctx) -> dict[tuple[str, str], float]:
        """Mean Fisher over all units of each kind, per calibration set."""
        sums: dict[tuple[str, str], list[np.ndarray]] = {}
        for which, table in (("domain", ctx.unit_gradients), ("general", ctx.general_unit_gradients)):
            for gid, stats in table.items():
                sums.setdefault((which, ctx.groups.by_id(gid).kind), []).append(_mean_fisher(stats))
        return {key: float(np.concatenate(parts).mean()) for key, parts in sums.items()}

    def terms(self, group, ctx) -> dict[str, np.ndarray]:
        """The normalised terms of one group's units: domain Fisher, general Fisher, alignment."""
        if not hasattr(self, "_scale_cache") or self._scale_cache[0] is not ctx:
            self._scale_cache = (ctx, self._normalisers(ctx))
        scale = self._scale_cache[1]

        def normalised(which, table):
            mean = scale[(which, group.kind)]
            return _mean_fisher(table[group.id]) / (mean if mean > 0 else 1.0)

        return {"domain_fisher": normalised("domain", ctx.unit_gradients),
                "general_fisher": normalised("general", ctx.general_unit_gradients),
                "alignment": np.asarray(ctx.unit_alignment[group.id], dtype=np.float64)}

    def combine(self, domain_fisher, general_fisher, alignment) -> np.ndarray:
        general_weight, alignment_weight = self._weights()
        base = domain_fisher + general_weight * general_fisher
        return base + alignment_weight * alignment * np.abs(base)

    def score(self, group, ctx):
        return self.combine(**self.terms(group, ctx))

    def diagnostics(self, groups, ctx):
        """Scales of the raw terms, and for each term the Spearman correlation between the group's
        ranking with and without it (1.0 = the term changes nothing), averaged over groups."""
        raw = {"domain_fisher": [], "general_fisher": [], "alignment": []}
        without = {"domain_fisher": [], "general_fisher": [], "alignment": []}
        for g in groups:
            raw["domain_fisher"].append(_mean_fisher(ctx.unit_gradients[g.id]))
            raw["general_fisher"].append(_mean_fisher(ctx.general_unit_gradients[g.id]))
            raw["alignment"].append(np.asarray(ctx.unit_alignment[g.id], dtype=np.float64))
            terms = self.terms(g, ctx)
            full = self.combine(**terms)
            neutral = {"domain_fisher": 0.0, "general_fisher": 0.0, "alignment": 0.0}
            for name in without:
                without[name].append(_spearman(full, self.combine(**{**terms, name: neutral[name]})))

        def scale(values):
            flat = np.concatenate(values)
            return {"mean": float(flat.mean()), "median": float(np.median(flat)), "min": float(flat.min()),
                    "max": float(flat.max()), "mean_abs": float(np.abs(flat).mean())}

        general_weight, alignment_weight = self._weights()
        return {"general_weight": general_weight, "alignment_weight": alignment_weight,
                "raw_scales": {name: scale(values) for name, values in raw.items()},
                "rank_correlation_without": {name: float(np.mean(v)) for name, v in without.items()}}
