"""Text data: calibration windows and perplexity evaluation."""

from graphprune.data.calibration import (
    DEFAULT_SOURCE,
    bos_token_id,
    default_calibration_text,
    load_calibration,
    needs_bos,
    read_calibration_text,
    read_text_file,
    tokenize_text,
)
from graphprune.data.perplexity import PerplexityResult, perplexity

__all__ = [
    "DEFAULT_SOURCE",
    "PerplexityResult",
    "bos_token_id",
    "default_calibration_text",
    "load_calibration",
    "needs_bos",
    "perplexity",
    "read_calibration_text",
    "read_text_file",
    "tokenize_text",
]
