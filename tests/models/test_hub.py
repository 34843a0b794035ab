"""Hub ids (`org/name[@revision]`) resolved from a local Hugging Face cache with HF_HUB_OFFLINE=1: the
cache is laid out in the test as huggingface_hub stores a download (blobs/, refs/main, snapshots/REV/
with symlinks), so no network is ever needed."""

import os
import subprocess
import sys

import pytest

from graphprune.errors import ModelLoadError
from graphprune.models.hub import content_sha256, parse_hub_id
from graphprune.testing.fixtures import save_tiny_llama, write_sample_text
from graphprune.testing.hub import cache_as_hub


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    model = save_tiny_llama(root / "tiny")
    snapshot = cache_as_hub(model, root / "cache", "org/tiny")
    return root / "cache", snapshot, model


@pytest.fixture
def offline_cache(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub[0]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def test_hub_ids_are_told_from_paths(tmp_path, monkeypatch):
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id("HuggingFaceTB/SmolLM2-135M@0123abcd") == ("HuggingFaceTB/SmolLM2-135M", "0123abcd")
    for path in ("/abs/dir", "./org/name", "out/model.onnx", "a/b/c", "smollm2-135m", "dir/config.json"):
        assert parse_hub_id(path) is None, path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_hub_id("org/name") is None  # an existing path wins


def test_a_hub_id_loads_from_the_cache_offline(offline_cache):
    from graphprune.models import load_model

    cache, snapshot, model = offline_cache
    loaded = load_model("org/tiny")
    assert loaded.name == "org/tiny" and loaded.path == snapshot
    assert loaded.hub.commit == snapshot.name and loaded.hub.spec == f"org/tiny@{snapshot.name}"
    assert load_model(f"org/tiny@{snapshot.name}").hub.commit == snapshot.name  # a pinned commit
    # the blobs are named by their sha256: the content hash reads no weights, and equals the folder's
    assert content_sha256(snapshot) == content_sha256(model)
    import graphprune

    assert graphprune.load_pruned("org/tiny").config.hidden_size == 64  # every loader takes a Hub id
    assert {g.kind for g in graphprune.inspect("org/tiny")} >= {"channel", "kv-group"}


def test_a_hub_id_not_in_the_cache_is_refused_in_one_line_offline(offline_cache):
    from graphprune.models import load_model

    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache .* HF_HUB_OFFLINE=1"):
        load_model("org/missing")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model("org/tiny@no-such-branch")


def test_compress_a_hub_id_offline_from_the_command_line(hub, tmp_path):
    """The whole command with HF_HUB_OFFLINE=1: the recipe pins the commit; the card names the repo."""
    cache, snapshot, _ = hub
    calib = write_sample_text(tmp_path / "calib.txt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "graphprune.cli", "-q", "compress", "org/tiny", "--criterion", "flap",
                             "--sparsity", "0.3", "--calib", str(calib), "--nsamples", "4", "--seqlen", "16",
                             "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("org/tiny: flap")
    import yaml

    recipe = yaml.safe_load((out / "graphprune_recipe.yaml").read_text())
    assert recipe["source"]["kind"] == "hub" and recipe["source"]["model"] == f"org/tiny@{snapshot.name}"
    card = (out / "README.md").read_text()
    assert "base_model: org/tiny" in card and snapshot.name in card
    missing = subprocess.run([sys.executable, "-m", "graphprune.cli", "inspect", "org/missing"], capture_output=True,
                             text=True, env=env, timeout=120)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert "not in the local Hugging Face cache" in missing.stderr
