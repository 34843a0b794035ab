"""Public baseline: Torch-Pruning 1.6.1 magnitude pruning of SmolLM2-135M on the protocol of
../shared/BENCHMARKS.md, so the benchmark table can show it beside graphprune's criteria.

    python -m bench.torch_pruning_baseline                 # ffn:0.2 ffn:0.5 heads:0.2
    python -m bench.torch_pruning_baseline ffn:0.2         # selected configurations
    python -m bench.torch_pruning_baseline --prune-timeout 300 heads:0.2

Configurations (`units:target`):

- `ffn`: `tp.pruner.MetaPruner` with `tp.importance.MagnitudeImportance(p=2)` (TP's default group
  reduction and normalizer), local (per-group) ranking, hidden dimension kept: o_proj, down_proj,
  lm_head and embed_tokens are ignored, and so are q_proj/k_proj/v_proj, so that only FFN channels
  (gate/up rows + down columns) are pruned. The pruning ratio is chosen from the model's parameter
  counts so that the same number of channels goes from every layer and the achieved decoder-layer
  sparsity is the nearest reachable to the target.
- `heads`: the same plus the attention projections as prunable, with TP's head pruning
  (`num_heads` for q/k/v, `prune_num_heads=True`, `prune_head_dims=False`,
  `head_pruning_ratio` = the FFN ratio, as TP's examples/LLMs/prune_llm.py does). On transformers 5.x
  this never gets past `MetaPruner(...)`: the dependency walk through the rotary embedding
  (rotate_half = slice + cat) maps channel indices to ever larger values, so the group of q_proj
  grows forever. The run is stopped after `--prune-timeout` seconds and recorded as such.

Each configuration runs in its own process (`--child`) so that peak RSS is that configuration's
alone. Prune time is the Torch-Pruning part (MetaPruner construction, which traces the
DependencyGraph, plus `step()`); total time adds model loading. Peak RSS is read right after
pruning, before evaluation. PPL: graphprune.evaluate.perplexity on wiki.test.txt (32 x 512 tokens).
The pruned model is then saved with save_pretrained and reloaded with transformers to check that
a standard config describes it ("reloads").

Results are appended to bench/results/torch_pruning.jsonl and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.common import DENSE_PPL_REFERENCE, PROTOCOL, ROOT, data_file, markdown_table, peak_rss_mb

DEFAULT_GRID = [("ffn", 0.2), ("ffn", 0.5), ("heads", 0.2)]
TRACE_TOKENS = 64  # example input for TP's trace: the first tokens of wiki.train.txt
STAGE = "@stage "


# --------------------------------------------------------------------------------------------- child

def _stage(name: str) -> None:
    # Wall-clock time, so that the parent can tell how long the last stage ran when the child stops.
    print(f"{STAGE}{name} {time.time():.1f}", file=sys.stderr, flush=True)


def _decoder_params(model) -> int:
    return sum(p.numel() for p in model.model.layers.parameters())


def _ffn_ratio(model, target: float) -> tuple[float, int]:
    """Ratio for MetaPruner so that `k` FFN channels go from every layer, `k` the count whose
    decoder-layer sparsity is nearest `target`. TP keeps int(width * (1 - ratio)) channels per
    group, so ratio = (k - 0.5) / width gives exactly k."""
    layers = model.model.layers
    width = layers[0].mlp.up_proj.out_features
    mlp = layers[0].mlp
    per_channel = mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features  # no biases
    k = round(target * _decoder_params(model) / (len(layers) * per_channel))
    k = max(1, min(width - 1, k))
    return (k - 0.5) / width, k


def child(spec: dict) -> None:
    import faulthandler

    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    t0 = time.perf_counter()
    _stage("import")
    import torch_pruning as tp
    from importlib.metadata import version

    import transformers

    from graphprune.calibration.text import read_text_file, tokenize_text
    from graphprune.evaluate.perplexity import perplexity
    from graphprune.models import load_model

    out = {**spec, "torch_pruning": version("torch-pruning"), "transformers": transformers.__version__,
           "torch": torch.__version__}
    _stage("load model")
    loaded = load_model(spec.get("model", "smollm2-135m"))
    model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    cfg = model.config
    layers = model.model.layers
    before = _decoder_params(model)
    total_before = sum(p.numel() for p in model.parameters())
    ratio, k = _ffn_ratio(model, spec["target"])
    out.update(ffn_ratio=ratio, ffn_channels_per_layer=k)

    ids = tokenize_text(tokenizer, read_text_file(data_file("wiki.train.txt"))[:4000])[:TRACE_TOKENS]
    example_inputs = {"input_ids": ids.view(1, -1)}
    ignored = [model.lm_head, model.model.embed_tokens]
    for layer in layers:
        ignored += [layer.self_attn.o_proj, layer.mlp.down_proj]
    kwargs = {}
    if spec["units"] == "ffn":
        for layer in layers:
            ignored += [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
    elif spec["units"] == "heads":
        num_heads = {}
        for layer in layers:
            num_heads[layer.self_attn.q_proj] = cfg.num_attention_heads
            num_heads[layer.self_attn.k_proj] = cfg.num_key_value_heads
            num_heads[layer.self_attn.v_proj] = cfg.num_key_value_heads
        kwargs = dict(num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio)
    else:
        raise SystemExit(f"unknown units {spec['units']!r} (ffn or heads)")

    limit = int(spec.get("prune_timeout", 600))
    # If TP hangs, dump where it is and exit: the parent reports the stage and the frames.
    faulthandler.dump_traceback_later(limit, exit=True)
    started = time.perf_counter()
    _stage("MetaPruner init (DependencyGraph trace + group enumeration)")
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=example_inputs, importance=tp.importance.MagnitudeImportance(p=2),
        global_pruning=False, pruning_ratio=ratio, ignored_layers=ignored,
        output_transform=lambda o: o.logits, **kwargs)
    out["init_s"] = time.perf_counter() - started
    _stage("MetaPruner.step")
    pruner.step()
    out["prune_s"] = time.perf_counter() - started
    out["total_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    faulthandler.cancel_dump_traceback_later()

    after = _decoder_params(model)
    out.update(decoder_params=before, decoder_params_removed=before - after, achieved=(before - after) / before,
               total_params=total_before, total_params_after=sum(p.numel() for p in model.parameters()))
    ffn = sorted({l.mlp.up_proj.out_features for l in layers})
    q = sorted({l.self_attn.q_proj.out_features for l in layers})
    kv = sorted({l.self_attn.k_proj.out_features for l in layers})
    hidden = sorted({model.model.embed_tokens.embedding_dim, *(l.self_attn.o_proj.out_features for l in layers),
                     *(l.mlp.down_proj.out_features for l in layers)})
    out.update(ffn_width=ffn, q_out=q, kv_out=kv, hidden=hidden)
    pruned = []
    if ffn != [cfg.intermediate_size]:
        pruned.append(f"FFN {cfg.intermediate_size}->{'/'.join(map(str, ffn))}")
    if q != [cfg.num_attention_heads * model.model.layers[0].self_attn.head_dim] or \
            kv != [cfg.num_key_value_heads * model.model.layers[0].self_attn.head_dim]:
        pruned.append(f"q_out {'/'.join(map(str, q))}, kv_out {'/'.join(map(str, kv))}")
    out["pruned"] = "; ".join(pruned) or "nothing"
    # Keep the config in step with the weights so that the model reloads (uniform widths only).
    if len(ffn) == 1:
        cfg.intermediate_size = ffn[0]

    _stage("perplexity")
    text = read_text_file(data_file("wiki.test.txt"))
    t = time.perf_counter()
    ppl = perplexity(model, tokenizer, text, seqlen=PROTOCOL["eval_seqlen"], windows=PROTOCOL["eval_windows"],
                     progress=False)
    out.update(ppl=ppl.ppl, eval_s=time.perf_counter() - t, eval_tokens=ppl.tokens)

    _stage("reload check")
    out["reloads"] = _reloads(model, example_inputs["input_ids"])
    print(json.dumps(out), flush=True)


def _reloads(model, ids) -> str:
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    try:
        with tempfile.TemporaryDirectory() as d, torch.no_grad():
            model.save_pretrained(d)
            again = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            diff = (again(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
        return "yes" if diff < 1e-4 else f"no (logits differ by {diff:.3g})"
    except Exception as e:  # noqa: BLE001 - report any failure to reload as the answer
        return f"no ({type(e).__name__}: {str(e)[:120]})"


# -------------------------------------------------------------------------------------------- parent

def run_config(units: str, target: float, prune_timeout: int, threads: int) -> dict:
    spec = {"method": "torch-pruning magnitude", "units": units, "target": target, "threads": threads,
            "prune_timeout": prune_timeout}
    cmd = [sys.executable, "-m", "bench.torch_pruning_baseline", "--child", json.dumps(spec)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=prune_timeout + 900)  # backstop; the child stops itself at prune_timeout
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout, stderr, rc = _text(e.stdout), _text(e.stderr), "killed"
    wall = time.perf_counter() - started
    ended = time.time()
    lines = [l for l in stdout.splitlines() if l.startswith("{")]
    if rc == 0 and lines:
        row = json.loads(lines[-1])
        row["wall_s"] = wall
        return row
    return {**spec, "wall_s": wall, "returncode": rc, **_failure(stderr, ended, prune_timeout)}


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _failure(stderr: str, ended: float, limit: int) -> dict:
    """What the child was doing when it stopped: last stage and, for a hang, TP's frames."""
    stages = [l[len(STAGE):].rsplit(" ", 1) for l in stderr.splitlines() if l.startswith(STAGE)]
    stage, since = (stages[-1][0], float(stages[-1][1])) if stages else ("start", ended)
    frames = re.findall(r'File "[^"]*?(torch_pruning/[^"]+)", line (\d+) in (\w+)', stderr)
    timed_out = "Timeout (" in stderr
    if timed_out:
        where = " <- ".join(f"{f} ({p}:{n})" for p, n, f in frames[:4])
        error = f"did not finish in {limit} s (stopped); stuck in {where}" if where else \
            f"did not finish in {limit} s (stopped)"
    else:
        tail = [l for l in stderr.splitlines() if l.strip() and not l.startswith(STAGE)]
        error = (tail[-1] if tail else "failed")[:300]
    return {"error": error, "stage": stage, "stage_ran_s": ended - since if stages else None,
            "timed_out": timed_out}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.torch_pruning_baseline", description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="*", help="units:target, units in {ffn, heads}; default: ffn:0.2 ffn:0.5 heads:0.2")
    ap.add_argument("--prune-timeout", type=int, default=600, help="seconds Torch-Pruning may take (default 600)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child (default 1)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    data_file("wiki.train.txt")
    data_file("wiki.test.txt")
    grid = [(c.split(":")[0], float(c.split(":")[1])) for c in args.configs] if args.configs else DEFAULT_GRID
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    rows = []
    with open(results_dir / "torch_pruning.jsonl", "a") as log:
        for units, target in grid:
            row = run_config(units, target, args.prune_timeout, args.threads)
            log.write(json.dumps(row) + "\n")
            log.flush()
            if row.get("ppl"):
                row["x_dense"] = row["ppl"] / DENSE_PPL_REFERENCE
            if row.get("achieved") is not None:
                row["achieved_str"] = f"{row['achieved']:.5f}"
            if row.get("ffn_ratio") is not None:
                row["ratio_str"] = f"{row['ffn_ratio']:.5f}"
            if row.get("error") and row.get("stage_ran_s") is not None:
                row["error"] = f"{row['error']} [stage '{row['stage']}' ran {row['stage_ran_s']:.0f} s]"
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"dense PPL reference (BENCHMARKS.md): {DENSE_PPL_REFERENCE}; threads per run: {args.threads}")
    print(markdown_table(rows, [("method", "method"), ("units", "units"), ("target", "target"),
                                ("TP ratio", "ratio_str"), ("pruned", "pruned"), ("achieved", "achieved_str"),
                                ("PPL", "ppl"), ("× dense", "x_dense"), ("prune s", "prune_s"),
                                ("total s", "total_s"), ("peak RSS MB", "peak_rss_mb"), ("reloads", "reloads"),
                                ("error", "error")]))


if __name__ == "__main__":
    main(sys.argv[1:])
