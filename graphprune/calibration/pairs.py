"""Text pairs (query, positive) for embedding models: calibration of the InfoNCE criteria and
retrieval evaluation.

Sources:
  * ``*.jsonl``: one JSON object per line with "query" and "positive" strings ("anchor" is
    accepted for "query"); blank lines are skipped;
  * ``*.tsv``: one pair per line, query TAB positive;
  * any other text file (and "default", the embedded Wikipedia excerpt): pairs derived from
    paragraphs (blocks separated by blank lines): the paragraph's first sentence is the query, the
    rest of the paragraph the positive. Headings, one-sentence paragraphs and fragments shorter
    than `MIN_WORDS` words are skipped.

Calibration and evaluation never share a pair: every distinct pair goes to exactly one side, by
a hash of its text (`split_of`), so the split does not depend on file order, on how many pairs
are asked for, or on the seed, and a pair that appears twice lands twice on the same side.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graphprune.errors import CalibrationError

Part = Literal["calibration", "evaluation", "all"]
# Share of distinct pairs reserved for evaluation.
EVAL_FRACTION = 0.2
MIN_WORDS = 4
PAIR_FILE_SUFFIXES = (".jsonl", ".tsv")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_HEADING = re.compile(r"^\s*(=+\s.*\s=+|[*=\-~^#]{3,})\s*$")


@dataclass(frozen=True)
class Pair:
    query: str
    positive: str


def read_pairs(source: str | Path) -> list[Pair]:
    """All pairs of `source` (a .jsonl / .tsv pair file, a text file, or "default"), in file order."""
    from graphprune.calibration.data import CalibrationData
    from graphprune.calibration.text import DEFAULT_SOURCE, read_calibration_text, read_text_file

    if isinstance(source, CalibrationData):  # texts given from Python: pairs from their paragraphs
        return _require_some(pairs_from_text(source.text()), source, derived=True)
    if isinstance(source, str) and source == DEFAULT_SOURCE:
        return _require_some(pairs_from_text(read_calibration_text(source)), source, derived=True)
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    text = read_text_file(path)
    if suffix == ".jsonl":
        return _require_some(_parse_jsonl(text, path), path)
    if suffix == ".tsv":
        return _require_some(_parse_tsv(text, path), path)
    return _require_some(pairs_from_text(text), path, derived=True)


def pairs_from_text(text: str) -> list[Pair]:
    """(first sentence, rest of the paragraph) for every paragraph with at least two sentences."""
    pairs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip() and not _HEADING.match(line)]
        paragraph = " ".join(" ".join(lines).split())
        if not paragraph:
            continue
        parts = _SENTENCE_END.split(paragraph, maxsplit=1)
        if len(parts) != 2:
            continue
        query, positive = parts[0].strip(), parts[1].strip()
        if len(query.split()) >= MIN_WORDS and len(positive.split()) >= MIN_WORDS:
            pairs.append(Pair(query, positive))
    return pairs


def split_of(pair: Pair, eval_fraction: float = EVAL_FRACTION) -> Literal["calibration", "evaluation"]:
    """The side a pair belongs to, from a hash of its text: stable across runs and machines."""
    digest = hashlib.sha256(f"{pair.query}\x00{pair.positive}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return "evaluation" if position < eval_fraction else "calibration"


def load_pairs(source: str | Path, part: Part, *, limit: int | None = None, seed: int = 0,
               eval_fraction: float = EVAL_FRACTION) -> list[Pair]:
    """Distinct pairs of `source` on side `part`, shuffled by `seed`, at most `limit` of them.

    Raises CalibrationError when the source has no usable pair on that side.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise CalibrationError(f"the number of pairs must be a positive integer, got {limit!r}")
    distinct = list(dict.fromkeys(read_pairs(source)))
    chosen = distinct if part == "all" else [p for p in distinct if split_of(p, eval_fraction) == part]
    if not chosen:
        raise CalibrationError(f"{_describe(source)} has {len(distinct)} distinct pair(s) but none on the "
                               f"{part} side of the split; give more pairs")
    random.Random(seed).shuffle(chosen)
    return chosen[:limit] if limit is not None else chosen


def pair_text(pairs: list[Pair]) -> str:
    """The pairs' texts as one document (for activation statistics on embedding models)."""
    return "\n\n".join(f"{p.query} {p.positive}" for p in pairs)


def _parse_jsonl(text: str, path: Path) -> list[Pair]:
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise CalibrationError(f"{path} line {number}: not valid JSON ({error.msg})") from error
        if not isinstance(row, dict):
            raise CalibrationError(f"{path} line {number}: expected a JSON object with \"query\" and \"positive\"")
        query = row.get("query", row.get("anchor"))
        positive = row.get("positive")
        if not isinstance(query, str) or not isinstance(positive, str) or not query.strip() or not positive.strip():
            raise CalibrationError(f"{path} line {number}: needs non-empty string fields \"query\" and \"positive\"")
        pairs.append(Pair(query.strip(), positive.strip()))
    return pairs


def _parse_tsv(text: str, path: Path) -> list[Pair]:
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise CalibrationError(f"{path} line {number}: expected two non-empty tab-separated fields "
                                   f"(query, positive), got {len(fields)} field(s)")
        pairs.append(Pair(fields[0].strip(), fields[1].strip()))
    return pairs


def _require_some(pairs: list[Pair], source, derived: bool = False) -> list[Pair]:
    if not pairs:
        how = (f"no paragraph with two sentences of at least {MIN_WORDS} words to derive a pair from"
               if derived else "no pairs")
        raise CalibrationError(f"{_describe(source)} has {how}")
    return pairs


def _describe(source) -> str:
    return "the embedded default excerpt" if source == "default" else str(source)
