"""Reliability II (issue 24): runs that used to end as internal errors, hang, pass off a short result or
leave debris — each now a one-line answer with the right exit code (docs/reliability.md, rows 84 on)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from graphprune.backends.stream.workdir import WorkDir
from graphprune.testing.fixtures import save_tiny_llama, write_tiny_gguf

from test_reliability import ENV, Run, assert_no_output, assert_refused  # shared helpers (same folder)


@pytest.fixture
def graphprune(capsys):
    from graphprune.cli.main import main

    def run(*args) -> Run:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as usage_error:
            code = usage_error.code
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


def compress(model, out, *extra):
    return ["compress", model, "--criterion", "magnitude", "--sparsity", "0.3", "--out", out, "--quiet", *extra]


# --- defect 6: a plan that removes clearly less than asked --------------------------------------------
def test_round_to_that_removes_nothing_is_refused_unless_allowed(graphprune, model_dir, tmp_path):
    out = tmp_path / "out"
    assert_refused(graphprune(*compress(model_dir, out, "--target", "channels", "--round-to", "4096")),
                   "the plan removes 0.0000 of the layer parameters, asked 0.3",
                   "--round-to 4096 is at least the width of 2 channel group(s)", "--allow-short")
    assert_no_output(out)
    run = graphprune(*compress(model_dir, out, "--target", "channels", "--round-to", "4096", "--allow-short"))
    assert run.code == 0, run.err


# --- defect 8: --force never deletes a running job's work directory --------------------------------------
def test_force_never_removes_a_running_streams_work_directory(graphprune, model_dir, calib, tmp_path):
    out = tmp_path / "out"
    running = WorkDir(out, "fingerprint-of-the-running-job", {"sparsity": 0.3}, resume=False, force=False)
    try:
        marker = running.state / "scores-00000.safetensors"
        marker.write_bytes(b"being written by the other job")
        run = graphprune(*compress(model_dir, out, "--stream", "--force", "--criterion", "flap", "--calib", calib,
                                   "--nsamples", "4", "--seqlen", "16"))
        assert_refused(run, "another graphprune process is working in")
        assert marker.read_bytes() == b"being written by the other job"
    finally:
        running.close()


# --- defect 9: a full disk while streaming is the environment's, with the finished layers kept --------
def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))


def test_a_full_disk_while_streaming_is_one_line_and_resumable(model_dir, calib, tmp_path):
    out = tmp_path / "out"
    args = [*compress(model_dir, out, "--stream", "--criterion", "flap", "--compensate", "bias", "--calib", calib,
                      "--nsamples", "4", "--seqlen", "16", "--no-cache")]
    child = subprocess.run([sys.executable, "-m", "graphprune", *map(str, args)], capture_output=True, text=True,
                           env=ENV, timeout=300, preexec_fn=_limit_file_size)
    lines = [line for line in child.stderr.splitlines() if line.strip()]
    assert child.returncode == 2, child.stderr
    assert "Traceback" not in child.stderr and "internal error" not in child.stderr
    assert any("could not write" in line and "File too large" in line for line in lines), lines
    assert any("rerun the same command with --resume" in line for line in lines), lines
    assert not out.exists()


# --- defect 11: user and environment problems, checked before heavy work -----------------------------------
def test_seqlen_beyond_the_models_positions_is_a_user_error(graphprune, model_dir, calib, tmp_path):
    positions = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    run = graphprune(*compress(model_dir, tmp_path / "out", "--criterion", "flap", "--calib", calib,
                               "--nsamples", "2", "--seqlen", str(positions + 1)))
    assert_refused(run, f"--seqlen {positions + 1} is longer than the {positions} positions the model has")


def test_token_ids_beyond_the_vocabulary_are_a_user_error(graphprune, calib, tmp_path):
    small = save_tiny_llama(tmp_path / "small-vocab", vocab=100)  # the byte-level tokenizer has 258 tokens
    run = graphprune(*compress(small, tmp_path / "out", "--criterion", "flap", "--calib", calib, "--nsamples", "2",
                               "--seqlen", "16"))
    assert_refused(run, "the model's vocabulary has 100 entries", "does not belong to this model")
    assert_no_output(tmp_path / "out")


def test_a_non_positive_norm_option_is_refused(graphprune, model_dir, tmp_path):
    for value in ("0", "-1", "nan"):
        assert_refused(graphprune(*compress(model_dir, tmp_path / "out", "--option", f"norm={value}")),
                       f"magnitude option norm=", "finite number greater than 0")


def test_calibration_larger_than_memory_is_refused_before_any_work(graphprune, model_dir, calib, tmp_path):
    run = graphprune(*compress(model_dir, tmp_path / "out", "--criterion", "obs", "--calib", calib,
                               "--nsamples", "100000000", "--seqlen", "128"))
    assert_refused(run, "--nsamples 100000000 x --seqlen 128 needs about", "GiB of activations", "--stream")


def test_export_opset_out_of_range_is_a_user_error_with_nothing_on_stdout(graphprune, model_dir, tmp_path):
    run = graphprune("export", model_dir, "--out", tmp_path / "onnx", "--opset", "99")
    assert_refused(run, "--opset 99 is outside what the torchscript exporter and the installed onnx support")
    assert run.out == ""
    assert_no_output(tmp_path / "onnx")


def test_an_unwritable_model_cache_is_a_user_error(tmp_path, monkeypatch):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    env = {**ENV, "GRAPHPRUNE_CACHE": str(blocker)}
    child = subprocess.run([sys.executable, "-m", "graphprune", "inspect", str(gguf)], capture_output=True,
                           text=True, env=env, timeout=300)
    lines = [line for line in child.stderr.splitlines() if line.strip()]
    assert child.returncode == 2 and len(lines) == 1 and "Traceback" not in child.stderr, child.stderr
    assert str(blocker) in lines[0]


def test_a_memory_error_is_reported_as_the_environments(capsys):
    from graphprune.errors import classify

    code, message = classify(MemoryError())
    assert code == 2 and message.startswith("graphprune: error: out of memory")
    assert classify(KeyError("a bug")) is None


# --- defect 16: outputs follow the umask; a killed run's debris is removed by the next ------------------
def test_outputs_follow_the_umask(graphprune, model_dir, tmp_path):
    out = tmp_path / "out"
    previous = os.umask(0o022)
    try:
        assert graphprune(*compress(model_dir, out)).code == 0
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir() if p.is_file())


def test_a_killed_runs_partial_output_is_removed_by_the_next_run(graphprune, model_dir, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    debris = tmp_path / f".out.partial-{dead.pid}"
    debris.mkdir()
    (debris / ".graphprune-partial").write_text(str(dead.pid))
    (debris / "model.safetensors").write_bytes(b"half")
    theirs = tmp_path / ".out.partial-notours"
    theirs.mkdir()  # no marker: not graphprune's, never touched
    assert graphprune(*compress(model_dir, out)).code == 0
    assert not debris.exists() and theirs.is_dir()
    assert (out / "model.safetensors").is_file()
