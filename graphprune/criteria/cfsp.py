from __future__ import annotations

from . import register
from .base import ChannelCriterion, Need


@register
class CFSP(ChannelCriterion):
    """CFSP fine-grained score (Wang et al. 2024, "CFSP: coarse-to-fine activation information").

    Coarse step (the ``cfsp`` allocation): block importance = Σ_t arccos(cos(h_in, h_out))/π over
    calibration tokens; less important blocks are pruned harder.

    Fine step (this criterion), for input channel j of the consumer layer:
      s_j = ‖x_j‖₂ · Σ_i |W_ij| / Σ_k |W_ik|
    The public code adds a column-normalised term |W_ij| / Σ_k |W_kj| which sums to exactly 1 over
    i for every column j, so it cannot change the ranking; we keep only the row-relative term, in
    which a weight is large relative to the other inputs of the same output neuron.
    """

    name = "cfsp"
    needs = Need.ACTIVATIONS | Need.BLOCK_ANGLES

    def column_metric(self, st, w):
        row_relative = w.abs() / w.abs().sum(1, keepdim=True).clamp_min(1e-30)
        return row_relative.sum(0) * st.sq_norm.sqrt()
