"""`graphprune` command line: a thin layer over the Python API.

User mistakes (`UserError`) print one line and exit 2; bugs print a short message with a hint to
report them (the traceback with --debug) and exit 1; Ctrl-C / SIGTERM exit 130 / 143 after removing
any partial output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path

from ..errors import GraphpruneWarning, UserError, classify


log = logging.getLogger("graphprune")


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
    if args.graph is not None:
        from ..graph.report import write_graphml

        written = write_graphml(groups, args.graph)
        atoms = groups.propagation.atoms.coupling
        log.info(f"wrote the coupling graph to {written} ({atoms.number_of_nodes()} axis atoms, "
                 f"{atoms.number_of_edges()} couplings)")
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
    from ..io.onnx_export import check_atol, check_opset, export_onnx

    check_atol(args.atol)  # before loading: NaN would pass every parity check
    check_opset(args.opset, args.exporter)
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
    from ..models.encoders import is_encoder

    if not args.data and not args.tasks:
        raise UserError("eval needs --data FILE (perplexity, or retrieval for an embedding model) or --tasks TASKS "
                        "(lm-evaluation-harness)")
    tasks = include = None
    if args.tasks:  # before the model loads: lm-eval installed, the task folder there
        from ..evaluate.harness import check_include_path, parse_tasks, require_lm_eval

        tasks = parse_tasks(args.tasks)
        require_lm_eval()
        include = check_include_path(args.include_path)
    elif args.include_path or args.limit or args.num_fewshot is not None:
        raise UserError("--include-path, --limit and --num-fewshot go with --tasks")
    if args.data:
        from ..calibration.text import read_text_file

        read_text_file(args.data)  # a missing or unreadable file fails before the model loads
    loaded = _load(args.model, args)
    if loaded.model is None or loaded.tokenizer is None:
        raise UserError("eval needs a PyTorch language model with a tokenizer")
    encoder = is_encoder(loaded.model)
    rows, shown = [], {}
    if args.data:
        row, data_json, line = _eval_retrieval(loaded, args) if encoder else _eval_perplexity(loaded, args)
        rows.append(row)
        shown.update(data_json)
        if not args.json:
            print(line)
    if tasks:
        from ..evaluate.harness import run_tasks

        if encoder:
            raise UserError("lm-eval tasks score a causal language model; this is an embedding model (use --data "
                            "for retrieval)")
        task_rows = run_tasks(loaded.model, loaded.tokenizer, tasks, include_path=include, limit=args.limit,
                              num_fewshot=args.num_fewshot, batch_size=args.batch_size)
        rows += task_rows
        shown["tasks"] = {}
        for row in task_rows:
            shown["tasks"].setdefault(row["task"], {})[row["metric"]] = row["value"]
            if row["stderr"] is not None:
                shown["tasks"][row["task"]][f"{row['metric']}_stderr"] = row["stderr"]
        if not args.json:
            from .tables import print_table

            print_table(["task", "metric", "value", "stderr"],
                        [[r["task"], r["metric"], f"{r['value']:.4f}",
                          "" if r["stderr"] is None else f"{r['stderr']:.4f}"] for r in task_rows],
                        title=f"lm-eval ({task_rows[0]['settings'] if task_rows else 'no results'})")
    if args.json:
        print(json.dumps(shown))
    if loaded.path.is_dir() and rows:
        from ..io.hf import record_evaluation

        if record_evaluation(loaded.path, rows):
            log.info(f"recorded in {loaded.path / 'graphprune_report.json'} and its model card (README.md)")
    return 0


def _eval_perplexity(loaded, args) -> tuple[dict, dict, str]:
    from ..calibration.text import read_text_file
    from ..evaluate.perplexity import perplexity

    text = read_text_file(args.data)
    result = perplexity(loaded.model, loaded.tokenizer, text, seqlen=args.seqlen, windows=args.windows,
                        progress=not args.quiet)
    row = {"kind": "perplexity", "data": Path(args.data).name, "metric": "ppl", "value": float(result.ppl),
           "settings": f"{result.windows} windows of {args.seqlen} tokens"}
    return row, {"ppl": result.ppl, "nll": result.nll_mean, "windows": result.windows, "seqlen": args.seqlen}, \
        f"perplexity {result.ppl:.4f} over {result.windows} windows of {args.seqlen} tokens"


def _eval_retrieval(loaded, args) -> tuple[dict, dict, str]:
    """Embedding models: retrieval over the evaluation side of the pair split of --data."""
    from ..calibration.pairs import load_pairs
    from ..models.encoders import pooling_of
    from ..evaluate.retrieval import retrieval

    pairs = load_pairs(args.data, "all" if args.all_pairs else "evaluation", limit=args.pairs, seed=0)
    pooling = pooling_of(loaded.path if loaded.path.is_dir() else None)
    result = retrieval(loaded.model, loaded.tokenizer, pairs, pooling, max_length=args.seqlen)
    split = "all" if args.all_pairs else "evaluation"
    row = {"kind": "retrieval", "data": Path(args.data).name, "metric": "recall@1", "value": float(result.recall_at_1),
           "settings": f"{result.pairs} pairs ({split}), MRR {result.mrr:.4f}"}
    return row, {"recall_at_1": result.recall_at_1, "mrr": result.mrr, "pairs": result.pairs, "split": split,
                 "pooling": pooling.mode}, \
        f"retrieval over {result.pairs} pairs: recall@1 {result.recall_at_1:.4f}, MRR {result.mrr:.4f}"


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
    from .. import __version__

    parser = _Parser(prog="graphprune", description="Structured pruning compiler: trace a model, find what can be "
                     "pruned together, score, allocate, rewrite, validate, write.",
                     epilog=EXAMPLES["graphprune"], formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=version_text(__version__),
                        help="print graphprune's version (and torch's, transformers') and exit")
    add_global_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                                title="commands")

    def model_args(p, optional: bool = False):
        p.add_argument("model", nargs="?" if optional else None, default=None,
                       help="alias (smollm2-135m, gemma3-270m, minilm-l6), Hugging Face Hub id org/name[@revision] "
                            "(through the local HF cache; HF_HUB_OFFLINE=1 uses only the cache), HF or graphprune "
                            "directory, .gguf or .onnx file")
        p.add_argument("--allow-pickle", action="store_true",
                       help="also read .bin/.pt checkpoints (with torch.load(weights_only=True)); safetensors only "
                            "otherwise")
        p.add_argument("--trust-remote-code", action="store_true",
                       help="run the model's own Python code (a config with auto_map); off by default")

    p = sub.add_parser("inspect", help="print the dependency groups of a model")
    model_args(p)
    p.add_argument("--json", action="store_true", help="print every group as JSON (for machines) instead of text")
    p.add_argument("--all", action="store_true", help="also list fixed (never prunable) groups")
    p.add_argument("--seq-len", type=positive_int, default=8, help="tokens in the tracing input (default 8)")
    p.add_argument("--graph", metavar="FILE.graphml", default=None,
                   help="also write the coupling graph (nodes: axis atoms, edges: the ops that couple them; "
                        "the dependency groups are its connected components) as GraphML")
    p.set_defaults(func=cmd_inspect)

    from .compress import add_compress_parser

    add_compress_parser(sub, model_args)

    p = sub.add_parser("export", help="export a (pruned) model to ONNX, checked in onnxruntime")
    model_args(p)
    p.add_argument("--format", choices=["onnx"], default="onnx", help="output format (onnx, the only one)")
    p.add_argument("--out", required=True, help="output directory (model.onnx, config, tokenizer)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch.onnx exporter (torchscript: seconds; dynamo: minutes on large models)")
    p.add_argument("--opset", type=positive_int, default=None,
                   help="ONNX opset to export (default: the exporter's own)")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="parity tolerance: fail when max |onnxruntime fp32 - PyTorch fp64| > "
                        "atol * max(1, max|output|)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory graphprune wrote")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="perplexity or retrieval on a file, or lm-evaluation-harness tasks; "
                                    "recorded in a graphprune output's report and model card")
    model_args(p)
    p.add_argument("--data", default=None,
                   help="text file for perplexity (causal LM) or retrieval (embedding model; also a .jsonl/.tsv "
                        "pair file)")
    p.add_argument("--seqlen", type=positive_int, default=512,
                   help="--data: tokens per window (or per text, encoders) (default 512)")
    p.add_argument("--windows", type=positive_int, default=32,
                   help="--data: number of non-overlapping windows scored (default 32)")
    p.add_argument("--pairs", type=positive_int, default=None,
                   help="encoders: evaluate at most this many pairs (default: all of the evaluation split)")
    p.add_argument("--all-pairs", action="store_true",
                   help="encoders: use every pair of --data, not only the evaluation side of the split")
    p.add_argument("--tasks", default=None,
                   help="comma list of lm-evaluation-harness tasks (needs pip install 'graphprune[eval]')")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="--tasks: a folder of task YAML files (your own tasks, e.g. a local JSON set)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="--tasks: evaluate at most this many documents per task (a quick look, not a score)")
    p.add_argument("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples (default: the task's)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="--tasks: documents per forward (default 1)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="latency/throughput of an .onnx model in onnxruntime, vs a baseline")
    p.add_argument("model", help=".onnx file")
    p.add_argument("--baseline", default=None, help="the dense .onnx to compare with (speed-up vs FLOP ratio)")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                   help="onnxruntime execution provider (cuda needs pip install 'graphprune[gpu]')")
    p.add_argument("--allow-fallback", action="store_true", help="run on CPU when the provider is not installed")
    p.add_argument("--batch", default="1", help="comma list of batch sizes")
    p.add_argument("--seqlen", default="128", help="comma list of sequence lengths")
    p.add_argument("--shapes", default=None, help="explicit BATCHxSEQ pairs, e.g. 1x512,8x128 (overrides both)")
    p.add_argument("--warmup", type=positive_int, default=3, help="untimed runs per shape first (default 3)")
    p.add_argument("--runs", type=positive_int, default=20, help="timed runs per shape (default 20)")
    p.add_argument("--threads", type=positive_int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--profile", action="store_true", help="also print each model's top op types (ORT profiler)")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("criteria", help="list the available criteria (--matrix: what each backend runs)")
    p.add_argument("--matrix", action="store_true",
                   help="print the capability matrix: criterion x backend x compensation, works or why refused")
    p.set_defaults(func=cmd_criteria)

    for name, command in sub.choices.items():  # every command: -v/-q/--debug, grouped help, an example
        add_global_flags(command)
        command.formatter_class = _HelpFormatter
        command.epilog = EXAMPLES.get(name)
        command.description = command.description or next(
            (a.help for a in sub._choices_actions if a.dest == name), None)  # noqa: SLF001
        arrange_help(command, SECTIONS.get(name, {}))
    return parser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples keep their lines; options are described in full."""


# --help: each command's options by what they decide (an option named in no section stays under "options").
SECTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "inspect": {"model": ("model", "allow_pickle", "trust_remote_code", "seq_len"),
                "output": ("json", "all", "graph")},
    "compress": {
        "model": ("model", "allow_pickle", "trust_remote_code", "config"),
        "data": ("calib", "calib_general", "nsamples", "seqlen", "seed", "no_cache"),
        "criterion": ("criterion", "option", "target", "expert_criterion", "compensate", "sequential", "damp"),
        "allocation": ("sparsity", "allocation", "expert_sparsity", "expert_allocation", "round_to", "allow_short"),
        "output": ("out", "out_dtype", "force", "export", "push_to_hub", "private"),
        "execution": ("stream", "resume", "device", "dtype"),
    },
    "export": {"model": ("model", "allow_pickle", "trust_remote_code"),
               "output": ("format", "out", "exporter", "opset", "atol", "force")},
    "eval": {"model": ("model", "allow_pickle", "trust_remote_code"),
             "data": ("data", "seqlen", "windows", "pairs", "all_pairs"),
             "lm-evaluation-harness": ("tasks", "include_path", "limit", "num_fewshot", "batch_size"),
             "output": ("json",)},
    "bench": {"model": ("model", "baseline", "provider", "allow_fallback", "threads"),
              "data": ("batch", "seqlen", "shapes", "warmup", "runs"), "output": ("profile", "json")},
    "criteria": {"output": ("matrix",)},
}

EXAMPLES = {
    "graphprune": "examples:\n"
                  "  graphprune inspect smollm2-135m\n"
                  "  graphprune compress smollm2-135m --sparsity 0.2 --out out/pruned20\n"
                  "  graphprune eval out/pruned20 --data wiki.test.txt\n"
                  "  graphprune -q compress HuggingFaceTB/SmolLM2-135M --out out/hub20   # a Hub id, quietly",
    "inspect": "example:\n  graphprune inspect minilm-l6 --all\n  graphprune inspect org/name@main --json > groups.json",
    "compress": "examples:\n"
                "  graphprune compress smollm2-135m --criterion flap --sparsity 0.2 --out out/flap20\n"
                "  graphprune compress org/name@main --sparsity 0.3 --out out/pruned --push-to-hub me/name-pruned\n"
                "  graphprune compress --config out/flap20/graphprune_recipe.yaml --out out/again   # replay",
    "export": "example:\n  graphprune export out/flap20 --out out/flap20-onnx",
    "eval": "examples:\n"
            "  graphprune eval out/flap20 --data wiki.test.txt --windows 16\n"
            "  graphprune eval out/flap20 --tasks hellaswag,arc_easy --limit 200\n"
            "  graphprune eval out/flap20 --tasks my_task --include-path tasks/   # a local task YAML",
    "bench": "example:\n  graphprune bench out/small-onnx/model.onnx --baseline out/dense-onnx/model.onnx --shapes 1x128,8x128",
    "criteria": "example:\n  graphprune criteria --matrix",
}


def add_global_flags(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """-v/--verbose, -q/--quiet and --debug, accepted before the command (top) and after it."""
    group = parser.add_argument_group("logging")
    default = 0 if top else argparse.SUPPRESS
    group.add_argument("-v", "--verbose", action="count", default=default,
                       help="more detail: debug lines (each stage's parts, library messages)")
    group.add_argument("-q", "--quiet", action="count", default=default,
                       help="only warnings and errors: no stage lines, no progress bars")
    group.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                       help="show the traceback of an internal error")


def arrange_help(parser: argparse.ArgumentParser, sections: dict[str, tuple[str, ...]]) -> None:
    """Move each option into its section's argument group (the order of `sections`), for --help."""
    groups = parser._action_groups  # noqa: SLF001 - argparse keeps groups there since 2.7
    for title, dests in sections.items():
        group = next((g for g in groups if g.title == title), None) or parser.add_argument_group(title)
        for dest in dests:
            for action in [a for a in parser._actions if a.dest == dest]:  # noqa: SLF001
                for other in groups:
                    if action in other._group_actions and other is not group:  # noqa: SLF001
                        other._group_actions.remove(action)  # noqa: SLF001
                if action not in group._group_actions:  # noqa: SLF001
                    group._group_actions.append(action)  # noqa: SLF001
    # logging last, and no empty groups
    logging_groups = [g for g in groups if g.title == "logging"]
    parser._action_groups = [g for g in groups if g.title != "logging" and g._group_actions] + logging_groups  # noqa: SLF001


def version_text(version: str) -> str:
    from importlib import metadata

    parts = []
    for name in ("torch", "transformers"):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return f"graphprune {version} (Python {sys.version.split()[0]}" + (f"; {', '.join(parts)})" if parts else ")")


def _quiet_libraries(verbosity: int = 0) -> None:
    """Our own progress bars report the stages; library bars and warnings would bury errors (-v lets
    the libraries' warnings through)."""
    try:
        from transformers.utils import logging as hf_logging

        if verbosity > 0:
            hf_logging.set_verbosity_warning()
        else:
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
    """The command line. Run as the program (`argv` None), its wall time counts from the process's start
    and, once the command is done, the objects it made are frozen out of the garbage collector, so that
    exiting takes a blink instead of a collection of every tensor and module (the summary's total is the
    wall time of the command)."""
    from ..progress import process_age

    as_program = argv is None
    started = time.perf_counter() - ((process_age() or 0.0) if as_program else 0.0)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv, started)
    finally:
        if as_program:
            import contextlib
            import gc

            with contextlib.suppress(OSError, ValueError):  # a reader that left, a closed stream
                sys.stdout.flush()
                sys.stderr.flush()
            gc.freeze()


def _main(argv: list[str], started: float) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose, args.quiet = getattr(args, "verbose", 0) or 0, getattr(args, "quiet", 0) or 0
    args.debug = bool(getattr(args, "debug", False))
    args.started, args.argv = started, argv
    from ..progress import configure_logging

    configure_logging(args.verbose - args.quiet)  # stage lines on stderr; -q: warnings only, no bars
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _quiet_libraries(args.verbose - args.quiet)
    previous_showwarning = warnings.showwarning
    warnings.showwarning = _one_line_warnings(previous_showwarning)
    try:
        return args.func(args)
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
        known = classify(exc)  # the user's or the environment's: one line, never a traceback
        if known is not None:
            print(known[1], file=sys.stderr)
            return known[0]
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
