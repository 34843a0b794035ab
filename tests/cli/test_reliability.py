"""The wall of bad inputs, faults and hostile files (docs/reliability.md lists every row).

Each test feeds the command line one bad thing and checks what a user would: the exit code, a
single line on stderr that names the problem, the input byte-for-byte unchanged and no output
directory (nor a half-written temporary one) left behind. Most run the CLI in this process
(`graphprune.cli.main`) so that faults can be injected; the ones that need a fresh process (a
file-size limit, dropped permissions) run it as a child.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from graphprune.cli import main as cli
from graphprune.errors import OutputError
from graphprune.testing import faults
from graphprune.io.hf import save_pruned
from graphprune.testing.fixtures import save_tiny_llama, tiny_llama

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


# --- helpers ---------------------------------------------------------------------------------------


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


@pytest.fixture
def graphprune(capsys):
    """Run the command line in this process; returns a `Run`."""

    def run(*args) -> Run:
        capsys.readouterr()
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as usage_error:  # argparse rejects malformed values itself
            code = usage_error.code
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


def digest(path: Path) -> str:
    """Names, modes and bytes of every file under `path` (or of the file itself)."""
    h = hashlib.sha256()
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        if f.is_file() and not f.is_symlink():
            h.update(oct(f.stat().st_mode).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def assert_refused(run: Run, *needles: str, code: int = 2) -> str:
    """One line on stderr, no traceback, the given exit code; returns the line."""
    assert run.code == code, run.err
    assert "Traceback" not in run.err, run.err
    assert len(run.error_lines) == 1, run.err
    line = run.error_lines[0]
    for needle in needles:
        assert needle in line, line
    if os.environ.get("GRAPHPRUNE_WALL_MESSAGES"):  # collects the messages quoted in docs/reliability.md
        with open(os.environ["GRAPHPRUNE_WALL_MESSAGES"], "a") as log:
            log.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST"), "code": code, "line": line}) + "\n")
    return line


def assert_no_output(out: Path) -> None:
    """Neither the output nor a temporary sibling of it exists."""
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture
def model_copy(model_dir, tmp_path) -> Path:
    """A private copy of the tiny model that a test may damage."""
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def compress_args(model: Path, out: Path, *extra) -> list:
    return ["compress", model, "--criterion", "magnitude", "--sparsity", "0.3", "--out", out, "--quiet", *extra]


# --- missing and unreadable paths ---------------------------------------------------------------


def test_missing_model_path(graphprune, tmp_path):
    out = tmp_path / "out"
    assert_refused(graphprune(*compress_args(tmp_path / "nope", out)), "nope does not exist")
    assert_no_output(out)


CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24


def _drop_root_file_permissions() -> None:
    """Remove CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from this (child) process, so that permission
    bits apply to root too. Runs in the child between fork and exec; exec gives root every capability
    of the bounding set back, so they leave the bounding set as well."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    keep = ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    for field in ("effective", "permitted", "inheritable"):
        setattr(data[0], field, getattr(data[0], field) & keep)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


PERMISSION_CHILD = """
import json, sys
from graphprune.cli import main as cli
from io import StringIO
import contextlib
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(argv)
    results[name] = [code, err.getvalue()]
print(json.dumps(results))
"""


def test_paths_without_permission(model_dir, calib, tmp_path):
    """Unreadable model directory, unreadable weights, unreadable calibration file, unwritable output
    parent: with real permission bits. Root reads everything, so as root the child process gives up
    the two capabilities that bypass permission bits (where the kernel lets it)."""
    if os.name != "posix":
        pytest.skip("POSIX permission bits")
    locked_dir = Path(shutil.copytree(model_dir, tmp_path / "locked-dir"))
    locked_weights = Path(shutil.copytree(model_dir, tmp_path / "locked-weights"))
    locked_calib = Path(shutil.copy(calib, tmp_path / "locked.txt"))
    readonly_parent = tmp_path / "readonly"
    readonly_parent.mkdir()
    (locked_weights / "model.safetensors").chmod(0)
    locked_calib.chmod(0)
    locked_dir.chmod(0)
    readonly_parent.chmod(0o555)
    scenarios = {
        "model dir": compress_args(locked_dir, tmp_path / "o1"),
        "weights": compress_args(locked_weights, tmp_path / "o2"),
        "calibration": ["compress", str(model_dir), "--criterion", "wanda-sp", "--calib", str(locked_calib),
                        "--nsamples", "4", "--seqlen", "16", "--out", str(tmp_path / "o3"), "--quiet"],
        "output parent": compress_args(model_dir, readonly_parent / "out"),
    }
    scenarios = {k: [str(a) for a in v] for k, v in scenarios.items()}
    preexec = _drop_root_file_permissions if os.geteuid() == 0 else None
    try:
        child = subprocess.run([sys.executable, "-c", PERMISSION_CHILD, json.dumps(scenarios)], capture_output=True,
                               text=True, env=ENV, timeout=300, preexec_fn=preexec)
    except subprocess.SubprocessError as error:  # capset refused (e.g. a container without the capability)
        pytest.skip(f"cannot drop root's file capabilities here: {error}")
    finally:
        locked_dir.chmod(0o755)
    assert child.returncode == 0, child.stderr
    results = {name: Run(code, "", err) for name, (code, err) in json.loads(child.stdout.splitlines()[-1]).items()}
    assert_refused(results["model dir"], "locked-dir is not readable (permission denied)")
    assert_refused(results["weights"], "model.safetensors is not readable (permission denied)")
    assert_refused(results["calibration"], "locked.txt cannot be read: Permission denied")
    assert_refused(results["output parent"], "cannot write to", "readonly")
    for index in (1, 2, 3):
        assert not (tmp_path / f"o{index}").exists()
    assert list(readonly_parent.iterdir()) == []


# --- hostile and corrupt model files --------------------------------------------------------------


def _safetensors_header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _trailing_bytes(data: bytes) -> bytes:
    return data + b"\0" * 64


def _header_length_beyond_file(data: bytes) -> bytes:
    return struct.pack("<Q", 10**12) + data[8:]


def _header_length_too_short(data: bytes) -> bytes:
    return struct.pack("<Q", _safetensors_header_length(data) - 20) + data[8:]


def _sizes_disagree_with_offsets(data: bytes) -> bytes:
    header = json.dumps({"x": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 8]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 8


def _offsets_overlap(data: bytes) -> bytes:
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 12


def _random_bytes(data: bytes) -> bytes:
    return np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes()


HOSTILE_SAFETENSORS = [
    (_truncate, "is truncated"),
    (_trailing_bytes, "corrupt (trailing bytes)"),
    (_header_length_beyond_file, "header length field says 1000000000000 bytes"),
    (_header_length_too_short, "not a valid safetensors header"),
    (_sizes_disagree_with_offsets, "not a valid safetensors file"),
    (_offsets_overlap, "not a valid safetensors file"),
    (_random_bytes, "model.safetensors is corrupt"),
]


@pytest.mark.parametrize("damage,needle", HOSTILE_SAFETENSORS, ids=[d.__name__.strip("_") for d, _ in HOSTILE_SAFETENSORS])
def test_hostile_safetensors(graphprune, model_copy, tmp_path, damage, needle):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    before, out = digest(model_copy), tmp_path / "out"
    assert_refused(graphprune(*compress_args(model_copy, out)), needle)
    assert digest(model_copy) == before
    assert_no_output(out)


def _set_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_config_that_disagrees_with_the_weights(graphprune, model_copy, tmp_path):
    _set_config(model_copy, intermediate_size=96 * 2)
    before = digest(model_copy)
    assert_refused(graphprune("inspect", model_copy), "does not match its weights", "tensors differ in shape")
    assert digest(model_copy) == before


def test_config_with_absurd_sizes_is_refused_before_allocating(graphprune, model_copy):
    # 10**8 intermediate channels is 154 GB of fp32 weights: transformers would try to allocate it.
    _set_config(model_copy, intermediate_size=10**8)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    line = assert_refused(graphprune("inspect", model_copy), "does not match its weights")
    assert "describes 38,400,057,920 parameters but the weights hold 94,784" in line
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024 < 2**30


def test_config_the_family_rejects(graphprune, model_copy):
    _set_config(model_copy, num_attention_heads=5)  # 64 hidden channels do not split into 5 heads
    assert_refused(graphprune("inspect", model_copy), "cannot read the model config",
                   "hidden size (64) is not a multiple of the number of attention heads (5)")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_refused(graphprune, model_copy, tmp_path, value):
    from safetensors.torch import load_file, save_file

    weights = load_file(model_copy / "model.safetensors")
    weights["model.layers.1.self_attn.o_proj.weight"][3, 5] = value
    save_file(weights, model_copy / "model.safetensors", metadata={"format": "pt"})
    before, out = digest(model_copy), tmp_path / "out"
    assert_refused(graphprune(*compress_args(model_copy, out)),
                   "model.layers.1.self_attn.o_proj.weight holds 1 NaN/Inf value(s)")
    assert digest(model_copy) == before
    assert_no_output(out)


class Exploit:
    """Unpickling this runs `touch`: what a malicious pytorch_model.bin does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_checkpoint_is_refused_and_never_executed(graphprune, model_copy, tmp_path):
    marker = tmp_path / "pwned"
    (model_copy / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Exploit(marker)}, model_copy / "pytorch_model.bin")
    before, out = digest(model_copy), tmp_path / "out"
    assert_refused(graphprune(*compress_args(model_copy, out)), "only a pickle checkpoint", "--allow-pickle")
    # Allowed, it is read with weights_only=True, which refuses to call os.system.
    assert_refused(graphprune(*compress_args(model_copy, out, "--allow-pickle")),
                   "holds more than tensors and is refused even with --allow-pickle", "posix.system")
    assert not marker.exists()
    assert digest(model_copy) == before
    assert_no_output(out)


def test_remote_code_is_not_run_unless_asked(graphprune, model_copy, tmp_path):
    marker = tmp_path / "pwned"
    (model_copy / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                        "from transformers import LlamaConfig as EvilConfig\n")
    _set_config(model_copy, model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"})
    assert_refused(graphprune("inspect", model_copy), "needs the model's own Python code",
                   "not run unless you pass --trust-remote-code")
    assert not marker.exists()


# GGUF: the loader converts a GGUF once into a cache; a corrupt one must leave no cache entry.
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    from graphprune.testing.fixtures import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _gguf_wrong_magic(data: bytes) -> bytes:
    return b"GGML" + data[4:]


def _gguf_future_version(data: bytes) -> bytes:
    return data[:4] + struct.pack("<I", 99) + data[8:]


def _gguf_absurd_tensor_count(data: bytes) -> bytes:
    return data[:8] + struct.pack("<Q", 2**60) + data[16:]


def _gguf_garbled_metadata(data: bytes) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, 1800, dtype=np.uint8).tobytes()
    return data[:200] + noise + data[2000:]


def _gguf_absurd_feed_forward_length(data: bytes) -> bytes:
    # A KV pair is the key (u64 length + bytes), the value type (u32; 4 = UINT32) and the value.
    key = b"llama.feed_forward_length"
    at = data.index(key) + len(key)
    assert struct.unpack("<II", data[at:at + 8]) == (4, 128)
    return data[:at + 4] + struct.pack("<I", 10**8) + data[at + 8:]


HOSTILE_GGUF = [
    (_truncate, "cannot load GGUF file"),
    (_gguf_wrong_magic, "is not a GGUF file"),
    (_gguf_future_version, "GGUF v99"),
    (_gguf_absurd_tensor_count, "cannot load GGUF file"),
    (_gguf_garbled_metadata, "cannot load GGUF file"),
    (_gguf_absurd_feed_forward_length, "does not match its weights: it describes 38,400,"),
]


@pytest.mark.parametrize("damage,needle", HOSTILE_GGUF, ids=[d.__name__.strip("_") for d, _ in HOSTILE_GGUF])
def test_hostile_gguf(graphprune, tiny_gguf, tmp_path, monkeypatch, damage, needle):
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(tiny_gguf.read_bytes()))
    before = digest(bad)
    assert_refused(graphprune("inspect", bad), needle)
    assert digest(bad) == before
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


# ONNX: the loader and analyzer of `graphprune inspect`.
def _onnx_with_external_data(directory: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    path = directory / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
              save_as_external_data=True, location="weights.data", size_threshold=0)
    return path


def _point_external_data_at(path: Path, location: str) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, str(path))


@pytest.fixture
def onnx_dir(tmp_path) -> Path:
    directory = tmp_path / "onnx-model"
    directory.mkdir()
    _onnx_with_external_data(directory)
    (tmp_path / "secret.bin").write_bytes(np.full(16, 7, np.float32).tobytes())
    return directory


def test_onnx_with_external_data_inside_its_directory_is_inspected(graphprune, onnx_dir):
    run = graphprune("inspect", onnx_dir / "model.onnx")
    assert run.code == 0, run.err


@pytest.mark.parametrize("location,needle", [
    ("../secret.bin", "outside the model directory"),
    ("sub/../../secret.bin", "outside the model directory"),
    ("SECRET_ABSOLUTE", "not a path relative to the model directory"),
    ("link.data", "outside the model directory"),  # a symlink inside the directory to a file outside it
    ("missing.data", "is missing"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink", "missing"])
def test_onnx_external_data_must_stay_inside_the_model_directory(graphprune, onnx_dir, location, needle):
    secret = onnx_dir.parent / "secret.bin"
    (onnx_dir / "link.data").symlink_to(secret)
    location = str(secret) if location == "SECRET_ABSOLUTE" else location
    _point_external_data_at(onnx_dir / "model.onnx", location)
    before = digest(onnx_dir.parent)
    assert_refused(graphprune("inspect", onnx_dir / "model.onnx"), f"tensor 'w' stores its data in '{location}'", needle)
    assert digest(onnx_dir.parent) == before


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory) -> Path:
    from graphprune.testing.zoo import tiny_cnn

    path = tmp_path_factory.mktemp("onnx") / "cnn.onnx"
    torch.onnx.export(tiny_cnn().eval(), (torch.randn(1, 3, 16, 16),), str(path), dynamo=True, optimize=False)
    return path


def _onnx_dangling_input(data: bytes) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Add", ["x", "undefined"], ["z"])], "broken",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


HOSTILE_ONNX = [
    (_truncate, "is not a readable ONNX model"),
    (_random_bytes, "is not a readable ONNX model"),
    (_onnx_dangling_input, "is not a valid ONNX model: Nodes in a graph must be topologically sorted, however input "
                           "'undefined' of node: name: OpType: Add"),
]


@pytest.mark.parametrize("damage,needle", HOSTILE_ONNX, ids=[d.__name__.strip("_") for d, _ in HOSTILE_ONNX])
def test_hostile_onnx(graphprune, cnn_onnx, tmp_path, damage, needle):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(damage(cnn_onnx.read_bytes()))
    before = digest(bad)
    assert_refused(graphprune("inspect", bad), needle)
    assert digest(bad) == before


# --- arguments -------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (["--sparsity", "0"], "strictly between 0 and 1"),
    (["--sparsity", "1"], "strictly between 0 and 1"),
    (["--sparsity", "-0.2"], "strictly between 0 and 1"),
    (["--sparsity", "nan"], "strictly between 0 and 1"),
    (["--sparsity", "inf"], "strictly between 0 and 1"),
    (["--sparsity", "30%"], "'30%' is not a number"),
    (["--nsamples", "many"], "'many' is not an integer"),
    (["--seqlen", "0"], "must be at least 1"),
    (["--round-to", "2.5"], "'2.5' is not an integer"),
    (["--seed", "x"], "invalid int value"),
    (["--criterion", "wanda_sp"], "did you mean 'wanda-sp'"),
    (["--criterion", "magnitud"], "did you mean 'magnitude'"),
    (["--allocation", "everywhere"], "invalid choice"),
    (["--target", "layers"], "unknown --target 'layers'"),
    (["--compensate", "all"], "invalid choice"),
]


@pytest.mark.parametrize("args,needle", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments(graphprune, model_dir, tmp_path, args, needle):
    out = tmp_path / "out"
    before = digest(model_dir)
    assert_refused(graphprune("compress", model_dir, "--out", out, *args), needle)
    assert digest(model_dir) == before
    assert_no_output(out)


def test_malformed_values_are_one_line_usage_errors(graphprune, model_dir, tmp_path):
    line = assert_refused(graphprune("compress", model_dir, "--out", tmp_path / "o", "--sparsity", "half"))
    assert line == "graphprune compress: error: argument --sparsity: 'half' is not a number (see --help)"


# --- calibration data ---------------------------------------------------------------------------------

BAD_CALIBRATION = [
    (b"", "is empty"),
    (b"   \n\n", "is empty"),
    (b"\x00\x01\x02\xff" * 100, "looks binary"),
    ("caf\u00e9 ".encode("latin-1") * 200, "is not UTF-8 text"),
    (b"short text", "tokens"),
]


@pytest.mark.parametrize("content,needle", BAD_CALIBRATION, ids=["empty", "blank", "binary", "latin-1", "short"])
def test_bad_calibration_file(graphprune, model_dir, tmp_path, content, needle):
    bad = tmp_path / "calib.txt"
    bad.write_bytes(content)
    out = tmp_path / "out"
    before = digest(model_dir), digest(bad)
    run = graphprune("compress", model_dir, "--criterion", "wanda-sp", "--calib", bad, "--nsamples", "4",
                     "--seqlen", "64", "--out", out, "--quiet")
    assert_refused(run, needle)
    assert (digest(model_dir), digest(bad)) == before
    assert_no_output(out)


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_calibration_path_that_is_not_a_file(graphprune, model_dir, tmp_path, kind):
    path = tmp_path / "calib"
    if kind == "directory":
        path.mkdir()
    run = graphprune("compress", model_dir, "--criterion", "flap", "--calib", path, "--out", tmp_path / "out",
                     "--quiet")
    assert_refused(run, "does not exist" if kind == "missing" else "is a directory")
    assert_no_output(tmp_path / "out")


# --- the output location -------------------------------------------------------------------------------


def test_output_that_overlaps_the_input(graphprune, model_dir, tmp_path):
    before = digest(model_dir)
    for out in (model_dir, model_dir / "pruned", model_dir.parent):
        assert_refused(graphprune(*compress_args(model_dir, out)), "overlaps the input")
    assert digest(model_dir) == before
    assert not (model_dir / "pruned").exists()


def test_existing_output_is_kept_without_force(graphprune, model_dir, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "mine.txt").write_text("keep me")
    assert_refused(graphprune(*compress_args(model_dir, occupied)), "is not empty; pass --force")
    assert [p.name for p in occupied.iterdir()] == ["mine.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("keep me too")
    assert_refused(graphprune(*compress_args(model_dir, a_file)), "exists and is not a directory")
    assert a_file.read_text() == "keep me too"
    # a missing parent is created (mkdir -p), a file in the way of one is not replaced
    assert graphprune(*compress_args(model_dir, tmp_path / "new" / "parents" / "out")).code == 0
    assert (tmp_path / "new" / "parents" / "out" / "config.json").is_file()
    assert_refused(graphprune(*compress_args(model_dir, a_file / "below" / "out")), "is not a directory")
    assert a_file.read_text() == "keep me too"


def test_disk_too_small_is_refused_before_any_work(graphprune, model_dir, tmp_path):
    out = tmp_path / "out"
    before = digest(model_dir)
    no_work = faults.faulty_backend(groups_error=AssertionError("the run should have stopped before this"))
    with faults.disk_free(4096), faults.use_backend(no_work):
        assert_refused(graphprune(*compress_args(model_dir, out)), "not enough free disk space", "0.0 MB free")
    assert digest(model_dir) == before
    assert_no_output(out)


def test_disk_full_at_save_time_writes_nothing(model_dir, tmp_path):
    model = tiny_llama()
    out = tmp_path / "out"
    with faults.disk_free(100_000), \
            pytest.raises(OutputError, match=r"not enough free disk space .* 0.1 MB free; nothing was written"):
        save_pruned(model, out)
    assert_no_output(out)


def test_disk_full_while_writing_leaves_no_partial_output(graphprune, model_dir, tmp_path, monkeypatch):
    """The disk fills up half way through the weights file (ENOSPC from the writer)."""
    import transformers.modeling_utils as modeling_utils

    def half_then_enospc(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(modeling_utils, "safe_save_file", half_then_enospc)
    out = tmp_path / "out"
    before = digest(model_dir)
    assert_refused(graphprune(*compress_args(model_dir, out)), f"could not write {out}: No space left on device",
                   "nothing was written")
    assert digest(model_dir) == before
    assert_no_output(out)


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_file_size_limit_while_writing_leaves_no_partial_output(model_dir, tmp_path):
    """A real write failure from the kernel: the process may not write files over 100 kB, and the
    pruned weights are about 300 kB."""
    out = tmp_path / "out"
    before = digest(model_dir)
    child = subprocess.run([sys.executable, "-m", "graphprune", *map(str, compress_args(model_dir, out, "--no-cache"))],
                           capture_output=True, text=True, env=ENV, timeout=300, preexec_fn=_limit_file_size)
    assert_refused(Run(child.returncode, child.stdout, child.stderr), f"could not write {out}: File too large")
    assert digest(model_dir) == before
    assert_no_output(out)


def _user_files(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mine.txt").write_text("keep me")
    (directory / "sub").mkdir(exist_ok=True)
    (directory / "sub" / "notes.txt").write_text("and me")
    return directory


@pytest.mark.parametrize("out", ["", " ", "."], ids=["empty", "blank", "dot"])
def test_force_never_replaces_the_current_directory(graphprune, model_dir, tmp_path, monkeypatch, out):
    """`--out "$OUT" --force` with OUT unset once wiped the working directory and put the model there."""
    home = _user_files(tmp_path / "home")
    monkeypatch.chdir(home)
    before = digest(home)
    line = assert_refused(graphprune(*compress_args(model_dir, out, "--force")))
    assert ("--out is empty" in line) if not out.strip() else ("is the current directory" in line), line
    assert digest(home) == before


def test_force_replaces_only_what_graphprune_wrote(graphprune, model_dir, tmp_path, monkeypatch):
    theirs = _user_files(tmp_path / "theirs")
    before = digest(theirs)
    assert_refused(graphprune(*compress_args(model_dir, theirs, "--force")), "was not written by graphprune",
                   "remove it yourself or choose another --out")
    assert digest(theirs) == before
    # the home directory, a parent of the working directory and / are refused before anything else
    monkeypatch.setenv("HOME", str(theirs))
    assert_refused(graphprune(*compress_args(model_dir, theirs, "--force")), "is your home directory")
    monkeypatch.chdir(theirs / "sub")
    assert_refused(graphprune(*compress_args(model_dir, theirs, "--force")), "is your home directory")
    assert_refused(graphprune(*compress_args(model_dir, "..", "--force")), "is your home directory")
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    assert_refused(graphprune(*compress_args(model_dir, "..", "--force")), "a parent of it")
    assert_refused(graphprune(*compress_args(model_dir, "/", "--force")), "filesystem root")
    assert digest(theirs) == before
    # graphprune's own output is replaced
    ours = tmp_path / "ours"
    assert graphprune(*compress_args(model_dir, ours)).code == 0
    (ours / "extra.txt").write_text("left by the user in graphprune's output")
    assert graphprune(*compress_args(model_dir, ours, "--force")).code == 0
    assert not (ours / "extra.txt").exists() and (ours / "graphprune_report.json").is_file()


def _move_external_data(model: Path, location: str) -> None:
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    entry = next(e for e in proto.graph.initializer[0].external_data if e.key == "location")
    (model.parent / entry.value).rename(model.parent / location)
    entry.value = location
    onnx.save(proto, str(model))


def test_onnx_output_never_lands_on_a_file_the_input_reads(graphprune, onnx_dir, tmp_path):
    """Writing the pruned model over the input's external data once left an input that outputs NaN."""
    model = onnx_dir / "model.onnx"

    def compress(out):
        return graphprune("compress", model, "--criterion", "magnitude", "--sparsity", "0.3", "--out", out,
                          "--force", "--quiet")

    _move_external_data(model, "weights.onnx")
    before = digest(onnx_dir)
    assert_refused(compress(onnx_dir / "weights.onnx"), "is a file the input reads (weights.onnx)")
    assert_refused(compress(model), "is a file the input reads (model.onnx)")
    assert digest(onnx_dir) == before
    # an output whose own external data file (`<name>_data`) would be the input's
    _move_external_data(model, "pruned.onnx_data")
    before = digest(onnx_dir)
    assert_refused(compress(onnx_dir / "pruned.onnx"), "is a file the input reads (pruned.onnx_data)")
    assert digest(onnx_dir) == before
    # an existing .onnx file that graphprune did not write is not replaced
    theirs = tmp_path / "theirs.onnx"
    theirs.write_bytes(model.read_bytes())
    assert_refused(compress(theirs), "was not written by graphprune")
    assert theirs.read_bytes() == model.read_bytes()
    assert digest(onnx_dir) == before


def test_existing_output_survives_a_failed_forced_write(graphprune, model_dir, tmp_path, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    occupied = tmp_path / "occupied"
    assert graphprune(*compress_args(model_dir, occupied)).code == 0
    (occupied / "mine.txt").write_text("keep me")
    kept = sorted(p.name for p in occupied.iterdir())

    def enospc(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(modeling_utils, "safe_save_file", enospc)
    assert_refused(graphprune(*compress_args(model_dir, occupied, "--force")), "No space left on device")
    assert sorted(p.name for p in occupied.iterdir()) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]


def test_unwritable_calibration_cache_only_warns(graphprune, model_dir, calib, tmp_path, monkeypatch):
    not_a_directory = tmp_path / "cache-is-a-file"
    not_a_directory.write_text("")
    monkeypatch.setenv("GRAPHPRUNE_CALIB_CACHE", str(not_a_directory))
    out = tmp_path / "out"
    run = graphprune("compress", model_dir, "--criterion", "flap", "--calib", calib, "--nsamples", "4", "--seqlen",
                     "32", "--out", out, "--quiet")
    assert run.code == 0, run.err
    assert run.error_lines == [f"graphprune: warning: calibration statistics not cached in {not_a_directory}: "
                               f"[Errno 17] File exists: '{not_a_directory}'"]
    assert (out / "model.safetensors").is_file()


# --- the input is only read ------------------------------------------------------------------------


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_audited: dict[str, list] = {}


def _audit(event: str, args: tuple) -> None:
    """Record Python-level opens and file changes under the watched directory (audit hooks cannot be
    removed, so this one does nothing unless a test has set a directory to watch)."""
    root = _audited.get("root")
    if root is None:
        return
    if event == "open":
        path, mode, flags = args
        if isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(root):
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
            _audited["opens"].append((os.fsdecode(path), mode, flags, writes))
    elif event in ("os.remove", "os.rename", "os.replace", "os.chmod", "os.utime", "os.mkdir", "os.truncate",
                   "shutil.rmtree", "shutil.move", "os.symlink", "os.link"):
        if any(isinstance(a, (str, os.PathLike)) and os.fsdecode(a).startswith(root) for a in args):
            _audited["changes"].append((event, args))


sys.addaudithook(_audit)


def test_the_input_is_only_ever_opened_for_reading(graphprune, model_dir, calib, tmp_path):
    stat_before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in model_dir.iterdir()}
    before = digest(model_dir)
    _audited.update(root=str(model_dir), opens=[], changes=[])
    try:
        run = graphprune("compress", model_dir, "--criterion", "flap", "--calib", calib, "--nsamples", "4",
                         "--seqlen", "32", "--out", tmp_path / "out", "--quiet")
    finally:
        audited = dict(_audited)
        _audited["root"] = None
    assert run.code == 0, run.err
    assert audited["opens"], "the audit hook saw no open of the input at all"
    assert [o for o in audited["opens"] if o[3]] == []
    assert audited["changes"] == []
    assert digest(model_dir) == before
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in model_dir.iterdir()} == stat_before


# --- ops without a rule, validation and bugs -----------------------------------------------------------


@torch.library.custom_op("graphprune_reliability::scramble", mutates_args=())
def scramble(x: torch.Tensor) -> torch.Tensor:
    """An activation graphprune has no dimension rule for (it mixes channels)."""
    return torch.nn.functional.silu(x).flip(-1)


@scramble.register_fake
def _(x):
    return torch.empty_like(x)


class Scramble(nn.Module):
    def forward(self, x):
        return scramble(x)


def _loaded_with_scramble(model_dir: Path, layers: list[int]):
    from graphprune.models import load_model

    loaded = load_model(model_dir)
    for index in layers:
        loaded.model.model.layers[index].mlp.act_fn = Scramble()
    return loaded


def test_op_without_a_rule_blocks_its_groups_and_is_named(graphprune, model_dir, tmp_path, monkeypatch):
    loaded = _loaded_with_scramble(model_dir, [0])
    out = tmp_path / "out"
    with faults.use_backend(faults.preloaded(loaded)):
        run = graphprune("compress", model_dir, "--criterion", "magnitude", "--target", "channels", "--out", out,
                         "--quiet")
    assert run.code == 0, run.err
    assert ("note: 2 group(s) were left unpruned because an op has no dimension rule, e.g. "
            "model.layers.0.mlp.gate_proj (channel): blocked by graphprune_reliability.scramble.default at "
            "model.layers.0.mlp.act_fn") in run.out
    report = json.loads((out / "graphprune_report.json").read_text())
    assert report["kept_units"]["channel"] == {"1": report["kept_units"]["channel"]["1"]}  # layer 0 untouched
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 96  # layer 0, the base of the per-layer overrides
    assert config["graphprune_layer_overrides"]["1"]["intermediate_size"] < 96


def test_op_without_a_rule_everywhere_refuses_and_names_it(graphprune, model_dir, tmp_path, monkeypatch):
    loaded = _loaded_with_scramble(model_dir, [0, 1])
    out = tmp_path / "out"
    with faults.use_backend(faults.preloaded(loaded)):
        run = graphprune("compress", model_dir, "--criterion", "magnitude", "--target", "channels", "--out", out)
    assert_refused(run, "no prunable channels groups: blocked by graphprune_reliability.scramble.default at "
                        "model.layers.")
    assert_no_output(out)


def test_a_rewrite_that_breaks_the_model_fails_validation_and_writes_nothing(graphprune, model_dir, tmp_path):
    out = tmp_path / "out"
    before = digest(model_dir)
    with faults.use_backend(faults.faulty_backend(poison="model.norm.weight")):
        line = assert_refused(graphprune(*compress_args(model_dir, out)), code=1)
    assert line == "graphprune: validation failed: the pruned model produces NaN/Inf outputs; nothing was written"
    assert digest(model_dir) == before
    assert_no_output(out)


def test_a_bug_is_reported_as_a_bug(graphprune, model_dir, tmp_path):
    out = tmp_path / "out"
    with faults.use_backend(faults.faulty_backend(apply_error=KeyError("oops"))):
        line = assert_refused(graphprune(*compress_args(model_dir, out)), code=1)
        assert line == ("graphprune: internal error: KeyError: 'oops' -- this is a bug in graphprune; rerun with "
                        "--debug for the traceback and report it")
        with pytest.raises(KeyError, match="oops"):  # --debug lets the traceback through
            graphprune("--debug", *compress_args(model_dir, out))
    assert_no_output(out)


# --- determinism ---------------------------------------------------------------------------------------


def test_same_inputs_and_seed_give_byte_identical_outputs(graphprune, model_dir, calib, tmp_path, monkeypatch):
    """The second run reads the calibration statistics the first one cached: still the same bytes.
    Only graphprune_run.json (wall times, peak memory, cache hit or miss) may differ."""
    monkeypatch.setenv("GRAPHPRUNE_CALIB_CACHE", str(tmp_path / "cache"))
    outs = [tmp_path / "first", tmp_path / "second"]
    for out in outs:
        run = graphprune("compress", model_dir, "--criterion", "flap", "--calib", calib, "--nsamples", "8",
                         "--seqlen", "32", "--seed", "3", "--out", out, "--quiet")
        assert run.code == 0, run.err
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir())
    assert {"model.safetensors", "config.json", "graphprune_report.json", "graphprune_run.json"} <= set(files)
    for name in files:
        if name != "graphprune_run.json":
            assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    runs = [json.loads((out / "graphprune_run.json").read_text()) for out in outs]
    assert [r["calibration_cache"] for r in runs] == ["miss", "hit"]
    assert set(runs[0]) == {"calibration_cache", "peak_rss_mb", "timings_s"}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_reported_peak_rss_is_the_process_own_not_a_parents():
    """The report's peak RSS must not carry the peak of the process that started it (Linux keeps a
    parent's peak in ru_maxrss across fork + exec)."""
    ballast = np.ones(1536 * 2**20 // 8)  # 1.5 GB touched in this (the parent) process
    child = subprocess.run([sys.executable, "-c", "import resource\n"
                            "from graphprune.pipeline.report import peak_rss_mb\n"
                            "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                           capture_output=True, text=True, check=True)
    own, _ru_maxrss = map(float, child.stdout.split())
    del ballast
    assert own < 1200  # torch and graphprune imported: a few hundred MB, not the parent's 1.5 GB


# --- issue 24: the calibration cache, paths and tensors read from model files, text files, export checks ---
# (defects 3, 4, 5, 7, 10, 12, 13 and 14; docs/reliability.md rows 64-83)


def _flap(model: Path, calib_path: Path, out: Path, *extra) -> list:
    return ["compress", model, "--criterion", "flap", "--calib", calib_path, "--nsamples", "8", "--seqlen", "32",
            "--out", out, "--quiet", *extra]


def _run_record(out: Path) -> dict:
    return json.loads((out / "graphprune_run.json").read_text())


def test_an_edited_calibration_file_is_not_answered_from_the_cache(graphprune, model_dir, tmp_path, monkeypatch):
    """The cache was keyed on the calibration file's path: edit the file, rerun, and the statistics of
    its old content were used (other kept channels than a --no-cache run)."""
    from graphprune.calibration.text import default_calibration_text
    from graphprune.testing.fixtures import SAMPLE_TEXT

    monkeypatch.setenv("GRAPHPRUNE_CALIB_CACHE", str(tmp_path / "cache"))
    calib_path = tmp_path / "calib.txt"
    calib_path.write_text(SAMPLE_TEXT * 40, encoding="utf-8")
    assert graphprune(*_flap(model_dir, calib_path, tmp_path / "old")).code == 0
    calib_path.write_text(default_calibration_text()[:20_000], encoding="utf-8")
    before = digest(model_dir), digest(calib_path)
    for out, extra in ((tmp_path / "cached", ()), (tmp_path / "fresh", ("--no-cache",))):
        run = graphprune(*_flap(model_dir, calib_path, out, *extra))
        assert run.code == 0 and run.error_lines == [], run.err
    assert (digest(model_dir), digest(calib_path)) == before
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in ("old", "cached", "fresh")}
    assert weights["old"] != weights["fresh"]  # the two texts keep other channels: the test can tell
    assert weights["cached"] == weights["fresh"]
    assert _run_record(tmp_path / "cached")["calibration_cache"] == "miss"
    report = json.loads((tmp_path / "cached" / "graphprune_report.json").read_text())
    assert len(report["calibration"]["sha256"]) == 64  # the report names the content it calibrated on


def test_another_model_never_gets_this_models_statistics(graphprune, model_dir, model_copy, calib, tmp_path,
                                                        monkeypatch):
    """The weights' identity was 16 sampled values per tensor: a model differing elsewhere shared statistics."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("GRAPHPRUNE_CALIB_CACHE", str(tmp_path / "cache"))
    weights = load_file(model_copy / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][0, 1] += 0.5  # not one of the 16 sampled values
    save_file(weights, model_copy / "model.safetensors", metadata={"format": "pt"})
    assert graphprune(*_flap(model_dir, calib, tmp_path / "a")).code == 0
    assert graphprune(*_flap(model_copy, calib, tmp_path / "b")).code == 0
    assert _run_record(tmp_path / "b")["calibration_cache"] == "miss"
    assert graphprune(*_flap(model_copy, calib, tmp_path / "c")).code == 0
    assert _run_record(tmp_path / "c")["calibration_cache"] == "hit"


def _cache_entry_tensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as opened:
        return {k: opened.get_tensor(k) for k in opened.keys()}, opened.metadata() or {}


def _first_sum(tensors: dict) -> str:
    return sorted(k for k in tensors if k.endswith("/sum"))[0]


def _changed_values(path: Path) -> None:
    """Readable and well formed, but the values differ from what was computed (checksum kept)."""
    from safetensors.torch import save_file

    tensors, metadata = _cache_entry_tensors(path)
    tensors[_first_sum(tensors)] = tensors[_first_sum(tensors)] * 3
    save_file(tensors, str(path), metadata=metadata)


def _rewritten(change):
    """The entry rewritten through the cache itself (so its checksum verifies) with `change` applied."""

    def damage(path: Path) -> None:
        from graphprune.calibration.cache import write_cache_tensors

        tensors, _ = _cache_entry_tensors(path)
        change(tensors)
        write_cache_tensors(path.stem, tensors)

    return damage


CACHE_DAMAGE = {
    "changed-values": (_changed_values, "its checksum does not match its content"),
    "missing-tensor": (_rewritten(lambda t: t.pop(_first_sum(t))), "no tensor 'in/"),
    "wrong-shape": (_rewritten(lambda t: t.update({_first_sum(t): t[_first_sum(t)][:-1]})), "have shapes"),
    "not-safetensors": (lambda path: path.write_bytes(b"not a cache entry"), "unreadable"),
}


@pytest.mark.parametrize("damage", CACHE_DAMAGE, ids=list(CACHE_DAMAGE))
def test_a_damaged_calibration_cache_entry_is_recomputed_with_a_notice(graphprune, model_dir, calib, tmp_path,
                                                                       monkeypatch, damage):
    """Damaged but readable entries were trusted (changed values used silently; a missing tensor or a
    wrong shape was an internal error). Now an entry carries a checksum and what does not verify is
    recomputed after one warning line: the output is that of an undamaged run."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("GRAPHPRUNE_CALIB_CACHE", str(cache))
    assert graphprune(*_flap(model_dir, calib, tmp_path / "first")).code == 0
    [entry] = cache.glob("*.safetensors")
    harm, needle = CACHE_DAMAGE[damage]
    harm(entry)
    before = digest(model_dir), digest(calib)
    run = graphprune(*_flap(model_dir, calib, tmp_path / "second"))
    assert run.code == 0, run.err
    assert len(run.error_lines) == 1 and "Traceback" not in run.err, run.err
    line = run.error_lines[0]
    assert line.startswith(f"graphprune: warning: calibration cache entry {entry} is damaged (") and needle in line
    assert line.endswith("; recomputing it"), line
    assert (digest(model_dir), digest(calib)) == before
    first, second = ((tmp_path / name / "model.safetensors").read_bytes() for name in ("first", "second"))
    assert first == second
    assert _run_record(tmp_path / "second")["calibration_cache"] == "miss"
    run = graphprune(*_flap(model_dir, calib, tmp_path / "third"))  # the recomputed entry replaced the damaged one
    assert run.code == 0 and run.error_lines == [] and _run_record(tmp_path / "third")["calibration_cache"] == "hit"


@pytest.mark.parametrize("value", ["", "  "], ids=["empty", "blank"])
def test_an_empty_cache_variable_never_writes_into_the_current_directory(graphprune, model_dir, calib, tmp_path,
                                                                         monkeypatch, value):
    """`GRAPHPRUNE_CACHE=` (a variable that expanded to nothing) put calibration/ into the working directory."""
    work = _user_files(tmp_path / "work")
    home = tmp_path / "home"
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("GRAPHPRUNE_CALIB_CACHE", raising=False)
    monkeypatch.setenv("GRAPHPRUNE_CACHE", value)
    before = digest(work)
    run = graphprune(*_flap(model_dir, calib, tmp_path / "out"))
    assert run.code == 0, run.err
    assert digest(work) == before
    assert list((home / ".cache" / "graphprune" / "calibration").glob("*.safetensors"))


def _fewer_layers(model: Path) -> None:
    _set_config(model, num_hidden_layers=1)


def _extra_tensor(model: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    weights["model.extra_scale"] = torch.ones(4)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})


UNDESCRIBED = [
    (_fewer_layers, "9 tensor(s) in the weights are not part of the model it describes (model.layers.1.input_layernorm"
                    ".weight, model.layers.1.mlp.down_proj.weight, model.layers.1.mlp.gate_proj.weight, ...)"),
    (_extra_tensor, "1 tensor(s) in the weights are not part of the model it describes (model.extra_scale)"),
]


@pytest.mark.parametrize("change,needle", UNDESCRIBED, ids=["fewer-layers", "extra-tensor"])
def test_weights_the_config_does_not_describe_are_refused(graphprune, model_copy, tmp_path, change, needle):
    """They were dropped silently: exit 0 with a truncated model."""
    change(model_copy)
    before, out = digest(model_copy), tmp_path / "out"
    for args in (("inspect", model_copy), compress_args(model_copy, out)):
        assert_refused(graphprune(*args), "config.json in", "does not match its weights", needle,
                       "they would be dropped, so the model is refused")
    assert digest(model_copy) == before
    assert_no_output(out)


def _index_pointing_at(location: str):
    def build(tmp_path: Path) -> tuple[Path, list]:
        model = tmp_path / "sharded"
        tiny_llama().save_pretrained(model, max_shard_size="50KB")
        byte_level_tokenizer_dir = save_tiny_llama(tmp_path / "tok")  # a tokenizer for compress
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(byte_level_tokenizer_dir / name, model / name)
        index_path = model / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        first = sorted(set(index["weight_map"].values()))[0]
        index["weight_map"] = {k: (location if v == first else v) for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index))
        return model, [("inspect", model), compress_args(model, tmp_path / "out"),
                       compress_args(model, tmp_path / "out", "--stream")]
    return build


def _sentence_transformers_module(index: int, location: str):
    def build(tmp_path: Path) -> tuple[Path, list]:
        from graphprune.testing.encoders import save_tiny_sentence_transformer

        root = save_tiny_sentence_transformer(tmp_path / "st")
        save_tiny_llama(tmp_path / "victim")
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "config.json").write_text('{"pooling_mode_cls_token": true}')
        modules = json.loads((root / "modules.json").read_text())
        modules[index]["path"] = location
        (root / "modules.json").write_text(json.dumps(modules))
        return root, ([("inspect", root)] if index == 0 else []) + [compress_args(root, tmp_path / "out")]
    return build


OUTSIDE_PATHS = [
    (_index_pointing_at("../../../../../../../../../../../../etc/passwd"),
     "model.safetensors.index.json names '../../../../../../../../../../../../etc/passwd', which is outside the "
     "model directory"),
    (_index_pointing_at("/etc/passwd"),
     "model.safetensors.index.json names '/etc/passwd', which is not a path relative to the model directory"),
    (_sentence_transformers_module(0, "../victim"),
     "modules.json names '../victim', which is outside the model directory"),
    (_sentence_transformers_module(1, "../elsewhere"),
     "modules.json names '../elsewhere', which is outside the model directory"),
]


@pytest.mark.parametrize("build,needle", OUTSIDE_PATHS,
                         ids=["index-etc-passwd", "index-absolute", "st-transformer", "st-pooling"])
def test_paths_read_from_model_files_stay_inside_the_model_directory(graphprune, tmp_path, build, needle):
    """An index whose weight_map named ../../etc/passwd got that file opened (its first 8 bytes came back
    in the error); a modules.json pointing outside the folder made graphprune load and prune another
    model. Every path read from a file now follows the rule ONNX external data has (`io.paths.check_inside`)."""
    model, commands = build(tmp_path)
    before = digest(tmp_path)
    for args in commands:
        line = assert_refused(graphprune(*args), needle, "refusing to read it")
        assert "root:" not in line
    assert digest(tmp_path) == before
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("dtype,stored", [(torch.int8, "I8"), (torch.bool, "BOOL")], ids=["int8", "bool"])
def test_integer_weights_are_refused_not_cast_to_float(graphprune, model_copy, tmp_path, dtype, stored):
    """A checkpoint's integer or boolean tensors were cast to float and pruned as weights."""
    from safetensors.torch import load_file, save_file

    name = "model.layers.0.mlp.down_proj.weight"
    weights = load_file(model_copy / "model.safetensors")
    weights[name] = (weights[name] * 100).to(dtype)
    save_file(weights, model_copy / "model.safetensors", metadata={"format": "pt"})
    before, out = digest(model_copy), tmp_path / "out"
    for args in (("inspect", model_copy), compress_args(model_copy, out)):
        assert_refused(graphprune(*args), f"store {name} as {stored}, but LlamaForCausalLM holds it as float32",
                       "would be cast to floating point and pruned as weights; refusing to load it")
    assert digest(model_copy) == before
    assert_no_output(out)


def _fifo_with_a_writer(path: Path):
    """A FIFO, and a writer that opens and closes it so that a reader which (wrongly) opens it gets end
    of file rather than hanging the test; `release` lets the writer go when nobody read."""
    import threading

    os.mkfifo(path)

    def write():
        with open(path, "wb"):
            pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()

    def release():
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        writer.join(10)
        os.close(descriptor)

    return release


def _at_most_4_gib() -> None:
    """The child may not map more than 4 GiB: a regression that reads /dev/zero ends in MemoryError
    there instead of the kernel's OOM killer picking a process on a shared machine."""
    resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="POSIX FIFOs and devices")
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
@pytest.mark.parametrize("command", ["compress", "eval"])
def test_calibration_path_that_is_not_a_regular_file(graphprune, model_dir, tmp_path, kind, command):
    """A FIFO hung forever; /dev/zero was read until memory ran out (that case runs in a child process
    limited to 4 GiB of address space)."""
    out = tmp_path / "out"
    path = tmp_path / "calib.txt" if kind == "fifo" else Path("/dev/zero")
    args = (_flap(model_dir, path, out) if command == "compress" else
            ["eval", model_dir, "--data", path, "--quiet", "--seqlen", "16", "--windows", "2"])
    if kind == "fifo":
        release = _fifo_with_a_writer(path)
        try:
            assert_refused(graphprune(*args), "calib.txt is a named pipe (FIFO), not a regular file")
        finally:
            release()
    else:
        child = subprocess.run([sys.executable, "-m", "graphprune", *map(str, args)], capture_output=True, text=True,
                               env=ENV, timeout=300, preexec_fn=_at_most_4_gib)
        assert_refused(Run(child.returncode, child.stdout, child.stderr),
                       "graphprune: error: calibration file /dev/zero is a character device, not a regular file")
    assert_no_output(out)


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts bytes read through Linux's /proc/self/io")
def test_a_huge_calibration_file_is_never_read_whole(graphprune, model_dir, tmp_path):
    """A 2 GB file was read whole to be rejected. Here 1 GiB (text, then a sparse hole of NUL bytes):
    refused having read at most the 32 MiB graphprune reads of any text file (`text.MAX_TEXT_BYTES`)."""
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as file:
        file.write(b"some calibration text\n" * 1000)
        file.truncate(2**30)

    def bytes_read() -> int:
        return int(next(line.split()[1] for line in Path("/proc/self/io").read_text().splitlines()
                        if line.startswith("rchar:")))

    before, out = bytes_read(), tmp_path / "out"
    assert_refused(graphprune(*_flap(model_dir, huge, out)), "huge.txt looks binary (it contains NUL bytes)")
    assert bytes_read() - before < 48 * 2**20  # the limit, the model and a few modules imported on the way
    assert_no_output(out)


def test_a_calibration_file_over_the_read_limit_is_used_in_part_and_the_user_is_told(graphprune, model_dir, calib,
                                                                                    tmp_path):
    """Of a file larger than graphprune reads (32 MiB; 3 kB here through the seam) its beginning is used."""
    out = tmp_path / "out"
    with faults.text_read_limit(3000):
        run = graphprune(*_flap(model_dir, calib, out, "--no-cache"))
    assert run.code == 0, run.err
    assert run.error_lines == [f"graphprune: warning: calibration file {calib} holds {calib.stat().st_size:,} bytes; "
                               f"reading only its first 3,000 (more than any calibration set or evaluation needs)"]
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("atol", ["nan", "inf", "0", "-1e-4"])
def test_the_export_parity_check_cannot_be_switched_off(graphprune, model_dir, tmp_path, atol):
    """`export --atol nan` passed every parity check."""
    out = tmp_path / "out"
    before = digest(model_dir)
    assert_refused(graphprune("export", model_dir, "--out", out, f"--atol={atol}"),
                   f"graphprune: error: --atol must be a finite number greater than 0, got {float(atol)!r}")
    assert digest(model_dir) == before
    assert_no_output(out)


def test_exporting_a_model_with_non_finite_weights_is_a_user_error(graphprune, model_copy, tmp_path):
    """It ended in a failed parity check, exit 1, where compress says exit 2 for the same model."""
    from safetensors.torch import load_file, save_file

    weights = load_file(model_copy / "model.safetensors")
    weights["model.layers.1.self_attn.o_proj.weight"][3, 5] = float("nan")
    save_file(weights, model_copy / "model.safetensors", metadata={"format": "pt"})
    before, out = digest(model_copy), tmp_path / "out"
    assert_refused(graphprune("export", model_copy, "--out", out),
                   "graphprune: error: the input model is broken: model.layers.1.self_attn.o_proj.weight holds 1 "
                   "NaN/Inf value(s); refusing to export it")
    assert digest(model_copy) == before
    assert_no_output(out)
