from __future__ import annotations

from . import register
from .base import ChannelCriterion


@register
class FLAP(ChannelCriterion):
    """FLAP fluctuation metrics (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning").

    For input channel j of the consumer layer (o_proj / down_proj) with weight W and calibration
    inputs x:
      * ``WIFV`` (default): Var(x_j) · ‖W[:, j]‖²  - how much the layer output fluctuates with x_j;
      * ``IFV``: Var(x_j);
      * ``WIFN``: mean_i |W_ij| · ‖x_j‖₂.
    A head (or KV group) scores the mean of its channels. For the global ranking (AL-AM) the
    channel metric is z-scored within its layer and, as in FLAP's code, the attention metric is
    squared before that. The bias compensation B = W·((1−mask)⊙mean(x)) is the ``bias``
    compensation pass (on by default with this criterion).
    """

    name = "flap"
    option_help = {"metric": "WIFV (default), IFV or WIFN"}
    METRICS = ("WIFV", "IFV", "WIFN")

    def __init__(self, **options) -> None:
        super().__init__(**options)
        if str(self.options.get("metric", "WIFV")).upper() not in self.METRICS:
            from ..errors import UserError

            raise UserError(f"flap option metric={self.options['metric']!r}: choose one of {', '.join(self.METRICS)}")

    def column_metric(self, st, w):
        metric = str(self.options.get("metric", "WIFV")).upper()
        if metric == "IFV":
            return st.var
        if metric == "WIFN":
            return w.abs().mean(0) * st.sq_norm.sqrt()
        return st.var * w.pow(2).sum(0)

    def transform_for_ranking(self, group, metric):
        return metric.pow(2) if group.kind != "channel" else metric
