"""The backend contract: where a model lives while it is pruned, and what the driver asks of it.

The driver (`graphprune.pipeline.run.compress`) knows nothing of PyTorch modules, checkpoints on
disk or ONNX protos; it calls, in this order, for each stage (routed experts, then channels and
heads):

    prepare_output(out)           may the output be written there (before any work)
    param_counts()                (unique parameters, parameters of the repeated blocks)
    groups()                      its dependency groups (`graph.GroupSet`)
    refusal(stage)                why this backend cannot run the stage, or None
    prepare(stage, chosen)        checks that need the model (layouts the passes cannot handle)
    score(stage, chosen)          calibrate what the criterion and compensation declare they need,
                                  then score through `criteria.scoring` in the criterion's form
    apply(stage, chosen, removed) rewrite through the backend's passes; afterwards `param_counts()`
                                  and `groups()` describe the pruned model
    finish(report, out)           validate, and write `out` through `io.atomic` (or return the
                                  model to a Python caller when `out` is None)

A backend never imports the driver. `Capabilities` says what a backend computes; `refusal` turns a
stage it cannot run into the one-line reason the user sees and the capability matrix prints.
Backends register with `@register` (or the ``graphprune.backends`` entry-point group) and say
whether they take a source with `accepts`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from ..plugins import load_entry_points
from typing import Any, ClassVar

import numpy as np

from ..criteria.base import Criterion, ExpertCriterion, Need
from ..errors import UserError


@dataclass
class Stage:
    """One pruning pass: which units, scored how, removed how much, compensated how."""

    kind: str  # "experts" or "units"
    target: str | None  # the --target parts of this stage (None: the backend's default)
    criterion: str
    scorer: Criterion
    allocation: str
    sparsity: float
    compensate: str = "none"
    sequential: bool = False
    notes: list[str] = field(default_factory=list)  # what the report's target_note says

    @property
    def needs(self) -> Need:
        from ..allocation import get as allocator
        from ..passes import compensation

        return (self.scorer.needs | compensation.get(self.compensate).needs_for(sequential=self.sequential)
                | allocator(self.allocation).needs)

    @property
    def layerwise(self) -> bool:
        """Runs block by block (least squares, --sequential, or a criterion scored on blocks)."""
        return Need.GRAMS in self.needs


@dataclass
class StageResult:
    """What `apply` reports back: the units removed (maybe re-chosen by --sequential) and what the
    passes found (report entries)."""

    removed: dict[str, np.ndarray]
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can compute and carry out (the capability matrix is generated from this)."""

    needs: Need  # the statistics it can compute
    compensations: frozenset[str]
    sequential: bool
    targets: frozenset[str]
    experts: bool  # the routed-expert stage
    self_generated_calibration: bool  # --calib none with a data criterion
    why_not: dict[str, str] = field(default_factory=dict)  # need name or feature -> the reason it is missing


class Backend(ABC):
    """See the module docstring."""

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities]

    @classmethod
    def accepts(cls, source: Any, options) -> bool:
        """Whether this backend should open `source` for `options` (the first that accepts wins)."""
        return False

    @classmethod
    def refusal_of(cls, scorer: Criterion, compensate: str, *, sequential: bool = False,
                   target_parts: tuple[str, ...] = ()) -> str | None:
        """Why this backend cannot run `scorer` with `compensate`, or None (also the capability matrix)."""
        caps = cls.capabilities
        if isinstance(scorer, ExpertCriterion) and not caps.experts:
            return caps.why_not.get("experts", f"the {cls.name} backend does not prune routed experts")
        from ..passes import compensation

        needs = scorer.needs | compensation.get(compensate).needs_for(sequential=sequential)
        missing = needs & ~caps.needs
        if missing:
            names = [n.name.lower() for n in Need if n in missing and n.name]
            reason = next((caps.why_not[n] for n in names if n in caps.why_not), None)
            return reason or (f"criterion '{scorer.name}' with --compensate {compensate} needs "
                              f"{', '.join(names)}, which the {cls.name} backend does not compute")
        if compensate not in caps.compensations:
            return caps.why_not.get(f"compensate {compensate}",
                                    f"--compensate {compensate} is not available with the {cls.name} backend")
        if sequential and not caps.sequential:
            return caps.why_not.get("sequential", f"--sequential is not available with the {cls.name} backend")
        for part in target_parts:
            if part and part not in caps.targets:
                return caps.why_not.get(f"target {part}", f"--target {part} is not available with the {cls.name} "
                                                          f"backend (it supports {', '.join(sorted(caps.targets))})")
        return None

    def refusal(self, stage: Stage, target_parts: tuple[str, ...] = ()) -> str | None:
        return self.refusal_of(stage.scorer, stage.compensate, sequential=stage.sequential, target_parts=target_parts)

    config: Any = None  # the model's Hugging Face config, where it has one

    @property
    @abstractmethod
    def display_name(self) -> str:
        """What the report calls the model."""

    @abstractmethod
    def param_counts(self) -> tuple[int, int]:
        """(unique parameters, parameters of the repeated blocks: the sparsity denominator)."""

    @abstractmethod
    def groups(self): ...

    def flops_per_token(self, groups) -> float:
        """Multiply-add FLOPs per token of the model `groups` were found in."""
        from ..graph.groups import flops_per_token

        return flops_per_token(groups)

    def trace_notes(self, groups) -> list[str]:
        """What the tracer said (the report's `trace`)."""
        return list(groups.graph.notes)

    def prepare_output(self, out) -> Any:
        """Check `out` before any work (`io.paths.check_output`); returns the resolved path."""
        from ..io.paths import check_output

        return check_output(out, force=self.options.force)

    def unsupported(self, reason: str) -> Exception:
        """The error a refused stage raises."""
        return UserError(reason)

    def calibration_note(self) -> Any:
        """What the report's `calibration` says about the units stage's calibration."""
        return None

    def expert_calibration_note(self) -> Any:
        return None

    def expert_layers(self) -> list:
        raise UserError(f"the {self.name} backend does not prune routed experts")

    def block_importance(self) -> dict[int, float] | None:
        """Per block angle (for the cfsp allocation), when calibration measured it."""
        return None

    def run_report(self) -> dict[str, Any]:
        """Measurements of this run for `graphprune_run.json` (cache hits, ...)."""
        return {}

    def report_extra(self) -> dict[str, Any]:
        """Backend-specific report sections (streaming, ONNX shape constants, ...)."""
        return {}

    def default_target(self, groups) -> tuple[str, str | None]:
        """(target, note) when the user names none."""
        return "channels,heads", None

    def default_allocation(self) -> str:
        return "global"

    def default_pipeline(self, chosen: list) -> tuple[str, str, bool]:
        """(criterion, compensation, sequential) when the user names no criterion: the best measured
        pipeline this backend runs (docs/benchmarks.md): structured OBS ranked by the loss Fisher,
        least-squares compensation, each layer re-chosen on the outputs of the pruned layers before it."""
        return "obs", "lsq", True

    def default_compensation(self, criterion: str, chosen: list) -> tuple[str, str | None]:
        """(compensation, note) when none is asked for: least squares where this backend and the layers
        support it, else the criterion's fallback (FLAP's own bias for flap), with the reason."""
        from ..passes import compensation

        if "lsq" in self.capabilities.compensations:
            return "lsq", None
        fallback = compensation.fallback_for(criterion)
        return fallback, f"--compensate {fallback}: least squares is not available with the {self.name} backend"

    def prepare(self, stage: Stage, chosen: list) -> list:
        """Checks that need the model; returns the groups the stage really prunes (a backend may set
        some aside, saying why in `stage.notes`)."""
        return chosen

    @abstractmethod
    def score(self, stage: Stage, chosen: list): ...

    @abstractmethod
    def apply(self, stage: Stage, chosen: list, removed: dict[str, np.ndarray], scores) -> StageResult: ...

    @abstractmethod
    def finish(self, report: dict, out) -> Any: ...

    def close(self) -> None:
        """Release what the backend holds (locks, temporary files)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_REGISTRY: dict[str, type[Backend]] = {}
_ORDER: list[str] = []


def register(cls: type[Backend]) -> type[Backend]:
    if cls.name not in _REGISTRY:
        _ORDER.append(cls.name)
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    from . import memory, onnx, stream  # noqa: F401 - registration by import (first accepting wins: onnx, stream, memory)

    load_entry_points("graphprune.backends", "backend", _REGISTRY, lambda _, loaded: register(loaded))


def available() -> list[str]:
    _load()
    return list(_ORDER)


def get(name: str) -> type[Backend]:
    names = available()
    if name not in _REGISTRY:
        raise UserError(f"unknown backend '{name}' (choose from {', '.join(names)})")
    return _REGISTRY[name]


_OVERRIDES: list[type[Backend]] = []


@contextlib.contextmanager
def override(cls: type[Backend]):
    """Within the block every compress uses `cls` (the seam tests inject faults through, see
    `graphprune.testing.faults`)."""
    _OVERRIDES.append(cls)
    try:
        yield cls
    finally:
        _OVERRIDES.remove(cls)


def choose(source: Any, options) -> type[Backend]:
    """The backend for `source`: the one `options.backend` names, else the first that accepts it."""
    if _OVERRIDES:
        return _OVERRIDES[-1]
    if options.backend is not None:
        return get(options.backend)
    # the specific backends first, the catch-all in-memory one last (a plugin is asked before it)
    names = sorted(available(), key=lambda n: n == "memory")
    for name in names:
        if _REGISTRY[name].accepts(source, options):
            return _REGISTRY[name]
    return get("memory")
