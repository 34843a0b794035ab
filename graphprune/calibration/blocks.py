"""Run a model's repeated blocks one at a time over the calibration set.

Layer-by-layer methods (least-squares compensation, structured OBS, sequential calibration) need the
inputs of one block at a time, not statistics of the whole model in one pass:

* the hidden states entering block 0 are captured once (only the embeddings run);
* the keyword arguments each block receives (rotary position embeddings, masks) are those block 0
  receives, captured with its input, when the model hands every block the same objects (Llama and
  most decoders; checked on a one-row forward); models with per-layer-type arguments (Gemma's
  sliding-window layers) get them recorded from one real forward per distinct batch shape. Either
  way blocks are called exactly as the model calls them;
* `run_block` runs one block on every batch, optionally with some linear layers *replaced* (a forward
  hook recomputes their output with new weights: the input model is never written to) and with the
  Gram matrix E[x̃ x̃ᵀ] of chosen layers' inputs accumulated, x̃ = (x, 1) so a bias can be refit.

Memory: the current block's inputs and outputs for the calibration set (128 × 128 tokens × 576 floats
= 38 MB each for SmolLM2) plus the Gram matrices of one block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .stats import InputStats
from ..models.structure import find_blocks
from ..errors import PruningError


@dataclass
class Call:
    """What a block is called with besides its hidden states."""

    args: tuple
    kwargs: dict


class StopForward(Exception):
    """Raised from a hook to end a forward pass once what is needed has been captured."""


@dataclass
class Gram:
    """Running E[x̃ x̃ᵀ] of a layer's input, x̃ = (x, 1): the last row/column are the mean of x and 1."""

    sum: torch.Tensor  # [d+1, d+1] float64
    count: int = 0

    @property
    def matrix(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    def input_stats(self) -> InputStats:
        """Per-channel sums (what the activation criteria read), recovered from the Gram matrix."""
        d = self.sum.shape[0] - 1
        return InputStats(self.count, self.sum[d, :d].clone(), torch.diagonal(self.sum)[:d].clone())


@dataclass
class Replacement:
    """New weights for a linear layer y = W x + b while the block runs (b may be None)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class BlockRun:
    grams: dict[str, Gram] = field(default_factory=dict)  # full module name -> Gram of its input
    outputs: list[torch.Tensor] | None = None


class BlockRunner:
    """Calibration batches pushed through a model one block at a time."""

    def __init__(self, model: torch.nn.Module, batches: torch.Tensor, *, batch_size: int = 8,
                 progress: bool = True) -> None:
        found = find_blocks(model)
        if found is None:
            raise PruningError(f"{type(model).__name__}: no repeated blocks found, so it cannot be processed "
                               f"layer by layer")
        self.model = model
        self.batches = batches  # token ids, for what needs the whole model (e.g. a loss gradient)
        self.prefix, self.blocks = found
        self.progress = progress
        self.modules = dict(model.named_modules())
        chunks = [batches[i:i + batch_size] for i in range(0, batches.shape[0], batch_size)]
        self.inputs: list[torch.Tensor] = []
        self._calls: list[list[Call] | Call] = []  # per batch: one call for all blocks, or one per block
        body = getattr(model, "base_model", None) or model
        self._call_kwargs = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
        per_shape: dict[tuple[int, ...], list[Call]] = {}
        with torch.no_grad():
            shared = self._blocks_share_kwargs(self._record_block_kwargs(body, chunks[0][:1]))
            for chunk in chunks:
                hidden, first_call = self._capture_first_input(body, chunk)
                self.inputs.append(hidden)
                if shared:
                    self._calls.append(first_call)
                else:
                    shape = tuple(chunk.shape)
                    if shape not in per_shape:
                        per_shape[shape] = self._record_block_kwargs(body, chunk)
                    self._calls.append(per_shape[shape])

    def __len__(self) -> int:
        return len(self.blocks)

    def block_name(self, index: int) -> str:
        return f"{self.prefix}.{index}"

    @staticmethod
    def _blocks_share_kwargs(recorded: list[Call]) -> bool:
        """True when every block got the very same argument objects as block 0."""
        def same(a, b) -> bool:
            if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
                return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
            return a is b or (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b)
        first = recorded[0]
        return all(same(r.args, first.args) and r.kwargs.keys() == first.kwargs.keys()
                   and all(same(r.kwargs[k], first.kwargs[k]) for k in first.kwargs) for r in recorded[1:])

    def _record_block_kwargs(self, body, chunk) -> list[Call]:
        """One real forward, keeping (by reference) the keyword arguments every block is called with."""
        recorded: list[Call | None] = [None] * len(self.blocks)
        handles = []
        for index, block in enumerate(self.blocks):
            def keep(module, args, kwargs, index=index):
                recorded[index] = Call(tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"})
                if index == len(self.blocks) - 1:
                    raise StopForward
            handles.append(block.register_forward_pre_hook(keep, with_kwargs=True))
        try:
            body(input_ids=chunk, **self._call_kwargs)
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        if any(r is None for r in recorded):
            raise PruningError("not every block ran during the forward pass; cannot process layer by layer")
        return recorded

    def _capture_first_input(self, body, chunk) -> tuple[torch.Tensor, Call]:
        captured = []

        def grab(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured.append((hidden.detach(), Call(tuple(args[1:]), kwargs)))
            raise StopForward

        handle = self.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            body(input_ids=chunk, **self._call_kwargs)
        except StopForward:
            pass
        finally:
            handle.remove()
        return captured[0]

    def run_block(self, index: int, inputs: list[torch.Tensor], *, gram_modules: tuple[str, ...] = (),
                  replacements: dict[str, Replacement] | None = None, keep_outputs: bool = True,
                  desc: str | None = None) -> BlockRun:
        """Run block `index` on `inputs` (one tensor per batch); see the module docstring."""
        block = self.blocks[index]
        result = BlockRun(outputs=[] if keep_outputs else None)
        handles = []
        for name in gram_modules:
            handles.append(self.modules[name].register_forward_pre_hook(self._gram_hook(name, result)))
        for name, rep in (replacements or {}).items():
            def replace(module, args, output, rep=rep):
                return torch.nn.functional.linear(args[0], rep.weight.to(args[0].dtype),
                                                  None if rep.bias is None else rep.bias.to(args[0].dtype))
            handles.append(self.modules[name].register_forward_hook(replace))
        try:
            with torch.no_grad():
                batches = zip(inputs, self._calls)
                for x, call in tqdm(batches, total=len(inputs), desc=desc, unit="batch", leave=False,
                                    disable=not (self.progress and desc)):
                    call = call if isinstance(call, Call) else call[index]
                    out = block(x, *call.args, **call.kwargs)
                    if isinstance(out, (tuple, list)):
                        out = out[0]
                    if keep_outputs:
                        result.outputs.append(out.detach())
        finally:
            for h in handles:
                h.remove()
        return result

    @staticmethod
    def _gram_hook(name: str, result: BlockRun):
        def hook(module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
            # One batch summed in float32 (≈1k tokens: exact enough), the running sum in float64.
            part = (x.T @ x).to(torch.float64)
            gram = result.grams.get(name)
            if gram is None:
                result.grams[name] = Gram(part, x.shape[0])
            else:
                gram.sum += part
                gram.count += x.shape[0]
        return hook
