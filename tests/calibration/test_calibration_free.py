"""Calibration-free compression: `--calib none` (issue 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphprune
from graphprune.calibration.selfgen import generate_calibration
from graphprune.errors import CalibrationError
from graphprune.testing.fixtures import byte_level_tokenizer, tiny_llama
from graphprune.testing.zoo import build_tiny


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_llama(), byte_level_tokenizer()


def test_generated_calibration_has_exactly_the_requested_tokens(model_and_tokenizer):
    model, tok = model_and_tokenizer
    gen = generate_calibration(model, tok, nsamples=5, seqlen=24, seed=1, batch_size=2, progress=False)
    assert gen.batches.shape == (5, 24)
    assert len(gen.texts) == 5 and all(isinstance(t, str) and t for t in gen.texts)
    assert gen.settings["seed"] == 1 and gen.settings["method"] == "self-generated"


def test_generation_is_deterministic_and_seed_dependent(model_and_tokenizer):
    model, tok = model_and_tokenizer
    a = generate_calibration(model, tok, nsamples=4, seqlen=16, seed=3, progress=False).batches
    b = generate_calibration(model, tok, nsamples=4, seqlen=16, seed=3, progress=False).batches
    c = generate_calibration(model, tok, nsamples=4, seqlen=16, seed=4, progress=False).batches
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_default_sampling_is_the_models_own_distribution_untruncated_and_recorded(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    seen = {}
    generate = model.generate

    def recording_generate(**kwargs):
        seen.update(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    gen = generate_calibration(model, tok, nsamples=2, seqlen=8, seed=0, progress=False)
    # temperature 1 and no nucleus / top-k truncation: the tail that real text has stays in the sample
    assert seen["do_sample"] and seen["temperature"] == 1.0 and seen["top_p"] == 1.0 and seen["top_k"] == 0
    assert gen.settings["temperature"] == 1.0 and gen.settings["top_p"] == 1.0


def test_generation_does_not_touch_the_global_random_state(model_and_tokenizer):
    model, tok = model_and_tokenizer
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_calibration(model, tok, nsamples=2, seqlen=8, seed=0, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_bos_starts_each_window_when_the_model_needs_it(model_and_tokenizer):
    model, tok = model_and_tokenizer
    gen = generate_calibration(model, tok, nsamples=3, seqlen=10, seed=0, add_bos=True, progress=False)
    assert (gen.batches[:, 0] == tok.bos_token_id).all()


def test_generation_starts_after_the_end_of_document_token_and_leaves_it_out_of_the_window(model_and_tokenizer,
                                                                                         monkeypatch):
    model, tok = model_and_tokenizer  # the byte tokenizer's "</s>" (id 1) separates documents
    prompts = []
    generate = model.generate

    def recording_generate(*, input_ids, **kwargs):
        prompts.append(input_ids.clone())
        return generate(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    gen = generate_calibration(model, tok, nsamples=3, seqlen=12, seed=0, batch_size=3, progress=False)
    assert prompts and all(p.tolist() == [[1]] * 3 for p in prompts)
    assert gen.batches.shape == (3, 12)
    assert "end-of-document '</s>'" in gen.settings["start"] and not gen.settings["bos"]


def test_without_an_end_of_document_token_generation_starts_from_sentence_openers(model_and_tokenizer):
    from graphprune.calibration.selfgen import OPENERS, generation_start

    _, tok = model_and_tokenizer

    class NoSeparatorTokenizer:
        bos_token_id, bos_token = None, None

        def get_vocab(self):
            return {k: v for k, v in tok.get_vocab().items() if k not in ("<s>", "</s>")}

        def __call__(self, text, **kwargs):
            return tok(text, **kwargs)

    start = generation_start(NoSeparatorTokenizer(), add_bos=False)
    assert start.context == () and start.kept == 0
    assert len(start.openers) == len(OPENERS) and start.description == "a random sentence opener"


def test_same_seed_gives_the_same_kept_units_with_data_driven_criteria(model_and_tokenizer):
    model, tok = model_and_tokenizer
    runs = [graphprune.compress(model, criterion="flap", sparsity=0.3, calib="none", tokenizer=tok, nsamples=8,
                                seqlen=24, seed=7, progress=False, use_cache=False) for _ in range(2)]
    assert runs[0].removed.keys() == runs[1].removed.keys()
    assert all(np.array_equal(runs[0].removed[g], runs[1].removed[g]) for g in runs[0].removed)
    cal = runs[0].report["calibration"]
    assert cal["source"] == "none" and cal["generation"]["method"] == "self-generated"
    assert len(cal["generated_text"]) == 8  # the report records the text for reproduction


@pytest.mark.parametrize("criterion", ["magnitude", "spectral"])
def test_weight_only_criteria_never_run_the_model_on_data(model_and_tokenizer, criterion, monkeypatch):
    """No text is read or generated and no calibration pass runs (tracing sees one example input)."""
    import graphprune.calibration.text
    import graphprune.calibration.selfgen
    import graphprune.calibration.blocks
    import graphprune.backends.memory

    model, tok = model_and_tokenizer

    def refuse(*args, **kwargs):
        raise AssertionError("calibration was attempted")

    for module, name in [(graphprune.backends.memory, "collect"), (graphprune.calibration.selfgen, "generate_calibration"),
                         (graphprune.calibration.text, "load_calibration"), (graphprune.calibration.blocks, "BlockRunner")]:
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(model, "generate", refuse)
    result = graphprune.compress(model, criterion=criterion, sparsity=0.3, calib="none", tokenizer=tok,
                                 progress=False, use_cache=False)
    assert result.report["calibration"] is None
    assert abs(result.report["params"]["achieved_sparsity"] - 0.3) < 0.05


def test_spectral_score_prefers_units_that_shape_the_spectrum():
    """A column aligned with nothing the layer does (zero) scores lowest; a dominant direction highest."""
    from graphprune.criteria.spectral import spectral_change

    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 12, generator=g, dtype=torch.float64)
    a[:, 3] = 0.0
    a[:, 7] = 20.0 * torch.randn(16, generator=g, dtype=torch.float64)
    scores = spectral_change(a, torch.arange(12)[:, None])
    assert int(np.argmin(scores)) == 3
    assert int(np.argmax(scores)) == 7


def test_encoders_cannot_self_generate_and_say_so():
    model, config = build_tiny("bert")
    with pytest.raises(CalibrationError, match="cannot generate text"):
        generate_calibration(model, byte_level_tokenizer(), nsamples=2, seqlen=8, progress=False)
