"""The pass contract: a small object with one job, its preconditions and its guarantees.

    class MyPass(Pass):
        def check(self, plan):      # static preconditions, before any calibration runs
        def requires(self, state):  # preconditions on the state it is handed
        def call(self, state) -> PassResult
        def ensures(self, state):   # what it guarantees afterwards

`Pass.__call__` runs requires -> call -> ensures; `PassManager` chains passes over one state and
reports which changed it. The state is whatever the backend rewrites: `RewriteState` for PyTorch
state dicts (in memory, or one layer at a time when streaming); the ONNX backend hands its passes
the ModelProto's rewrite state. A pass never reads global state: what it needs is on the state or
given to its constructor, so its test can build both by hand (see passes/*_test-style tests in
tests/passes/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

State = TypeVar("State")


@dataclass
class PassResult(Generic[State]):
    state: State
    modified: bool


class PassError(AssertionError):
    """A pass's own precondition or guarantee failed: a bug in the pipeline, not a user error."""


class Pass(Generic[State]):
    """See the module docstring. `name` identifies the pass in reports."""

    name: str = ""

    def check(self, plan: Any) -> None:
        """Refuse (UserError) a plan this pass cannot carry out, before any expensive work."""

    def requires(self, state: State) -> None:
        """Raise PassError if `state` does not meet this pass's preconditions."""

    def call(self, state: State) -> PassResult[State]:
        raise NotImplementedError

    def ensures(self, state: State) -> None:
        """Raise PassError if this pass's guarantees do not hold on `state`."""

    def __call__(self, state: State) -> PassResult[State]:
        self.requires(state)
        result = self.call(state)
        self.ensures(result.state)
        return result


class PassManager(Generic[State]):
    """Runs passes in order over one state; `modified` lists the passes that changed it."""

    def __init__(self, passes: list[Pass[State]]) -> None:
        self.passes = list(passes)
        self.modified: list[str] = []

    def check(self, plan: Any) -> None:
        for p in self.passes:
            p.check(plan)

    def __call__(self, state: State) -> PassResult[State]:
        changed = False
        for p in self.passes:
            result = p(state)
            state = result.state
            if result.modified:
                self.modified.append(p.name or type(p).__name__)
                changed = True
        return PassResult(state, changed)


@dataclass
class Plan:
    """What `Pass.check` sees before any calibration runs: the model (or None where the backend holds
    none in memory), the groups to prune and the stage (criterion, compensation, --sequential)."""

    model: Any
    chosen: list
    stage: Any


@dataclass
class RewriteState:
    """What the PyTorch rewrite passes share: tensors by name (one model or one layer of it), the
    groups being pruned and which of their units go, and what the passes found out on the way."""

    tensors: dict[str, Any]  # parameter/buffer name -> torch.Tensor
    groups: list  # the chosen Group objects
    removed: dict[str, np.ndarray]  # group id -> removed units (original numbering)
    aliases: dict[str, list[str]] = field(default_factory=dict)  # tied parameter names
    statistics: Any = None  # calibration.stats.Calibration, for compensation
    new_biases: list[str] = field(default_factory=list)  # modules that got a bias they did not have
    compensated_layers: int = 0
    kept: dict = field(default_factory=dict)  # (param, axis) -> kept indices, after slicing
    release: Any = None  # callable(name): the caller's original tensor may be freed
    # the whole-model rewrite (config rewrite, rebuild, validation)
    config: Any = None
    model_class: Any = None
    n_layers: int = 0
    config_result: Any = None  # passes.config.ConfigResult
    model: Any = None  # the rebuilt model of the pruned shape
