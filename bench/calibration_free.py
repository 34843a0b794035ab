"""Issue 6 benchmark: calibration-free compression of SmolLM2-135M at 20% and 50% decoder-layer
sparsity (protocol of ../shared/BENCHMARKS.md for evaluation): weight-only criteria with no data, and
FLAP / CFSP on text the model generates itself (`--calib none`), next to the same criteria calibrated
on wiki.train. JSON lines go to bench/results/calibration_free.jsonl.

    python -m bench.calibration_free                  # the full grid
    python -m bench.calibration_free flap:global:0.2:none flap:global:0.2:wiki
"""

from __future__ import annotations

import sys

from bench.common import run_grid

GRID = [f"{c}:{a}:{s}:{cal}" for s in (0.2, 0.5)
        for c, a, cals in (("magnitude", "global", ("none",)), ("spectral", "global", ("none",)),
                           ("flap", "global", ("none", "wiki")), ("cfsp", "cfsp", ("none", "wiki")))
        for cal in cals]


def parse(arg: str) -> dict:
    criterion, allocation, sparsity, calib = arg.split(":")
    spec = {"criterion": criterion, "allocation": allocation, "sparsity": float(sparsity),
            "target": "channels" if criterion == "cfsp" else "channels,heads", "calib_name": calib}
    if calib == "none":
        spec["calib"] = "none"
    return spec


def main(argv: list[str]) -> None:
    run_grid("calibration_free", [parse(a) for a in (argv or GRID)], [
        ("criterion", "criterion"), ("allocation", "allocation"), ("sparsity", "sparsity"), ("calibration", "calib_name"),
        ("achieved", "achieved"), ("PPL", "ppl"), ("× dense", "x_dense"), ("compress s", "compress_s"),
        ("peak RSS MB", "peak_rss_mb"), ("error", "error")])


if __name__ == "__main__":
    main(sys.argv[1:])
