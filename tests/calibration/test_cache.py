"""The calibration cache (issue 24): where it lives, what its keys cover, and that an entry which does
not verify is recomputed after one warning line instead of being trusted."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from graphprune.calibration import cache
from graphprune.calibration.cache import (
    cache_dir,
    load_cached,
    read_cache_entry,
    save_cached,
    tokenizer_fingerprint,
    weights_fingerprint,
    write_cache_tensors,
)
from graphprune.calibration.selfgen import GeneratedCalibration, cached_generation
from graphprune.calibration.sets import content_digest
from graphprune.calibration.stats import Calibration, InputStats
from graphprune.errors import GraphpruneWarning
from graphprune.models.aliases import cache_root
from graphprune.testing.fixtures import byte_level_tokenizer, tiny_llama


@pytest.fixture
def calib_cache(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "calib-cache"
    monkeypatch.setenv("GRAPHPRUNE_CALIB_CACHE", str(directory))
    return directory


def _recorded(fn):
    """(result of fn(), the GraphpruneWarning messages it raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if issubclass(w.category, GraphpruneWarning)]


# --- where the cache lives (defect 13) ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "   "], ids=["empty", "blank"])
def test_empty_or_blank_cache_variables_count_as_unset(tmp_path, monkeypatch, value):
    """`GRAPHPRUNE_CACHE=$UNSET graphprune ...` once put the calibration cache in the current directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("GRAPHPRUNE_CACHE", value)
    monkeypatch.setenv("GRAPHPRUNE_CALIB_CACHE", value)
    monkeypatch.chdir(tmp_path)
    expected = tmp_path / "home" / ".cache" / "graphprune"
    assert cache_root() == expected
    assert cache_dir() == expected / "calibration"
    monkeypatch.setenv("XDG_CACHE_HOME", value)
    assert cache_root() == expected


def test_the_calibration_cache_follows_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.delenv("GRAPHPRUNE_CALIB_CACHE", raising=False)
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path / "root"))
    assert cache_dir() == tmp_path / "root" / "calibration"
    monkeypatch.setenv("GRAPHPRUNE_CALIB_CACHE", str(tmp_path / "calib"))
    assert cache_dir() == tmp_path / "calib"


# --- what the keys cover (defect 3) ----------------------------------------------------------------------


def test_weights_fingerprint_sees_every_value():
    """It once hashed 16 sampled values per tensor: two models differing elsewhere shared statistics."""
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    weight = b.model.layers[0].mlp.down_proj.weight  # 64 x 96: the samples were every 384th value
    with torch.no_grad():
        weight[0, 1] = torch.nextafter(weight[0, 1], torch.tensor(2.0))  # one value, by one ulp
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_weights_fingerprint_covers_buffers_dtypes_and_the_config():
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    b.config.rms_norm_eps = 1e-3  # same weights, another model
    assert weights_fingerprint(a) != weights_fingerprint(b)
    c = tiny_llama(seed=0)
    c.model.layers[0].mlp.register_buffer("extra", torch.zeros(3, dtype=torch.int64))
    assert weights_fingerprint(a) != weights_fingerprint(c)


def test_tied_weights_are_hashed_once_but_named():
    tied = tiny_llama(seed=0, tied=True)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert weights_fingerprint(tied) == weights_fingerprint(tiny_llama(seed=0, tied=True))


def test_tokenizer_fingerprint_changes_with_the_tokenizer():
    a, b = byte_level_tokenizer(), byte_level_tokenizer()
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    b.add_tokens(["<extra>"])
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    assert tokenizer_fingerprint(None) is None


def test_content_digest_changes_with_the_windows_and_the_pairs():
    windows = torch.arange(12).reshape(3, 4)
    other = windows.clone()
    other[2, 3] += 1
    assert content_digest(windows) == content_digest(windows.clone())
    assert content_digest(windows) != content_digest(other)
    assert content_digest(windows, ["q", "p"]) != content_digest(windows, ["q", "p2"])
    assert len(content_digest(windows)) == 64


# --- checksums and damaged entries (defect 4) --------------------------------------------------------------


def _statistics() -> Calibration:
    calib = Calibration(tokens=40)
    calib.inputs["model.layers.0.mlp.down_proj"] = InputStats(40, torch.arange(6, dtype=torch.float64),
                                                               torch.arange(6, dtype=torch.float64) ** 2)
    calib.block_angle[0] = 0.25
    return calib


def _rewrite(path: Path, change) -> None:
    """Rewrite a safetensors entry with `change(tensors)` applied and its metadata (checksum) kept."""
    with safe_open(str(path), framework="pt") as opened:
        metadata = opened.metadata()
        tensors = {k: opened.get_tensor(k) for k in opened.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_an_entry_round_trips_with_its_checksum(calib_cache):
    save_cached("k", _statistics())
    with safe_open(str(calib_cache / "k.safetensors"), framework="pt") as opened:
        assert len(opened.metadata()[cache.CHECKSUM_KEY]) == 64
    loaded, said = _recorded(lambda: load_cached("k", expect=["model.layers.0.mlp.down_proj"]))
    assert said == []
    assert loaded.tokens == 40 and loaded.block_angle == {0: 0.25}
    assert torch.equal(loaded.inputs["model.layers.0.mlp.down_proj"].sumsq, torch.arange(6, dtype=torch.float64) ** 2)


def _scale_a_value(tensors):
    tensors["in/model.layers.0.mlp.down_proj/sum"] = tensors["in/model.layers.0.mlp.down_proj/sum"] * 2


DAMAGE = {
    "changed-values": (lambda path: _rewrite(path, _scale_a_value), "checksum does not match"),
    "no-checksum": (lambda path: save_file({"tokens": torch.tensor([1])}, str(path)), "carries no checksum"),
    "garbage": (lambda path: path.write_bytes(b"\x07" * 100), "unreadable"),
    "truncated": (lambda path: path.write_bytes(path.read_bytes()[:-5]), "unreadable"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_an_entry_that_does_not_verify_is_discarded_with_one_warning(calib_cache, damage):
    save_cached("k", _statistics())
    harm, needle = DAMAGE[damage]
    harm(calib_cache / "k.safetensors")
    loaded, said = _recorded(lambda: load_cached("k"))
    assert loaded is None
    assert len(said) == 1 and "\n" not in said[0], said
    assert said[0].startswith(f"calibration cache entry {calib_cache / 'k'}.safetensors is damaged (")
    assert needle in said[0] and said[0].endswith("; recomputing it")


MALFORMED = {  # entries whose checksum verifies (written through the cache) but whose content is wrong
    "missing-sumsq": (lambda t: t.pop("in/m/sumsq"), "no tensor 'in/m/sumsq'"),
    "missing-tokens": (lambda t: t.pop("tokens"), "no tensor 'tokens'"),
    "wrong-shape": (lambda t: t.update({"in/m/sumsq": torch.zeros(5, dtype=torch.float64)}),
                    "have shapes (6,) and (5,)"),
    "two-counts": (lambda t: t.update({"in/m/count": torch.tensor([1, 2])}), "expected one value"),
    "stranger": (lambda t: t.update({"other": torch.zeros(1)}), "unexpected tensor 'other'"),
    "module-missing": (lambda t: None, "no statistics for n"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_statistics_with_missing_or_misshapen_tensors_are_recomputed_not_a_crash(calib_cache, case):
    tensors = {"in/m/sum": torch.zeros(6, dtype=torch.float64), "in/m/sumsq": torch.zeros(6, dtype=torch.float64),
               "in/m/count": torch.tensor([3]), "tokens": torch.tensor([3])}
    change, needle = MALFORMED[case]
    change(tensors)
    write_cache_tensors("k", tensors)
    loaded, said = _recorded(lambda: load_cached("k", expect=["m", "n"] if case == "module-missing" else ["m"]))
    assert loaded is None
    assert len(said) == 1 and needle in said[0], said


def test_gradient_terms_with_a_missing_tensor_are_recomputed(calib_cache):
    from graphprune.calibration.gradients import GradientTerms, _load_terms, _save_terms

    group = SimpleNamespace(id="g1", units=3)
    terms = GradientTerms({"g1": {"sum": np.ones(3), "sumsq": np.ones(3), "batches": 2}}, mean_loss={"domain": 1.5})
    _save_terms("grads", terms)
    loaded, said = _recorded(lambda: _load_terms("grads", [group]))
    assert said == [] and loaded.cached and loaded.mean_loss == {"domain": 1.5}
    tensors = read_cache_entry("grads")
    tensors.pop("domain/g1/sumsq")
    write_cache_tensors("grads", tensors)
    loaded, said = _recorded(lambda: _load_terms("grads", [group]))
    assert loaded is None and len(said) == 1 and "no tensor 'domain/g1/sumsq'" in said[0], said
    _rewrite(calib_cache / "grads.safetensors",
             lambda t: t.update({"loss/domain": torch.tensor([9.0], dtype=torch.float64)}))
    loaded, said = _recorded(lambda: _load_terms("grads", [group]))
    assert loaded is None and len(said) == 1 and "checksum does not match" in said[0], said


def test_obs_paths_with_a_missing_or_misshapen_tensor_are_recomputed(calib_cache):
    from graphprune.criteria.obs import GroupPath, load_paths, save_paths

    group = SimpleNamespace(id="g1", units=4)
    save_paths("paths", {"g1": GroupPath(np.array([2, 0, 1]), np.array([0.1, 0.2, 0.3]),
                                         {"residual": 1.0, "output": 2.0})}, {})
    (paths, rows), said = _recorded(lambda: load_paths("paths", [group]))
    assert said == [] and paths["g1"].order.tolist() == [2, 0, 1] and rows == {}
    for change, needle in ((lambda t: t.pop("error/g1"), "no tensor 'error/g1'"),
                           (lambda t: t.update({"order/g1": torch.tensor([7, 0, 1])}), "for 4 units")):
        tensors = {"order/g1": torch.tensor([2, 0, 1]), "error/g1": torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),
                   "scale/g1": torch.tensor([1.0, 2.0], dtype=torch.float64)}
        change(tensors)
        write_cache_tensors("paths", tensors)
        loaded, said = _recorded(lambda: load_paths("paths", [group]))
        assert loaded is None and len(said) == 1 and needle in said[0], said


def test_self_generated_text_is_regenerated_when_its_entry_does_not_verify(calib_cache):
    made = []

    def generate():
        made.append(1)
        return GeneratedCalibration(torch.arange(6).reshape(2, 3), ["one", "two"], {"seed": 0})

    first = cached_generation("gen", generate, shape=(2, 3))
    again, said = _recorded(lambda: cached_generation("gen", generate, shape=(2, 3)))
    assert len(made) == 1 and said == [] and torch.equal(again.batches, first.batches) and again.texts == ["one", "two"]
    meta = calib_cache / "gen.json"
    harms = [
        (lambda: meta.write_text(meta.read_text().replace("one", "uno")), "gen.json does not match its checksum"),
        (lambda: _rewrite(calib_cache / "gen.safetensors", lambda t: t.update({"ids": t["ids"] + 1})),
         "checksum does not match"),
        (lambda: meta.unlink(), "gen.json is missing"),
    ]
    for harm, needle in harms:
        harm()
        result, said = _recorded(lambda: cached_generation("gen", generate, shape=(2, 3)))
        assert len(said) == 1 and needle in said[0], said
        assert torch.equal(result.batches, first.batches) and result.texts == ["one", "two"]
    assert len(made) == 1 + len(harms)
    _, said = _recorded(lambda: cached_generation("gen", generate, shape=(4, 3)))
    assert len(said) == 1 and "its token ids have shape (2, 3), expected (4, 3)" in said[0], said
    assert json.loads(meta.read_text())["texts"] == ["one", "two"]
