"""A Hugging Face checkpoint folder read lazily: its config, its shards, its tensors by name.

Nothing is loaded up front: the shard headers are parsed (and checked against the file sizes, so a
truncated shard fails now, not at layer 27), and `read` copies the named tensors out of the
memory-mapped shards. The shards are opened for each read and closed right after: pages of a
memory map count toward the resident set for as long as the map is open, so a handle kept open
across layers would make the process look (and, under memory pressure, be) as large as the model.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype names -> torch dtypes (the ones a checkpoint of a language model uses)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
# Bytes sampled from each shard for the identity of the weights (start, middle, end of its data).
_SAMPLE_BYTES = 4096


@dataclass(frozen=True)
class TensorEntry:
    shard: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class Checkpoint:
    """config.json plus safetensors shards (one file, an index, or several files without one)."""

    def __init__(self, directory: str | Path) -> None:
        from ...models.loading import read_json

        self.directory = Path(directory).expanduser()
        if not self.directory.is_dir():
            raise ModelLoadError(f"model path {self.directory} is not a directory")
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise ModelLoadError(f"{self.directory} has no config.json (not a Hugging Face model directory)")
        self.config_dict = read_json(config_path)
        self.config_bytes = config_path.read_bytes()
        self.shards = self._find_shards()
        self.tensors: dict[str, TensorEntry] = {}
        self._headers: dict[Path, bytes] = {}
        listed = self._index_map()
        for shard in self.shards:
            for name, entry in self._read_header(shard).items():
                if name == "__metadata__":
                    continue
                if entry["dtype"] not in DTYPES:
                    raise ModelLoadError(f"{shard.name}: tensor {name} has dtype {entry['dtype']}, which graphprune "
                                         f"does not read")
                if name in self.tensors:
                    raise ModelLoadError(f"tensor {name} is stored twice ({self.tensors[name].shard.name} and "
                                         f"{shard.name})")
                self.tensors[name] = TensorEntry(shard, DTYPES[entry["dtype"]], tuple(entry["shape"]))
        if listed is not None:
            wrong = sorted(n for n, shard in listed.items() if n not in self.tensors or self.tensors[n].shard.name != shard)
            if wrong:
                raise ModelLoadError(f"{self.directory / INDEX_FILE} does not match its shards: e.g. {wrong[0]} is not in "
                                     f"{listed[wrong[0]]}")

    # ------------------------------------------------------------------ layout
    def _find_shards(self) -> list[Path]:
        from ...models.loading import shards_listed_in

        if (self.directory / SINGLE_FILE).is_file():
            return [self.directory / SINGLE_FILE]
        if (self.directory / INDEX_FILE).is_file():
            return shards_listed_in(self.directory / INDEX_FILE)  # raises for a missing shard
        found = sorted(self.directory.glob("*.safetensors"))
        if not found:
            pickles = sorted(p.name for p in self.directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            hint = f" (it holds {pickles[0]}: streaming reads safetensors only)" if pickles else ""
            raise ModelLoadError(f"{self.directory} has no safetensors weights{hint}")
        return found

    def _index_map(self) -> dict[str, str] | None:
        from ...models.loading import read_json

        path = self.directory / INDEX_FILE
        if not path.is_file() or (self.directory / SINGLE_FILE).is_file():
            return None
        return {str(k): str(v) for k, v in read_json(path)["weight_map"].items()}

    def _read_header(self, shard: Path) -> dict:
        from ...models.loading import check_safetensors_file

        header = check_safetensors_file(shard)  # size against the header: truncation is found now
        with shard.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            self._headers[shard] = f.read(length)
        return header

    # ------------------------------------------------------------------ reading
    def read(self, names: list[str], *, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Owned copies of the named tensors (floating ones in `dtype`, if given, on `device`). Each
        tensor is copied out of a map of its shard that is closed right after, so the pages of at
        most one tensor are mapped at a time."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.tensors]
        if missing:
            raise ModelLoadError(f"{self.directory}: the weights have no tensor {missing[0]}")
        out: dict[str, torch.Tensor] = {}
        for name in names:
            with safe_open(str(self.tensors[name].shard), framework="pt") as opened:
                mapped = opened.get_tensor(name)  # a view of the memory map
                target = dtype if dtype is not None and mapped.is_floating_point() else mapped.dtype
                out[name] = mapped.to(device=device, dtype=target, copy=True)
                del mapped
        return out

    # ------------------------------------------------------------------ facts
    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())

    def numel(self, names=None) -> int:
        return sum(self.tensors[n].numel for n in (names if names is not None else self.tensors))

    def storage_dtype(self) -> torch.dtype:
        """The dtype most of the weights are stored in (what the output keeps)."""
        count: dict[torch.dtype, int] = {}
        for e in self.tensors.values():
            if e.dtype.is_floating_point:
                count[e.dtype] = count.get(e.dtype, 0) + e.numel
        return max(count, key=count.get) if count else torch.float32

    def fingerprint(self) -> str:
        """Identity of the checkpoint for resuming: config, every shard's header and size, and a few
        kilobytes of each shard's data (a fine-tuned copy with the same shapes differs there)."""
        h = hashlib.sha256(self.config_bytes)
        for shard in self.shards:
            size = shard.stat().st_size
            h.update(f"{shard.name}:{size}".encode())
            h.update(self._headers[shard])
            with shard.open("rb") as f:
                for offset in (0, size // 2, max(size - _SAMPLE_BYTES, 0)):
                    f.seek(offset)
                    h.update(f.read(_SAMPLE_BYTES))
        return h.hexdigest()[:32]
