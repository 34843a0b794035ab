"""Calibration statistics collected with forward hooks, batch by batch.

Only running sums are kept (per input channel of the consumer layers a criterion asks for, and the
per-block angle CFSP needs), so the activations of the whole model are never held at once: the
memory cost is one batch of activations plus O(channels) accumulators.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import GraphpruneWarning


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


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """The ModuleList holding the repeated blocks (decoder/encoder layers), by structure."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if n_layers is not None and len(module) != n_layers:
                continue
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best


def input_stats_hook(stats: dict[str, InputStats], name: str):
    """A forward pre-hook adding the module's input to `stats[name]` (float64 running sums on the
    input's device; the streaming pipeline moves them to the CPU after each layer)."""

    def hook(module, args, kwargs=None):
        x = args[0] if args else next(iter(kwargs.values()))
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
            for start in tqdm(steps, desc="calibration", unit="batch", disable=not progress, leave=False):
                chunk = batches[start:start + batch_size]
                body(input_ids=chunk, **kwargs)
                result.tokens += chunk.numel()
    finally:
        for h in handles:
            h.remove()
    return result


def cache_key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    if os.environ.get("GRAPHPRUNE_CALIB_CACHE"):
        return Path(os.environ["GRAPHPRUNE_CALIB_CACHE"])
    return Path(os.environ.get("GRAPHPRUNE_CACHE", Path.home() / ".cache" / "graphprune")) / "calibration"


def save_cached(key: str, calib: Calibration) -> None:
    """Keep statistics so re-pruning at another sparsity skips calibration (safetensors, no pickle)."""
    tensors = {}
    for name, st in calib.inputs.items():
        tensors[f"in/{name}/sum"] = st.sum
        tensors[f"in/{name}/sumsq"] = st.sumsq
        tensors[f"in/{name}/count"] = torch.tensor([st.count], dtype=torch.int64)
    for index, angle in calib.block_angle.items():
        tensors[f"angle/{index}"] = torch.tensor([angle], dtype=torch.float64)
    tensors["tokens"] = torch.tensor([calib.tokens], dtype=torch.int64)
    write_cache_tensors(key, tensors)


def write_cache_tensors(key: str, tensors: dict[str, torch.Tensor]) -> None:
    """Store named tensors under `key` as safetensors (no pickle); see `write_cache_entry`."""
    from safetensors.torch import save_file

    write_cache_entry(f"{key}.safetensors", lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()},
                                                                   str(tmp)))


def write_cache_entry(name: str, write) -> None:
    """`write(tmp_path)` then rename into `cache_dir()/name`; a cache that cannot be written warns once
    and never fails the run (nor leaves a partial entry)."""
    directory = cache_dir()
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, directory / name)
    except Exception as error:  # noqa: BLE001 - a cache that cannot be written must not fail the run
        with contextlib.suppress(OSError):
            tmp.unlink()
        warnings.warn(f"calibration statistics not cached in {directory}: {str(error).splitlines()[0]}",
                      GraphpruneWarning, stacklevel=3)


def read_cache_entry(key: str) -> dict[str, torch.Tensor] | None:
    """The tensors stored under `key`, or None when absent or unreadable."""
    from safetensors.torch import load_file

    path = cache_dir() / f"{key}.safetensors"
    if not path.exists():
        return None
    try:
        return load_file(str(path))
    except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed, never trusted
        return None


def load_cached(key: str) -> Calibration | None:
    tensors = read_cache_entry(key)
    if tensors is None:
        return None
    calib = Calibration(tokens=int(tensors.pop("tokens")[0]))
    for key_name, value in tensors.items():
        kind, rest = key_name.split("/", 1)
        if kind == "angle":
            calib.block_angle[int(rest)] = float(value[0])
            continue
        name, field_name = rest.rsplit("/", 1)
        st = calib.inputs.setdefault(name, InputStats(0, None, None))  # type: ignore[arg-type]
        if field_name == "count":
            st.count = int(value[0])
        else:
            setattr(st, field_name, value)
    return calib
