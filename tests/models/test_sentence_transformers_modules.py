"""A sentence-transformers folder keeps every module modules.json lists (Pooling, Dense, Normalize; a
Transformer kept in a subfolder moves to the root) and loads again with SentenceTransformer; the
pooling config is read in both styles (the `pooling_mode_*_tokens` flags and the `pooling_mode` key)."""

import json
import shutil

import pytest
import torch

import graphprune
from graphprune.errors import UserError
from graphprune.models.encoders import Pooling, pooling_of
from graphprune.testing.encoders import save_tiny_sentence_transformer, write_pair_file

sentence_transformers = pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def st_dense(tmp_path_factory):
    """A tiny encoder + mean Pooling + Dense(64 -> 16, tanh) + Normalize, saved by sentence-transformers itself."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense, Normalize

    root = tmp_path_factory.mktemp("st")
    base = SentenceTransformer(str(save_tiny_sentence_transformer(root / "base")), device="cpu")
    torch.manual_seed(0)
    dense = Dense(base.get_sentence_embedding_dimension(), 16, activation_function=torch.nn.Tanh())
    SentenceTransformer(modules=[base[0], base[1], dense, Normalize()], device="cpu").save(str(root / "dense"))
    return root / "dense"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pair_file(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 40)


def compress(source, out, pairs):
    return graphprune.compress(str(source), criterion="flap", sparsity=0.3, calib=str(pairs), nsamples=8, seqlen=16,
                               out=out, progress=False)


def test_a_dense_module_round_trips(st_dense, pairs, tmp_path):
    from sentence_transformers import SentenceTransformer

    assert pooling_of(st_dense) == Pooling("mean", normalize=True)  # written with the pooling_mode key
    out = tmp_path / "pruned"
    compress(st_dense, out, pairs)
    for name in ("modules.json", "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors",
                 "3_Normalize/config.json"):
        assert (out / name).read_bytes() == (st_dense / name).read_bytes(), name
    model = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Dense", "Normalize"]
    embeddings = model.encode(["the river flows south", "an old market town"], convert_to_tensor=True)
    assert embeddings.shape == (2, 16) and torch.isfinite(embeddings).all()
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)
    pruned = graphprune.load_model(str(out)).model
    assert model[0].auto_model.config.intermediate_size == pruned.config.intermediate_size < 128
    assert torch.equal(model[0].auto_model.encoder.layer[0].intermediate.dense.weight,
                       pruned.encoder.layer[0].intermediate.dense.weight)


def test_a_transformer_in_a_subfolder_moves_to_the_root(st_dense, pairs, tmp_path):
    from sentence_transformers import SentenceTransformer

    source = tmp_path / "nested"
    shutil.copytree(st_dense, source)
    (source / "0_Transformer").mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "sentence_bert_config.json"):
        shutil.move(source / name, source / "0_Transformer" / name)
    modules = json.loads((source / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (source / "modules.json").write_text(json.dumps(modules))
    out = tmp_path / "pruned"
    compress(source, out, pairs)
    written = json.loads((out / "modules.json").read_text())
    assert written[0]["path"] == "" and [m["path"] for m in written[1:]] == ["1_Pooling", "2_Dense", "3_Normalize"]
    assert (out / "sentence_bert_config.json").is_file() and not (out / "0_Transformer").exists()
    assert SentenceTransformer(str(out), device="cpu").encode(["a test"]).shape == (1, 16)


@pytest.mark.parametrize("config,expected", [
    ({"embedding_dimension": 8, "pooling_mode": "cls"}, "cls"),
    ({"embedding_dimension": 8, "pooling_mode": ["max"]}, "max"),
    ({"embedding_dimension": 8, "pooling_mode": "mean_sqrt_len_tokens"}, "mean_sqrt_len"),
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
])
def test_both_pooling_config_styles(tmp_path, config, expected):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    assert pooling_of(tmp_path) == Pooling(expected)


@pytest.mark.parametrize("config", [{"pooling_mode": "lasttoken"}, {"pooling_mode": ["mean", "max"]},
                                    {"pooling_mode_mean_tokens": True, "pooling_mode_lasttoken": True}])
def test_unsupported_pooling_is_named(tmp_path, config):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "1_Pooling", "type": "x.Pooling"}]))
    with pytest.raises(UserError, match="supported pooling is exactly one of"):
        pooling_of(tmp_path)
