"""One calibration domain of the expert benchmark in a fresh process: collect the routing
statistics of the MoE fixture once (timed), then for every (criterion, fraction) prune from those
same statistics (timed) and evaluate perplexity on wiki.test and news. Peak RSS is the process's
peak (one fixture plus one pruned model at a time)."""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import data_file, peak_rss_mb

NEWS_CALIB_FROM = 0.35  # calibration uses news.txt from here on; evaluation its first windows


def calibration_sources(names: str | None, tmp: Path) -> list[str]:
    sources = []
    for name in (names or "").split("+"):
        if name == "none":  # self-generated (graphprune.calibration.selfgen)
            sources.append("none")
        elif name == "wiki":
            sources.append(str(data_file("wiki.train.txt")))
        elif name == "news":
            text = data_file("news.txt").read_text(encoding="utf-8")
            tail = tmp / "news.calib.txt"
            tail.write_text(text[int(len(text) * NEWS_CALIB_FROM):], encoding="utf-8")
            sources.append(str(tail))
    return sources


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(int(spec.get("threads", 2)))
    from bench.moe_fixture import cache_path
    from graphprune.calibration.text import read_text_file
    from graphprune.evaluate.perplexity import perplexity
    from graphprune.models import load_model
    from graphprune.pipeline.run import compress

    started = time.perf_counter()
    loaded = load_model("smollm2-135m" if spec.get("dense") == "smollm2" else str(cache_path()))
    texts = {key: read_text_file(data_file(name)) for key, name in (("wiki", "wiki.test.txt"), ("news", "news.txt"))}

    def evaluate(model) -> dict:
        out = {}
        for k, text in texts.items():
            result = perplexity(model, loaded.tokenizer, text, seqlen=spec["eval_seqlen"],
                                windows=spec["eval_windows"], progress=False)
            out[f"ppl_{k}"] = result.ppl
            out[f"nll_{k}"] = list(result.window_nll)  # per window: paired intervals between rows
        return out

    if spec.get("dense"):
        print(json.dumps({"criterion": f"dense {spec['dense']}", **evaluate(loaded.model)}), flush=True)
        return
    setup_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        # every run reads the routing statistics the first one cached (same model, same calibration)
        os.environ["GRAPHPRUNE_CALIB_CACHE"] = str(Path(tmp) / "cache")
        sources = calibration_sources(spec["calib"], Path(tmp)) if spec.get("calib") else ["default"]
        for run in spec["runs"]:
            t = time.perf_counter()
            result = compress(loaded.model, target="experts", criterion=run["criterion"], sparsity=run["sparsity"],
                              calib=sources, tokenizer=loaded.tokenizer, nsamples=spec["nsamples"],
                              seqlen=spec["seqlen"], seed=spec["seed"], progress=False,
                              criterion_options=run.get("options") or {})
            kept = set(result.report["experts"]["kept_per_layer"].values())
            row = {**run, "calib": spec.get("calib"), "kept": kept.pop() if len(kept) == 1 else "varies",
                   "setup_s": setup_s, "prune_s": time.perf_counter() - t,
                   "calib_s": result.report["timings_s"].get("experts_calibration"),
                   **evaluate(result.model), "peak_rss_mb": peak_rss_mb()}
            print(json.dumps(row), flush=True)
            del result
            gc.collect()


if __name__ == "__main__":
    main()
