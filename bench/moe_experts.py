"""Issue 4 benchmark: expert pruning of a real-weights MoE (SmolLM2-135M split into 8 experts, top-2;
see bench/moe_fixture.py). Removes 25% and 50% of the routed experts of every layer with easyep,
reap, frequency and random, calibrated on wiki (wiki.train) and on news, and reports perplexity on
wiki.test and on news, wall time and peak RSS of the compress run (each run in a fresh process).

News is both a calibration and an evaluation domain, so it is split: perplexity on the first
32 x 512 tokens of news.txt, calibration windows from its last 65% (disjoint text).

    python -m bench.moe_experts                      # the full grid
    python -m bench.moe_experts easyep:0.5:news      # selected runs (criterion:sparsity:calib)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import markdown_table, run_child

CRITERIA = ("easyep", "reap", "frequency")
GRID = ([{"criterion": "dense-smollm2"}, {"criterion": "dense-moe"}]
        + [{"criterion": c, "sparsity": s, "calib": d} for s in (0.25, 0.5) for c in CRITERIA
           for d in ("wiki", "news")]
        + [{"criterion": "random", "sparsity": s, "calib": None} for s in (0.25, 0.5)]
        + [{"criterion": "easyep", "sparsity": s, "calib": "wiki+news"} for s in (0.25, 0.5)])


def parse(arg: str) -> dict:
    c, s, *d = arg.split(":")
    return {"criterion": c, "sparsity": float(s), "calib": d[0] if d else "wiki"}


def main(argv: list[str]) -> None:
    from bench.moe_fixture import build

    build()  # once, outside the timed children
    grid = [parse(a) for a in argv] if argv else GRID
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    rows = []
    with open(results_dir / "moe_experts.jsonl", "a") as log:
        for spec in grid:
            row = run_child("bench._moe_child", spec, timeout=3600)
            log.write(json.dumps(row) + "\n")
            log.flush()
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(markdown_table(rows, [("criterion", "criterion"), ("removed", "sparsity"), ("calibration", "calib"),
                                ("experts kept/layer", "kept"), ("PPL wiki.test", "ppl_wiki"),
                                ("PPL news", "ppl_news"), ("compress s", "compress_s"),
                                ("peak RSS MB", "peak_rss_mb"), ("error", "error")]))


if __name__ == "__main__":
    main(sys.argv[1:])
