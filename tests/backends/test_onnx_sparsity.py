"""ONNX-native sparsity on files as `torch.onnx.export` writes them (issue 20, item 6).

The weights of such files are called ``onnx::MatMul_123`` (TorchScript) or ``val_42`` (dynamo), not
after the layers. `compress(..., sparsity=0.3)` must still remove 0.30 +- 0.02 of the parameters of
the repeated blocks, and the report must say what the written file holds. The layer parameters are
counted here on the written .onnx itself: the initializers that hold the PyTorch model's layer
parameters before pruning (checked against the ModuleList count), and what is left of them after.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from graphprune.graph.blocks import layer_parameters
from graphprune.graph.trace_onnx import analyze_onnx
from graphprune.models.structure import layer_parameter_count
from graphprune.pipeline.run import compress
from graphprune.testing.raw_onnx import export_raw
from graphprune.testing.zoo import build_tiny, expected_structure, tiny_cnn

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

SPARSITY, TOLERANCE = 0.3, 0.02


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(family, exporter) -> (path of the raw export, the PyTorch model's layer parameter count)."""
    cache = {}

    def get(family: str, exporter: str):
        key = (family, exporter)
        if key not in cache:
            path = tmp_path_factory.mktemp("raw") / f"{family}-{exporter}.onnx"
            if family == "cnn":
                model = tiny_cnn()
                export_raw(model, path, dynamo=exporter == "dynamo",
                           example=(torch.randn(*expected_structure("cnn")["input_shape"]),))
                expected = None  # BatchNorms are folded into the convs: counted from the file
            else:
                model, _ = build_tiny(family)
                export_raw(model, path, dynamo=exporter == "dynamo")
                expected = layer_parameter_count(model)
            cache[key] = (path, expected)
        return cache[key]

    return get


def initializer_sizes(path) -> dict[str, int]:
    return {i.name: int(np.prod(i.dims)) for i in onnx.load(str(path)).graph.initializer}


def check(path, expected_layers, out, **options):
    before = initializer_sizes(path)
    layers = layer_parameters(analyze_onnx(str(path)))
    total = sum(before[n] for n in layers)
    if expected_layers is not None:
        # the ModuleList's parameters; dynamo's file adds a few float scalar constants (eps, ...)
        assert total - expected_layers == sum(before[n] for n in layers if before[n] == 1)
        # most of them are not named after their layers (that is what this is about)
        assert sum(before[n] for n in layers if n.startswith(("onnx::", "val_"))) > total / 2
    result = compress(str(path), criterion="magnitude", sparsity=SPARSITY, out=str(out), progress=False, **options)
    after = initializer_sizes(out)
    kept = sum(after.get(n, 0) for n in layers)
    added = sum(n_ for name, n_ in after.items() if name not in before and "compensation" in name)
    achieved = 1 - (kept + added) / total
    assert abs(achieved - SPARSITY) <= TOLERANCE, f"removed {achieved:.4f} of the layer parameters"
    params = result.report["params"]
    assert params["layers_before"] == total and params["layers_after"] == kept + added
    assert params["achieved_sparsity"] == pytest.approx(achieved)
    return result


@pytest.mark.parametrize("family, exporter", [
    ("llama", "torchscript"), ("llama", "dynamo"),
    ("bert", "torchscript"), ("bert", "dynamo")])
def test_onnx_export_is_pruned_to_the_requested_sparsity(exported, family, exporter, tmp_path):
    path, expected = exported(family, exporter)
    check(path, expected, tmp_path / "pruned.onnx")


def test_dynamo_llama_channels(exported, tmp_path):
    path, expected = exported("llama", "dynamo")
    check(path, expected, tmp_path / "pruned.onnx", target="channels")


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_small_cnn_is_pruned_to_the_requested_sparsity(exported, exporter, tmp_path):
    path, _ = exported("cnn", exporter)
    check(path, None, tmp_path / "pruned.onnx")
