"""The streaming backend's block source: the calibration batches pushed through a checkpoint's layers
one at a time, each layer's weights read from disk only while it runs.

It offers what `calibration.blocks.BlockRunner` offers for an in-memory model (`inputs`, `run_block`
with Gram matrices and replaced linear layers, `params`, `head_gradient`, `backward_block`,
`output_fisher`), so the layerwise passes (least squares, --sequential) and the block-scored criteria
(structured OBS with the loss-Fisher ranking) run on either without knowing which. What the
layer-by-layer backward keeps between its forward and backward sweeps (each layer's inputs) is
spilled to the work directory, so memory stays one layer plus one layer's activations.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...calibration.blocks import (BlockRun, Replacement, backward_block_batches, head_gradient,
                                   output_fisher_by_blocks, run_block_batches)
from .runner import Shell, load_layer, release, return_freed_memory


class CheckpointTensors(Mapping):
    """Checkpoint tensors by name, read when asked for and never kept (what the least-squares and OBS
    code reads as `params`)."""

    def __init__(self, checkpoint, names) -> None:
        self.checkpoint, self.names = checkpoint, list(names)
        self._known = set(self.names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return self.checkpoint.read([name])[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class SpilledActivations:
    """Per-layer activation lists kept on disk in the work directory (push / pop, last in first out)."""

    def __init__(self, work, device) -> None:
        self.work, self.device, self.depth = work, device, 0

    def push(self, tensors: list[torch.Tensor]) -> None:
        self.work.save_activations(self.depth, tensors)
        self.depth += 1

    def pop(self) -> list[torch.Tensor]:
        self.depth -= 1
        tensors = self.work.load_activations(self.depth, self.device)
        self.work.drop_activations(self.depth)
        return tensors


class StreamBlocks:
    """See the module docstring."""

    def __init__(self, arch, checkpoint, windows: torch.Tensor | list[torch.Tensor], *, batch_size: int, device,
                 dtype, work, progress: bool = False) -> None:
        """`windows` [n, seqlen] is cut into batches of `batch_size`; a list is taken as the batches."""
        self.arch, self.checkpoint, self.work = arch, checkpoint, work
        self.model = arch.skeleton
        self.blocks = arch.blocks
        self.prefix = arch.prefix
        self.device, self.dtype, self.progress = device, dtype, progress
        self.modules = dict(self.model.named_modules())
        self.batches_by_batch = list(windows) if isinstance(windows, (list, tuple)) else list(windows.split(batch_size))
        shell = Shell(self.model, self.prefix, self.blocks, self._read, device=device, dtype=dtype)
        self.inputs: list[torch.Tensor] = []
        self._calls: list = []
        try:
            for chunk in self.batches_by_batch:
                hidden, call = shell.capture(chunk.to(device))
                self.inputs.append(hidden)
                self._calls.append(call)
        finally:
            shell.close()
        self.call_kwargs = shell.call_kwargs
        self.params = CheckpointTensors(checkpoint, list(checkpoint.tensors))
        self._head: Shell | None = None

    def _read(self, names):
        return self.checkpoint.read(names, dtype=self.dtype, device=self.device)

    def __len__(self) -> int:
        return self.arch.n_layers

    def block_name(self, index: int) -> str:
        return f"{self.prefix}.{index}"

    def call(self, index: int, batch: int):
        return self._calls[batch][index]

    def _loaded(self, index: int, *, converted: bool = False):
        """Block `index` with its weights: as stored (each module converted to the compute dtype only
        while it runs), or with `converted` in the compute dtype throughout (parameters that take
        gradients must be the tensors the block computes with)."""
        block = self.blocks[index]
        weights = self.checkpoint.read(self.arch.layer_names(index), device=self.device,
                                       **({"dtype": self.dtype} if converted else {}))
        load_layer(self.model, block, self.block_name(index), weights, device=self.device, dtype=self.dtype)
        return block

    def run_block(self, index: int, inputs: list[torch.Tensor], *, gram_modules: tuple[str, ...] = (),
                  replacements: dict[str, Replacement] | None = None, keep_outputs: bool = True,
                  stop_after: str | None = None, capture_inputs: tuple[str, ...] = (),
                  desc: str | None = None) -> BlockRun:
        block = self._loaded(index)
        try:
            return run_block_batches(block, self.modules, inputs, lambda b: self.call(index, b),
                                     gram_modules=gram_modules, replacements=replacements,
                                     keep_outputs=keep_outputs, stop_after=stop_after, capture_inputs=capture_inputs,
                                     desc=desc, progress=self.progress)
        finally:
            release(block)
            return_freed_memory()

    def head_gradient(self, batch: int, hidden: torch.Tensor, losses: list[float] | None = None
                      ) -> tuple[torch.Tensor, int]:
        if self._head is None:
            self._head = Shell(self.model, self.prefix, self.blocks, self._read, device=self.device,
                               dtype=self.dtype, head=True)
        return head_gradient(self.model, self.blocks, self.batches_by_batch[batch].to(self.device),
                             hidden.to(self.dtype), self.call_kwargs, losses=losses)

    def backward_block(self, index: int, inputs: list[torch.Tensor], grads: list[torch.Tensor],
                       modules: list[str], sums: dict[str, torch.Tensor], *, grad_params: tuple[str, ...] = (),
                       after_batch=None) -> list[torch.Tensor]:
        if self._head is not None:  # the backward sweep no longer needs the head
            self._head.close()
            self._head = None
        block = self._loaded(index, converted=bool(grad_params))
        try:
            prefix = self.block_name(index) + "."
            params = {prefix + n: p for n, p in block.named_parameters(remove_duplicate=False)}
            return backward_block_batches(block, self.modules, inputs, grads, lambda b: self.call(index, b),
                                          modules, sums, grad_params={n: params[n] for n in grad_params},
                                          after_batch=after_batch)
        finally:
            release(block)
            return_freed_memory()

    def activation_store(self) -> SpilledActivations:
        return SpilledActivations(self.work, self.device)

    def output_fisher(self, modules: list[str], *, batches: int | None = None) -> dict[str, torch.Tensor]:
        return output_fisher_by_blocks(self, modules, batches=batches)
