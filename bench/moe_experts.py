"""Issue 4 benchmark: expert pruning of a real-weights MoE (SmolLM2-135M split into 8 experts, top-2;
see bench/moe_fixture.py). Removes 25% and 50% of the routed experts of every layer with easyep,
reap, frequency and random, calibrated on wiki (wiki.train) and on news, and reports perplexity on
wiki.test and on news.

News is both a calibration and an evaluation domain, so it is split: perplexity on the first
windows of news.txt, calibration windows from its last 65% (disjoint text). One child process per
calibration domain collects the routing statistics once ("calib s") and prunes every criterion and
fraction from them ("prune s": scoring, allocation, rewrite); peak RSS is that process's peak.

Defaults are reduced from BENCHMARKS.md so the grid fits a shared 2-core machine: calibration
64 x 128 tokens, evaluation 8 windows of 512 tokens per domain (--full: 128 x 128 and 32 windows).

`--calib-free` (issue 6) runs easyep and reap calibrated on wiki.train next to the same criteria on
self-generated calibration (`--calib none`: the fixture writes 64 x 128 tokens itself, seed 0,
temperature 1, no top-p truncation; "calib s" includes the generation).

After the table: easyep and reap against frequency (same calibration) and random as PPL ratios
over the same evaluation windows, with 95% paired bootstrap intervals over the windows.

`--residual` adds easyep with `token_change=residual` (the token weight on the residual stream, as
in EASY-EP's reference code) to every calibration domain.

`--domains wiki --eval-windows 32` re-runs the criteria comparison on one calibration domain with
a longer evaluation (the 8-window differences are within noise).

    python -m bench.moe_experts [--full] [--calib-free] [--residual] [--domains wiki,news] [--eval-windows N]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import PROTOCOL, ROOT, markdown_table, paired_bootstrap

CRITERIA = ("easyep", "reap", "frequency")
FRACTIONS = (0.25, 0.5)


def children(full: bool, calib_free: bool = False, domains: tuple[str, ...] = ("wiki", "news"),
             eval_windows: int | None = None, residual: bool = False) -> list[dict]:
    sizes = {"nsamples": PROTOCOL["calib_nsamples"] if full else 64, "seqlen": PROTOCOL["calib_seqlen"],
             "seed": PROTOCOL["seed"], "eval_seqlen": PROTOCOL["eval_seqlen"],
             "eval_windows": eval_windows or (PROTOCOL["eval_windows"] if full else 8)}
    if calib_free:
        runs = [{"criterion": c, "sparsity": s} for s in FRACTIONS for c in ("easyep", "reap")]
        return [{**sizes, "dense": "moe"}] + [{**sizes, "calib": d, "runs": runs} for d in ("wiki", "none")]
    runs = [{"criterion": c, "sparsity": s} for s in FRACTIONS for c in CRITERIA]
    if residual:  # EASY-EP's token weight on the residual stream (its reference code), next to the default
        runs += [{"criterion": "easyep", "sparsity": s, "options": {"token_change": "residual"}} for s in FRACTIONS]
    combined = [{**sizes, "calib": "wiki+news", "runs": [{"criterion": "easyep", "sparsity": s} for s in FRACTIONS]}]
    return ([{**sizes, "dense": "smollm2"}] * (len(domains) > 1) + [{**sizes, "dense": "moe"}]
            + [{**sizes, "calib": d, "runs": runs} for d in domains]
            + combined * (len(domains) > 1)
            + [{**sizes, "calib": None, "runs": [{"criterion": "random", "sparsity": s} for s in FRACTIONS]}])


def comparisons(rows: list[dict]) -> list[dict]:
    """easyep and reap against frequency (same calibration) and random, per calibration and fraction,
    and each criterion calibrated on news against calibrated on wiki: the PPL ratio over the same
    evaluation windows with a 95% paired bootstrap interval (< 1: the first is better)."""
    import math

    def key(row):
        return row.get("criterion"), row.get("sparsity"), row.get("calib"), json.dumps(row.get("options"))

    def ratio(label: str, row: dict, other: dict, sparsity, calib) -> dict:
        entry = {"comparison": label, "sparsity": sparsity, "calib": calib}
        for text in ("wiki", "news"):
            mean, low, high = paired_bootstrap(row[f"nll_{text}"], other[f"nll_{text}"])
            entry[text] = f"{math.exp(mean):.4f} [{math.exp(low):.4f}, {math.exp(high):.4f}]"
        return entry

    by_key = {key(r): r for r in rows if "nll_wiki" in r}
    plain = json.dumps(None)
    out = []
    for (criterion, sparsity, calib, options), row in by_key.items():
        if criterion not in ("easyep", "reap") or calib is None:
            continue
        for other in (("frequency", sparsity, calib, plain), ("random", sparsity, None, plain)):
            if other in by_key:
                out.append(ratio(f"{row['criterion']} / {other[0]}", row, by_key[other], sparsity, calib))
    # domain calibration on its own domain: calibrated on news against calibrated on wiki
    for (criterion, sparsity, calib, options), row in by_key.items():
        general = by_key.get((criterion, sparsity, "wiki", options))
        if calib == "news" and general is not None:
            out.append(ratio(f"{row['criterion']}: news-calibrated / wiki-calibrated", row, general, sparsity,
                             "news vs wiki"))
    return out


def _option(argv: list[str], name: str, default: str) -> str:
    return argv[argv.index(name) + 1] if name in argv else default


def main(argv: list[str]) -> None:
    from bench.moe_fixture import build

    build()  # once, outside the measured children
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    rows = []
    calib_free = "--calib-free" in argv
    with open(results / ("moe_calibration_free.jsonl" if calib_free else "moe_experts.jsonl"), "a") as log:
        for spec in children("--full" in argv, calib_free, tuple(_option(argv, "--domains", "wiki,news").split(",")),
                             int(_option(argv, "--eval-windows", "0")) or None, "--residual" in argv):
            proc = subprocess.run([sys.executable, "-m", "bench._moe_child", json.dumps(spec)], cwd=ROOT,
                                  capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
            if proc.returncode != 0:
                lines.append({"criterion": "error", "calib": spec.get("calib"),
                              "error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]})
            for row in lines:
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(json.dumps(row), file=sys.stderr, flush=True)
            rows += lines
    for row in rows:
        if row.get("options"):
            row["criterion"] += " " + ",".join(f"{k}={v}" for k, v in row["options"].items())
    print(markdown_table(rows, [("criterion", "criterion"), ("removed", "sparsity"), ("calibration", "calib"),
                                ("experts kept/layer", "kept"), ("PPL wiki.test", "ppl_wiki"),
                                ("PPL news", "ppl_news"), ("calib s", "calib_s"), ("prune s", "prune_s"),
                                ("peak RSS MB", "peak_rss_mb"), ("error", "error")]))
    paired = comparisons(rows)
    if paired:
        print("\nPPL ratio over the same evaluation windows, 95% paired bootstrap interval (< 1: the first is better):")
        print(markdown_table(paired, [("comparison", "comparison"), ("removed", "sparsity"), ("calibration", "calib"),
                                      ("wiki.test", "wiki"), ("news", "news")]))


if __name__ == "__main__":
    main(sys.argv[1:])
