"""One expert-pruning configuration in a fresh process: compress the MoE fixture, then evaluate
perplexity on wiki.test and news. Wall time and peak RSS are taken right after compress (model
loading included, evaluation excluded)."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import PROTOCOL, data_file, peak_rss_mb

NEWS_CALIB_FROM = 0.35  # calibration uses news.txt from here on; evaluation its first 32 x 512 tokens


def calibration_sources(names: str | None, tmp: Path) -> list[str]:
    sources = []
    for name in (names or "").split("+"):
        if name == "wiki":
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
    started = time.perf_counter()
    from bench.moe_fixture import cache_path
    from graphprune.data.calibration import read_text_file
    from graphprune.data.perplexity import perplexity
    from graphprune.models import load_model
    from graphprune.pipeline import compress

    loaded = load_model("smollm2-135m" if spec["criterion"] == "dense-smollm2" else str(cache_path()))
    out = {**spec}
    if spec["criterion"].startswith("dense"):
        model = loaded.model
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = compress(loaded, target="experts", criterion=spec["criterion"], sparsity=spec["sparsity"],
                              calib=calibration_sources(spec.get("calib"), Path(tmp)) or "default",
                              nsamples=PROTOCOL["calib_nsamples"], seqlen=PROTOCOL["calib_seqlen"],
                              seed=PROTOCOL["seed"], progress=False, release_input=True)
        model = result.model
        kept = set(result.report["experts"]["kept_per_layer"].values())
        out.update(kept=kept.pop() if len(kept) == 1 else "varies", stages=result.report["timings_s"])
    out["compress_s"] = time.perf_counter() - started
    out["peak_rss_mb"] = peak_rss_mb()
    for key, name in (("ppl_wiki", "wiki.test.txt"), ("ppl_news", "news.txt")):
        text = read_text_file(data_file(name))
        out[key] = perplexity(model, loaded.tokenizer, text, seqlen=PROTOCOL["eval_seqlen"],
                              windows=PROTOCOL["eval_windows"], progress=False).ppl
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
