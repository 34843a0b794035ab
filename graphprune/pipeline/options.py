"""What a compress run is asked to do: `CompressOptions`, checked before any expensive work.

`CompressOptions.resolved()` checks the options alone and refuses contradictory requests in one
line. Defaults that depend on the model and the backend (the pipeline when no criterion is named,
the compensation, the allocation for encoders, the target where heads cannot be written) are filled
by the driver once the model is open (`backends.base.Backend.default_pipeline` and friends).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import allocation as allocation_registry
from .. import criteria as criteria_registry
from ..criteria.base import ExpertCriterion, Need
from ..errors import UserError
from ..moe.experts import EXPERT_ALLOCATIONS
from ..moe.experts import expert_criterion as expert_scorer
from ..passes import compensation as compensation_registry

# "heads" means whole KV groups under GQA and plain heads otherwise (see targets.select_groups).
TARGETS = {"channels": ("channel",), "heads": ("kv-group",), "query-heads": ("head",), "kv-groups": ("kv-group",),
           "experts": ("expert",), "hidden": ("hidden",), "expert-channels": ("channel",)}
DEFAULT_TARGET = "channels,heads"
DEFAULT_EXPERT_CRITERION = "easyep"
DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class CompressOptions:
    """Every option of `graphprune compress` (the CLI builds one from its arguments)."""

    criterion: str | None = None
    sparsity: float = 0.2
    allocation: str | None = None
    target: str | None = None
    # a spec string or path, or a list of them (expert criteria combine domains); from Python also texts,
    # a datasets.Dataset, a LongTensor [N, T], a DataLoader or a forward loop (calibration.data)
    calib: Any = "default"
    calib_general: str | None = None
    text_column: str | None = None  # the column of a datasets.Dataset given as calib= (default "text")
    nsamples: int = 128
    seqlen: int = 128
    seed: int = 0
    compensate: str | None = None
    sequential: bool = False
    damp: float = 0.01
    round_to: int = 1
    allow_short: bool = False  # accept a plan that removes clearly less than asked (see pipeline.run)
    floor: int = 1
    batch_size: int = 8
    pair_batch: int = 16
    criterion_options: dict = field(default_factory=dict)
    units_stage: bool = True  # channels/heads are pruned (False: routed experts only); set by `resolved`
    expert_criterion: str | None = None
    expert_sparsity: float | None = None
    expert_allocation: str = "uniform"
    use_cache: bool = True
    progress: bool = True
    # where the model runs
    backend: str | None = None  # None: chosen from the source (onnx for .onnx files, stream when asked)
    stream: bool | None = None
    resume: bool = False
    device: str | None = None
    dtype: str | None = None
    out_dtype: str | None = None  # None: the input's stored dtype (bf16 in, bf16 out)
    # the output
    out: str | Path | None = None
    force: bool = False
    export: str | None = None
    release_input: bool = False
    # Python only: what a plain nn.Module (no Hugging Face config) is traced with, a tensor, a tuple of
    # positional tensors or a dict of keyword tensors; never a command-line option (it is an object)
    example_inputs: Any = None
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def replace(self, **changes) -> "CompressOptions":
        return dataclasses.replace(self, **changes)

    @property
    def calib_sources(self) -> list:
        from ..calibration.data import CalibrationData

        return [self.calib] if isinstance(self.calib, (str, Path, CalibrationData)) else list(self.calib)

    def target_parts(self) -> list[str]:
        parts = [t.strip() for t in (self.target or DEFAULT_TARGET).split(",") if t.strip()] or [""]
        for part in parts:
            if part not in TARGETS:
                raise UserError(f"unknown --target '{part}' (choose from {', '.join(TARGETS)})")
        return parts

    # ------------------------------------------------------------------ checks
    def resolved(self) -> "CompressOptions":
        """These options with the option-only defaults filled, or a one-line UserError."""
        from ..calibration.data import as_calibration

        if self.example_inputs is not None:
            self = self.replace(example_inputs=checked_example_inputs(self.example_inputs))
        if not isinstance(self.calib, (str, Path)) or not isinstance(self.calib_general, (str, Path, type(None))):
            # Python data (texts, a Dataset, token ids, batches, a forward loop) becomes one CalibrationData
            self = self.replace(calib=as_calibration(self.calib, text_column=self.text_column),
                                calib_general=as_calibration(self.calib_general, text_column=self.text_column))
        for name, value in (("--sparsity", self.sparsity), ("--expert-sparsity", self.expert_sparsity)):
            if value is None and name == "--expert-sparsity":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
                    or not 0.0 < float(value) < 1.0:
                raise UserError(f"{name} must be a number strictly between 0 and 1, got {value}")
        criterion, expert = self._criteria()
        if expert is not None:
            expert_scorer(expert)
            if self.expert_allocation not in EXPERT_ALLOCATIONS:
                raise UserError(f"unknown --expert-allocation '{self.expert_allocation}' (choose from "
                                f"{', '.join(EXPERT_ALLOCATIONS)})")
        if criterion is not None and len(self.calib_sources) > 1:
            raise UserError("several --calib sources are combined by the expert criteria only; channels and heads "
                            "calibrate on one (gaprune takes its second set with --calib-general)")
        scorer = criteria_registry.get(criterion, **self.criterion_options) if criterion is not None else None
        if expert is not None and criterion is None and self.criterion_options:
            expert_scorer(expert, **self.criterion_options)  # options of an experts-only run are the expert's
        two_sets = scorer is not None and Need.GENERAL_GRADIENTS in scorer.needs
        if two_sets and self.calib_general is None:
            raise UserError(f"criterion '{criterion}' compares a domain and a general calibration set: give the general "
                            f"one with --calib-general FILE (and the domain one with --calib)")
        if not two_sets and self.calib_general is not None:
            raise UserError(f"--calib-general is only used by criteria that compare two calibration sets (gaprune), "
                            f"not by '{criterion or expert}'")
        if self.allocation is not None:
            allocation_registry.get(self.allocation)
        compensate = self.compensate
        if compensate is not None:
            compensation_registry.get(compensate)
            if scorer is not None:
                scorer.check_compensation(compensate)
        if self.sequential and compensate == "none":
            raise UserError("--sequential recalibrates each layer for its compensation: it needs --compensate bias or "
                            "lsq")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise UserError("--round-to must be a positive integer")
        if self.device is not None and self.device not in DEVICES:
            raise UserError(f"unknown --device '{self.device}' (choose from {', '.join(DEVICES)})")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"unknown --dtype '{self.dtype}' (choose from {', '.join(DTYPES)})")
        if self.out_dtype is not None and self.out_dtype not in DTYPES:
            raise UserError(f"unknown --out-dtype '{self.out_dtype}' (choose from {', '.join(DTYPES)})")
        units = expert is None or self.channel_target() != ""
        return self.replace(criterion=criterion, expert_criterion=expert, compensate=compensate, units_stage=units)

    def _criteria(self) -> tuple[str | None, str | None]:
        """(criterion for channels/heads, criterion for routed experts). The first is None where the
        user named none (the backend's best pipeline runs, see `units_stage`), the second None where
        no experts stage runs. Expert criteria (easyep, reap, ...) score experts only, the others channels and heads only:
        `--target experts` takes `--criterion` when it names an expert criterion, a combined target takes
        the expert one from `--expert-criterion` (default easyep)."""
        parts = self.target_parts()
        criterion, expert_criterion = self.criterion, self.expert_criterion
        is_expert = criterion is not None and isinstance(criteria_registry.get(criterion), ExpertCriterion)
        if expert_criterion is not None:
            criteria_registry.get(expert_criterion)
        if "experts" not in parts:
            if is_expert:
                raise UserError(f"criterion '{criterion}' scores routed experts: use it with --target experts")
            if expert_criterion is not None:
                raise UserError("--expert-criterion needs --target experts (e.g. --target experts,channels)")
            return criterion, None
        if parts == ["experts"]:
            if criterion is not None and not is_expert and expert_criterion is None:
                expert_scorer(criterion)  # raises: names the expert criteria
            return None, expert_criterion or (criterion if is_expert else None) or DEFAULT_EXPERT_CRITERION
        if is_expert:
            raise UserError(f"criterion '{criterion}' scores experts only; with --target {self.target} name the "
                            f"channel/head criterion with --criterion and the expert one with --expert-criterion "
                            f"{criterion}")
        return criterion, expert_criterion or DEFAULT_EXPERT_CRITERION

    def channel_target(self) -> str | None:
        """The target of the channel/head stage once experts are done ("" when experts are all)."""
        if self.target is None:
            return None
        return ",".join(p for p in self.target_parts() if p != "experts")


def checked_example_inputs(value: Any) -> tuple | dict:
    """`example_inputs` as `graph.trace` takes it (a lone tensor becomes a 1-tuple), or a one-line UserError."""
    import torch

    if torch.is_tensor(value):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(torch.is_tensor(v) for v in value):
        return tuple(value)
    if isinstance(value, dict) and value and all(isinstance(k, str) and torch.is_tensor(v) for k, v in value.items()):
        return dict(value)
    kind = type(value).__name__ if not isinstance(value, (tuple, list, dict)) or value else f"an empty {type(value).__name__}"
    raise UserError(f"example_inputs= takes a tensor, a tuple of tensors (the positional inputs) or a dict of "
                    f"tensors (keyword inputs) the module runs on, got {kind}")
