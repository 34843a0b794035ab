"""The calibration cache: statistics, gradients and search paths stored as safetensors entries
under `cache_dir()`, so re-pruning at another sparsity skips the work."""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path

import torch

from ..errors import GraphpruneWarning
from .stats import Calibration, InputStats


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


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Cheap identity of the weights: shapes plus a few sampled values of every tensor."""
    h = []
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 16)][:16].float().tolist() if flat.numel() else []
        h.append((name, tuple(p.shape), [round(x, 6) for x in sample]))
    return cache_key(h)
