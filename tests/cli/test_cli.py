"""The command line as a user meets it: good runs, and every bad input answered with one line,
a non-zero exit, the input untouched and no output directory left behind."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest



def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "graphprune.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=ENV)


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.rglob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def assert_user_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_inspect_prints_groups_and_json(model_dir):
    result = run("inspect", model_dir)
    assert result.returncode == 0, result.stderr
    assert "kv-group" in result.stdout and "blocked groups: none" in result.stdout
    result = run("inspect", model_dir, "--json")
    import json

    assert {g["kind"] for g in json.loads(result.stdout)["groups"]} >= {"channel", "kv-group", "hidden"}


def test_compress_then_eval(model_dir, calib, tmp_path):
    before = digest(model_dir)
    out = tmp_path / "pruned"
    result = run("compress", model_dir, "--criterion", "flap", "--sparsity", "0.3", "--calib", calib,
                 "--nsamples", "8", "--seqlen", "32", "--out", out, "--quiet", "--allocation", "uniform")
    assert result.returncode == 0, result.stderr
    assert "asked 0.3" in result.stdout and (out / "model.safetensors").exists()
    assert (out / "graphprune_report.json").exists() and (out / "tokenizer.json").exists()
    assert digest(model_dir) == before
    result = run("eval", out, "--data", calib, "--seqlen", "64", "--windows", "4", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "perplexity" in result.stdout
    import json

    row = json.loads((out / "graphprune_report.json").read_text())["evaluation"][0]  # recorded in the output
    assert row["kind"] == "perplexity" and row["data"] == "calib.txt" and f"{row['value']:.4f}" in result.stdout
    assert f"| perplexity | calib.txt | ppl | {row['value']:.4f} |" in (out / "README.md").read_text()


BAD = [
    ("sparsity zero", ["--sparsity", "0"], "strictly between 0 and 1"),
    ("sparsity above one", ["--sparsity", "1.5"], "strictly between 0 and 1"),
    ("sparsity not a number", ["--sparsity", "half"], "not a number"),
    ("nsamples not an integer", ["--nsamples", "many"], "not an integer"),
    ("unknown criterion", ["--criterion", "magnitud"], "did you mean 'magnitude'"),
    ("unknown allocation", ["--allocation", "everywhere"], "invalid choice"),
    ("unknown target", ["--target", "layers"], "unknown --target"),
    ("misspelt criterion option", ["--criterion", "obs", "--option", "scael=output"], "has no option 'scael'"),
    ("criterion option without a value", ["--option", "metric"], "is not KEY=VALUE"),
    ("unknown flap metric", ["--criterion", "flap", "--option", "metric=WIFX"], "choose one of WIFV, IFV, WIFN"),
]


@pytest.mark.parametrize("label,args,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments(model_dir, calib, tmp_path, label, args, needle):
    out = tmp_path / "out"
    result = run("compress", model_dir, "--calib", calib, "--nsamples", "4", "--seqlen", "16", "--out", out, *args)
    assert_user_error(result, needle)
    assert not out.exists()


def test_criterion_options_reach_the_criterion_and_the_report(model_dir, calib, tmp_path):
    import json

    out = tmp_path / "pruned"
    result = run("compress", model_dir, "--criterion", "flap", "--option", "metric=IFV", "--sparsity", "0.3",
                 "--calib", calib, "--nsamples", "8", "--seqlen", "32", "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "graphprune_report.json").read_text())["criterion_options"] == {"metric": "IFV"}


def test_bad_model_paths(tmp_path):
    out = tmp_path / "out"
    assert_user_error(run("compress", tmp_path / "nope", "--out", out), "nope")
    (tmp_path / "empty").mkdir()
    assert_user_error(run("inspect", tmp_path / "empty"), "config.json")
    assert_user_error(run("inspect", "smollm2-13m"), "smollm2-135m")
    assert not out.exists()


def test_onnx_file_is_inspected_and_a_truncated_one_refused(tmp_path):
    import torch

    from graphprune.testing.zoo import tiny_cnn

    path = tmp_path / "cnn.onnx"
    torch.onnx.export(tiny_cnn().eval(), (torch.randn(1, 3, 16, 16),), str(path), dynamo=True, optimize=False)
    result = run("inspect", path)
    assert result.returncode == 0, result.stderr
    assert "traced with onnx" in result.stdout and "channel" in result.stdout
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(path.read_bytes()[:200])
    assert_user_error(run("inspect", truncated), "onnx")


def test_corrupt_safetensors(model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    assert_user_error(run("inspect", broken), "safetensors")


@pytest.mark.parametrize("content,needle", [(b"", "empty"), (b"\x00\x01\x02\xff" * 100, "binary"),
                                            (b"short text", "tokens")])
def test_bad_calibration_files(model_dir, tmp_path, content, needle):
    bad = tmp_path / "calib.txt"
    bad.write_bytes(content)
    out = tmp_path / "out"
    result = run("compress", model_dir, "--calib", bad, "--out", out, "--nsamples", "4", "--seqlen", "64")
    assert_user_error(result, needle)
    assert not out.exists()


def test_output_must_not_be_the_input_nor_a_non_empty_directory(model_dir, calib, tmp_path):
    before = digest(model_dir)
    assert_user_error(run("compress", model_dir, "--criterion", "magnitude", "--out", model_dir), "overlaps the input")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert_user_error(run("compress", model_dir, "--criterion", "magnitude", "--out", occupied), "--force")
    assert (occupied / "keep.txt").read_text() == "mine"
    assert digest(model_dir) == before
    # --force replaces graphprune's own output only, never a directory of the user's
    assert_user_error(run("compress", model_dir, "--criterion", "magnitude", "--out", occupied, "--force"),
                      "was not written by graphprune")
    assert (occupied / "keep.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    for _ in range(2):
        result = run("compress", model_dir, "--criterion", "magnitude", "--out", ours, "--force", "--quiet")
        assert result.returncode == 0, result.stderr
    assert (ours / "config.json").exists()


def test_removing_every_unit_is_refused(model_dir, tmp_path):
    result = run("compress", model_dir, "--criterion", "magnitude", "--sparsity", "0.99", "--out", tmp_path / "o")
    assert_user_error(result, "lower --sparsity")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_mid_run_leaves_no_output(model_dir, calib, tmp_path, sig, code):
    out = tmp_path / "out"
    before = digest(model_dir)
    proc = subprocess.Popen([sys.executable, "-m", "graphprune.cli", "compress", str(model_dir), "--calib", str(calib),
                             "--criterion", "flap", "--compensate", "bias",  # a long calibration to interrupt
                             "--nsamples", "100000", "--seqlen", "32", "--out", str(out), "--no-cache"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline and "calibration" not in seen:
        seen += proc.stderr.read1(4096).decode(errors="replace")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    err = err.decode(errors="replace")
    assert proc.returncode == code, err
    assert "no output was written" in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert digest(model_dir) == before
