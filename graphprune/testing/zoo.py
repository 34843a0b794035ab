"""A zoo of tiny, deterministic models for tests and benchmarks.

Every Hugging Face family is built from its real configuration and modeling classes with
the sizes shrunk (hidden 64, 2 layers, 4 query heads, head_dim 16, ...), so the traced
graphs contain exactly the operators the full-size checkpoints produce, but building,
running and exporting take well under a second per model.

Public API
----------
``TINY_FAMILIES``       family name -> :class:`TinyFamily` (a callable builder)
``build_tiny``          build a tiny model, returns ``(model, config)``
``example_inputs``      keyword inputs for a forward / ``torch.export`` call
``save_tiny``           ``save_pretrained`` a tiny model (safetensors) into a directory
``expected_structure``  the pruning groups a correct tracer must find (ground truth)
``tiny_cnn``            a small ResNet-like CNN with a residual add and a channel concat
``permute_units``       permute the units of a group in a model (output-invariance check)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "TINY_FAMILIES",
    "TinyFamily",
    "ParamSlice",
    "build_tiny",
    "example_inputs",
    "save_tiny",
    "expected_structure",
    "tiny_cnn",
    "TinyCNN",
    "permute_units",
]

# Sizes shared by all transformer families, chosen so that few structural sizes coincide
# by accident (hidden 64, FFN 128, MoE expert 24 -> fused gate_up 48, shared expert 40,
# vocab 256), which makes a tracer's confusion of two dimensions visible in the tests.
# As in the real checkpoints, num_heads * head_dim == hidden (4 * 16 = 64) for most
# families; DeepSeek's MLA sizes are all distinct.
HIDDEN_SIZE = 64
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 16
INTERMEDIATE_SIZE = 128
VOCAB_SIZE = 256
MAX_POSITIONS = 128
NUM_EXPERTS = 8
TOP_K = 2
MOE_INTERMEDIATE_SIZE = 24
SHARED_EXPERT_INTERMEDIATE_SIZE = 40

# MoE expert implementations registered in transformers 5.x (`integrations/moe.py`):
#   "eager"      python loop over `nonzero()` hits: data dependent, NOT exportable.
#   "batched_mm" gathers each token's expert weights (`W[expert_ids]`) and runs `bmm`:
#                static shapes, exports on CPU and on meta.
#   "grouped_mm" sorts tokens by expert, `histc` + `cumsum` offsets and one grouped
#                matmul on the whole 3D weight; exports too, but in fp32 under export
#                transformers emits its opaque custom op `transformers.grouped_mm_fallback`
#                (bf16 gives `aten._grouped_mm`). It is the transformers default.
# batched_mm is the default here because each expert weight reaches the graph through a
# plain `aten.index.Tensor` + `bmm`, the simplest coupling pattern to analyse, and it
# matches the eager loop numerically.
DEFAULT_EXPERTS_IMPLEMENTATION = "batched_mm"


@dataclass(frozen=True)
class TinyFamily:
    """How to build one tiny model family.

    ``config_kwargs`` are the size-reducing arguments for ``config_class``; keyword
    overrides given to :meth:`build` / :func:`build_tiny` replace them. ``is_decoder``
    is False for encoders (bert), whose output is the hidden state rather than logits.
    """

    name: str
    config_class_name: str
    model_class_name: str
    config_kwargs: dict[str, Any] = field(default_factory=dict)
    is_moe: bool = False
    is_decoder: bool = True

    @property
    def config_class(self) -> type:
        import transformers

        return getattr(transformers, self.config_class_name)

    @property
    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.model_class_name)

    def make_config(self, **overrides: Any):
        kwargs = dict(self.config_kwargs)
        # Single-pass inference models: no KV cache in the outputs (torch.export rejects a
        # DynamicCache in the output tree: no pytree registration). sdpa is also the
        # transformers default; it is pinned so a changed default cannot alter the graphs.
        kwargs.setdefault("use_cache", False)
        kwargs.setdefault("attn_implementation", "sdpa")
        if self.is_moe:
            kwargs.setdefault("experts_implementation", DEFAULT_EXPERTS_IMPLEMENTATION)
        kwargs.update(overrides)
        return self.config_class(**kwargs)

    def build(
        self,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        randomize_constants: bool = True,
        **overrides: Any,
    ):
        """Build ``(model, config)``: eval mode, fp32, weights drawn from ``seed``.

        See :func:`build_tiny` for the meaning of the arguments.
        """
        config = self.make_config(**overrides)
        device = torch.device(device)
        # Weights are always initialised on the CPU with a fixed generator state so that
        # the same seed gives bit-identical weights regardless of the target device; a
        # meta model is built directly on meta (no memory, no init) since it has no values.
        if device.type == "meta":
            with torch.device("meta"):
                model = self.model_class(config)
        else:
            with _fork_rng(seed):
                model = self.model_class(config)
                if randomize_constants:
                    _randomize_constant_tensors(model)
            model = model.to(device)
        model = model.to(torch.float32).eval()
        return model, config

    def __call__(self, *, seed: int = 0, device: str | torch.device = "cpu", **overrides: Any):
        return self.build(seed=seed, device=device, **overrides)


# Buffers that carry learned values in real checkpoints (as opposed to rotary tables,
# position ids or scale constants, which must keep their computed values).
_LEARNED_BUFFER_SUFFIXES = ("e_score_correction_bias",)


@torch.no_grad()
def _randomize_constant_tensors(model: nn.Module) -> None:
    """Add noise to parameters that Hugging Face initialises to a constant.

    Norm weights start at 1 (0 for Gemma's ``1 + w`` norms), biases and DeepSeek's
    ``e_score_correction_bias`` at 0. With constant values, leaving such a tensor out of
    a pruning group (or permuting it wrongly) would not change the model's output, so
    tests could not tell a correct group from an incomplete one.
    """
    tensors = [(name, p, 0.1) for name, p in model.named_parameters()]
    # The routing-bias noise stays well below the spread of the router scores
    # (sigmoid(logits) with std-0.02 weights); a larger bias would route every token
    # to the same experts and leave the others unused.
    tensors += [(name, b, 0.01) for name, b in model.named_buffers() if name.endswith(_LEARNED_BUFFER_SUFFIXES)]
    for _, tensor, scale in tensors:
        if tensor.is_floating_point() and tensor.numel() > 1 and bool((tensor == tensor.flatten()[0]).all()):
            tensor.add_(scale * torch.randn_like(tensor))


@contextlib.contextmanager
def _fork_rng(seed: int):
    """Seed torch's CPU generator inside the block without disturbing the caller's state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _decoder_kwargs(**extra: Any) -> dict[str, Any]:
    """Config kwargs shared by Llama-style decoder families (names follow LlamaConfig)."""
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        # Default special-token ids of several families (32000, 50279, ...) are outside
        # the tiny vocabulary; nn.Embedding(padding_idx=...) would reject them.
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(extra)
    return kwargs


TINY_FAMILIES: dict[str, TinyFamily] = {
    "llama": TinyFamily("llama", "LlamaConfig", "LlamaForCausalLM", _decoder_kwargs()),
    # Qwen2 hard-codes bias=True on q/k/v projections (not on o_proj).
    "qwen2": TinyFamily("qwen2", "Qwen2Config", "Qwen2ForCausalLM", _decoder_kwargs()),
    # Mistral's default sliding_window (4096) is kept small so the window mask matters
    # for sequences longer than 4 tokens.
    "mistral": TinyFamily("mistral", "MistralConfig", "MistralForCausalLM", _decoder_kwargs(sliding_window=4)),
    # Gemma3 text: one sliding and one full attention layer, q/k RMSNorm per head,
    # sandwich norms around the MLP, sqrt(hidden)-scaled and tied embeddings.
    "gemma3": TinyFamily(
        "gemma3",
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        _decoder_kwargs(
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=4,
            query_pre_attn_scalar=HEAD_DIM,
            tie_word_embeddings=True,
        ),
    ),
    # Phi3 fuses q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`.
    # GQA (as in Phi-3-medium / Phi-4) so the fused qkv split has unequal q and kv parts.
    "phi3": TinyFamily("phi3", "Phi3Config", "Phi3ForCausalLM", _decoder_kwargs()),
    # GPT-2: Conv1D layers store weights transposed ([in, out]); fused c_attn; tied head.
    "gpt2": TinyFamily(
        "gpt2",
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            vocab_size=VOCAB_SIZE,
            n_embd=HIDDEN_SIZE,
            n_layer=NUM_LAYERS,
            n_head=NUM_HEADS,
            n_inner=INTERMEDIATE_SIZE,
            n_positions=MAX_POSITIONS,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=True,
        ),
    ),
    # BERT encoder with its pooler (no LM head).
    "bert": TinyFamily(
        "bert",
        "BertConfig",
        "BertModel",
        dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN_SIZE,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            intermediate_size=INTERMEDIATE_SIZE,
            max_position_embeddings=MAX_POSITIONS,
            pad_token_id=0,
        ),
        is_decoder=False,
    ),
    "mixtral": TinyFamily(
        "mixtral",
        "MixtralConfig",
        "MixtralForCausalLM",
        # Mixtral experts use `intermediate_size` (there is no moe_intermediate_size).
        _decoder_kwargs(
            intermediate_size=MOE_INTERMEDIATE_SIZE, num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K
        ),
        is_moe=True,
    ),
    # Qwen2-MoE: every layer sparse (decoder_sparse_step=1), routed experts plus a
    # sigmoid-gated shared expert. GQA as in Qwen2-57B-A14B.
    "qwen2_moe": TinyFamily(
        "qwen2_moe",
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        _decoder_kwargs(
            moe_intermediate_size=MOE_INTERMEDIATE_SIZE,
            shared_expert_intermediate_size=SHARED_EXPERT_INTERMEDIATE_SIZE,
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=False,
        ),
        is_moe=True,
    ),
    "qwen3_moe": TinyFamily(
        "qwen3_moe",
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        _decoder_kwargs(
            moe_intermediate_size=MOE_INTERMEDIATE_SIZE,
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=True,
        ),
        is_moe=True,
    ),
    # OLMoE: no GQA in the real model (16/16 heads); q_norm / k_norm span the whole
    # projection (hidden_size wide), not one head, so head_dim must be hidden/heads.
    "olmoe": TinyFamily(
        "olmoe",
        "OlmoeConfig",
        "OlmoeForCausalLM",
        _decoder_kwargs(
            num_key_value_heads=NUM_HEADS,
            intermediate_size=MOE_INTERMEDIATE_SIZE,  # OLMoE experts use intermediate_size
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
        ),
        is_moe=True,
    ),
    # DeepSeek-V3: MLA attention (q/kv LoRA latents, split nope/rope head dims), layer 0
    # dense (first_k_dense_replace=1), layer 1 MoE with 2 expert groups of 4 (n_group /
    # topk_group routing, sigmoid scores + e_score_correction_bias buffer) and one shared
    # expert of moe_intermediate_size.
    "deepseek_v3": TinyFamily(
        "deepseek_v3",
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN_SIZE,
            intermediate_size=INTERMEDIATE_SIZE,
            moe_intermediate_size=MOE_INTERMEDIATE_SIZE,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            num_key_value_heads=NUM_HEADS,
            n_shared_experts=1,
            n_routed_experts=NUM_EXPERTS,
            n_group=2,
            topk_group=1,
            num_experts_per_tok=TOP_K,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            q_lora_rank=56,
            kv_lora_rank=36,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            max_position_embeddings=MAX_POSITIONS,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        ),
        is_moe=True,
    ),
}


def build_tiny(
    family: str,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    randomize_constants: bool = True,
    **overrides: Any,
):
    """Build a tiny random model of ``family``; returns ``(model, config)``.

    The model is in eval mode, fp32, on ``device``; ``"meta"`` builds it under
    ``with torch.device("meta")`` (no storage, no initialisation).

    ``overrides`` are config keyword arguments and replace the tiny defaults, e.g.
    ``num_hidden_layers=30``, ``attn_implementation="eager"`` (default ``"sdpa"``),
    ``experts_implementation="grouped_mm"`` (MoE default ``"batched_mm"``; ``"eager"``
    does not export), ``use_cache=True`` (default False).

    ``randomize_constants`` (default True) adds noise to the norm weights and biases
    that Hugging Face initialises to constants, see :func:`_randomize_constant_tensors`.
    The same ``family``/``seed``/``overrides`` always give bit-identical weights.
    """
    try:
        spec = TINY_FAMILIES[family]
    except KeyError:
        raise KeyError(f"unknown tiny family {family!r}; known: {sorted(TINY_FAMILIES)}") from None
    return spec.build(seed=seed, device=device, randomize_constants=randomize_constants, **overrides)


def example_inputs(
    config, *, batch_size: int = 1, seq_len: int = 8, device: str | torch.device = "cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Keyword inputs (``{"input_ids": ...}``) for a forward or ``torch.export`` call.

    Token ids avoid the special ids 0..2 so padding never kicks in. The ids are drawn on
    the CPU from ``seed`` and then moved, so ``device="meta"`` gives the same shapes.
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, config.vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": input_ids.to(device)}


def save_tiny(family: str, directory: str | os.PathLike, *, seed: int = 0, **overrides: Any) -> str:
    """``save_pretrained`` a tiny model (safetensors) into ``directory``; returns the path.

    Load it back with ``TINY_FAMILIES[family].model_class.from_pretrained(directory)``
    (or ``AutoModelForCausalLM`` / ``AutoModel`` for bert). ``config.json`` does not keep
    the attention / experts implementation: pass ``experts_implementation="batched_mm"``
    to ``from_pretrained`` to get the zoo's MoE default back (transformers picks
    ``grouped_mm``, equal up to float rounding).
    """
    model, _ = build_tiny(family, seed=seed, **overrides)
    directory = os.fspath(directory)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


# ---------------------------------------------------------------------------------------
# Ground truth: the pruning groups a correct tracer must find
# ---------------------------------------------------------------------------------------


class ParamSlice(NamedTuple):
    """The indices of one state-dict tensor that belong to the units of a group.

    Unit ``u`` of a group (a channel, a head or an expert) owns the indices
    ``offset + u * stride + j`` for ``0 <= j < width`` along dimension ``dim`` of the
    tensor ``param`` (a name from ``model.state_dict()``: a parameter, or for
    DeepSeek's ``e_score_correction_bias`` a buffer). ``stride`` defaults to ``width``.

    When ``expert`` is not None the slice lives inside expert ``expert`` of a stacked
    ``[num_experts, ...]`` tensor: the index along dim 0 is fixed to ``expert`` and
    ``dim`` still counts the dimensions of the full 3D tensor.

    Examples: Llama ``down_proj`` columns of an FFN channel group are
    ``ParamSlice("model.layers.0.mlp.down_proj.weight", 1)``; Phi-3's fused
    ``gate_up_proj`` appears twice, ``offset=0`` (gate rows) and ``offset=I`` (up rows);
    head ``h`` of a ``k_proj`` is ``ParamSlice(..., 0, width=head_dim)``.
    """

    param: str
    dim: int
    offset: int = 0
    width: int = 1
    stride: int | None = None
    expert: int | None = None

    def unit_indices(self, unit: int) -> range:
        """Indices along ``dim`` owned by ``unit``."""
        stride = self.width if self.stride is None else self.stride
        start = self.offset + unit * stride
        return range(start, start + self.width)


def _group(size: int, members: list[ParamSlice], **info: Any) -> dict[str, Any]:
    """A pruning group: ``size`` units that must be kept or removed together in all members."""
    return {"size": size, "members": members, **info}


def _gated_ffn(prefix: str, size: int, *, gate="gate_proj", up="up_proj", down="down_proj") -> dict:
    """SwiGLU-style MLP: gate/up rows and down columns share the intermediate channels."""
    return _group(
        size,
        [
            ParamSlice(f"{prefix}.{gate}.weight", 0),
            ParamSlice(f"{prefix}.{up}.weight", 0),
            ParamSlice(f"{prefix}.{down}.weight", 1),
        ],
        kind="ffn",
    )


def _attention(
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    query: list[ParamSlice],
    key_value: list[ParamSlice],
    output: list[ParamSlice],
    v_head_dim: int | None = None,
    head_norms: tuple[str, ...] | list[str] = (),
    **info: Any,
) -> dict:
    """Attention structure.

    ``query_heads`` (size num_heads) holds the query-head slices of q and o (and of
    OLMoE's full-width q_norm); ``kv_heads`` (size num_kv_heads) holds the k and v slices.
    Query head ``h`` reads kv head ``h // queries_per_kv`` (``repeat_kv`` order), so
    removing a kv head requires removing its ``queries_per_kv`` query heads too.
    ``head_norms`` are per-head-dim norm weights shared by all heads (Qwen3, Gemma3).
    """
    return {
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "queries_per_kv": num_heads // num_kv_heads,
        "head_dim": head_dim,
        "v_head_dim": head_dim if v_head_dim is None else v_head_dim,
        "query_heads": _group(num_heads, query + output, kind="query_heads"),
        "kv_heads": _group(num_kv_heads, key_value, kind="kv_heads"),
        "head_norms": list(head_norms),
        **info,
    }


def _llama_like_attention(prefix: str, config, *, bias: bool = False, qk_norm: str | None = None) -> dict:
    """Separate q/k/v/o projections; ``qk_norm`` is "per_head" (Qwen3, Gemma3) or
    "full" (OLMoE: RMSNorm over the whole q / k projection)."""
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
    query = [ParamSlice(f"{prefix}.q_proj.weight", 0, width=head_dim)]
    key_value = [
        ParamSlice(f"{prefix}.k_proj.weight", 0, width=head_dim),
        ParamSlice(f"{prefix}.v_proj.weight", 0, width=head_dim),
    ]
    if bias:
        query.append(ParamSlice(f"{prefix}.q_proj.bias", 0, width=head_dim))
        key_value += [
            ParamSlice(f"{prefix}.k_proj.bias", 0, width=head_dim),
            ParamSlice(f"{prefix}.v_proj.bias", 0, width=head_dim),
        ]
    head_norms: list[str] = []
    if qk_norm == "per_head":
        head_norms = [f"{prefix}.q_norm.weight", f"{prefix}.k_norm.weight"]
    elif qk_norm == "full":
        query.append(ParamSlice(f"{prefix}.q_norm.weight", 0, width=head_dim))
        key_value.append(ParamSlice(f"{prefix}.k_norm.weight", 0, width=head_dim))
    return _attention(
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        query=query,
        key_value=key_value,
        output=[ParamSlice(f"{prefix}.o_proj.weight", 1, width=head_dim)],
        head_norms=head_norms,
        qk_norm=qk_norm,
    )


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _routed_experts(
    prefix: str,
    *,
    num_experts: int,
    top_k: int,
    expert_size: int,
    hidden: int,
    router_bias: str | None = None,
    expert_groups: int = 1,
    topk_group: int | None = None,
) -> dict:
    """Stacked experts (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) and their router.

    ``experts`` is the group of whole experts (router rows + expert slabs);
    ``expert_ffn[e]`` is the intermediate-channel group inside expert ``e``
    (gate rows at offset 0, up rows at offset I, as `chunk(2)` splits them).
    """
    gate_up, down = f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"
    router = f"{prefix}.gate.weight"
    expert_members = [ParamSlice(router, 0), ParamSlice(gate_up, 0), ParamSlice(down, 0)]
    if router_bias is not None:
        expert_members.insert(1, ParamSlice(router_bias, 0))
    return {
        "num_experts": num_experts,
        "top_k": top_k,
        "expert_intermediate_size": expert_size,
        "router": router,
        "router_bias": router_bias,
        "expert_groups": expert_groups,
        "topk_group": topk_group,
        "expert_params": {
            gate_up: (num_experts, 2 * expert_size, hidden),
            down: (num_experts, hidden, expert_size),
        },
        "experts": _group(num_experts, expert_members, kind="experts", expert_groups=expert_groups),
        "expert_ffn": [
            _group(
                expert_size,
                [
                    ParamSlice(gate_up, 1, offset=0, expert=e),
                    ParamSlice(gate_up, 1, offset=expert_size, expert=e),
                    ParamSlice(down, 2, expert=e),
                ],
                kind="ffn",
            )
            for e in range(num_experts)
        ],
    }


def _decoder_structure(family: str, config) -> dict:
    """Structure of the Llama-style decoders (everything except gpt2 and bert)."""
    hidden: list[ParamSlice] = [ParamSlice("model.embed_tokens.weight", 1)]
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        hidden += [
            ParamSlice(f"{p}.input_layernorm.weight", 0),
            ParamSlice(f"{p}.post_attention_layernorm.weight", 0),
        ]
        if family == "gemma3":
            hidden += [
                ParamSlice(f"{p}.pre_feedforward_layernorm.weight", 0),
                ParamSlice(f"{p}.post_feedforward_layernorm.weight", 0),
            ]

        # --- attention
        a = f"{p}.self_attn"
        if family == "phi3":
            heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
            qkv = f"{a}.qkv_proj.weight"
            attention = _attention(
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                query=[ParamSlice(qkv, 0, offset=0, width=head_dim)],
                key_value=[
                    ParamSlice(qkv, 0, offset=heads * head_dim, width=head_dim),
                    ParamSlice(qkv, 0, offset=(heads + kv_heads) * head_dim, width=head_dim),
                ],
                output=[ParamSlice(f"{a}.o_proj.weight", 1, width=head_dim)],
                fused_qkv=qkv,
            )
            hidden += [ParamSlice(qkv, 1), ParamSlice(f"{a}.o_proj.weight", 0)]
        elif family == "deepseek_v3":
            attention = _mla_attention(a, config)
            hidden += [
                ParamSlice(f"{a}.q_a_proj.weight", 1),
                ParamSlice(f"{a}.kv_a_proj_with_mqa.weight", 1),
                ParamSlice(f"{a}.o_proj.weight", 0),
            ]
        else:
            qk_norm = {"qwen3_moe": "per_head", "gemma3": "per_head", "olmoe": "full"}.get(family)
            attention = _llama_like_attention(a, config, bias=family in ("qwen2", "qwen2_moe"), qk_norm=qk_norm)
            hidden += [ParamSlice(f"{a}.{n}_proj.weight", 1) for n in "qkv"] + [ParamSlice(f"{a}.o_proj.weight", 0)]

        # --- MLP
        m = f"{p}.mlp"
        if family == "phi3":
            intermediate = config.intermediate_size
            gate_up = f"{m}.gate_up_proj.weight"
            mlp = {
                "kind": "dense",
                "ffn": _group(
                    intermediate,
                    [
                        ParamSlice(gate_up, 0, offset=0),  # gate rows (first chunk)
                        ParamSlice(gate_up, 0, offset=intermediate),  # up rows
                        ParamSlice(f"{m}.down_proj.weight", 1),
                    ],
                    kind="ffn",
                    fused_gate_up=gate_up,
                ),
            }
            hidden += [ParamSlice(gate_up, 1), ParamSlice(f"{m}.down_proj.weight", 0)]
        elif _is_moe_layer(family, config, i):
            mlp = {"kind": "moe", **_moe_layer(family, m, config)}
            hidden += [
                ParamSlice(mlp["router"], 1),
                ParamSlice(f"{m}.experts.gate_up_proj", 2),
                ParamSlice(f"{m}.experts.down_proj", 1),
            ]
            if mlp["shared_expert"] is not None:
                s = mlp["shared_expert_prefix"]
                hidden += [
                    ParamSlice(f"{s}.gate_proj.weight", 1),
                    ParamSlice(f"{s}.up_proj.weight", 1),
                    ParamSlice(f"{s}.down_proj.weight", 0),
                ]
            if mlp["shared_expert_gate"] is not None:
                hidden.append(ParamSlice(mlp["shared_expert_gate"], 1))
        else:
            mlp = {"kind": "dense", "ffn": _gated_ffn(m, config.intermediate_size)}
            hidden += [
                ParamSlice(f"{m}.gate_proj.weight", 1),
                ParamSlice(f"{m}.up_proj.weight", 1),
                ParamSlice(f"{m}.down_proj.weight", 0),
            ]
        layers.append({"attention": attention, "mlp": mlp})

    hidden.append(ParamSlice("model.norm.weight", 0))
    tied = bool(config.tie_word_embeddings)
    if not tied:
        hidden.append(ParamSlice("lm_head.weight", 1))
    return {
        "hidden": _group(config.hidden_size, hidden, kind="hidden"),
        "layers": layers,
        "embedding": "model.embed_tokens.weight",
        "lm_head": "model.embed_tokens.weight" if tied else "lm_head.weight",
        "tied_parameters": {"lm_head.weight": "model.embed_tokens.weight"} if tied else {},
    }


def _is_moe_layer(family: str, config, layer: int) -> bool:
    if family in ("mixtral", "olmoe"):
        return True
    if family in ("qwen2_moe", "qwen3_moe"):
        return layer not in config.mlp_only_layers and (layer + 1) % config.decoder_sparse_step == 0
    if family == "deepseek_v3":
        return layer >= config.first_k_dense_replace
    return False


def _moe_layer(family: str, prefix: str, config) -> dict:
    common = {"top_k": config.num_experts_per_tok, "hidden": config.hidden_size}
    if family in ("mixtral", "olmoe"):
        # These two families size their experts with `intermediate_size`.
        experts = _routed_experts(
            prefix, num_experts=config.num_local_experts, expert_size=config.intermediate_size, **common
        )
    elif family in ("qwen2_moe", "qwen3_moe"):
        experts = _routed_experts(
            prefix, num_experts=config.num_experts, expert_size=config.moe_intermediate_size, **common
        )
    elif family == "deepseek_v3":
        experts = _routed_experts(
            prefix,
            num_experts=config.n_routed_experts,
            expert_size=config.moe_intermediate_size,
            router_bias=f"{prefix}.gate.e_score_correction_bias",
            expert_groups=config.n_group,
            topk_group=config.topk_group,
            **common,
        )
    else:
        raise ValueError(f"{family} has no MoE layers")
    shared = shared_prefix = shared_gate = None
    if family == "qwen2_moe":
        shared_prefix = f"{prefix}.shared_expert"
        shared = _gated_ffn(shared_prefix, config.shared_expert_intermediate_size)
        # Sigmoid gate [1, H]: a scalar per token that scales the shared expert output.
        shared_gate = f"{prefix}.shared_expert_gate.weight"
    elif family == "deepseek_v3":
        shared_prefix = f"{prefix}.shared_experts"
        shared = _gated_ffn(shared_prefix, config.moe_intermediate_size * config.n_shared_experts)
    return {
        **experts,
        "shared_expert": shared,
        "shared_expert_prefix": shared_prefix,
        "shared_expert_gate": shared_gate,
    }


def _mla_attention(prefix: str, config) -> dict:
    """DeepSeek multi-head latent attention.

    Per head h: q_b_proj rows [h*(nope+rope), ...) (nope first, then rope), kv_b_proj
    rows [h*(nope+v), ...) (k_nope first, then v), o_proj columns [h*v, ...). The rope
    part of the key (last qk_rope_head_dim rows of kv_a_proj_with_mqa) is shared by all
    heads. Two extra channel groups: the q and kv LoRA latents.
    """
    heads = config.num_attention_heads
    nope, rope, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    q_lora, kv_lora = config.q_lora_rank, config.kv_lora_rank
    kv_b = f"{prefix}.kv_b_proj.weight"
    attention = _attention(
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=nope + rope,
        v_head_dim=v,
        query=[ParamSlice(f"{prefix}.q_b_proj.weight", 0, width=nope + rope)],
        key_value=[
            ParamSlice(kv_b, 0, offset=0, width=nope, stride=nope + v),  # k_nope rows of each head
            ParamSlice(kv_b, 0, offset=nope, width=v, stride=nope + v),  # v rows of each head
        ],
        output=[ParamSlice(f"{prefix}.o_proj.weight", 1, width=v)],
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
    )
    attention["q_lora"] = _group(
        q_lora,
        [
            ParamSlice(f"{prefix}.q_a_proj.weight", 0),
            ParamSlice(f"{prefix}.q_a_layernorm.weight", 0),
            ParamSlice(f"{prefix}.q_b_proj.weight", 1),
        ],
        kind="latent",
    )
    attention["kv_lora"] = _group(
        kv_lora,
        [
            ParamSlice(f"{prefix}.kv_a_proj_with_mqa.weight", 0),  # rows [0, kv_lora); rows after are k_rope
            ParamSlice(f"{prefix}.kv_a_layernorm.weight", 0),
            ParamSlice(kv_b, 1),
        ],
        kind="latent",
    )
    return attention


def _gpt2_structure(config) -> dict:
    """GPT-2: Conv1D weights are [in, out], so output channels are dim 1 and inputs dim 0."""
    hidden_size, head_dim = config.n_embd, config.n_embd // config.n_head
    intermediate = config.n_inner or 4 * config.n_embd
    hidden = [ParamSlice("transformer.wte.weight", 1), ParamSlice("transformer.wpe.weight", 1)]
    layers = []
    for i in range(config.n_layer):
        p = f"transformer.h.{i}"
        c_attn, c_proj = f"{p}.attn.c_attn", f"{p}.attn.c_proj"
        hidden += [
            ParamSlice(f"{p}.ln_1.weight", 0),
            ParamSlice(f"{p}.ln_1.bias", 0),
            ParamSlice(f"{c_attn}.weight", 0),
            ParamSlice(f"{c_proj}.weight", 1),
            ParamSlice(f"{c_proj}.bias", 0),
            ParamSlice(f"{p}.ln_2.weight", 0),
            ParamSlice(f"{p}.ln_2.bias", 0),
            ParamSlice(f"{p}.mlp.c_fc.weight", 0),
            ParamSlice(f"{p}.mlp.c_proj.weight", 1),
            ParamSlice(f"{p}.mlp.c_proj.bias", 0),
        ]
        # c_attn output columns are [q | k | v], each hidden_size wide, heads contiguous inside.
        attention = _attention(
            num_heads=config.n_head,
            num_kv_heads=config.n_head,
            head_dim=head_dim,
            query=[
                ParamSlice(f"{c_attn}.weight", 1, offset=0, width=head_dim),
                ParamSlice(f"{c_attn}.bias", 0, offset=0, width=head_dim),
            ],
            key_value=[
                ParamSlice(f"{c_attn}.weight", 1, offset=hidden_size, width=head_dim),
                ParamSlice(f"{c_attn}.bias", 0, offset=hidden_size, width=head_dim),
                ParamSlice(f"{c_attn}.weight", 1, offset=2 * hidden_size, width=head_dim),
                ParamSlice(f"{c_attn}.bias", 0, offset=2 * hidden_size, width=head_dim),
            ],
            output=[ParamSlice(f"{c_proj}.weight", 0, width=head_dim)],
            fused_qkv=f"{c_attn}.weight",
        )
        ffn = _group(
            intermediate,
            [
                ParamSlice(f"{p}.mlp.c_fc.weight", 1),
                ParamSlice(f"{p}.mlp.c_fc.bias", 0),
                ParamSlice(f"{p}.mlp.c_proj.weight", 0),
            ],
            kind="ffn",
        )
        layers.append({"attention": attention, "mlp": {"kind": "dense", "ffn": ffn}})
    hidden += [ParamSlice("transformer.ln_f.weight", 0), ParamSlice("transformer.ln_f.bias", 0)]
    return {
        "hidden": _group(hidden_size, hidden, kind="hidden"),
        "layers": layers,
        "embedding": "transformer.wte.weight",
        "lm_head": "transformer.wte.weight",
        "tied_parameters": {"lm_head.weight": "transformer.wte.weight"},
    }


def _bert_structure(config) -> dict:
    """BERT encoder (post-LN). Its output ``last_hidden_state`` is indexed by the hidden
    channels, so pruning the hidden group changes the output width."""
    head_dim = config.hidden_size // config.num_attention_heads
    e = "embeddings"
    hidden = [
        ParamSlice(f"{e}.word_embeddings.weight", 1),
        ParamSlice(f"{e}.position_embeddings.weight", 1),
        ParamSlice(f"{e}.token_type_embeddings.weight", 1),
        ParamSlice(f"{e}.LayerNorm.weight", 0),
        ParamSlice(f"{e}.LayerNorm.bias", 0),
    ]
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}"
        s, o = f"{p}.attention.self", f"{p}.attention.output"
        for n in ("query", "key", "value"):
            hidden.append(ParamSlice(f"{s}.{n}.weight", 1))
        hidden += [
            ParamSlice(f"{o}.dense.weight", 0),
            ParamSlice(f"{o}.dense.bias", 0),
            ParamSlice(f"{o}.LayerNorm.weight", 0),
            ParamSlice(f"{o}.LayerNorm.bias", 0),
            ParamSlice(f"{p}.intermediate.dense.weight", 1),
            ParamSlice(f"{p}.output.dense.weight", 0),
            ParamSlice(f"{p}.output.dense.bias", 0),
            ParamSlice(f"{p}.output.LayerNorm.weight", 0),
            ParamSlice(f"{p}.output.LayerNorm.bias", 0),
        ]
        attention = _attention(
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_attention_heads,
            head_dim=head_dim,
            query=[
                ParamSlice(f"{s}.query.weight", 0, width=head_dim),
                ParamSlice(f"{s}.query.bias", 0, width=head_dim),
            ],
            key_value=[
                ParamSlice(f"{s}.{n}.{w}", 0, width=head_dim) for n in ("key", "value") for w in ("weight", "bias")
            ],
            output=[ParamSlice(f"{o}.dense.weight", 1, width=head_dim)],
        )
        ffn = _group(
            config.intermediate_size,
            [
                ParamSlice(f"{p}.intermediate.dense.weight", 0),
                ParamSlice(f"{p}.intermediate.dense.bias", 0),
                ParamSlice(f"{p}.output.dense.weight", 1),
            ],
            kind="ffn",
        )
        layers.append({"attention": attention, "mlp": {"kind": "dense", "ffn": ffn}})
    # The pooler reads the hidden channels; its own output (pooler_output) is a model output.
    hidden.append(ParamSlice("pooler.dense.weight", 1))
    hidden_group = _group(config.hidden_size, hidden, kind="hidden", is_model_output=True)
    return {
        "hidden": hidden_group,
        "layers": layers,
        "embedding": f"{e}.word_embeddings.weight",
        "lm_head": None,
        "tied_parameters": {},
    }


def expected_structure(family: str, **overrides: Any) -> dict[str, Any]:
    """The pruning structure a correct tracer must find in ``build_tiny(family, **overrides)``.

    Returns a dict::

        family, model_class, hidden_size, num_layers, vocab_size
        embedding, lm_head        state-dict names (lm_head is the embedding when tied)
        tied_parameters           {alias: canonical name}; the alias is absent from
                                  named_parameters() and from the exported program
        hidden                    group over the residual stream (every tensor that
                                  reads or writes it); ``is_model_output`` for BERT
        layers[i]["attention"]    num_heads, num_kv_heads, queries_per_kv, head_dim,
                                  v_head_dim, query_heads (group), kv_heads (group),
                                  head_norms; MLA adds q_lora / kv_lora latent groups
        layers[i]["mlp"]          {"kind": "dense", "ffn": group}  or
                                  {"kind": "moe", num_experts, top_k,
                                   expert_intermediate_size, router, router_bias,
                                   expert_groups, topk_group, expert_params {name: shape},
                                   experts (group of whole experts), expert_ffn[e] (group),
                                   shared_expert (group or None), shared_expert_prefix,
                                   shared_expert_gate}

    A group is ``{"size": units, "members": [ParamSlice, ...], "kind": ...}``; see
    :class:`ParamSlice` for how a unit maps to tensor indices. Every group is exact in
    the sense that applying one permutation of its units to all members leaves the model
    output unchanged (``tests/test_zoo.py`` checks this for every group).

    ``"cnn"`` gives the structure of :func:`tiny_cnn`.
    """
    if family == "cnn":
        return _cnn_structure()
    spec = TINY_FAMILIES[family]
    config = spec.make_config(**overrides)
    if family == "gpt2":
        structure = _gpt2_structure(config)
        num_layers, hidden = config.n_layer, config.n_embd
    elif family == "bert":
        structure = _bert_structure(config)
        num_layers, hidden = config.num_hidden_layers, config.hidden_size
    else:
        structure = _decoder_structure(family, config)
        num_layers, hidden = config.num_hidden_layers, config.hidden_size
    return {
        "family": family,
        "model_class": spec.model_class_name,
        "hidden_size": hidden,
        "num_layers": num_layers,
        "vocab_size": config.vocab_size,
        **structure,
    }


# ---------------------------------------------------------------------------------------
# Tiny CNN
# ---------------------------------------------------------------------------------------

# Channel widths of the CNN, all distinct so that each group is identifiable by size.
CNN_STEM = 16  # stem output = residual stream of the residual block = input of both branches
CNN_RES_INNER = 18  # inside the residual block
CNN_BRANCH_A = 6  # 1x1 branch, first in the concat
CNN_BRANCH_B = 14  # 3x3 branch, second in the concat
CNN_MERGE = 24  # conv after the concat, read by the classifier
CNN_CLASSES = 10


class ConvBNReLU(nn.Module):
    """conv (no bias) -> batch norm -> optional ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class ResidualBlock(nn.Module):
    """Basic ResNet block: x + bn(conv(relu(bn(conv(x))))), then ReLU."""

    def __init__(self, channels: int, inner_channels: int):
        super().__init__()
        self.conv1 = ConvBNReLU(channels, inner_channels, 3)
        self.conv2 = ConvBNReLU(inner_channels, channels, 3, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(self.conv1(x)))


class ConcatBlock(nn.Module):
    """Inception-style block: two branches concatenated along channels (a first, then b)."""

    def __init__(self, in_channels: int, a_channels: int, b_channels: int):
        super().__init__()
        self.branch_a = ConvBNReLU(in_channels, a_channels, 1)
        self.branch_b = ConvBNReLU(in_channels, b_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)


class TinyCNN(nn.Module):
    """stem -> residual block -> concat block -> strided conv -> global avg pool -> linear.

    Input ``[N, 3, H, W]`` (e.g. 16x16), output logits ``[N, 10]``.
    """

    def __init__(self, num_classes: int = CNN_CLASSES):
        super().__init__()
        self.stem = ConvBNReLU(3, CNN_STEM, 3)
        self.res = ResidualBlock(CNN_STEM, CNN_RES_INNER)
        self.cat = ConcatBlock(CNN_STEM, CNN_BRANCH_A, CNN_BRANCH_B)
        self.merge = ConvBNReLU(CNN_BRANCH_A + CNN_BRANCH_B, CNN_MERGE, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(CNN_MERGE, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.merge(self.cat(self.res(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_cnn(*, seed: int = 0, num_classes: int = CNN_CLASSES) -> TinyCNN:
    """A deterministic :class:`TinyCNN` in eval mode.

    Batch-norm affine parameters and running statistics are randomised (rather than the
    identity defaults) so that a wrongly pruned or permuted BN shows in the output.
    """
    with _fork_rng(seed):
        model = randomise_batch_norms(TinyCNN(num_classes))
    return model.eval()


def randomise_batch_norms(model: nn.Module) -> nn.Module:
    """Trained-like BatchNorm2d affine parameters and running statistics (from the current RNG): with the
    identity defaults a wrongly pruned or permuted norm does not show, and every folded conv bias of
    an export is zero (the TorchScript exporter then shares one zero initializer between convs)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def _bn_members(prefix: str) -> list[ParamSlice]:
    return [ParamSlice(f"{prefix}.{n}", 0) for n in ("weight", "bias", "running_mean", "running_var")]


def _cnn_structure() -> dict[str, Any]:
    """Channel groups of :func:`tiny_cnn` (conv weights are [out, in, kh, kw])."""
    groups = {
        # The residual add couples the stem output with the residual block output,
        # and both concat branches read it.
        "stem": _group(
            CNN_STEM,
            [
                ParamSlice("stem.conv.weight", 0),
                *_bn_members("stem.bn"),
                ParamSlice("res.conv1.conv.weight", 1),
                ParamSlice("res.conv2.conv.weight", 0),
                *_bn_members("res.conv2.bn"),
                ParamSlice("cat.branch_a.conv.weight", 1),
                ParamSlice("cat.branch_b.conv.weight", 1),
            ],
            kind="residual",
        ),
        "res_inner": _group(
            CNN_RES_INNER,
            [
                ParamSlice("res.conv1.conv.weight", 0),
                *_bn_members("res.conv1.bn"),
                ParamSlice("res.conv2.conv.weight", 1),
            ],
            kind="conv",
        ),
        # torch.cat puts branch_a's channels first: merge input channels [0, 6) and [6, 20).
        "branch_a": _group(
            CNN_BRANCH_A,
            [
                ParamSlice("cat.branch_a.conv.weight", 0),
                *_bn_members("cat.branch_a.bn"),
                ParamSlice("merge.conv.weight", 1, offset=0),
            ],
            kind="concat_input",
        ),
        "branch_b": _group(
            CNN_BRANCH_B,
            [
                ParamSlice("cat.branch_b.conv.weight", 0),
                *_bn_members("cat.branch_b.bn"),
                ParamSlice("merge.conv.weight", 1, offset=CNN_BRANCH_A),
            ],
            kind="concat_input",
        ),
        "merge": _group(
            CNN_MERGE,
            [ParamSlice("merge.conv.weight", 0), *_bn_members("merge.bn"), ParamSlice("fc.weight", 1)],
            kind="conv",
        ),
    }
    return {"family": "cnn", "model_class": "TinyCNN", "input_shape": (2, 3, 16, 16), "groups": groups}


@torch.no_grad()
def permute_units(model: nn.Module, group: dict[str, Any], permutation: list[int] | torch.Tensor) -> None:
    """Reorder the units of ``group`` in place in every member tensor of ``model``.

    After the call, unit ``k`` of each member holds what unit ``permutation[k]`` held.
    For a complete and correct group the model output is unchanged (up to float
    rounding), which is how the tests validate :func:`expected_structure`; a tracer's
    groups can be checked the same way.
    """
    state = model.state_dict(keep_vars=True)
    permutation = [int(u) for u in permutation]
    if sorted(permutation) != list(range(group["size"])):
        raise ValueError(f"not a permutation of {group['size']} units: {permutation}")
    for member in group["members"]:
        tensor = state[member.param]
        target, dim = (tensor, member.dim) if member.expert is None else (tensor[member.expert], member.dim - 1)
        index = torch.arange(target.shape[dim], device=target.device)
        for new_unit, old_unit in enumerate(permutation):
            new = list(member.unit_indices(new_unit))
            index[new] = torch.tensor(list(member.unit_indices(old_unit)), device=target.device)
        target.copy_(target.index_select(dim, index))
