"""Issue 7 benchmark: streaming compress on synthetic Llama-architecture checkpoints of growing size.

Each checkpoint has random weights (normal, std 0.02; norms at 1), is written in bf16 one shard per
layer (the writer never holds more than one layer), and is pruned with FLAP at 50% (global
allocation, bias compensation) on 8 x 128 calibration tokens of the bundled excerpt, in a fresh
child process that reports its wall time and peak RSS. The checkpoint and the output are deleted
after each run unless --keep.

The target is FFN channels (`--target channels`) by default: LlamaConfig requires the hidden size
to be a multiple of the head count, and the allocator does not know it, so removing heads from
these shapes (Llama-2-7B's 32 heads of a 4096 stream) can end in counts the config refuses; that
is a limit of the in-memory pipeline as much as of streaming.

    python -m bench.stream_scale                      # 0.1B, 0.5B, 1.1B, 1.5B, 7B, FLAP
    python -m bench.stream_scale 1.1B 7B --criterion default --sparsity 0.2   # the default pipeline
    python -m bench.stream_scale 0.1B 0.5B --dir /tmp/x
    python -m bench.stream_scale 1.5B --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from bench.common import markdown_table, run_child

ROOT = Path(__file__).resolve().parent.parent
# Llama-architecture shapes: hidden, intermediate, layers, heads, kv heads (head_dim = hidden / heads)
SHAPES = {
    "0.1B": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4),
    "0.5B": dict(hidden_size=1280, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=20,
                 num_key_value_heads=4),
    "1.1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4),  # TinyLlama-1.1B
    "1.5B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=30, num_attention_heads=16,
                 num_key_value_heads=4),
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),  # Llama-2-7B
}
VOCAB = 32000
CALIB = {"nsamples": 8, "seqlen": 128}


def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                       max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                       pad_token_id=None, dtype="bfloat16", **shape)


def write_checkpoint(directory: Path, shape: dict, seed: int = 0) -> dict:
    """A random Llama checkpoint in bf16: one shard for the embedding/norm/head and one per layer,
    with an index. Only one shard's tensors exist in memory at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from graphprune.passes.config import instantiate
    from graphprune.testing.fixtures import byte_level_tokenizer

    directory.mkdir(parents=True)
    config = llama_config(shape)
    config.save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    meta = instantiate(LlamaForCausalLM, config)  # names and shapes only
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    n = config.num_hidden_layers
    groups = [[k for k in shapes if not k.startswith("model.layers.")]]
    groups += [[k for k in shapes if k.startswith(f"model.layers.{i}.")] for i in range(n)]
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for index, names in enumerate(groups):
        file = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        del tensors
    params = sum(math.prod(s) for s in shapes.values())
    index = {"metadata": {"total_parameters": params, "total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return {"params": params, "disk_gb": total / 1e9,
            "layer_params": sum(math.prod(s) for k, s in shapes.items() if k.startswith("model.layers."))}


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def main(argv: list[str]) -> None:
    if len(argv) == 1 and argv[0].startswith("{"):  # the checkpoint writer's child (see below)
        spec = json.loads(argv[0])
        print(json.dumps(write_checkpoint(Path(spec["dir"]), SHAPES[spec["write"]])), flush=True)
        return
    parser = argparse.ArgumentParser(prog="python -m bench.stream_scale")
    parser.add_argument("sizes", nargs="*", default=list(SHAPES), help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--dir", default="/tmp/graphprune_stream_bench",
                        help="where checkpoints and outputs go (needs ~22 GB free for 7B)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target", default="channels")
    parser.add_argument("--criterion", default="flap",
                        help="flap (with bias compensation, the streaming baseline) or default (no --criterion: "
                             "obs + least squares + --sequential)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sizes if s not in SHAPES]
    if unknown:
        sys.exit(f"unknown size(s) {unknown}; choose from {list(SHAPES)}")
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    rows = []
    for size in args.sizes:
        model_dir, out = work / f"llama-{size}", work / f"llama-{size}-pruned"
        for path in (model_dir, out, work / f".{out.name}.partial"):
            shutil.rmtree(path, ignore_errors=True)
        # In a child of its own: a parent that generated 13 GB of weights would itself be large, and
        # its peak would show through the children's ru_maxrss.
        t = time.perf_counter()
        facts = run_child("bench.stream_scale", {"write": size, "dir": str(model_dir)}, timeout=3600)
        if "error" in facts:
            sys.exit(f"writing the {size} checkpoint failed: {facts['error']}")
        written_s = time.perf_counter() - t
        spec = {"model_dir": str(model_dir), "out": str(out), "device": args.device, "dtype": args.dtype,
                "threads": args.threads, "target": args.target, "sparsity": args.sparsity, **CALIB,
                **({"criterion": None} if args.criterion == "default" else
                   {"criterion": args.criterion, "compensate": "bias"})}
        load_before = _load()
        row = run_child("bench._stream_child", spec, timeout=4 * 3600)
        row.update(size=size, pipeline=args.criterion, params_b=facts["params"] / 1e9, disk_gb=facts["disk_gb"], write_ckpt_s=written_s,
                   load_before=load_before, load_after=_load(), layers=SHAPES[size]["num_hidden_layers"])
        if "wall_s" in row:
            row["s_per_bparam"] = row["wall_s"] / row["params_b"]
            row["out_gb"] = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9
        rows.append(row)
        with open(results / "stream_scale.jsonl", "a") as log:
            log.write(json.dumps(row) + "\n")
        print(json.dumps(row), file=sys.stderr, flush=True)
        if not args.keep:
            for path in (model_dir, out, work / f".{out.name}.partial"):
                shutil.rmtree(path, ignore_errors=True)
    pipeline = ("FLAP (bias compensation)" if args.criterion == "flap" else
                "the default pipeline (obs + least squares + --sequential)" if args.criterion == "default" else
                args.criterion)
    print(f"{pipeline} at {args.sparsity:.0%} (global, target {args.target}), calibration {CALIB['nsamples']}x"
          f"{CALIB['seqlen']} tokens, device {args.device}, compute dtype {args.dtype}, {args.threads} threads; "
          f"checkpoints bf16")
    print(markdown_table(rows, [("size", "size"), ("params (B)", "params_b"), ("layers", "layers"),
                                ("disk (GB)", "disk_gb"), ("wall (s)", "wall_s"), ("statistics (s)", "statistics_s"),
                                ("write (s)", "write_s"), ("peak RSS (MB)", "peak_rss_mb"),
                                ("s / B params", "s_per_bparam"), ("sparsity", "achieved"),
                                ("load before", "load_before"), ("load after", "load_after")]))
    _targets(rows)


def _targets(rows: list[dict]) -> None:
    by = {r["size"]: r for r in rows if "peak_rss_mb" in r}
    if "7B" in by:
        print(f"target: peak RSS of 7B <= 4096 MB: {by['7B']['peak_rss_mb']:.0f} MB "
              f"({'met' if by['7B']['peak_rss_mb'] <= 4096 else 'MISSED'})")
    if "7B" in by and "0.5B" in by:
        ratio = by["7B"]["peak_rss_mb"] / by["0.5B"]["peak_rss_mb"]
        print(f"target: peak RSS grows < 2x from 0.5B to 7B: x{ratio:.2f} ({'met' if ratio < 2 else 'MISSED'})")
    timed = [r for r in by.values() if "wall_s" in r]
    if len(timed) >= 2:
        per = [r["s_per_bparam"] for r in timed]
        print("time per billion parameters: " + ", ".join(f"{r['size']} {r['s_per_bparam']:.0f}s" for r in timed)
              + f" (max/min {max(per) / min(per):.2f}; 1.00 = exactly linear)")


if __name__ == "__main__":
    main(sys.argv[1:])
