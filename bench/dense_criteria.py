"""Issue 3 benchmark: every criterion x allocation on SmolLM2-135M at 20% and 50% decoder-layer
sparsity, protocol of ../shared/BENCHMARKS.md. Prints a markdown table and writes JSON lines to
bench/results/dense_criteria.jsonl.

    python -m bench.dense_criteria                 # the full grid
    python -m bench.dense_criteria flap:global:0.2 magnitude:uniform:0.5   # selected runs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import DENSE_PPL_REFERENCE, data_file, markdown_table, run_child

PAIRS = [("flap", "global", "channels,heads"), ("flap", "global", "channels,query-heads"),
         ("flap", "uniform", "channels,heads"), ("wanda-sp", "global", "channels,heads"),
         ("wanda-sp", "uniform", "channels,heads"), ("cfsp", "cfsp", "channels"), ("cfsp", "uniform", "channels"),
         ("magnitude", "global", "channels,heads"), ("magnitude", "uniform", "channels,heads"),
         ("taylor", "global", "channels,heads"), ("fisher", "global", "channels,heads")]
# The first run of each sparsity recomputes calibration (no cache): its wall time is the honest one.
# Gradient criteria (slow: a backward pass per batch) run last.
GRID = [{"criterion": "dense"}] + sorted(
    [{"criterion": c, "allocation": a, "sparsity": s, "target": t, "cache": i > 0}
     for s in (0.2, 0.5) for i, (c, a, t) in enumerate(PAIRS)],
    key=lambda spec: spec["criterion"] in ("taylor", "fisher"))


def parse(arg: str) -> dict:
    """criterion:allocation:sparsity[:target]"""
    c, a, s, *t = arg.split(":")
    return {"criterion": c, "allocation": a, "sparsity": float(s), "target": t[0] if t else "channels,heads"}


def main(argv: list[str]) -> None:
    data_file("wiki.train.txt")
    data_file("wiki.test.txt")
    grid = [parse(a) for a in argv if a != "--skip-dense"] if argv and argv != ["--skip-dense"] else GRID
    if "--skip-dense" in argv:
        grid = [g for g in grid if g["criterion"] != "dense"]
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    rows = []
    dense = None
    with open(results_dir / "dense_criteria.jsonl", "a") as log:
        for spec in grid:
            row = run_child("bench._compress_child", spec)
            log.write(json.dumps(row) + "\n")
            log.flush()
            if spec["criterion"] == "dense":
                dense = row.get("ppl")
            if dense and row.get("ppl"):
                row["x_dense"] = row["ppl"] / dense
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"dense PPL reference (BENCHMARKS.md): {DENSE_PPL_REFERENCE}")
    print(markdown_table(rows, [("criterion", "criterion"), ("allocation", "allocation"), ("units", "target"),
                                ("sparsity", "sparsity"),
                                ("achieved", "achieved"), ("PPL", "ppl"), ("× dense", "x_dense"),
                                ("compress s", "compress_s"), ("peak RSS MB", "peak_rss_mb"),
                                ("calib cached", "cached"), ("uniform layers", "uniform"), ("error", "error")]))


if __name__ == "__main__":
    main(sys.argv[1:])
