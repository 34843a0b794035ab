"""Calibration statistics collected with forward hooks, batch by batch.

Only running sums are kept (per input channel of the consumer layers a criterion asks for, and the
per-block angle CFSP needs), so the activations of the whole model are never held at once: the
memory cost is one batch of activations plus O(channels) accumulators.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..models.structure import find_blocks
from ..progress import in_stage


@dataclass
class InputStats:
    """Per input-channel statistics of a layer's input over all calibration tokens (float64)."""

    count: int
    sum: torch.Tensor
    sumsq: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        # Unbiased sample variance, as FLAP's fluctuation metric uses.
        n = max(self.count, 2)
        return (self.sumsq - self.sum * self.sum / max(self.count, 1)).clamp_min(0) / (n - 1)

    @property
    def sq_norm(self) -> torch.Tensor:
        """‖X_j‖² over calibration tokens."""
        return self.sumsq


@dataclass
class Calibration:
    inputs: dict[str, InputStats] = field(default_factory=dict)  # module name -> stats of its input
    block_angle: dict[int, float] = field(default_factory=dict)  # decoder block -> Σ_t arccos(cos)/π
    tokens: int = 0

    def cpu(self) -> "Calibration":
        """The statistics on the CPU (they were accumulated on the model's device)."""
        for name, st in self.inputs.items():
            self.inputs[name] = InputStats(st.count, st.sum.cpu(), st.sumsq.cpu())
        return self


def input_stats_hook(stats: dict[str, InputStats], name: str):
    """A forward pre-hook adding the module's input to `stats[name]` (float64 running sums on the
    input's device; the streaming pipeline moves them to the CPU after each layer)."""

    def hook(module, args, kwargs=None):
        x = args[0] if args else next(iter(kwargs.values()))
        if isinstance(module, torch.nn.modules.conv._ConvNd):  # [N, C, *spatial]: per channel, every position
            x = x.movedim(1, -1)
        # A float64 copy (never the input itself: the module still reads it), squared in place.
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64, copy=True)
        st = stats.get(name)
        if st is None:
            dim = x.shape[-1]
            st = InputStats(0, torch.zeros(dim, dtype=torch.float64, device=x.device),
                            torch.zeros(dim, dtype=torch.float64, device=x.device))
            stats[name] = st
        st.count += x.shape[0]
        st.sum += x.sum(0)
        st.sumsq += x.square_().sum(0)
    return hook


def block_angle(x: torch.Tensor, y: torch.Tensor) -> float:
    """CFSP's block importance term: Σ_t arccos(cos(x_t, y_t)) / π over the tokens of one batch."""
    cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
    # cos can exceed 1 by rounding: clamp before arccos (CFSP's NaN trap).
    return float((torch.arccos(cos.clamp(-1.0, 1.0)) / torch.pi).sum())


@in_stage("calibrate")
def collect(model: torch.nn.Module, batches: torch.Tensor, *, input_modules: list[str] = (),
            block_angles: bool = False, batch_size: int = 8,
            progress: bool = True, add_kwargs: dict | None = None, extra_hooks=()) -> Calibration:
    """Run `batches` ([n, seqlen] token ids) through `model`, accumulating statistics.
    `extra_hooks`: callables `install(result) -> hook handle` for statistics no module input holds
    (the inputs of one expert inside stacked weights, `graphprune.moe.channels`)."""
    result = Calibration()
    modules = dict(model.named_modules())
    handles = []
    for name in dict.fromkeys(input_modules):
        handles.append(modules[name].register_forward_pre_hook(input_stats_hook(result.inputs, name)))
    handles += [install(result) for install in extra_hooks]

    if block_angles:
        blocks = find_blocks(model)
        if blocks is not None:
            for index, block in enumerate(blocks[1]):
                def angle_hook(module, args, kwargs, output, index=index):
                    x = args[0] if args else kwargs.get("hidden_states")
                    y = output[0] if isinstance(output, (tuple, list)) else output
                    result.block_angle[index] = result.block_angle.get(index, 0.0) + block_angle(x, y)
                handles.append(block.register_forward_hook(angle_hook, with_kwargs=True))
    # Statistics live in the layers: run the base model and skip the LM head (a 49k-wide matmul
    # per token for SmolLM2, a fifth of the forward cost).
    body = getattr(model, "base_model", None) or model
    kwargs = dict(add_kwargs or {})
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs.setdefault("use_cache", False)
    try:
        with torch.no_grad():
            steps = range(0, batches.shape[0], batch_size)
            device = next(model.parameters()).device
            for start in tqdm(steps, desc="calibration", unit="batch", disable=not progress, leave=False):
                chunk = batches[start:start + batch_size].to(device)
                body(input_ids=chunk, **kwargs)
                result.tokens += chunk.numel()
    finally:
        for h in handles:
            h.remove()
    return result


@in_stage("calibrate")
def collect_module_inputs(model: torch.nn.Module, batches: list[tuple], *, input_modules: list[str] = (),
                          progress: bool = True) -> Calibration:
    """`collect` for a plain nn.Module: run it on each batch of positional inputs (no tokens, no LM head
    to skip); `tokens` counts the samples."""
    from ..errors import CalibrationError

    result = Calibration()
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_pre_hook(input_stats_hook(result.inputs, name))
               for name in dict.fromkeys(input_modules)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for index, batch in enumerate(tqdm(batches, desc="calibration", unit="batch", disable=not progress,
                                               leave=False)):
                try:
                    model(*(t.to(device) for t in batch))
                except Exception as error:  # noqa: BLE001 - the user's data does not fit the module
                    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                    raise CalibrationError(f"calibration batch {index} (shapes {[list(t.shape) for t in batch]}) "
                                           f"does not run through {type(model).__name__}: {first}") from error
                result.tokens += int(batch[0].shape[0]) if batch[0].dim() else 1
    finally:
        for h in handles:
            h.remove()
    return result
