"""Expert pruning on the five MoE families of transformers 5.23.

The reference for a pruned model is the dense model in which the removed experts can never be
chosen: their router logits are forced to -inf. For the softmax routers (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE) that is exact whichever order the family uses: softmax over all logits gives the
removed experts probability 0, so the top-k and the top-k renormalisation (norm_topk_prob) see the
same values as a softmax over the kept experts only. DeepSeek-V3 scores with a sigmoid and chooses
with `sigmoid(logit) + e_score_correction_bias`, so a -inf logit alone would leave the choice score
at the bias: the reference also sets the removed experts' correction bias to -inf, which is what
"never chosen" means there (groups are ranked by their two best choice scores, and the weights of
the chosen experts are renormalised over the chosen ones only, as in the pruned model).
"""

import contextlib
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from graphprune.errors import PruningError, UserError
from graphprune.io.hf import save_pruned
from graphprune.graph import analyze
from graphprune.moe import find_expert_layers
from graphprune.pipeline.run import compress
from graphprune.testing.fixtures import byte_level_tokenizer, tiny_llama, write_sample_text
from graphprune.testing.reload import logits_in_fresh_process
from graphprune.testing.zoo import build_tiny, example_inputs

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
EXPERT_COUNT_KEY = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_experts",
                    "olmoe": "num_experts", "deepseek_v3": "n_routed_experts"}


@contextlib.contextmanager
def masked_router_logits(model, removed_by_router: dict[str, list[int]]):
    """Inside the block the routers of `model` give -inf logits to the listed experts. The routers
    call `F.linear(hidden, self.weight)` from their modeling module; that module's `F` is swapped
    for one whose `linear` masks the output columns when the weight is a router's."""
    modules = dict(model.named_modules())
    masks = {modules[name].weight.data_ptr(): idx for name, idx in removed_by_router.items()}
    functional = torch.nn.functional

    class MaskingFunctional:
        def __getattr__(self, name):
            return getattr(functional, name)

        @staticmethod
        def linear(x, weight, bias=None):
            out = functional.linear(x, weight, bias)
            idx = masks.get(weight.data_ptr())
            if idx:
                out = out.clone()
                out[..., idx] = float("-inf")
            return out

    modeling = sys.modules[type(modules[next(iter(removed_by_router))]).__module__]
    previous = modeling.F
    modeling.F = MaskingFunctional()
    try:
        yield
    finally:
        modeling.F = previous


def reference_logits(dense, removed_by_router, ids):
    reference = copy.deepcopy(dense)
    modules = dict(reference.named_modules())
    for name, idx in removed_by_router.items():
        bias = getattr(modules[name], "e_score_correction_bias", None)
        if bias is not None:  # DeepSeek: the choice score is sigmoid(logit) + bias
            bias[idx] = float("-inf")
    with masked_router_logits(reference, removed_by_router), torch.no_grad():
        return reference(input_ids=ids).logits


def removed_by_router(result):
    return {f"model.layers.{layer}.mlp.gate": removed
            for layer, removed in result.report["experts"]["removed_per_layer"].items()}


def test_masking_changes_the_output_so_the_reference_is_not_vacuous():
    dense, config = build_tiny("mixtral")
    ids = example_inputs(config, seq_len=16)["input_ids"]
    with torch.no_grad():
        plain = dense(input_ids=ids).logits
    masked = reference_logits(dense, {"model.layers.0.mlp.gate": [0, 1, 2, 3]}, ids)
    assert (plain - masked).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_layers_are_found_with_their_router_and_without_shared_experts(family):
    model, config = build_tiny(family)
    layers = find_expert_layers(model, analyze(model))
    moe_layers = [1] if family == "deepseek_v3" else [0, 1]  # DeepSeek's first layer is dense
    assert [layer.layer for layer in layers] == moe_layers
    for layer in layers:
        assert layer.router == f"model.layers.{layer.layer}.mlp.gate"
        assert layer.experts == f"model.layers.{layer.layer}.mlp.experts"
        assert layer.num_experts == 8 and layer.top_k == 2
        assert layer.n_group == (2 if family == "deepseek_v3" else 1)
        members = {s.param.rsplit(".", 1)[-1] for s in layer.group.slices}
        expected = {"weight", "gate_up_proj", "down_proj"} | (
            {"e_score_correction_bias"} if family == "deepseek_v3" else set())
        assert members == expected
        assert not any("shared" in s.param for s in layer.group.slices)
        for s in layer.group.slices:  # unit e is expert e in every tensor
            assert np.array_equal(s.indices.reshape(-1), np.arange(8))


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_equals_dense_model_with_removed_experts_masked(family, allocation, tmp_path):
    dense, config = build_tiny(family)
    calib = write_sample_text(tmp_path / "calib.txt")
    result = compress(dense, target="experts", criterion="reap", sparsity=0.5, expert_allocation=allocation,
                      tokenizer=byte_level_tokenizer(), calib=str(calib), nsamples=8, seqlen=32, progress=False)
    removed = removed_by_router(result)
    total = sum(len(v) for v in removed.values())
    assert total == 4 * len(removed)  # half of the 8 experts of every MoE layer overall
    if allocation == "uniform":
        assert all(len(v) == 4 for v in removed.values())
        assert getattr(result.model.config, EXPERT_COUNT_KEY[family]) == 4
    if family == "deepseek_v3":  # equal removal per routing group of 4
        assert all(sum(e < 4 for e in v) == sum(e >= 4 for e in v) for v in removed.values())
    ids = example_inputs(config, batch_size=2, seq_len=24)["input_ids"]
    with torch.no_grad():
        pruned = result.model(input_ids=ids).logits
    diff = (pruned - reference_logits(dense, removed, ids)).abs().max().item()
    assert diff <= 1e-5, f"{family}: max abs diff {diff}"


def test_shared_experts_keep_their_weights_and_their_channels_can_be_pruned_in_the_same_run(tmp_path):
    dense, config = build_tiny("qwen2_moe")
    result = compress(dense, target="experts,channels", criterion="magnitude", expert_criterion="random",
                      expert_sparsity=0.25, sparsity=0.1, allocation="uniform", progress=False)
    pruned = result.model.model.layers[0].mlp
    assert pruned.experts.gate_up_proj.shape[0] == 6
    assert result.report["kept_units"]["expert"] == {"0": 6, "1": 6}
    assert result.report["experts"]["experts_removed"] == 4
    # channels were pruned too, the shared expert among them
    assert pruned.shared_expert.gate_proj.weight.shape[0] < 40
    assert result.report["params"]["layers_before"] == sum(
        p.numel() for p in dense.model.layers.parameters())


def test_uniform_and_per_layer_outputs_reload_in_a_fresh_process_with_identical_logits(tmp_path):
    calib = write_sample_text(tmp_path / "calib.txt")
    tokenizer = byte_level_tokenizer()
    cases = [(f, "uniform") for f in FAMILIES] + [("mixtral", "global"), ("deepseek_v3", "uniform")]
    expected = {}
    for n, (family, allocation) in enumerate(cases):
        dense, config = build_tiny(family, seed=n)
        if allocation == "global":  # six experts of layer 0 output nothing: layer 0 loses more
            with torch.no_grad():
                dense.model.layers[0].mlp.experts.down_proj[:6] = 0
        result = compress(dense, target="experts", criterion="easyep", sparsity=0.25 if n == 6 else 0.5,
                          expert_allocation=allocation, tokenizer=tokenizer, calib=str(calib), nsamples=8,
                          seqlen=32, progress=False)
        if allocation == "global":
            assert not result.report["uniform_layers"], "the designed global case must give per-layer counts"
        out = save_pruned(result.model, tmp_path / f"out{n}", report=result.report)
        ids = example_inputs(config, seq_len=12)["input_ids"]
        with torch.no_grad():
            expected[str(out)] = (ids, result.model(input_ids=ids).logits, result.report["uniform_layers"])
    # the stacked-experts function the pruning process ran
    reloaded = logits_in_fresh_process({path: (path, ids, uniform) for path, (ids, _, uniform) in expected.items()},
                                       tmp_path, experts_implementation="batched_mm")
    for path, (_, logits, _) in expected.items():
        assert torch.equal(reloaded[path], logits), path
        config = json.loads((tmp_path / path / "config.json").read_text())
        assert "graphprune_layer_overrides" in config or "global" not in path


# ----------------------------------------------------------------------------------- bad input
def test_experts_on_a_dense_model_are_refused():
    with pytest.raises(PruningError, match="no routed experts"):
        compress(tiny_llama(), target="experts", criterion="random", sparsity=0.5, progress=False)


@pytest.mark.parametrize("family, sparsity, needle", [
    ("mixtral", 0.9, r"keeps 1, but each token is routed to 2 .*at most 6 can go"),
    ("deepseek_v3", 0.75, r"at least 2 in each of its 2 routing groups"),
])
def test_keeping_fewer_experts_than_top_k_is_refused(family, sparsity, needle):
    model, _ = build_tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match=needle):
        compress(model, target="experts", criterion="random", sparsity=sparsity, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched


def test_a_router_that_is_not_a_linear_layer_is_refused_naming_the_layer():
    model, _ = build_tiny("mixtral")
    gate = model.model.layers[1].mlp.gate

    def transposed_router(self, hidden_states):  # scores through matmul of a transposed weight
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = torch.matmul(hidden_states, self.weight.t())
        probs = torch.softmax(logits.float(), dim=-1)
        top, index = torch.topk(probs, self.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), index

    gate.forward = transposed_router.__get__(gate)
    with pytest.raises(PruningError, match=r"layer 1 \(model\.layers\.1\.mlp\): cannot identify the router"):
        compress(model, target="experts", criterion="random", sparsity=0.5, progress=False)


@pytest.mark.parametrize("kwargs, needle", [
    ({"target": "experts", "criterion": "flap"}, "scores channels and heads, not experts"),
    ({"target": "channels", "criterion": "reap"}, "use it with --target experts"),
    ({"target": "experts,channels", "criterion": "reap"}, "--expert-criterion reap"),
    ({"target": "channels", "expert_criterion": "reap"}, "--expert-criterion needs --target experts"),
    ({"target": "experts", "expert_allocation": "cfsp"}, "unknown --expert-allocation"),
])
def test_inconsistent_expert_options_are_refused_before_any_work(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        compress("/nonexistent/model", sparsity=0.5, progress=False, **kwargs)


# ----------------------------------------------------------------------------------- CLI
def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "graphprune", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_removes_experts_with_two_calibration_domains_and_the_output_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "mixtral"
    build_tiny("mixtral")[0].save_pretrained(model_dir)
    byte_level_tokenizer().save_pretrained(model_dir)
    news = write_sample_text(tmp_path / "news.txt")
    code = tmp_path / "code.txt"
    code.write_text("def add(a, b):\n    return a + b\n" * 200)
    out = tmp_path / "out"
    result = _cli("compress", model_dir, "--target", "experts", "--criterion", "reap", "--sparsity", "0.25",
                  "--calib", news, "--calib", code, "--nsamples", "4", "--seqlen", "32", "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "removed 4 of 16 routed experts; kept per layer 6" in result.stdout
    report = json.loads((out / "graphprune_report.json").read_text())
    assert report["experts"]["calibration"]["sources"] == [str(news), str(code)]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_local_experts == 6
    assert reloaded.model.layers[0].mlp.experts.down_proj.shape[0] == 6


def test_cli_easyep_token_change_option_is_used_and_a_bad_value_exits_2_without_output(tmp_path):
    model_dir = tmp_path / "qwen3"
    build_tiny("qwen3_moe")[0].save_pretrained(model_dir)
    byte_level_tokenizer().save_pretrained(model_dir)
    text = write_sample_text(tmp_path / "news.txt")
    common = ("--target", "experts", "--criterion", "easyep", "--sparsity", "0.25", "--calib", text,
              "--nsamples", "4", "--seqlen", "32", "--quiet")
    out = tmp_path / "out"
    result = _cli("compress", model_dir, *common, "--option", "token_change=residual", "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "graphprune_report.json").read_text())
    assert report["experts"]["criterion_options"] == {"token_change": "residual"}
    bad = tmp_path / "bad"
    result = _cli("compress", model_dir, *common, "--option", "token_change=hidden", "--out", bad)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "token_change='hidden'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not bad.exists()


def test_cli_refuses_experts_on_a_dense_model_in_one_line(tmp_path):
    from graphprune.testing.fixtures import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "llama")
    result = _cli("compress", model_dir, "--target", "experts", "--criterion", "reap", "--out", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert "no routed experts" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
