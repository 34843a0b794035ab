"""Gradient statistics one block at a time (`gradient_terms_by_blocks`, what streaming runs for the
gradient criteria) equal those of the whole model's backward (`gradient_terms`): per unit the sum and
sum of squares of s_b(u) = Σ_{w in u} w · ∂L_b/∂w over batches, the mean loss, and with two calibration
sets the per-unit alignment of their summed gradients. Even a float64 model agrees only to ~1e-7 of each
statistic's scale: transformers computes the LM loss on float32 logits, and the block source takes the
head gradient of the summed loss (then scales it to the mean), the whole model that of the mean, which
rounds differently in float32; a wrong block order or a missing path would be off by far more."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphprune.calibration.blocks import BlockRunner
from graphprune.calibration.gradients import gradient_terms, gradient_terms_by_blocks, lm_steps
from graphprune.errors import PruningError
from graphprune.graph import analyze
from graphprune.testing.fixtures import tiny_llama

BATCH = 2


def _windows(seed: int, n: int = 6, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(2, 258, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _layer_groups(model):
    groups = analyze(model)
    return [g for g in groups if g.status == "prunable" and g.kind in ("channel", "kv-group")]


def _close(a: dict, b: dict, tolerance: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for gid in a:
        assert a[gid]["batches"] == b[gid]["batches"]
        for key in ("sum", "sumsq"):
            scale = float(np.abs(a[gid][key]).max()) or 1.0
            np.testing.assert_allclose(b[gid][key], a[gid][key], rtol=0, atol=tolerance * scale, err_msg=f"{gid} {key}")


@pytest.mark.parametrize("tied,dtype", [(False, torch.float64), (True, torch.float64), (False, torch.float32)])
def test_one_set_block_by_block_equals_the_whole_model(tied, dtype):
    model = tiny_llama(layers=3, tied=tied, seed=3).to(dtype)
    chosen = _layer_groups(model)
    windows = _windows(0)
    whole = gradient_terms(model, chosen, lm_steps(model, windows, BATCH), None, progress=False, cache_key=None)
    runner = BlockRunner(model, windows, batch_size=BATCH, progress=False)
    blocks = gradient_terms_by_blocks(runner, chosen, [len(runner.inputs)])
    _close(whole.domain, blocks.domain, 1e-6 if dtype == torch.float64 else 1e-4)
    assert blocks.mean_loss["domain"] == pytest.approx(whole.mean_loss["domain"], rel=1e-6)
    assert blocks.general == {} and blocks.alignment == {}
    assert all(not p.requires_grad for p in model.parameters())  # the model is left as it was
    assert all(p.grad is None for p in model.parameters())


def test_two_sets_give_the_same_general_statistics_and_alignment():
    model = tiny_llama(layers=2, seed=4).double()
    chosen = _layer_groups(model)
    domain, general = _windows(1), _windows(2, n=4)
    whole = gradient_terms(model, chosen, lm_steps(model, domain, BATCH), lm_steps(model, general, BATCH),
                           progress=False, cache_key=None)
    batches = list(domain.split(BATCH)) + list(general.split(BATCH))
    runner = BlockRunner(model, torch.cat([domain, general]), batch_size=BATCH, progress=False)
    assert [b.shape for b in runner.batches_by_batch] == [b.shape for b in batches]
    blocks = gradient_terms_by_blocks(runner, chosen, [3, 2])
    _close(whole.domain, blocks.domain)
    _close(whole.general, blocks.general)
    assert whole.alignment.keys() == blocks.alignment.keys()
    for gid in whole.alignment:
        np.testing.assert_allclose(blocks.alignment[gid], whole.alignment[gid], rtol=0, atol=1e-6)
    assert blocks.mean_loss["general"] == pytest.approx(whole.mean_loss["general"], rel=1e-6)


def test_a_group_across_blocks_and_a_wrong_split_are_refused():
    model = tiny_llama(layers=2, seed=5)
    groups = analyze(model)
    runner = BlockRunner(model, _windows(0, n=4), batch_size=BATCH, progress=False)
    hidden = [g for g in groups if g.kind == "hidden"]
    assert hidden
    with pytest.raises(PruningError, match="not inside one block"):
        gradient_terms_by_blocks(runner, hidden, [2])
    with pytest.raises(ValueError, match="does not split"):
        gradient_terms_by_blocks(runner, _layer_groups(model), [1])
