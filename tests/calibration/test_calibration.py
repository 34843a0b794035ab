"""Calibration text sources and the random-window protocol."""

from __future__ import annotations

import random
import sys
import types
from pathlib import Path

import pytest
import torch

from graphprune.calibration.text import (
    default_calibration_text,
    load_calibration,
    needs_bos,
    read_calibration_text,
    read_text_file,
    tokenize_text,
)
from graphprune.errors import CalibrationError, UserError
from graphprune.testing.fixtures import byte_level_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    return path


# --- read_text_file -----------------------------------------------------------------------------


def test_reads_utf8_and_drops_byte_order_mark(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffcafé\n".encode())
    assert read_text_file(path) == "café\n"


def test_missing_file(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        read_text_file(tmp_path / "absent.txt")


@pytest.mark.parametrize("content", [b"", b"  \n\t\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(CalibrationError, match="is empty"):
        read_text_file(path)


def test_binary_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CalibrationError, match="looks binary"):
        read_text_file(path)


def test_utf16_file_is_reported_as_binary(tmp_path):
    path = tmp_path / "utf16.txt"
    path.write_text("some text", encoding="utf-16")
    with pytest.raises(CalibrationError, match="looks binary"):
        read_text_file(path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(CalibrationError, match=r"not UTF-8 text \(invalid byte at offset 3\)"):
        read_text_file(path)


def test_directory_is_not_a_text_file(tmp_path):
    with pytest.raises(CalibrationError, match="is a directory"):
        read_text_file(tmp_path)


def test_calibration_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError) as error:
        read_text_file(tmp_path / "absent.txt")
    assert "\n" not in str(error.value)


# --- sources ------------------------------------------------------------------------------------


def test_embedded_excerpt_is_packaged_and_large_enough(tokenizer):
    text = default_calibration_text()
    assert text.startswith("= Anarchism =")
    assert 200_000 < len(text.encode("utf-8")) < 400_000
    assert read_calibration_text("default") == text
    windows = load_calibration("default", tokenizer)
    assert windows.shape == (128, 128)


def test_none_is_not_a_text_to_read(tokenizer):
    with pytest.raises(CalibrationError, match="not a text to read"):
        load_calibration("none", tokenizer)


def test_path_objects_and_strings_both_work(text_file, tokenizer):
    by_path = load_calibration(text_file, tokenizer, nsamples=4, seqlen=16)
    by_string = load_calibration(str(text_file), tokenizer, nsamples=4, seqlen=16)
    assert torch.equal(by_path, by_string)


def test_hf_dataset_without_datasets_library(monkeypatch, tokenizer):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(CalibrationError, match=r"needs the 'datasets' library.*pip install datasets"):
        load_calibration("hf:wikitext:wikitext-2-raw-v1", tokenizer)


def _fake_datasets(monkeypatch, load_dataset) -> None:
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hf_dataset_spec_is_parsed_and_rows_joined(monkeypatch):
    calls = []

    def load_dataset(name, config, *, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "first row"}, {"text": "  "}, {"text": "second row"}])

    _fake_datasets(monkeypatch, load_dataset)
    assert read_calibration_text("hf:wikitext:wikitext-2-raw-v1:validation") == "first row\n\nsecond row"
    assert read_calibration_text("hf:org/corpus") == "first row\n\nsecond row"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation", True), ("org/corpus", None, "train", True)]


def test_hf_dataset_uses_first_string_column_when_no_text_column(monkeypatch):
    _fake_datasets(monkeypatch, lambda *args, **kwargs: iter([{"id": 1, "content": "body"}]))
    assert read_calibration_text("hf:code") == "body"


def test_hf_dataset_without_any_text_column(monkeypatch):
    _fake_datasets(monkeypatch, lambda *args, **kwargs: iter([{"id": 1, "score": 0.5}]))
    with pytest.raises(CalibrationError, match=r"has no text column \(columns: id, score\)"):
        read_calibration_text("hf:numbers")


def test_hf_dataset_unreachable_hub(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\ntraceback detail")

    _fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(CalibrationError, match=r"cannot load dataset hf:wikitext: Couldn't reach 'wikitext'.*\)$"):
        read_calibration_text("hf:wikitext")


@pytest.mark.parametrize("spec", ["hf:", "hf::config", "hf:a:b:c:d"])
def test_bad_hf_spec(spec):
    with pytest.raises(CalibrationError, match="expected hf:NAME"):
        read_calibration_text(spec)


# --- windows ------------------------------------------------------------------------------------


def test_windows_follow_the_protocol(text_file, tokenizer):
    token_ids = tokenize_text(tokenizer, text_file.read_text(encoding="utf-8"))
    windows = load_calibration(text_file, tokenizer, nsamples=8, seqlen=32, seed=3)
    assert windows.shape == (8, 32) and windows.dtype == torch.long
    rng = random.Random(3)
    for window in windows:
        offset = rng.randint(0, token_ids.numel() - 32)
        assert torch.equal(window, token_ids[offset : offset + 32])


def test_same_seed_same_windows_other_seed_other_windows(text_file, tokenizer):
    first = load_calibration(text_file, tokenizer, nsamples=8, seqlen=32, seed=0)
    assert torch.equal(first, load_calibration(text_file, tokenizer, nsamples=8, seqlen=32, seed=0))
    assert not torch.equal(first, load_calibration(text_file, tokenizer, nsamples=8, seqlen=32, seed=1))


def test_tokenization_adds_no_special_tokens(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("abcd", encoding="utf-8")
    windows = load_calibration(path, tokenizer, nsamples=2, seqlen=4)
    assert windows.tolist() == [tokenizer.convert_tokens_to_ids(list("abcd"))] * 2


def test_add_bos_prepends_bos_to_seqlen_minus_one_tokens(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("abc", encoding="utf-8")  # exactly seqlen - 1 tokens: enough with BOS
    windows = load_calibration(path, tokenizer, nsamples=3, seqlen=4, add_bos=True)
    assert windows.shape == (3, 4)
    assert windows[:, 0].tolist() == [tokenizer.bos_token_id] * 3
    assert windows[0, 1:].tolist() == tokenizer.convert_tokens_to_ids(list("abc"))


def test_add_bos_without_bos_token(text_file, tokenizer):
    no_bos = byte_level_tokenizer()
    no_bos.bos_token = None
    with pytest.raises(CalibrationError, match="no BOS token"):
        load_calibration(text_file, no_bos, nsamples=2, seqlen=8, add_bos=True)


def test_too_few_tokens_says_how_many(tmp_path, tokenizer):
    path = tmp_path / "tiny.txt"
    path.write_text("0123456789", encoding="utf-8")
    with pytest.raises(CalibrationError, match="has 10 tokens; at least 16 are needed for windows of 16 tokens"):
        load_calibration(path, tokenizer, nsamples=2, seqlen=16)


@pytest.mark.parametrize("nsamples, seqlen", [(0, 8), (4, 0), (-1, 8), (2.5, 8)])
def test_bad_sizes(text_file, tokenizer, nsamples, seqlen):
    with pytest.raises(CalibrationError, match="must be a positive integer"):
        load_calibration(text_file, tokenizer, nsamples=nsamples, seqlen=seqlen)


def test_needs_bos_only_for_gemma():
    def model_of_type(model_type):
        return types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type))

    assert needs_bos(model_of_type("gemma3_text"))
    assert needs_bos(model_of_type("gemma"))
    assert not needs_bos(model_of_type("llama"))
    assert not needs_bos(types.SimpleNamespace())


# --- tokenizing long texts ----------------------------------------------------------------------


def _trained_tokenizer(pre_tokenizer, text: str):
    """A small BPE with merges, trained on `text` (cuts inside a merged word would show)."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizer
    raw.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=raw)


def _long_text() -> str:
    rng = random.Random(0)
    words = ["pruning", "the", "graph", "of", "channels", "heads", "1984", "(see", "below).", "=== A ===", "x"]
    paragraphs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) for _ in range(2500)]
    return "\n\n".join(paragraphs) + "\n"


def _encoded_lengths(monkeypatch) -> list[int]:
    import graphprune.calibration.text as calibration

    lengths: list[int] = []
    encode = calibration._encode

    def recording(tok, texts):
        lengths.extend(len(t) for t in ([texts] if isinstance(texts, str) else texts))
        return encode(tok, texts)

    monkeypatch.setattr(calibration, "_encode", recording)
    return lengths


def test_a_long_text_is_tokenized_in_pieces_with_the_ids_of_the_whole_text(monkeypatch):
    from tokenizers import pre_tokenizers

    text = _long_text()
    assert len(text) > 3 * 65536
    tokenizer = _trained_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False), text)
    whole = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    lengths = _encoded_lengths(monkeypatch)
    assert tokenize_text(tokenizer, text).tolist() == whole
    assert max(lengths) < 70_000  # never the whole text at once: its bookkeeping is what we avoid


def test_a_tokenizer_that_sees_the_cuts_gets_the_whole_text_at_once(monkeypatch):
    from tokenizers import normalizers, pre_tokenizers

    text = _long_text()
    # A tokenizer that strips each input drops the space a piece starts with.
    tokenizer = _trained_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False), text)
    tokenizer.backend_tokenizer.normalizer = normalizers.Strip()
    whole = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    lengths = _encoded_lengths(monkeypatch)
    assert tokenize_text(tokenizer, text).tolist() == whole
    assert max(lengths) == len(text)
