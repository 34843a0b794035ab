"""Issue 5 benchmark: SmolLM2-135M exported to ONNX dense and pruned (FLAP, 20% and 50% of the decoder
layer parameters, uniform and global allocation): onnxruntime parity with PyTorch, then CPU latency
of dense vs 50% pruned at batch 1 x 512 and 8 x 128 tokens, measured speed-up next to the ideal
(FLOP ratio), with the top op types of an onnxruntime profile.

    python -m bench.onnx_speed              # everything (about 20-30 min on 2 contended cores)
    python -m bench.onnx_speed --threads 2 --runs 10

Pruned models go through save_pruned -> load_pruned (per-layer configs for global allocation)
before export, as a user would. Parity (onnxruntime fp32 against PyTorch fp64) is reported three
times: the export's own check (bundled text, two shapes, one right-padded row), wiki.test text and
random tokens (2 x 128 each), each next to PyTorch's own fp32 error (fp32 vs fp64 logits on the
same inputs) for scale. `--parity-only` skips the latency part. Writes
bench/results/onnx_speed.json (or onnx_parity.json with --parity-only).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import PROTOCOL, ROOT, data_file, markdown_table

VARIANTS = [("dense", None, None), ("uniform-20", "uniform", 0.2), ("global-20", "global", 0.2),
            ("uniform-50", "uniform", 0.5), ("global-50", "global", 0.5)]
SHAPES = [(1, 512), (8, 128)]


def parity_on(model, onnx_path: Path, ids: torch.Tensor) -> dict[str, float]:
    """Max abs logit differences on `ids`: onnxruntime vs PyTorch fp64 and vs PyTorch fp32, and
    PyTorch fp32 vs fp64 (the rounding the fp32 model has anyway)."""
    from graphprune.io.onnx_export import _float64
    from graphprune.io.onnx_files import session, token_feeds

    sess = session(onnx_path)
    got = sess.run(["logits"], token_feeds(sess, ids.numpy()))[0].astype(np.float64)
    with torch.no_grad():
        ref32 = model(input_ids=ids).logits.numpy().astype(np.float64)
        with _float64(model):
            ref64 = model(input_ids=ids).logits.numpy()
    return {"vs_fp64": float(np.abs(got - ref64).max()), "vs_fp32": float(np.abs(got - ref32).max()),
            "torch_fp32": float(np.abs(ref32 - ref64).max())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--parity-only", action="store_true", help="skip the latency measurements")
    parser.add_argument("--work", default=None, help="keep the exported models here (default: a temp dir)")
    args = parser.parse_args()
    train, test = data_file("wiki.train.txt"), data_file("wiki.test.txt")
    torch.set_num_threads(args.threads)

    from graphprune import compress, load_model, load_pruned, save_pruned
    from graphprune.evaluate.onnx_bench import measure
    from graphprune.calibration.text import read_text_file
    from graphprune.io.onnx_export import export_onnx

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="graphprune-onnx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    parity_rows, paths = [], {}
    for name, allocation, sparsity in VARIANTS:
        loaded = load_model("smollm2-135m")
        tokenizer = loaded.tokenizer
        started = time.perf_counter()
        model, report = loaded.model, None
        if allocation:
            result = compress(loaded, criterion="flap", sparsity=sparsity, allocation=allocation,
                              calib=str(train), nsamples=PROTOCOL["calib_nsamples"],
                              seqlen=PROTOCOL["calib_seqlen"], seed=PROTOCOL["seed"], progress=False)
            report = result.report
            save_pruned(result.model, work / f"{name}-hf", tokenizer=tokenizer, report=report, force=True)
            model = load_pruned(work / f"{name}-hf")
        exported = export_onnx(model, work / name, tokenizer=tokenizer, force=True)
        paths[name] = exported.path
        ids = torch.tensor(tokenizer(read_text_file(test)[:20000])["input_ids"][:256]).reshape(2, 128)
        on_text = parity_on(model, exported.path, ids)
        random_ids = torch.randint(0, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
        on_random = parity_on(model, exported.path, random_ids)
        parity_rows.append({
            "model": name, "sparsity": report["params"]["achieved_sparsity"] if report else 0.0,
            "uniform": report["uniform_layers"] if report else True,
            "check_diff": exported.max_abs_diff, "check_torch_fp32": exported.torch_fp32_diff,
            "check_scale": exported.reference_scale, "tolerance": exported.tolerance,
            "text_diff": on_text["vs_fp64"], "text_vs_fp32": on_text["vs_fp32"],
            "text_torch_fp32": on_text["torch_fp32"], "random_diff": on_random["vs_fp64"],
            "random_torch_fp32": on_random["torch_fp32"],
            "abs_1e-4": "pass" if max(exported.max_abs_diff, on_text["vs_fp64"]) <= 1e-4 else "over",
            "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(parity_rows[-1]), flush=True)
        del model, loaded

    print("\nParity (max abs logit difference, onnxruntime fp32 vs PyTorch fp64; PyTorch's own fp32 error for scale):")
    print(markdown_table(parity_rows, [("model", "model"), ("layer sparsity", "sparsity"), ("uniform", "uniform"),
                                       ("export check", "check_diff"), ("torch fp32 there", "check_torch_fp32"),
                                       ("max |logit|", "check_scale"), ("tolerance", "tolerance"),
                                       ("wiki.test 2x128", "text_diff"),
                                       ("vs torch fp32", "text_vs_fp32"), ("torch fp32 there", "text_torch_fp32"),
                                       ("random 2x128", "random_diff"), ("torch fp32 there", "random_torch_fp32"),
                                       ("text <= 1e-4", "abs_1e-4"), ("s", "seconds")]))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    if args.parity_only:
        (out / "onnx_parity.json").write_text(json.dumps({"parity": parity_rows}, indent=1) + "\n")
        return
    speed_rows = []
    for batch, seqlen in SHAPES:
        dense = measure(paths["dense"], batch, seqlen, warmup=args.warmup, runs=args.runs, threads=args.threads,
                        profile=True)
        speed_rows.append(_row("dense", dense, None))
        for name in ("uniform-50", "global-50"):
            m = measure(paths[name], batch, seqlen, warmup=args.warmup, runs=args.runs, threads=args.threads,
                        profile=True)
            speed_rows.append(_row(name, m, dense))
            print(json.dumps(speed_rows[-1]), flush=True)

    print(f"\nCPU latency, onnxruntime {args.threads} threads, {args.runs} runs after {args.warmup} warm-up:")
    print(markdown_table(speed_rows, [("model", "model"), ("shape", "shape"), ("median ms", "median_ms"),
                                      ("p90 ms", "p90_ms"), ("tokens/s", "tokens_per_s"), ("GFLOP", "gflops"),
                                      ("speed-up", "speedup"), ("ideal", "ideal"), ("of ideal", "of_ideal"),
                                      ("profile (share of node time)", "profile")]))
    (out / "onnx_speed.json").write_text(json.dumps({"parity": parity_rows, "speed": speed_rows}, indent=1) + "\n")


def _row(name, m, dense) -> dict:
    row = {"model": name, "shape": f"{m.batch}x{m.seqlen}", "median_ms": m.median_ms, "p90_ms": m.p90_ms,
           "tokens_per_s": m.tokens_per_s, "gflops": m.gflops,
           "profile": ", ".join(f"{op} {share:.0%}" for op, share in m.profile_top[:4])}
    if dense is not None:
        row["speedup"] = dense.median_ms / m.median_ms
        row["ideal"] = dense.gflops / m.gflops
        row["of_ideal"] = row["speedup"] / row["ideal"]
    return row


if __name__ == "__main__":
    main()
