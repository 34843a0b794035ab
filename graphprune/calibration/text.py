"""Calibration data: text from the embedded excerpt, a file or a Hugging Face dataset, cut into windows.

Protocol: the whole text is tokenized once without special tokens, then `nsamples` windows start
at offsets drawn uniformly from [0, tokens - window] by `random.Random(seed)`. The same seed,
text and tokenizer always give the same windows.
"""

from __future__ import annotations

import codecs
import os
import random
import re
import stat
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from graphprune.errors import CalibrationError, GraphpruneWarning
from graphprune.progress import in_stage

DEFAULT_SOURCE = "default"
HF_DATASET_PREFIX = "hf:"
_EXCERPT_RESOURCE = "wiki_excerpt.txt"
# Stop reading a streamed dataset after this much text: enough for any calibration set, and it
# keeps a multi-terabyte dataset (C4, ...) from being downloaded whole.
_HF_TEXT_LIMIT_CHARS = 5_000_000


def default_calibration_text() -> str:
    """The embedded Wikipedia excerpt (see ATTRIBUTION.md next to it): about 56k SmolLM2 tokens."""
    return resources.files("graphprune.data").joinpath(_EXCERPT_RESOURCE).read_text(encoding="utf-8")


# Read at most this much of a text file: three times wiki.train (about 10 MB), several hundred times what
# a calibration set needs (128 windows of 128 tokens are about 100 kB of text), so a huge file (or one
# that never ends) is never read whole. Larger files are read up to here and the user is told.
MAX_TEXT_BYTES = 32 * 2**20
_FILE_TYPES = ((stat.S_ISDIR, "a directory, not a text file"),
               (stat.S_ISFIFO, "a named pipe (FIFO), not a regular file"),
               (stat.S_ISCHR, "a character device, not a regular file"),
               (stat.S_ISBLK, "a block device, not a regular file"), (stat.S_ISSOCK, "a socket, not a regular file"))


def _not_regular(path: Path, mode: int) -> CalibrationError:
    kind = next((what for test, what in _FILE_TYPES if test(mode)), "not a regular file")
    return CalibrationError(f"calibration file {path} is {kind}")


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file, raising CalibrationError if it is missing, empty, not text or not a
    regular file (a pipe or a device is refused before it is opened: reading one can block forever
    or never end). At most `MAX_TEXT_BYTES` are read; of a larger file its beginning, with a warning."""
    path = Path(path).expanduser()
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CalibrationError(f"calibration file {path} does not exist") from None
    except OSError as error:
        raise CalibrationError(f"calibration file {path} cannot be read: {error.strerror or error}") from error
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)
    limit = MAX_TEXT_BYTES
    try:
        # O_NONBLOCK: should the path have become a pipe since the stat, opening it does not wait for a writer
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(descriptor, "rb") as file:
            opened = os.fstat(file.fileno())
            if not stat.S_ISREG(opened.st_mode):
                raise _not_regular(path, opened.st_mode)
            data = file.read(limit + 1)
    except OSError as error:
        raise CalibrationError(f"calibration file {path} cannot be read: {error.strerror or error}") from error
    truncated = len(data) > limit
    if truncated:
        data = data[:limit]
    # UTF-16 text and binary files decode as garbage or fail late; a NUL byte never occurs in UTF-8 text.
    if b"\x00" in data:
        raise CalibrationError(f"calibration file {path} looks binary (it contains NUL bytes); expected UTF-8 text")
    if truncated:  # end at a line break rather than in a word
        cut = data.rfind(b"\n")
        data = data[:cut + 1] if cut > 0 else data
    if not data.strip():
        raise CalibrationError(f"calibration file {path} is empty")
    try:
        # an incremental decoder keeps a character the cut split in two instead of failing on it
        text = codecs.getincrementaldecoder("utf-8-sig")().decode(data, final=not truncated)
    except UnicodeDecodeError as error:
        raise CalibrationError(
            f"calibration file {path} is not UTF-8 text (invalid byte at offset {error.start})"
        ) from error
    if truncated:
        warnings.warn(f"calibration file {path} holds {opened.st_size:,} bytes; reading only its first "
                      f"{len(data):,} (more than any calibration set or evaluation needs)", GraphpruneWarning,
                      stacklevel=2)
    return text


def read_calibration_text(source: str | Path) -> str:
    """The text `source` names: "default" (the embedded excerpt), "hf:NAME[:CONFIG[:SPLIT]]" or a path.

    A file literally named "default" can be given as "./default". Texts given from Python
    (`calibration.data.CalibrationData`) are joined by blank lines.
    """
    from .data import CalibrationData

    if isinstance(source, CalibrationData):
        return source.text()
    if isinstance(source, str):
        if source == DEFAULT_SOURCE:
            return default_calibration_text()
        if source == "none":
            raise CalibrationError(
                "'none' is not a text to read here (compress generates calibration text for --calib none); "
                "use 'default', a UTF-8 text file or hf:NAME[:CONFIG[:SPLIT]]"
            )
        if source.startswith(HF_DATASET_PREFIX):
            return _read_hf_dataset_text(source)
    return read_text_file(source)


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of the whole `text` without special tokens, as a 1-D int64 tensor.

    A fast tokenizer keeps hundreds of bytes of bookkeeping per token (offsets, token strings):
    2.3 MB of Wikipedia at once peaks near 300 MB, more than the layers of a small model. Long
    texts are therefore encoded in pieces, cut before a single space between two words, provided
    this tokenizer encodes every such cut exactly as the uncut text (each cut is checked on its
    surroundings: byte-level BPE and SentencePiece tokenizers pass, one that strips its input does
    not and gets the whole text at once). The ids are the same either way.
    """
    pieces = _word_pieces(text, _PIECE_CHARS)
    if not all(_cut_is_invisible(tokenizer, a, b) for a, b in zip(pieces, pieces[1:])):
        pieces = [text]
    ids: list[int] = []
    for start in range(0, len(pieces), _PIECES_PER_CALL):  # a batch call encodes its pieces in parallel
        for piece_ids in _encode(tokenizer, pieces[start:start + _PIECES_PER_CALL]):
            ids.extend(piece_ids)
    return torch.tensor(ids, dtype=torch.long)


# Characters per piece of a long text: ~16k tokens, a few MB of tokenizer bookkeeping.
_PIECE_CHARS = 1 << 16
_PIECES_PER_CALL = 4
_SINGLE_SPACE = re.compile(r"(?<=\S) (?=\S)")


def _encode(tokenizer: Any, text: str | list[str]) -> list[int] | list[list[int]]:
    # verbose=False: long texts are meant to exceed model_max_length; the windows respect it.
    return tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _word_pieces(text: str, size: int) -> list[str]:
    """`text` cut into pieces of about `size` characters, each cut just before a single space
    between two non-space characters (no run of whitespace is split, no word either)."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = _SINGLE_SPACE.search(text, start + size)
        if cut is None:
            break
        pieces.append(text[start:cut.start()])
        start = cut.start()
    pieces.append(text[start:])
    return pieces


def _cut_is_invisible(tokenizer: Any, before: str, after: str, context: int = 2000) -> bool:
    """Whether encoding the two sides of a cut separately gives the ids of encoding them together."""
    left, right = before[-context:], after[:context]
    apart = _encode(tokenizer, [left, right])
    return apart[0] + apart[1] == _encode(tokenizer, left + right)


def needs_bos(model: Any) -> bool:
    """Whether windows fed to `model` should start with BOS: Gemma models degrade badly without it."""
    config = getattr(model, "config", model)
    return str(getattr(config, "model_type", "")).startswith("gemma")


def bos_token_id(tokenizer: Any) -> int:
    """The tokenizer's BOS id; CalibrationError when it has none."""
    token_id = getattr(tokenizer, "bos_token_id", None)
    if token_id is None:
        raise CalibrationError("windows should start with BOS but the tokenizer defines no BOS token")
    return int(token_id)


@in_stage("calibrate")
def load_calibration(
    source: str | Path,
    tokenizer: Any,
    *,
    nsamples: int = 128,
    seqlen: int = 128,
    seed: int = 0,
    add_bos: bool = False,
) -> torch.Tensor:
    """`nsamples` windows of `seqlen` token ids from `source`, as a LongTensor [nsamples, seqlen].

    `source` is "default", a text file path or "hf:NAME[:CONFIG[:SPLIT]]". With `add_bos` each
    window is BOS followed by seqlen - 1 text tokens. Windows may overlap (offsets are independent
    draws). Raises CalibrationError when the text is unusable or shorter than one window.
    """
    _require_positive(nsamples=nsamples, seqlen=seqlen)
    if add_bos and seqlen < 2:
        raise CalibrationError("seqlen must be at least 2 when windows start with BOS")
    from .data import CalibrationData

    if isinstance(source, CalibrationData):  # texts, token ids or batches given from Python
        return source.windows(tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, add_bos=add_bos)
    return windows_from_text(read_calibration_text(source), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                             add_bos=add_bos, label=_describe(source))


def windows_from_text(text: str, tokenizer: Any, *, nsamples: int, seqlen: int, seed: int = 0, add_bos: bool = False,
                      framed: bool = False, label: str = "") -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at random offsets of `text` (see `load_calibration`).
    `framed`: each window is framed by the special tokens the tokenizer puts around one text
    (BERT's [CLS] ... [SEP]), as an encoder always sees its input."""
    _require_positive(nsamples=nsamples, seqlen=seqlen)
    prefix, suffix = special_frame(tokenizer) if framed else ((), ())
    token_ids = tokenize_text(tokenizer, text)
    text_tokens_per_window = seqlen - (1 if add_bos else 0) - len(prefix) - len(suffix)
    if text_tokens_per_window < 1:
        raise CalibrationError(f"--seqlen {seqlen} leaves no room for text between the special tokens")
    if token_ids.numel() < text_tokens_per_window:
        raise CalibrationError(
            f"calibration text {label} has {token_ids.numel()} tokens; "
            f"at least {text_tokens_per_window} are needed for windows of {seqlen} tokens"
        )
    rng = random.Random(seed)
    last_offset = token_ids.numel() - text_tokens_per_window
    offsets = [rng.randint(0, last_offset) for _ in range(nsamples)]
    windows = torch.stack([token_ids[offset : offset + text_tokens_per_window] for offset in offsets])
    if add_bos:
        bos_column = torch.full((nsamples, 1), bos_token_id(tokenizer), dtype=torch.long)
        windows = torch.cat([bos_column, windows], dim=1)
    if prefix or suffix:
        windows = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(nsamples, -1), windows,
                             torch.tensor(suffix, dtype=torch.long).expand(nsamples, -1)], dim=1)
    return windows


def special_frame(tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The special token ids the tokenizer puts before and after one text (([CLS],), ([SEP],) for
    BERT; empty for a tokenizer that adds none), read off how it encodes a short text."""
    plain = tokenizer("a sample", add_special_tokens=False)["input_ids"]
    full = tokenizer("a sample", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return tuple(full[:start]), tuple(full[start + len(plain):])
    return (), ()


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CalibrationError(f"{name} must be a positive integer, got {value!r}")


def _describe(source: str | Path) -> str:
    return "(embedded default excerpt)" if source == DEFAULT_SOURCE else str(source)


def _read_hf_dataset_text(spec: str) -> str:
    """Text of a Hugging Face dataset, "hf:NAME[:CONFIG[:SPLIT]]" (split defaults to train).

    Rows are streamed and their text column joined by blank lines, up to about 5 M characters.
    """
    fields = spec[len(HF_DATASET_PREFIX) :].split(":")
    if not fields[0] or len(fields) > 3:
        raise CalibrationError(f"bad dataset spec '{spec}'; expected hf:NAME[:CONFIG[:SPLIT]]")
    name = fields[0]
    config = fields[1] if len(fields) > 1 and fields[1] else None
    split = fields[2] if len(fields) > 2 and fields[2] else "train"
    try:
        import datasets
    except ImportError as error:
        raise CalibrationError(
            f"--calib {spec} needs the 'datasets' library, which is not installed (pip install datasets)"
        ) from error

    pieces: list[str] = []
    collected_chars = 0
    try:
        for row in datasets.load_dataset(name, config, split=split, streaming=True):
            text = _row_text(row, spec)
            if text.strip():
                pieces.append(text)
                collected_chars += len(text)
                if collected_chars >= _HF_TEXT_LIMIT_CHARS:
                    break
    except CalibrationError:
        raise
    except Exception as error:  # hub unreachable, unknown dataset/config/split, ...
        first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise CalibrationError(f"cannot load dataset {spec}: {first_line.strip()}") from error
    if not pieces:
        raise CalibrationError(f"dataset {spec} has no text")
    return "\n\n".join(pieces)


def _row_text(row: dict[str, Any], spec: str) -> str:
    """The "text" column of a dataset row, else its first string column."""
    if isinstance(row.get("text"), str):
        return row["text"]
    for value in row.values():
        if isinstance(value, str):
            return value
    raise CalibrationError(f"dataset {spec} has no text column (columns: {', '.join(row)})")
