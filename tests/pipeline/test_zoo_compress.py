"""Every dense zoo family prunes to a model that validates, saves and reloads with identical outputs;
heads are removed where the family's config can say so, and refused clearly where it cannot."""

import pytest
import torch

from graphprune.errors import PruningError
from graphprune.io.hf import load_pruned, save_pruned
from graphprune.pipeline.run import compress
from graphprune.testing.zoo import build_tiny, example_inputs

DENSE = ["llama", "qwen2", "mistral", "gemma3", "phi3", "gpt2", "bert"]
HEADS_IN_CONFIG = {"llama", "qwen2", "mistral", "gemma3", "phi3"}


def _output(model, ids):
    out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out[0]


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("family", DENSE)
def test_family_prunes_saves_and_reloads(family, allocation, tmp_path):
    model, config = build_tiny(family)
    result = compress(model, criterion="magnitude", sparsity=0.3, allocation=allocation, progress=False)
    assert abs(result.report["params"]["achieved_sparsity"] - 0.3) < 0.02
    kinds = set(result.report["kept_units"])
    assert ("kv-group" in kinds) == (family in HEADS_IN_CONFIG)
    if family not in HEADS_IN_CONFIG:
        assert "head_dim" in result.report["target_note"]
    out = save_pruned(result.model, tmp_path / "out", report=result.report)
    reloaded = load_pruned(out)
    ids = example_inputs(config)["input_ids"]
    with torch.no_grad():
        assert torch.equal(_output(reloaded, ids), _output(result.model, ids))


def test_explicit_head_pruning_on_a_family_that_cannot_express_it_is_refused():
    model, _ = build_tiny("bert")
    with pytest.raises(PruningError, match="--target channels"):
        compress(model, criterion="magnitude", sparsity=0.3, allocation="uniform", target="channels,heads",
                 progress=False)
