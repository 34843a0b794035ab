"""ONNX-native pruning: an exported model pruned directly in ONNX equals the export of the same model
pruned in PyTorch with the same kept units; shape constants follow the pruned sizes (per consumer);
calibration criteria computed with onnxruntime agree with the PyTorch pipeline; what cannot be
rewritten is refused by name."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from graphprune import compress
from graphprune.errors import PruningError
from graphprune.io.onnx_export import export_onnx
from graphprune.graph import analyze
from graphprune.passes import PassManager, RewriteState
from graphprune.passes.rewrite import rewrite_model as rewrite
from graphprune.passes.slice import SliceParameters
from graphprune.pipeline.run import compress
from graphprune.pipeline.targets import select_groups


def compress_onnx(model, **options):
    """ONNX-native pruning through the one driver (`compress` picks the ONNX backend for a .onnx file)."""
    return compress(model, **{"criterion": "magnitude", "progress": False, **options})
from graphprune.testing import build_tiny, expected_structure, tiny_cnn
from graphprune.testing.fixtures import byte_level_tokenizer, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def run(model, feeds):
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def token_feeds(path, batch=2, seq=12):
    ids = np.random.default_rng(1).integers(3, 200, (batch, seq)).astype(np.int64)
    names = [i.name for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()]
    by_name = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {n: by_name[n] for n in names}


def same_units(onnx_groups, torch_groups, removed):
    """The ONNX plan carried over to the PyTorch groups (both frontends list groups in model order)."""
    assert [(g.kind, g.units) for g in onnx_groups] == [(g.kind, g.units) for g in torch_groups]
    return {t.id: removed.get(o.id, np.zeros(0, dtype=np.int64)) for o, t in zip(onnx_groups, torch_groups)}


def export_cnn(model, path, x):
    torch.onnx.export(model, (x,), str(path), input_names=["pixel_values"], output_names=["logits"],
                      dynamic_axes={"pixel_values": {0: "batch_size"}, "logits": {0: "batch_size"}},
                      dynamo=False, opset_version=17)


def slice_in_place(model, groups, chosen, removed):
    """PyTorch pruning of a plain module (no config to rewrite): its tensors replaced by the slices."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    sliced = PassManager([SliceParameters()])(RewriteState(state, chosen, removed)).state.tensors
    for name, tensor in sliced.items():
        owner, attr = name.rsplit(".", 1)
        module = model.get_submodule(owner)
        if attr in module._parameters:
            module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[attr] = tensor
    return model


@pytest.mark.parametrize("family, target, allocation", [
    ("llama", "channels,heads", "global"),  # per-layer sizes, KV groups and FFN channels
    ("bert", "channels", "uniform"),  # MiniLM-like encoder
])
def test_native_pruning_equals_pytorch_pruning_then_export(tmp_path, family, target, allocation):
    model, _ = build_tiny(family)
    export_onnx(model, tmp_path / "dense")
    result = compress_onnx(tmp_path / "dense" / "model.onnx", criterion="magnitude", sparsity=0.3,
                           allocation=allocation, target=target)
    assert abs(result.report["params"]["achieved_sparsity"] - 0.3) < 0.05
    torch_groups = analyze(model)
    torch_chosen = select_groups(torch_groups, target)
    removed = same_units(select_groups(result.groups, target), torch_chosen, result.removed)
    assert sum(len(r) for r in removed.values()) > 0
    pruned, _ = rewrite(model, torch_groups, torch_chosen, removed)
    export_onnx(pruned, tmp_path / "reference")
    feeds = token_feeds(tmp_path / "reference" / "model.onnx")
    ours, reference = run(result.model, feeds), run(tmp_path / "reference" / "model.onnx", feeds)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= 1e-4
    size = lambda m: sum(int(np.prod(i.dims)) for i in m.graph.initializer)  # noqa: E731
    assert size(result.model) == size(onnx.load(str(tmp_path / "reference" / "model.onnx")))


def test_native_cnn_pruning_equals_pytorch_pruning_then_export(tmp_path):
    x = torch.randn(*expected_structure("cnn")["input_shape"])
    export_cnn(tiny_cnn(), tmp_path / "dense.onnx", x)  # (the exporter folds each BatchNorm into its conv)
    result = compress_onnx(tmp_path / "dense.onnx", criterion="magnitude", sparsity=0.3, allocation="uniform",
                           target="channels")
    model = tiny_cnn()
    torch_groups = analyze(model, (x,))
    torch_chosen = select_groups(torch_groups, "channels")
    removed = same_units(select_groups(result.groups, "channels"), torch_chosen, result.removed)
    export_cnn(slice_in_place(model, torch_groups, torch_chosen, removed), tmp_path / "reference.onnx", x)
    feeds = {"pixel_values": np.random.default_rng(0).standard_normal((3, *x.shape[1:])).astype(np.float32)}
    assert np.abs(run(result.model, feeds) - run(tmp_path / "reference.onnx", feeds)).max() <= 1e-4


def _headed_mlp(heads_target=None):
    """Two layers x -> W_in [8, 64] -> Reshape [0, 0, 4, 16] -> Relu -> Reshape [0, 0, 64] -> W_out
    [64, 8] -> + x. Both layers read the same two literal shape constants (as exporters share them)."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    for name, shape in [("l0.w_in", (8, 64)), ("l0.w_out", (64, 8)), ("l1.w_in", (8, 64)), ("l1.w_out", (64, 8))]:
        inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    inits.append(numpy_helper.from_array(np.array([0, 0, 64], dtype=np.int64), "flat_shape"))
    if heads_target is None:
        inits.append(numpy_helper.from_array(np.array([0, 0, 4, 16], dtype=np.int64), "head_shape"))
    else:  # the head count computed by a Mul of literals
        nodes += [helper.make_node("Constant", [], ["lead"], value=numpy_helper.from_array(np.array([0, 0])), name="lead"),
                  helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array([2])), name="two"),
                  helper.make_node("Mul", ["two", "two"], ["heads"], name="heads_mul"),
                  helper.make_node("Constant", [], ["dim"], value=numpy_helper.from_array(np.array([16])), name="dim"),
                  helper.make_node("Concat", ["lead", "heads", "dim"], ["head_shape"], axis=0, name="head_concat")]
    x = "x"
    for k in range(2):
        p = f"l{k}"
        nodes += [helper.make_node("MatMul", [x, f"{p}.w_in"], [f"{p}.h"], name=f"{p}.in"),
                  helper.make_node("Reshape", [f"{p}.h", "head_shape"], [f"{p}.heads"], name=f"{p}.split_heads"),
                  helper.make_node("Relu", [f"{p}.heads"], [f"{p}.act"], name=f"{p}.relu"),
                  helper.make_node("Reshape", [f"{p}.act", "flat_shape"], [f"{p}.flat"], name=f"{p}.merge_heads"),
                  helper.make_node("MatMul", [f"{p}.flat", f"{p}.w_out"], [f"{p}.out"], name=f"{p}.out"),
                  helper.make_node("Add", [x, f"{p}.out"], [f"{p}.y"], name=f"{p}.residual")]
        x = f"{p}.y"
    graph = helper.make_graph(nodes, "headed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", "s", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_literal_head_counts_in_shared_reshape_constants_are_rewritten_per_layer():
    model = _headed_mlp()
    probe = compress_onnx(model, criterion="magnitude", sparsity=0.2, allocation="uniform", target="heads")
    heads = [g for g in select_groups(probe.groups, "heads")]
    assert [(g.kind, g.units) for g in heads] == [("head", 4), ("head", 4)]
    removed = {heads[0].id: np.array([1]), heads[1].id: np.array([0, 3])}  # layers keep 3 and 2 heads
    result = compress_onnx(model, criterion="magnitude", sparsity=0.2, target="heads", removed=removed)
    assert len(result.report["shape_constants_rewritten"]) == 4  # 2 constants x 2 layers, each its own copy
    x = np.random.default_rng(2).standard_normal((2, 5, 8)).astype(np.float32)
    w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    y = x
    for k, keep_heads in enumerate([[0, 2, 3], [1, 2]]):
        cols = np.concatenate([np.arange(h * 16, h * 16 + 16) for h in keep_heads])
        y = y + np.maximum(y @ w[f"l{k}.w_in"][:, cols], 0) @ w[f"l{k}.w_out"][cols]
    assert np.abs(run(result.model, {"x": x}) - y).max() <= 1e-4
    assert numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "head_shape")).tolist() == \
        [0, 0, 4, 16]  # the input model is untouched


def test_a_shape_computed_from_literals_is_refused_by_name():
    model = _headed_mlp(heads_target="mul")
    groups = select_groups(compress_onnx(model, sparsity=0.2, allocation="uniform", target="heads").groups, "heads")
    with pytest.raises(PruningError, match="Mul node 'heads_mul'"):
        compress_onnx(model, sparsity=0.2, target="heads", removed={groups[0].id: np.array([1])})


@pytest.fixture(scope="module")
def llama_with_tokenizer(tmp_path_factory):
    model = tiny_llama(layers=2, heads=4, kv=2, head_dim=16, hidden=64, intermediate=96)
    tokenizer = byte_level_tokenizer()
    directory = tmp_path_factory.mktemp("onnx") / "llama"
    export_onnx(model, directory, tokenizer=tokenizer)
    return model, tokenizer, directory


def test_wanda_sp_on_onnx_ranks_like_the_pytorch_pipeline(llama_with_tokenizer):
    model, tokenizer, directory = llama_with_tokenizer
    options = dict(criterion="wanda-sp", sparsity=0.3, allocation="uniform", target="channels,heads", nsamples=8,
                   seqlen=32)
    ours = compress_onnx(directory / "model.onnx", tokenizer=tokenizer, **options)
    assert ours.report["calibration"]["runtime"] == "onnxruntime"
    theirs = compress(model, tokenizer=tokenizer, progress=False, use_cache=False, **options)
    torch_chosen = select_groups(theirs.groups, "channels,heads")
    carried = same_units(select_groups(ours.groups, "channels,heads"), torch_chosen, ours.removed)
    assert {g: sorted(r.tolist()) for g, r in carried.items()} == \
        {g.id: sorted(theirs.removed.get(g.id, np.zeros(0)).tolist()) for g in torch_chosen}


def test_flap_with_bias_compensation_on_onnx_equals_the_pytorch_result(llama_with_tokenizer, tmp_path):
    model, tokenizer, directory = llama_with_tokenizer
    options = dict(criterion="flap", sparsity=0.3, allocation="uniform", target="channels", nsamples=8, seqlen=32,
                   compensate="bias")
    ours = compress_onnx(directory / "model.onnx", tokenizer=tokenizer, **options)
    assert ours.report["compensate"] == "bias" and ours.report["compensated_layers"] == 2  # both down_proj
    theirs = compress(model, tokenizer=tokenizer, progress=False, use_cache=False, **options)
    export_onnx(theirs.model, tmp_path / "reference")
    feeds = token_feeds(tmp_path / "reference" / "model.onnx")
    assert np.abs(run(ours.model, feeds) - run(tmp_path / "reference" / "model.onnx", feeds)).max() <= 1e-4
