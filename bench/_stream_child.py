"""One compress in a fresh process, streaming (default) or in memory ("mode": "memory", then
save_pruned): wall time, peak RSS (memory-mapped pages included, as the kernel counts them) and the
run's stage timings, as one JSON line."""

from __future__ import annotations

import json
import sys
import time

import torch

from bench.common import peak_rss_mb


def ru_maxrss_mb() -> float:
    """For comparison with the process's own peak: Linux carries the parent's peak into ru_maxrss
    when the child is forked (a parent that built a 13 GB checkpoint showed through)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(int(spec.get("threads", 2)))
    started = time.perf_counter()
    options = dict(criterion=spec.get("criterion", "flap"), sparsity=spec.get("sparsity", 0.5),
                   compensate=spec.get("compensate"),
                   allocation=spec.get("allocation"), target=spec.get("target"), calib=spec.get("calib", "default"),
                   nsamples=spec["nsamples"],
                   seqlen=spec["seqlen"], progress=False)
    if spec.get("mode") == "memory":
        from graphprune.io.hf import save_pruned
        from graphprune.models import load_model
        from graphprune.pipeline.run import compress

        loaded = load_model(spec["model"])
        result = compress(loaded, use_cache=False, release_input=True, **options)
        save_pruned(result.model, spec["out"], tokenizer=loaded.tokenizer, report=result.report, force=True)
    else:
        from graphprune.pipeline.run import compress_streaming

        result = compress_streaming(spec["model_dir"], spec["out"], device=spec.get("device", "cpu"),
                                    dtype=spec.get("dtype", "fp32"), force=True, **options)
    wall = time.perf_counter() - started
    r = result.report
    out = {**spec, "wall_s": wall, "peak_rss_mb": peak_rss_mb(), "ru_maxrss_mb": ru_maxrss_mb(),
           "achieved": r["params"]["achieved_sparsity"],
           "timings": r["timings_s"], "statistics_s": r["timings_s"].get("statistics"),
           "write_s": r["timings_s"].get("write"), "kept_units": r["kept_units"],
           "peak_cuda_mb": (r.get("stream_run") or {}).get("peak_cuda_mb")}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
