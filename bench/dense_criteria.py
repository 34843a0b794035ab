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

GRID = [("dense", None, None)] + [
    (c, a, s) for s in (0.2, 0.5)
    for c, a in [("flap", "global"), ("flap", "uniform"), ("wanda-sp", "global"), ("wanda-sp", "uniform"),
                 ("magnitude", "global"), ("magnitude", "uniform"), ("taylor", "global"), ("taylor", "uniform"),
                 ("cfsp", "cfsp"), ("cfsp", "uniform"), ("fisher", "global")]
]


def parse(arg: str):
    c, a, s = arg.split(":")
    return c, a, float(s)


def main(argv: list[str]) -> None:
    data_file("wiki.train.txt")
    data_file("wiki.test.txt")
    grid = [parse(a) for a in argv] if argv else GRID
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    rows = []
    dense = None
    with open(results_dir / "dense_criteria.jsonl", "a") as log:
        for criterion, allocation, sparsity in grid:
            spec = {"criterion": criterion, "allocation": allocation, "sparsity": sparsity}
            row = run_child("bench._compress_child", spec)
            log.write(json.dumps(row) + "\n")
            log.flush()
            if criterion == "dense":
                dense = row.get("ppl")
            if dense and row.get("ppl"):
                row["x_dense"] = row["ppl"] / dense
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"dense PPL reference (BENCHMARKS.md): {DENSE_PPL_REFERENCE}")
    print(markdown_table(rows, [("criterion", "criterion"), ("allocation", "allocation"), ("target", "sparsity"),
                                ("achieved", "achieved"), ("PPL", "ppl"), ("× dense", "x_dense"),
                                ("compress s", "compress_s"), ("peak RSS MB", "peak_rss_mb"),
                                ("calib cached", "cached"), ("uniform layers", "uniform"), ("error", "error")]))


if __name__ == "__main__":
    main(sys.argv[1:])
