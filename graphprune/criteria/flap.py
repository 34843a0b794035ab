from __future__ import annotations

import torch

from . import register
from .base import Criterion


@register
class FLAP(Criterion):
    """FLAP fluctuation metrics (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning").

    For input channel j of the consumer layer (o_proj / down_proj) with weight W and calibration
    inputs x:
      * ``WIFV`` (default): Var(x_j) · ‖W[:, j]‖²  - how much the layer output fluctuates with x_j;
      * ``IFV``: Var(x_j);
      * ``WIFN``: mean_i |W_ij| · ‖x_j‖₂.
    A head (or KV group) scores the mean of its channels. For the global ranking (AL-AM) the
    channel metric is z-scored within its layer first (FLAP standardises the stacked
    [layers, channels] metric along the channel axis) and heads average the standardised values
    of their channels; as in FLAP's code the attention metric is squared before that. The bias
    compensation B = W·((1−mask)⊙mean(x)) is the ``bias`` compensation pass.
    """

    name = "flap"
    needs = frozenset({"activations"})

    def _metric(self):
        metric = str(self.options.get("metric", "WIFV")).upper()
        if metric == "IFV":
            fn = lambda st, w: st.var  # noqa: E731
        elif metric == "WIFN":
            fn = lambda st, w: w.abs().mean(0) * st.sq_norm.sqrt()  # noqa: E731
        else:
            fn = lambda st, w: st.var * w.pow(2).sum(0)  # noqa: E731
        return fn

    def score(self, group, ctx):
        return self.channel_stats(group, ctx, self._metric())

    def global_score(self, group, ctx, raw):
        squared = group.kind != "channel"  # heads: FLAP squares the o_proj metric

        def standardise(column_metric):
            m = column_metric.pow(2) if squared else column_metric
            return (m - m.mean()) / m.std().clamp_min(1e-30)

        return self.channel_stats(group, ctx, self._metric(), column_transform=standardise)
