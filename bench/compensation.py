"""Issue 9 benchmark: compensation (none / bias / least squares) and structured OBS, with and
without `--sequential`, on SmolLM2-135M at 20% and 50% decoder-layer sparsity (protocol of
../shared/BENCHMARKS.md). Prints a markdown table; JSON lines go to bench/results/compensation.jsonl.

    python -m bench.compensation                      # the full grid
    python -m bench.compensation obs:global:0.5:lsq:seq flap:global:0.2:bias   # selected runs
    (spec: criterion:allocation:sparsity:compensate[:seq][:damp=X][:target=T])
"""

from __future__ import annotations

import sys

from bench.common import run_grid

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
    run_grid("compensation", [parse(a) for a in (argv or GRID)], [
        ("criterion", "criterion"), ("allocation", "allocation"), ("sparsity", "sparsity"), ("compensate", "compensate"),
        ("sequential", "sequential"), ("damp", "damp"), ("achieved", "achieved"), ("PPL", "ppl"), ("× dense", "x_dense"),
        ("layer rel. error", "rel_err"), ("compress s", "compress_s"), ("peak RSS MB", "peak_rss_mb"), ("error", "error")],
        extra=lambda row: row.update(rel_err=(row.get("layerwise") or {}).get("mean_relative_error_compensated")))


if __name__ == "__main__":
    main(sys.argv[1:])
