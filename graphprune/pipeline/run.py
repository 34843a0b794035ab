"""`compress`: the one driver, for every backend.

    backend = backends.choose(source, options)(source, options)    in memory, streamed, or ONNX
    for each stage (routed experts, then channels and heads):
        groups -> chosen groups -> backend.prepare -> backend.score (calibration the criterion and the
        compensation declare, scoring in the criterion's form) -> allocation -> backend.apply (passes)
    report (pipeline.report) -> backend.finish (validate, write through io.atomic)

Stages differ only in what they select and how the plan is made: the experts stage scores MoE
layers and plans per-layer expert counts (`moe.experts`); the units stage ranks channels and heads
with an allocator. Nothing here knows how a backend holds its model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import allocation as allocation_registry
from .. import progress as _progress
from .. import backends
from .. import criteria as criteria_registry
from ..allocation import Allocation
from ..backends.base import Backend, Stage
from ..criteria.scoring import Scores
from ..errors import PruningError, UserError
from ..moe.experts import choose_removed, expert_criterion, plan_counts
from .options import CompressOptions
from .recipe import build_recipe
from .report import StageRecord, build_report, kept_units
from .targets import select_groups


@dataclass
class CompressResult:
    model: Any  # the pruned nn.Module or onnx.ModelProto (None for a streamed output: it is on disk)
    report: dict[str, Any]
    groups: Any  # the dependency groups of the model the last stage pruned
    removed: dict[str, np.ndarray] = field(default_factory=dict)
    out: Path | None = None
    exported: list = field(default_factory=list)


# Stage name -> seconds, exclusive of nested stages; logs a stage line as each ends (see graphprune.progress).
Timings = _progress.Timings


def open_backend(source: Any, options: CompressOptions, *, tokenizer: Any = None) -> Backend:
    """The backend that takes `source` for `options` (see `backends.base.choose`)."""
    return backends.choose(source, options)(source, options, tokenizer=tokenizer)


def compress(source: Any, options: CompressOptions | None = None, *, tokenizer: Any = None,
             removed: dict[str, np.ndarray] | None = None, **option_values) -> CompressResult:
    """Prune `source` (an alias, a Hub id `org/name[@revision]`, a path, a Hugging Face folder, an .onnx
    file, a LoadedModel or an nn.Module) as `options` say (or keyword arguments with the names of
    `CompressOptions`).

    With `options.out` the result is written there (atomically: complete or not at all), with its
    recipe (`graphprune_recipe.yaml`) and model card (`README.md`); without it the pruned model is
    returned (streaming needs an output directory). `removed` (group id -> unit indices) skips scoring
    and allocation: exactly those units go (e.g. to prune an ONNX file with the units a PyTorch run
    chose).
    Each stage (load, trace, calibrate, score, allocate, rewrite, write, ...) logs its line with its
    time as it ends (logger "graphprune", INFO); `report["timings_s"]` has them and the total.
    """
    options = (options or CompressOptions()).replace(**option_values).resolved()
    timings = Timings(progress=options.progress)
    with timings.active():
        return _compress(source, options, timings, tokenizer=tokenizer, removed=removed)


def _compress(source: Any, options: CompressOptions, timings: Timings, *, tokenizer: Any, removed):
    from ..models.hub import describe_source, parse_hub_id, resolve_hub

    with timings("load"):
        hub = None
        if isinstance(source, str) and parse_hub_id(source) is not None:  # the snapshot in the local HF cache
            hub = resolve_hub(source, trust_remote_code=options.trust_remote_code, progress=options.progress)
        backend = open_backend(hub.path if hub is not None else source, options, tokenizer=tokenizer)
        try:
            origin = describe_source(source, hub=hub)  # the recipe's source: spec and content hash
        except BaseException:
            backend.close()
            raise
    try:
        with timings("trace"):
            out = backend.prepare_output(options.out) if options.out is not None else None
            before = backend.param_counts()
        records: list[StageRecord] = []
        if options.expert_criterion is not None:
            record, groups = _experts_stage(backend, options, timings)
            records.append(record)
        units_target = options.target if options.expert_criterion is None else options.channel_target()
        if options.units_stage and units_target != "":
            record, groups = _units_stage(backend, options, units_target, timings, removed)
            records.append(record)
        with timings("write"):
            after = backend.param_counts()
            timings["total"] = timings.elapsed()
            report = build_report(
                model_name=hub.repo_id if hub is not None else backend.display_name, options=options,
                records=records,
                params={"before": before[0], "after": after[0], "layers_before": before[1], "layers_after": after[1]},
                blocked_groups=list(groups), trace_notes=backend.trace_notes(groups),
                timings={k: v for k, v in timings.items() if k != "total"} | {"total": timings["total"]},
                run=backend.run_report() if records[-1].stage.kind == "units" else {},
                backend_extra=backend.report_extra())
            report["recipe"] = build_recipe(options, origin, report, backend=backend.name)
            model = backend.finish(report, out)
            if out is not None and Path(out).suffix.lower() == ".onnx" and Path(out).is_file():
                from ..io.card import write_onnx_companions

                write_onnx_companions(out, report)  # NAME.README.md, NAME.recipe.yaml next to the file
        # the final timings: every stage, the write included, and the wall time of the whole call
        timings["total"] = timings.elapsed()
        report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        if out is not None and Path(out).is_dir():
            from ..io.hf import update_run_file

            update_run_file(out, report)
        return CompressResult(model, report, groups, records[-1].removed, out, getattr(backend, "exported", []))
    finally:
        backend.close()


def _units_stage(backend: Backend, options: CompressOptions, target: str | None, timings: Timings,
                 given: dict[str, np.ndarray] | None = None):
    with timings("trace"):
        groups = backend.groups()
        notes = []
        if target is None:
            target, note = backend.default_target(groups)
            notes += [note] if note else []
        chosen = select_groups(groups, target)
        criterion, compensate, sequential = options.criterion, options.compensate, options.sequential
        if criterion is None:  # the backend's best measured pipeline
            criterion, default_compensation, default_sequential = backend.default_pipeline(chosen)
            if compensate not in (None, default_compensation):
                try:  # a compensation the default criterion cannot use (obs needs least squares): FLAP's ranking
                    criteria_registry.get(criterion).check_compensation(compensate)
                except UserError:
                    criterion, default_sequential = "flap", False
            sequential = sequential or (default_sequential and compensate in (None, default_compensation))
            compensate = compensate or default_compensation
        if compensate is None:
            compensate, note = backend.default_compensation(criterion, chosen)
            notes += [note] if note else []
        scorer = criteria_registry.get(criterion, **options.criterion_options)
        scorer.check_compensation(compensate)
        stage = Stage("units", target, criterion, scorer, options.allocation or backend.default_allocation(),
                      options.sparsity, compensate, sequential, notes)
        reason = backend.refusal(stage, tuple(p.strip() for p in target.split(",")))
        if reason:
            raise backend.unsupported(reason)
        chosen = backend.prepare(stage, chosen)
        flops_before = backend.flops_per_token(groups)
    if given is not None:
        unknown = sorted(set(given) - {g.id for g in chosen})
        if unknown:
            raise UserError(f"removed units name groups that are not pruned here: {', '.join(unknown[:3])}")
        scores = Scores()
        plan = Allocation({g.id: np.asarray(given.get(g.id, []), dtype=np.int64) for g in chosen},
                          notes=["removed units given by the caller"])
    else:
        with timings("score"):  # calibration inside it is timed as "calibrate" (calibration/ marks it)
            scores = backend.score(stage, chosen)
        with timings("allocate"):
            plan = _allocate(backend, stage, chosen, scores, options)
            _check_shortfall(stage, chosen, plan, backend.param_counts()[1], options)
    with timings("rewrite"):
        result = backend.apply(stage, chosen, plan.removed, scores)
    from ..moe.channels import ExpertChannelBundles, is_expert_channel

    bundles = ExpertChannelBundles.of(chosen, backend.config)
    kept = kept_units(chosen, result.removed, skip=is_expert_channel)
    if bundles:
        kept["expert_channel"] = bundles.kept(result.removed)  # per expert: every expert of a layer keeps as many
    record = StageRecord(stage, chosen, result.removed, flops_before, plan, scores.diagnostics,
                         backend.calibration_note(), result.report, kept)
    return record, groups


def _allocate(backend: Backend, stage: Stage, chosen: list, scores, options: CompressOptions):
    from ..moe.channels import ExpertChannelBundles

    # channels inside routed experts: one count per layer, each expert its own lowest channels
    bundles = ExpertChannelBundles.of(chosen, backend.config)
    groups, raw, comparable = bundles.for_allocation(chosen, scores.raw, scores.comparable or None)
    plan = allocation_registry.allocate(groups, raw, method=stage.allocation, sparsity=float(stage.sparsity),
                                        total_params=backend.param_counts()[1], floor=options.floor,
                                        round_to=options.round_to, block_importance=backend.block_importance(),
                                        comparable=comparable)
    plan = bundles.expand(plan, scores.raw, options.round_to)
    if bundles and stage.compensate == "bias":
        stage.notes.append("channels inside routed experts are not bias-compensated (stacked experts have no bias "
                           "per expert)")
    return plan


def _check_shortfall(stage: Stage, chosen: list, plan, total: int, options: CompressOptions) -> None:
    """Refuse a plan that removes clearly less than asked (by more than one unit's granularity, or 0.01),
    saying why, unless --allow-short: a run must never pass off 0.07 for 0.2. --round-to keeps counts up
    to the next multiple; when that costs more than the tolerance, it is what the message names."""
    from ..moe.channels import ALIGN, is_expert_channel

    removed = sum(len(plan.removed.get(g.id, ())) * g.params_per_unit for g in chosen)
    achieved = removed / max(total, 1)
    experts_per_layer: dict = {}
    for g in chosen:
        if is_expert_channel(g):
            experts_per_layer[g.layer] = experts_per_layer.get(g.layer, 0) + 1

    def step(g) -> int:  # one more unit of this group (channels inside experts go by ALIGN in every expert)
        if is_expert_channel(g):
            return g.params_per_unit * ALIGN * experts_per_layer[g.layer]
        return g.params_per_unit

    granularity = max((step(g) for g in chosen), default=0) / max(total, 1)
    if stage.sparsity - achieved <= max(0.01, 2 * granularity) or options.allow_short:
        return
    rounded = [g for g in chosen if g.kind == "channel" and options.round_to >= g.units]
    if rounded:
        why = (f"--round-to {options.round_to} is at least the width of {len(rounded)} channel group(s) "
               f"({rounded[0].units} channels in {rounded[0].scope}), which therefore keep every channel")
    elif plan.floored:
        why = f"{len(plan.floored)} group(s) are down to their last unit"
    else:
        why = "the selected groups' units are too coarse for this sparsity"
    raise PruningError(f"the plan removes {achieved:.4f} of the layer parameters, asked {stage.sparsity}: {why}; "
                       f"lower --round-to or widen --target, or pass --allow-short to accept it")


def _experts_stage(backend: Backend, options: CompressOptions, timings: Timings):
    name = options.expert_criterion
    criterion_options = dict(options.criterion_options) if options.criterion is None else {}
    scorer_options = {"seed": options.seed, **criterion_options} if name == "random" else criterion_options
    sparsity = options.expert_sparsity or options.sparsity
    with timings("trace"):
        groups = backend.groups()
        scorer = expert_criterion(name, **scorer_options)
        stage = Stage("experts", "experts", name, scorer, options.expert_allocation, sparsity)
        reason = backend.refusal(stage, ("experts",))
        if reason:
            raise backend.unsupported(reason)
        layers = backend.expert_layers()
        plan_counts(layers, sparsity, stage.allocation)  # refuse impossible requests before calibrating
        flops_before = backend.flops_per_token(groups)
    with timings("experts_calibration"):
        scores = backend.score(stage, layers)
    per_layer = {layer.layer: scores.raw[layer.group.id] for layer in layers}
    counts = plan_counts(layers, sparsity, stage.allocation, per_layer)
    removed = {layer.group.id: choose_removed(layer, per_layer[layer.layer], counts[layer.layer]) for layer in layers}
    with timings("experts_rewrite"):
        result = backend.apply(stage, [layer.group for layer in layers], removed, scores)
    calibration = backend.expert_calibration_note()
    section = {
        "criterion": name, "criterion_options": criterion_options, "allocation": stage.allocation,
        "requested_sparsity": float(sparsity), "calibration": calibration,
        "experts_before": sum(layer.num_experts for layer in layers),
        "experts_removed": int(sum(len(r) for r in removed.values())),
        "kept_per_layer": {str(layer.layer): layer.num_experts - len(removed[layer.group.id]) for layer in layers},
        "removed_per_layer": {str(layer.layer): removed[layer.group.id].tolist() for layer in layers},
        "uniform_layers": result.report["uniform_layers"],
    }
    return StageRecord(stage, [layer.group for layer in layers], removed, flops_before, None, None, calibration,
                       result.report, experts=section), groups


def compress_streaming(model_dir: str | Path, out: str | Path, **option_values) -> CompressResult:
    """`compress` with the streaming backend: the checkpoint folder `model_dir` pruned layer by layer into
    `out` (same options; see `backends.stream`)."""
    return compress(model_dir, out=out, stream=True, **option_values)
