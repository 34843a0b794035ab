"""What a model directory may make graphprune read or lose (issue 24): tensors the config has no place
for (defect 5), paths read from the model's own files that lead outside it (defect 10), and integer or
boolean tensors cast to floating point (defect 14)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from graphprune.backends.stream.checkpoint import Checkpoint
from graphprune.errors import ModelLoadError, UserError
from graphprune.graph import analyze
from graphprune.graph.groups import FIXED, PRUNABLE
from graphprune.models import load_model
from graphprune.models.encoders import pooling_of
from graphprune.testing.encoders import save_tiny_sentence_transformer
from graphprune.testing.fixtures import save_tiny_llama, tiny_llama


def _tree_digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.rglob("*")):
        h.update(str(f.relative_to(directory)).encode())
        if f.is_file() and not f.is_symlink():
            h.update(f.read_bytes())
    return h.hexdigest()


def _edit_weights(directory: Path, change) -> None:
    weights = load_file(directory / "model.safetensors")
    change(weights)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


# --- tensors the config does not describe (defect 5) ------------------------------------------------------


def test_a_config_with_fewer_layers_than_the_weights_is_refused(tmp_path):
    directory = save_tiny_llama(tmp_path / "m")
    _edit_config(directory, num_hidden_layers=1)
    with pytest.raises(ModelLoadError) as refused:
        load_model(directory)
    assert str(refused.value).endswith(
        "does not match its weights: 9 tensor(s) in the weights are not part of the model it describes "
        "(model.layers.1.input_layernorm.weight, model.layers.1.mlp.down_proj.weight, "
        "model.layers.1.mlp.gate_proj.weight, ...); they would be dropped, so the model is refused")


def test_an_extra_tensor_is_refused(tmp_path):
    directory = save_tiny_llama(tmp_path / "m")
    _edit_weights(directory, lambda w: w.update({"model.extra_scale": torch.ones(4)}))
    with pytest.raises(ModelLoadError, match=r"1 tensor\(s\) in the weights are not part of the model it describes "
                                             r"\(model\.extra_scale\)"):
        load_model(directory)


def test_what_transformers_declares_ignorable_still_loads(tmp_path):
    """A tied lm_head.weight saved anyway, and rotary inv_freq buffers of older checkpoints."""
    directory = save_tiny_llama(tmp_path / "m", tied=True)

    def add(weights):
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
        weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    _edit_weights(directory, add)
    loaded = load_model(directory)
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()


# --- paths read from the model's files (defect 10) -----------------------------------------------------------


def _sharded(directory: Path) -> Path:
    tiny_llama().save_pretrained(directory, max_shard_size="50KB")
    return directory


def _point_index_at(directory: Path, location: str) -> None:
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (location if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("location,needle", [
    ("../../../../../../../../../../../../etc/passwd", "which is outside the model directory"),
    ("../secret.safetensors", "which is outside the model directory"),
    ("/etc/passwd", "which is not a path relative to the model directory"),
    ("link.safetensors", "which is outside the model directory"),
], ids=["etc-passwd", "dotdot", "absolute", "symlink"])
def test_a_shard_index_cannot_name_a_file_outside_the_model(tmp_path, location, needle):
    """The index once got /etc/passwd opened (its first 8 bytes came back in the error)."""
    directory = _sharded(tmp_path / "m")
    outside = _sharded(tmp_path / "other")  # a valid safetensors file outside the directory
    (tmp_path / "secret.safetensors").write_bytes(sorted(outside.glob("model-*.safetensors"))[0].read_bytes())
    (directory / "link.safetensors").symlink_to(tmp_path / "secret.safetensors")
    _point_index_at(directory, location)
    before = _tree_digest(directory)
    for read in (load_model, Checkpoint):  # the in-memory loader and the streaming backend
        with pytest.raises(ModelLoadError) as refused:
            read(directory)
        message = str(refused.value)
        assert f"model.safetensors.index.json names '{location}', {needle}" in message
        assert message.endswith("refusing to read it") and "root:" not in message and "\n" not in message
    assert _tree_digest(directory) == before


def test_a_sentence_transformers_module_cannot_point_outside_the_folder(tmp_path):
    """modules.json once made graphprune load (and prune) another model than the one given."""
    root = save_tiny_sentence_transformer(tmp_path / "st")
    save_tiny_llama(tmp_path / "victim")
    modules = json.loads((root / "modules.json").read_text())
    modules[0]["path"] = "../victim"
    (root / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match=r"modules\.json names '\.\./victim', which is outside the model "):
        load_model(root)


def test_a_pooling_module_cannot_point_outside_the_folder(tmp_path):
    root = save_tiny_sentence_transformer(tmp_path / "st")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert pooling_of(root).mode == "mean"
    modules = json.loads((root / "modules.json").read_text())
    modules[1]["path"] = "../elsewhere"
    (root / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UserError, match=r"modules\.json names '\.\./elsewhere', which is outside the model directory"):
        pooling_of(root)


def test_a_module_at_the_folder_root_still_loads(tmp_path):
    root = save_tiny_sentence_transformer(tmp_path / "st")  # Transformer path "" like all-MiniLM-L6-v2
    assert load_model(root).hf_dir == root


# --- integer and boolean tensors (defect 14) -----------------------------------------------------------


@pytest.mark.parametrize("dtype,stored", [(torch.int8, "I8"), (torch.bool, "BOOL"), (torch.int32, "I32")])
def test_integer_weights_are_not_cast_to_float(tmp_path, dtype, stored):
    """transformers casts a checkpoint's int8 codes (a quantized model) to float without a word; they
    were then scored and pruned as weights."""
    directory = save_tiny_llama(tmp_path / "m")
    name = "model.layers.0.mlp.down_proj.weight"
    _edit_weights(directory, lambda w: w.update({name: (w[name] * 100).to(dtype)}))
    with pytest.raises(ModelLoadError, match=rf"store {name} as {stored}, but LlamaForCausalLM holds it as float32: "
                                             rf"integer or boolean tensors \(a quantized checkpoint\?\) would be cast"):
        load_model(directory)


class _MaskedMLP(torch.nn.Module):
    """An FFN whose channels are multiplied by an integer buffer: its values are a mask, not weights."""

    def __init__(self, mlp, *, parameter: bool) -> None:
        super().__init__()
        self.inner = mlp
        mask = torch.ones(mlp.down_proj.in_features, dtype=torch.int64)
        if parameter:
            self.mask = torch.nn.Parameter(mask, requires_grad=False)
        else:
            self.register_buffer("mask", mask)

    def forward(self, x):
        mlp = self.inner
        return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) * self.mask)


@pytest.mark.parametrize("parameter", [False, True], ids=["buffer", "parameter"])
def test_an_integer_tensor_in_a_group_keeps_that_group_as_it_is(parameter):
    model = tiny_llama()
    model.model.layers[0].mlp = _MaskedMLP(model.model.layers[0].mlp, parameter=parameter)
    groups = analyze(model)
    name = "model.layers.0.mlp.mask"
    holding = [g for g in groups.groups if any(s.param == name for s in g.slices)]
    assert len(holding) == 1
    group = holding[0]
    assert group.status == FIXED and group.kind == "channel"
    assert group.reason == (f"{name} is a int64 tensor (indices or a mask, not weights): never scored or sliced "
                            f"as a weight")
    # the same channels of the other layer are still prunable, and the tensor keeps its dtype
    assert any(g.status == PRUNABLE and g.kind == "channel" and g.layer == 1 for g in groups.groups)
    assert dict(model.named_buffers(), **dict(model.named_parameters()))[name].dtype == torch.int64
