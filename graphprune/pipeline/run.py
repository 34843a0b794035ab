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

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import allocation as allocation_registry
from .. import backends
from .. import criteria as criteria_registry
from ..allocation import Allocation
from ..backends.base import Backend, Stage
from ..criteria.scoring import Scores
from ..errors import PruningError, UserError
from ..moe.experts import choose_removed, expert_criterion, plan_counts
from .options import CompressOptions
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


class Timings(dict):
    """Stage name -> seconds; `with timings("name"):` adds the block's wall time."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - started


def open_backend(source: Any, options: CompressOptions, *, tokenizer: Any = None) -> Backend:
    """The backend that takes `source` for `options` (see `backends.base.choose`)."""
    return backends.choose(source, options)(source, options, tokenizer=tokenizer)


def compress(source: Any, options: CompressOptions | None = None, *, tokenizer: Any = None,
             removed: dict[str, np.ndarray] | None = None, **option_values) -> CompressResult:
    """Prune `source` (an alias, a path, a Hugging Face folder, an .onnx file, a LoadedModel or an
    nn.Module) as `options` say (or keyword arguments with the names of `CompressOptions`).

    With `options.out` the result is written there (atomically: complete or not at all); without it
    the pruned model is returned (streaming needs an output directory). `removed` (group id ->
    unit indices) skips scoring and allocation: exactly those units go (e.g. to prune an ONNX file
    with the units a PyTorch run chose).
    """
    options = (options or CompressOptions()).replace(**option_values).resolved()
    started = time.perf_counter()
    timings = Timings()
    with timings("load"):
        backend = open_backend(source, options, tokenizer=tokenizer)
    try:
        out = backend.prepare_output(options.out) if options.out is not None else None
        before = backend.param_counts()
        records: list[StageRecord] = []
        if options.expert_criterion is not None:
            record, groups = _experts_stage(backend, options, timings)
            records.append(record)
        units_target = options.target if options.expert_criterion is None else options.channel_target()
        if options.criterion is not None and units_target != "":
            record, groups = _units_stage(backend, options, units_target, timings, removed)
            records.append(record)
        after = backend.param_counts()
        timings["total"] = time.perf_counter() - started
        report = build_report(
            model_name=backend.display_name, options=options, records=records,
            params={"before": before[0], "after": after[0], "layers_before": before[1], "layers_after": after[1]},
            blocked_groups=list(groups), trace_notes=backend.trace_notes(groups), timings=dict(timings),
            run=backend.run_report() if records[-1].stage.kind == "units" else {},
            backend_extra=backend.report_extra())
        with timings("write"):
            model = backend.finish(report, out)
        return CompressResult(model, report, groups, records[-1].removed, out, getattr(backend, "exported", []))
    finally:
        backend.close()


def _units_stage(backend: Backend, options: CompressOptions, target: str | None, timings: Timings,
                 given: dict[str, np.ndarray] | None = None):
    with timings("trace"):
        groups = backend.groups()
        scorer = criteria_registry.get(options.criterion, **options.criterion_options)
        if target is None:
            target, note = backend.default_target(groups)
        else:
            note = None
        stage = Stage("units", target, options.criterion, scorer, options.allocation or backend.default_allocation(),
                      options.sparsity, options.compensate, options.sequential, [note] if note else [])
        reason = backend.refusal(stage, tuple(p.strip() for p in target.split(",")))
        if reason:
            raise backend.unsupported(reason)
        chosen = select_groups(groups, target)
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
        with timings("calibration"):
            scores = backend.score(stage, chosen)
        with timings("allocation"):
            plan = _allocate(backend, stage, chosen, scores, options)
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
