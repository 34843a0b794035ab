"""Embedding models (BERT-style encoders): is it one, how it pools token states into a sentence
embedding.

Pooling follows the model's sentence-transformers configuration (``1_Pooling/config.json``, in
either style: the `pooling_mode_*_tokens` flags, or sentence-transformers >= 6's one `pooling_mode`
key; mean, cls, max or mean-sqrt-len over the non-padding tokens) and defaults to mean pooling for a
bare Hugging Face encoder directory or module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError

POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}
# sentence-transformers >= 6 writes one `pooling_mode` key: its names for the modes above
POOLING_MODE_NAMES = {"mean": "mean", "cls": "cls", "max": "max", "mean_sqrt_len_tokens": "mean_sqrt_len",
                      "mean_sqrt_len": "mean_sqrt_len"}


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"
    normalize: bool = False  # sentence-transformers' Normalize module: unit-length embeddings


def is_encoder(model: Any) -> bool:
    """An embedding model rather than a causal LM (judged from the config like the model loader)."""
    from .loading import CAUSAL_LM_ARCHITECTURE_SUFFIXES, is_causal_lm

    if type(model).__name__.endswith(CAUSAL_LM_ARCHITECTURE_SUFFIXES):  # an in-memory LM whose config lists none
        return False
    config = getattr(model, "config", None)
    return config is not None and not is_causal_lm(config)


def pooling_of(directory: str | Path | None) -> Pooling:
    """The pooling a sentence-transformers folder declares; mean pooling when it declares none."""
    if directory is None or not (Path(directory) / "modules.json").is_file():
        return Pooling()
    root = Path(directory)
    try:
        modules = json.loads((root / "modules.json").read_text(encoding="utf-8"))
        normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
        pooling_dir = next((m.get("path", "") for m in modules if str(m.get("type", "")).endswith(".Pooling")), None)
        if pooling_dir is None:
            return Pooling(normalize=normalize)
        from ..io.paths import check_inside

        # a module path must stay inside the folder (one leading elsewhere would make us read another model's files)
        pooling_path = check_inside(root, str(pooling_dir or "."), what=str(root / "modules.json")) / "config.json"
        config = json.loads(pooling_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, AttributeError) as error:
        raise UserError(f"{root}: cannot read the sentence-transformers pooling configuration ({error})") from error
    if "pooling_mode" in config:  # sentence-transformers >= 6: {"pooling_mode": "mean", ...}
        given = config["pooling_mode"]
        given = given if isinstance(given, list) else [given]
        modes = [POOLING_MODE_NAMES.get(str(mode), str(mode)) for mode in given]
        if len(modes) != 1 or modes[0] not in POOLING_MODES.values():
            raise UserError(f"{pooling_path}: supported pooling is exactly one of "
                            f"{', '.join(POOLING_MODES.values())}; found {given}")
        return Pooling(mode=modes[0], normalize=normalize)
    modes = [mode for key, mode in POOLING_MODES.items() if config.get(key)]
    unsupported = [key for key, value in config.items() if key.startswith("pooling_mode_") and value
                   and key not in POOLING_MODES]
    if len(modes) != 1 or unsupported:
        raise UserError(f"{pooling_path}: supported pooling is exactly one of "
                        f"{', '.join(POOLING_MODES.values())}; found {modes + unsupported or 'none'}")
    return Pooling(mode=modes[0], normalize=normalize)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Sentence embeddings [batch, hidden] from token states [batch, tokens, hidden]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if pooling.mode == "cls":
        out = hidden[:, 0]
    elif pooling.mode == "max":
        out = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(1)
    else:
        summed = (hidden * mask).sum(1)
        count = mask.sum(1).clamp_min(1.0)
        out = summed / (count.sqrt() if pooling.mode == "mean_sqrt_len" else count)
    return F.normalize(out, dim=-1) if pooling.normalize else out


def embed(model: torch.nn.Module, inputs: dict[str, torch.Tensor], pooling: Pooling) -> torch.Tensor:
    output = model(**inputs)
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    return pool(hidden, inputs["attention_mask"], pooling)


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    if len(texts) > 1 and getattr(tokenizer, "pad_token_id", None) is None:
        raise UserError("the tokenizer defines no padding token, which batches of texts of an embedding model need")
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
