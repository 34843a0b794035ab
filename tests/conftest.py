import os
import warnings

import pytest
import torch

# Tests never reach a model hub, and results must not depend on the machine's thread count.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models run far faster on one thread than on two contended ones (about 15 ms vs 30 us per
# small linear on a loaded 2-core machine); tests that load a real model raise it locally.
torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=UserWarning, module="torch_pruning")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Calibration caches go to a per-session temp dir; the GGUF conversion cache is shared."""
    monkeypatch.setenv("GRAPHPRUNE_CALIB_CACHE", str(tmp_path_factory.getbasetemp() / "calib-cache"))


# The tiny model and calibration text most command-line tests share (one of each per test module;
# a module that needs them as strings or with other sizes defines its own).
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from graphprune.testing.fixtures import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from graphprune.testing.fixtures import write_sample_text

    return write_sample_text(tmp_path_factory.mktemp("data") / "calib.txt")
