"""Dependency groups derived from traced graphs, checked against known structure and against
Torch-Pruning's DependencyGraph as an independent oracle."""

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from graphprune.graph import analyze
from graphprune.graph.report import render


def tiny_llama(layers=2, heads=4, kv=2, head_dim=16, hidden=64, inter=96, tied=False):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, num_hidden_layers=layers, vocab_size=128, head_dim=head_dim,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


class ResidualConcatNet(nn.Module):
    """conv-bn-relu, a residual block, two branches concatenated, a classifier."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3, self.c4 = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 12, 1)
        self.c5 = nn.Conv2d(20, 24, 3, padding=1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = x + torch.relu(self.b2(self.c2(x)))
        y = torch.cat([self.c3(x), self.c4(x)], 1)
        y = self.c5(y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def members(group):
    return {(s.param, s.axis) for s in group.slices}


def test_llama_ffn_channels_are_one_group_per_layer():
    groups = analyze(tiny_llama())
    ffn = [g for g in groups if g.kind == "channel" and g.prunable]
    assert len(ffn) == 2
    for layer, g in enumerate(ffn):
        p = f"model.layers.{layer}.mlp"
        assert g.units == 96 and g.layer == layer
        assert members(g) == {(f"{p}.gate_proj.weight", 0), (f"{p}.up_proj.weight", 0), (f"{p}.down_proj.weight", 1)}


def test_gqa_offers_kv_groups_and_query_heads_within_groups():
    groups = analyze(tiny_llama(heads=6, kv=2, hidden=96))
    kv = [g for g in groups if g.kind == "kv-group"]
    heads = [g for g in groups if g.kind == "head"]
    assert len(kv) == len(heads) == 2
    g, h = kv[0], groups.by_id(kv[0].children[0])
    assert g.units == 2 and h.units == 3 and h.parent == g.id
    a = "model.layers.0.self_attn"
    assert members(g) == {(f"{a}.q_proj.weight", 0), (f"{a}.k_proj.weight", 0), (f"{a}.v_proj.weight", 0),
                          (f"{a}.o_proj.weight", 1)}
    assert members(h) == {(f"{a}.q_proj.weight", 0), (f"{a}.o_proj.weight", 1)}
    q = next(s for s in g.slices if s.param.endswith("q_proj.weight"))
    assert q.indices[1].tolist() == list(range(48, 96))  # kv group 1 = query heads 3,4,5
    hq = next(s for s in h.slices if s.param.endswith("q_proj.weight"))
    assert hq.indices[1].tolist() == list(range(16, 32)) + list(range(64, 80))  # head 1 of each group


def test_rope_fixes_query_key_head_dim_and_hidden_is_opt_in():
    groups = analyze(tiny_llama())
    rope = [g for g in groups if g.kind == "head_dim" and g.status == "fixed"]
    assert rope and "rotary_emb.inv_freq" in rope[0].reason
    assert any(s.param.endswith("q_proj.weight") for s in rope[0].slices)
    hidden = [g for g in groups if g.kind == "hidden"]
    assert len(hidden) == 1 and hidden[0].status == "opt-in" and hidden[0].units == 64
    assert not [g for g in groups if g.status == "blocked"]


def test_tied_embedding_is_one_vocab_group_fixed_by_the_interface():
    groups = analyze(tiny_llama(tied=True))
    vocab = [g for g in groups if g.units == 128]
    assert len(vocab) == 1 and vocab[0].status == "fixed"


def test_cnn_residual_and_concat_channels():
    groups = analyze(ResidualConcatNet().eval(), (torch.randn(1, 3, 8, 8),))
    by_member = {m: g for g in groups for m in members(g)}
    residual = by_member[("c1.weight", 0)]
    assert residual.units == 16 and residual.prunable
    assert {("c2.weight", 0), ("c2.weight", 1), ("b2.running_mean", 0), ("c3.weight", 1)} <= members(residual)
    c3 = by_member[("c3.weight", 0)]
    c4 = by_member[("c4.weight", 0)]
    assert c3 is not c4 and c3.units == 8 and c4.units == 12
    # the consumer of the concatenation is split at the boundary
    c5_in = next(s for s in c3.slices if s.param == "c5.weight")
    assert c5_in.axis == 1 and c5_in.indices.reshape(-1).tolist() == list(range(8))
    c5_in = next(s for s in c4.slices if s.param == "c5.weight")
    assert c5_in.indices.reshape(-1).tolist() == list(range(8, 20))
    assert by_member[("c1.weight", 1)].status == "fixed"  # image channels: model input
    assert by_member[("c1.weight", 2)].status == "fixed"  # kernel window


# ----------------------------------------------------------------------------- oracle
def _tp_coupling(model, example, output_transform=None, roots=()):
    tp = pytest.importorskip("torch_pruning")
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, output_transform=output_transform)
    names = {m: n for n, m in model.named_modules()}
    out = []
    for module in roots:
        if isinstance(module, nn.Conv2d):
            fn = tp.prune_conv_out_channels
        else:
            fn = tp.prune_linear_out_channels
        group = dg.get_pruning_group(module, fn, idxs=[0])
        pairs = set()
        for dep, _ in group:
            target = dep.target.module
            if target in names and isinstance(target, (nn.Conv2d, nn.Linear)):
                side = "out" if "out_channels" in getattr(dep.handler, "__name__", "") else "in"
                pairs.add((names[target], side))
        out.append((names[module], pairs))
    return out


def _our_coupling(group):
    pairs = set()
    for s in group.slices:
        module, leaf = s.param.rsplit(".", 1)
        if leaf == "weight" and s.role in ("conv.out", "conv.in", "linear.out", "linear.in"):
            pairs.add((module, s.role.split(".")[1]))
    return pairs


def test_cnn_coupling_agrees_with_torch_pruning():
    model = ResidualConcatNet().eval()
    groups = analyze(model, (torch.randn(1, 3, 8, 8),))
    roots = [model.c1, model.c2, model.c3, model.c4, model.c5]
    for name, expected in _tp_coupling(model, torch.randn(1, 3, 8, 8), roots=roots):
        ours = next(g for g in groups if (f"{name}.weight", 0) in members(g))
        assert _our_coupling(ours) == expected, name


def test_llama_ffn_and_hidden_coupling_agree_with_torch_pruning():
    model = tiny_llama()
    groups = analyze(model)
    layer = model.model.layers[0]
    roots = [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj, layer.self_attn.o_proj]
    example = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    for name, expected in _tp_coupling(model, example, lambda o: o.logits, roots):
        ours = next(g for g in groups if (f"{name}.weight", 0) in members(g))
        # Torch-Pruning tracks nn.Linear/Conv only; the embedding and norms are in our group too.
        assert _our_coupling(ours) == expected, name


# ----------------------------------------------------------------------------- blocked ops
@torch.library.custom_op("graphprune_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1) * 2


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class MysteryMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)
        self.up2, self.down2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        x = x + self.down(mystery(torch.relu(self.up(x))))
        return x + self.down2(torch.relu(self.up2(x)))


def test_an_op_without_a_rule_blocks_its_groups_and_is_named():
    groups = analyze(MysteryMLP().eval(), (torch.randn(2, 8),))
    blocked = [g for g in groups if g.status == "blocked"]
    assert blocked and all("mystery" in g.reason for g in blocked)
    assert any(("up.weight", 0) in members(g) for g in blocked)
    ok = next(g for g in groups if ("up2.weight", 0) in members(g))
    assert ok.prunable and ok.units == 16
    text = render(groups)
    assert "BLOCKED" in text and "graphprune_test.mystery" in text and "at " in text


def test_group_json_is_machine_readable():
    import json

    data = json.loads(analyze(tiny_llama()).to_json())
    kinds = {g["kind"] for g in data["groups"]}
    assert {"channel", "kv-group", "head", "hidden"} <= kinds
    assert data["summary"]["ops_without_rule"] == []


# ----------------------------------------------------------------------------- FX fallback
class DataDependentBranch(nn.Module):
    """torch.export refuses a branch on a tensor's value; recording follows the branch taken."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 24), nn.Linear(24, 8)

    def forward(self, x):
        h = torch.relu(self.up(x))
        if h.sum() > 0:
            h = h * 2
        return x + self.down(h)


def test_fx_fallback_is_used_and_said_when_export_fails():
    groups = analyze(DataDependentBranch().eval(), (torch.randn(2, 8),))
    assert groups.graph.frontend == "torch.fx (recorded)"
    assert any("torch.export failed" in n for n in groups.graph.notes)
    ffn = next(g for g in groups if ("up.weight", 0) in members(g))
    assert ffn.prunable and ffn.units == 24 and ("down.weight", 1) in members(ffn)
