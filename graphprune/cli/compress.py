"""`graphprune compress`: one command for every backend (in memory, streamed, ONNX)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import UserError
from ..progress import stage_line
from .main import criterion_option, damping, fraction, positive_int, print_export

log = logging.getLogger("graphprune")


def add_compress_parser(sub, model_args) -> argparse.ArgumentParser:
    from .. import allocation as allocation_registry
    from ..passes import compensation as compensation_registry

    p = sub.add_parser("compress", help="prune a model and write the smaller one (with its recipe and model card)")
    model_args(p, optional=True)  # optional with --config, whose recipe names the model
    p.add_argument("--config", default=None, metavar="RECIPE",
                   help="replay a graphprune_recipe.yaml (or the output folder holding one): its model and every "
                        "option; flags given next to it override the recipe's")
    p.add_argument("--criterion", default=None,
                   help="default: the best measured pipeline (obs with least squares and --sequential; flap for "
                        "encoders and ONNX files); with --target experts an expert criterion (easyep default, reap, "
                        "frequency, random)")
    p.add_argument("--sparsity", type=fraction, default=0.2,
                   help="fraction of layer parameters to remove; with --target experts alone, of routed experts")
    p.add_argument("--allocation", default=None, choices=allocation_registry.available(),
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
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows' offsets (default 0)")
    p.add_argument("--compensate", choices=compensation_registry.available(), default=None,
                   help="what the consumer layers do about removed inputs: lsq (least-squares refit of the kept "
                        "weights and bias; the default wherever the layers support it), bias (FLAP's mean), none")
    p.add_argument("--option", action="append", default=None, type=criterion_option, metavar="KEY=VALUE",
                   help="an option of the criterion (repeatable), e.g. metric=IFV for flap, scale=output for obs; "
                        "`graphprune criteria` lists them")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate each layer's compensation on the outputs of the already pruned layers")
    p.add_argument("--damp", type=damping, default=0.01,
                   help="least-squares damping: this fraction of mean(diag H) is added to H (default 0.01)")
    p.add_argument("--round-to", type=positive_int, default=1, help="keep channel counts a multiple of this")
    p.add_argument("--allow-short", action="store_true",
                   help="accept a plan that removes clearly less than --sparsity (refused otherwise, saying why)")
    p.add_argument("--out", default=None,
                   help="where to write the pruned model: a new directory (an .onnx file for an ONNX input); "
                        "required (with --config too: a recipe never says where its output went)")
    p.add_argument("--out-dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the written weights (default: the dtype the input stores, bf16 in -> bf16 out)")
    p.add_argument("--force", action="store_true", help="replace an earlier graphprune output at --out")
    p.add_argument("--no-cache", action="store_true", help="recompute calibration statistics")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="after writing, upload the output to this Hugging Face Hub repository (org/name; created "
                        "if missing; needs network and `hf auth login`)")
    p.add_argument("--private", action="store_true", help="--push-to-hub: create the repository private")
    p.add_argument("--export", choices=["onnx"], default=None,
                   help="also write model.onnx into --out (parity-checked in onnxruntime)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="prune a safetensors folder one layer at a time, never loading the whole model; default: "
                        "on when the model would not fit in the available memory in fp32")
    p.add_argument("--resume", action="store_true",
                   help="--stream: continue an interrupted run from its last finished layer")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default=None,
                   help="where calibration and the block-by-block work run (default cpu; statistics and least "
                        "squares stay in float64 on the CPU, the rewrite runs on the CPU)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="precision of the calibration forward passes (default fp32; statistics are accumulated in "
                        "float64; the output keeps the stored dtype unless --out-dtype)")
    p.set_defaults(func=cmd_compress)
    mark_defaults(p)  # which flags were given: they override a --config recipe
    return p


class Default:
    """An argparse default not given on the command line (so a --config recipe's value stands)."""

    def __init__(self, value) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Default({self.value!r})"


def mark_defaults(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:  # noqa: SLF001
        if action.default is argparse.SUPPRESS or action.dest in ("help", "model", "config"):
            continue
        if isinstance(action, argparse._AppendAction):  # noqa: SLF001 - None means "not given"
            continue
        action.default = Default(action.default)


def _given(args, dest: str) -> bool:
    value = getattr(args, dest, None)
    return not isinstance(value, Default) and value is not None


def _value(args, dest: str):
    value = getattr(args, dest, None)
    return value.value if isinstance(value, Default) else value


# CompressOptions field -> the compress flag's dest (a field not here has no flag)
FLAG_OF = {"criterion": "criterion", "sparsity": "sparsity", "allocation": "allocation", "target": "target",
           "calib": "calib", "calib_general": "calib_general", "nsamples": "nsamples", "seqlen": "seqlen",
           "seed": "seed", "compensate": "compensate", "sequential": "sequential", "damp": "damp",
           "round_to": "round_to", "allow_short": "allow_short", "criterion_options": "option",
           "expert_criterion": "expert_criterion", "expert_sparsity": "expert_sparsity",
           "expert_allocation": "expert_allocation", "use_cache": "no_cache", "stream": "stream", "resume": "resume",
           "device": "device", "dtype": "dtype", "out": "out", "out_dtype": "out_dtype", "force": "force",
           "export": "export", "trust_remote_code": "trust_remote_code", "allow_pickle": "allow_pickle"}


def options_from(args, recipe_options: dict | None = None):
    """CompressOptions from the command line; with a --config recipe's options, the recipe's values
    except for the flags given on the command line."""
    from ..pipeline.options import CompressOptions

    v = lambda dest: _value(args, dest)  # noqa: E731
    calibs = v("calib") or ["default"]  # --calib repeats: several domains for the expert criteria
    values = dict(
        criterion=v("criterion"), sparsity=v("sparsity"), allocation=v("allocation"), target=v("target"),
        calib=calibs[0] if len(calibs) == 1 else tuple(calibs), calib_general=v("calib_general"),
        nsamples=v("nsamples"), seqlen=v("seqlen"), seed=v("seed"), compensate=v("compensate"),
        sequential=v("sequential"), damp=v("damp"), round_to=v("round_to"), allow_short=v("allow_short"),
        criterion_options=dict(v("option") or []),
        expert_criterion=v("expert_criterion"), expert_sparsity=v("expert_sparsity"),
        expert_allocation=v("expert_allocation"), use_cache=not v("no_cache"),
        stream=v("stream"), resume=v("resume"), device=v("device"), dtype=v("dtype"), out=v("out"),
        out_dtype=v("out_dtype"), force=v("force"), export=v("export"),
        trust_remote_code=v("trust_remote_code"), allow_pickle=v("allow_pickle"))
    runtime = dict(progress=not args.quiet, release_input=True, use_cache=values["use_cache"], force=values["force"],
                   resume=values["resume"])
    if recipe_options is None:
        return CompressOptions(**values, **{k: runtime[k] for k in ("progress", "release_input")})
    merged = dict(recipe_options)
    if isinstance(merged.get("calib"), list):
        merged["calib"] = tuple(merged["calib"])  # several specs (domains), never texts
    merged.update({field: values[field] for field, dest in FLAG_OF.items() if _given(args, dest)})
    merged.update(runtime)
    return CompressOptions(**merged)


def cmd_compress(args) -> int:
    from ..calibration.pairs import PAIR_FILE_SUFFIXES, read_pairs
    from ..pipeline.run import compress

    model, recipe, recipe_options = args.model, None, None
    if args.config:  # replay: the recipe's model and options, overridden by the flags given here
        from ..io.recipe import read_recipe
        from ..pipeline.recipe import options_from_recipe, python_calibration

        recipe = read_recipe(args.config)
        recipe_model, recipe_options = options_from_recipe(recipe, args.config)
        model = model or recipe_model
        held = python_calibration(recipe_options)
        if held and not _given(args, FLAG_OF[held]):
            raise UserError(f"--config {args.config}: the recipe's {held} was data given from Python, which a recipe "
                            f"does not hold: give it with --{held.replace('_', '-')}")
    if model is None:
        raise UserError("compress needs the MODEL to prune (or --config RECIPE, which names it)")
    options = options_from(args, recipe_options).resolved()  # every option-only mistake fails before the model loads
    if options.out is None:
        raise UserError("--out is required: the directory (or .onnx file) to write the pruned model to"
                        + (" (a recipe never says where its output went)" if recipe is not None else ""))
    push = _value(args, "push_to_hub")
    if push is not None:
        from ..io.hub import check_push

        check_push(push)  # a bad repository id, or HF_HUB_OFFLINE: refused before any work
    for source in (*options.calib_sources, options.calib_general):
        if source and Path(str(source)).suffix.lower() in PAIR_FILE_SUFFIXES:
            read_pairs(source)  # a malformed pair file fails in a second, before the model loads
    args.calib = [str(c) for c in options.calib_sources]
    partial = _stream_work_dir(options.out)
    if getattr(args, "started", None) is not None:  # start-up, imports and the checks above
        import time

        args.extra_stages = {"startup": time.perf_counter() - args.started}
        log.debug(stage_line("startup", args.extra_stages["startup"]))  # in the summary (an error stays one line)
    try:
        result = compress(model, options)
    except BaseException as error:
        # A streamed run that stops (a crash, Ctrl-C, SIGTERM, a full disk) keeps what is finished for
        # --resume. (Bad inputs fail before the work directory exists; a partial run in the way says so.)
        from ..backends.stream.workdir import PartialRunError

        if partial is not None and partial.exists() and not isinstance(error, PartialRunError):
            log.warning(f"the finished layers are kept in {partial}; rerun the same command with --resume to "
                        f"continue")
        raise
    if recipe is not None:
        _compare_with_recipe(recipe, result.report.get("recipe") or {})
    if push is not None:
        from ..io.hub import push_output

        with _stage(args, "push"):
            url = push_output(result.out, push, private=bool(_value(args, "private")), report=result.report)
    print_summary(result.report, result.out, args)
    for export in result.exported:
        print_export(export)
    if push is not None:
        print(f"pushed {result.out} to {url}")
    return 0


def _stage(args, name: str):
    """Time an extra stage of the command (push) into the summary's times."""
    import contextlib
    import time

    @contextlib.contextmanager
    def timed():
        started = time.perf_counter()
        try:
            yield
        finally:
            args.extra_stages = {**getattr(args, "extra_stages", {}), name: time.perf_counter() - started}
            log.info(stage_line(name, args.extra_stages[name]))

    return timed()


def _compare_with_recipe(recipe: dict, new: dict) -> None:
    """Say (one line each) what differs from the recipe in a way that can change the model files."""
    old_source, new_source = recipe.get("source") or {}, new.get("source") or {}
    if old_source.get("sha256") and new_source.get("sha256") and old_source["sha256"] != new_source["sha256"]:
        log.warning(f"the model's files differ from the recipe's source (content sha256 {new_source['sha256'][:12]}, "
                    f"recipe {old_source['sha256'][:12]}): this output is not the recipe's")
    old_cal, new_cal = (recipe.get("run") or {}).get("calibration_sha256"), (new.get("run") or {}).get(
        "calibration_sha256")
    if old_cal and new_cal and old_cal != new_cal:
        log.warning(f"the calibration windows differ from the recipe's (sha256 {new_cal[:12]}, recipe {old_cal[:12]})")
    old_packages, new_packages = recipe.get("packages") or {}, new.get("packages") or {}
    differ = [f"{name} {new_packages.get(name)} (recipe {version})" for name, version in old_packages.items()
              if name in ("graphprune", "torch", "transformers", "safetensors", "numpy", "onnx")
              and new_packages.get(name) != version]
    if differ:
        log.warning(f"package versions differ from the recipe's: {', '.join(differ)}; the model files may differ")


def _stream_work_dir(out: str) -> Path | None:
    if not str(out).strip():
        return None
    resolved = Path(out).expanduser().resolve()
    return resolved.parent / f".{resolved.name}.partial"


def _counts(per_layer: dict[str, int]) -> str:
    values = set(per_layer.values())
    return str(values.pop()) if len(values) == 1 else ", ".join(f"{k}:{v}" for k, v in per_layer.items())


def stage_times(r: dict, args) -> tuple[dict[str, float], float]:
    """(seconds per stage, the command's wall time): the run's stages, the command's own (push), and
    "other" for what no stage covers (start-up, imports, option checks), so the stages add up to the
    total, which is the wall time since the command started."""
    import time

    extra = dict(getattr(args, "extra_stages", {}))
    stages = {"startup": extra.pop("startup")} if "startup" in extra else {}
    stages.update({k: float(v) for k, v in (r.get("timings_s") or {}).items() if k != "total"})
    stages.update(extra)
    started = getattr(args, "started", None)
    total = time.perf_counter() - started if started is not None else float((r.get("timings_s") or {}).get("total", 0))
    stages["other"] = max(total - sum(stages.values()), 0.0)
    return stages, total


def print_stage_times(stages: dict[str, float], total: float) -> None:
    from .tables import is_terminal, print_table

    if is_terminal():
        print_table(["stage", "seconds", "share"], [[k, f"{v:.2f}", f"{v / max(total, 1e-9):.0%}"] for k, v in
                                                    stages.items()] + [["total", f"{total:.2f}", "100%"]],
                    title="time per stage")
    else:
        print("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in stages.items()) + f"; total {total:.2f}s")


def print_summary(r: dict, out: Path, args) -> None:
    """What the user reads after a run: removed parameters, notes, and where the output is."""
    p, f = r["params"], r["flops_per_token"]
    onnx = r.get("frontend") == "onnx"
    layerwise = r.get("layerwise") or {}
    how = (f"{r['criterion']} / {r['allocation']} / --compensate {r['compensate']}"
           + (" --sequential" if layerwise.get("sequential") else "") + (" (ONNX-native)" if onnx else ""))
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
    stages, total = stage_times(r, args)
    print_stage_times(stages, total)
    if onnx:
        print(f"wrote {out} (validated in onnxruntime; model card and recipe beside it) in {total:.1f}s")
        return
    layout = "uniform layers: loads with transformers' from_pretrained" if r["uniform_layers"] else \
        "per-layer sizes: load with graphprune.load_pruned(path)"
    print(f"wrote {out} ({layout}; README.md model card, graphprune_recipe.yaml) in {total:.1f}s")
    s = r.get("streaming")
    if s:
        print(f"streamed {s['layers']} layers on {s['device']} ({s['dtype']}) into {s['shards']} shards; peak RSS "
              f"{r['peak_rss_mb']:.0f} MB")
