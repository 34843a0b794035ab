"""The default pipeline against FLAP on SmolLM2-135M (issue 21), on the BENCHMARKS.md protocol.

Each row is one `graphprune compress` command run as a user would (a child process, nothing cached,
wall time of the whole command), then evaluated here: perplexity on wiki.test and fiction (first 32
windows of 512 tokens) and a greedy continuation of a few prompts. Times are ratios to the FLAP
(bias) row measured in the same run.

    python -m bench.default_pipeline                 # every row (about 25 minutes on 2 cores)
    python -m bench.default_pipeline --rows flap-20,default-20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import DENSE_PPL_REFERENCE, PROTOCOL, ROOT, data_file, markdown_table

PROMPTS = ("The capital of France is", "In 1905, Albert Einstein", "The best way to learn a language is")

ROWS = {
    "flap-20": ("--criterion flap --compensate bias, 20% (FLAP's recipe; the time reference)",
                ["--criterion", "flap", "--compensate", "bias", "--sparsity", "0.2"], "wiki"),
    "default-20": ("default, 20%", ["--sparsity", "0.2"], "wiki"),
    "default-50": ("default, 50%", ["--sparsity", "0.5"], "wiki"),
    "flap-50": ("--criterion flap, 50% (least squares by default)", ["--criterion", "flap", "--sparsity", "0.5"],
                "wiki"),
    "flap-bias-50": ("--criterion flap --compensate bias, 50%",
                     ["--criterion", "flap", "--compensate", "bias", "--sparsity", "0.5"], "wiki"),
    "default-20-none": ("default, 20%, --calib none", ["--sparsity", "0.2"], "none"),
    "default-20-news": ("default, 20%, calibrated on news.txt", ["--sparsity", "0.2"], "news"),
}


def calib_args(kind: str) -> list[str]:
    if kind == "none":
        return ["--calib", "none"]
    return ["--calib", str(data_file("wiki.train.txt" if kind == "wiki" else "news.txt"))]


def compress(args: list[str], out: Path) -> dict:
    cache = tempfile.mkdtemp(prefix="graphprune-bench-cache-")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRAPHPRUNE_CALIB_CACHE": cache}
    command = [sys.executable, "-m", "graphprune", "compress", "smollm2-135m", *args,
               "--nsamples", str(PROTOCOL["calib_nsamples"]), "--seqlen", str(PROTOCOL["calib_seqlen"]),
               "--seed", str(PROTOCOL["seed"]), "--no-cache", "--quiet", "--out", str(out), "--force"]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(command)} failed: {proc.stderr.strip()[-500:]}")
    report = json.loads((out / "graphprune_report.json").read_text())
    run = json.loads((out / "graphprune_run.json").read_text())
    return {"wall_s": wall, "report": report, "run": run, "summary": proc.stdout.strip().splitlines()[0]}


def evaluate(model, tokenizer) -> dict:
    import torch

    from graphprune.calibration.text import read_text_file
    from graphprune.evaluate.perplexity import perplexity

    out = {}
    for key, name in (("wiki", "wiki.test.txt"), ("fiction", "fiction.txt")):
        result = perplexity(model, tokenizer, read_text_file(data_file(name)), seqlen=PROTOCOL["eval_seqlen"],
                            windows=PROTOCOL["eval_windows"], progress=False)
        out[f"ppl_{key}"] = result.ppl
    samples = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=32, do_sample=False)
        samples.append(tokenizer.decode(generated[0][ids.shape[1]:], skip_special_tokens=True).strip())
    out["samples"] = samples
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    parser.add_argument("--dir", default=None, help="where the pruned models go (default: a temporary folder)")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    data_file("wiki.train.txt")
    import torch

    torch.set_num_threads(2)
    from graphprune.io.hf import load_pruned
    from graphprune.models import load_model

    dense = load_model("smollm2-135m")
    tokenizer = dense.tokenizer
    results = [{"row": "dense", "command": "dense (SmolLM2-135M-Instruct, fp32)", **evaluate(dense.model, tokenizer)}]
    del dense
    root = Path(args.dir or tempfile.mkdtemp(prefix="graphprune-default-pipeline-"))
    log = ROOT / "bench" / "results"
    log.mkdir(exist_ok=True)
    for name in rows:
        label, extra, calib = ROWS[name]
        out = root / name
        run = compress([*extra, *calib_args(calib)], out)
        model = load_pruned(out)
        r = run["report"]
        row = {"row": name, "command": label, "sparsity": r["params"]["achieved_sparsity"], "wall_s": run["wall_s"],
               "criterion": r["criterion"], "compensate": r["compensate"],
               "sequential": bool((r.get("layerwise") or {}).get("sequential")),
               "timings": run["run"].get("timings_s"), **evaluate(model, tokenizer)}
        results.append(row)
        with open(log / "default_pipeline.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), file=sys.stderr, flush=True)
        del model
    dense_ppl = {k: results[0][f"ppl_{k}"] for k in ("wiki", "fiction")}
    flap_wall = next((r["wall_s"] for r in results if r["row"] == "flap-20"), None)
    for r in results:
        for k in ("wiki", "fiction"):
            r[f"x_{k}"] = r[f"ppl_{k}"] / dense_ppl[k]
        r["x_time"] = r["wall_s"] / flap_wall if flap_wall and r.get("wall_s") else None
    print(f"dense PPL: wiki.test {dense_ppl['wiki']:.2f} (BENCHMARKS.md: {DENSE_PPL_REFERENCE}), "
          f"fiction {dense_ppl['fiction']:.2f}")
    print(markdown_table(results, [("command", "command"), ("sparsity", "sparsity"), ("PPL wiki.test", "ppl_wiki"),
                                   ("× dense", "x_wiki"), ("PPL fiction", "ppl_fiction"), ("× dense", "x_fiction"),
                                   ("wall s", "wall_s"), ("time / FLAP 20%", "x_time")]))
    print("\nGreedy continuations (32 tokens):\n")
    for r in results:
        print(f"- **{r['command']}**")
        for prompt, sample in zip(PROMPTS, r["samples"]):
            print(f"  - {prompt} … {sample!r}")


if __name__ == "__main__":
    main()
