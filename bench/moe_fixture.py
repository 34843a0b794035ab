"""A real-weights MoE for the expert benchmarks: SmolLM2-135M with every FFN split into experts.

No pretrained MoE is available offline, so one is made from a dense model whose quality is known:

1. Calibration activations: for `NSAMPLES` x `SEQLEN` tokens of wiki.train (seed 1234, not the
   benchmark's calibration windows), each layer's MLP input h_t (post-attention RMSNorm) and FFN
   activations a_t = silu(gate h_t) * up h_t (1536 channels) are recorded.
2. A shared expert keeps the `SHARED` channels with the largest mean mass |a_{t,c}|·‖W_down[:, c]‖.
   A first version split all 1536 channels into 8 routed experts (Mixtral, top-2): it computes the
   dense FFN exactly when all 8 experts run with equal weights, but top-2 keeps a quarter of the
   SwiGLU channels per token and its wiki.test PPL was 18580 (dense 18.95), useless for comparing
   criteria. SwiGLU activations are not sparse enough for a pure top-2 split without training.
3. Co-activation clustering of the other 512 channels: channel c is described by |a_{t,c}| over
   the tokens, L2-normalised, so the dot product of two channels is their co-activation; balanced
   spherical k-means (top-64 singular directions, randomized SVD) makes 8 experts of 64 channels.
4. Router: least squares with a small ridge fits a linear map h_t -> m_t, where m_{t,e} is the
   output norm of expert e on token t, ‖W_down[:, C_e] a_{t, C_e}‖ (its activation mass). The top-2
   of the predicted masses route each token.
5. Written as a Qwen2-MoE checkpoint (`qkv_bias=False`: its attention is then Llama's, RoPE, GQA
   9/3): routed gate_up_proj[e] = [W_gate[C_e]; W_up[C_e]], down_proj[e] = 2 * W_down[:, C_e];
   shared expert = the shared channels, its sigmoid gate zero (factor 1/2) and its down projection
   doubled. Qwen2-MoE (norm_topk_prob) weights the top-2 outputs by their renormalised softmax
   probabilities; the router's scale keeps them near 1/2 (logit spread `LOGIT_STD`), so a layer
   computes about shared(h) + E_1(h) + E_2(h): the dense FFN without the unrouted channel groups.

    python -m bench.moe_fixture [--force] [--dense]   # build (cached); print its PPL (--dense: and SmolLM2's)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import PROTOCOL, data_file

EXPERTS, TOP_K, SHARED = 8, 2, 1024
NSAMPLES, SEQLEN, SEED = 32, 128, 1234
LOGIT_STD = 0.1
VERSION = "v2"


def cache_path() -> Path:
    root = Path(os.environ.get("GRAPHPRUNE_CACHE", Path.home() / ".cache" / "graphprune"))
    return root / "bench" / f"smollm2-135m-moe{EXPERTS}x{TOP_K}-{VERSION}"


def _record(model, batches: torch.Tensor):
    """Per layer: MLP inputs h [T, H] and FFN activations a [T, I] on the calibration tokens."""
    hs: dict[int, list[torch.Tensor]] = {}
    acts: dict[int, list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.mlp.register_forward_pre_hook(
            lambda m, args, i=i: hs.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1]).detach())))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, args, i=i: acts.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1]).detach())))
    try:
        with torch.no_grad():
            for start in range(0, batches.shape[0], 8):
                model.model(input_ids=batches[start:start + 8], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v) for i, v in hs.items()}, {i: torch.cat(v) for i, v in acts.items()}


def balanced_clusters(acts: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> list[torch.Tensor]:
    """k equal-size groups of channels that are active on the same tokens (balanced spherical k-means)."""
    features = acts.abs().T.double()  # [channels, tokens]
    features = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    # randomized SVD: the full one of a [1536, tokens] matrix costs a minute per layer on 2 cores
    u, s, _ = torch.svd_lowrank(features - features.mean(0), q=64, niter=2)
    x = u * s
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = x.shape[0]
    size = n // k
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=g)[:k]]
    for _ in range(iters):
        sim = x @ centroids.T  # [n, k]
        assign = [-1] * n
        fill = [0] * k
        placed = 0
        # greedy on plain lists (per-element tensor indexing would dominate the build time):
        # best (channel, cluster) pairs first, each cluster capped at n / k channels
        for flat in torch.argsort(sim.reshape(-1), descending=True).tolist():
            c, e = divmod(flat, k)
            if assign[c] < 0 and fill[e] < size:
                assign[c] = e
                fill[e] += 1
                placed += 1
                if placed == n:
                    break
        labels = torch.tensor(assign)
        centroids = torch.stack([x[labels == e].mean(0) for e in range(k)])
        centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return [torch.nonzero(labels == e).reshape(-1) for e in range(k)]


def build(force: bool = False) -> Path:
    out = cache_path()
    if (out / "config.json").exists() and not force:
        return out
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from graphprune.calibration.text import load_calibration
    from graphprune.models import load_model
    from graphprune.passes.config import instantiate

    started = time.perf_counter()
    torch.manual_seed(SEED)  # svd_lowrank and k-means initialisation draw from the global generator
    dense = load_model("smollm2-135m")
    model, tokenizer = dense.model.eval(), dense.tokenizer
    batches = load_calibration(str(data_file("wiki.train.txt")), tokenizer, nsamples=NSAMPLES, seqlen=SEQLEN,
                               seed=SEED)
    hs, acts = _record(model, batches)
    c = model.config
    config = Qwen2MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings, qkv_bias=False,
        use_sliding_window=False, intermediate_size=c.intermediate_size, decoder_sparse_step=1,
        moe_intermediate_size=(c.intermediate_size - SHARED) // EXPERTS, shared_expert_intermediate_size=SHARED,
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=True, router_aux_loss_coef=0.0,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        a, h = acts[i].double(), hs[i].double()
        down = mlp.down_proj.weight.double()
        importance = a.abs().mean(0) * down.norm(dim=0)
        ranked = torch.argsort(importance, descending=True)
        shared, rest = ranked[:SHARED].sort().values, ranked[SHARED:].sort().values
        groups = [rest[idx] for idx in balanced_clusters(acts[i][:, rest], EXPERTS)]
        mass = torch.stack([(a[:, idx] @ down[:, idx].T).norm(dim=1) for idx in groups], dim=1)  # [T, E]
        ridge = 1e-3 * torch.eye(h.shape[1], dtype=torch.float64) * (h * h).sum(0).mean()
        fit = torch.linalg.solve(h.T @ h + ridge, h.T @ mass)  # [H, E]
        logits = h @ fit
        router = fit.T * (LOGIT_STD / logits.std(dim=1).mean().clamp_min(1e-12))
        prefix = f"model.layers.{i}.mlp"
        state[f"{prefix}.gate.weight"] = router.float()
        state[f"{prefix}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([mlp.gate_proj.weight[idx], mlp.up_proj.weight[idx]]) for idx in groups]).contiguous()
        state[f"{prefix}.experts.down_proj"] = torch.stack(
            [TOP_K * mlp.down_proj.weight[:, idx] for idx in groups]).contiguous()
        state[f"{prefix}.shared_expert.gate_proj.weight"] = mlp.gate_proj.weight[shared].contiguous()
        state[f"{prefix}.shared_expert.up_proj.weight"] = mlp.up_proj.weight[shared].contiguous()
        state[f"{prefix}.shared_expert.down_proj.weight"] = (2 * mlp.down_proj.weight[:, shared]).contiguous()
        state[f"{prefix}.shared_expert_gate.weight"] = torch.zeros(1, c.hidden_size)  # sigmoid(0) = 1/2
    moe = instantiate(Qwen2MoeForCausalLM, config, device="cpu")  # uninitialised storage, filled below
    missing, unexpected = moe.load_state_dict(state, strict=False, assign=True)
    moe.tie_weights()
    missing = [n for n in missing if n != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"fixture weights do not match Qwen2-MoE: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".moe-fixture-", dir=out.parent))
    try:
        moe.eval().save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "fixture.json").write_text(json.dumps({
            "source": "smollm2-135m", "experts": EXPERTS, "top_k": TOP_K, "shared_channels": SHARED, "calibration": {
                "file": "wiki.train.txt", "nsamples": NSAMPLES, "seqlen": SEQLEN, "seed": SEED},
            "logit_std": LOGIT_STD, "build_s": round(time.perf_counter() - started, 1)}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str]) -> None:
    torch.set_num_threads(2)
    started = time.perf_counter()
    path = build(force="--force" in argv)
    print(f"fixture: {path} ({time.perf_counter() - started:.0f}s)")
    from graphprune.calibration.text import read_text_file
    from graphprune.evaluate.perplexity import perplexity
    from graphprune.models import load_model

    text = read_text_file(data_file("wiki.test.txt"))
    for spec in (["smollm2-135m"] if "--dense" in argv else []) + [str(path)]:
        loaded = load_model(spec)
        t = time.perf_counter()
        ppl = perplexity(loaded.model, loaded.tokenizer, text, seqlen=PROTOCOL["eval_seqlen"],
                         windows=PROTOCOL["eval_windows"], progress=False)
        print(f"{spec}: wiki.test PPL {ppl.ppl:.3f} ({time.perf_counter() - t:.0f}s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
