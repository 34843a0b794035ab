"""Issue 9 benchmark: compensation (none / bias / least squares) and structured OBS, with and
without `--sequential`, on SmolLM2-135M at 20% and 50% decoder-layer sparsity (protocol of
../shared/BENCHMARKS.md). Prints a markdown table; JSON lines go to bench/results/compensation.jsonl.

    python -m bench.compensation                      # the full grid
    python -m bench.compensation obs:global:0.5:lsq:seq flap:global:0.2:bias   # selected runs
    (spec: criterion:allocation:sparsity:compensate[:seq][:damp=X][:target=T])
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import DENSE_PPL_REFERENCE as DENSE_PPL, data_file, markdown_table, run_child

GRID = [f"{c}:global:{s}:{comp}{seq}" for s in (0.2, 0.5)
        for c, comp in (("flap", "none"), ("flap", "bias"), ("flap", "lsq"), ("obs", "lsq"))
        for seq in ("", ":seq") if not (comp == "none" and seq)]


def parse(arg: str) -> dict:
    criterion, allocation, sparsity, compensate, *rest = arg.split(":")
    spec = {"criterion": criterion, "allocation": allocation, "sparsity": float(sparsity), "compensate": compensate,
            "sequential": "seq" in rest, "target": "channels,heads"}
    for extra in rest:
        if extra.startswith("damp="):
            spec["damp"] = float(extra[5:])
        elif extra.startswith("target="):
            spec["target"] = extra[7:]
        elif extra.startswith("scale="):
            spec["options"] = {"scale": extra[6:]}
    return spec


def main(argv: list[str]) -> None:
    data_file("wiki.train.txt")
    data_file("wiki.test.txt")
    grid = [parse(a) for a in (argv or GRID)]
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    rows = []
    with open(results_dir / "compensation.jsonl", "a") as log:
        for spec in grid:
            row = run_child("bench._compress_child", spec)
            log.write(json.dumps(row) + "\n")
            log.flush()
            if row.get("ppl"):
                row["x_dense"] = row["ppl"] / DENSE_PPL
            lw = row.get("layerwise") or {}
            row["rel_err"] = lw.get("mean_relative_error_compensated")
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"dense PPL (BENCHMARKS.md protocol): {DENSE_PPL}")
    print(markdown_table(rows, [("criterion", "criterion"), ("allocation", "allocation"), ("sparsity", "sparsity"),
                                ("compensate", "compensate"), ("sequential", "sequential"), ("damp", "damp"),
                                ("achieved", "achieved"), ("PPL", "ppl"), ("× dense", "x_dense"),
                                ("layer rel. error", "rel_err"), ("compress s", "compress_s"),
                                ("peak RSS MB", "peak_rss_mb"), ("error", "error")]))


if __name__ == "__main__":
    main(sys.argv[1:])
