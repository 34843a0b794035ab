"""Channels inside routed experts: the intermediate dimension of each expert of stacked weights.

The reference for a pruned model is the dense model with the removed channels zeroed: rows c and
I + c of `gate_up_proj[e]` (gate and up) and column c of `down_proj[e]` of every expert e, and the
rows/columns of any other pruned FFN channel. act(0) * 0 = 0, so that is exactly the smaller model.
"""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphprune.calibration.stats import collect
from graphprune.errors import PruningError
from graphprune.io.hf import save_pruned
from graphprune.graph import analyze
from graphprune.moe import find_expert_layers
from graphprune.moe.channels import expert_input_hooks, is_expert_channel
from graphprune.pipeline.run import compress
from graphprune.pipeline.targets import select_groups
from graphprune.testing.fixtures import byte_level_tokenizer, write_sample_text
from graphprune.testing.reload import logits_in_fresh_process
from graphprune.testing.zoo import build_tiny, example_inputs

EXPERT_SIZE_KEY = {"mixtral": "intermediate_size", "qwen2_moe": "moe_intermediate_size",
                   "qwen3_moe": "moe_intermediate_size", "olmoe": "intermediate_size"}


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return str(write_sample_text(tmp_path_factory.mktemp("calib") / "calib.txt"))


def prune(model, calib_file, **options):
    options = {"target": "channels", "sparsity": 0.2, "compensate": "none", **options}
    return compress(model, tokenizer=byte_level_tokenizer(), calib=calib_file, nsamples=8, seqlen=32,
                    progress=False, **options)


def zeroed_reference(dense, result):
    reference = copy.deepcopy(dense)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for gid, units in result.removed.items():
            for s in result.groups.by_id(gid).slices:
                part, axis = s.local(params[s.param].data)
                part.index_fill_(axis, torch.as_tensor(s.indices[units].reshape(-1)), 0.0)
    return reference


def removed_per_expert(result, layer):
    """expert -> removed channels of that expert in `layer`."""
    out = {}
    for gid, units in result.removed.items():
        g = result.groups.by_id(gid)
        if g.layer == layer and is_expert_channel(g):
            out[g.slices[0].expert] = sorted(units.tolist())
    return out


@pytest.mark.parametrize("family,criterion,allocation", [
    ("mixtral", "magnitude", "uniform"), ("mixtral", "flap", "global"), ("qwen2_moe", "wanda-sp", "global"),
    ("qwen3_moe", "cfsp", "cfsp"), ("qwen3_moe", "flap", "uniform"), ("olmoe", "magnitude", "global")])
def test_pruned_experts_equal_the_dense_model_with_the_removed_channels_zeroed(family, criterion, allocation,
                                                                              calib_file):
    dense, config = build_tiny(family)
    result = prune(dense, calib_file, criterion=criterion, allocation=allocation)
    kept = result.report["kept_units"]["expert_channel"]
    # multiples of 8: transformers' default grouped_mm experts cannot run other widths
    assert set(kept) == {"0", "1"} and min(kept.values()) < 24 and all(k % 8 == 0 for k in kept.values())
    for layer, count in kept.items():
        experts = result.model.model.layers[int(layer)].mlp.experts
        # every expert of a layer keeps the same count (one intermediate size per layer)
        assert experts.gate_up_proj.shape == (8, 2 * count, 64) and experts.down_proj.shape == (8, 64, count)
        assert {len(r) for r in removed_per_expert(result, int(layer)).values()} == {24 - count}
    if result.report["uniform_layers"]:
        assert getattr(result.model.config, EXPERT_SIZE_KEY[family]) == kept["0"]
    ids = example_inputs(config, batch_size=2, seq_len=24)["input_ids"]
    with torch.no_grad():
        diff = (result.model(input_ids=ids).logits - zeroed_reference(dense, result)(input_ids=ids).logits).abs().max()
    assert diff.item() <= 1e-5, f"{family}/{criterion}: max abs diff {diff.item()}"


def test_each_expert_removes_its_own_weakest_channels():
    model, _ = build_tiny("mixtral")
    weak = {e: sorted({(5 * e + j) % 24 for j in range(6)}) for e in range(8)}  # different channels per expert
    with torch.no_grad():
        for block in model.model.layers:
            for e, channels in weak.items():
                rows = channels + [24 + c for c in channels]
                block.mlp.experts.gate_up_proj[e, rows] *= 1e-3
                block.mlp.experts.down_proj[e, :, channels] *= 1e-3
    # 0.22 of the layer parameters: 7 of 24 channels per expert (attention is not targeted), 8 once
    # the kept 17 are rounded to a multiple of 8
    result = compress(model, target="channels", criterion="magnitude", sparsity=0.22, allocation="uniform",
                      progress=False)
    for layer in (0, 1):
        removed = removed_per_expert(result, layer)
        assert {len(r) for r in removed.values()} == {8}
        assert all(set(weak[e]) < set(removed[e]) for e in range(8)), removed


def test_global_allocation_gives_per_layer_counts_that_reload_in_a_fresh_process(calib_file, tmp_path):
    cases = {}
    # layer 0's experts are weak everywhere: the global ranking takes more of its channels
    heterogeneous, config = build_tiny("mixtral", seed=3)
    with torch.no_grad():
        heterogeneous.model.layers[0].mlp.experts.down_proj.mul_(0.05)
    uniform, _ = build_tiny("qwen3_moe", seed=4)
    for name, model, criterion, allocation in (("per_layer", heterogeneous, "magnitude", "global"),
                                               ("uniform", uniform, "flap", "uniform")):
        result = prune(model, calib_file, criterion=criterion, allocation=allocation, sparsity=0.3)
        out = save_pruned(result.model, tmp_path / name, report=result.report)
        ids = example_inputs(config, seq_len=12)["input_ids"]
        with torch.no_grad():
            cases[name] = (str(out), ids, result.model(input_ids=ids).logits)
        kept = result.report["kept_units"]["expert_channel"]
        if name == "per_layer":
            assert kept["0"] < kept["1"], kept
            overrides = json.loads((out / "config.json").read_text())["graphprune_layer_overrides"]
            assert {layer: v["intermediate_size"] for layer, v in overrides.items()} == {"1": kept["1"]}
        else:
            assert json.loads((out / "config.json").read_text())["moe_intermediate_size"] == kept["0"]
    # transformers' default experts kernel (grouped_mm), which needs aligned widths
    reloaded = logits_in_fresh_process({name: (path, ids, name == "uniform") for name, (path, ids, _) in cases.items()},
                                       tmp_path)
    for name, (_, _, logits) in cases.items():
        assert torch.allclose(reloaded[name], logits, atol=1e-5), name


def test_experts_and_the_channels_inside_the_kept_ones_in_one_run(calib_file):
    dense, _ = build_tiny("qwen2_moe")
    result = prune(dense, calib_file, target="experts,expert-channels", expert_criterion="reap",
                   expert_sparsity=0.25, criterion="flap", sparsity=0.1, allocation="uniform")
    mlp = result.model.model.layers[0].mlp
    count = result.report["kept_units"]["expert_channel"]["0"]
    assert count < 24 and mlp.experts.gate_up_proj.shape == (6, 2 * count, 64)
    assert result.report["kept_units"]["expert"] == {"0": 6, "1": 6}
    # expert-channels leaves the shared expert (and attention) as they were
    assert torch.equal(mlp.shared_expert.gate_proj.weight, dense.model.layers[0].mlp.shared_expert.gate_proj.weight)
    assert "channel" not in result.report["kept_units"]


def test_expert_input_statistics_are_what_the_familys_eager_code_feeds_each_down_projection():
    """Reference: the eager Mixtral loop calls F.linear(a, down_proj[e]) once per routed expert;
    record those inputs and compare with the statistics of the hook on the stacked weights."""
    model, config = build_tiny("mixtral")
    chosen = [g for g in select_groups(analyze(model), "channels") if g.layer == 1]
    keys, hooks = expert_input_hooks(model, chosen)
    assert keys == [f"model.layers.1.mlp.experts.down_proj[{e}]" for e in range(8)]
    ids = example_inputs(config, batch_size=2, seq_len=16)["input_ids"]
    stats = collect(model, ids, extra_hooks=hooks, progress=False).inputs

    down = model.model.layers[1].mlp.experts.down_proj
    seen = {e: [] for e in range(8)}
    linear = F.linear

    def recording(x, weight, bias=None):
        for e in range(8):
            if weight.data_ptr() == down[e].data_ptr() and weight.shape == down[e].shape:
                seen[e].append(x.detach().to(torch.float64))
        return linear(x, weight, bias)

    model.config._experts_implementation = "eager"
    try:
        F.linear = recording
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        F.linear = linear
    for e in range(8):
        x = torch.cat(seen[e]) if seen[e] else torch.zeros(0, 24, dtype=torch.float64)
        st = stats[keys[e]]
        assert st.count == x.shape[0]
        assert torch.allclose(st.sum, x.sum(0), atol=1e-5) and torch.allclose(st.sumsq, (x * x).sum(0), atol=1e-5)
    assert sum(stats[k].count for k in keys) == ids.numel() * 2  # top-2: every token reaches two experts


def test_gradient_statistics_of_an_expert_channel_read_that_experts_weights_only():
    """s(u) = Σ w·∂L/∂w over rows c, I + c of gate_up_proj[e] and column c of down_proj[e]."""
    from graphprune.calibration.gradients import lm_steps, unit_gradients

    model, config = build_tiny("mixtral")
    chosen = [g for g in select_groups(analyze(model), "channels") if g.layer == 0]
    ids = example_inputs(config, batch_size=2, seq_len=16)["input_ids"]
    stats = unit_gradients(model, lm_steps(model, ids, 2), chosen)
    model.zero_grad()
    for p in model.parameters():
        p.requires_grad_(True)
    model(input_ids=ids, labels=ids).loss.backward()
    experts = model.model.layers[0].mlp.experts
    up = (experts.gate_up_proj * experts.gate_up_proj.grad).double().sum(-1)  # [E, 2I]
    down = (experts.down_proj * experts.down_proj.grad).double().sum(1)  # [E, I]
    for g in chosen:
        e = g.slices[0].expert
        expected = up[e, :24] + up[e, 24:] + down[e]
        assert np.allclose(stats.units[g.id]["sum"], expected.detach().numpy(), rtol=1e-4, atol=1e-7), e


# ------------------------------------------------------------------------------ named limits
def test_an_experts_module_that_does_not_compute_the_stacked_swiglu_is_refused_for_calibration_criteria(calib_file):
    model, _ = build_tiny("mixtral")
    experts = model.model.layers[0].mlp.experts
    original = experts.forward
    experts.forward = lambda h, i, w: 2 * original(h, i, w)  # some other expert function
    with pytest.raises(PruningError, match=r"layer 0 .*does not compute"):
        prune(model, calib_file, criterion="flap", use_cache=False)


def test_deepseek_shared_experts_sized_by_the_same_key_are_named_when_left_out():
    model, _ = build_tiny("deepseek_v3")
    with pytest.raises(PruningError, match="shared_experts.*was not pruned.*prune both together"):
        compress(model, target="expert-channels", criterion="magnitude", sparsity=0.2, allocation="uniform",
                 progress=False)
    # pruned together (same fraction of the same width), the config describes both
    result = compress(model, target="channels", criterion="magnitude", sparsity=0.2, allocation="uniform",
                      progress=False)
    mlp = result.model.model.layers[1].mlp
    count = result.report["kept_units"]["expert_channel"]["1"]
    layer_sizes = result.model.config.graphprune_layer_overrides["1"]  # layer 0 is a dense FFN of other sizes
    assert mlp.shared_experts.gate_proj.weight.shape[0] == count == layer_sizes["moe_intermediate_size"]


def test_least_squares_compensation_leaves_expert_channels_alone_and_says_so(calib_file):
    dense, _ = build_tiny("qwen3_moe")
    result = prune(dense, calib_file, criterion="flap", compensate="lsq", allocation="uniform", sparsity=0.1,
                   target="channels,heads")
    assert "channels inside routed experts are left as they are" in result.report["target_note"]
    assert "expert_channel" not in result.report["kept_units"]
    assert result.model.model.layers[0].mlp.experts.gate_up_proj.shape == (8, 48, 64)


class _Expert(nn.Module):
    def __init__(self, hidden, size):
        super().__init__()
        self.gate, self.up = nn.Linear(hidden, size, bias=False), nn.Linear(hidden, size, bias=False)
        self.down = nn.Linear(size, hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class ModuleListMoE(nn.Module):
    """A user-defined MoE: router, top-2, experts in an nn.ModuleList, expert e picked by `idx == e`."""

    def __init__(self, hidden=32, size=24, experts=4):
        super().__init__()
        self.embed = nn.Embedding(50, hidden)
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(_Expert(hidden, size) for _ in range(experts))
        self.head = nn.Linear(hidden, 50)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        weights, idx = self.router(h).softmax(-1).topk(2, dim=-1)
        out = h
        for e, expert in enumerate(self.experts):
            out = out + (weights * (idx == e)).sum(-1, keepdim=True) * expert(h)
        return self.head(out)


def test_moduleList_experts_channel_groups_are_found_and_expert_removal_is_refused_naming_the_layer():
    model = ModuleListMoE()
    groups = analyze(model, {"input_ids": torch.randint(0, 50, (2, 8))})
    per_expert = [g for g in groups if g.kind == "channel" and g.units == 24]
    assert sorted({g.slices[0].param.split(".")[1] for g in per_expert}) == ["0", "1", "2", "3"]
    assert all(g.prunable for g in per_expert)
    # the expert index is a comparison constant (idx == e): the graph ties router row e to no module
    with pytest.raises(PruningError, match="expected the experts as stacked"):
        find_expert_layers(model, groups)
