"""ONNX frontend: models exported with torch.onnx (dynamo, optimize=False, which keeps parameter
names) must give the same dependency groups as the PyTorch frontend, and match the zoo's ground
truth; broken files and ops without a rule fail cleanly."""

import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from graphprune.errors import TraceError
from graphprune.graph import analyze
from graphprune.graph.report import render
from graphprune.graph.trace_onnx import analyze_onnx, graph_from_onnx
from graphprune.testing import build_tiny, example_inputs, expected_structure, tiny_cnn

FAMILIES = ["llama", "gpt2", "bert", "cnn"]
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.onnx's own deprecations


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (path of its ONNX export, groups of the PyTorch frontend); each built once."""
    cache = {}

    def get(family):
        if family not in cache:
            if family == "cnn":
                model = tiny_cnn()
                args, kwargs = (torch.randn(*expected_structure("cnn")["input_shape"]),), {}
            else:
                model, config = build_tiny(family)
                args, kwargs = (), example_inputs(config)
            path = tmp_path_factory.mktemp("onnx") / f"{family}.onnx"
            torch.onnx.export(model, args, str(path), kwargs=kwargs, dynamo=True, optimize=False, verbose=False)
            cache[family] = (path, analyze(model, args or kwargs))
        return cache[family]

    return get


def _signature(group):
    members = frozenset((s.param, s.axis, s.role, s.indices.tobytes()) for s in group.slices)
    return group.kind, group.status, group.units, group.unit_size, group.params_per_unit, members


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_groups_equal_the_pytorch_frontend_groups(exported, family):
    path, torch_groups = exported(family)
    groups = analyze_onnx(path)
    assert groups.graph.frontend == "onnx"
    assert not groups.blocked_ops and not [g for g in groups if g.status == "blocked"]
    ours = collections.Counter(_signature(g) for g in groups)
    theirs = collections.Counter(_signature(g) for g in torch_groups)
    missing = [s[:5] + (sorted(m[:2] for m in s[5]),) for s in theirs - ours]
    extra = [s[:5] + (sorted(m[:2] for m in s[5]),) for s in ours - theirs]
    assert not missing and not extra, f"only in torch: {missing}\nonly in onnx: {extra}"
    # Parents/children of GQA groups line up too.
    assert sorted((g.kind, g.units, len(g.children)) for g in groups) == \
        sorted((g.kind, g.units, len(g.children)) for g in torch_groups)


def _find(groups, expected):
    """The group whose members are exactly `expected`'s, unit by unit (zoo ParamSlice semantics)."""
    want = {(m.param, m.dim) for m in expected["members"]}
    for g in groups:
        if g.units != expected["size"] or {(s.param, s.axis) for s in g.slices} != want:
            continue
        by_member = {(s.param, s.axis): s.indices for s in g.slices}
        if all(by_member[(m.param, m.dim)][u].tolist() == list(m.unit_indices(u))
               for m in expected["members"] for u in range(expected["size"])):
            return g
    raise AssertionError(f"no group with members {sorted(want)} and {expected['size']} units")


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_onnx_groups_match_the_zoo_ground_truth(exported, family):
    path, _ = exported(family)
    groups = analyze_onnx(path)
    structure = expected_structure(family)
    for layer in structure["layers"]:
        ffn = _find(groups, layer["mlp"]["ffn"])
        assert ffn.kind == "channel" and ffn.status == "prunable"
        assert {s.role for s in ffn.slices} <= {"linear.in", "linear.out", "linear.bias"}
    hidden = [g for g in groups if g.kind == "hidden"]
    assert len(hidden) == 1 and hidden[0].units == structure["hidden_size"]
    assert hidden[0].status == ("fixed" if structure["hidden"].get("is_model_output") else "opt-in")


def test_llama_kv_groups_nest_query_heads_and_rope_pins_the_qk_head_dim(exported):
    path, _ = exported("llama")
    groups = analyze_onnx(path)
    structure = expected_structure("llama")
    for n, layer in enumerate(structure["layers"]):
        att = layer["attention"]
        a = f"model.layers.{n}.self_attn"
        kv = next(g for g in groups if g.kind == "kv-group" and g.scope == a)
        assert kv.units == att["num_kv_heads"] and len(kv.children) == 1
        head = groups.by_id(kv.children[0])
        assert head.kind == "head" and head.units == att["queries_per_kv"] and head.parent == kv.id
        slices = {s.param: s for s in kv.slices}
        assert set(slices) == {f"{a}.{p}_proj.weight" for p in "qkvo"}
        per_kv = att["queries_per_kv"] * att["head_dim"]
        for g in range(kv.units):  # kv-group g = kv head g and query heads g*q .. g*q+q-1
            assert slices[f"{a}.k_proj.weight"].indices[g].tolist() == list(range(g * 16, g * 16 + 16))
            assert slices[f"{a}.q_proj.weight"].indices[g].tolist() == list(range(g * per_kv, (g + 1) * per_kv))
    rope = [g for g in groups if g.kind == "head_dim" and g.status == "fixed"]
    assert len(rope) == 1 and "rotary_emb.inv_freq" in rope[0].reason  # one table read by both layers
    assert {s.param for s in rope[0].slices} == {f"model.layers.{n}.self_attn.{p}_proj.weight"
                                                 for n in range(2) for p in "qk"}


def test_cnn_residual_and_concat_channels_match_the_ground_truth(exported):
    path, _ = exported("cnn")
    groups = analyze_onnx(path)
    for name, expected in expected_structure("cnn")["groups"].items():
        group = _find(groups, expected)
        assert group.status == "prunable", name
        assert any(s.role == "conv.out" for s in group.slices)


def test_shape_subgraphs_are_folded_and_reshape_targets_recorded(exported):
    path, _ = exported("llama")
    graph = graph_from_onnx(path)
    assert not [op for op in graph.ops.values() if op.op == "unknown"]
    assert not [op for op in graph.ops.values() if op.source_op in ("Shape", "Constant", "Concat", "Gather")
                and op.op not in ("cat", "embedding")]
    reshapes = [op for op in graph.ops.values() if op.source_op == "Reshape"]
    assert reshapes and all(op.op == "reshape" and op.attrs["shape_input"] for op in reshapes)
    # Attention reshapes whose target is Shape -> Slice -> Concat of a tensor, and literal ones.
    assert {op.attrs["shape_literal"] for op in reshapes} == {True, False}
    assert all(graph.tensors[t].kind == "param" for t in graph.tensors if t.startswith("model.layers."))
    # The MatMul(x, Transpose(W)) of nn.Linear is read back as linear with the [out, in] weight.
    linear = [op for op in graph.ops.values() if op.op == "linear"]
    assert len(linear) == 15 and all(graph.tensors[op.inputs[1]].kind == "param" for op in linear)


def test_dynamic_dims_get_example_sizes(tmp_path):
    model = _mlp_model("Relu", batch_dim="batch", seq_dim="sequence")
    graph = graph_from_onnx(model)
    assert graph.tensors["x"].shape == (1, 8, 8)
    graph = graph_from_onnx(model, input_shapes={"x": [2, 5, 8]})
    assert graph.tensors["x"].shape == (2, 5, 8) and graph.tensors["y"].shape == (2, 5, 8)
    with pytest.raises(TraceError, match="contradicts"):
        graph_from_onnx(model, input_shapes={"x": [2, 5, 9]})


# ----------------------------------------------------------------------------- failures
def test_a_truncated_onnx_file_raises_a_clean_error(exported, tmp_path):
    path, _ = exported("cnn")
    data = path.read_bytes()
    broken = tmp_path / "truncated.onnx"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="truncated"):
        analyze_onnx(broken)
    model = onnx.load(str(path), load_external_data=False)
    del model.graph.node[len(model.graph.node) // 2:]  # parses, but the graph is cut short
    with pytest.raises(TraceError, match="produced by no node"):
        analyze_onnx(model)
    with pytest.raises(TraceError, match="not found"):
        analyze_onnx(tmp_path / "missing.onnx")


def _mlp_model(middle_op: str, *, domain: str = "", batch_dim="batch", seq_dim=None):
    """x -> up (8->32) -> relu -> <middle_op> -> down -> +x -> up2 (8->16) -> relu -> down2 -> +."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [init("up.weight", 32, 8), init("up.bias", 32), init("down.weight", 8, 32), init("down.bias", 8),
             init("up2.weight", 16, 8), init("up2.bias", 16), init("down2.weight", 8, 16), init("down2.bias", 8)]
    nodes = []

    def linear(x, name, out):  # MatMul(x, Transpose(W)) + b, as the dynamo exporter writes nn.Linear
        nodes.extend([helper.make_node("Transpose", [f"{name}.weight"], [f"{name}.wt"], perm=[1, 0]),
                      helper.make_node("MatMul", [x, f"{name}.wt"], [f"{name}.mm"], name=f"{name}.matmul"),
                      helper.make_node("Add", [f"{name}.mm", f"{name}.bias"], [out], name=f"{name}.add")])

    linear("x", "up", "h")
    nodes.append(helper.make_node("Relu", ["h"], ["r"], name="relu"))
    nodes.append(helper.make_node(middle_op, ["r"], ["m"], name="mystery", domain=domain))
    linear("m", "down", "d")
    nodes.append(helper.make_node("Add", ["x", "d"], ["x1"], name="res1"))
    linear("x1", "up2", "h2")
    nodes.append(helper.make_node("Relu", ["h2"], ["r2"], name="relu2"))
    linear("r2", "down2", "d2")
    nodes.append(helper.make_node("Add", ["x1", "d2"], ["y"], name="res2"))
    lead = [batch_dim] + ([seq_dim] if seq_dim else [])
    graph = helper.make_graph(
        nodes, "mystery_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, lead + [8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, lead + [8])], inits,
        # exporters declare the shapes of custom ops' outputs (no schema to infer them from)
        value_info=[helper.make_tensor_value_info("m", TensorProto.FLOAT, lead + [32])])
    opsets = [helper.make_opsetid("", 20)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


def test_an_op_without_a_rule_blocks_its_groups_and_is_named():
    groups = analyze_onnx(_mlp_model("Mystery", domain="graphprune.test"), input_shapes={"x": [3, 8]})
    blocked = [g for g in groups if g.status == "blocked"]
    assert blocked and all("graphprune.test::Mystery" in g.reason for g in blocked)
    members = {(s.param, s.axis) for g in blocked for s in g.slices}
    assert {("up.weight", 0), ("up.bias", 0), ("down.weight", 1)} <= members
    ok = next(g for g in groups if ("up2.weight", 0) in {(s.param, s.axis) for s in g.slices})
    assert ok.prunable and ok.units == 16
    assert {(s.param, s.axis, s.role) for s in ok.slices} == {
        ("up2.weight", 0, "linear.out"), ("up2.bias", 0, "linear.bias"), ("down2.weight", 1, "linear.in")}
    text = render(groups)
    assert "BLOCKED" in text and "op graphprune.test::Mystery at mystery" in text
    assert [b.source_op for b in groups.blocked_ops] == ["graphprune.test::Mystery"]


def test_a_standard_op_without_a_translation_is_unknown_not_elementwise():
    groups = analyze_onnx(_mlp_model("LpNormalization"))  # normalises along an axis: not elementwise
    assert [b.source_op for b in groups.blocked_ops] == ["LpNormalization"]
    blocked = next(g for g in groups if ("up.weight", 0) in {(s.param, s.axis) for s in g.slices})
    assert blocked.status == "blocked"
