"""The calibration cache: statistics, gradients and search paths stored as safetensors entries
under `cache_dir()`, so re-pruning at another sparsity skips the work.

An entry is found by a key over everything its content depends on: the weights (every byte,
`weights_fingerprint`), the calibration data (a digest of the token windows, in the calibration
note) and the tokenizer (`tokenizer_fingerprint`). An entry carries a checksum of its tensors in
its metadata; one that does not verify, or whose tensors are not what the reader expects, is
recomputed after a one-line warning (`discard`), never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from ..errors import GraphpruneWarning
from .stats import Calibration, InputStats

# The metadata field of a cache entry that holds the checksum of its tensors.
CHECKSUM_KEY = "graphprune_sha256"


def cache_key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _setting(name: str) -> str | None:
    """An environment variable's value; None when unset, empty or only whitespace (an unset
    `$VAR` in a shell line gives an empty string, which must not mean the current directory)."""
    value = os.environ.get(name, "")
    return value if value.strip() else None


def cache_dir() -> Path:
    """`$GRAPHPRUNE_CALIB_CACHE`, else `calibration/` under graphprune's cache root
    (`models.aliases.cache_root`: `$GRAPHPRUNE_CACHE`, `$XDG_CACHE_HOME/graphprune` or
    `~/.cache/graphprune`)."""
    explicit = _setting("GRAPHPRUNE_CALIB_CACHE")
    if explicit is not None:
        return Path(explicit).expanduser()
    from ..models.aliases import cache_root

    return cache_root() / "calibration"


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


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of `tensor` (row-major, on the CPU), without converting its dtype."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `tensors` (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name]
        h.update(f"{name}\0{value.dtype}\0{tuple(value.shape)}\0".encode())
        h.update(tensor_bytes(value))
    return h.hexdigest()


def write_cache_tensors(key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Store named tensors under `key` as safetensors (no pickle), with their checksum (and
    `metadata`) in the file's metadata; see `write_cache_entry`."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), CHECKSUM_KEY: tensors_checksum(tensors)}
    write_cache_entry(f"{key}.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def write_cache_entry(name: str, write) -> None:
    """`write(tmp_path)` then rename into `cache_dir()/name`; a cache that cannot be written warns once
    and never fails the run (nor leaves a partial entry)."""
    from ..io.atomic import atomic_file

    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_file(directory / name, write)  # removes its temporary file when `write` fails
    except Exception as error:  # noqa: BLE001 - a cache that cannot be written must not fail the run
        warnings.warn(f"calibration statistics not cached in {directory}: {str(error).splitlines()[0]}",
                      GraphpruneWarning, stacklevel=3)


def discard(key: str, why: str) -> None:
    """Say (one line) that the cache entry `key` is damaged and is being recomputed."""
    detail = " ".join(str(why).split())
    warnings.warn(f"calibration cache entry {cache_dir() / key}.safetensors is damaged ({detail}); "
                  f"recomputing it", GraphpruneWarning, stacklevel=3)


def read_cache_entry_with_metadata(key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The tensors stored under `key` and the entry's metadata, or None when absent; an entry that
    cannot be read or whose checksum does not verify is `discard`ed (None)."""
    from safetensors import safe_open

    path = cache_dir() / f"{key}.safetensors"
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as opened:
            metadata = dict(opened.metadata() or {})
            tensors = {name: opened.get_tensor(name) for name in opened.keys()}
    except Exception as error:  # noqa: BLE001 - a damaged cache entry is recomputed, never trusted
        discard(key, f"unreadable: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
        return None
    stored = metadata.get(CHECKSUM_KEY)
    if stored is None:
        discard(key, "it carries no checksum")
        return None
    if stored != tensors_checksum(tensors):
        discard(key, "its checksum does not match its content")
        return None
    return tensors, metadata


def read_cache_entry(key: str) -> dict[str, torch.Tensor] | None:
    """The tensors stored under `key`, or None when absent or damaged (see
    `read_cache_entry_with_metadata`)."""
    entry = read_cache_entry_with_metadata(key)
    return entry[0] if entry is not None else None


def load_cached(key: str, expect: list[str] | tuple[str, ...] = ()) -> Calibration | None:
    """The statistics stored under `key`; None when absent, damaged, or when they lack the input
    statistics of a module in `expect` (each a `discard` with the reason)."""
    tensors = read_cache_entry(key)
    if tensors is None:
        return None
    try:
        calib = _parse_statistics(dict(tensors))
        missing = [name for name in expect if name not in calib.inputs]
        if missing:
            raise ValueError(f"no statistics for {missing[0]}")
    except (KeyError, ValueError, IndexError, TypeError, RuntimeError) as error:
        discard(key, str(error) or type(error).__name__)
        return None
    return calib


def _parse_statistics(tensors: dict[str, torch.Tensor]) -> Calibration:
    """A `Calibration` from the tensors `save_cached` wrote; ValueError naming what is wrong."""
    if "tokens" not in tensors:
        raise ValueError("no tensor 'tokens'")
    calib = Calibration(tokens=_scalar(tensors.pop("tokens"), "tokens", int))
    fields: dict[str, dict[str, torch.Tensor]] = {}
    for key_name, value in tensors.items():
        kind, _, rest = key_name.partition("/")
        if kind == "angle" and rest.isdigit():
            calib.block_angle[int(rest)] = _scalar(value, key_name, float)
            continue
        name, _, field_name = rest.rpartition("/")
        if kind != "in" or not name or field_name not in ("sum", "sumsq", "count"):
            raise ValueError(f"unexpected tensor '{key_name}'")
        fields.setdefault(name, {})[field_name] = value
    for name, found in fields.items():
        if set(found) != {"sum", "sumsq", "count"}:
            absent = sorted({"sum", "sumsq", "count"} - set(found))[0]
            raise ValueError(f"no tensor 'in/{name}/{absent}'")
        total, squares = found["sum"], found["sumsq"]
        if total.dim() != 1 or squares.shape != total.shape:
            raise ValueError(f"the statistics of {name} have shapes {tuple(total.shape)} and {tuple(squares.shape)}")
        if not total.is_floating_point() or not squares.is_floating_point():
            raise ValueError(f"the statistics of {name} are not floating point")
        calib.inputs[name] = InputStats(_scalar(found["count"], f"in/{name}/count", int), total, squares)
    return calib


def _scalar(value: torch.Tensor, name: str, kind):
    if value.numel() != 1:
        raise ValueError(f"tensor '{name}' has shape {tuple(value.shape)}, expected one value")
    return kind(value.reshape(-1)[0])


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Identity of the weights: every byte of every tensor of the state dict (a tied tensor once,
    under all its names), its name, dtype and shape, and the model's config (which changes what the
    same weights compute). sha256 over the raw bytes: 0.3-0.5 s for SmolLM2-135M's 538 MB on the
    shared 2-core build machine (0.7 s on the first call, while the pages fault in); `hashlib` uses
    the CPU's SHA instructions there, blake2b took 1.0 s and md5 1.3 s."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        settings = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
        h.update(json.dumps(settings, sort_keys=True, default=repr).encode())
    hashed: dict[tuple, str] = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        h.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if tensor.device.type == "meta":
            continue
        if identity in hashed and tensor.numel():
            h.update(f"same as {hashed[identity]}".encode())  # tied: the bytes are already in
            continue
        hashed[identity] = name
        h.update(tensor_bytes(tensor))
    return h.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str | None:
    """Identity of a tokenizer: its class and full definition (vocabulary, merges, normalizer, special
    tokens), so a cache key changes with the tokenizer. None without a tokenizer."""
    if tokenizer is None:
        return None
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    elif hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    else:
        h.update(repr(tokenizer).encode())
    specials = getattr(tokenizer, "special_tokens_map", None) or {}
    h.update(json.dumps(specials, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]
