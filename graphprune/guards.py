"""Checks that stop a run before it can do harm, each ending in a one-line `UserError`.

- non-finite input weights: pruning a broken model would hide the breakage in a smaller one;
- free disk space: a write that cannot fit is refused before it starts, not discovered half way;
- ONNX external data: a tensor may only point at a regular file inside the model's directory;
- configs that describe a model far larger than its weights: refused before transformers
  allocates (and randomly initialises) tensors of the config's size.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Iterable

import torch

from .errors import ModelLoadError, OutputError

# Room for the non-weight files of an output (config, tokenizer, report): generous for a real tokenizer.
OUTPUT_FILES_SLACK_BYTES = 64 * 2**20
# A config may describe a little more than its weights hold (an unsaved pooler, tied heads counted
# twice by a converter); more than this many times as much means the config is wrong.
CONFIG_WEIGHTS_RATIO_LIMIT = 2.0


def check_finite_weights(model: torch.nn.Module, *, action: str = "prune") -> None:
    """Raise if any parameter of `model` holds NaN or Inf, naming the first one ("refusing to
    {action} it"). Buffers are not checked: attention-mask buffers hold -inf on purpose."""
    bad = []
    for name, tensor in model.named_parameters():
        if tensor.is_floating_point() and tensor.numel() and tensor.device.type != "meta":
            count = int((~torch.isfinite(tensor.detach())).sum())
            if count:
                bad.append((name, count))
    if bad:
        name, count = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ModelLoadError(f"the input model is broken: {name} holds {count} NaN/Inf value(s){more}; "
                             f"refusing to {action} it")


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors `model` saves (its state dict; tied weights counted once)."""
    seen: dict[tuple, int] = {}
    for tensor in model.state_dict().values():
        seen[(tensor.data_ptr(), tensor.numel(), tensor.dtype)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def free_bytes(directory: str | Path) -> int:
    """Free bytes on the filesystem `directory` is (or will be, once created) on; the seam
    `testing.faults.disk_free` replaces."""
    directory = Path(directory)
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return shutil.disk_usage(directory).free


def require_free_space(directory: str | Path, needed: int, *, what: str) -> None:
    """Raise OutputError unless the filesystem of `directory` has `needed` bytes free."""
    free = free_bytes(directory)
    if free < needed:
        raise OutputError(f"not enough free disk space in {directory} to write {what}: about {_mb(needed)} needed, "
                          f"{_mb(free)} free; nothing was written")


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


# --- ONNX external data ---------------------------------------------------------------------------


def graph_tensors(graph):
    """Every TensorProto of `graph`: initializers, sparse initializers, attribute tensors, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from graph_tensors(subgraph)


# --- configs against weights ---------------------------------------------------------------------


def check_config_fits_weights(model_class, config, weight_elements: int, *, described_by: str) -> None:
    """Refuse a config whose model has far more parameters than the weights hold.

    The model is built on the meta device (no memory), so an absurd config (hidden_size 10**8)
    never reaches an allocation. A config smaller than its weights is left to the loader's exact
    shape comparison.
    """
    try:
        with torch.device("meta"):
            meta = model_class.from_config(config)
    except Exception:  # noqa: BLE001 - the loader reports configs it cannot build itself
        return
    described = sum(p.numel() for p in meta.parameters())
    if weight_elements and described > CONFIG_WEIGHTS_RATIO_LIMIT * weight_elements:
        raise ModelLoadError(f"{described_by} does not match its weights: it describes "
                             f"{_count(described)} parameters but the weights hold {_count(weight_elements)}")


def safetensors_elements(headers: Iterable[dict]) -> int:
    """Total elements the tensors of parsed safetensors headers declare."""
    return sum(math.prod(entry["shape"]) for header in headers for key, entry in header.items()
               if key != "__metadata__")


def _count(n: int) -> str:
    return f"{n:,}"
