"""MoE layers as expert pruning sees them: which router, which experts, one unit per routed expert.

The graph gives one ``expert`` group per MoE layer (the units addressed through the router's
top-k choices): router rows, router bias, DeepSeek's ``e_score_correction_bias`` and the slabs of
the stacked expert tensors. Group-limited routing (DeepSeek's ``n_group``) shows up as an
``expert-group`` with the ``expert`` group nested inside; here both are flattened into one group
whose unit ``e`` is routed expert ``e``. Shared experts are never in these groups: no router
choice addresses them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from ..criteria.base import module_of
from ..errors import PruningError
from ..graph.groups import BLOCKED, EXPERT, EXPERT_GROUP, FIXED, Group, GroupSet, ParamSlice


@dataclass
class ExpertLayer:
    layer: int
    scope: str  # the MoE block, e.g. model.layers.3.mlp
    router: str  # module whose weight rows score the experts (e.g. model.layers.3.mlp.gate)
    experts: str  # module holding the stacked expert tensors (e.g. model.layers.3.mlp.experts)
    group: Group  # units = routed experts, unit e = expert e
    top_k: int  # experts each token is routed to
    n_group: int = 1  # routing groups (DeepSeek): experts are removed in equal numbers per group
    topk_group: int = 1  # groups each token may use

    @property
    def num_experts(self) -> int:
        return self.group.units


def find_expert_layers(model: torch.nn.Module, groups: GroupSet) -> list[ExpertLayer]:
    """One `ExpertLayer` per MoE layer; a clear `PruningError` for a dense model, an expert group that
    cannot be pruned, or a layer whose router cannot be identified."""
    routed = [g for g in groups if g.kind == EXPERT]
    if not routed:
        raise PruningError(f"{type(model).__name__} has no routed experts (a dense model): --target experts needs a "
                           f"mixture-of-experts model")
    config = getattr(model, "config", None)
    modules = dict(model.named_modules())
    layers: list[ExpertLayer] = []
    for g in routed:
        where = f"layer {g.layer} ({g.scope})"
        if g.status in (BLOCKED, FIXED):
            raise PruningError(f"{where}: its experts cannot be pruned: {g.reason or g.status}")
        parent = groups.by_id(g.parent) if g.parent else None
        if parent is not None and parent.kind != EXPERT_GROUP:
            parent = None
        flat = _flatten(g, parent)
        router = _router_of(flat, where)
        experts = _experts_module(flat, where)
        top_k = _top_k(modules.get(router), config)
        if top_k is None:
            raise PruningError(f"{where}: cannot tell how many experts each token is routed to (no top_k on the "
                               f"router, no num_experts_per_tok in the config)")
        n_group = parent.units if parent is not None else 1
        topk_group = int(getattr(config, "topk_group", None) or n_group) if n_group > 1 else 1
        layers.append(ExpertLayer(g.layer, _common_scope(router, experts), router, experts, flat, top_k, n_group,
                                  topk_group))
    return layers


def _flatten(child: Group, parent: Group | None) -> Group:
    """The group whose unit e is expert e: the child itself, or (group-limited routing) the parent's
    units split into their experts."""
    if parent is None:
        return child
    experts = parent.units * child.units
    slices = []
    for s in parent.slices:
        if s.width % child.units:
            raise PruningError(f"{parent.scope}: expert groups of unequal widths in {s.param}")
        slices.append(ParamSlice(s.param, s.axis, s.indices.reshape(experts, -1), s.role, s.op, s.shape))
    return Group(id=child.id, kind=EXPERT, units=experts, unit_size=1, slices=slices, scope=parent.scope,
                 layer=parent.layer, status=child.status, params_per_unit=parent.params_per_unit // child.units,
                 flops_per_unit=parent.flops_per_unit / child.units, root=child.root)


def _router_of(group: Group, where: str) -> str:
    """The linear layer whose output rows are the expert scores: `linear.out` on a 2-D weight."""
    rows = [s for s in group.slices if s.role == "linear.out" and len(s.shape) == 2]
    routers = sorted({module_of(s.param) for s in rows})
    if len(routers) != 1:
        found = "no linear layer" if not routers else f"{len(routers)} linear layers ({', '.join(routers)})"
        raise PruningError(f"{where}: cannot identify the router: {found} produce(s) one score per expert; members: "
                           f"{', '.join(s.describe() for s in group.slices[:4])}")
    s = next(r for r in rows if module_of(r.param) == routers[0])
    # unit e must be row e: the rewrite keeps rows of the router and slabs of the experts in step
    if not np.array_equal(s.indices.reshape(-1), np.arange(group.units)):
        raise PruningError(f"{where}: the router rows are not in expert order; cannot rewrite this layout")
    return routers[0]


def _experts_module(group: Group, where: str) -> str:
    stacked = sorted({module_of(s.param) if "." in s.param else s.param for s in group.slices if len(s.shape) == 3})
    if len(stacked) != 1:
        raise PruningError(f"{where}: expected the experts as stacked [experts, ...] tensors of one module, found "
                           f"{stacked or 'none'}")
    return stacked[0]


def _top_k(router: torch.nn.Module | None, config) -> int | None:
    value = getattr(router, "top_k", None) or getattr(config, "num_experts_per_tok", None)
    return int(value) if value else None


def _common_scope(a: str, b: str) -> str:
    parts = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        parts.append(x)
    return ".".join(parts)


def routing_forward(module: torch.nn.Module, where: str):
    """The experts module's forward as f(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]):
    the contract of transformers' stacked experts (`use_experts_implementation`)."""
    params = inspect.signature(module.forward).parameters.values()
    if len(params) < 3 and not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        raise PruningError(f"{where}: the experts module {type(module).__name__} does not take (hidden_states, "
                           f"top_k_index, top_k_weights); expert calibration cannot run it")
    return module.forward
