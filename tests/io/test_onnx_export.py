"""ONNX export: Optimum-style interface with dynamic axes, onnxruntime parity with PyTorch for dense,
pruned (uniform and per-layer) and MoE models, atomic output, and a failed parity check writes nothing."""

import json
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from graphprune import compress, load_pruned, save_pruned
from graphprune.errors import ValidationError
from graphprune.io.onnx_export import export_onnx
from graphprune.testing import build_tiny
from graphprune.testing.fixtures import save_tiny_llama, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def onnx_vs_torch(model, path, batch, seq, *, seed=0):
    """Max abs difference of the ONNX model and `model` on a fresh (batch, seq) input."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((batch, seq), dtype=np.int64)}
    if "token_type_ids" in [i.name for i in sess.get_inputs()]:
        feeds["token_type_ids"] = np.zeros((batch, seq), dtype=np.int64)
    got = sess.run(None, feeds)[0]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    ref = (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).numpy()
    return float(np.abs(got - ref).max())


@pytest.mark.parametrize("family, inputs, output", [
    ("llama", ["input_ids", "attention_mask"], "logits"),
    ("bert", ["input_ids", "attention_mask", "token_type_ids"], "last_hidden_state"),
])
def test_export_has_optimum_names_dynamic_axes_and_parity(tmp_path, family, inputs, output):
    model, _ = build_tiny(family)
    result = export_onnx(model, tmp_path / "out")
    assert result.path == tmp_path / "out" / "model.onnx"
    assert result.inputs == inputs and result.output == output
    assert result.max_abs_diff <= 1e-4
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == inputs
    assert all(i.shape[:2] == ["batch_size", "sequence_length"] for i in sess.get_inputs())
    assert [o.name for o in sess.get_outputs()] == [output]  # no KV-cache outputs
    assert onnx_vs_torch(model, result.path, 4, 23) <= 1e-4  # other sizes than traced or checked
    written = json.loads((tmp_path / "out" / "graphprune_onnx.json").read_text())
    assert written["max_abs_diff"] == result.max_abs_diff
    assert (tmp_path / "out" / "config.json").is_file()


def test_moe_model_exports_through_batched_mm_and_keeps_its_implementation(tmp_path):
    model, _ = build_tiny("mixtral")
    model.set_experts_implementation("eager")  # transformers' eager experts do not export as they are
    result = export_onnx(model, tmp_path / "out")
    assert any("batched_mm" in n for n in result.notes)
    assert model.config._experts_implementation == "eager"
    assert result.max_abs_diff <= 1e-4
    assert onnx_vs_torch(model, result.path, 2, 13) <= 1e-4


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_pruned_models_export_with_parity(tmp_path, allocation):
    pruned = compress(tiny_llama(), criterion="magnitude", sparsity=0.4, allocation=allocation,
                      progress=False).model
    save_pruned(pruned, tmp_path / "pruned", report={})
    reloaded = load_pruned(tmp_path / "pruned")
    if allocation == "global":  # per-layer sizes: the export traces the heterogeneous module as it is
        assert json.loads((tmp_path / "pruned" / "config.json").read_text()).get("graphprune_layer_overrides")
    result = export_onnx(reloaded, tmp_path / "onnx")
    assert result.max_abs_diff <= 1e-4
    assert onnx_vs_torch(reloaded, result.path, 3, 9) <= 1e-4
    dense_size = sum(p.numel() for p in tiny_llama().parameters())
    import onnx

    onnx_params = sum(int(np.prod(i.dims)) for i in onnx.load(str(result.path)).graph.initializer if len(i.dims) >= 1)
    assert onnx_params < dense_size


def test_parity_is_measured_against_float64_pytorch_with_fp32_rounding_for_scale(tmp_path):
    model = tiny_llama()
    result = export_onnx(model, tmp_path / "out")
    assert result.reference == "float64"
    assert 0 < result.torch_fp32_diff < 1e-4  # PyTorch's own fp32 rounding on this tiny model
    assert result.tolerance == pytest.approx(1e-4 * max(1.0, result.reference_scale))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # back in fp32 after the fp64 run


def test_model_without_float64_kernels_is_checked_against_float32_pytorch(tmp_path, monkeypatch):
    import graphprune.io.onnx_export as onnx_export

    def no_float64(model):
        raise RuntimeError("no float64 kernel")

    monkeypatch.setattr(onnx_export, "_float64", no_float64)
    result = export_onnx(tiny_llama(), tmp_path / "out")
    assert result.reference == "float32" and result.torch_fp32_diff is None
    assert result.max_abs_diff <= 1e-4


def test_failed_parity_writes_nothing(tmp_path, monkeypatch):
    import graphprune.io.onnx_export as onnx_export
    from onnx import numpy_helper

    def corrupt_one_weight(proto, model):  # an exporter bug: one initializer off by 1%
        init = next(i for i in proto.graph.initializer if len(i.dims) == 2)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
        return 0

    monkeypatch.setattr(onnx_export, "_name_folded_weights", corrupt_one_weight)
    with pytest.raises(ValidationError, match="parity check failed"):
        export_onnx(tiny_llama(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_dynamo_exporter_gives_the_same_interface(tmp_path):
    model, _ = build_tiny("llama")
    result = export_onnx(model, tmp_path / "out", exporter="dynamo")
    assert result.exporter == "dynamo" and result.max_abs_diff <= 1e-4
    assert onnx_vs_torch(model, result.path, 2, 17) <= 1e-4


def test_cli_export_and_compress_export_onnx(tmp_path, capsys):
    from graphprune.cli.main import main

    def run_cli(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    model_dir = save_tiny_llama(tmp_path / "tiny")
    result = run_cli("export", model_dir, "--format", "onnx", "--out", tmp_path / "dense")
    assert result.returncode == 0, result.stderr
    assert "parity: max abs logits diff" in result.stdout
    assert {"model.onnx", "config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "dense").iterdir()}
    result = run_cli("compress", model_dir, "--criterion", "magnitude", "--sparsity", "0.3", "--out",
                     tmp_path / "small", "--export", "onnx", "--quiet")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "small" / "model.onnx").is_file() and (tmp_path / "small" / "model.safetensors").is_file()
    assert "parity" in result.stdout
    # an existing non-empty output is refused before any work, as for compress
    result = run_cli("export", model_dir, "--out", tmp_path / "dense")
    assert result.returncode == 2 and "not empty" in result.stderr
    result = run_cli("export", tmp_path / "dense" / "model.onnx", "--out", tmp_path / "again")
    assert result.returncode == 2 and "already ONNX" in result.stderr
