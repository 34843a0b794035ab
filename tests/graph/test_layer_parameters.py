"""Layer parameters from the graph (issue 20, item 6): the parameters of the repeated blocks are found
from the dataflow (residual adds, the stream between them), not from names. On every zoo family they
are exactly the parameters under the model's ModuleList of layers (`models.structure`), and on ONNX
files whose weights are called ``onnx::MatMul_123`` they are the same parameters."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from graphprune.graph import analyze
from graphprune.graph.blocks import count_layer_parameters, layer_parameters, module_sizes, residual_adds
from graphprune.graph.trace_onnx import analyze_onnx
from graphprune.models.structure import find_blocks, layer_parameter_count
from graphprune.testing.raw_onnx import export_raw
from graphprune.testing.zoo import TINY_FAMILIES, build_tiny, example_inputs, expected_structure, tiny_cnn

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def module_layer_names(model) -> set[str]:
    found = find_blocks(model)
    if found is None:
        return {name for name, _ in model.named_parameters()}
    prefix, blocks = found
    return {f"{prefix}.{name}" for name, _ in blocks.named_parameters()}


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_layer_parameters_are_the_modulelist_parameters(family):
    model, config = build_tiny(family)
    groups = analyze(model, example_inputs(config))
    names = layer_parameters(groups)
    assert names == module_layer_names(model)
    known = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert count_layer_parameters(module_sizes(model), names, known) == layer_parameter_count(model)
    assert len(residual_adds(groups.graph)) == 2 * config.num_hidden_layers


def test_a_cnn_with_one_skip_connection_counts_every_parameter():
    model = tiny_cnn()
    groups = analyze(model, (torch.randn(*expected_structure("cnn")["input_shape"]),))
    assert len(residual_adds(groups.graph)) == 1
    assert layer_parameters(groups) == {name for name, _ in model.named_parameters()}


def test_post_layernorm_blocks_end_with_their_norm():
    model, config = build_tiny("bert")
    names = layer_parameters(analyze(model, example_inputs(config)))
    last = config.num_hidden_layers - 1
    assert f"encoder.layer.{last}.output.LayerNorm.weight" in names
    assert not any(n.startswith(("embeddings.", "pooler.")) for n in names)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_layer_parameters_of_an_onnx_file_whatever_its_weights_are_called(family, tmp_path):
    model, _ = build_tiny(family)
    path = export_raw(model, tmp_path / f"{family}.onnx", dynamo=False)
    proto = onnx.load(str(path))
    names = layer_parameters(analyze_onnx(proto))
    assert any(n.startswith("onnx::MatMul_") for n in names)  # not named after the layers
    sizes = {i.name: int(np.prod(i.dims)) for i in proto.graph.initializer}
    assert sum(sizes[n] for n in names) == layer_parameter_count(model)
