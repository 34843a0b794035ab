"""An ONNX node graphprune cannot trace through (a custom-domain op, control flow) whose output has no
static shape is named in the error: op type, domain and node name, in one line; not blamed on the
shape of some later tensor (issue 24, defect 15)."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.errors import TraceError
from graphprune.graph.trace_onnx import analyze_onnx


def _model(nodes, *, opsets=(), inits=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *opsets])


def _error(model) -> str:
    with pytest.raises(TraceError) as info:
        analyze_onnx(model)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_custom_domain_op_is_named():
    model = _model([helper.make_node("Foo", ["x"], ["h"], name="my_foo", domain="com.example"),
                    helper.make_node("Relu", ["h"], ["y"], name="relu")],
                   opsets=[helper.make_opsetid("com.example", 1)])
    message = _error(model)
    assert "Foo node 'my_foo'" in message and "com.example" in message
    assert "'relu'" not in message  # not blamed on the op after it


def test_an_if_node_is_named():
    out = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [], [out("t")])
    other = helper.make_graph([helper.make_node("Concat", ["x", "x"], ["e"], axis=0)], "else", [], [out("e")])
    model = _model([helper.make_node("If", ["c"], ["h"], name="branchy", then_branch=then, else_branch=other),
                    helper.make_node("Relu", ["h"], ["y"], name="relu")],
                   inits=[numpy_helper.from_array(np.array(True), "c")])
    message = _error(model)
    assert "If node 'branchy'" in message and "ai.onnx" in message


def test_a_custom_op_with_a_declared_shape_is_still_traced_and_blocked():
    model = _model([helper.make_node("Foo", ["x"], ["h"], name="my_foo", domain="com.example"),
                    helper.make_node("Relu", ["h"], ["y"], name="relu")],
                   opsets=[helper.make_opsetid("com.example", 1)])
    model.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 4]))
    groups = analyze_onnx(model)
    assert [b.source_op for b in groups.blocked_ops] == ["com.example::Foo"]
