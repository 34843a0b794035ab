from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..models.structure import find_blocks
from ..errors import PruningError
from ..graph.groups import Group
from .base import Pass, PassError, PassResult, RewriteState

# Config keys by meaning, most common spelling first. The matching key is the one whose current
# value equals the group's original unit count, so nothing here is tied to a model family.
CHANNEL_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "moe_intermediate_size",
                "shared_expert_intermediate_size", "ffn_hidden_size", "q_lora_rank", "kv_lora_rank")
# Inside routed experts the expert-specific spelling comes first: a family with both (Qwen2-MoE,
# DeepSeek) builds its experts from moe_intermediate_size and its dense layers from intermediate_size.
EXPERT_CHANNEL_KEYS = ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size", "ffn_dim")
HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
KV_KEYS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")
# Routed experts per MoE layer (Mixtral, Qwen-MoE / OLMoE, DeepSeek, ...).
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
OVERRIDES_KEY = "graphprune_layer_overrides"


@dataclass
class ConfigResult:
    config: Any
    layer_values: dict[int, dict[str, int]]
    uniform: bool
    bias_keys: list[str] = field(default_factory=list)


def find_key(config, keys: tuple[str, ...], value: int) -> str | None:
    for k in keys:
        if getattr(config, k, None) == value:
            return k
    if keys is CHANNEL_KEYS and getattr(config, "n_inner", "missing") is None:
        return "n_inner"  # GPT-2 leaves n_inner unset, meaning 4 * n_embd
    return None


def head_dim_of(config) -> int | None:
    explicit = getattr(config, "head_dim", None)
    if explicit:
        return int(explicit)
    heads = next((getattr(config, k) for k in HEAD_KEYS if getattr(config, k, None)), None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return hidden // heads if heads and hidden else None


def instantiate(model_class, config, device: str | torch.device = "meta") -> torch.nn.Module:
    """Build `model_class(config)` honouring per-layer overrides, without random initialisation."""
    from transformers.initialization import no_init_weights

    with torch.device(device), no_init_weights():
        model = model_class(config)
        apply_layer_overrides(model, config)
    return model


def apply_layer_overrides(model: torch.nn.Module, config) -> None:
    """Rebuild the blocks that `graphprune_layer_overrides` gives other sizes (in the current
    device / init context)."""
    overrides = getattr(config, OVERRIDES_KEY, None) or {}
    if not overrides:
        return
    found = find_blocks(model)
    if found is None:
        raise PruningError("per-layer sizes need a model with a list of layers")
    _, blocks = found
    for index in overrides:
        block_class = type(blocks[int(index)])
        params = inspect.signature(block_class.__init__).parameters
        own = layer_config(config, int(index))
        blocks[int(index)] = (block_class(own, layer_idx=int(index)) if "layer_idx" in params
                              else block_class(own))


def layer_config(config, layer: int):
    """The config layer `layer` is built from: `config` with that layer's overrides applied (the
    config itself when the layer has none)."""
    values = (getattr(config, OVERRIDES_KEY, None) or {}).get(str(layer))
    if not values:
        return config
    own = copy.deepcopy(config)
    setattr(own, OVERRIDES_KEY, None)
    for key, value in values.items():
        setattr(own, key, value)
    return own


def per_layer_class(model_class):
    """A subclass of `model_class` whose constructor applies the per-layer overrides, so that
    transformers' own `from_pretrained` (with its checkpoint key conversions, e.g. Mixtral's
    per-expert tensors stacked on load) builds and fills a heterogeneous model."""
    return type(model_class.__name__, (model_class,), {
        "__init__": lambda self, config, *args, **kwargs: (
            model_class.__init__(self, config, *args, **kwargs), apply_layer_overrides(self, config))[0],
        "__module__": model_class.__module__,
    })


class ConfigRewrite:
    """Write the pruned sizes into the config: intermediate size, head counts (and `head_dim`
    explicitly, since hidden_size / heads no longer gives it), bias flags for compensated layers.
    Layers that differ become per-layer overrides (`graphprune_layer_overrides`)."""

    def run(self, config, model_class, groups: list[Group], removed: dict[str, np.ndarray],
            state_shapes: dict[str, tuple[int, ...]], new_biases: list[str], n_layers: int) -> ConfigResult:
        new = copy.deepcopy(config)
        head_dim = head_dim_of(config)
        by_id = {g.id: g for g in groups}
        # A model pruned before with per-layer sizes (re-pruning a graphprune output): each layer's
        # sizes are read from its own config, the global one overlaid with its overrides.
        own_configs: dict[int, Any] = {}

        def own(layer: int):
            if layer not in own_configs:
                own_configs[layer] = layer_config(config, layer)
            return own_configs[layer]

        layer_values: dict[int, dict[str, int]] = {}
        for g in groups:
            if g.layer is None:
                raise PruningError(f"group {g.id} ({g.kind} {g.scope}) is not inside a layer; "
                                   f"the config cannot describe its new size")
            kept = g.units - len(removed.get(g.id, ()))
            values = layer_values.setdefault(g.layer, {})
            cfg = own(g.layer)
            if g.kind == "channel":
                inside_experts = any(s.expert is not None for s in g.slices)
                key = find_key(cfg, EXPERT_CHANNEL_KEYS if inside_experts else CHANNEL_KEYS, g.units)
                if key is None:
                    raise PruningError(f"no config key holds the size {g.units} of {g.scope}; cannot rewrite the config")
                if values.get(key, kept) != kept:
                    raise PruningError(f"layer {g.layer}: {key} sizes two parts that keep different numbers of "
                                       f"channels ({values[key]} and {kept}, {g.scope}); the config can only describe "
                                       f"equal sizes: use --allocation uniform or prune one of them")
                values[key] = kept
            elif g.kind == "kv-group":
                child = by_id.get(g.children[0]) if g.children else None
                per_group = (child.units - len(removed.get(child.id, ()))) if child else \
                    _find_heads(cfg) // max(g.units, 1)
                values[find_key(cfg, KV_KEYS, g.units) or "num_key_value_heads"] = kept
                values[find_key(cfg, HEAD_KEYS, _find_heads(cfg)) or "num_attention_heads"] = kept * per_group
            elif g.kind == "head":
                if g.parent and g.parent in by_id:
                    continue  # written with its kv-group
                kv = _find_kv(cfg)
                heads = _find_heads(cfg)
                if kv is not None and kv != heads:  # query heads within untouched kv groups
                    values[find_key(cfg, HEAD_KEYS, heads) or "num_attention_heads"] = kv * kept
                else:
                    values[find_key(cfg, HEAD_KEYS, heads) or "num_attention_heads"] = kept
                    if kv is not None:
                        values[find_key(cfg, KV_KEYS, kv) or "num_key_value_heads"] = kept
            elif g.kind == "expert":
                key = find_key(cfg, EXPERT_KEYS, g.units)
                if key is None:
                    raise PruningError(f"no config key holds the {g.units} routed experts of {g.scope}; cannot "
                                       f"rewrite the config")
                values[getattr(config, "attribute_map", {}).get(key, key)] = kept
            else:
                raise PruningError(f"pruning {g.kind} groups is not supported by the HF config rewrite")
        if any(k in HEAD_KEYS for v in layer_values.values() for k in v) and head_dim:
            new.head_dim = head_dim
        # Every layer states every key: the new sizes, else its current ones (earlier overrides kept).
        previous = getattr(config, OVERRIDES_KEY, None) or {}
        keys = sorted({k for v in layer_values.values() for k in v} | {k for v in previous.values() for k in v})

        def current(layer: int, key: str) -> int:
            value = getattr(own(layer), key, None)
            return value if value is not None else _default_of(config, key)

        # A layer without routed experts (DeepSeek's first dense layers) does not read the expert
        # count: it takes the MoE layers' value so that uniform MoE layers stay one plain config.
        expert_fill = {k: next(v[k] for _, v in sorted(layer_values.items()) if k in v)
                       for k in keys if k in EXPERT_KEYS and any(k in v for v in layer_values.values())}

        def size(layer: int, key: str) -> int:
            if key in layer_values.get(layer, {}):
                return layer_values[layer][key]
            return expert_fill[key] if key in expert_fill else current(layer, key)

        full = {i: {k: size(i, k) for k in keys} for i in range(n_layers)}
        uniform = len({tuple(sorted(v.items())) for v in full.values()}) <= 1
        if full:
            base = full[0]
            for k, v in base.items():
                setattr(new, k, v)
            if uniform:
                new.__dict__.pop(OVERRIDES_KEY, None)
            else:
                setattr(new, OVERRIDES_KEY, {str(i): v for i, v in full.items() if v != base})
        bias_keys = self._bias_flags(new, model_class, new_biases) if new_biases else []
        self._verify(new, model_class, state_shapes, {s.param for g in groups for s in g.slices})
        return ConfigResult(new, full, uniform, bias_keys)

    @staticmethod
    def _bias_flags(config, model_class, modules: list[str]) -> list[str]:
        """Find boolean config keys that give the compensated layers a bias (e.g. `attention_bias`,
        `mlp_bias` for Llama) by trying them on a meta model."""
        needed = set(modules)
        candidates = [k for k, v in config.to_dict().items() if isinstance(v, bool) and not v and "bias" in k]
        chosen = []
        for key in candidates:
            trial = copy.deepcopy(config)
            setattr(trial, key, True)
            for k in chosen:
                setattr(trial, k, True)
            names = {n.rsplit(".", 1)[0] for n, _ in instantiate(model_class, trial).named_parameters()
                     if n.endswith(".bias")}
            if names & needed:
                chosen.append(key)
                needed -= names
            if not needed:
                break
        if needed:
            raise PruningError(f"no config flag adds a bias to {sorted(needed)[:3]}: use --compensate none")
        for key in chosen:
            setattr(config, key, True)
        return chosen

    @staticmethod
    def _verify(config, model_class, state_shapes: dict[str, tuple[int, ...]], pruned: set[str] = frozenset()
                ) -> None:
        try:
            if hasattr(config, "validate"):  # what save_pretrained checks (e.g. hidden % heads for Llama)
                config.validate()
            model = instantiate(model_class, config)
        except PruningError:
            raise
        except Exception as exc:  # noqa: BLE001 - the family's config validation refuses the sizes
            raise PruningError(f"{type(config).__name__} refuses the pruned sizes: {' '.join(str(exc).split())}"
                               f"{_HEADS_HINT if not _has_native_head_dim(config) else ''}") from exc
        expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
        wrong = [f"{n}: weights {state_shapes[n]} vs config {expected[n]}" for n in state_shapes
                 if n in expected and tuple(state_shapes[n]) != expected[n]]
        if wrong:
            hint = _HEADS_HINT if any("attn" in w or "attention" in w for w in wrong) else ""
            untouched = [n for n in state_shapes if n in expected and tuple(state_shapes[n]) != expected[n]
                         and n not in pruned]
            if untouched:  # e.g. DeepSeek sizes its shared experts with the routed experts' moe_intermediate_size
                hint += (f" ({untouched[0]} was not pruned, but the config sizes it with the same key as the pruned "
                         f"weights: prune both together, e.g. --target channels with --allocation uniform)")
            raise PruningError("the rewritten config does not describe the pruned weights: " + "; ".join(wrong[:2]) + hint)


_HEADS_HINT = (" (this architecture derives head_dim from hidden_size / heads, so removed heads cannot be "
               "described in its config: use --target channels)")


def _has_native_head_dim(config) -> bool:
    """Does the family's config know `head_dim` itself (Llama does; BERT and GPT-2 derive it)?"""
    try:
        return "head_dim" in type(config)().to_dict()
    except Exception:  # noqa: BLE001 - a config that needs arguments: assume it does not
        return False


def _find_heads(config) -> int:
    return next(getattr(config, k) for k in HEAD_KEYS if getattr(config, k, None))


def _find_kv(config) -> int | None:
    return next((getattr(config, k) for k in KV_KEYS if getattr(config, k, None)), None)


def _default_of(config, key: str) -> int:
    if key == "n_inner":
        return 4 * config.n_embd
    raise PruningError(f"config key {key} has no value")


class ConfigPass(Pass[RewriteState]):
    """The config of the pruned shapes (`ConfigRewrite`), from the sliced tensors' shapes."""

    name = "config"

    def requires(self, rewrite: RewriteState) -> None:
        if rewrite.config is None or rewrite.model_class is None:
            raise PassError("the config rewrite needs the model's config and class")

    def call(self, rewrite: RewriteState) -> PassResult[RewriteState]:
        shapes = {k: tuple(v.shape) for k, v in rewrite.tensors.items()}
        rewrite.config_result = ConfigRewrite().run(rewrite.config, rewrite.model_class, rewrite.groups,
                                                    rewrite.removed, shapes, rewrite.new_biases, rewrite.n_layers)
        rewrite.config = rewrite.config_result.config
        return PassResult(rewrite, True)


def heads_expressible(model: torch.nn.Module, groups) -> bool:
    """Can the config describe one head fewer per layer? Tried on a meta model: families that
    derive head_dim from hidden_size / heads (BERT, GPT-2) cannot."""
    config = getattr(model, "config", None)
    head_groups = [g for g in groups if g.kind in ("kv-group", "head") and g.prunable]
    heads = next((getattr(config, k) for k in HEAD_KEYS if getattr(config, k, None)), None)
    if heads is None or not head_groups:
        return False
    kv = next((g for g in head_groups if g.kind == "kv-group"), None)
    trial = copy.deepcopy(config)
    try:
        setattr(trial, find_key(config, HEAD_KEYS, heads), heads - (heads // kv.units if kv is not None else 1))
        if kv is not None:
            kv_key = find_key(config, KV_KEYS, kv.units)
            if kv_key:
                setattr(trial, kv_key, kv.units - 1)
        trial.head_dim = head_dim_of(config)
        meta = instantiate(type(model), trial)
    except Exception:  # noqa: BLE001 - the config refuses such a head count
        return False
    probe = head_groups[0].slices[0]
    size = dict(meta.named_parameters(remove_duplicate=False)).get(probe.param)
    if size is None:
        return False
    expected = model.get_parameter(probe.param).shape[probe.axis] - probe.width
    return size.shape[probe.axis] == expected
