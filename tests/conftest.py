import os
import warnings

import pytest
import torch

# Tests never reach a model hub, and results must not depend on the machine's thread count.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", category=UserWarning, module="torch_pruning")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Calibration caches go to a per-session temp dir; the GGUF conversion cache is shared."""
    monkeypatch.setenv("GRAPHPRUNE_CALIB_CACHE", str(tmp_path_factory.getbasetemp() / "calib-cache"))
