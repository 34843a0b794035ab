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
    captured: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # module -> its input per batch


class BlockRunner:
    """Calibration batches pushed through a model one block at a time."""

    holds_activations = True  # everything is in memory: a dense sweep may keep what it measures

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
        device = next(model.parameters()).device
        chunks = [batches[i:i + batch_size].to(device) for i in range(0, batches.shape[0], batch_size)]
        self.batches_by_batch = chunks
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

    def call(self, index: int, batch: int) -> Call:
        """What block `index` is called with (besides its hidden states) for batch `batch`."""
        call = self._calls[batch]
        return call if isinstance(call, Call) else call[index]

    def run_block(self, index: int, inputs: list[torch.Tensor], *, gram_modules: tuple[str, ...] = (),
                  replacements: dict[str, Replacement] | None = None, keep_outputs: bool = True,
                  stop_after: str | None = None, capture_inputs: tuple[str, ...] = (),
                  desc: str | None = None) -> BlockRun:
        """Run block `index` on `inputs` (one tensor per batch); see `run_block_batches`."""
        return run_block_batches(self.blocks[index], self.modules, inputs, lambda b: self.call(index, b),
                                 gram_modules=gram_modules, replacements=replacements, keep_outputs=keep_outputs,
                                 stop_after=stop_after, capture_inputs=capture_inputs, desc=desc,
                                 progress=self.progress)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer by every name (tied names too)."""
        out = dict(self.model.named_parameters(remove_duplicate=False))
        out.update(dict(self.model.named_buffers()))
        return out

    def head_gradient(self, batch: int, hidden: torch.Tensor, losses: list[float] | None = None
                      ) -> tuple[torch.Tensor, int]:
        """∂(Σ token LM loss)/∂(last block's output) for batch `batch`, and the tokens it predicts: the
        model's own forward runs with every block replaced by a stand-in returning `hidden` (so the
        final norm, the LM head and the loss are the model's). `losses` gets the batch's mean loss."""
        ids = self.batches_by_batch[batch]
        return head_gradient(self.model, self.blocks, ids, hidden, self._call_kwargs, losses=losses)

    def backward_block(self, index: int, inputs: list[torch.Tensor], grads: list[torch.Tensor],
                       modules: list[str], sums: dict[str, torch.Tensor], *, grad_params: tuple[str, ...] = (),
                       after_batch=None) -> list[torch.Tensor]:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        return backward_block_batches(self.blocks[index], self.modules, inputs, grads,
                                      lambda b: self.call(index, b), modules, sums,
                                      grad_params={n: params[n] for n in grad_params}, after_batch=after_batch)

    def output_fisher(self, modules: list[str], *, batches: int | None = None) -> dict[str, torch.Tensor]:
        return output_fisher_by_blocks(self, modules, batches=batches)

def gram_hook(name: str, result: BlockRun):
    """A forward pre-hook adding the module's input to `result.grams[name]` (E[x̃ x̃ᵀ], x̃ = (x, 1))."""
    def hook(module, args):
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        # One batch summed in float32 (≈1k tokens: exact enough), the running sum in float64.
        part = (x.T @ x).to(torch.float64).cpu()
        gram = result.grams.get(name)
        if gram is None:
            result.grams[name] = Gram(part, x.shape[0])
        else:
            gram.sum += part
            gram.count += x.shape[0]
    return hook


def run_block_batches(block: torch.nn.Module, modules: dict[str, torch.nn.Module], inputs: list[torch.Tensor],
                      call_of, *, gram_modules: tuple[str, ...] = (), replacements: dict[str, Replacement] | None = None,
                      keep_outputs: bool = True, stop_after: str | None = None, capture_inputs: tuple[str, ...] = (),
                      desc: str | None = None, progress: bool = False) -> BlockRun:
    """Run `block` on every batch of `inputs` (`call_of(b)` gives batch b's other arguments), with the
    Gram matrices of `gram_modules` accumulated and `replacements` standing in for linear layers (a
    forward hook recomputes their output with the new weights: the model is never written to).
    `stop_after` ends each batch's forward once that module's input is seen (what comes after is not
    needed); `capture_inputs` keeps those modules' inputs per batch (`BlockRun.captured`)."""
    result = BlockRun(outputs=[] if keep_outputs else None)
    handles = []
    for name in gram_modules:
        handles.append(modules[name].register_forward_pre_hook(gram_hook(name, result)))
    for name in capture_inputs:
        def capture(module, args, name=name):
            result.captured.setdefault(name, []).append(args[0].detach())
        handles.append(modules[name].register_forward_pre_hook(capture))
    if stop_after is not None:
        def stop(module, args):
            raise StopForward
        handles.append(modules[stop_after].register_forward_pre_hook(stop))
    for name, rep in (replacements or {}).items():
        def replace(module, args, output, rep=rep):
            x = args[0]
            return torch.nn.functional.linear(x, rep.weight.to(x.device, x.dtype),
                                              None if rep.bias is None else rep.bias.to(x.device, x.dtype))
        handles.append(modules[name].register_forward_hook(replace))
    try:
        with torch.no_grad():
            for b, x in tqdm(list(enumerate(inputs)), desc=desc, unit="batch", leave=False,
                             disable=not (progress and desc)):
                call = call_of(b)
                try:
                    out = block(x, *call.args, **call.kwargs)
                except StopForward:
                    continue
                if isinstance(out, (tuple, list)):
                    out = out[0]
                if keep_outputs:
                    result.outputs.append(out.detach())
    finally:
        for h in handles:
            h.remove()
    return result


class _StandIn(torch.nn.Module):
    """Takes a block's place while a model's own forward replays: returns the prepared output (or
    its input), so the model's code computes what comes after the blocks (final norm, LM head, loss)
    from given block outputs. Attribute reads fall through to the real block."""

    def __init__(self, block: torch.nn.Module, output: torch.Tensor | None) -> None:
        super().__init__()
        self.__dict__.update(_block=block, _output=output)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        return hidden if self._output is None else self._output


def head_gradient(model: torch.nn.Module, blocks: torch.nn.ModuleList, input_ids: torch.Tensor,
                  hidden: torch.Tensor, call_kwargs: dict, *, losses: list[float] | None = None
                  ) -> tuple[torch.Tensor, int]:
    """∂(Σ token LM loss)/∂hidden where `hidden` is the last block's output for `input_ids`, and the
    number of predicted tokens. The summed - not mean - loss, so batches of any size weigh each
    token the same. `losses`, when given, gets the batch's mean loss appended."""
    last = hidden.detach().requires_grad_(True)
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _StandIn(block, last if i == len(originals) - 1 else None)
    try:
        with torch.enable_grad():
            out = model(input_ids=input_ids, labels=input_ids, **call_kwargs)
            predicted = input_ids.shape[0] * (input_ids.shape[1] - 1)
            (out.loss * predicted).backward()
            if losses is not None:
                losses.append(float(out.loss.detach()))
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return last.grad.detach(), input_ids.numel()


def backward_block_batches(block: torch.nn.Module, modules: dict[str, torch.nn.Module], inputs: list[torch.Tensor],
                           grads: list[torch.Tensor], call_of, fisher_modules: list[str],
                           sums: dict[str, torch.Tensor], *, grad_params: dict[str, torch.nn.Parameter] | None = None,
                           after_batch=None) -> list[torch.Tensor]:
    """Backpropagate `grads` (∂loss/∂block output, per batch) through `block` recomputed from its
    `inputs`; adds (∂loss/∂y)² of each output y of `fisher_modules` to `sums`; returns ∂loss/∂input.
    `grad_params` (name -> parameter of this block) get gradients: after each batch's backward
    `after_batch(b, grad_params)` reads them, and they are cleared before the next batch."""
    grad_params = grad_params or {}
    for p in grad_params.values():
        p.requires_grad_(True)
    handles = []
    for name in fisher_modules:
        def keep(module, args, out, name=name):
            def accumulate(grad):
                sums[name].add_((grad.detach().double() ** 2).reshape(-1, grad.shape[-1]).sum(0).cpu())
            out.register_hook(accumulate)
        handles.append(modules[name].register_forward_hook(keep))
    upstream = []
    try:
        with torch.enable_grad():
            for b, (x, g) in enumerate(zip(inputs, grads)):
                x = x.detach().requires_grad_(True)
                call = call_of(b)
                out = block(x, *call.args, **call.kwargs)
                if isinstance(out, (tuple, list)):
                    out = out[0]
                torch.autograd.backward(out, g)
                upstream.append(x.grad.detach())
                if after_batch is not None:
                    after_batch(b, grad_params)
                for p in grad_params.values():
                    p.grad = None
    finally:
        for h in handles:
            h.remove()
        for p in grad_params.values():
            p.requires_grad_(False)
    return upstream


class ActivationStack(list):
    """Each block's inputs between the forward and the backward sweep, in memory (the streaming
    backend spills them to disk instead)."""

    def push(self, tensors: list[torch.Tensor]) -> None:
        self.append(tensors)


@dataclass
class DenseSweep:
    """What a forward over the dense blocks measured on the way (see `output_fisher_by_blocks`)."""

    grams: dict[int, dict[str, Gram]] = field(default_factory=dict)  # block -> module -> Gram of its input
    residual: dict[int, float] = field(default_factory=dict)  # block -> mean squared norm of its input


def output_fisher_by_blocks(source, modules: list[str], *, batches: int | None = None,
                            gram_modules: dict[int, tuple[str, ...]] | None = None,
                            sweep: DenseSweep | None = None) -> dict[str, torch.Tensor]:
    """E_t[(∂ℓ_t/∂y_o)²] for every output o of each module in `modules` (the diagonal Fisher of the
    token LM loss with respect to the layer's output), block by block: a forward over the blocks
    keeping each block's inputs, the loss on the model's head, then a backward one block at a time
    (each recomputed from its stored inputs). `source` is a block source (`BlockRunner`, or the
    streaming backend's); `batches` limits it to the first calibration batches. Parameters never
    get gradients. With `gram_modules` (block -> modules) the forward runs every calibration batch and
    fills `sweep` with those modules' input Gram matrices and each block's input energy: one dense
    forward serves both the Fisher and what structured OBS needs."""
    count = len(source.inputs) if batches is None else min(batches, len(source.inputs))
    by_block: dict[int, list[str]] = {}
    for name in modules:
        for index in range(len(source)):
            if name.startswith(source.block_name(index) + "."):
                by_block.setdefault(index, []).append(name)
                break
    sums = {m: torch.zeros(source.modules[m].out_features, dtype=torch.float64) for m in modules}
    requires = {p: p.requires_grad for p in source.model.parameters()}
    for p in requires:
        p.requires_grad_(False)
    store = source.activation_store() if hasattr(source, "activation_store") else ActivationStack()
    try:
        hidden = list(source.inputs if gram_modules is not None else source.inputs[:count])
        for index in range(len(source)):
            store.push(hidden[:count])
            wanted = tuple(gram_modules.get(index, ())) if gram_modules is not None else ()
            run = source.run_block(index, hidden, gram_modules=wanted, desc=f"dense forward {index}")
            if gram_modules is not None:
                sweep.grams[index] = run.grams
                sweep.residual[index] = float(sum((x.double() ** 2).sum() for x in hidden) /
                                              sum(x[..., 0].numel() for x in hidden))
            hidden = run.outputs
        hidden = hidden[:count]
        tokens = 0
        grads = []
        for b, last in enumerate(hidden):
            g, n = source.head_gradient(b, last)
            grads.append(g)
            tokens += n
        for index in reversed(range(len(source))):
            grads = source.backward_block(index, store.pop(), grads, by_block.get(index, []), sums)
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
    return {m: s / max(tokens, 1) for m, s in sums.items()}
