"""Regression benchmark for behaviour-preserving refactors: the same commands must give the same models.

A fixed list of `graphprune compress` commands, with every option pinned, is run through the command
line only (`python -m graphprune compress ...` in a subprocess, so module paths may change freely),
once on the code before a refactor (`baseline`) and once after (`compare`). Every tensor of every
output is compared with the baseline (shape, dtype, max abs difference <= 1e-6), as are the report's
`kept_units` / `params` (exactly) and `config.json` (without the keys that name the run, not the model).

    python -m bench.regression baseline --dir D   # creates D/models once, runs every case into D/baseline/
    python -m bench.regression compare --dir D    # runs every case into D/after/, compares with D/baseline/
    python -m bench.regression compare --dir D --only llama-flap-global-bias,moe-easyep-experts-uniform
    python -m bench.regression --list

Inputs (tiny models, calibration text, one ONNX export) are made once into D/models by the code that
runs `baseline`, recorded with their sha256 in D/models/MANIFEST.json and only checked afterwards, so a
later `compare` reads exactly the same files. Each case runs with its own empty cache directories
(GRAPHPRUNE_CACHE, GRAPHPRUNE_CALIB_CACHE) and `--no-cache`, offline, with 2 intra-op threads and a
fixed hash seed, so nothing leaks from one run into another. The subprocess runs in the repository
holding this file (`python -m graphprune` then imports that repository's package first); the package
it imported is printed and stored with each run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("GRAPHPRUNE_BENCH_DATA", ROOT.parent / "shared" / "data"))
TOLERANCE = 1e-6
CONFIG_KEYS_IGNORED = ("transformers_version", "_name_or_path")
REPORT_KEYS_COMPARED = ("kept_units", "params")
THREADS = "2"
CASE_TIMEOUT_S = 1200


# ----------------------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    """One compress command. `model` is a folder/file under the models directory (or an alias);
    `{models}` in `args` is replaced by that directory. `onnx`: the output is one .onnx file."""

    name: str
    model: str
    args: tuple[str, ...]
    onnx: bool = False

    def summary(self) -> str:
        return f"{self.model} " + " ".join(self.args).replace("{models}/", "")


def _opts(criterion, sparsity, *, allocation="global", target="channels,heads", compensate="none", calib="calib.txt",
          nsamples=16, seqlen=64, seed=0, round_to=1, damp=0.01, stream=False, extra=()) -> tuple[str, ...]:
    """Every option of a decoder/encoder compress, pinned (calib: a file under the models dir, or a keyword)."""
    calib = calib if calib in ("none", "default") else "{models}/" + calib
    return ("--criterion", criterion, "--sparsity", str(sparsity), "--allocation", allocation, "--target", target,
            "--compensate", compensate, "--calib", calib, "--nsamples", str(nsamples), "--seqlen", str(seqlen),
            "--seed", str(seed), "--round-to", str(round_to), "--damp", str(damp),
            *(("--stream", "--device", "cpu", "--dtype", "fp32") if stream else ("--no-stream",)), *extra, "--no-cache")


def _experts(criterion, sparsity, *, allocation="uniform", extra=()) -> tuple[str, ...]:
    return ("--target", "experts", "--criterion", criterion, "--sparsity", str(sparsity), "--expert-allocation",
            allocation, "--allocation", "uniform", "--compensate", "none", "--calib", "{models}/calib.txt",
            "--nsamples", "16", "--seqlen", "64", "--seed", "0", "--round-to", "1", "--damp", "0.01", "--no-stream",
            *extra, "--no-cache")


def _onnx(criterion, sparsity, compensate) -> tuple[str, ...]:
    return ("--criterion", criterion, "--sparsity", str(sparsity), "--allocation", "global", "--target",
            "channels,heads", "--compensate", compensate, "--calib", "{models}/calib.txt", "--nsamples", "16",
            "--seqlen", "64", "--seed", "0", "--round-to", "1", "--damp", "0.01", "--no-cache")


LLAMA, QWEN3_MOE, MIXTRAL, ENCODER, LLAMA_ONNX = "llama", "qwen3_moe", "mixtral", "minilm-tiny", "llama-onnx/model.onnx"

CASES: list[Case] = [
    # FLAP and the allocations / targets (tiny Llama, 3 layers, GQA 4 query heads / 2 KV groups)
    Case("llama-flap-global-bias", LLAMA, _opts("flap", 0.3, compensate="bias")),
    Case("llama-flap-uniform-bias", LLAMA, _opts("flap", 0.3, allocation="uniform", compensate="bias")),
    Case("llama-flap-ifv-global-none", LLAMA, _opts("flap", 0.3, compensate="none", extra=("--option", "metric=IFV"))),
    Case("llama-flap-query-heads", LLAMA, _opts("flap", 0.3, target="channels,query-heads", compensate="bias")),
    Case("llama-flap-heads-only", LLAMA, _opts("flap", 0.15, target="heads", compensate="bias")),
    # other criteria
    Case("llama-wanda-sp-uniform-none", LLAMA, _opts("wanda-sp", 0.3, allocation="uniform")),
    Case("llama-wanda-sp-global-lsq", LLAMA, _opts("wanda-sp", 0.3, compensate="lsq")),
    Case("llama-cfsp-cfsp-none", LLAMA, _opts("cfsp", 0.3, allocation="cfsp")),
    Case("llama-cfsp-cfsp-lsq", LLAMA, _opts("cfsp", 0.3, allocation="cfsp", compensate="lsq", damp=0.05)),
    Case("llama-magnitude-uniform-calibnone", LLAMA, _opts("magnitude", 0.3, allocation="uniform", calib="none")),
    Case("llama-magnitude-global-round8", LLAMA, _opts("magnitude", 0.4, round_to=8)),
    Case("llama-taylor-global-none", LLAMA, _opts("taylor", 0.3)),
    Case("llama-obs-global-lsq", LLAMA, _opts("obs", 0.3, compensate="lsq")),
    Case("llama-obs-uniform-lsq-damp0.1", LLAMA, _opts("obs", 0.3, allocation="uniform", compensate="lsq", damp=0.1)),
    # sequential compensation
    Case("llama-flap-sequential-lsq", LLAMA, _opts("flap", 0.3, compensate="lsq", extra=("--sequential",))),
    Case("llama-flap-sequential-bias", LLAMA, _opts("flap", 0.3, compensate="bias", extra=("--sequential",))),
    # streaming (flap-class criteria, bias/none compensation)
    Case("llama-stream-flap-global-bias", LLAMA, _opts("flap", 0.3, compensate="bias", stream=True)),
    Case("llama-stream-wanda-sp-uniform-none", LLAMA, _opts("wanda-sp", 0.3, allocation="uniform", stream=True)),
    Case("llama-stream-cfsp-cfsp-bias", LLAMA, _opts("cfsp", 0.3, allocation="cfsp", compensate="bias", stream=True)),
    # mixture of experts
    Case("moe-easyep-experts-uniform", QWEN3_MOE, _experts("easyep", 0.25)),
    Case("moe-frequency-experts-uniform", QWEN3_MOE, _experts("frequency", 0.5)),
    Case("moe-reap-experts-global", MIXTRAL, _experts("reap", 0.25, allocation="global")),
    Case("moe-flap-expert-channels", MIXTRAL, _opts("flap", 0.3, target="expert-channels", allocation="uniform",
                                                    compensate="none")),
    # encoder (BERT sentence-transformers folder, calibration pairs)
    Case("encoder-flap-uniform", ENCODER, _opts("flap", 0.3, allocation="uniform", target="channels",
                                                compensate="bias", calib="pairs.jsonl", nsamples=32, seqlen=32)),
    Case("encoder-obs-uniform-lsq", ENCODER, _opts("obs", 0.3, allocation="uniform", target="channels",
                                                   compensate="lsq", calib="pairs.jsonl", nsamples=32, seqlen=32)),
    # ONNX-native compress of the exported tiny Llama
    Case("onnx-magnitude", LLAMA_ONNX, _onnx("magnitude", 0.3, "none"), onnx=True),
    Case("onnx-flap-bias", LLAMA_ONNX, _onnx("flap", 0.3, "bias"), onnx=True),
    # the real model (bundled SmolLM2-135M GGUF, dequantised into the case's own cache)
    Case("smollm2-flap20", "smollm2-135m",
         _opts("flap", 0.2, compensate="bias", calib="default", nsamples=128, seqlen=128)),
    # (obs 20% on SmolLM2, 128 x 128 tokens, took 285 s on 2 cores: left out, obs is covered by the tiny cases)
]


# ------------------------------------------------------------------------------------ the inputs

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _manifest(models: Path) -> dict[str, str]:
    return {str(p.relative_to(models)): _sha256(p) for p in sorted(models.rglob("*"))
            if p.is_file() and p.name != "MANIFEST.json"}


def _calibration_text(path: Path) -> str:
    """ASCII text: the zoo's models have a 256-token vocabulary, and the byte-level tokenizer maps
    some non-ASCII bytes to ids 256 and 257."""
    source = DATA / "wiki.train.txt"
    if source.exists():
        with source.open(encoding="utf-8") as file:
            text = file.read(400_000)
        path.write_text(text.encode("ascii", "ignore").decode(), encoding="utf-8")
        return f"first 400,000 characters of {source}, ASCII only"
    print(f"note: {source} not found (set GRAPHPRUNE_BENCH_DATA to the folder holding wiki.train.txt); "
          f"the calibration text is graphprune's repeated sample paragraph instead")
    from graphprune.testing.fixtures import write_sample_text

    write_sample_text(path, repeats=200)
    return "graphprune.testing.fixtures.write_sample_text(repeats=200)"


def create_models(models: Path) -> None:
    """The inputs, made once. Imports graphprune's testing helpers (only here: later runs never need them)."""
    from graphprune.testing.encoders import save_tiny_sentence_transformer, write_pair_file
    from graphprune.testing.fixtures import byte_level_tokenizer, save_tiny_llama
    from graphprune.testing.zoo import save_tiny

    partial = models.with_name(models.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    sources = {"calib.txt": _calibration_text(partial / "calib.txt")}
    save_tiny_llama(partial / LLAMA, layers=3, seed=0)
    for family in (QWEN3_MOE, MIXTRAL):
        save_tiny(family, partial / family, seed=0)
        byte_level_tokenizer().save_pretrained(partial / family)
    save_tiny_sentence_transformer(partial / ENCODER, seed=0)
    write_pair_file(partial / "pairs.jsonl", count=200, seed=0)
    run = run_cli(["export", str(partial / LLAMA), "--out", str(partial / Path(LLAMA_ONNX).parent)],
                  partial / "export.log")
    if run["rc"] != 0:
        sys.exit(f"ONNX export of the tiny Llama failed (rc {run['rc']}); see {partial / 'export.log'}")
    sources["package"] = run["package"]
    (partial / "SOURCES.json").write_text(json.dumps(sources, indent=1) + "\n")
    (partial / "MANIFEST.json").write_text(json.dumps(_manifest(partial), indent=1) + "\n")
    partial.rename(models)


def check_models(models: Path) -> None:
    expected = json.loads((models / "MANIFEST.json").read_text())
    actual = _manifest(models)
    if actual != expected:
        changed = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
        sys.exit(f"{models} differs from its MANIFEST.json ({', '.join(changed[:5])}): the inputs are not the "
                 f"baseline's; recreate them and the baseline together")


# ----------------------------------------------------------------------------------- running

def run_cli(argv: list[str], log: Path) -> dict:
    """`python -m graphprune ARGV` with empty caches, offline; returns rc, wall time and the imported package."""
    with tempfile.TemporaryDirectory(prefix="graphprune-regression-cache-") as cache:
        env = {**os.environ, "GRAPHPRUNE_CACHE": cache, "GRAPHPRUNE_CALIB_CACHE": str(Path(cache) / "calibration"),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS}
        package = subprocess.run([sys.executable, "-c", "import graphprune; print(graphprune.__file__)"], cwd=ROOT,
                                 env=env, capture_output=True, text=True).stdout.strip()
        started = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "graphprune", *argv], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, stdout, stderr = "timeout", str(e.stdout or ""), str(e.stderr or "")
        wall = time.perf_counter() - started
    log.write_text(f"$ python -m graphprune {' '.join(argv)}\n# package {package}\n# rc {rc}, {wall:.1f}s\n"
                   f"--- stdout\n{stdout}\n--- stderr\n{stderr}")
    return {"rc": rc, "wall_s": round(wall, 1), "package": package, "argv": argv}


def run_case(case: Case, models: Path, runs: Path) -> dict:
    """Run one case into runs/<name>/ (replaced): out/ or out.onnx, log.txt, run.json."""
    case_dir = runs / case.name
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    model = str(models / case.model) if (models / case.model).exists() else case.model
    out = case_dir / ("out.onnx" if case.onnx else "out")
    argv = ["compress", model, *(a.replace("{models}", str(models)) for a in case.args), "--out", str(out)]
    run = run_cli(argv, case_dir / "log.txt")
    (case_dir / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    return run


# ------------------------------------------------------------------------------ loading, comparing

def load_output(case_dir: Path) -> tuple[dict, dict, dict | None]:
    """(tensors by name, report, config) of a case's output: every tensor of every safetensors file of
    an HF folder (shards merged by name) or every initializer and Constant of an .onnx file."""
    import torch

    if (case_dir / "out.onnx").exists():
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(case_dir / "out.onnx"))
        tensors = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                value = numpy_helper.to_array(node.attribute[0].t).copy()
                tensors[f"Constant:{node.output[0]}"] = torch.from_numpy(value)
        props = {p.key: p.value for p in model.metadata_props}
        return tensors, json.loads(props.get("graphprune_report", "{}")), None
    from safetensors import safe_open

    out, tensors = case_dir / "out", {}
    for path in sorted(out.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as file:
            for name in file.keys():
                if name in tensors:
                    raise ValueError(f"{name} is stored twice in {out}")
                tensors[name] = file.get_tensor(name)
    report = json.loads((out / "graphprune_report.json").read_text())
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else None
    return tensors, report, config


def _report_part(report: dict) -> dict:
    part = {key: report.get(key) for key in REPORT_KEYS_COMPARED}
    if report.get("experts"):
        part["experts.kept_per_layer"] = report["experts"].get("kept_per_layer")
    return part


def _config_part(config: dict | None):
    return None if config is None else {k: v for k, v in config.items() if k not in CONFIG_KEYS_IGNORED}


def compare_outputs(before: Path, after: Path) -> dict:
    """Compare the outputs of one case: {"tensors", "max_diff", "kept_equal", "problems": [...]}."""
    import torch

    a_tensors, a_report, a_config = load_output(before)
    b_tensors, b_report, b_config = load_output(after)
    problems = []
    missing, extra = sorted(a_tensors.keys() - b_tensors.keys()), sorted(b_tensors.keys() - a_tensors.keys())
    if missing or extra:
        problems.append(f"tensor names: {len(missing)} missing (e.g. {missing[:2]}), {len(extra)} new "
                        f"(e.g. {extra[:2]})")
    max_diff, worst, compared = 0.0, None, 0
    for name in sorted(a_tensors.keys() & b_tensors.keys()):
        a, b = a_tensors[name], b_tensors[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{name}: {a.dtype}{list(a.shape)} -> {b.dtype}{list(b.shape)}")
            continue
        compared += 1
        if a.numel() == 0 or torch.equal(a, b):
            continue
        a, b = a.double(), b.double()
        equal = (a == b) | (a.isnan() & b.isnan())
        diff = float(torch.where(equal, 0.0, (a - b).abs()).nan_to_num(nan=float("inf")).max())
        if diff > max_diff:
            max_diff, worst = diff, name
    if max_diff > TOLERANCE:
        problems.append(f"max abs diff {max_diff:.3g} in {worst}")
    kept_equal = _report_part(a_report) == _report_part(b_report)
    if not kept_equal:
        differing = [k for k, v in _report_part(a_report).items() if _report_part(b_report).get(k) != v]
        problems.append(f"report {', '.join(differing)} differ")
    if _config_part(a_config) != _config_part(b_config):
        a_c, b_c = _config_part(a_config) or {}, _config_part(b_config) or {}
        keys = sorted(k for k in a_c.keys() | b_c.keys() if a_c.get(k) != b_c.get(k))
        problems.append(f"config.json {', '.join(keys) or '(presence)'} differ")
    return {"tensors": compared, "max_diff": max_diff, "kept_equal": kept_equal, "problems": problems}


# ------------------------------------------------------------------------------------------- main

def _row(*cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _kept(report: dict) -> str:
    """`channel 45/53/45; kv-group 2/2/2` (units kept per layer, by kind)."""
    kept = report.get("kept_units") or {}
    return "; ".join(f"{kind} " + ("/".join(map(str, per_layer.values())) if len(per_layer) <= 4 else
                                   f"{sum(per_layer.values())} in {len(per_layer)} layers")
                     for kind, per_layer in kept.items()) or "–"


def _select(only: str | None) -> list[Case]:
    if not only:
        return CASES
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in {c.name for c in CASES}]
    if unknown:
        sys.exit(f"unknown case(s) {', '.join(unknown)}; --list shows them")
    return [c for c in CASES if c.name in names]


def baseline(work: Path, cases: list[Case]) -> int:
    models = work / "models"
    if not models.exists():
        print(f"creating the inputs in {models} (once)", flush=True)
        create_models(models)
    check_models(models)
    print(_row("case", "command", "tensors", "kept units", "wall (s)", "status"))
    print(_row(*["---"] * 6))
    failed = 0
    for case in cases:
        run = run_case(case, models, work / "baseline")
        if run["rc"] == 0:
            tensors, report, _ = load_output(work / "baseline" / case.name)
            row = (len(tensors), _kept(report), "ok")
        else:
            failed += 1
            row = ("–", "–", f"FAILED (rc {run['rc']}, see {work / 'baseline' / case.name / 'log.txt'})")
        print(_row(case.name, f"`{case.summary()}`", *row[:2], run["wall_s"], row[2]), flush=True)
    print(f"\nbaseline in {work / 'baseline'} (graphprune imported from {run['package']})")
    return 1 if failed else 0


def compare(work: Path, cases: list[Case]) -> int:
    models = work / "models"
    if not (models / "MANIFEST.json").exists():
        sys.exit(f"no inputs in {models}: run `python -m bench.regression baseline --dir {work}` first")
    check_models(models)
    print(_row("case", "command", "tensors compared", "max abs diff", "kept units equal", "wall before (s)",
               "wall after (s)", "status"))
    print(_row(*["---"] * 8))
    differing = 0
    for case in cases:
        before = work / "baseline" / case.name
        if not (before / "run.json").exists():
            print(_row(case.name, f"`{case.summary()}`", "–", "–", "–", "–", "–", "DIFFERS: no baseline"))
            differing += 1
            continue
        base_run = json.loads((before / "run.json").read_text())
        run = run_case(case, models, work / "after")
        cells = ["–", "–", "–"]
        if base_run["rc"] != 0 or run["rc"] != 0:
            same = base_run["rc"] == run["rc"]
            status = "same (both fail)" if same else f"DIFFERS: rc {base_run['rc']} -> {run['rc']}"
        else:
            result = compare_outputs(before, work / "after" / case.name)
            same = not result["problems"]
            cells = [result["tensors"], f"{result['max_diff']:.3g}", "yes" if result["kept_equal"] else "NO"]
            status = "same" if same else "DIFFERS: " + "; ".join(result["problems"])
        differing += not same
        print(_row(case.name, f"`{case.summary()}`", *cells, base_run["wall_s"], run["wall_s"], status), flush=True)
    print(f"\n{len(cases) - differing} of {len(cases)} case(s) the same"
          f" (graphprune imported from {run['package'] if cases else '?'})")
    return 1 if differing else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.regression", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=["baseline", "compare"])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/graphprune_regression"))
    parser.add_argument("--only", default=None, help="comma list of case names")
    parser.add_argument("--list", action="store_true", help="print the cases and their commands")
    args = parser.parse_args(argv)
    cases = _select(args.only)
    if args.list or args.mode is None:
        for case in cases:
            print(f"{case.name:<38} graphprune compress {case.summary()}")
        return 0
    work = args.dir.resolve()
    return baseline(work, cases) if args.mode == "baseline" else compare(work, cases)


if __name__ == "__main__":
    sys.exit(main())
