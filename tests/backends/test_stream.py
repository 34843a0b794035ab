"""Streaming compress (`graphprune.backends.stream`): a checkpoint pruned layer by layer from disk gives the
in-memory result, resumes after a crash to the same bytes, and refuses what it cannot do in one
line without leaving anything behind."""

import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from graphprune.errors import OutputError, UserError
from graphprune.io.hf import load_pruned, save_pruned
from graphprune.backends.stream import StreamingUnsupported
from graphprune.pipeline.run import compress, compress_streaming
from graphprune.backends.stream.sweeps import CRASH_ENV
from graphprune.testing.fixtures import byte_level_tokenizer, tiny_llama, write_sample_text

CALIB = dict(nsamples=8, seqlen=32)
RUN_FILE = "graphprune_run.json"  # timings: the one file that may differ between equal runs


def save_model(directory: Path, *, dtype=torch.float32, max_shard_size=None, **kwargs) -> Path:
    model = tiny_llama(layers=3, **kwargs).to(dtype)
    model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    byte_level_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return str(write_sample_text(tmp_path_factory.mktemp("data") / "calib.txt"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"gqa": save_model(root / "gqa"), "tied": save_model(root / "tied", tied=True, seed=1)}


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != RUN_FILE}


# ----------------------------------------------------------------------------- same result as in memory
@pytest.mark.parametrize("model,criterion,allocation,target,extra", [
    ("gqa", "flap", "global", None, {"compensate": "bias"}),
    ("tied", "flap", "uniform", None, {"compensate": "bias"}),
    ("gqa", "wanda-sp", "global", "channels,query-heads", {"compensate": "none"}),
    ("gqa", "magnitude", "uniform", None, {"compensate": "none"}),
    ("gqa", "cfsp", "cfsp", "channels", {"compensate": "bias"}),
    # least squares, --sequential and structured OBS with the loss-Fisher ranking, layer by layer
    ("gqa", None, "global", None, {}),  # the default pipeline: obs + least squares + --sequential
    ("tied", "obs", "uniform", None, {}),
    ("gqa", "flap", "global", None, {"compensate": "lsq"}),
    ("gqa", "wanda-sp", "uniform", None, {"compensate": "bias", "sequential": True}),
    # gradient criteria: a layer-by-layer backward sweep (calibration.gradients.gradient_terms_by_blocks)
    ("gqa", "fisher", "global", None, {"compensate": "none"}),
    ("tied", "taylor", "uniform", None, {}),  # least squares by default
    ("gqa", "gaprune", "global", None, {"compensate": "bias", "calib_general": "general"}),
])
def test_streaming_equals_in_memory_compress(models, calib, tmp_path, model, criterion, allocation, target, extra):
    if extra.get("calib_general") == "general":  # a second calibration text for the two-set criterion
        extra = {**extra, "calib_general": str(write_sample_text(tmp_path / "general.txt", repeats=30))}
    options = dict(criterion=criterion, sparsity=0.3, allocation=allocation, target=target, calib=calib, **CALIB,
                   **extra)
    memory = compress(str(models[model]), progress=False, use_cache=False, **options)
    save_pruned(memory.model, tmp_path / "memory", report=memory.report)
    streamed = compress_streaming(models[model], tmp_path / "stream", progress=False, **options)

    for key in ("kept_units", "params", "flops_per_token", "floored_groups", "compensate", "uniform_layers",
                "criterion", "layerwise"):
        assert streamed.report[key] == memory.report[key], key
    assert {g: list(r) for g, r in streamed.removed.items()} == {g: list(r) for g, r in memory.removed.items()}
    assert json.loads((tmp_path / "stream" / "config.json").read_text()) == \
        json.loads((tmp_path / "memory" / "config.json").read_text())
    want, got = load_pruned(tmp_path / "memory").state_dict(), load_pruned(tmp_path / "stream").state_dict()
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
    if memory.report["uniform_layers"]:  # plain transformers reloads it too
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
        ids = torch.arange(2, 12)[None]
        torch.testing.assert_close(plain(input_ids=ids).logits, load_pruned(tmp_path / "stream")(input_ids=ids).logits)


def test_output_is_a_sharded_hf_folder_with_the_reports(models, calib, tmp_path):
    result = compress_streaming(models["gqa"], tmp_path / "out", sparsity=0.3, calib=calib, progress=False, **CALIB)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]  # outside + one per layer
    assert set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(load_pruned(out).state_dict())
    report = json.loads((out / "graphprune_report.json").read_text())
    run = json.loads((out / RUN_FILE).read_text())
    assert report["kept_units"] == result.report["kept_units"] and report["streaming"]["layers"] == 3
    assert "timings_s" in run and "timings_s" not in report
    assert not (tmp_path / ".out.partial").exists()


def test_sharded_bf16_checkpoint_keeps_bf16_and_picks_the_in_memory_units(calib, tmp_path):
    model_dir = save_model(tmp_path / "bf16", dtype=torch.bfloat16, max_shard_size="60KB")
    assert (model_dir / "model.safetensors.index.json").exists()
    options = dict(sparsity=0.3, allocation="global", calib=calib, **CALIB)
    streamed = compress_streaming(model_dir, tmp_path / "out", progress=False, **options)
    # in memory the model is upcast to fp32: the same statistics, so the same units
    memory = compress(str(model_dir), progress=False, use_cache=False, **options)
    assert streamed.report["kept_units"] == memory.report["kept_units"]
    from safetensors import safe_open

    for shard in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_shards_without_an_index_are_found_by_their_headers(calib, tmp_path):
    indexed = save_model(tmp_path / "indexed", max_shard_size="60KB")
    bare = save_model(tmp_path / "bare", max_shard_size="60KB")
    (bare / "model.safetensors.index.json").unlink()
    options = dict(sparsity=0.3, calib=calib, progress=False, **CALIB)
    compress_streaming(indexed, tmp_path / "a", **options)
    compress_streaming(bare, tmp_path / "b", **options)
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    reports = [json.loads(files.pop("graphprune_report.json")) for files in (a, b)]
    for files in (a, b):  # the recipe and the model card name the source folder, which differs
        files.pop("graphprune_recipe.yaml"), files.pop("README.md")
    assert [r.pop("model") for r in reports] == ["indexed", "bare"] and reports[0] == reports[1]
    assert a == b


def test_bf16_calibration_runs_and_records_its_precision(models, calib, tmp_path):
    fp32 = compress_streaming(models["gqa"], tmp_path / "fp32", sparsity=0.3, allocation="uniform", calib=calib,
                              progress=False, **CALIB)
    bf16 = compress_streaming(models["gqa"], tmp_path / "bf16", sparsity=0.3, allocation="uniform", calib=calib,
                              dtype="bf16", progress=False, **CALIB)
    assert bf16.report["streaming"]["dtype"] == "bf16"
    # uniform counts do not depend on scores; bf16 activations pick almost the same channels
    assert bf16.report["kept_units"] == fp32.report["kept_units"]
    same = [len(set(fp32.removed[g]) & set(bf16.removed[g])) / len(fp32.removed[g]) for g in fp32.removed
            if len(fp32.removed[g])]
    assert same and sum(same) / len(same) > 0.8
    assert {t.dtype for t in load_pruned(tmp_path / "bf16").state_dict().values()} == {torch.float32}


# ----------------------------------------------------------------------------- resume
FLAP = {"criterion": "flap", "compensate": "bias"}  # the statistics sweep, then the cut sweep
FISHER = {"criterion": "fisher", "compensate": "bias"}  # the gradient sweep first


@pytest.fixture(scope="module")
def uninterrupted(models, calib, tmp_path_factory):
    """Reference outputs of uninterrupted runs: FLAP, and the default (layerwise) pipeline."""
    found = {}
    for name, extra in (("flap", FLAP), ("default", {}), ("fisher", FISHER)):
        out = tmp_path_factory.mktemp("reference") / "out"
        compress_streaming(models["gqa"], out, sparsity=0.3, calib=calib, progress=False, **CALIB, **extra)
        found[name] = files_of(out)
    return found


@pytest.mark.parametrize("pipeline,crash", [("flap", "statistics:1"), ("flap", "statistics:2"), ("flap", "write:-1"),
                                            ("flap", "write:1"), ("default", "write:1"), ("fisher", "statistics:1")])
def test_resume_after_a_crash_gives_the_same_bytes(models, calib, tmp_path, monkeypatch, uninterrupted, pipeline,
                                                   crash):
    out = tmp_path / "out"
    options = dict(sparsity=0.3, calib=calib, progress=False, **CALIB,
                   **{"flap": FLAP, "fisher": FISHER, "default": {}}[pipeline])
    monkeypatch.setenv(CRASH_ENV, crash)
    with pytest.raises(RuntimeError, match="injected crash"):
        compress_streaming(models["gqa"], out, **options)
    monkeypatch.delenv(CRASH_ENV)
    partial = tmp_path / ".out.partial"
    assert partial.is_dir() and not out.exists()
    if pipeline == "fisher":  # the gradient sweep's statistics are kept: the resumed run does not sweep again
        assert any(p.name == "gradients.safetensors" for p in partial.rglob("*"))
    with pytest.raises(OutputError, match="--resume"):  # never silently restarted or reused
        compress_streaming(models["gqa"], out, **options)
    result = compress_streaming(models["gqa"], out, resume=True, **options)
    assert files_of(out) == uninterrupted[pipeline]
    assert not partial.exists()
    done = result.report["stream_run"]["resumed"]
    stage, layer = crash.split(":")
    if stage == "statistics":
        assert done["scored"] == int(layer) and done["written"] == {"layers": 0, "outside": False}
    else:
        assert done["written"] == {"layers": max(int(layer), 0), "outside": layer != "-1"}
        assert done["scored"] == (0 if pipeline == "default" else 3)  # the layerwise pipeline scores on blocks


def test_resume_refuses_a_partial_run_of_other_options(models, calib, tmp_path, monkeypatch, uninterrupted):
    out = tmp_path / "out"
    monkeypatch.setenv(CRASH_ENV, "write:1")
    with pytest.raises(RuntimeError):
        compress_streaming(models["gqa"], out, sparsity=0.3, calib=calib, progress=False, **CALIB)
    monkeypatch.delenv(CRASH_ENV)
    with pytest.raises(OutputError, match=r"sparsity 0\.3 -> 0\.4"):
        compress_streaming(models["gqa"], out, sparsity=0.4, calib=calib, resume=True, progress=False, **CALIB)
    with pytest.raises(OutputError, match="other inputs"):  # another model, same options
        compress_streaming(models["tied"], out, sparsity=0.3, calib=calib, resume=True, progress=False, **CALIB)
    # --force without --resume discards the partial run and starts over
    compress_streaming(models["gqa"], out, sparsity=0.3, calib=calib, force=True, progress=False, **CALIB)
    assert files_of(out) == uninterrupted["default"]


# ----------------------------------------------------------------------------- refusals
def test_refusals_in_the_api(models, calib, tmp_path):
    with pytest.raises(StreamingUnsupported, match="expert_routing"):
        compress_streaming(models["gqa"], tmp_path / "o", target="experts", calib=calib)
    with pytest.raises(StreamingUnsupported, match="hidden"):
        compress_streaming(models["gqa"], tmp_path / "o", target="channels,hidden", calib=calib)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            compress_streaming(models["gqa"], tmp_path / "o", device="cuda", calib=calib)
    with pytest.raises(UserError, match="--dtype"):
        compress_streaming(models["gqa"], tmp_path / "o", dtype="int8", calib=calib)
    with pytest.raises(StreamingUnsupported, match="--out-dtype"):  # not silently ignored
        compress_streaming(models["gqa"], tmp_path / "o", out_dtype="bf16", calib=calib)
    assert list(tmp_path.iterdir()) == []


def cli(capsys, *args) -> tuple[int, str, str]:
    """The command line in this process (the subprocess tests of test_cli.py cover the entry point)."""
    from graphprune.cli.main import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def bad_inputs(models, tmp_path_factory):
    from graphprune.testing.zoo import save_tiny

    root = tmp_path_factory.mktemp("bad")
    sharded = save_model(root / "sharded", max_shard_size="60KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    (sharded / sorted(set(index["weight_map"].values()))[-1]).unlink()
    gguf = root / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    return {"missing shard": (sharded, "is missing"),
            "mixture of experts": (save_tiny("mixtral", root / "moe"), "mixture-of-experts"),
            "encoder": (save_tiny("bert", root / "bert"), "not a decoder language model"),
            "gguf": (gguf, "not GGUF files"),
            "experts target": (models["gqa"], "needs expert_routing of the whole model")}


@pytest.mark.parametrize("case", ["missing shard", "mixture of experts", "encoder", "gguf", "experts target"])
def test_cli_refuses_in_one_line_and_writes_nothing(bad_inputs, tmp_path, capsys, case):
    model, needle = bad_inputs[case]
    extra = ["--target", "experts"] if case == "experts target" else []
    code, _, err = cli(capsys, "compress", model, "--stream", "--out", tmp_path / "out", "--quiet", *extra)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_cli_streams_and_resumes(models, calib, tmp_path, capsys, monkeypatch, uninterrupted):
    args = ["compress", models["gqa"], "--stream", "--out", tmp_path / "out", "--sparsity", "0.3", "--calib", calib,
            "--nsamples", "8", "--seqlen", "32", "--quiet"]
    monkeypatch.setenv(CRASH_ENV, "write:2")
    code, _, err = cli(capsys, *args)
    assert code == 1 and "rerun the same command with --resume" in err
    monkeypatch.delenv(CRASH_ENV)
    code, out, err = cli(capsys, *args, "--resume")
    assert code == 0, err
    assert "streamed 3 layers on cpu (fp32)" in out
    assert files_of(tmp_path / "out") == uninterrupted["default"]


# ----------------------------------------------------------------------------- when streaming is chosen
def test_streaming_is_chosen_when_the_model_does_not_fit(models, calib, tmp_path, monkeypatch, capsys):
    from graphprune.backends import choose
    from graphprune.backends.stream import backend as stream_backend
    from graphprune.pipeline.options import CompressOptions

    source = str(models["gqa"])
    monkeypatch.setattr(stream_backend, "available_memory_bytes", lambda: 10**12)
    assert choose(source, CompressOptions()).name == "memory"
    assert choose(source, CompressOptions(stream=True)).name == "stream"
    assert choose(source, CompressOptions(resume=True)).name == "stream"
    monkeypatch.setattr(stream_backend, "available_memory_bytes", lambda: 100_000)
    assert choose(source, CompressOptions()).name == "stream"
    assert "pruning layer by layer (--stream)" in capsys.readouterr().out
    assert choose(source, CompressOptions(stream=False)).name == "memory"
    # forced into memory where the activations cannot fit: refused before any work, pointing at --stream
    with pytest.raises(UserError, match="prune layer by layer from disk with --stream"):
        compress(source, stream=False, calib=calib, out=tmp_path / "o", **CALIB)
    assert not (tmp_path / "o").exists()
