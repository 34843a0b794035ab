"""Channels inside routed experts: the intermediate dimension of every expert of stacked weights
(`experts.gate_up_proj` [E, 2I, H] rows c and I + c, `experts.down_proj` [E, H, I] column c).

The graph gives one ``channel`` group per expert (its slices carry ``ParamSlice.expert``). HF builds
all experts of a layer from one intermediate size, so the experts of one stacked tensor must keep
the same number of channels. The rule here: **one count per layer, channels ranked per expert**.
Each expert removes its own lowest-scoring channels (channel c of expert 0 and channel c of
expert 1 are unrelated); how many is decided once per layer. For that the allocators see a
*bundle*, one virtual group per stacked tensor whose unit j scores the mean over the experts of
their j-th lowest score and costs the parameters of all experts: removing k units of the bundle
removes the k lowest channels of every expert. Uniform allocation gives every layer the same
count; global and cfsp give per-layer counts (written as `graphprune_layer_overrides`). The kept
count is then rounded to the nearest multiple of `ALIGN` (8): transformers' default grouped_mm
experts cannot run other widths, so the achieved sparsity can differ a little from the request.

Calibration criteria read the input of each expert's down projection, a_t = act(gate_e h_t) ⊙
up_e h_t over the tokens routed to that expert (unweighted by the gate, as for a dense layer the
statistics are of what the layer reads). It is computed from the stacked weights in a hook on the
experts module and checked once per layer against the module's own forward (one expert at weight
1), so an expert layout this code does not know is refused, never scored from wrong activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..allocation import Allocation, lowest
from ..calibration.stats import Calibration, InputStats
from ..criteria.base import consumer_slices, module_of, stats_key
from ..errors import PruningError
from ..graph.groups import Group
from .layers import routing_forward
from .routing import routing_args


# Kept channels per expert are a multiple of this: transformers' default experts kernel (grouped_mm)
# refuses rows that are not 16-byte aligned ("strides should be multiple of 16 bytes" on CPU),
# i.e. widths that are not a multiple of 8 in bf16 / 4 in fp32; a pruned model must still run.
ALIGN = 8


def is_expert_channel(group: Group) -> bool:
    return any(s.expert is not None for s in group.slices)


@dataclass
class ExpertChannelBundles:
    """The per-expert channel groups of `chosen` bundled per layer (see module docstring)."""

    members: dict[str, list[Group]]  # bundle id -> the per-expert groups (one per expert), tied groups after

    @classmethod
    def of(cls, chosen: list[Group], config=None) -> "ExpertChannelBundles":
        """Bundles of one layer's experts of one stacked tensor, named by the config key that sizes
        them. A plain channel group of the same layer sized by the same key joins the bundle: the
        config gives both one size (DeepSeek builds its shared experts from moe_intermediate_size)."""
        from ..passes.config import CHANNEL_KEYS, EXPERT_CHANNEL_KEYS, find_key

        def bundle_of(g: Group, inside: bool) -> str:
            key = find_key(config, EXPERT_CHANNEL_KEYS if inside else CHANNEL_KEYS, g.units) if config else None
            return f"experts:{g.layer}:{key or sorted((s.param, s.axis) for s in g.slices)}"

        members: dict[str, list[Group]] = {}
        for g in chosen:
            if is_expert_channel(g):
                members.setdefault(bundle_of(g, True), []).append(g)
        for g in chosen:
            if g.kind == "channel" and not is_expert_channel(g) and bundle_of(g, False) in members:
                members[bundle_of(g, False)].append(g)
        for bundle, groups in members.items():
            if len({g.units for g in groups}) != 1:
                raise PruningError(f"{groups[0].scope}: parts sized by one config value have different channel "
                                   f"counts {sorted({g.units for g in groups})}")
        return cls(members)

    def __bool__(self) -> bool:
        return bool(self.members)

    def for_allocation(self, chosen: list[Group], scores: dict[str, np.ndarray],
                       comparable: dict[str, np.ndarray] | None
                       ) -> tuple[list[Group], dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """(groups, scores, comparable scores) with every bundle's members replaced by the bundle."""
        bundled = {g.id for groups in self.members.values() for g in groups}
        groups = [g for g in chosen if g.id not in bundled]
        out_scores = {k: v for k, v in scores.items() if k not in bundled}
        out_comparable = None if comparable is None else {k: v for k, v in comparable.items() if k not in bundled}
        for bundle, members in self.members.items():
            first = members[0]
            orders = [np.lexsort((np.arange(g.units), scores_of(g, scores))) for g in members]
            out_scores[bundle] = np.mean([scores_of(g, scores)[o] for g, o in zip(members, orders)], axis=0)
            if out_comparable is not None:
                out_comparable[bundle] = np.mean([np.asarray(comparable[g.id])[o] for g, o in zip(members, orders)],
                                                 axis=0)
            groups.append(replace(first, id=bundle, slices=[], scope=module_of(first.slices[0].param),
                                  params_per_unit=sum(g.params_per_unit for g in members),
                                  flops_per_unit=sum(g.flops_per_unit for g in members)))
        return groups, out_scores, out_comparable

    def expand(self, plan: Allocation, scores: dict[str, np.ndarray], round_to: int = 1) -> Allocation:
        """The bundles' counts applied to their experts: each expert loses its own lowest channels.
        Kept counts are rounded to the nearest multiple of `ALIGN` (and of `round_to`), see there."""
        removed = {k: v for k, v in plan.removed.items() if k not in self.members}
        floored = [g for g in plan.floored if g not in self.members]
        multiple = math.lcm(ALIGN, max(1, round_to))
        notes = list(plan.notes)
        for bundle, members in self.members.items():
            units = members[0].units
            count = len(plan.removed.get(bundle, ()))
            if count and units > multiple:
                kept = min(units, max(multiple, multiple * round((units - count) / multiple)))
                count = units - kept
            for g in members:
                removed[g.id] = lowest(scores_of(g, scores), count)
            if bundle in plan.floored:
                floored += [g.id for g in members]
        if self.members:
            notes.append(f"channels inside routed experts kept in multiples of {multiple} (transformers' grouped_mm "
                         f"experts need 16-byte aligned rows)")
        return Allocation(removed, floored, notes)

    def kept(self, removed: dict[str, np.ndarray]) -> dict[str, int]:
        """Layer -> channels each expert keeps (for the report)."""
        return {str(members[0].layer): members[0].units - len(removed.get(members[0].id, ()))
                for members in self.members.values()}


def scores_of(group: Group, scores: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(scores[group.id], dtype=np.float64)


# ------------------------------------------------------------------------------ calibration
def expert_input_hooks(model: torch.nn.Module, chosen: list[Group]) -> tuple[list[str], list]:
    """(statistics keys, hook installers for `calibrate.collect`) for the expert down projections
    that the chosen groups read as consumers."""
    wanted: dict[str, tuple[int | None, dict[int, _Input]]] = {}  # experts module -> (layer, expert -> input)
    for g in chosen:
        for s in consumer_slices(g):
            if s.expert is not None:
                wanted.setdefault(module_of(s.param), (g.layer, {}))[1][s.expert] = _Input(stats_key(s),
                                                                                             s.shape[s.axis])
    modules = dict(model.named_modules())
    installers = [_installer(modules[name], f"layer {layer} ({name})", experts)
                  for name, (layer, experts) in wanted.items()]
    return sorted(i.key for _, experts in wanted.values() for i in experts.values()), installers


@dataclass
class _Input:
    key: str  # calibration statistics key (`criteria.base.stats_key`)
    width: int  # the expert's intermediate size


def _installer(module: torch.nn.Module, where: str, experts: dict[int, _Input]):
    forward = routing_forward(module, where)

    def install(result: Calibration):
        for info in experts.values():
            zeros = torch.zeros(info.width, dtype=torch.float64)
            result.inputs[info.key] = InputStats(0, zeros.clone(), zeros.clone())
        checked = []

        def hook(mod, args, kwargs, output):
            hidden, index, _ = routing_args(args, kwargs)
            hidden = hidden.reshape(-1, hidden.shape[-1])
            index = index.reshape(hidden.shape[0], -1)
            for expert, info in experts.items():
                tokens = hidden[(index == expert).any(dim=-1)]
                if tokens.shape[0] == 0:
                    continue
                inputs = expert_down_inputs(mod, tokens, expert, where)
                if not checked:
                    _check_reproduces(mod, forward, tokens, expert, inputs, where)
                    checked.append(True)
                st = result.inputs[info.key]
                x = inputs.to(torch.float64)
                st.count += x.shape[0]
                st.sum += x.sum(0)
                st.sumsq += (x * x).sum(0)

        return module.register_forward_hook(hook, with_kwargs=True)

    return install


def expert_down_inputs(module: torch.nn.Module, hidden: torch.Tensor, expert: int, where: str) -> torch.Tensor:
    """a = act(gate_e h) ⊙ up_e h: what expert `expert`'s down projection reads, for tokens `hidden`."""
    transposed = bool(getattr(module, "is_transposed", False))
    gated = getattr(module, "has_gate", True) and hasattr(module, "gate_up_proj")
    weight = getattr(module, "gate_up_proj" if gated else "up_proj", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
        raise PruningError(f"{where}: the experts module {type(module).__name__} has no stacked gate_up_proj / "
                           f"up_proj; calibration criteria cannot read inside its experts (use magnitude)")
    w = weight[expert]
    out = hidden @ w if transposed else hidden @ w.T
    bias = getattr(module, "gate_up_proj_bias" if gated else "up_proj_bias", None) \
        if getattr(module, "has_bias", False) else None
    if bias is not None:
        out = out + bias[expert]
    if not gated:
        return module.act_fn(out)
    if hasattr(module, "_apply_gate"):
        return module._apply_gate(out)
    gate, up = out.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def _check_reproduces(module, forward, tokens, expert, inputs, where) -> None:
    down = module.down_proj[expert]
    mine = inputs @ down if getattr(module, "is_transposed", False) else inputs @ down.T
    if getattr(module, "has_bias", False) and getattr(module, "down_proj_bias", None) is not None:
        mine = mine + module.down_proj_bias[expert]
    if getattr(module, "has_post_expert_norm", False):
        mine = module.post_expert_norm(mine)
    ones = torch.ones(tokens.shape[0], 1, dtype=tokens.dtype)
    index = torch.full((tokens.shape[0], 1), expert, dtype=torch.long)
    theirs = forward(tokens, index, ones)
    scale = theirs.abs().max().clamp_min(1e-6)
    if not torch.allclose(mine.to(theirs.dtype), theirs, atol=1e-4 * float(scale), rtol=1e-3):
        raise PruningError(f"{where}: the experts module {type(module).__name__} does not compute "
                           f"down(act(gate h) * up h) from its stacked weights as expected; calibration criteria "
                           f"cannot read inside its experts (use magnitude, or --target experts)")
