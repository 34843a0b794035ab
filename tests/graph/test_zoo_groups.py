"""Dependency groups of every tiny-zoo family against the zoo's ground truth.

`graphprune.testing.zoo.expected_structure` lists, per family, the groups a correct tracer must
find (validated in tests/test_zoo.py by permuting units). Here every family is traced with
`analyze(model, example_inputs(config))` and its groups are compared member by member, down to the
flat indices of every unit:

* one hidden group (the residual stream),
* per layer the FFN channel group (dense FFN, shared expert, MLA latents),
* attention: a kv-group with its query heads nested inside (GQA) or a head group (MHA),
* per MoE layer one ``expert`` group (router rows, router bias, the expert axis of every stacked
  expert tensor) and one channel group *per expert*: ``W[expert_ids]`` + ``bmm`` never mixes the
  channels of two experts, so channel c of expert 0 and channel c of expert 1 are independent
  although they share an axis of ``gate_up_proj [E, 2I, H]``.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn as nn

from graphprune.graph import analyze
from graphprune.testing.zoo import TINY_FAMILIES, build_tiny, example_inputs, expected_structure, tiny_cnn

FAMILIES = sorted(TINY_FAMILIES)
_CACHE: dict[str, tuple] = {}


def analysed(family: str):
    """(GroupSet, expected structure, canonical-name map), traced once per family."""
    if family not in _CACHE:
        if family == "cnn":
            expected = expected_structure("cnn")
            groups = analyze(tiny_cnn(), (torch.randn(*expected["input_shape"]),))
        else:
            model, config = build_tiny(family)
            groups = analyze(model, example_inputs(config))
            expected = expected_structure(family)
        canonical = {alias: first for first, others in groups.graph.aliases.items() for alias in others}
        _CACHE[family] = (groups, expected, canonical)
    return _CACHE[family]


# ----------------------------------------------------------------------------- comparison helpers
def actual_units(group, canonical) -> dict[tuple, list[list[int]]]:
    """(param, axis, expert) -> per unit, the sorted flat indices the group removes."""
    out: dict[tuple, list[list[int]]] = {}
    for s in group.slices:
        key = (canonical.get(s.param, s.param), s.axis, s.expert)
        assert key not in out, f"{key} appears twice in {group.id}"
        out[key] = [sorted(row.tolist()) for row in s.indices]
    return out


def expected_units(units: int, unit_members) -> dict[tuple, list[list[int]]]:
    """Same shape from zoo ParamSlices; `unit_members(u)` lists (ParamSlice, zoo unit) pairs of unit u."""
    out: dict[tuple, list[set[int]]] = defaultdict(lambda: [set() for _ in range(units)])
    for u in range(units):
        for m, zoo_unit in unit_members(u):
            out[(m.param, m.dim, m.expert)][u].update(m.unit_indices(zoo_unit))
    return {k: [sorted(v) for v in rows] for k, rows in out.items()}


def plain(expected_group):
    """Unit u of the zoo group is unit u of the graph group."""
    return expected_units(expected_group["size"], lambda u: [(m, u) for m in expected_group["members"]])


def merged(units: int, parts):
    """Unit u covers several zoo groups' units: parts = [(zoo group, unit -> list of zoo units)]."""
    return expected_units(units, lambda u: [(m, z) for g, f in parts for z in f(u) for m in g["members"]])


def assert_same(group, canonical, expected: dict, what: str):
    actual = actual_units(group, canonical)
    assert set(actual) == set(expected), (
        f"{what}: members differ\n  missing {sorted(set(expected) - set(actual), key=str)}"
        f"\n  extra   {sorted(set(actual) - set(expected), key=str)}")
    if group.status in ("fixed", "blocked"):
        return  # no indices: such a group is never cut
    for key in expected:
        assert actual[key] == expected[key], f"{what}: indices of {key} differ"


def find(groups, canonical, expected: dict, kind: str):
    """The one group of `kind` whose members are exactly those of `expected`."""
    keys = set(expected)
    hits = [g for g in groups if g.kind == kind and set(actual_units(g, canonical)) == keys]
    assert len(hits) == 1, f"{len(hits)} {kind} groups with members {sorted(keys, key=str)}"
    return hits[0]


def layer_groups(groups, layer: int, kind: str):
    return [g for g in groups if g.kind == kind and g.layer == layer and g.status != "fixed"]


# ----------------------------------------------------------------------------- every family
@pytest.mark.parametrize("family", FAMILIES)
def test_traces_with_no_blocked_op(family):
    groups, _, _ = analysed(family)
    assert groups.graph.frontend == "torch.export"
    assert groups.blocked_ops == [], [f"{b.source_op} at {b.location}" for b in groups.blocked_ops]
    assert not groups.select(status="blocked")


@pytest.mark.parametrize("family", FAMILIES)
def test_one_hidden_group(family):
    groups, expected, canonical = analysed(family)
    assert {a: c for a, c in canonical.items()} == expected["tied_parameters"]
    hidden = groups.select(kind="hidden")
    assert len(hidden) == 1
    (h,) = hidden
    assert h.units == expected["hidden_size"]
    assert_same(h, canonical, plain(expected["hidden"]), "hidden")
    # BERT's last_hidden_state is a model output indexed by the hidden channels.
    assert h.status == ("fixed" if expected["hidden"].get("is_model_output") else "opt-in")


@pytest.mark.parametrize("family", FAMILIES)
def test_ffn_channel_groups(family):
    groups, expected, canonical = analysed(family)
    for i, layer in enumerate(expected["layers"]):
        mlp = layer["mlp"]
        wanted = [mlp["ffn"]] if mlp["kind"] == "dense" else [mlp["shared_expert"]] if mlp["shared_expert"] else []
        for ffn in wanted:
            g = find(groups, canonical, plain(ffn), "channel")
            assert g.units == ffn["size"] and g.layer == i and g.status == "prunable"
            assert g.parent is None and all(s.expert is None for s in g.slices)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_heads(family):
    groups, expected, canonical = analysed(family)
    for i, layer in enumerate(expected["layers"]):
        att = layer["attention"]
        q, kv, per = att["query_heads"], att["kv_heads"], att["queries_per_kv"]
        if att["num_kv_heads"] < att["num_heads"]:
            # GQA: unit g of the kv-group = kv head g and its `per` query heads; unit j of the nested
            # head group = query head j of every kv-group.
            (kvg,) = layer_groups(groups, i, "kv-group")
            assert kvg.units == att["num_kv_heads"] and kvg.status == "prunable"
            assert_same(kvg, canonical, merged(kvg.units, [
                (kv, lambda g: [g]), (q, lambda g: range(g * per, (g + 1) * per))]), f"layer {i} kv-group")
            assert len(kvg.children) == 1
            head = groups.by_id(kvg.children[0])
            assert head.kind == "head" and head.parent == kvg.id and head.units == per
            assert head.status == "prunable"
            assert_same(head, canonical, merged(per, [
                (q, lambda j: [g * per + j for g in range(att["num_kv_heads"])])]), f"layer {i} query heads")
            assert [g.id for g in layer_groups(groups, i, "head")] == [head.id]
        else:
            # MHA: one head group; removing head h removes its q, k, v rows and o columns.
            assert not layer_groups(groups, i, "kv-group")
            (head,) = layer_groups(groups, i, "head")
            assert head.units == att["num_heads"] and head.status == "prunable" and head.parent is None
            assert_same(head, canonical, merged(head.units, [(q, lambda h: [h]), (kv, lambda h: [h])]),
                        f"layer {i} heads")
        for latent in ("q_lora", "kv_lora"):  # DeepSeek MLA latent ranks
            if latent in att:
                g = find(groups, canonical, plain(att[latent]), "channel")
                assert g.units == att[latent]["size"] and g.status == "prunable" and g.layer == i


MOE_FAMILIES = sorted(f for f, spec in TINY_FAMILIES.items() if spec.is_moe)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_one_expert_group_per_moe_layer(family):
    groups, expected, canonical = analysed(family)
    for i, layer in enumerate(expected["layers"]):
        mlp = layer["mlp"]
        experts = layer_groups(groups, i, "expert")
        if mlp["kind"] != "moe":
            assert not experts and not layer_groups(groups, i, "expert-group")
            continue
        (g,) = experts
        want = mlp["experts"]
        n, n_groups = mlp["num_experts"], mlp["expert_groups"]
        assert g.status == "prunable"
        if n_groups == 1:
            assert g.units == n and g.parent is None
            assert_same(g, canonical, plain(want), f"layer {i} experts")
        else:
            # Group-limited routing (DeepSeek n_group): scores are viewed [groups, n / groups], so an
            # expert is (group, expert-in-group), and every group must keep the same number of
            # experts. The algebra gives the nested pair, as for GQA heads: whole expert groups, and
            # expert j of every group.
            per = n // n_groups
            parent = groups.by_id(g.parent)
            assert parent.kind == "expert-group" and parent.children == [g.id]
            assert parent.units == n_groups and g.units == per and parent.status == "prunable"
            assert_same(parent, canonical, merged(n_groups, [(want, lambda k: range(k * per, (k + 1) * per))]),
                        f"layer {i} expert groups")
            assert_same(g, canonical, merged(per, [(want, lambda j: [k * per + j for k in range(n_groups)])]),
                        f"layer {i} experts")
        # The shared expert is not routed: none of its tensors is in the expert group.
        if mlp["shared_expert_prefix"]:
            assert not [s for s in g.slices if s.param.startswith(mlp["shared_expert_prefix"] + ".")]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_channel_groups_inside_each_expert(family):
    """`gate_up_proj [E, 2I, H]` holds every expert's channels on axis 1, but the graph reads it only
    as `W[expert_ids]` followed by a per-slot `bmm`: nothing mixes channel c of expert e with channel
    c of another expert, so each expert has its own channel group (the zoo's expert_ffn[e])."""
    groups, expected, canonical = analysed(family)
    for i, layer in enumerate(expected["layers"]):
        mlp = layer["mlp"]
        if mlp["kind"] != "moe":
            continue
        for e, ffn in enumerate(mlp["expert_ffn"]):
            g = find(groups, canonical, plain(ffn), "channel")
            assert g.units == mlp["expert_intermediate_size"] and g.status == "prunable" and g.layer == i
            assert {s.expert for s in g.slices} == {e} and {s.expert_axis for s in g.slices} == {0}
        # ... and no group couples one channel across experts.
        stacked = set(mlp["expert_params"])
        shared = [g for g in groups if g.kind == "channel" and {s.param for s in g.slices} & stacked
                  and any(s.expert is None for s in g.slices)]
        assert not shared, [g.members() for g in shared]


@pytest.mark.parametrize("family", FAMILIES)
def test_no_unexpected_prunable_groups(family):
    """Besides the groups above, only head_dim groups (opt-in, never offered by default) are left."""
    groups, expected, _ = analysed(family)
    counts: dict[str, int] = defaultdict(int)
    for layer in expected["layers"]:
        att, mlp = layer["attention"], layer["mlp"]
        counts["kv-group" if att["num_kv_heads"] < att["num_heads"] else "head"] += 1
        counts["head"] += att["num_kv_heads"] < att["num_heads"]
        counts["channel"] += sum(k in att for k in ("q_lora", "kv_lora"))
        if mlp["kind"] == "dense":
            counts["channel"] += 1
        else:
            counts["expert"] += 1
            counts["expert-group"] += mlp["expert_groups"] > 1
            counts["channel"] += mlp["num_experts"] + (mlp["shared_expert"] is not None)
    found: dict[str, int] = defaultdict(int)
    for g in groups:
        if g.status == "prunable":
            found[g.kind] += 1
        elif g.status == "opt-in":
            assert g.kind in ("hidden", "head_dim"), g.id
    assert dict(found) == {k: n for k, n in counts.items() if n}


# ----------------------------------------------------------------------------- CNN
def test_cnn_groups():
    groups, expected, canonical = analysed("cnn")
    assert groups.blocked_ops == []
    for name, want in expected["groups"].items():
        g = find(groups, canonical, plain(want), "channel")
        assert g.units == want["size"] and g.status == "prunable", name
    assert len(groups.select(status="prunable")) == len(expected["groups"])


# ----------------------------------------------------------------------------- per-expert coupling
class StackedExperts(nn.Module):
    """batched_mm-style MoE: router top-k, W[ids] and bmm. With `shared_bias`, one [I] bias is
    added to every expert's hidden channels: channel c is then the same channel in all experts."""

    def __init__(self, shared_bias: bool, hidden=12, inter=10, experts=4, k=2):
        super().__init__()
        self.k = k
        self.router = nn.Linear(hidden, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, inter, hidden))
        self.down = nn.Parameter(torch.randn(experts, hidden, inter))
        self.bias = nn.Parameter(torch.randn(inter)) if shared_bias else None

    def forward(self, x):
        weights, ids = self.router(x).softmax(-1).topk(self.k, dim=-1)
        ids = ids.reshape(-1)
        xr = x.repeat_interleave(self.k, 0)
        h = torch.bmm(self.up[ids], xr.unsqueeze(-1)).squeeze(-1)
        if self.bias is not None:
            h = h + self.bias
        y = torch.bmm(self.down[ids], torch.relu(h).unsqueeze(-1)).squeeze(-1)
        return x + (y * weights.reshape(-1, 1)).view(x.shape[0], self.k, -1).sum(1)


@pytest.mark.parametrize("shared_bias", [False, True])
def test_expert_channels_split_only_when_nothing_crosses_experts(shared_bias):
    groups = analyze(StackedExperts(shared_bias).eval(), (torch.randn(6, 12),))
    channels = [g for g in groups if g.kind == "channel" and g.prunable]
    (expert,) = groups.select(kind="expert")
    assert expert.units == 4 and {(s.param, s.axis) for s in expert.slices} == {
        ("router.weight", 0), ("up", 0), ("down", 0)}
    if shared_bias:
        (g,) = channels
        assert {(s.param, s.axis, s.expert) for s in g.slices} == {("up", 1, None), ("down", 2, None),
                                                                    ("bias", 0, None)}
    else:
        assert len(channels) == 4
        for e, g in enumerate(channels):
            assert g.units == 10
            assert {(s.param, s.axis, s.expert) for s in g.slices} == {("up", 1, e), ("down", 2, e)}
            assert np.array_equal(g.slices[0].indices.reshape(-1), np.arange(10))


# ----------------------------------------------------------------------------- writes into views
class WritesIntoViews(nn.Module):
    """`y[:, 4:20] = a(x)` and `z[:, 1] = b(x)`: in-place copies into a slice and a select view,
    functionalised into slice_scatter / select_scatter (DeepSeek MLA builds its keys this way)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(8, 10)
        self.c, self.d = nn.Linear(24, 8), nn.Linear(10, 8)

    def forward(self, x):
        y = x.new_zeros(x.shape[0], 24)
        y[:, 4:20] = self.a(x)
        z = x.new_zeros(x.shape[0], 3, 10)
        z[:, 1] = self.b(x)
        return self.c(y) + self.d(z.sum(1))


def test_slice_and_select_scatter_keep_channels():
    groups = analyze(WritesIntoViews().eval(), (torch.randn(2, 8),))
    assert groups.blocked_ops == []
    a = next(g for g in groups if ("a.weight", 0) in {(s.param, s.axis) for s in g.slices})
    assert a.prunable and a.units == 16
    c_in = next(s for s in a.slices if s.param == "c.weight")
    assert c_in.axis == 1 and c_in.indices.reshape(-1).tolist() == list(range(4, 20))
    b = next(g for g in groups if ("b.weight", 0) in {(s.param, s.axis) for s in g.slices})
    assert b.prunable and b.units == 10
    assert {(s.param, s.axis) for s in b.slices} == {("b.weight", 0), ("b.bias", 0), ("d.weight", 1)}
