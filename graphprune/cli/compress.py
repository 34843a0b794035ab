"""`graphprune compress`: one command for every backend (in memory, streamed, ONNX)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from .main import criterion_option, damping, fraction, positive_int, print_export


def add_compress_parser(sub, model_args) -> argparse.ArgumentParser:
    p = sub.add_parser("compress", help="prune a model and write the smaller one")
    model_args(p)
    p.add_argument("--criterion", default=None,
                   help="default flap; with --target experts an expert criterion (easyep default, reap, frequency, "
                        "random)")
    p.add_argument("--sparsity", type=fraction, default=0.2,
                   help="fraction of layer parameters to remove; with --target experts alone, of routed experts")
    p.add_argument("--allocation", default=None, choices=["uniform", "global", "cfsp"],
                   help="default: global for decoders, uniform for encoders (keeps shapes AutoModel can load)")
    p.add_argument("--target", default=None,
                   help="comma list of: channels (inside routed experts too), heads (whole KV groups under GQA), "
                        "query-heads, experts (routed MoE experts, removed first), expert-channels (channels inside "
                        "routed experts only); default: channels,heads where the config can express head removal, "
                        "else channels")
    p.add_argument("--calib", action="append", default=None,
                   help="text file, 'default' (bundled excerpt, the default), hf:dataset, or 'none' (the model "
                        "generates its own calibration text; weight-only criteria need none); encoders: a .jsonl/.tsv "
                        "pair file or a text to derive (first sentence, rest of paragraph) pairs from. Repeat to "
                        "combine domains for expert criteria (per-layer normalised scores of each are added)")
    p.add_argument("--calib-general", default=None,
                   help="gaprune: the general-domain set beside the --calib domain set (same formats)")
    p.add_argument("--expert-criterion", default=None, help="expert criterion of a combined target (default easyep)")
    p.add_argument("--expert-sparsity", type=fraction, default=None,
                   help="fraction of routed experts to remove (default: --sparsity)")
    p.add_argument("--expert-allocation", default="uniform", choices=["uniform", "global"],
                   help="uniform: same expert count in every layer (plain from_pretrained); global: per-layer "
                        "counts from globally normalised scores (graphprune.load_pruned)")
    p.add_argument("--nsamples", type=positive_int, default=128, help="windows (decoders) or pairs (encoders)")
    p.add_argument("--seqlen", type=positive_int, default=128, help="tokens per window, or per text (encoders)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compensate", choices=["none", "bias", "lsq"], default=None,
                   help="what the consumer layers do about removed inputs: bias (FLAP's mean), lsq (least-squares "
                        "refit of the kept weights and bias); default: bias for flap, lsq for obs, none otherwise")
    p.add_argument("--option", action="append", default=[], type=criterion_option, metavar="KEY=VALUE",
                   help="an option of the criterion (repeatable), e.g. metric=IFV for flap, scale=output for obs; "
                        "`graphprune criteria` lists them")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate each layer's compensation on the outputs of the already pruned layers")
    p.add_argument("--damp", type=damping, default=0.01,
                   help="least-squares damping: this fraction of mean(diag H) is added to H (default 0.01)")
    p.add_argument("--round-to", type=positive_int, default=1, help="keep channel counts a multiple of this")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace an earlier graphprune output at --out")
    p.add_argument("--no-cache", action="store_true", help="recompute calibration statistics")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--export", choices=["onnx"], default=None,
                   help="also write model.onnx into --out (parity-checked in onnxruntime)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="prune a safetensors folder one layer at a time, never loading the whole model; default: "
                        "on when the model would not fit in the available memory in fp32")
    p.add_argument("--resume", action="store_true",
                   help="--stream: continue an interrupted run from its last finished layer")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default=None,
                   help="--stream: where each layer runs during calibration (default cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="--stream: precision of the calibration forward (default fp32; statistics are "
                        "accumulated in float64, the output keeps the stored dtype)")
    p.set_defaults(func=cmd_compress)
    return p


def options_from(args):
    from ..pipeline.options import CompressOptions

    calibs = args.calib or ["default"]  # --calib repeats: several domains for the expert criteria
    return CompressOptions(
        criterion=args.criterion, sparsity=args.sparsity, allocation=args.allocation, target=args.target,
        calib=calibs[0] if len(calibs) == 1 else calibs, calib_general=args.calib_general,
        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, compensate=args.compensate,
        sequential=args.sequential, damp=args.damp, round_to=args.round_to, criterion_options=dict(args.option),
        expert_criterion=args.expert_criterion, expert_sparsity=args.expert_sparsity,
        expert_allocation=args.expert_allocation, use_cache=not args.no_cache, progress=not args.quiet,
        stream=args.stream, resume=args.resume, device=args.device, dtype=args.dtype, out=args.out,
        force=args.force, export=args.export, release_input=True,
        trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)


def cmd_compress(args) -> int:
    from ..calibration.pairs import PAIR_FILE_SUFFIXES, read_pairs
    from ..pipeline.run import compress

    options = options_from(args).resolved()  # every option-only mistake fails before the model loads
    for source in (*options.calib_sources, options.calib_general):
        if source and Path(str(source)).suffix.lower() in PAIR_FILE_SUFFIXES:
            read_pairs(source)  # a malformed pair file fails in a second, before the model loads
    partial = _stream_work_dir(args.out)
    try:
        result = compress(args.model, options)
    except BaseException as error:
        # A streamed run that stops (a crash, Ctrl-C, SIGTERM, a full disk) keeps what is finished for
        # --resume. (Bad inputs fail before the work directory exists; a partial run in the way says so.)
        from ..backends.stream.workdir import PartialRunError

        if partial is not None and partial.exists() and not isinstance(error, PartialRunError):
            print(f"graphprune: the finished layers are kept in {partial}; rerun the same command with --resume to "
                  f"continue", file=sys.stderr)
        raise
    print_summary(result.report, result.out, args)
    for export in result.exported:
        print_export(export)
    return 0


def _stream_work_dir(out: str) -> Path | None:
    if not str(out).strip():
        return None
    resolved = Path(out).expanduser().resolve()
    return resolved.parent / f".{resolved.name}.partial"


def _counts(per_layer: dict[str, int]) -> str:
    values = set(per_layer.values())
    return str(values.pop()) if len(values) == 1 else ", ".join(f"{k}:{v}" for k, v in per_layer.items())


def print_summary(r: dict, out: Path, args) -> None:
    """What the user reads after a run: removed parameters, notes, and where the output is."""
    p, f = r["params"], r["flops_per_token"]
    onnx = r.get("frontend") == "onnx"
    how = f"{r['criterion']} / {r['allocation']}" + (" (ONNX-native)" if onnx else "")
    total = "" if onnx else f"; total {p['before']:,} -> {p['after']:,}"
    print(f"{r['model']}: {how} removed {p['layers_before'] - p['layers_after']:,} of {p['layers_before']:,} layer "
          f"parameters (sparsity {p['achieved_sparsity']:.4f}, asked {r['requested_sparsity']}){total}; "
          f"FLOPs/token {f['before']:.3g} -> {f['after']:.3g}"
          + (f"; {len(r['shape_constants_rewritten'])} shape constant(s) rewritten" if onnx else ""))
    if r.get("experts"):
        e = r["experts"]
        print(f"experts: {e['criterion']} / {e['allocation']} removed {e['experts_removed']} of {e['experts_before']} "
              f"routed experts; kept per layer {_counts(e['kept_per_layer'])}")
    if r.get("target_note"):
        print(f"note: {r['target_note']}")
    if args.calib == "none" or args.calib == ["none"]:
        cal = r.get("calibration")
        print("calibration: none needed (weight-only criterion and compensation)" if cal is None else
              f"calibration: --calib none, so the model generated its own {cal['nsamples']}x{cal['seqlen']} tokens "
              f"(seed {cal['seed']}, temperature {cal['generation']['temperature']}); the text is in the report")
    if r.get("floored_groups"):
        print(f"note: {len(r['floored_groups'])} group(s) kept their last unit instead of being removed entirely "
              f"(floor); the rest of the budget went elsewhere")
    if r.get("blocked_groups"):
        first = r["blocked_groups"][0]
        print(f"note: {len(r['blocked_groups'])} group(s) were left unpruned because an op has no dimension rule, "
              f"e.g. {first['scope']} ({first['kind']}): {first['reason']}")
    if onnx:
        print(f"wrote {out} (validated in onnxruntime) in {r['timings_s']['total']:.1f}s")
        return
    layout = "uniform layers: loads with transformers' from_pretrained" if r["uniform_layers"] else \
        "per-layer sizes: load with graphprune.load_pruned(path)"
    print(f"wrote {out} ({layout}) in {r['timings_s']['total']:.1f}s")
    s = r.get("streaming")
    if s:
        print(f"streamed {s['layers']} layers on {s['device']} ({s['dtype']}) into {s['shards']} shards; peak RSS "
              f"{r['peak_rss_mb']:.0f} MB")
