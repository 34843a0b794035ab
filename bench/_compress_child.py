"""One benchmark configuration in a fresh process: compress, then evaluate perplexity.

Wall time and peak RSS are taken right after compress (before evaluation), so they describe the
compress run alone (model loading included).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from bench.common import PROTOCOL, data_file, peak_rss_mb


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(int(spec.get("threads", 2)))
    started = time.perf_counter()
    from graphprune.calibration.text import read_text_file
    from graphprune.evaluate.perplexity import perplexity
    from graphprune.models import load_model
    from graphprune.pipeline.run import compress

    loaded = load_model(spec.get("model", "smollm2-135m"))
    out = {**spec}
    if spec.get("criterion") == "dense":
        model = loaded.model
        out.update(achieved=0.0)
    else:
        result = compress(loaded, criterion=spec["criterion"], sparsity=spec["sparsity"],
                          allocation=spec["allocation"], target=spec.get("target"),
                          calib=spec.get("calib") or str(data_file("wiki.train.txt")), nsamples=PROTOCOL["calib_nsamples"],
                          seqlen=PROTOCOL["calib_seqlen"], seed=PROTOCOL["seed"],
                          compensate=spec.get("compensate"), progress=False, use_cache=spec.get("cache", True),
                          round_to=spec.get("round_to", 1), release_input=True,
                          sequential=spec.get("sequential", False), damp=spec.get("damp", 0.01),
                          criterion_options=spec.get("options"))
        model = result.model
        out.update(achieved=result.report["params"]["achieved_sparsity"],
                   uniform=result.report["uniform_layers"], stages=result.report["timings_s"],
                   cached=result.report.get("calibration_cache") == "hit",
                   layerwise=result.report.get("layerwise"), kept_units=result.report.get("kept_units"))
    out["compress_s"] = time.perf_counter() - started
    out["peak_rss_mb"] = peak_rss_mb()
    text = read_text_file(data_file("wiki.test.txt"))
    t = time.perf_counter()
    ppl = perplexity(model, loaded.tokenizer, text, seqlen=PROTOCOL["eval_seqlen"],
                     windows=PROTOCOL["eval_windows"], progress=False)
    out.update(ppl=ppl.ppl, eval_s=time.perf_counter() - t)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
