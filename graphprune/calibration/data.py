"""Calibration data given from Python (`graphprune.compress(calib=...)`) instead of a spec string.

`as_calibration(value)` turns what a Python caller passes into something every backend reads like a
spec (`calibration.text.load_calibration`, `calibration.sets.calibration_set`):

- a spec string or path (`"default"`, `"none"`, `"hf:..."`, a file), or a tuple of them (several
  domains for the expert criteria): unchanged; a list of strings none of which has whitespace is
  read as such a list of specs too (the form the command line builds);
- a list of strings (texts): joined by blank lines and cut into windows like a text file (same
  protocol: `--nsamples` windows of `--seqlen` tokens at seeded offsets); encoders derive pairs from
  its paragraphs like from a text file;
- a `datasets.Dataset` (or `IterableDataset`): the texts of its `text_column` (default "text", else
  its only string column);
- a LongTensor `[N, T]` (or `[T]`): exactly these token windows, as given (no BOS is added);
- a `torch.utils.data.DataLoader` or any iterable of batches (LongTensors, `(input_ids, ...)`
  tuples, dicts with `input_ids` and optionally `attention_mask`, or lists of strings): the rows of
  the batches (padding removed); rows of one length are the windows, rows of different lengths are
  joined into one token stream cut like a text;
- model inputs of a plain `nn.Module` (no tokenizer: images, features): a floating-point tensor (one
  batch), a list of such tensors (one batch each), or a DataLoader / iterable yielding tensors or
  `(inputs..., label)` tuples; each batch keeps every tensor it yields, and the module reads as many
  leading ones as it takes positional inputs (`model_inputs`), so a label is never fed to it;
- a callable `forward_loop(model)` that runs the model over the user's data (the convention of
  quantization toolkits): it is called once on the in-memory model and the `input_ids` every forward
  receives are recorded and used as above (the loop itself runs the model once more than a spec
  would).

Each becomes a `CalibrationData`, whose `str()` names its kind and content hash (the report, the
cache keys and the stream backend's fingerprint use it) and whose windows are what calibration
reads. None of them can be replayed from a recipe (the data is not in it): the recipe says so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibrationError

# Stop reading a (streamed) dataset after this much text, like hf: specs.
TEXT_LIMIT_CHARS = 5_000_000


class CalibrationData:
    """Calibration data from Python: texts, or token rows, or a forward loop not yet run."""

    def __init__(self, kind: str, *, texts: list[str] | None = None, rows: list[torch.Tensor] | None = None,
                 forward_loop: Callable | None = None, description: str = "",
                 batches: list[tuple[torch.Tensor, ...]] | None = None) -> None:
        self.kind = kind
        self.texts = texts
        self.rows = rows
        self.batches = batches  # model inputs of a plain nn.Module, batch by batch
        self.forward_loop = forward_loop
        self.description = description

    # ------------------------------------------------------------------ what it is
    @property
    def is_text(self) -> bool:
        return self.texts is not None

    @property
    def is_model_inputs(self) -> bool:
        """Batches a plain nn.Module runs on (rather than text or token ids for a language model)."""
        return self.batches is not None

    def model_inputs(self, example: tuple | dict) -> list[tuple[torch.Tensor, ...]]:
        """The batches as positional inputs of a module traced with `example` (`example_inputs`): the
        first len(example) tensors of each batch (a `(images, labels)` batch gives the images), a
        lone sample (one axis fewer than the example's) made a batch of one. Token rows of one length
        (a LongTensor given as calib=) are one batch."""
        if isinstance(example, dict):
            raise CalibrationError("calib= batches are fed as positional inputs; a module traced with keyword "
                                   "example_inputs needs a forward loop calib=fn(model) instead")
        if self.batches is None:
            if self.rows is None or len({int(r.numel()) for r in self.rows}) != 1:
                raise CalibrationError(f"calibration data {self} is text or token rows of several lengths; a plain "
                                       f"nn.Module calibrates on its inputs: pass calib= a tensor (a batch of "
                                       f"inputs), a list of tensors or a DataLoader")
            return [(torch.stack(self.rows),)]
        n = len(example)
        out = []
        for index, batch in enumerate(self.batches):
            if len(batch) < n:
                raise CalibrationError(f"calibration batch {index} holds {len(batch)} tensor(s); the module takes "
                                       f"{n} positional input(s)")
            out.append(tuple(t.unsqueeze(0) if t.dim() == example[k].dim() - 1 else t
                             for k, t in enumerate(batch[:n])))
        return out

    def text(self) -> str:
        if self.texts is None:
            raise CalibrationError(f"calibration data {self} holds token ids, not text: an embedding model needs "
                                   f"(query, positive) pairs (give texts or a pair file)")
        return "\n\n".join(self.texts)

    @property
    def sha256(self) -> str | None:
        h = hashlib.sha256(self.kind.encode())
        if self.texts is not None:
            for text in self.texts:
                h.update(b"\0" + text.encode("utf-8"))
        elif self.rows is not None:
            for row in self.rows:
                h.update(f"\0{row.numel()}:".encode())
                h.update(row.to(torch.int64).numpy().tobytes())
        elif self.batches is not None:
            for batch in self.batches:
                for t in batch:
                    h.update(f"\0{str(t.dtype)}{list(t.shape)}:".encode())
                    h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            return None
        return h.hexdigest()

    def __str__(self) -> str:
        digest = self.sha256
        return f"python:{self.kind}({self.description}{', sha256 ' + digest[:16] if digest else ''})"

    __repr__ = __str__

    def recipe_entry(self) -> dict[str, Any]:
        return {"python": self.kind, "description": self.description, "sha256": self.sha256}

    # ------------------------------------------------------------------ windows
    def capture(self, model: torch.nn.Module) -> None:
        """Run a forward loop once on `model`, recording the input_ids of every forward."""
        if self.forward_loop is None or self.rows is not None:
            return
        recorded: list = []

        def record(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if torch.is_tensor(ids):
                recorded.append({"input_ids": ids.detach().cpu(), "attention_mask": kwargs.get("attention_mask")})

        handle = model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            with torch.no_grad():
                self.forward_loop(model)
        finally:
            handle.remove()
        if not recorded:
            raise CalibrationError("the calibration forward loop never called the model with input_ids")
        self.rows = _rows_of_batches(recorded, "the forward loop")[1]

    def windows(self, tokenizer: Any, *, nsamples: int, seqlen: int, seed: int, add_bos: bool = False,
                framed: bool = False) -> torch.Tensor:
        """The token windows calibration runs on (see the module docstring)."""
        from .text import windows_from_text

        if self.batches is not None:
            raise CalibrationError(f"calibration data {self} holds model inputs of a plain nn.Module (floating-point "
                                   f"tensors), not token ids: a language model calibrates on texts or token ids")
        if self.texts is not None:
            return windows_from_text(self.text(), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                     add_bos=add_bos, framed=framed, label=str(self))
        if self.rows is None:
            raise CalibrationError("a calibration forward loop runs an in-memory PyTorch model (the memory backend); "
                                   "give texts, token ids or a DataLoader here")
        lengths = {int(row.numel()) for row in self.rows}
        if len(lengths) == 1:
            return torch.stack([row.to(torch.long) for row in self.rows])
        return windows_from_tokens(torch.cat([row.to(torch.long) for row in self.rows]), nsamples=nsamples,
                                   seqlen=seqlen, seed=seed, label=str(self))


def windows_from_tokens(stream: torch.Tensor, *, nsamples: int, seqlen: int, seed: int, label: str) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded offsets of one token stream (text's protocol)."""
    import random

    if stream.numel() < seqlen:
        raise CalibrationError(f"calibration data {label} has {stream.numel()} tokens; at least {seqlen} are needed "
                               f"for windows of {seqlen} tokens")
    rng = random.Random(seed)
    offsets = [rng.randint(0, stream.numel() - seqlen) for _ in range(nsamples)]
    return torch.stack([stream[o:o + seqlen] for o in offsets])


def _is_spec(item: Any) -> bool:
    return isinstance(item, Path) or (isinstance(item, str) and item.strip() != "" and not any(c.isspace() for c in item))


def as_calibration(value: Any, *, text_column: str | None = None) -> Any:
    """A spec (unchanged) or a `CalibrationData` for what a Python caller passed as `calib=`."""
    if value is None or isinstance(value, (str, Path, CalibrationData)):
        return value
    if isinstance(value, tuple) and all(isinstance(v, (str, Path)) for v in value):
        return list(value)  # several specs (domains), as the command line gives them
    if isinstance(value, list) and value and all(isinstance(v, (str, Path)) for v in value):
        if all(_is_spec(v) for v in value):
            return value  # several specs
        if not all(isinstance(v, str) for v in value):
            raise CalibrationError("calib= mixes paths and texts: give a list of texts or a list of specs")
        return CalibrationData("texts", texts=list(value), description=f"{len(value)} texts")
    if isinstance(value, list) and not value:
        raise CalibrationError("calib= is an empty list")
    if torch.is_tensor(value):
        return _from_tensor(value)
    if _is_dataset(value):
        texts = _dataset_texts(value, text_column)
        return CalibrationData("dataset", texts=texts,
                               description=f"{len(texts)} rows of column '{_text_column_of(value, text_column)}'")
    if callable(value) and not _is_iterable(value):
        name = getattr(value, "__qualname__", type(value).__name__)
        return CalibrationData("forward-loop", forward_loop=value, description=name)
    if _is_iterable(value):
        texts, rows, inputs = _rows_of_batches(value, "the calibration batches", model_inputs=True)
        if inputs is not None:
            return CalibrationData("inputs", batches=inputs, description=f"{len(inputs)} batches")
        if texts is not None:
            return CalibrationData("loader", texts=texts, description=f"{len(texts)} texts from batches")
        return CalibrationData("loader", rows=rows, description=f"{len(rows)} rows from batches")
    raise CalibrationError(f"calib= takes a spec string or path, a list of texts, a datasets.Dataset, a LongTensor "
                           f"[N, T], a DataLoader (or iterable of batches) or a forward loop; got "
                           f"{type(value).__name__}")


def _from_tensor(value: torch.Tensor) -> CalibrationData:
    if value.is_floating_point() and value.dim() >= 1 and value.numel():
        # a batch of inputs of a plain nn.Module; a language model refuses it where it reads windows
        return CalibrationData("inputs", batches=[(value.detach().cpu(),)],
                               description=f"{'x'.join(map(str, value.shape))} {str(value.dtype).replace('torch.', '')}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise CalibrationError(f"calib= tensor must hold token ids (a LongTensor [N, T]), got dtype {value.dtype}")
    if value.dim() == 1:
        value = value.unsqueeze(0)
    if value.dim() != 2 or value.numel() == 0:
        raise CalibrationError(f"calib= tensor must be token ids of shape [N, T], got {tuple(value.shape)}")
    if int(value.min()) < 0:
        raise CalibrationError("calib= tensor holds negative token ids")
    rows = [row.detach().cpu().to(torch.long) for row in value]
    return CalibrationData("tokens", rows=rows, description=f"{value.shape[0]}x{value.shape[1]} tokens")


def _is_iterable(value: Any) -> bool:
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping))


def _is_dataset(value: Any) -> bool:
    module = type(value).__module__ or ""
    return module.startswith("datasets.") and hasattr(value, "column_names")


def _text_column_of(dataset: Any, text_column: str | None) -> str:
    columns = list(dataset.column_names or [])
    if text_column is not None:
        if columns and text_column not in columns:
            raise CalibrationError(f"the dataset has no column '{text_column}' (columns: {', '.join(columns)})")
        return text_column
    if "text" in columns or not columns:
        return "text"
    features = getattr(dataset, "features", None) or {}
    strings = [c for c in columns if getattr(features.get(c), "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    raise CalibrationError(f"say which column of the dataset holds the text: text_column= one of {', '.join(columns)}")


def _dataset_texts(dataset: Any, text_column: str | None) -> list[str]:
    column = _text_column_of(dataset, text_column)
    texts, chars = [], 0
    for row in dataset:
        text = row.get(column) if isinstance(row, Mapping) else None
        if not isinstance(text, str):
            raise CalibrationError(f"column '{column}' of the dataset does not hold strings")
        if text.strip():
            texts.append(text)
            chars += len(text)
            if chars >= TEXT_LIMIT_CHARS:
                break
    if not texts:
        raise CalibrationError(f"column '{column}' of the dataset has no text")
    return texts


def _rows_of_batches(batches: Iterable, what: str, *, model_inputs: bool = False):
    """(texts, None) for batches of strings, else (None, token rows with padding removed); with
    `model_inputs`, a third item: the batches of floating-point tensors (inputs of a plain nn.Module,
    every tensor of each batch kept, labels too: which ones the module reads is known only once the
    model is open), or None."""
    texts: list[str] = []
    rows: list[torch.Tensor] = []
    inputs: list[tuple[torch.Tensor, ...]] = []
    for batch in batches:
        mask = None
        if model_inputs:
            tensors = (batch,) if torch.is_tensor(batch) else tuple(batch) if isinstance(batch, (list, tuple)) else ()
            if tensors and all(torch.is_tensor(t) for t in tensors) and tensors[0].is_floating_point():
                inputs.append(tuple(t.detach().cpu() for t in tensors))
                continue
        if isinstance(batch, Mapping):
            ids, mask = batch.get("input_ids"), batch.get("attention_mask")
        elif isinstance(batch, str):
            texts.append(batch)
            continue
        elif isinstance(batch, (list, tuple)) and batch and all(isinstance(b, str) for b in batch):
            texts.extend(batch)
            continue
        elif isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
            ids = batch[0]
        else:
            ids = batch
        if not torch.is_tensor(ids):
            raise CalibrationError(f"{what} must yield token ids (LongTensors, or dicts with input_ids), got "
                                   f"{type(ids).__name__}")
        if ids.is_floating_point():
            raise CalibrationError(f"{what} yield {ids.dtype} values where token ids (integers) are expected")
        ids = ids.detach().cpu().to(torch.long)
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        if mask is not None:
            mask = torch.as_tensor(mask).detach().cpu().bool()
            mask = mask.unsqueeze(0) if mask.dim() == 1 else mask
        for index, row in enumerate(ids):
            row = row[mask[index]] if mask is not None else row
            if row.numel():
                rows.append(row)
    if sum(map(bool, (texts, rows, inputs))) > 1:
        raise CalibrationError(f"{what} mix texts, token ids and floating-point inputs")
    if inputs:
        return None, None, inputs
    if texts:
        return (texts, None, None) if model_inputs else (texts, None)
    if not rows:
        raise CalibrationError(f"{what} hold no tokens")
    return (None, rows, None) if model_inputs else (None, rows)
