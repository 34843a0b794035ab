"""Least-squares compensation, structured OBS and the sequential mode (issue 9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphprune
from graphprune.calibration.blocks import BlockRunner
from graphprune.errors import UserError
from graphprune.solvers import lsq
from graphprune.testing.fixtures import byte_level_tokenizer, tiny_llama


def _layer(seed=0, out=6, d=10, tokens=400):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with a non-zero mean, so both the refit and the bias matter
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, d, generator=g, dtype=torch.float64) @ mix + torch.randn(d, generator=g, dtype=torch.float64)
    w = torch.randn(out, d, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64)
    xa = torch.cat([x, torch.ones(tokens, 1, dtype=torch.float64)], 1)
    return lsq.augmented_weight(w, b), xa, xa.T @ xa / tokens


def test_refit_equals_the_closed_form_least_squares_solution():
    w_aug, xa, h = _layer()
    removed = np.array([1, 4, 7])
    damp = 0.05
    lam = damp * torch.diagonal(h).mean()
    hd = h + lam * torch.eye(h.shape[0], dtype=h.dtype)
    kept = [i for i in range(h.shape[0]) if i not in removed]
    expected = w_aug @ hd[:, kept] @ torch.linalg.inv(hd[kept][:, kept])
    got = lsq.refit(w_aug, h, removed, damp)
    assert torch.allclose(got[:, kept], expected, atol=1e-10)
    assert torch.all(got[:, removed] == 0)


def test_undamped_refit_is_the_ordinary_least_squares_fit_of_the_outputs():
    w_aug, xa, h = _layer()
    removed = np.array([0, 5])
    kept = [i for i in range(h.shape[0]) if i not in removed]
    target = xa @ w_aug.T
    solution = torch.linalg.lstsq(xa[:, kept], target).solution.T
    got = lsq.refit(w_aug, h, removed, damp=1e-12)
    assert torch.allclose(got[:, kept], solution, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("damp", [1e-4, 0.01, 0.5])
def test_refit_never_increases_the_reconstruction_error_on_calibration_data(seed, damp):
    w_aug, xa, h = _layer(seed)
    removed = np.random.default_rng(seed).choice(10, size=4, replace=False)
    dropped = w_aug.clone()
    dropped[:, removed] = 0
    refit = lsq.refit(w_aug, h, removed, damp)
    assert lsq.reconstruction_error(w_aug, refit, h) <= lsq.reconstruction_error(w_aug, dropped, h) + 1e-12
    # FLAP's bias compensation is one point of the refit's search space: undamped, lsq beats it too
    bias = lsq.bias_only(w_aug, h, removed)
    assert lsq.reconstruction_error(w_aug, lsq.refit(w_aug, h, removed, 1e-12), h) <= \
        lsq.reconstruction_error(w_aug, bias, h) + 1e-9


def test_bias_compensation_keeps_the_layer_output_mean():
    w_aug, xa, h = _layer()
    removed = np.array([2, 3])
    bias = lsq.bias_only(w_aug, h, removed)
    assert torch.allclose((xa @ bias.T).mean(0), (xa @ w_aug.T).mean(0), atol=1e-10)


def test_with_nothing_pruned_the_refit_is_the_identity():
    w_aug, _, h = _layer()
    assert torch.equal(lsq.refit(w_aug, h, np.array([], dtype=np.int64)), w_aug)


def test_duplicate_channels_do_not_produce_nan():
    w_aug, xa, _ = _layer()
    xa = xa.clone()
    xa[:, 3] = xa[:, 2]  # two identical input channels: H is singular
    xa[:, 6] = 0.0  # and a dead one
    h = xa.T @ xa / xa.shape[0]
    for damp in (1e-12, 0.01):
        out = lsq.refit(w_aug, h, np.array([2]), damp)
        assert torch.isfinite(out).all()
        # the duplicate takes over the removed channel's job: almost no error left
        assert lsq.reconstruction_error(w_aug, out, h) < 1e-3 * lsq.reconstruction_error(w_aug, 0 * w_aug, h)
    path = lsq.obs_greedy(w_aug, h, np.arange(10)[:, None], 5)
    assert np.isfinite(path.step_error).all()


def test_obs_removes_useless_units_first_and_ends_at_the_least_squares_refit():
    w_aug, xa, h = _layer(out=8, d=12)
    w_aug = w_aug.clone()
    w_aug[:, 9] = 0.0  # a channel nobody reads
    xa = xa.clone()
    xa[:, 4] = 0.0  # a channel that is always zero
    h = xa.T @ xa / xa.shape[0]
    path = lsq.obs_greedy(w_aug, h, np.arange(12)[:, None], 5, steps=5)
    assert set(path.order[:2]) == {4, 9}
    assert path.step_error[0] == pytest.approx(0.0, abs=1e-12)
    refit = lsq.refit(w_aug, h, np.array(path.order))
    assert torch.allclose(path.weight_aug, refit, atol=1e-8)
    # the errors OBS reports add up to the refit's real reconstruction error (undamped part aside)
    assert sum(path.step_error) >= lsq.reconstruction_error(w_aug, refit, h) - 1e-9


def test_obs_handles_multi_column_units_like_heads():
    w_aug, xa, h = _layer(out=8, d=12)
    heads = np.arange(12).reshape(3, 4)
    w_aug = w_aug.clone()
    w_aug[:, 4:8] *= 1e-3  # head 1 contributes almost nothing
    path = lsq.obs_greedy(w_aug, h, heads, 1)
    assert path.order == [1]
    assert torch.all(path.weight_aug[:, 4:8] == 0)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_llama(), byte_level_tokenizer()


def _compress(model, tok, **kw):
    return graphprune.compress(model, sparsity=0.3, tokenizer=tok, nsamples=16, seqlen=32, progress=False,
                               use_cache=False, **kw)


def test_compress_with_lsq_writes_the_refit_weights_of_each_consumer(model_and_tokenizer):
    """The pruned down_proj equals the refit computed by hand from the dense model's activations."""
    from graphprune.calibration.text import load_calibration

    model, tok = model_and_tokenizer
    result = _compress(model, tok, criterion="flap", compensate="lsq", allocation="uniform")
    batches = load_calibration("default", tok, nsamples=16, seqlen=32, seed=0, add_bos=False)
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        model(input_ids=batches)
    handle.remove()
    x = torch.cat(seen)
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    h = xa.T @ xa / xa.shape[0]
    dense = model.model.layers[1].mlp.down_proj
    gid = next(g.id for g in result.groups.groups if g.kind == "channel" and g.layer == 1)
    removed = result.removed[gid]
    expected = lsq.refit(lsq.augmented_weight(dense.weight, None), h, removed, 0.01)
    kept = np.setdiff1d(np.arange(dense.weight.shape[1]), removed)
    pruned = result.model.model.layers[1].mlp.down_proj
    assert torch.allclose(pruned.weight.double(), expected[:, kept], atol=1e-5)
    assert torch.allclose(pruned.bias.double(), expected[:, -1], atol=1e-5)


@pytest.mark.parametrize("options", [dict(criterion="flap", compensate="lsq", sequential=True),
                                     dict(criterion="obs"), dict(criterion="obs", sequential=True),
                                     dict(criterion="obs", allocation="uniform"),
                                     dict(criterion="obs", criterion_options={"scale": "residual"}),
                                     dict(criterion="flap", compensate="bias", sequential=True)])
def test_layerwise_modes_prune_to_a_valid_model_with_lower_layer_error(model_and_tokenizer, options):
    model, tok = model_and_tokenizer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _compress(model, tok, **options)
    lw = result.report["layerwise"]
    assert lw["sequential"] == options.get("sequential", False)
    assert lw["mean_relative_error_compensated"] <= lw["mean_relative_error_uncompensated"]
    assert abs(result.report["params"]["achieved_sparsity"] - 0.3) < 0.05
    ids = torch.randint(0, 200, (1, 12))
    assert torch.isfinite(result.model(input_ids=ids).logits).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model was modified"


def test_sequential_reselection_keeps_the_allocated_counts(model_and_tokenizer):
    model, tok = model_and_tokenizer
    plain = _compress(model, tok, criterion="obs")
    seq = _compress(model, tok, criterion="obs", sequential=True)
    assert {g: len(r) for g, r in plain.removed.items()} == {g: len(r) for g, r in seq.removed.items()}


def test_obs_search_is_cached_and_reused_at_another_sparsity(model_and_tokenizer, monkeypatch):
    """The greedy path runs every group to its floor, so a second run (other sparsity) skips it and
    removes exactly what a fresh search would."""
    from graphprune.criteria.obs import StructuredOBS

    model, tok = model_and_tokenizer
    kw = dict(criterion="obs", tokenizer=tok, nsamples=16, seqlen=32, progress=False)
    graphprune.compress(model, sparsity=0.2, use_cache=True, **kw)
    fresh = graphprune.compress(model, sparsity=0.4, use_cache=False, **kw)
    monkeypatch.setattr(StructuredOBS, "paths", lambda *a, **k: pytest.fail("the OBS search ran again"))
    cached = graphprune.compress(model, sparsity=0.4, use_cache=True, **kw)
    assert fresh.removed.keys() == cached.removed.keys()
    assert all(np.array_equal(fresh.removed[g], cached.removed[g]) for g in fresh.removed)


@pytest.mark.parametrize("options, message", [
    (dict(criterion="obs", compensate="bias"), "least-squares"),
    (dict(criterion="obs", criterion_options={"scale": "loss"}), "scale='loss'"),
    (dict(criterion="flap", compensate="none", sequential=True), "--sequential"),
    (dict(criterion="flap", compensate="ols"), "unknown --compensate"),
])
def test_inconsistent_compensation_options_are_refused(model_and_tokenizer, options, message):
    model, tok = model_and_tokenizer
    with pytest.raises(UserError, match=message):
        _compress(model, tok, **options)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "mistral", "phi3", "bert"])
def test_block_runner_reproduces_the_models_own_forward(family):
    """Blocks run one at a time on the captured inputs and arguments give what the model computes."""
    from graphprune.models.structure import find_blocks
    from graphprune.calibration.blocks import BlockRunner
    from graphprune.testing.zoo import build_tiny

    model, config = build_tiny(family)
    batches = torch.randint(3, config.vocab_size, (6, 16))
    runner = BlockRunner(model, batches, batch_size=4, progress=False)
    inputs = runner.inputs
    for index in range(len(runner)):
        inputs = runner.run_block(index, inputs).outputs
    _, blocks = find_blocks(model)
    expected = []
    handle = blocks[-1].register_forward_hook(
        lambda m, a, out: expected.append(out[0] if isinstance(out, (tuple, list)) else out))
    with torch.no_grad():
        for chunk in (batches[:4], batches[4:]):
            model(input_ids=chunk)
    handle.remove()
    for got, want in zip(inputs, expected):
        assert torch.allclose(got, want, atol=1e-5)


def test_output_fisher_is_the_mean_squared_token_loss_gradient_of_each_output(model_and_tokenizer):
    model, _ = model_and_tokenizer
    batches = torch.randint(3, 200, (4, 10))
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    # block by block: a forward over the blocks, the loss on the model's head, a backward per block
    fisher = BlockRunner(model, batches, batch_size=2, progress=False).output_fisher(names)
    outputs = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outputs.setdefault(n, []).append(o))
               for n in names]
    expected = {n: 0 for n in names}
    for chunk in (batches[:2], batches[2:]):
        outputs.clear()
        with torch.enable_grad():
            out = model(input_ids=chunk, labels=chunk)
            grads = torch.autograd.grad(out.loss * chunk.shape[0] * (chunk.shape[1] - 1), [outputs[n][0] for n in names])
        for n, g in zip(names, grads):
            expected[n] = expected[n] + (g.double() ** 2).reshape(-1, g.shape[-1]).sum(0)
    for h in handles:
        h.remove()
    for n in names:
        assert torch.allclose(fisher[n], expected[n] / batches.numel(), rtol=1e-4, atol=1e-12)
    assert all(p.requires_grad for p in model.parameters()), "parameters' requires_grad must be restored"


def test_obs_ranks_by_loss_fisher_by_default_and_by_residual_energy_without_an_lm_loss(model_and_tokenizer):
    from graphprune.testing.zoo import build_tiny

    model, tok = model_and_tokenizer
    assert _compress(model, tok, criterion="obs").report["criterion_diagnostics"]["scale"] == "fisher"
    encoder, _ = build_tiny("bert")
    encoder_tok = byte_level_tokenizer()
    encoder_tok.pad_token = "</s>"
    result = graphprune.compress(encoder, criterion="obs", sparsity=0.3, tokenizer=encoder_tok, progress=False,
                                 use_cache=False)
    assert result.report["criterion_diagnostics"]["scale"] == "residual"


def test_obs_fisher_weighting_needs_a_language_model_loss():
    from graphprune.testing.zoo import build_tiny

    model, _ = build_tiny("bert")
    with pytest.raises(UserError, match="scale=fisher needs a language-model loss"):
        graphprune.compress(model, criterion="obs", criterion_options={"scale": "fisher"}, sparsity=0.3,
                            tokenizer=byte_level_tokenizer(), progress=False, use_cache=False)
