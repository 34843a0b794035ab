"""Shared pieces of the benchmarks: the protocol of ../shared/BENCHMARKS.md, data location, and a
child-process runner that reports wall time and peak RSS of one configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("GRAPHPRUNE_BENCH_DATA", ROOT.parent / "shared" / "data"))
PROTOCOL = {"calib_nsamples": 128, "calib_seqlen": 128, "seed": 0, "eval_seqlen": 512, "eval_windows": 32}
DENSE_PPL_REFERENCE = 18.95


def data_file(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        sys.exit(f"bench: {path} not found. The benchmarks read ../shared/data (WikiText-style text); "
                 f"set GRAPHPRUNE_BENCH_DATA to the folder holding {name}.")
    return path


def run_child(module: str, spec: dict, timeout: int = 7200) -> dict:
    """Run `python -m module '<json spec>'` and return the JSON line it prints last."""
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300], **spec}
    return json.loads(lines[-1])


def peak_rss_mb() -> float:
    from graphprune.pipeline.report import peak_rss_mb as own_peak

    return own_peak()


def paired_bootstrap(a, b, resamples: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a − b) over paired items (the same queries, the same evaluation windows) with a 95%
    bootstrap interval (items resampled with replacement): is a difference between two models
    larger than which items happen to be in the evaluation set?"""
    import numpy as np

    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    out = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(k)) for _, k in columns) + " |")
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def run_grid(log_name: str, specs: list[dict], columns: list[tuple[str, str]], *,
             child: str = "bench._compress_child", extra=None) -> list[dict]:
    """Run each spec in a fresh child, append its JSON line to bench/results/<log_name>.jsonl, and print
    the markdown table (`extra(row)` may add derived columns). PPL rows get "× dense" (x_dense)."""
    data_file("wiki.train.txt")  # the protocol's files: a clear message now, not in every child
    data_file("wiki.test.txt")
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    rows = []
    with open(results_dir / f"{log_name}.jsonl", "a") as log:
        for spec in specs:
            row = run_child(child, spec)
            log.write(json.dumps(row) + "\n")
            log.flush()
            if row.get("ppl"):
                row["x_dense"] = row["ppl"] / DENSE_PPL_REFERENCE
            if extra is not None:
                extra(row)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"dense PPL (BENCHMARKS.md protocol): {DENSE_PPL_REFERENCE}")
    print(markdown_table(rows, columns))
    return rows
