"""`graphprune` command line: a thin layer over the Python API.

User mistakes (`UserError`) print one line and exit 2; bugs print a short message with a hint to
report them (the traceback with --debug) and exit 1; Ctrl-C / SIGTERM exit 130 / 143 after removing
any partial output.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import warnings
from pathlib import Path

from .errors import GraphpruneError, GraphpruneWarning, UserError, ValidationError


class Terminated(BaseException):
    """Raised from the SIGTERM handler so `finally` blocks clean up like on Ctrl-C."""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not strictly between 0 and 1")
    return value


def _damping(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 10.0:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 10]")
    return value


def _criterion_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    for cast in (int, float):
        try:
            return key.strip(), cast(value)
        except ValueError:
            pass
    return key.strip(), value.strip()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _load(spec: str, args):
    from .models import load_model

    return load_model(spec, allow_pickle=getattr(args, "allow_pickle", False),
                      trust_remote_code=getattr(args, "trust_remote_code", False))


def cmd_inspect(args) -> int:
    from .graph import analyze
    from .graph.report import render

    loaded = _load(args.model, args)
    if loaded.model is None:
        from .graph.trace_onnx import analyze_onnx

        groups = analyze_onnx(loaded.onnx_model, seq_len=args.seq_len)
    else:
        groups = analyze(loaded.model, seq_len=args.seq_len)
    print(groups.to_json() if args.json else render(groups, show_fixed=args.all))
    return 0


def cmd_compress(args) -> int:
    from .export import prepare_output, save_pruned
    from .guards import model_bytes
    from .pipeline import check_options, compress

    experts = {"expert_criterion": args.expert_criterion, "expert_sparsity": args.expert_sparsity,
               "expert_allocation": args.expert_allocation}
    calibs = args.calib or ["default"]  # --calib repeats: several domains for the expert criteria
    args.calib = calibs[0] if len(calibs) == 1 else calibs
    check_options(criterion=args.criterion, sparsity=args.sparsity, allocation=args.allocation, target=args.target,
                  compensate=args.compensate, round_to=args.round_to, sequential=args.sequential,
                  calib_general=args.calib_general, calib_sources=len(calibs), **experts)
    options = dict(args.option) or None
    if options:
        from . import criteria

        criteria.get(args.criterion or "flap", **options)  # an unknown option fails before the model loads
    from .data.pairs import PAIR_FILE_SUFFIXES, read_pairs

    for source in (*calibs, args.calib_general):
        if source and Path(source).suffix.lower() in PAIR_FILE_SUFFIXES:
            read_pairs(source)  # a malformed pair file fails in a second, before the model loads
    from .stream.cli import compress_stream, wants_stream

    if wants_stream(args):
        return compress_stream(args, _print_compress_summary)
    loaded = _load(args.model, args)
    if loaded.kind == "onnx":
        return _compress_onnx(args, loaded)
    # A lower bound of the output's size (pruning keeps at least 1 - sparsity of the layers and all
    # the rest; 0.9 absorbs the allocator's rounding): a disk too small for it fails now, not at the end.
    needed = int(0.9 * (1 - args.sparsity) * model_bytes(loaded.model)) if loaded.model is not None else 0
    out = prepare_output(args.out, inputs=loaded.inputs, force=args.force, needed_bytes=needed)
    result = compress(loaded, criterion=args.criterion, sparsity=args.sparsity, allocation=args.allocation,
                      target=args.target, calib=args.calib, calib_general=args.calib_general,
                      nsamples=args.nsamples, seqlen=args.seqlen,
                      seed=args.seed, compensate=args.compensate, round_to=args.round_to,
                      progress=not args.quiet, use_cache=not args.no_cache, release_input=True,
                      sequential=args.sequential, damp=args.damp, criterion_options=options, **experts)
    source_dir = loaded.path if loaded.path.is_dir() else None
    exported = []
    also = None
    if args.export == "onnx":
        from .export.onnx import write_onnx

        def also(tmp):  # inside the temporary output: a failed parity check writes nothing
            exported.append(write_onnx(result.model, tmp, tokenizer=loaded.tokenizer))
    save_pruned(result.model, out, tokenizer=loaded.tokenizer, report=result.report, source_dir=source_dir,
                force=args.force, also=also)
    _print_compress_summary(result.report, out, args)
    for e in exported:
        _print_export(e)
    return 0


def _print_compress_summary(r: dict, out: Path, args) -> None:
    p = r["params"]
    print(f"{r['model']}: {r['criterion']} / {r['allocation']} removed {p['layers_before'] - p['layers_after']:,} of "
          f"{p['layers_before']:,} layer parameters (sparsity {p['achieved_sparsity']:.4f}, asked {r['requested_sparsity']}); "
          f"total {p['before']:,} -> {p['after']:,}; FLOPs/token {r['flops_per_token']['before']:.3g} -> "
          f"{r['flops_per_token']['after']:.3g}")
    if r.get("experts"):
        e = r["experts"]
        print(f"experts: {e['criterion']} / {e['allocation']} removed {e['experts_removed']} of {e['experts_before']} "
              f"routed experts; kept per layer {_counts(e['kept_per_layer'])}")
    if r.get("target_note"):
        print(f"note: {r['target_note']}")
    if args.calib == "none":
        cal = r.get("calibration")
        print("calibration: none needed (weight-only criterion and compensation)" if cal is None else
              f"calibration: --calib none, so the model generated its own {cal['nsamples']}x{cal['seqlen']} tokens "
              f"(seed {cal['seed']}, temperature {cal['generation']['temperature']}); the text is in the report")
    layout = "uniform layers: loads with transformers' from_pretrained" if r["uniform_layers"] else \
        "per-layer sizes: load with graphprune.load_pruned(path)"
    if r["floored_groups"]:
        print(f"note: {len(r['floored_groups'])} group(s) kept their last unit instead of being removed entirely "
              f"(floor); the rest of the budget went elsewhere")
    if r.get("blocked_groups"):
        first = r["blocked_groups"][0]
        print(f"note: {len(r['blocked_groups'])} group(s) were left unpruned because an op has no dimension rule, "
              f"e.g. {first['scope']} ({first['kind']}): {first['reason']}")
    print(f"wrote {out} ({layout}) in {r['timings_s']['total']:.1f}s")


def _print_export(e) -> None:
    print(f"wrote {e.path} ({e.exporter}, opset {e.opset}; inputs {', '.join(e.inputs)} -> {e.output}, dynamic "
          f"batch/sequence, no KV cache); onnxruntime parity: max abs {e.output} diff {e.max_abs_diff:.3g} "
          f"vs PyTorch {e.reference} (tolerance {e.tolerance:.3g}"
          + (f"; PyTorch fp32 itself differs by {e.torch_fp32_diff:.3g})" if e.torch_fp32_diff is not None else ")"))
    for note in e.notes:
        print(f"note: {note}")


def cmd_export(args) -> int:
    from .export import prepare_output
    from .export.onnx import export_onnx

    if args.atol <= 0:
        raise UserError("--atol must be positive")
    loaded = _load(args.model, args)
    if loaded.model is None:
        raise UserError(f"{args.model} is already ONNX; export takes a PyTorch model (alias, HF or graphprune directory)")
    out = prepare_output(args.out, inputs=loaded.inputs, force=args.force)
    source_dir = loaded.path if loaded.path.is_dir() else None
    result = export_onnx(loaded.model, out, tokenizer=loaded.tokenizer, exporter=args.exporter, opset=args.opset,
                         atol=args.atol, force=args.force, source_dir=source_dir)
    _print_export(result)
    return 0


def _compress_onnx(args, loaded) -> int:
    from .onnx_io import prepare_output_file, save_model_atomically
    from .onnx_native import compress_onnx

    if args.export:
        raise UserError("--export applies to PyTorch models; an ONNX input is written as ONNX already")
    if args.sequential:
        raise UserError("--sequential runs PyTorch blocks one by one; it is not available for ONNX input")
    out = prepare_output_file(args.out, inputs=loaded.inputs, force=args.force)
    result = compress_onnx(loaded.onnx_model, criterion=args.criterion, sparsity=args.sparsity,
                           allocation=args.allocation or "global", target=args.target, calib=args.calib,
                           nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, compensate=args.compensate, round_to=args.round_to,
                           tokenizer=loaded.tokenizer, progress=not args.quiet,
                           criterion_options=dict(args.option) or None)
    r = result.report
    entry = result.model.metadata_props.add()
    entry.key, entry.value = "graphprune_report", json.dumps(r, sort_keys=True, default=str)
    save_model_atomically(result.model, out, force=args.force)
    p, f = r["params"], r["flops_per_token"]
    print(f"{loaded.name}: {r['criterion']} / {r['allocation']} (ONNX-native) removed "
          f"{p['layers_before'] - p['layers_after']:,} of {p['layers_before']:,} layer parameters (sparsity "
          f"{p['achieved_sparsity']:.4f}, asked {r['requested_sparsity']}); FLOPs/token {f['before']:.3g} -> "
          f"{f['after']:.3g}; {len(r['shape_constants_rewritten'])} shape constant(s) rewritten")
    if r["ops_without_rule"]:
        named = ", ".join(f"{b['op']} at {b['location']}" for b in r["ops_without_rule"][:3])
        print(f"note: groups read by ops without a dimension rule are blocked and were not pruned: {named}")
    print(f"wrote {out} (validated in onnxruntime) in {r['timings_s']['total']:.1f}s")
    return 0


def cmd_bench(args) -> int:
    from .bench_onnx import bench, parse_list, render, to_json

    if args.shapes:
        shapes = []
        for part in args.shapes.split(","):
            b, _, t = part.strip().partition("x")
            shapes.append(tuple(parse_list(f"{b},{t}", "shapes")) if b and t else None)
        if not shapes or any(s is None or len(s) != 2 for s in shapes):
            raise UserError(f"--shapes must look like 1x512,8x128, got '{args.shapes}'")
    else:
        shapes = [(b, t) for b in parse_list(args.batch, "batch") for t in parse_list(args.seqlen, "seqlen")]
    rows, note = bench(args.model, baseline=args.baseline, provider=args.provider,
                       allow_fallback=args.allow_fallback, shapes=shapes, warmup=args.warmup, runs=args.runs,
                       threads=args.threads, profile=args.profile)
    provider = "cpu" if note else args.provider
    print(to_json(rows, provider, note) if args.json else render(rows, provider))
    if note and not args.json:
        print(f"note: {note}")
    return 0


def _counts(per_layer: dict[str, int]) -> str:
    values = set(per_layer.values())
    return str(values.pop()) if len(values) == 1 else ", ".join(f"{k}:{v}" for k, v in per_layer.items())


def cmd_eval(args) -> int:
    from .data.calibration import read_text_file
    from .data.perplexity import perplexity
    from .embedding import is_encoder

    loaded = _load(args.model, args)
    if loaded.model is None or loaded.tokenizer is None:
        raise UserError("eval needs a PyTorch language model with a tokenizer")
    if is_encoder(loaded.model):
        return _eval_retrieval(loaded, args)
    text = read_text_file(args.data)
    result = perplexity(loaded.model, loaded.tokenizer, text, seqlen=args.seqlen, windows=args.windows,
                        progress=not args.quiet)
    if args.json:
        print(json.dumps({"ppl": result.ppl, "nll": result.nll_mean, "windows": result.windows,
                          "seqlen": args.seqlen}))
    else:
        print(f"perplexity {result.ppl:.4f} over {result.windows} windows of {args.seqlen} tokens")
    return 0


def _eval_retrieval(loaded, args) -> int:
    """Embedding models: retrieval over the evaluation side of the pair split of --data."""
    from .data.pairs import load_pairs
    from .embedding import pooling_of, retrieval

    pairs = load_pairs(args.data, "all" if args.all_pairs else "evaluation", limit=args.pairs, seed=0)
    pooling = pooling_of(loaded.path if loaded.path.is_dir() else None)
    result = retrieval(loaded.model, loaded.tokenizer, pairs, pooling, max_length=args.seqlen)
    if args.json:
        print(json.dumps({"recall_at_1": result.recall_at_1, "mrr": result.mrr, "pairs": result.pairs,
                          "split": "all" if args.all_pairs else "evaluation", "pooling": pooling.mode}))
    else:
        print(f"retrieval over {result.pairs} pairs: recall@1 {result.recall_at_1:.4f}, MRR {result.mrr:.4f}")
    return 0


def cmd_criteria(args) -> int:
    from . import criteria

    for name in criteria.available():
        scorer = criteria.get(name)
        doc = (scorer.__doc__ or "").strip().splitlines()[0]
        print(f"{name:<12} {doc}")
        for option, meaning in scorer.option_help.items():
            print(f"{'':<12}   --option {option}=...  {meaning}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit code 2), not usage + error."""

    def error(self, message):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {' '.join(message.splitlines())} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphprune", description="Structured pruning compiler.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(p):
        p.add_argument("model", help="alias (smollm2-135m, gemma3-270m, minilm-l6), HF directory, .gguf or .onnx")
        p.add_argument("--allow-pickle", action="store_true", help="load .bin/.pt checkpoints (weights_only)")
        p.add_argument("--trust-remote-code", action="store_true")

    p = sub.add_parser("inspect", help="print the dependency groups of a model")
    model_args(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="also list fixed (never prunable) groups")
    p.add_argument("--seq-len", type=_positive_int, default=8, help="tokens in the tracing input")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("compress", help="prune a model and write the smaller one")
    model_args(p)
    p.add_argument("--criterion", default=None,
                   help="default flap; with --target experts an expert criterion (easyep default, reap, frequency, "
                        "random)")
    p.add_argument("--sparsity", type=_fraction, default=0.2,
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
    p.add_argument("--expert-sparsity", type=_fraction, default=None,
                   help="fraction of routed experts to remove (default: --sparsity)")
    p.add_argument("--expert-allocation", default="uniform", choices=["uniform", "global"],
                   help="uniform: same expert count in every layer (plain from_pretrained); global: per-layer "
                        "counts from globally normalised scores (graphprune.load_pruned)")
    p.add_argument("--nsamples", type=_positive_int, default=128, help="windows (decoders) or pairs (encoders)")
    p.add_argument("--seqlen", type=_positive_int, default=128, help="tokens per window, or per text (encoders)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compensate", choices=["none", "bias", "lsq"], default=None,
                   help="what the consumer layers do about removed inputs: bias (FLAP's mean), lsq (least-squares "
                        "refit of the kept weights and bias); default: bias for flap, lsq for obs, none otherwise")
    p.add_argument("--option", action="append", default=[], type=_criterion_option, metavar="KEY=VALUE",
                   help="an option of the criterion (repeatable), e.g. metric=IFV for flap, scale=output for obs; "
                        "`graphprune criteria` lists them")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate each layer's compensation on the outputs of the already pruned layers")
    p.add_argument("--damp", type=_damping, default=0.01,
                   help="least-squares damping: this fraction of mean(diag H) is added to H (default 0.01)")
    p.add_argument("--round-to", type=_positive_int, default=1, help="keep channel counts a multiple of this")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
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

    p = sub.add_parser("export", help="export a (pruned) model to ONNX, checked in onnxruntime")
    model_args(p)
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", required=True, help="output directory (model.onnx, config, tokenizer)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch.onnx exporter (torchscript: seconds; dynamo: minutes on large models)")
    p.add_argument("--opset", type=_positive_int, default=None)
    p.add_argument("--atol", type=float, default=1e-4,
                   help="parity tolerance: fail when max |onnxruntime fp32 - PyTorch fp64| > "
                        "atol * max(1, max|output|)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="perplexity of a causal LM, or retrieval (recall@1, MRR) of an embedding model")
    model_args(p)
    p.add_argument("--data", required=True, help="text file; encoders: also a .jsonl/.tsv pair file")
    p.add_argument("--seqlen", type=_positive_int, default=512, help="tokens per window (or per text, encoders)")
    p.add_argument("--windows", type=_positive_int, default=32)
    p.add_argument("--pairs", type=_positive_int, default=None,
                   help="encoders: evaluate at most this many pairs (default: all of the evaluation split)")
    p.add_argument("--all-pairs", action="store_true",
                   help="encoders: use every pair of --data, not only the evaluation side of the split")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="latency/throughput of an .onnx model in onnxruntime, vs a baseline")
    p.add_argument("model", help=".onnx file")
    p.add_argument("--baseline", default=None, help="the dense .onnx to compare with (speed-up vs FLOP ratio)")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--allow-fallback", action="store_true", help="run on CPU when the provider is not installed")
    p.add_argument("--batch", default="1", help="comma list of batch sizes")
    p.add_argument("--seqlen", default="128", help="comma list of sequence lengths")
    p.add_argument("--shapes", default=None, help="explicit BATCHxSEQ pairs, e.g. 1x512,8x128 (overrides both)")
    p.add_argument("--warmup", type=_positive_int, default=3)
    p.add_argument("--runs", type=_positive_int, default=20)
    p.add_argument("--threads", type=_positive_int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--profile", action="store_true", help="also print each model's top op types (ORT profiler)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("criteria", help="list the available criteria")
    p.set_defaults(func=cmd_criteria)
    return parser


def _quiet_libraries() -> None:
    """Our own progress bars report the stages; library bars and warnings would bury errors."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _one_line_warnings(default):
    """A `warnings.showwarning` that prints our own warnings as one line and others as `default` does."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, GraphpruneWarning):
            print(f"graphprune: warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _quiet_libraries()
    previous_showwarning = warnings.showwarning
    warnings.showwarning = _one_line_warnings(previous_showwarning)
    try:
        return args.func(args)
    except UserError as exc:
        # One line even when a message quotes a multi-line library error.
        print(f"graphprune: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"graphprune: validation failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("graphprune: interrupted; no output was written", file=sys.stderr)
        return 130
    except Terminated:
        print("graphprune: terminated; no output was written", file=sys.stderr)
        return 143
    except Exception as exc:  # noqa: BLE001
        if args.debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"graphprune: internal error: {type(exc).__name__}: {first} -- this is a bug in graphprune; "
              f"rerun with --debug for the traceback and report it", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        warnings.showwarning = previous_showwarning


if __name__ == "__main__":
    sys.exit(main())
