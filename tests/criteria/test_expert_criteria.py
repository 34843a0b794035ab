"""Expert criteria: what the routing statistics measure, and that useless experts go first."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from graphprune import criteria
from graphprune.errors import UserError
from graphprune.graph import analyze
from graphprune.moe import collect_expert_stats, find_expert_layers
from graphprune.moe.routing import ExpertStats
from graphprune.pipeline.run import compress
from graphprune.testing.fixtures import byte_level_tokenizer, write_sample_text
from graphprune.testing.zoo import TINY_FAMILIES, build_tiny

NEVER_ROUTED = [0, 5]
OUTPUTS_ZERO = 3


def designed_moe(zero_output: bool = True):
    """Tiny Mixtral whose experts 0 and 5 are never routed and whose expert 3 outputs zero.

    Experts 0 and 5 get zero router rows (logit 0). The six others come in antipodal pairs
    (w, -w): for every token one expert of each pair has a positive logit, so at least three
    logits beat 0 and the top-2 never reaches experts 0 or 5. Expert 3 is routed like any
    other but its down projection is zero."""
    model, config = build_tiny("mixtral")
    with torch.no_grad():
        for block in model.model.layers:
            w = block.mlp.gate.weight
            w[NEVER_ROUTED] = 0
            for a, b in [(1, 2), (3, 4), (6, 7)]:
                w[b] = -w[a]
            w.mul_(20)  # confident routing: clear winners per token
            if zero_output:
                block.mlp.experts.down_proj[OUTPUTS_ZERO] = 0
    return model, config


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return str(write_sample_text(tmp_path_factory.mktemp("calib") / "calib.txt"))


def removed(model, criterion, sparsity, calib_file):
    result = compress(model, target="experts", criterion=criterion, sparsity=sparsity, calib=calib_file,
                      tokenizer=byte_level_tokenizer(), nsamples=8, seqlen=32, progress=False)
    return result.report["experts"]["removed_per_layer"]


def test_designed_moe_routes_its_zero_output_expert_and_never_the_dead_ones():
    model, _ = designed_moe()
    layers = find_expert_layers(model, analyze(model))
    batches = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    stats = collect_expert_stats(model, layers, batches, progress=False)
    for st in stats.values():
        assert st.routed[NEVER_ROUTED].sum() == 0
        assert (st.routed[[1, 2, 3, 4, 6, 7]] > 0).all()
        assert st.gate_norm[OUTPUTS_ZERO] == 0 and st.routed[OUTPUTS_ZERO] > 0


@pytest.mark.parametrize("criterion", ["easyep", "reap"])
def test_output_aware_criteria_remove_never_routed_and_zero_output_experts_first(criterion, calib_file):
    model, _ = designed_moe()
    per_layer = removed(model, criterion, 3 / 8, calib_file)
    assert per_layer == {"0": [0, 3, 5], "1": [0, 3, 5]}


@pytest.mark.parametrize("criterion", ["easyep", "reap", "frequency"])
def test_every_informed_criterion_removes_never_routed_experts_first(criterion, calib_file):
    # Without the zero-output expert (which ties with the dead ones at score 0 for the output-aware
    # criteria). Frequency only counts routing: a routed expert that outputs nothing looks busy to
    # it, which is why it is not in the zero-output test above.
    model, _ = designed_moe(zero_output=False)
    assert removed(model, criterion, 2 / 8, calib_file) == {"0": NEVER_ROUTED, "1": NEVER_ROUTED}


def test_random_baseline_is_reproducible_from_its_seed():
    model, _ = build_tiny("mixtral")
    groups = analyze(model)
    layers = find_expert_layers(model, groups)
    draw = lambda seed: criteria.get("random", seed=seed).score_layer(layers[0], [])  # noqa: E731
    assert np.array_equal(draw(0), draw(0))
    assert not np.array_equal(draw(0), draw(1))


@torch.no_grad()
def test_routing_statistics_match_a_direct_computation():
    """routed / gate / gate_norm / easyep recomputed from the router and expert weights by hand; the
    easyep token weight compares the experts' input h before and after the routed experts, and
    easyep_residual the residual stream x (the input of the norm that feeds the MoE block), as
    EASY-EP's reference code does."""
    model, _ = build_tiny("qwen3_moe")  # norm_topk_prob=True
    layers = find_expert_layers(model, analyze(model))
    batches = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    stats = collect_expert_stats(model, layers, batches, progress=False)

    captured = {}
    mlp = model.model.layers[1].mlp
    norm = model.model.layers[1].post_attention_layernorm
    handles = [mlp.register_forward_hook(lambda m, args, out: captured.update(h=args[0], out=out)),
               norm.register_forward_hook(lambda m, args, out: captured.update(x=args[0]))]
    with torch.no_grad():
        model.model(input_ids=batches, use_cache=False)
    for handle in handles:
        handle.remove()
    h = captured["h"].reshape(-1, 64).double()
    x = captured["x"].reshape(-1, 64).double()
    assert not torch.allclose(x, h)  # the norm changes the vectors: the test tells the two apart
    probs = torch.softmax(h @ mlp.gate.weight.double().T, dim=-1)
    g, idx = probs.topk(2, dim=-1)
    g = g / g.sum(-1, keepdim=True)
    experts = mlp.experts
    expected = ExpertStats.empty(8)
    outputs = torch.zeros_like(h)
    norms = torch.zeros_like(g)
    for t in range(h.shape[0]):
        for k in range(2):
            e = int(idx[t, k])
            gate, up = (experts.gate_up_proj[e].double() @ h[t]).chunk(2)
            y = experts.down_proj[e].double() @ (torch.nn.functional.silu(gate) * up)
            outputs[t] += g[t, k] * y
            norms[t, k] = y.norm()
    change = (1 - torch.nn.functional.cosine_similarity(h, h + outputs, dim=-1)).clamp_min(0)
    change_residual = (1 - torch.nn.functional.cosine_similarity(x, x + outputs, dim=-1)).clamp_min(0)
    for t in range(h.shape[0]):
        for k in range(2):
            e = int(idx[t, k])
            expected.routed[e] += 1
            expected.gate[e] += g[t, k]
            expected.gate_norm[e] += g[t, k] * norms[t, k]
            expected.easyep[e] += g[t, k] * norms[t, k] * change[t]
            expected.easyep_residual[e] += g[t, k] * norms[t, k] * change_residual[t]
    got = stats["model.layers.1.mlp.experts"]
    assert got.tokens == 32
    assert not torch.allclose(expected.easyep, expected.easyep_residual)
    for name in ("routed", "gate", "gate_norm", "easyep", "easyep_residual"):
        assert torch.allclose(getattr(got, name), getattr(expected, name), rtol=1e-4, atol=1e-6), name
    assert np.allclose(criteria.get("easyep", token_change="residual").from_stats(got), expected.easyep_residual)
    reap = criteria.get("reap").from_stats(got)
    assert np.allclose(reap, (expected.gate_norm / expected.routed.clamp_min(1)).numpy(), rtol=1e-4)


@pytest.mark.parametrize("family", sorted(f for f, spec in TINY_FAMILIES.items() if spec.is_moe))
def test_easyep_token_weight_reads_the_residual_stream_in_every_moe_family(family):
    model, _ = build_tiny(family)
    layers = find_expert_layers(model, analyze(model))
    batches = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    stats = collect_expert_stats(model, layers, batches, progress=False)
    for layer in layers:
        st = stats[layer.experts]
        assert st.tokens == 16 and st.residual_tokens == st.tokens, (family, layer.layer)


@torch.no_grad()
def test_a_block_without_a_pre_norm_weighs_tokens_by_its_own_input():
    """No norm's output is the block's input: x_t = h_t (and no token is counted as residual)."""
    model, _ = build_tiny("qwen3_moe")
    for layer in model.model.layers:
        layer.post_attention_layernorm = torch.nn.Identity()  # the block now reads the residual itself
    layers = find_expert_layers(model, analyze(model))
    batches = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    stats = collect_expert_stats(model, layers, batches, progress=False)
    for st in stats.values():
        assert st.residual_tokens == 0 and st.easyep.sum() > 0
        assert torch.equal(st.easyep, st.easyep_residual)


def test_easyep_refuses_an_unknown_token_change_base():
    with pytest.raises(UserError, match="token_change='hidden'.*input, residual"):
        criteria.get("easyep", token_change="hidden")


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_gate_weights_are_normalised_over_the_top_k_for_families_that_do_not_renormalise(family):
    """OLMoE routes with top-k softmax probabilities (norm_topk_prob=False), DeepSeek scales by
    routed_scaling_factor 2.5; g is normalised over each token's top-k, so Σ_e gate[e] = tokens."""
    model, _ = build_tiny(family)
    layers = find_expert_layers(model, analyze(model))
    batches = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    for st in collect_expert_stats(model, layers, batches, progress=False).values():
        assert st.tokens == 32 and torch.isclose(st.gate.sum(), torch.tensor(32.0, dtype=torch.float64))
        assert st.routed.sum() == 64  # top-2


def test_several_domains_are_combined_by_per_layer_normalised_sums():
    """Each domain's scores become shares of its layer total before adding: a domain with a large
    raw scale cannot drown the experts another domain needs."""
    layer = SimpleNamespace(num_experts=4, layer=0)
    news = ExpertStats(100, *(torch.tensor(v, dtype=torch.float64) for v in
                              ([0.0, 0, 50, 50], [0.0, 0, 1, 1], [0.0, 0, 1000, 1000], [0.0, 0, 10, 10],
                               [0.0, 0, 10, 10])))
    code = ExpertStats(100, *(torch.tensor(v, dtype=torch.float64) for v in
                              ([0.0, 50, 0, 50], [0.0, 1, 0, 1], [0.0, 1, 0, 1], [0.0, 0.1, 0, 0.1],
                               [0.0, 0.1, 0, 0.1])))
    easyep = criteria.get("easyep")
    combined = easyep.score_layer(layer, [news, code])
    assert np.allclose(combined, [0.0, 0.5, 0.5, 1.0])
    # a plain sum would rank expert 1 (needed by the code domain only) with the unused expert 0
    plain = easyep.from_stats(news) + easyep.from_stats(code)
    assert plain[1] <= 0.01 * plain[2]
