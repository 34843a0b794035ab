"""Routing statistics of every MoE layer over calibration text, from a hook on the experts module.

The experts module receives exactly what routing decided: ``hidden_states`` h_t, ``top_k_index``
and ``top_k_weights`` (normalised and scaled the way the family does it), and returns the routed
output routed_t (the family's weighted sum of its top-k experts). g(e, t) below is the token's
weight of e normalised over its top-k (the same as the family's weight where it renormalises,
Mixtral or norm_topk_prob=True, without DeepSeek's routed_scaling_factor). The hook adds, per
expert, running sums only:

* ``routed[e]``   number of tokens with e among their top-k choices,
* ``gate_norm[e]`` Σ_{t routed to e} g(e, t)·‖E_e(h_t)‖,
* ``easyep[e]``   Σ_{t routed to e} g(e, t)·‖E_e(h_t)‖·max(1 − cos(h_t, h_t + routed_t), 0),
* ``easyep_residual[e]`` the same with the token weight max(1 − cos(x_t, x_t + routed_t), 0),
* ``gate[e]``     Σ_{t routed to e} g(e, t).

h_t is what the experts see (the block's input, normed); x_t is the token's hidden state in the
residual stream before the MoE block adds to it, which EASY-EP's reference code compares: how
much the routed experts turn the layer's hidden state rather than its normed copy (the norm's
per-channel weights change both scale and direction). x_t is found as the input of the decoder
layer's norm whose output *is* the block's input; where no such norm exists (a block without a
pre-norm), x_t = h_t.

‖E_e(h_t)‖ is measured by running the experts module once more per top-k slot with that slot's
expert alone at weight 1, so the family's own expert function (activation, gating) is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .layers import ExpertLayer, routing_forward


@dataclass
class ExpertStats:
    tokens: int
    routed: torch.Tensor  # [E] float64
    gate: torch.Tensor
    gate_norm: torch.Tensor
    easyep: torch.Tensor
    easyep_residual: torch.Tensor
    residual_tokens: int = 0  # tokens whose x_t was found in the residual stream (the others use h_t)

    @classmethod
    def empty(cls, experts: int) -> "ExpertStats":
        zeros = lambda: torch.zeros(experts, dtype=torch.float64)  # noqa: E731
        return cls(0, zeros(), zeros(), zeros(), zeros(), zeros())


def routing_args(args: tuple, kwargs: dict):
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]):]]
    return values


def collect_expert_stats(model: torch.nn.Module, layers: list[ExpertLayer], batches: torch.Tensor, *,
                         batch_size: int = 8, progress: bool = True) -> dict[str, ExpertStats]:
    """Run `batches` ([n, seqlen] token ids) through `model`; returns experts module -> `ExpertStats`."""
    modules = dict(model.named_modules())
    stats = {layer.experts: ExpertStats.empty(layer.num_experts) for layer in layers}
    handles = []
    residual: dict[str, torch.Tensor] = {}  # experts module -> x of the current forward
    norm_inputs: dict[int, tuple] = {}  # id(norm output) -> (norm output, norm input), since the last block

    def remember_norm(mod, args, output):
        if args and isinstance(output, torch.Tensor):
            norm_inputs[id(output)] = (output, args[0])

    def block_input(layer: ExpertLayer):
        def pre_hook(mod, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            out, x = norm_inputs.get(id(h), (None, None))
            if out is h and isinstance(x, torch.Tensor) and x.shape == h.shape:
                residual[layer.experts] = x
            norm_inputs.clear()
        return pre_hook

    def make_hook(layer: ExpertLayer):
        module = modules[layer.experts]
        forward = routing_forward(module, f"layer {layer.layer} ({layer.scope})")
        st = stats[layer.experts]

        def hook(mod, args, kwargs, output):
            hidden, index, weights = routing_args(args, kwargs)
            hidden = hidden.reshape(-1, hidden.shape[-1])
            index = index.reshape(hidden.shape[0], -1)
            family = weights.reshape(hidden.shape[0], -1).to(torch.float64)
            # g: the gate weights normalised over the token's top-k (EASY-EP, REAP), also for families
            # that route with unnormalised probabilities (norm_topk_prob=False) or a scale (DeepSeek)
            weights = family / family.sum(dim=-1, keepdim=True).clamp_min(1e-30)
            ones = torch.ones(hidden.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
            norms = torch.stack([forward(hidden, index[:, k:k + 1], ones).to(torch.float64).norm(dim=-1)
                                 for k in range(index.shape[1])], dim=1)  # [T, k] = ‖E_{index[t,k]}(h_t)‖
            h = hidden.to(torch.float64)
            x = residual.pop(layer.experts, None)
            if x is None:
                x = h
            else:
                st.residual_tokens += hidden.shape[0]
                x = x.reshape(hidden.shape).to(torch.float64)
            routed = output.reshape(h.shape).to(torch.float64)

            def change(base):  # [T]: how much the routed experts turn `base`
                return (1.0 - torch.nn.functional.cosine_similarity(base, base + routed, dim=-1)).clamp_min(0.0).cpu()

            flat = index.reshape(-1).to(torch.long).cpu()
            contribution = (weights * norms).cpu()
            st.tokens += hidden.shape[0]
            st.routed.index_add_(0, flat, torch.ones(flat.shape[0], dtype=torch.float64))
            st.gate.index_add_(0, flat, weights.reshape(-1).cpu())
            st.gate_norm.index_add_(0, flat, contribution.reshape(-1))
            st.easyep.index_add_(0, flat, (contribution * change(h)[:, None]).reshape(-1))
            st.easyep_residual.index_add_(0, flat, (contribution * change(x)[:, None]).reshape(-1))
        return hook

    for layer in layers:
        handles.append(modules[layer.experts].register_forward_hook(make_hook(layer), with_kwargs=True))
        block = modules[layer.scope]
        handles.append(block.register_forward_pre_hook(block_input(layer), with_kwargs=True))
        decoder_layer = modules.get(layer.scope.rpartition(".")[0])
        for child in (decoder_layer.children() if decoder_layer is not None else ()):
            if child is not block and "norm" in type(child).__name__.lower():
                handles.append(child.register_forward_hook(remember_norm))
    body = getattr(model, "base_model", None) or model  # statistics live in the layers: skip the LM head
    kwargs = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
    try:
        with torch.no_grad():
            for start in tqdm(range(0, batches.shape[0], batch_size), desc="expert routing", unit="batch",
                              disable=not progress, leave=False):
                body(input_ids=batches[start:start + batch_size].to(next(model.parameters()).device), **kwargs)
    finally:
        for h in handles:
            h.remove()
        norm_inputs.clear()
        residual.clear()
    return stats

