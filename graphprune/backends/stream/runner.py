"""Running a meta-device model one layer at a time.

`Shell` materializes what surrounds the layers (embedding, rotary tables, final norm, and the LM
head when asked) and runs the model's own forward with every layer replaced by a `_StandIn` that
records what the layer is called with: the hidden states entering layer 0 and, per layer, the other
arguments (rotary cos/sin, masks: the same objects the real forward would pass, so per-layer-type
models such as Gemma's sliding-window layers get theirs). A stand-in returns its input unchanged,
or a prepared output (`replay`), so the model's own code also computes the final norm and logits
from given layer outputs.

`load_layer` gives one layer real weights on the device (assigned, not copied), `release_layer`
returns it to the meta device, and `run_layer` pushes the calibration batches through it with the
same input-statistics hooks the in-memory calibration uses.
"""

from __future__ import annotations

import torch

from ...calibration.stats import InputStats, block_angle, input_stats_hook
from ...calibration.blocks import Call, StopForward


class _StandIn(torch.nn.Module):
    """Takes a layer's place during a shell forward: records the call, returns the input (or the
    prepared output); attribute reads fall through to the real layer (e.g. its attention type)."""

    def __init__(self, layer: torch.nn.Module, index: int, recorded: dict, stop: bool,
                 output: torch.Tensor | None = None) -> None:
        super().__init__()
        self.__dict__.update(_layer=layer, _index=index, _recorded=recorded, _stop=stop, _output=output)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)

    def forward(self, *args, **kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self._recorded[self._index] = (hidden, Call(tuple(args[1:]), kwargs))
        if self._stop:
            raise StopForward
        return hidden if self._output is None else self._output


# glibc's malloc: mallopt(M_MMAP_THRESHOLD) and malloc_trim. By default the threshold above which
# an allocation gets its own mmap grows (up to 32 MiB) as large blocks are freed, so a layer's
# tensors end up in the heap, whose freed pages are reused unevenly and rarely returned: the
# resident set then grew by ~20 MB per layer on a 0.5B model with nothing alive. A fixed threshold
# unmaps every larger tensor when it is freed, at the price of fresh page faults each time it is
# allocated again: at 1 MiB that slowed SmolLM2-135M's statistics sweep from ~40 s to ~70 s (its
# activations are 2-13 MB), while 16 MiB costs 14 MB of peak RSS on a 1.5B model against 1 MiB
# (890 vs 876 MB; 960 MB with no fixed threshold, malloc_trim alone).
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 16 << 20


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_heap_small() -> None:
    """Large tensors go straight back to the OS when freed (glibc only; elsewhere a no-op). This sets
    a process-wide malloc option."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (after each layer; glibc only)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def materialize(model: torch.nn.Module, module_names: list[str], tensors: dict[str, torch.Tensor],
                device: torch.device) -> None:
    """Give the named modules (their own parameters and buffers, not their children's) real tensors:
    persistent ones from `tensors` (full names, assigned as they are), non-persistent buffers
    (rotary tables, embedding scales) recomputed by the model's own initialisation, as
    transformers does after loading on the meta device."""
    modules = dict(model.named_modules())
    for name in module_names:
        module = modules[name]
        prefix = f"{name}." if name else ""
        rebuilt = [b for b in module._buffers if b in module._non_persistent_buffers_set
                   and module._buffers[b] is not None]
        for b in rebuilt:
            module._buffers[b] = torch.empty_like(module._buffers[b], device=device)
        if rebuilt and hasattr(model, "_init_weights"):
            model._init_weights(module)
        for p, param in list(module._parameters.items()):
            if param is not None and prefix + p in tensors:
                module._parameters[p] = torch.nn.Parameter(tensors[prefix + p], requires_grad=False)
        for b in list(module._buffers):
            if prefix + b in tensors:
                module._buffers[b] = tensors[prefix + b]


def release(module: torch.nn.Module) -> None:
    """Back to the meta device: the real tensors are freed once nothing else holds them."""
    for handle in module.__dict__.pop("_graphprune_cast_hooks", []):
        handle.remove()
    module.to_empty(device="meta", recurse=True)


def _cast_while_running(block: torch.nn.Module, dtype: torch.dtype) -> None:
    """Keep the layer's weights as stored and give each module its weights in `dtype` only while it
    runs: the same arithmetic as converting the whole layer, with one module converted at a time
    (a 7B layer is 0.4 GB in bf16, 0.8 GB in fp32)."""
    handles = []
    for module in block.modules():
        own = [n for n, p in module._parameters.items() if p is not None and p.is_floating_point()
               and p.dtype != dtype]
        if not own:
            continue

        def convert(mod, args, names=tuple(own)):
            mod.__dict__["_graphprune_stored"] = {n: mod._parameters[n] for n in names}
            for n in names:
                mod._parameters[n] = torch.nn.Parameter(mod._parameters[n].to(dtype), requires_grad=False)

        def restore(mod, args, output):
            mod._parameters.update(mod.__dict__.pop("_graphprune_stored", {}))

        handles.append(module.register_forward_pre_hook(convert))
        handles.append(module.register_forward_hook(restore, always_call=True))
    block.__dict__["_graphprune_cast_hooks"] = handles


class Shell:
    """The model around its layers, for computing layer inputs and (with `head`) logits."""

    def __init__(self, model: torch.nn.Module, prefix: str, blocks: torch.nn.ModuleList, read, *, device,
                 dtype: torch.dtype, head: bool = False) -> None:
        """`read(names)` returns checkpoint tensors by name (converted to `dtype` on `device`)."""
        self.model, self.blocks = model, blocks
        self.body = getattr(model, "base_model", None) or model
        body_name = next(n for n, m in model.named_modules() if m is self.body)
        inside = f"{prefix}."
        names = [n for n, _ in model.named_modules()
                 if not (n == prefix or n.startswith(inside))
                 and (head or n == body_name or n.startswith(f"{body_name}.") or not body_name)]
        state = model.state_dict()
        wanted = [k for k in state if not k.startswith(inside) and any(_owner(k) == n for n in names)]
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        self.tensors = read([k for k in wanted if k not in tied])
        materialize(model, names, self.tensors, device)
        if head:
            from .architecture import tie

            tie(model)
        self.names = names
        self.call_kwargs = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}

    def capture(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[Call]]:
        """The hidden states entering layer 0 and the call of every layer, for one batch."""
        recorded: dict[int, tuple] = {}
        self._forward(self.body, input_ids, recorded, stop_at_last=True)
        return recorded[0][0], [recorded[i][1] for i in range(len(self.blocks))]

    def logits(self, input_ids: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The model's logits when layer i returns outputs[i] (the layers themselves do not run)."""
        out = self._forward(self.model, input_ids, {}, outputs=outputs)
        return out.logits

    def _forward(self, module, input_ids, recorded, *, stop_at_last: bool = False, outputs=None):
        layers = list(self.blocks)
        last = len(layers) - 1
        for i, layer in enumerate(layers):
            self.blocks[i] = _StandIn(layer, i, recorded, stop_at_last and i == last,
                                      None if outputs is None else outputs[i])
        try:
            with torch.no_grad():
                return module(input_ids=input_ids, **self.call_kwargs)
        except StopForward:
            return None
        finally:
            for i, layer in enumerate(layers):
                self.blocks[i] = layer

    def close(self) -> None:
        """Free the materialized tensors (the modules go back to the meta device)."""
        from .architecture import tie

        modules = dict(self.model.named_modules())
        for name in self.names:
            modules[name].to_empty(device="meta", recurse=False)
        tie(self.model)
        self.tensors = {}


def _owner(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def load_layer(model: torch.nn.Module, block: torch.nn.Module, block_name: str, weights: dict[str, torch.Tensor],
               *, device, dtype: torch.dtype) -> None:
    """Assign layer weights (full names) to `block` on `device`; it computes in `dtype` (weights in
    another dtype are converted module by module while it runs, see `_cast_while_running`)."""
    prefix = f"{block_name}."
    local = {k[len(prefix):]: v.to(device=device) for k, v in weights.items()}
    buffers = [n for n, m in block.named_modules() if any(b in m._non_persistent_buffers_set for b in m._buffers)]
    if buffers:
        materialize(model, [f"{block_name}.{n}" if n else block_name for n in buffers], {}, device)
    block.load_state_dict(local, strict=True, assign=True)
    if any(v.is_floating_point() and v.dtype != dtype for v in local.values()):
        _cast_while_running(block, dtype)


def run_layer(block: torch.nn.Module, block_name: str, inputs: list[torch.Tensor], calls: list[list[Call]],
              index: int, *, stat_modules: list[str] = (), angles: bool = False,
              keep_outputs: bool = True) -> tuple[list[torch.Tensor], dict[str, InputStats], float]:
    """Run layer `index` on every batch; (outputs, input statistics of `stat_modules`, Σ block angle)."""
    stats: dict[str, InputStats] = {}
    modules = {f"{block_name}.{n}" if n else block_name: m for n, m in block.named_modules()}
    handles = [modules[name].register_forward_pre_hook(input_stats_hook(stats, name)) for name in stat_modules]
    outputs: list[torch.Tensor] = []
    angle = 0.0
    try:
        with torch.no_grad():
            for x, call in zip(inputs, calls):
                y = block(x, *call[index].args, **call[index].kwargs)
                if isinstance(y, (tuple, list)):
                    y = y[0]
                if angles:
                    angle += block_angle(x, y)
                if keep_outputs:
                    outputs.append(y.detach())
    finally:
        for h in handles:
            h.remove()
    cpu = {name: InputStats(st.count, st.sum.cpu(), st.sumsq.cpu()) for name, st in stats.items()}
    return outputs, cpu, angle
