"""ONNX from the command line: compress model.onnx, bench, --round-to, and bad input (external data
missing or outside the model directory, ops without a rule, opsets outside the rules' range, a
provider that is not installed) answered with one line, exit code 2 and nothing written."""

import json
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.cli.main import main
from graphprune.io.onnx_export import export_onnx
from graphprune.testing.fixtures import byte_level_tokenizer, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.fixture
def cli(capsys):
    """The CLI in this process (a subprocess per call would spend most of the test importing torch)."""
    def run(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)
    return run


def assert_user_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory):
    directory = tmp_path_factory.mktemp("onnx") / "llama"
    export_onnx(tiny_llama(intermediate=96), directory, tokenizer=byte_level_tokenizer())
    return directory / "model.onnx"


def mlp(middle_op=None, *, opset=17, layers=2):
    """x [b, 8] -> (MatMul 8->32, Relu, [middle_op], MatMul 32->8, + x) per layer."""
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for k in range(layers):
        inits += [numpy_helper.from_array(rng.standard_normal((8, 32)).astype(np.float32), f"layers.{k}.up"),
                  numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), f"layers.{k}.down")]
        nodes += [helper.make_node("MatMul", [x, f"layers.{k}.up"], [f"h{k}"], name=f"up{k}"),
                  helper.make_node("Relu", [f"h{k}"], [f"r{k}"], name=f"relu{k}")]
        mid = f"r{k}"
        if middle_op and k == 0:
            nodes.append(helper.make_node(middle_op, [mid], [f"m{k}"], name=f"mystery{k}"))
            mid = f"m{k}"
        nodes += [helper.make_node("MatMul", [mid, f"layers.{k}.down"], [f"d{k}"], name=f"down{k}"),
                  helper.make_node("Add", [x, f"d{k}"], [f"y{k}"], name=f"res{k}")]
        x = f"y{k}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def test_compress_an_onnx_file_honours_round_to(cli, llama_onnx, tmp_path):
    out = tmp_path / "small.onnx"
    result = cli("compress", llama_onnx, "--criterion", "magnitude", "--sparsity", "0.3", "--round-to", "8",
                 "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "ONNX-native" in result.stdout and "validated in onnxruntime" in result.stdout
    report = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["graphprune_report"])
    channels = list(report["kept_units"]["channel"].values())
    assert channels and all(c % 8 == 0 and c < 96 for c in channels)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ids = np.arange(3, 23, dtype=np.int64).reshape(2, 10)
    assert sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0].shape == (2, 10, 258)
    # a calibration criterion reads the tokenizer saved next to the .onnx file
    result = cli("compress", llama_onnx, "--criterion", "wanda-sp", "--sparsity", "0.2", "--nsamples", "4",
                 "--seqlen", "32", "--out", tmp_path / "wanda.onnx", "--quiet")
    assert result.returncode == 0, result.stderr


def test_round_to_is_honoured_by_pytorch_compress(cli, tmp_path):
    from graphprune.testing.fixtures import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "tiny", intermediate=96)
    result = cli("compress", model_dir, "--criterion", "magnitude", "--sparsity", "0.3", "--round-to", "16",
                 "--out", tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "graphprune_report.json").read_text())
    assert all(c % 16 == 0 for c in report["kept_units"]["channel"].values())


def test_bench_reports_latency_and_ideal_speedup(cli, llama_onnx, tmp_path):
    small = tmp_path / "small.onnx"
    assert cli("compress", llama_onnx, "--criterion", "magnitude", "--sparsity", "0.4", "--out", small,
               "--quiet").returncode == 0
    result = cli("bench", small, "--baseline", llama_onnx, "--shapes", "1x16,2x8", "--runs", "3", "--warmup", "1",
                 "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [(r["batch"], r["seqlen"]) for r in rows] == [(1, 16), (1, 16), (2, 8), (2, 8)]
    for dense, pruned in zip(rows[::2], rows[1::2]):
        assert dense["speedup"] is None and pruned["speedup"] > 0
        assert pruned["gflops"] < dense["gflops"]
        assert pruned["ideal_speedup"] == pytest.approx(dense["gflops"] / pruned["gflops"])
        assert pruned["median_ms"] <= pruned["p90_ms"]
    text = cli("bench", small, "--batch", "1", "--seqlen", "8", "--runs", "2", "--profile")
    assert text.returncode == 0 and "median ms" in text.stdout and "profile:" in text.stdout


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is installed here")
def test_a_provider_that_is_not_installed_is_an_error_unless_fallback_is_asked(cli, llama_onnx):
    assert_user_error(cli("bench", llama_onnx, "--provider", "cuda"), "provider 'cuda' is not available",
                      "graphprune[gpu]", "--allow-fallback")
    result = cli("bench", llama_onnx, "--provider", "cuda", "--allow-fallback", "--runs", "1", "--seqlen", "8",
                 "--json")
    assert result.returncode == 0, result.stderr
    assert "fell back to CPU" in json.loads(result.stdout)["note"]


def _with_external_data(tmp_path):
    directory = tmp_path / "ext"
    directory.mkdir()
    onnx.save_model(mlp(), str(directory / "model.onnx"), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    return directory / "model.onnx"


def test_missing_external_data_is_named(cli, tmp_path):
    path = _with_external_data(tmp_path)
    (path.parent / "weights.bin").unlink()
    for command in ("inspect", "compress"):
        extra = ["--out", tmp_path / "o.onnx", "--criterion", "magnitude"] if command == "compress" else []
        assert_user_error(cli(command, path, *extra), "external data file 'weights.bin'", "missing")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/hostname"])
def test_external_data_outside_the_model_directory_is_refused(cli, tmp_path, location):
    path = _with_external_data(tmp_path)
    (tmp_path / "secret.bin").write_bytes((path.parent / "weights.bin").read_bytes())
    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))
    assert_user_error(cli("inspect", path), "outside the model directory", "refusing")
    from graphprune.errors import UserError
    from graphprune.graph import analyze_onnx

    with pytest.raises(UserError, match="refusing"):  # the API refuses too
        analyze_onnx(path)


@pytest.mark.parametrize("opset, needle", [(9, "older than the oldest opset"), (99, "newer than the installed")])
def test_opsets_outside_the_rules_range_are_refused(cli, tmp_path, opset, needle):
    path = tmp_path / "model.onnx"
    onnx.save_model(mlp(opset=opset), str(path))
    assert_user_error(cli("inspect", path), f"opset {opset}", needle)


def test_an_op_without_a_rule_blocks_its_group_by_name(cli, tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save_model(mlp("LpNormalization"), str(path))
    out = tmp_path / "small.onnx"
    result = cli("compress", path, "--criterion", "magnitude", "--sparsity", "0.3", "--target", "channels",
                 "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "blocked" in result.stdout and "LpNormalization at mystery0" in result.stdout
    pruned = {i.name: tuple(i.dims) for i in onnx.load(str(out)).graph.initializer}
    assert pruned["layers.0.up"] == (8, 32) and pruned["layers.0.down"] == (32, 8)  # blocked: untouched
    assert pruned["layers.1.up"][1] < 32  # the other layer takes the whole budget
    one_layer = tmp_path / "one.onnx"
    onnx.save_model(mlp("LpNormalization", layers=1), str(one_layer))
    assert_user_error(cli("compress", one_layer, "--criterion", "magnitude", "--target", "channels",
                          "--out", tmp_path / "none.onnx"), "LpNormalization")
    assert not (tmp_path / "none.onnx").exists()


def test_onnx_compress_bad_outputs_and_options(cli, llama_onnx, tmp_path):
    assert_user_error(cli("compress", llama_onnx, "--criterion", "magnitude", "--out", tmp_path / "dir"),
                      "must be an .onnx file")
    assert_user_error(cli("compress", llama_onnx, "--criterion", "magnitude", "--out", llama_onnx, "--force"),
                      "is a file the input reads")
    assert_user_error(cli("compress", llama_onnx, "--criterion", "magnitude", "--export", "onnx",
                          "--out", tmp_path / "x.onnx"), "--export")
    no_tokenizer = tmp_path / "bare.onnx"
    no_tokenizer.write_bytes(llama_onnx.read_bytes())
    assert_user_error(cli("compress", no_tokenizer, "--criterion", "flap", "--out", tmp_path / "f.onnx"),
                      "tokenizer")
    assert_user_error(cli("compress", llama_onnx, "--criterion", "taylor", "--out", tmp_path / "t.onnx"),
                      "ONNX-native pruning does not compute")
    assert_user_error(cli("compress", llama_onnx, "--criterion", "flap", "--compensate", "lsq",
                          "--out", tmp_path / "l.onnx"), "ONNX-native pruning does not compute")
    assert_user_error(cli("bench", llama_onnx, "--batch", "0"), "--batch")
    assert_user_error(cli("bench", llama_onnx, "--shapes", "1by8"), "--shapes")
