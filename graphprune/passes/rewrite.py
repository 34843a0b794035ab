"""The PyTorch rewrite: compensation, slicing, config, rebuild and validation as one pass chain.

    CompensatedWeights | BiasCompensation   (what the consumer layers do about removed inputs)
    SliceParameters                          (every member slice of every chosen group loses its units)
    ConfigPass                               (sizes and bias flags the config must state)
    Rebuild                                  (a fresh model of the pruned shape adopts the tensors)
    Validate                                 (it runs on a few tokens: finite, right shape)

Unpruned tensors are shared with the input model, not copied: only pruned parameters cost memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import PruningError
from ..models.structure import find_blocks
from .base import Pass, PassError, PassManager, PassResult, RewriteState
from .bias import BiasCompensation
from .config import ConfigPass, instantiate
from .slice import SliceParameters
from .validate import Validate


class CompensatedWeights(Pass[RewriteState]):
    """Install the [W | b] the layerwise compensation computed for each consumer (removed columns
    are zero there; slicing drops them)."""

    name = "compensated-weights"

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights

    def call(self, rewrite: RewriteState) -> PassResult[RewriteState]:
        state = rewrite.tensors
        for module, w_aug in self.weights.items():
            dtype = state[f"{module}.weight"].dtype
            state[f"{module}.weight"] = w_aug[:, :-1].to(dtype).contiguous()
            if f"{module}.bias" not in state:
                rewrite.new_biases.append(module)
            state[f"{module}.bias"] = w_aug[:, -1].to(dtype).contiguous()
        rewrite.compensated_layers = len(self.weights)
        return PassResult(rewrite, bool(self.weights))


class Rebuild(Pass[RewriteState]):
    """A model of the rewritten config that adopts the sliced tensors (`assign=True`: the
    uninitialised tensors `instantiate` allocated are never touched, so building it costs almost no
    resident memory)."""

    name = "rebuild"

    def requires(self, rewrite: RewriteState) -> None:
        if rewrite.config_result is None:
            raise PassError("the rebuild needs the rewritten config")

    def call(self, rewrite: RewriteState) -> PassResult[RewriteState]:
        new_model = instantiate(rewrite.model_class, rewrite.config, device="cpu")
        tensors = rewrite.tensors
        for name, tensor in new_model.state_dict().items():
            if name not in tensors and name.endswith(".bias"):
                # a bias the new config flag added where none was compensated
                tensors[name] = torch.zeros_like(tensor, device="cpu")
        missing, unexpected = new_model.load_state_dict(tensors, strict=False, assign=True)
        persistent = set(new_model.state_dict())
        non_persistent = {n for n, _ in new_model.named_buffers() if n not in persistent}
        missing = [m for m in missing if m not in non_persistent]
        if missing or unexpected:
            raise PruningError(f"rebuilt model does not match the pruned weights (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
        if getattr(new_model.config, "tie_word_embeddings", False):
            new_model.tie_weights()
        rewrite.model = new_model.eval()
        return PassResult(rewrite, True)


def rewrite_model(model: torch.nn.Module, groups, chosen: list, removed: dict[str, np.ndarray], *,
                  statistics=None, release_input: bool = False, compensated: dict[str, torch.Tensor] | None = None,
                  before_rebuild: tuple[Pass, ...] = ()) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Apply the passes and return a freshly built, validated model of the pruned shape, with what
    the report says about the rewrite. `statistics` (activation statistics) asks for FLAP's bias
    compensation; `compensated` ([W | b] per consumer) installs layerwise compensation instead.
    With `release_input` the input model is consumed: each pruned parameter of it is emptied as soon
    as its slice exists. `before_rebuild` passes run on the sliced tensors before the model is built
    (a backend's own additions; tests inject faults there)."""
    release = None
    if release_input:
        owners = dict(model.named_parameters(remove_duplicate=False))
        owners.update(model.named_buffers())

        def release(name: str) -> None:  # the caller gave the input away: free each pruned tensor
            tensor = owners.get(name)
            if tensor is not None:
                tensor.data = torch.empty(0, dtype=tensor.dtype)

    blocks = find_blocks(model)
    # References, not copies: the passes replace entries with new tensors and never write into the
    # input's tensors, so only the pruned parameters cost new memory.
    state = RewriteState(tensors={k: v.detach() for k, v in model.state_dict().items()}, groups=chosen,
                         removed=removed, aliases=groups.graph.aliases, statistics=statistics, release=release,
                         config=model.config, model_class=type(model), n_layers=len(blocks[1]) if blocks else 0)
    passes: list[Pass] = []
    if compensated is not None:
        passes.append(CompensatedWeights(compensated))
    elif statistics is not None:
        passes.append(BiasCompensation())
    passes += [SliceParameters(), *before_rebuild, ConfigPass(), Rebuild(), Validate()]
    PassManager(passes)(state)
    extra: dict[str, Any] = {}
    if compensated is not None or statistics is not None:
        extra["compensated_layers"] = state.compensated_layers
    extra["uniform_layers"] = state.config_result.uniform
    extra["config_bias_flags"] = state.config_result.bias_keys
    return state.model, extra
