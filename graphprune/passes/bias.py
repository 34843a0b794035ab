from __future__ import annotations

import torch

from ..criteria.base import consumer_slices, module_of
from .base import Pass, PassError, PassResult, RewriteState


class BiasCompensation(Pass[RewriteState]):
    """FLAP's bias compensation: a removed input channel j of a consumer layer y = W x + b is
    replaced by its calibration mean, which is a constant the layer adds:
        b' = b + Σ_{j removed} W[:, j] · mean(x_j)
    so the output keeps its expected value. Applied to every consumer (o_proj, down_proj, ...)
    of every pruned group with statistics; a layer without a bias gets one. Channels inside routed
    experts are not compensated: stacked expert weights have no bias per expert.
    """

    name = "bias"

    def __init__(self, *, conv: bool = False) -> None:
        # convolution consumers too (the plain-module rewrite): exact away from zero-padded borders,
        # where a removed channel contributed zeros rather than its mean
        self.conv = conv

    def requires(self, rewrite: RewriteState) -> None:
        if rewrite.statistics is None:
            raise PassError("bias compensation needs the calibration statistics of the consumer layers")

    def call(self, rewrite: RewriteState) -> PassResult[RewriteState]:
        state, calibration = rewrite.tensors, rewrite.statistics
        bias_delta: dict[str, torch.Tensor] = {}  # module -> added bias
        for g in rewrite.groups:
            units = rewrite.removed.get(g.id)
            if units is None or len(units) == 0:
                continue
            for s in consumer_slices(g, conv=self.conv):
                if s.expert is not None:
                    continue  # one expert of stacked weights: no per-expert bias to carry the constant
                module = module_of(s.param)
                stats = calibration.inputs.get(module)
                if stats is None:
                    continue
                cols = torch.as_tensor(s.indices[units].reshape(-1))
                # [out, in], also for Conv1D [in, out]; only the removed columns are converted
                w = state[s.param].movedim(s.axis, -1)
                if w.dim() > 2:  # [out, kh, kw, in]: a constant input adds Σ over the kernel window
                    w = w.reshape(w.shape[0], -1, w.shape[-1])[:, :, cols].sum(1)
                else:
                    w = w[:, cols]
                w = w.to(torch.float64)
                delta = w @ stats.mean[cols]
                if module in bias_delta:
                    bias_delta[module] += delta
                else:
                    bias_delta[module] = delta
        for module, delta in bias_delta.items():
            key = f"{module}.bias"
            dtype = state[f"{module}.weight"].dtype
            if key in state:
                state[key] = (state[key].to(torch.float64) + delta).to(dtype)
            else:
                state[key] = delta.to(dtype)
                rewrite.new_biases.append(module)
        rewrite.compensated_layers = len(bias_delta)
        return PassResult(rewrite, bool(bias_delta))
