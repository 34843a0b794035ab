"""ONNX-native pruning of grouped and depthwise convolutions as `torch.onnx.export` writes them (issue 25).

A depthwise ``Conv(c, c, groups=c)`` couples its input channel, its filter and its group into one
unit: pruning channels must shrink ``group`` with them and slice the ``[C, 1, kH, kW]`` weight on
axis 0 only. A general grouped conv keeps its channels as (group, channel-in-group): whole groups
can go (``group`` follows as C_in / W.shape[1]). Both exporters are checked, the written file is
checked by onnx's checker and run in onnxruntime, the achieved sparsity is measured on the file,
and the pruned output must equal the original model's with the removed channels' consumer weights
zeroed (what removing a channel means), so a wrongly mapped channel cannot pass.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from graphprune.backends.onnx import OnnxBackend
from graphprune.cli.main import main
from graphprune.graph.blocks import layer_parameters
from graphprune.graph.trace_onnx import analyze_onnx
from graphprune.pipeline.options import CompressOptions
from graphprune.pipeline.run import compress
from graphprune.testing.raw_onnx import export_raw
from graphprune.testing.zoo import randomise_batch_norms

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

SPARSITY, TOLERANCE = 0.3, 0.02
EXPORTERS = ["torchscript", "dynamo"]
INPUT = (1, 3, 16, 16)


def cbr(c_in: int, c_out: int, k: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class InvertedResidual(nn.Module):
    """x + project(depthwise(expand(x))), EfficientNet / MobileNetV2 style."""

    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.expand = cbr(c, hidden)
        self.dw = cbr(hidden, hidden, 3, groups=hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


class ConcatResidual(nn.Module):
    """x + merge(cat(pointwise(x), depthwise(pointwise(x)))): a concatenation inside a block."""

    def __init__(self, c: int, a: int, b: int) -> None:
        super().__init__()
        self.branch_a = cbr(c, a)
        self.branch_b = nn.Sequential(cbr(c, b), cbr(b, b, 3, groups=b))
        self.merge = nn.Sequential(nn.Conv2d(a + b, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.merge(torch.cat([self.branch_a(x), self.branch_b(x)], dim=1))


class DepthwiseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16, 3)
        self.blocks = nn.Sequential(InvertedResidual(16, 48), ConcatResidual(16, 16, 24), InvertedResidual(16, 48))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class GroupedNet(nn.Module):
    """A plain grouped conv (groups=2) between pointwise layers; no residual add. The wide 3x3 conv
    after it keeps one conv group (a coarse unit: a 16th of the stem, half the grouped conv) small
    next to the sparsity tolerance, whichever units the allocation picks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16, 3)
        self.grouped = cbr(16, 16, 3, groups=2)
        self.pw = cbr(16, 96)
        self.wide = cbr(96, 96, 3)
        self.head = nn.Linear(96, 10)

    def forward(self, x):
        return self.head(self.wide(self.pw(self.grouped(self.stem(x)))).mean((2, 3)))


class SharedNet(nn.Module):
    """One conv applied twice: its weight is one initializer read by two Conv nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16, 3)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.shared(torch.relu(self.shared(x))))
        return self.head(x.mean((2, 3)))


def randomised(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return randomise_batch_norms(model).eval()


MODELS = {"depthwise": DepthwiseNet, "grouped": GroupedNet, "shared": SharedNet}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(name: str, exporter: str):
        if (name, exporter) not in cache:
            torch.manual_seed(0)
            model = randomised(MODELS[name]())
            path = tmp_path_factory.mktemp("raw") / f"{name}-{exporter}.onnx"
            export_raw(model, path, dynamo=exporter == "dynamo", example=(torch.randn(*INPUT),))
            cache[(name, exporter)] = path
        return cache[(name, exporter)]

    return get


def inits(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def conv_nodes(proto: onnx.ModelProto) -> list[tuple[onnx.NodeProto, int]]:
    return [(n, next((a.i for a in n.attribute if a.name == "group"), 1)) for n in proto.graph.node
            if n.op_type == "Conv"]


def channels_in(proto: onnx.ModelProto, node: onnx.NodeProto) -> int:
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    return shapes[node.input[0]][1]


def masked_original(proto: onnx.ModelProto, groups, removed: dict) -> onnx.ModelProto:
    """The unpruned model with every consumer weight of a removed channel zeroed: removing a channel
    must give exactly this function."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    by_name = {i.name: i for i in out.graph.initializer}
    zeroed = {}
    for g in groups:
        units = removed.get(g.id)
        if units is None or not len(units):
            continue
        for s in g.slices:
            if s.role in ("conv.in", "linear.in"):
                w = zeroed.get(s.param, numpy_helper.to_array(by_name[s.param]).copy())
                np.moveaxis(w, s.axis, 0)[s.indices[units].reshape(-1)] = 0
                zeroed[s.param] = w
    for name, w in zeroed.items():
        by_name[name].CopyFrom(numpy_helper.from_array(w, name))
    return out


def check_pruned(path, tmp_path, **options):
    """Prune `path`, check the written file and return (result, original proto, pruned proto)."""
    original = onnx.load(str(path))
    before = {n: int(v.size) for n, v in inits(original).items()}
    groups = analyze_onnx(str(path))
    layers = layer_parameters(groups)
    total = sum(before[n] for n in layers)
    out = tmp_path / "small.onnx"
    result = compress(str(path), criterion="magnitude", sparsity=SPARSITY, calib="none", out=str(out),
                      progress=False, **options)
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    x = np.random.default_rng(0).standard_normal(INPUT).astype(np.float32)
    y = run(pruned, x)
    assert y.shape == (1, 10) and np.all(np.isfinite(y))
    # the pruned model is the original with the removed channels' consumers cut off
    reference = run(masked_original(original, groups, result.removed), x)
    np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-4)
    for node, group in conv_nodes(pruned):
        w = inits(pruned)[node.input[1]]
        c_in = channels_in(pruned, node)
        assert c_in == group * w.shape[1], f"{node.name}: {c_in} channels, group {group}, kernel {w.shape}"
    after = {n: int(v.size) for n, v in inits(pruned).items()}
    kept = sum(after.get(n, 0) for n in layers)
    achieved = 1 - kept / total
    assert abs(achieved - SPARSITY) <= TOLERANCE, f"removed {achieved:.4f} of the layer parameters"
    assert result.report["params"]["layers_before"] == total
    assert result.report["params"]["achieved_sparsity"] == pytest.approx(achieved)
    return result, original, pruned


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_depthwise_cnn_is_pruned_with_its_group_counts(exported, exporter, tmp_path):
    path = exported("depthwise", exporter)
    original = onnx.load(str(path))
    depthwise = {n.name for n, g in conv_nodes(original) if g > 1}
    assert len(depthwise) == 3
    groups = analyze_onnx(str(path))
    assert not groups.blocked_ops
    # input channel c, filter c and group c of a depthwise conv are one unit of one group
    weights = {n.input[1] for n in original.graph.node if n.name in depthwise}
    units = [(g, s) for g in groups if g.status != "fixed" for s in g.slices if s.param in weights]
    assert {s.axis for _, s in units} == {0}  # axis 1 has size 1: never a unit
    assert all(g.prunable and g.kind == "channel" for g, _ in units)
    result, _, pruned = check_pruned(path, tmp_path)
    shrunk = 0
    for node, group in conv_nodes(pruned):
        if node.name in depthwise:
            w = inits(pruned)[node.input[1]]
            assert w.shape[1] == 1 and group == w.shape[0] == channels_in(pruned, node)
            shrunk += group < {n.name: g for n, g in conv_nodes(original)}[node.name]
    assert shrunk >= 1, "no depthwise conv lost channels: the test would not show a stale group"
    assert any(".group " in r for r in result.report["shape_constants_rewritten"])


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_grouped_conv_prunes_whole_groups_only(exported, exporter, tmp_path):
    path = exported("grouped", exporter)
    groups = analyze_onnx(str(path))
    original = onnx.load(str(path))
    grouped = next(n for n, g in conv_nodes(original) if g == 2)
    weight = grouped.input[1]
    members = [(g, s) for g in groups for s in g.slices if s.param == weight and s.axis in (0, 1)]
    # the filters are (group, channel-in-group): the group index is one class with 2 units of 8
    # filters, the in-group channels another; the kernel's axis 1 is the in-group part only
    whole = [g for g, s in members if s.axis == 0 and g.units == 2]
    assert len(whole) == 1 and whole[0].slices[0].width == 8
    assert all(g.units == 8 for g, s in members if s.axis == 1)
    # remove the second conv group explicitly: group becomes 1 and the output must be exact
    out = tmp_path / "one-group.onnx"
    result = compress(str(path), criterion="magnitude", calib="none", out=str(out), progress=False,
                      removed={whole[0].id: np.array([1])})
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    node, group = next((n, g) for n, g in conv_nodes(pruned) if n.name == grouped.name)
    assert group == 1 and inits(pruned)[node.input[1]].shape[:2] == (8, 8)
    x = np.random.default_rng(1).standard_normal(INPUT).astype(np.float32)
    np.testing.assert_allclose(run(pruned, x), run(masked_original(original, groups, result.removed), x),
                               rtol=1e-4, atol=1e-4)
    # and the magnitude run to the requested sparsity
    check_pruned(path, tmp_path)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_shared_initializer_counts_once(exported, exporter):
    path = exported("shared", exporter)
    proto = onnx.load(str(path))
    readers: dict[str, int] = {}
    for n in proto.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    sizes = {i.name: int(np.prod(i.dims)) for i in proto.graph.initializer}
    shared = [name for name, n in sizes.items() if n == 16 * 16 * 9]
    assert len(shared) == 1 and readers[shared[0]] == 2  # one weight, two Conv nodes
    backend = OnnxBackend(str(path), CompressOptions(criterion="magnitude", sparsity=SPARSITY).resolved())
    total, layers = backend.param_counts()
    floats = sum(n for i, n in zip(proto.graph.initializer, sizes.values()) if i.data_type == onnx.TensorProto.FLOAT)
    assert total == floats and layers <= total
    summary = backend.groups().summary()["by_kind"]
    # the shared weight has both axes in one group: still counted once, never above the model's size
    assert sum(k["prunable_params"] for k in summary.values()) <= total


@pytest.fixture
def cli(capsys):
    def call(*args):
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's own usage errors exit instead of returning
            code = exc.code
        return code, capsys.readouterr().err
    return call


def assert_one_line(code, err, *needles):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_input_is_one_line_and_nothing_written(exported, cli, tmp_path):
    path = exported("depthwise", "torchscript")
    out = tmp_path / "small.onnx"
    base = ["compress", path, "--criterion", "magnitude", "--calib", "none", "--out", out]
    # a sparsity that is not a fraction
    assert_one_line(*cli(*base, "--sparsity", "1.2"), "sparsity")
    # a criterion that needs calibration text, which an ONNX file alone does not have
    assert_one_line(*cli("compress", path, "--criterion", "wanda-sp", "--sparsity", "0.3", "--out", out))
    # a target the model has no groups for (a CNN has no attention heads)
    assert_one_line(*cli(*base, "--sparsity", "0.3", "--target", "kv-groups"))
    # a file whose depthwise Conv says a group count its weight does not have
    broken = onnx.load(str(path))
    node = next(n for n, g in conv_nodes(broken) if g > 1)
    next(a for a in node.attribute if a.name == "group").i = 3
    bad = tmp_path / "bad-group.onnx"
    onnx.save(broken, str(bad))
    assert_one_line(*cli("compress", bad, "--criterion", "magnitude", "--calib", "none", "--sparsity", "0.3",
                         "--out", out), node.name, "group 3")
    # not an ONNX model at all
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07not a model")
    assert_one_line(*cli("compress", junk, "--criterion", "magnitude", "--sparsity", "0.3", "--out", out))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("small")]
