"""Issue 7: streaming compress equals the in-memory one on real weights (SmolLM2-135M, FLAP 20%,
global allocation, bias compensation, protocol calibration 128 x 128 tokens of wiki.train).

The in-memory run loads the alias (GGUF dequantized to fp32, cached as safetensors); the streaming
run reads that cached safetensors folder. Both run in fresh child processes (wall time, peak RSS);
then both outputs are loaded and compared tensor by tensor, and the streamed one is evaluated
(perplexity, protocol of ../shared/BENCHMARKS.md).

    python -m bench.stream_equality [--sparsity 0.2] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.common import PROTOCOL, data_file, markdown_table, run_child


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_equality")
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--dir", default="/tmp/graphprune_stream_equality")
    args = parser.parse_args(argv)
    calib, test = str(data_file("wiki.train.txt")), data_file("wiki.test.txt")
    from graphprune.models import load_model
    from graphprune.models.aliases import resolve_alias
    from graphprune.models.loading import gguf_cache_dir

    load_model("smollm2-135m")  # makes sure the safetensors conversion exists
    folder = gguf_cache_dir(resolve_alias("smollm2-135m"))
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    common = {"criterion": "flap", "sparsity": args.sparsity, "allocation": "global", "calib": calib,
              "nsamples": PROTOCOL["calib_nsamples"], "seqlen": PROTOCOL["calib_seqlen"]}
    memory = run_child("bench._stream_child", {**common, "mode": "memory", "model": "smollm2-135m",
                                               "out": str(work / "memory")})
    stream = run_child("bench._stream_child", {**common, "model_dir": str(folder), "out": str(work / "stream")})
    for row, name in ((memory, "in memory"), (stream, "streaming")):
        row["run"] = name
        if "error" in row:
            sys.exit(f"{name} run failed: {row['error']}")
    import torch

    from graphprune.calibration.text import read_text_file
    from graphprune.evaluate.perplexity import perplexity
    from graphprune.io.hf import load_pruned

    a, b = load_pruned(work / "memory").state_dict(), load_pruned(work / "stream").state_dict()
    same_names = a.keys() == b.keys()
    same_shapes = same_names and all(a[k].shape == b[k].shape for k in a)
    max_diff = max(float((a[k] - b[k]).abs().max()) for k in a) if same_shapes else float("nan")
    worst = max(a, key=lambda k: float((a[k] - b[k]).abs().max())) if same_shapes else None
    torch.set_num_threads(2)
    model = load_pruned(work / "stream")
    tokenizer = load_model("smollm2-135m").tokenizer
    ppl = perplexity(model, tokenizer, read_text_file(test), seqlen=PROTOCOL["eval_seqlen"],
                     windows=PROTOCOL["eval_windows"], progress=False).ppl
    print(f"SmolLM2-135M, FLAP {args.sparsity:.0%} (global, bias), calibration 128x128 wiki.train seed 0")
    print(markdown_table([memory, stream], [("run", "run"), ("achieved sparsity", "achieved"), ("wall (s)", "wall_s"),
                                             ("peak RSS (MB)", "peak_rss_mb")]))
    print(f"same kept units per layer: {memory['kept_units'] == stream['kept_units']}; same tensor names and "
          f"shapes: {same_shapes}; max |w_stream - w_memory| over all {len(a)} tensors: {max_diff:.3g} ({worst})")
    print(f"perplexity of the streamed model (32 x 512 wiki.test): {ppl:.2f}")
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    with open(results / "stream_equality.jsonl", "a") as log:
        log.write(json.dumps({"memory": memory, "stream": stream, "max_abs_diff": max_diff, "ppl": ppl,
                              "same_shapes": same_shapes}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
