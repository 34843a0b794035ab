"""What a criterion sees, what it declares (`Need`, `Form`), and the helpers criteria share."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..calibration.stats import Calibration, InputStats
from ..graph.groups import Group, GroupSet, ParamSlice


class Need(enum.Flag):
    """What must be computed before a criterion can score (or a compensation can run). The driver
    reads these flags and nothing else to decide what calibration runs."""

    NONE = 0
    ACTIVATIONS = enum.auto()  # per input channel statistics of the consumer layers (one forward)
    BLOCK_ANGLES = enum.auto()  # per block: Σ_t arccos(cos(input, output)) (CFSP)
    GRADIENTS = enum.auto()  # per unit gradient statistics of the calibration loss
    GENERAL_GRADIENTS = enum.auto()  # the same on a second, general calibration set (GAPrune)
    GRAMS = enum.auto()  # Gram matrices of layer inputs, block by block (least squares, OBS, --sequential)
    EXPERT_ROUTING = enum.auto()  # routing statistics of MoE layers (expert criteria)

    @classmethod
    def of(cls, value: Any) -> "Need":
        """A `Need` from a Need or from names ("activations", "gram", ... as plugins may declare)."""
        if isinstance(value, cls):
            return value
        aliases = {"gram": "GRAMS", "grams": "GRAMS"}
        out = cls.NONE
        for name in value or ():
            key = aliases.get(str(name).lower(), str(name).upper())
            if key not in cls.__members__:
                raise ValueError(f"unknown need {name!r}")
            out |= cls[key]
        return out

    def within(self, other: "Need") -> bool:
        """Every flag of this set is in `other`."""
        return not (self & ~other)

    def names(self) -> list[str]:
        return [n.name.lower() for n in type(self) if n.name and n.value and n in self]


class Form(enum.Enum):
    """How a criterion is scored (`criteria.scoring` dispatches on it)."""

    UNITS = "units"  # score(group, ctx) for each group
    BLOCKS = "blocks"  # score_blocks(block source, groups, params): all groups of a block together
    EXPERT_LAYERS = "expert-layers"  # score_layer(layer, routing statistics) per MoE layer


@dataclass
class ScoringContext:
    model: torch.nn.Module
    groups: GroupSet
    params: dict[str, torch.Tensor]  # every parameter/state name (tied names too) -> tensor
    calibration: Calibration | None = None
    unit_gradients: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # gid -> stats
    # Criteria that compare two calibration sets (needs "general_gradients"): the same statistics on
    # the general set, and per unit the cosine of the two sets' gradients on the unit's weights.
    general_unit_gradients: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    unit_alignment: dict[str, np.ndarray] = field(default_factory=dict)

    def weight(self, s: ParamSlice) -> torch.Tensor:
        """The slice's parameter as [units, width, rest...] (unit axis first)."""
        moved = s.units_first(self.params[s.param].detach())  # a view: nothing copied yet
        idx = torch.as_tensor(s.indices, dtype=torch.long)
        picked = moved[idx.reshape(-1)].to(torch.float64)  # convert only what is scored
        return picked.reshape(idx.shape[0], idx.shape[1], *moved.shape[1:])

    def input_stats(self, s: ParamSlice) -> InputStats | None:
        """Calibration statistics of the input of the layer that reads slice `s` as its input axis."""
        if self.calibration is None or s.role not in CONSUMER_ROLES:
            return None
        return self.calibration.inputs.get(stats_key(s))


def module_of(param: str) -> str:
    return param.rsplit(".", 1)[0]


# The input features of a linear layer, of one expert inside stacked expert weights, and the input
# channels of a convolution (statistics only where a backend collected them: plain nn.Modules).
CONSUMER_ROLES = ("linear.in", "expert.in", "conv.in")


def consumer_slices(group: Group, *, conv: bool = False) -> list[ParamSlice]:
    """Slices where the group's units are the *input* features of a linear layer (down_proj, o_proj),
    or of one routed expert's down projection (a slice of the stacked `experts.down_proj`); with
    `conv`, also the input channels of convolutions (`[out, in, *kernel]` weights). Off by default:
    only the in-memory backend collects channel statistics of convolution inputs, and only the
    plain-module rewrite compensates them."""
    return [s for s in group.slices if s.role == "linear.in" or (s.role == "expert.in" and s.expert is not None)
            or (conv and s.role == "conv.in")]


def stats_key(s: ParamSlice) -> str:
    """Where calibration keeps the input statistics of the layer reading `s`: the module name, or
    for one expert of stacked weights `<param>[<expert>]` (e.g. `...mlp.experts.down_proj[3]`),
    collected by `graphprune.moe.channels`."""
    return f"{s.param}[{s.expert}]" if s.expert is not None else module_of(s.param)


class Criterion:
    """Scores units of groups. Subclasses set `name`, `needs`, and implement `score`."""

    name: ClassVar[str] = ""
    needs: ClassVar[Need] = Need.NONE
    form: ClassVar[Form] = Form.UNITS

    # Option names this criterion reads, with what each means (shown by `graphprune criteria`);
    # anything else is refused, so a misspelt option never silently falls back to a default.
    option_help: ClassVar[dict[str, str]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.option_help))
        if unknown:
            from ..errors import UserError

            known = ", ".join(sorted(self.option_help)) or "none"
            raise UserError(f"criterion '{self.name}' has no option {unknown[0]!r} (its options: {known})")
        self.options = options

    def score(self, group: Group, ctx: ScoringContext) -> np.ndarray:
        raise NotImplementedError

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.needs = Need.of(cls.__dict__.get("needs", cls.needs))  # plugins may declare names

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise a UserError if this criterion (with its options) cannot score `model`; called
        before any calibration runs."""

    def check_compensation(self, compensate: str) -> None:
        """Raise a UserError if this criterion cannot be used with `compensate` (checked with the
        options, before the model loads)."""

    def diagnostics(self, groups: list[Group], ctx: ScoringContext) -> dict | None:
        """What the run report should say about how the criterion scored (None: nothing)."""
        return None

    def global_score(self, group: Group, ctx: ScoringContext, raw: np.ndarray) -> np.ndarray | None:
        """Scores comparable across groups and kinds for the global allocation, or None to let the
        allocator standardise the raw scores per kind across all layers."""
        return None

    def reselect(self, group: Group, consumer: ParamSlice, weight_aug: torch.Tensor, gram, count: int,
                 dead_columns: np.ndarray) -> np.ndarray | None:
        """Sequential mode: which `count` units of `group` to remove, given its consumer layer's
        [W | b] and the Gram matrix of that layer's input measured on the already pruned upstream
        blocks; None keeps the allocator's choice (criteria that do not read activations)."""
        return None

    def channel_stats(self, group: Group, ctx: ScoringContext, fn, column_transform=None) -> np.ndarray:
        """Average fn(stats, W_columns) over the consumer columns of each unit.

        `fn(stats_subset, columns)` gets per-column statistics and the consumer weight columns
        ([out, n_cols]) and returns one score per column.
        """
        total = np.zeros(group.units)
        count = 0
        for s in consumer_slices(group, conv=True):
            st = ctx.input_stats(s)
            if st is None:
                continue
            # [out, in]: a torch Linear weight as it is, an ONNX MatMul weight [in, out] transposed; a
            # convolution's [out, in, kh, kw] as [out·kh·kw, in] (every weight that reads channel j)
            part, axis = s.local(ctx.params[s.param].detach())
            w = part.movedim(axis, -1).to(torch.float64)
            w = w.reshape(-1, w.shape[-1])
            idx = torch.as_tensor(s.indices, dtype=torch.long)  # [units, width]
            per_column = fn(st, w)  # [in]
            if column_transform is not None:
                per_column = column_transform(per_column)
            total += per_column[idx].mean(dim=1).numpy()
            count += 1
        if count == 0:
            raise MissingStatistics(group)
        return total / count


class ChannelCriterion(Criterion):
    """A criterion defined per input channel of the consumer layers (o_proj, down_proj, ...).

    A unit scores the mean of its channels. For the global ranking the channel metric is first
    z-scored within its layer (FLAP's standardisation of the stacked [layers, channels] metric
    along the channel axis), so a head averages the standardised values of its channels: it is
    compared with single channels on one scale without a 3-head layer looking as spread out as a
    1536-channel one.
    """

    needs = Need.ACTIVATIONS

    def column_metric(self, stats: InputStats, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def transform_for_ranking(self, group: Group, metric: torch.Tensor) -> torch.Tensor:
        return metric

    def score(self, group, ctx):
        return self.channel_stats(group, ctx, self.column_metric)

    def reselect(self, group, consumer, weight_aug, gram, count, dead_columns):
        per_column = self.column_metric(gram.input_stats(), weight_aug[:, :-1])
        idx = torch.as_tensor(consumer.indices, dtype=torch.long)
        scores = per_column[idx].mean(dim=1).numpy()
        order = np.lexsort((np.arange(len(scores)), scores))  # lowest first, ties by index
        return np.sort(order[:count])

    def global_score(self, group, ctx, raw):
        def standardise(metric):
            m = self.transform_for_ranking(group, metric)
            return (m - m.mean()) / m.std().clamp_min(1e-30)

        return self.channel_stats(group, ctx, self.column_metric, column_transform=standardise)


class MissingStatistics(Exception):
    def __init__(self, group: Group, why: str = "has no consumer layer with calibration statistics") -> None:
        super().__init__(f"group {group.id} ({group.kind} {group.scope}) {why}")
        self.group = group


class ExpertCriterion(Criterion):
    """Scores the routed experts of one MoE layer from routing statistics (`graphprune.moe.routing`).

    With several calibration domains the scores of each domain are divided by their sum over the
    layer's experts (each domain's share of the layer's importance) and added, so every domain
    counts equally whatever its raw scale.
    """

    needs = Need.EXPERT_ROUTING
    form = Form.EXPERT_LAYERS

    def from_stats(self, stats) -> np.ndarray:
        """One score per expert from one domain's `ExpertStats`."""
        raise NotImplementedError

    def score_layer(self, layer, domains: list) -> np.ndarray:
        total = np.zeros(layer.num_experts)
        for stats in domains:
            s = np.asarray(self.from_stats(stats), dtype=np.float64)
            total += s / s.sum() if len(domains) > 1 and s.sum() > 0 else s
        return total

    def score(self, group, ctx):
        raise MissingStatistics(group, f"criterion '{self.name}' scores routed experts only (--target experts)")
