"""`compress`: criteria against hand-computed references, rewrite against a hand-sliced reference,
compensation, and reload of the written directory in a fresh process."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from graphprune import criteria
from graphprune.calibration.stats import collect
from graphprune.criteria.base import ScoringContext
from graphprune.calibration.text import load_calibration
from graphprune.io.hf import load_pruned, save_pruned
from graphprune.graph import analyze
from graphprune.backends.memory import all_params
from graphprune.passes import RewriteState
from graphprune.passes.bias import BiasCompensation
from graphprune.passes.rewrite import rewrite_model as rewrite
from graphprune.calibration.gradients import lm_steps, unit_gradients
from graphprune.pipeline.run import compress
from graphprune.testing.fixtures import byte_level_tokenizer, tiny_llama, write_sample_text


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(intermediate=96, heads=4, kv=2)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return write_sample_text(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.fixture(scope="module")
def batches(tokenizer, calib_file):
    return load_calibration(str(calib_file), tokenizer, nsamples=8, seqlen=32, seed=0)


def ffn_group(groups, layer=0):
    return next(g for g in groups if g.kind == "channel" and g.layer == layer and g.prunable)


def down_proj_inputs(model, batches, layer=0):
    captured = []
    handle = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: captured.append(a[0].detach().reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        model(input_ids=batches)
    handle.remove()
    return torch.cat(captured)


@pytest.fixture(scope="module")
def context(model, batches):
    groups = analyze(model)
    chosen = [g for g in groups if g.prunable]
    modules = sorted({s.param.rsplit(".", 1)[0] for g in chosen for s in g.slices if s.role == "linear.in"})
    calibration = collect(model, batches, input_modules=modules, block_angles=True, progress=False)
    grads = unit_gradients(model, lm_steps(model, batches, 4), chosen).units
    return ScoringContext(model, groups, all_params(model), calibration, grads), groups


# ----------------------------------------------------------------------------- criteria
def test_magnitude_is_the_l2_norm_over_all_coupled_slices(model, context):
    ctx, groups = context
    g = ffn_group(groups)
    mlp = model.model.layers[0].mlp
    expected = (mlp.gate_proj.weight.pow(2).sum(1) + mlp.up_proj.weight.pow(2).sum(1)
                + mlp.down_proj.weight.pow(2).sum(0)).sqrt()
    assert np.allclose(criteria.get("magnitude").score(g, ctx), expected.double().detach().numpy())


def test_wanda_sp_flap_and_cfsp_match_their_formulas(model, batches, context):
    ctx, groups = context
    g = ffn_group(groups)
    x = down_proj_inputs(model, batches)
    w = model.model.layers[0].mlp.down_proj.weight.detach().double()
    wanda = w.abs().mean(0) * x.norm(dim=0)
    flap = x.var(0, unbiased=True) * w.pow(2).sum(0)
    cfsp = (w.abs() / w.abs().sum(1, keepdim=True)).sum(0) * x.norm(dim=0)
    assert np.allclose(criteria.get("wanda-sp").score(g, ctx), wanda.numpy(), rtol=1e-6)
    assert np.allclose(criteria.get("flap").score(g, ctx), flap.numpy(), rtol=1e-6)
    assert np.allclose(criteria.get("flap", metric="IFV").score(g, ctx), x.var(0).numpy(), rtol=1e-6)
    assert np.allclose(criteria.get("cfsp").score(g, ctx), cfsp.numpy(), rtol=1e-6)


def test_flap_heads_score_the_mean_of_their_channels(model, batches, context):
    ctx, groups = context
    kv = next(g for g in groups if g.kind == "kv-group" and g.layer == 1)
    captured = []
    o_proj = model.model.layers[1].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        model(input_ids=batches)
    handle.remove()
    x = torch.cat(captured)
    per_channel = x.var(0) * o_proj.weight.detach().double().pow(2).sum(0)
    expected = per_channel.reshape(2, 32).mean(1)  # 2 kv groups of 2 heads x 16
    assert np.allclose(criteria.get("flap").score(kv, ctx), expected.numpy(), rtol=1e-6)


def test_taylor_and_fisher_use_unit_level_weight_times_gradient(model, batches, context):
    ctx, groups = context
    g = ffn_group(groups, layer=1)
    per_batch = []
    for start in range(0, batches.shape[0], 4):
        model.zero_grad()
        for p in model.parameters():
            p.requires_grad_(True)
        chunk = batches[start:start + 4]
        model(input_ids=chunk, labels=chunk).loss.backward()
        mlp = model.model.layers[1].mlp
        s = ((mlp.gate_proj.weight * mlp.gate_proj.weight.grad).sum(1)
             + (mlp.up_proj.weight * mlp.up_proj.weight.grad).sum(1)
             + (mlp.down_proj.weight * mlp.down_proj.weight.grad).sum(0))
        per_batch.append(s.detach().double())
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    stacked = torch.stack(per_batch)
    assert np.allclose(criteria.get("taylor").score(g, ctx), stacked.sum(0).abs().numpy(), rtol=1e-5, atol=1e-9)
    assert np.allclose(criteria.get("fisher").score(g, ctx), stacked.pow(2).mean(0).numpy(), rtol=1e-5, atol=1e-12)


def test_unknown_criterion_suggests_the_closest_name():
    from graphprune.errors import UserError

    with pytest.raises(UserError, match="did you mean 'flap'"):
        criteria.get("flapp")


# ----------------------------------------------------------------------------- rewrite
def _reference_slice(model, kept_channels, kept_kv):
    """Prune by hand: keep FFN channels and whole KV groups per layer, no library code involved."""
    cfg = model.config
    d = cfg.head_dim
    per_group = cfg.num_attention_heads // cfg.num_key_value_heads
    ref_cfg = LlamaConfig(**{**cfg.to_dict(), "intermediate_size": len(kept_channels[0]),
                             "num_key_value_heads": len(kept_kv[0]),
                             "num_attention_heads": len(kept_kv[0]) * per_group})
    ref = LlamaForCausalLM(ref_cfg).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, (ch, kv) in enumerate(zip(kept_channels, kept_kv)):
        p = f"model.layers.{i}"
        ch = torch.tensor(ch)
        q_rows = torch.tensor([r for g in kv for r in range(g * per_group * d, (g + 1) * per_group * d)])
        kv_rows = torch.tensor([r for g in kv for r in range(g * d, (g + 1) * d)])
        state[f"{p}.mlp.gate_proj.weight"] = state[f"{p}.mlp.gate_proj.weight"][ch]
        state[f"{p}.mlp.up_proj.weight"] = state[f"{p}.mlp.up_proj.weight"][ch]
        state[f"{p}.mlp.down_proj.weight"] = state[f"{p}.mlp.down_proj.weight"][:, ch]
        state[f"{p}.self_attn.q_proj.weight"] = state[f"{p}.self_attn.q_proj.weight"][q_rows]
        state[f"{p}.self_attn.k_proj.weight"] = state[f"{p}.self_attn.k_proj.weight"][kv_rows]
        state[f"{p}.self_attn.v_proj.weight"] = state[f"{p}.self_attn.v_proj.weight"][kv_rows]
        state[f"{p}.self_attn.o_proj.weight"] = state[f"{p}.self_attn.o_proj.weight"][:, q_rows]
    ref.load_state_dict(state)
    return ref


def test_pruned_model_equals_directly_sliced_reference(model):
    result = compress(model, criterion="magnitude", sparsity=0.6, allocation="uniform", progress=False)
    groups = result.groups
    kept_channels, kept_kv = [], []
    for layer in range(2):
        ffn = ffn_group(groups, layer)
        kv = next(g for g in groups if g.kind == "kv-group" and g.layer == layer)
        kept_channels.append(sorted(set(range(ffn.units)) - set(result.removed[ffn.id].tolist())))
        kept_kv.append(sorted(set(range(kv.units)) - set(result.removed[kv.id].tolist())))
    assert len(kept_channels[0]) < 96 and len(kept_kv[0]) == 1  # something was really removed
    ref = _reference_slice(model, kept_channels, kept_kv)
    ids = torch.randint(0, 258, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (result.model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max()
    assert diff <= 1e-5
    assert result.report["uniform_layers"] is True
    assert result.model.config.num_key_value_heads == 1 and result.model.config.num_attention_heads == 2


def test_nothing_removed_gives_back_the_same_model(model):
    groups = analyze(model)
    chosen = [g for g in groups if g.prunable]
    same, _ = rewrite(model, groups, chosen, removed={})
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(same(input_ids=ids).logits, model(input_ids=ids).logits)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in same.state_dict().items())


def test_reported_sparsity_is_exact(model):
    result = compress(model, criterion="magnitude", sparsity=0.3, allocation="global", progress=False)
    layer_params = lambda m: sum(p.numel() for p in m.model.layers.parameters())  # noqa: E731
    p = result.report["params"]
    assert p["layers_before"] == layer_params(model) and p["layers_after"] == layer_params(result.model)
    assert p["achieved_sparsity"] == pytest.approx(1 - p["layers_after"] / p["layers_before"])
    assert abs(p["achieved_sparsity"] - 0.3) < 0.1


def test_bias_compensation_lowers_the_layer_output_error(model, batches):
    groups = analyze(model)
    g = ffn_group(groups)
    calibration = collect(model, batches, input_modules=["model.layers.0.mlp.down_proj"], progress=False)
    removed = {g.id: np.arange(0, 96, 2)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state = BiasCompensation()(RewriteState(state, [g], removed, statistics=calibration)).state.tensors
    x = down_proj_inputs(model, batches)
    w = model.model.layers[0].mlp.down_proj.weight.detach().double()
    keep = torch.arange(1, 96, 2)
    full = x @ w.T
    pruned = x[:, keep] @ w[:, keep].T
    compensated = pruned + state["model.layers.0.mlp.down_proj.bias"].double()
    assert (full - compensated).pow(2).mean() < (full - pruned).pow(2).mean()


def test_conv1d_consumers_are_read_along_their_input_axis(tokenizer, calib_file):
    """GPT-2's Conv1D stores c_proj as [in, out]: FLAP's column metric and the compensation bias must
    use the input axis there (they crashed, or were silently wrong for square layers, before)."""
    from graphprune.testing.zoo import build_tiny

    model, _ = build_tiny("gpt2", vocab_size=258, n_inner=24)
    batches = load_calibration(str(calib_file), tokenizer, nsamples=8, seqlen=32, seed=0)
    groups = analyze(model)
    g = next(g for g in groups if g.kind == "channel" and g.layer == 0 and g.prunable)
    module = "transformer.h.0.mlp.c_proj"
    calibration = collect(model, batches, input_modules=[module], progress=False)
    ctx = ScoringContext(model, groups, all_params(model), calibration, {})
    w = model.get_parameter(f"{module}.weight").detach().double()  # [in 24, out 64]
    expected = calibration.inputs[module].var * w.pow(2).sum(1)
    np.testing.assert_allclose(criteria.get("flap").score(g, ctx), expected.numpy(), rtol=1e-6)

    removed = {g.id: np.arange(0, 24, 2)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bias_before = state[f"{module}.bias"].double().clone()
    state = BiasCompensation()(RewriteState(state, [g], removed, statistics=calibration)).state.tensors
    mean = calibration.inputs[module].mean
    torch.testing.assert_close(state[f"{module}.bias"].double() - bias_before,
                               (w[0:24:2].T @ mean[0:24:2]).to(torch.float32).double(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- round trip
RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
from graphprune.io.hf import load_pruned
path, mode = sys.argv[1], sys.argv[2]
m = AutoModelForCausalLM.from_pretrained(path) if mode == "hf" else load_pruned(path)
ids = torch.arange(12).unsqueeze(0)
with torch.no_grad():
    torch.save(m(input_ids=ids).logits, path + "/../logits.pt")
"""


def _reload_and_compare(pruned, out, tmp_path, mode):
    subprocess.run([sys.executable, "-c", RELOAD, str(out), mode], check=True)
    reloaded = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        here = pruned(input_ids=torch.arange(12).unsqueeze(0)).logits
    assert torch.equal(reloaded, here)


def test_uniform_output_reloads_with_plain_transformers_in_a_fresh_process(model, calib_file, tmp_path):
    result = compress(model, criterion="flap", sparsity=0.3, allocation="uniform", calib=str(calib_file),
                      nsamples=8, seqlen=32, tokenizer=byte_level_tokenizer(), progress=False, use_cache=False)
    assert result.report["uniform_layers"] is True
    out = save_pruned(result.model, tmp_path / "out", report=result.report)
    report = json.loads((out / "graphprune_report.json").read_text())
    assert report["compensate"] == "lsq" and report["compensated_layers"] > 0  # least squares by default
    assert report["config_bias_flags"]  # the compensation biases need e.g. mlp_bias in the config
    _reload_and_compare(result.model, out, tmp_path, "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.intermediate_size == result.model.config.intermediate_size


def test_per_layer_output_reloads_with_graphprune_in_a_fresh_process(model, tmp_path):
    groups = analyze(model)
    chosen = [g for g in groups if g.prunable]
    ffn0, ffn1 = ffn_group(groups, 0), ffn_group(groups, 1)
    kv1 = next(g for g in groups if g.kind == "kv-group" and g.layer == 1)
    removed = {ffn0.id: np.arange(10), ffn1.id: np.arange(30, 60), kv1.id: np.array([0])}
    pruned, extra = rewrite(model, groups, chosen, removed)
    assert extra["uniform_layers"] is False
    out = save_pruned(pruned, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["graphprune_layer_overrides"]["1"] == {"intermediate_size": 66, "num_attention_heads": 2,
                                                         "num_key_value_heads": 1}
    _reload_and_compare(pruned, out, tmp_path, "graphprune")
    assert load_pruned(out).model.layers[0].mlp.down_proj.in_features == 86


def test_a_per_layer_output_can_be_pruned_again_and_keeps_its_earlier_per_layer_sizes(model, tmp_path):
    groups = analyze(model)
    kv1 = next(g for g in groups if g.kind == "kv-group" and g.layer == 1)
    removed = {ffn_group(groups, 0).id: np.arange(10), ffn_group(groups, 1).id: np.arange(30, 60),
               kv1.id: np.array([0])}
    first, _ = rewrite(model, groups, [g for g in groups if g.prunable], removed)
    once = load_pruned(save_pruned(first, tmp_path / "once"))

    groups = analyze(once)  # sizes from the weights: layer 0 has 86 channels, layer 1 66
    assert ffn_group(groups, 0).units == 86 and ffn_group(groups, 1).units == 66
    again, extra = rewrite(once, groups, [g for g in groups if g.prunable], {ffn_group(groups, 0).id: np.arange(6)})
    assert extra["uniform_layers"] is False
    out = save_pruned(again, tmp_path / "twice")
    overrides = json.loads((out / "config.json").read_text())["graphprune_layer_overrides"]
    # layer 1's heads and channels from the first pruning stay; layer 0 loses 6 more channels
    assert overrides["1"] == {"intermediate_size": 66, "num_attention_heads": 2, "num_key_value_heads": 1}
    assert load_pruned(out).model.layers[0].mlp.down_proj.in_features == 80
    _reload_and_compare(again, out, tmp_path, "graphprune")

    # and through compress, with global allocation choosing the sizes again
    result = compress(load_pruned(out), criterion="magnitude", sparsity=0.3, allocation="global", progress=False)
    _reload_and_compare(result.model, save_pruned(result.model, tmp_path / "thrice"), tmp_path, "graphprune")


def test_query_heads_inside_kv_groups_can_be_the_target():
    model = tiny_llama(heads=6, kv=2, hidden=96)
    result = compress(model, criterion="magnitude", sparsity=0.4, allocation="uniform",
                      target="channels,query-heads", progress=False)
    assert result.model.config.num_key_value_heads == 2  # every KV group stays
    assert result.model.config.num_attention_heads in (2, 4)  # the same number of query heads per group
