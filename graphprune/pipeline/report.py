"""The one report builder: what `graphprune_report.json` says about a run, for every backend.

Keys describe the result (byte-identical for the same inputs and seed) except `RUN_REPORT_KEYS`
(`io.hf`), which measure the run (timings, memory, cache hits) and go to `graphprune_run.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..graph.groups import BLOCKED


@dataclass
class StageRecord:
    """What one stage did, for the report."""

    stage: Any  # backends.base.Stage
    chosen: list
    removed: dict[str, np.ndarray]
    flops_before: float
    plan: Any = None  # allocation.Allocation
    diagnostics: Any = None
    calibration: Any = None  # what the backend says about the calibration it ran
    backend_report: dict = field(default_factory=dict)  # StageResult.report
    kept_units: dict = field(default_factory=dict)
    experts: dict | None = None  # the experts stage's own section

    @property
    def flops_removed(self) -> float:
        by_id = {g.id: g for g in self.chosen}
        return float(sum(len(r) * by_id[gid].flops_per_unit for gid, r in self.removed.items() if gid in by_id))


def version() -> str:
    from .. import __version__

    return __version__


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB: Linux's VmHWM, which a new program starts afresh.
    `ru_maxrss` is the fallback elsewhere; on Linux it survives fork + exec, so a process started by
    a parent that once held 8 GB reports at least 8 GB."""
    import resource

    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def kept_units(chosen: list, removed: dict[str, np.ndarray], *, skip=lambda g: False) -> dict[str, dict[str, int]]:
    """kind -> layer (or group id outside layers) -> units kept."""
    kept: dict[str, dict[str, int]] = {}
    for g in chosen:
        if not skip(g):
            where = str(g.layer) if g.layer is not None else g.id
            kept.setdefault(g.kind, {})[where] = g.units - len(removed.get(g.id, ()))
    return kept


def build_report(*, model_name: str, options, records: list[StageRecord], params: dict[str, int],
                 blocked_groups: list, trace_notes: list[str], timings: dict[str, float],
                 run: dict[str, Any], backend_extra: dict[str, Any]) -> dict[str, Any]:
    """`params`: before / after / layers_before / layers_after (the sparsity is measured on them)."""
    units = next((r for r in records if r.stage.kind == "units"), None)
    experts = next((r for r in records if r.stage.kind == "experts"), None)
    main = units or experts
    layers_before, layers_after = params["layers_before"], params["layers_after"]
    flops_before = records[0].flops_before
    flops_after = records[-1].flops_before - records[-1].flops_removed
    kept: dict[str, Any] = {}
    units_before: dict[str, Any] = {}  # what each kept count was before (the model card draws both)
    if units is not None:
        from ..moe.channels import is_expert_channel

        kept.update(units.kept_units)
        units_before.update({kind: counts for kind, counts in kept_units(units.chosen, {}, skip=is_expert_channel).items()
                             if kind in units.kept_units})
    if experts is not None:
        kept["expert"] = experts.experts["kept_per_layer"]
        units_before["expert"] = {layer: count + len(experts.experts["removed_per_layer"].get(layer, []))
                                  for layer, count in experts.experts["kept_per_layer"].items()}
    stage = main.stage
    calibration = main.calibration
    report: dict[str, Any] = {
        "graphprune_version": version(),
        "model": model_name,
        "criterion": stage.criterion,
        "criterion_options": (dict(options.criterion_options) if units is not None else {}),
        "allocation": stage.allocation,
        "target": stage.target if units is not None else "experts",
        "target_note": "; ".join(stage.notes) or None,
        "compensate": stage.compensate,
        "requested_sparsity": float(stage.sparsity),
        "seed": options.seed if units is not None else (calibration or {}).get("seed"),
        "calibration": calibration,
        "params": {"before": params["before"], "after": params["after"], "layers_before": layers_before,
                   "layers_after": layers_after,
                   "achieved_sparsity": (layers_before - layers_after) / max(layers_before, 1)},
        "flops_per_token": {"before": flops_before, "after": flops_after},
        "kept_units": kept,
        "units_before": units_before,
        "floored_groups": list(main.plan.floored) if units is not None else [],
        "allocation_notes": list(main.plan.notes) if units is not None else [],
        "blocked_groups": [{"scope": g.scope, "kind": g.kind, "reason": g.reason} for g in blocked_groups
                           if g.status == BLOCKED],
        "trace": list(trace_notes),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **run,
    }
    if units is not None:
        report["layerwise"] = units.backend_report.get("layerwise")
        report["criterion_diagnostics"] = units.diagnostics
        for key, value in units.backend_report.items():
            if key != "layerwise":
                report[key] = value
    if experts is not None:
        report["experts"] = experts.experts
        uniform = experts.experts["uniform_layers"]
        report["uniform_layers"] = uniform and report.get("uniform_layers", True)
    report.update(backend_extra)
    return report
