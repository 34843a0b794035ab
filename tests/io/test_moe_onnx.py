"""ONNX export of pruned MoE models (issue 5): expert-pruned tiny Mixtral, uniform (reloaded with
plain from_pretrained) and per-layer (reloaded with load_pruned), and per-layer expert channels;
onnxruntime parity with PyTorch ≤ 1e-4 on the exporter's check and on inputs of other shapes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from graphprune import compress, load_pruned, save_pruned
from graphprune.io.onnx_export import export_onnx
from graphprune.testing.fixtures import byte_level_tokenizer, write_sample_text
from graphprune.testing.zoo import build_tiny

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def ort_vs_torch(model, path, batch, seq):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones((batch, seq), dtype=np.int64)})[0]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
    return float(np.abs(got - ref).max())


def expert_tensor_shapes(path):
    return {i.name: tuple(i.dims) for i in onnx.load(str(path)).graph.initializer if "experts.down_proj" in i.name}


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return str(write_sample_text(tmp_path_factory.mktemp("calib") / "calib.txt"))


def pruned_and_saved(tmp_path, calib, **options):
    dense, _ = build_tiny("mixtral")
    with torch.no_grad():  # six experts of layer 0 output nothing: a global ranking takes more of layer 0
        dense.model.layers[0].mlp.experts.down_proj[:6] = 0
    result = compress(dense, tokenizer=byte_level_tokenizer(), calib=calib, nsamples=8, seqlen=32, progress=False,
                      **options)
    save_pruned(result.model, tmp_path / "pruned", report=result.report)
    return result


def test_expert_pruned_mixtral_reloaded_with_from_pretrained_exports_with_parity(tmp_path, calib):
    from transformers import AutoModelForCausalLM

    pruned_and_saved(tmp_path, calib, target="experts", criterion="reap", sparsity=0.5)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    result = export_onnx(model, tmp_path / "onnx")
    assert result.max_abs_diff <= 1e-4
    assert set(expert_tensor_shapes(result.path).values()) == {(4, 64, 24)}  # 4 of 8 experts in every layer
    assert ort_vs_torch(model, result.path, 2, 21) <= 1e-4


def test_per_layer_expert_counts_from_load_pruned_export_with_parity(tmp_path, calib):
    pruned_and_saved(tmp_path, calib, target="experts", criterion="easyep", sparsity=0.5, expert_allocation="global")
    model = load_pruned(tmp_path / "pruned").eval()
    kept = [layer.mlp.experts.down_proj.shape[0] for layer in model.model.layers]
    assert kept[0] < kept[1], kept
    implementations = [layer.mlp.experts.config._experts_implementation for layer in model.model.layers]
    result = export_onnx(model, tmp_path / "onnx")
    assert result.max_abs_diff <= 1e-4
    assert sorted(shape[0] for shape in expert_tensor_shapes(result.path).values()) == sorted(kept)
    # every layer's own config copy was switched for the export and switched back
    assert [layer.mlp.experts.config._experts_implementation for layer in model.model.layers] == implementations
    assert ort_vs_torch(model, result.path, 3, 10) <= 1e-4


def test_per_layer_channels_inside_experts_export_with_parity(tmp_path, calib):
    pruned_and_saved(tmp_path, calib, target="channels", criterion="magnitude", sparsity=0.4, allocation="global")
    model = load_pruned(tmp_path / "pruned").eval()
    widths = [layer.mlp.experts.down_proj.shape[2] for layer in model.model.layers]
    assert widths[0] != widths[1] and max(widths) < 24, widths
    result = export_onnx(model, tmp_path / "onnx")
    assert result.max_abs_diff <= 1e-4
    assert ort_vs_torch(model, result.path, 2, 15) <= 1e-4
