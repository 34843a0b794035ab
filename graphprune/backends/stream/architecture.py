"""The architecture of a checkpoint without its weights, and its dependency groups per layer.

The model is built on the `meta` device (shapes only, no memory). Its groups come from tracing a
small instance of the same architecture: two layers, a narrow residual stream (hidden size) and a
small vocabulary, but the checkpoint's own head count, KV-head count, head dimension and
intermediate size. The axes that get pruned (FFN channels, heads, KV groups) therefore have
exactly the real sizes, so every group's unit indices are the real ones; only the hidden axis,
which streaming does not prune, is narrower. The groups of the small model's layer 0 are then
copied onto every layer of the real model (checked: its layer 1 must look the same, and so must
every real layer), with parameter counts and FLOPs recomputed for the real widths.

Group ids follow the numbering the in-memory trace of the full model gives (groups ordered by
first use) where that trace repeats one order per layer (Llama, Mistral, Gemma), so reports and
the allocator's tie-breaks (equal scores) agree with `graphprune.compress` there.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, replace

import numpy as np
import torch

from ...models.structure import find_blocks
from ...errors import ModelLoadError, UserError
from ...graph.groups import Group, GroupSet, ParamSlice, flop_terms
from ...graph.ir import PARAM, STATE
from ...passes.config import EXPERT_KEYS, HEAD_KEYS, head_dim_of, instantiate
from .checkpoint import Checkpoint

TRACE_LAYERS = 2
# The small instance's hidden size: the smallest multiple of the head count at least this big.
TRACE_HIDDEN_AT_LEAST = 16
TRACE_VOCAB_AT_LEAST = 256


class StreamingUnsupported(UserError):
    """The model or the options need the whole model in memory."""


@dataclass
class LayerGroups:
    """The groups of the real model: per layer, plus those outside the layers."""

    layers: list[list[Group]]  # index = layer
    outside: list[Group]  # embedding rows, the hidden stream, shared rotary dims, LM head ...
    traced: GroupSet  # the small instance's groups (its graph notes go to the report)
    flops_per_token: float  # of the real model, as the in-memory trace of it would count them

    def all(self) -> list[Group]:
        return [g for layer in self.layers for g in layer] + self.outside


class Architecture:
    """Config, model class and a meta-device skeleton of the checkpoint's model."""

    def __init__(self, checkpoint: Checkpoint, *, trust_remote_code: bool = False) -> None:
        from ...models.loading import is_causal_lm, load_config

        self.checkpoint = checkpoint
        self.config = load_config(checkpoint.directory, trust_remote_code=trust_remote_code)
        if not is_causal_lm(self.config):
            raise StreamingUnsupported(f"{checkpoint.directory} is not a decoder language model "
                                       f"({type(self.config).__name__}); streaming prunes causal LMs only")
        if any(getattr(self.config, k, None) for k in EXPERT_KEYS):
            raise StreamingUnsupported("mixture-of-experts models are not supported by streaming yet: prune them "
                                       "in memory (without --stream)")
        if getattr(self.config, "graphprune_layer_overrides", None):
            raise StreamingUnsupported("this is a graphprune output with per-layer sizes; streaming needs layers "
                                       "of one shape: prune it in memory (without --stream)")
        from transformers import AutoModelForCausalLM

        try:
            with torch.device("meta"):
                self.model_class = type(AutoModelForCausalLM.from_config(self.config,
                                                                          trust_remote_code=trust_remote_code))
            self.skeleton = instantiate(self.model_class, self.config)  # meta: shapes only
            tie(self.skeleton)
        except Exception as error:  # noqa: BLE001 - the family refuses this config
            raise ModelLoadError(f"cannot build {type(self.config).__name__} from {checkpoint.directory}/config.json: "
                                 f"{' '.join(str(error).split())[:300]}") from error
        found = find_blocks(self.skeleton)
        if found is None:
            raise StreamingUnsupported(f"{self.model_class.__name__}: no list of repeated layers found")
        self.prefix, self.blocks = found
        self.n_layers = len(self.blocks)
        self._check_weights_match()

    # ------------------------------------------------------------------ names
    def layer_prefix(self, index: int) -> str:
        return f"{self.prefix}.{index}."

    def layer_names(self, index: int) -> list[str]:
        """The checkpoint tensors of layer `index`, in the model's order."""
        p = self.layer_prefix(index)
        return [n for n in self.persistent if n.startswith(p)]

    def outside_names(self) -> list[str]:
        """Checkpoint tensors outside the layers (embedding, final norm, LM head unless tied)."""
        p = f"{self.prefix}."
        return [n for n in self.persistent if not n.startswith(p) and n in self.checkpoint.tensors]

    def rename(self, text: str, index: int) -> str:
        """A layer-0 name (or message) of the traced instance, for layer `index`."""
        return re.sub(rf"(^|\W){re.escape(self.prefix)}\.0(\.|\b)", rf"\g<1>{self.prefix}.{index}\2", text)

    # ------------------------------------------------------------------ checks
    def _check_weights_match(self) -> None:
        """Every tensor the model saves is in the checkpoint with the same shape, and nothing else is
        (the names are read by name: a family that renames keys on load cannot be streamed)."""
        state = self.skeleton.state_dict()
        tied = set(getattr(self.skeleton, "all_tied_weights_keys", None) or {})
        self.tied = {k for k in tied if k in state}
        self.persistent = [k for k in state if k not in self.tied or k in self.checkpoint.tensors]
        where = f"config.json in {self.checkpoint.directory} does not match its weights"
        missing = [k for k in self.persistent if k not in self.checkpoint.tensors]
        if missing:
            raise ModelLoadError(f"{where}: {len(missing)} tensors are missing from the weights, e.g. {missing[0]}")
        wrong = [k for k in self.persistent if tuple(state[k].shape) != self.checkpoint.tensors[k].shape]
        if wrong:
            k = wrong[0]
            raise ModelLoadError(f"{where}: {k} is {self.checkpoint.tensors[k].shape} in the weights but "
                                 f"{tuple(state[k].shape)} per the config")
        ignore = [re.compile(p) for p in (getattr(self.skeleton, "_keys_to_ignore_on_load_unexpected", None) or [])]
        extra = [k for k in self.checkpoint.tensors if k not in state and not any(p.search(k) for p in ignore)]
        if extra:
            raise StreamingUnsupported(f"the weights hold tensors the {self.model_class.__name__} does not have "
                                       f"(e.g. {extra[0]}): transformers may rename them on load, which streaming "
                                       f"does not do; prune in memory (without --stream)")
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        first = [n[len(self.layer_prefix(0)):] for n in self.layer_names(0)]
        for i in range(1, self.n_layers):
            names = [n[len(self.layer_prefix(i)):] for n in self.layer_names(i)]
            if names != first or any(self.shapes[self.layer_prefix(i) + n] != self.shapes[self.layer_prefix(0) + n]
                                     for n in names):
                raise StreamingUnsupported(f"layer {i} differs in shape from layer 0; streaming needs layers of one "
                                           f"shape: prune in memory (without --stream)")

    # ------------------------------------------------------------------ groups
    def trace_config(self):
        """The config of the small same-architecture instance that is traced (see the module doc)."""
        config = copy.deepcopy(self.config)
        heads = next((getattr(config, k) for k in HEAD_KEYS if getattr(config, k, None)), None)
        if heads is None:
            raise StreamingUnsupported(f"{type(config).__name__} states no attention head count; streaming "
                                       f"traces decoders with attention heads")
        config.head_dim = head_dim_of(self.config)  # families that read it keep the real head size
        config.hidden_size = heads * math.ceil(TRACE_HIDDEN_AT_LEAST / heads)
        specials = [getattr(config, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")]
        specials = [x for v in specials for x in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(x, int)]
        config.vocab_size = min(config.vocab_size, max(TRACE_VOCAB_AT_LEAST, max(specials, default=0) + 1))
        n = config.num_hidden_layers
        for key, value in list(vars(config).items()):  # per-layer lists (layer_types, ...) follow the depth
            if isinstance(value, list) and len(value) == n and key != "architectures":
                setattr(config, key, value[:TRACE_LAYERS])
        config.num_hidden_layers = TRACE_LAYERS
        return config

    def groups(self) -> LayerGroups:
        from ...graph import analyze

        torch.manual_seed(0)
        small = self.model_class(self.trace_config()).eval()
        traced = analyze(small)
        per_layer = [[g for g in traced if g.layer == i] for i in range(TRACE_LAYERS)]
        template = per_layer[0]
        if not template:
            raise StreamingUnsupported("the traced layers have no dependency groups")
        width = len(template)
        # Layer 1 must hold the same groups (its order may differ: groups first used by the same op
        # are ordered by their atoms, not by name).
        twin: dict[str, Group] = {}
        unmatched = list(per_layer[1])
        for g in template:
            match = next((b for b in unmatched if _same_structure(g, b, self, 1)), None)
            if match is None:
                break
            twin[g.id] = match
            unmatched.remove(match)
        if unmatched or len(twin) != width:
            raise StreamingUnsupported("the traced layers do not repeat one pattern of groups; streaming needs "
                                       "identical layers: prune in memory (without --stream)")
        # Real ids: the traced order up to layer 1 (layer 0 and what its ops use first), layer 1's
        # order repeated for layers 1..N-1, then the rest (LM head).
        order = list(traced)
        split = next(k for k, g in enumerate(order) if g.layer == 1)
        head, rest = order[:split], order[split:]
        if any(g.layer == 0 for g in rest):
            raise StreamingUnsupported("the traced layers interleave; streaming needs one layer after the other")
        ids: dict[tuple[int | None, str], str] = {}
        for g in head:
            ids[(g.layer, g.id)] = f"g{len(ids)}"
        by_twin = {b.id: a.id for a, b in ((a, twin[a.id]) for a in template)}
        for i in range(1, self.n_layers):
            for b in rest:
                if b.layer == 1:
                    ids[(i, by_twin[b.id])] = f"g{len(ids)}"
        for g in rest:
            if g.layer is None:
                ids[(None, g.id)] = f"g{len(ids)}"
        small_shapes = {n: tuple(p.shape) for n, p in small.state_dict().items()}

        def layer_id(index: int, tiny_id: str | None) -> str | None:
            return None if tiny_id is None else ids[(index, tiny_id)]

        layers = []
        for i in range(self.n_layers):
            layer = []
            for g in template:
                slices = [replace(s, param=self.rename(s.param, i), shape=self.shapes[self.rename(s.param, i)])
                          for s in g.slices]
                for s, small_slice in zip(slices, g.slices):
                    if s.shape[s.axis] != small_slice.shape[s.axis]:
                        raise StreamingUnsupported(
                            f"{type(self.config).__name__} derives the head size from the hidden size (or another "
                            f"pruned axis from a width streaming narrows: {s.param} axis {s.axis}), so streaming "
                            f"cannot trace a narrow copy of it: prune in memory (without --stream)")
                per_unit = _params_per_unit(g.units, slices)
                small_per_unit = _params_per_unit(g.units, g.slices)
                layer.append(replace(
                    g, id=layer_id(i, g.id), slices=slices, scope=self.rename(g.scope, i), layer=i,
                    reason=self.rename(g.reason, i) if g.reason else g.reason, params_per_unit=per_unit,
                    # the hidden width enters the FLOPs of a unit only through its linear weights
                    # (2 FLOPs per weight and token); attention's own terms do not depend on it
                    flops_per_unit=g.flops_per_unit + 2.0 * (per_unit - small_per_unit),
                    parent=layer_id(i, g.parent), children=[layer_id(i, c) for c in g.children]))
            layers.append(layer)
        outside = [replace(g, id=ids[(None, g.id)]) for g in traced if g.layer is None]
        del small
        return LayerGroups(layers, outside, traced, self._flops_per_token(traced, small_shapes))

    def _flops_per_token(self, traced: GroupSet, small_shapes: dict[str, tuple[int, ...]]) -> float:
        """FLOPs per token of the real model, as the in-memory trace of it would count them: an op with
        a weight costs 2 FLOPs per real weight element; other ops (attention) keep the traced cost;
        ops of the traced layer 0 stand for every real layer."""
        graph = traced.graph
        total = 0.0
        layer0 = re.compile(rf"^{re.escape(self.prefix)}\.0(\.|$)")
        later = re.compile(rf"^{re.escape(self.prefix)}\.[1-9]\d*(\.|$)")
        for op, flops, _ in flop_terms(graph, traced.propagation):
            if later.match(op.location or ""):
                continue
            weight = next((graph.tensors[t].source_name for t in op.inputs[1:]
                           if t is not None and graph.tensors[t].kind in (PARAM, STATE)), None)
            replicas = range(self.n_layers) if layer0.match(op.location or "") else [None]
            for i in replicas:
                if weight is not None and op.op in ("linear", "matmul", "addmm") and weight in small_shapes:
                    name = self.rename(weight, i) if i is not None else weight
                    total += 2.0 * math.prod(self.shapes[name])
                else:
                    total += flops / max(traced.tokens, 1)
        return total


def tie(model: torch.nn.Module) -> None:
    """Tie the LM head to the embedding when the config says so (a meta model is built untied)."""
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.tie_weights()


def _params_per_unit(units: int, slices: list[ParamSlice]) -> int:
    """Parameters one unit of a group holds (as graph/groups.py counts them) for the slices' shapes."""
    total = 0
    for s in slices:
        width = s.indices.shape[1] if s.indices.size else s.shape[s.axis] // units
        other = int(np.prod([n for k, n in enumerate(s.shape) if k not in (s.axis, s.expert_axis)]))
        total += width * other
    return total


def _same_structure(a: Group, b: Group, arch: Architecture, index: int) -> bool:
    """Group `b` of layer `index` is group `a` of layer 0 moved to that layer."""
    if (a.kind, a.units, a.status, a.unit_size, len(a.slices)) != (b.kind, b.units, b.status, b.unit_size,
                                                                  len(b.slices)):
        return False
    return all(arch.rename(x.param, index) == y.param and x.axis == y.axis and x.role == y.role
               and np.array_equal(x.indices, y.indices) for x, y in zip(a.slices, b.slices))
