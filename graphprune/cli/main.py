"""`graphprune` command line: a thin layer over the Python API.

User mistakes (`UserError`) print one line and exit 2; bugs print a short message with a hint to
report them (the traceback with --debug) and exit 1; Ctrl-C / SIGTERM exit 130 / 143 after removing
any partial output.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from pathlib import Path

from ..errors import GraphpruneError, GraphpruneWarning, UserError, ValidationError


class Terminated(BaseException):
    """Raised from the SIGTERM handler so `finally` blocks clean up like on Ctrl-C."""


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not strictly between 0 and 1")
    return value


def damping(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 10.0:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 10]")
    return value


def criterion_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    for cast in (int, float):
        try:
            return key.strip(), cast(value)
        except ValueError:
            pass
    return key.strip(), value.strip()


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _load(spec: str, args):
    from ..models import load_model

    return load_model(spec, allow_pickle=getattr(args, "allow_pickle", False),
                      trust_remote_code=getattr(args, "trust_remote_code", False))


def cmd_inspect(args) -> int:
    from ..graph import analyze
    from ..graph.report import render

    loaded = _load(args.model, args)
    if loaded.model is None:
        from ..graph.trace_onnx import analyze_onnx

        groups = analyze_onnx(loaded.onnx_model, seq_len=args.seq_len)
    else:
        groups = analyze(loaded.model, seq_len=args.seq_len)
    print(groups.to_json() if args.json else render(groups, show_fixed=args.all))
    return 0


def print_export(e) -> None:
    print(f"wrote {e.path} ({e.exporter}, opset {e.opset}; inputs {', '.join(e.inputs)} -> {e.output}, dynamic "
          f"batch/sequence, no KV cache); onnxruntime parity: max abs {e.output} diff {e.max_abs_diff:.3g} "
          f"vs PyTorch {e.reference} (tolerance {e.tolerance:.3g}"
          + (f"; PyTorch fp32 itself differs by {e.torch_fp32_diff:.3g})" if e.torch_fp32_diff is not None else ")"))
    for note in e.notes:
        print(f"note: {note}")


def cmd_export(args) -> int:
    from ..io.hf import prepare_output
    from ..io.onnx_export import export_onnx

    if args.atol <= 0:
        raise UserError("--atol must be positive")
    loaded = _load(args.model, args)
    if loaded.model is None:
        raise UserError(f"{args.model} is already ONNX; export takes a PyTorch model (alias, HF or graphprune directory)")
    out = prepare_output(args.out, inputs=loaded.inputs, force=args.force)
    source_dir = loaded.path if loaded.path.is_dir() else None
    result = export_onnx(loaded.model, out, tokenizer=loaded.tokenizer, exporter=args.exporter, opset=args.opset,
                         atol=args.atol, force=args.force, source_dir=source_dir)
    print_export(result)
    return 0


def cmd_bench(args) -> int:
    from ..evaluate.onnx_bench import bench, parse_list, render, to_json

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


def cmd_eval(args) -> int:
    from ..calibration.text import read_text_file
    from ..evaluate.perplexity import perplexity
    from ..models.encoders import is_encoder

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
    from ..calibration.pairs import load_pairs
    from ..models.encoders import pooling_of
    from ..evaluate.retrieval import retrieval

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
    from .. import criteria

    if args.matrix:
        from ..backends.matrix import render_markdown

        print(render_markdown())
        return 0
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
    p.add_argument("--seq-len", type=positive_int, default=8, help="tokens in the tracing input")
    p.set_defaults(func=cmd_inspect)

    from .compress import add_compress_parser

    add_compress_parser(sub, model_args)

    p = sub.add_parser("export", help="export a (pruned) model to ONNX, checked in onnxruntime")
    model_args(p)
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", required=True, help="output directory (model.onnx, config, tokenizer)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch.onnx exporter (torchscript: seconds; dynamo: minutes on large models)")
    p.add_argument("--opset", type=positive_int, default=None)
    p.add_argument("--atol", type=float, default=1e-4,
                   help="parity tolerance: fail when max |onnxruntime fp32 - PyTorch fp64| > "
                        "atol * max(1, max|output|)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="perplexity of a causal LM, or retrieval (recall@1, MRR) of an embedding model")
    model_args(p)
    p.add_argument("--data", required=True, help="text file; encoders: also a .jsonl/.tsv pair file")
    p.add_argument("--seqlen", type=positive_int, default=512, help="tokens per window (or per text, encoders)")
    p.add_argument("--windows", type=positive_int, default=32)
    p.add_argument("--pairs", type=positive_int, default=None,
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
    p.add_argument("--warmup", type=positive_int, default=3)
    p.add_argument("--runs", type=positive_int, default=20)
    p.add_argument("--threads", type=positive_int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--profile", action="store_true", help="also print each model's top op types (ORT profiler)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("criteria", help="list the available criteria (--matrix: what each backend runs)")
    p.add_argument("--matrix", action="store_true",
                   help="print the capability matrix: criterion x backend x compensation, works or why refused")
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
    except BrokenPipeError:  # `graphprune ... | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
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
