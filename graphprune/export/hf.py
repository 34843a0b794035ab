"""Write a pruned model as an HF directory (safetensors), atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import OutputError

SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def prepare_output(out: str | Path, *, inputs: list[Path] = (), force: bool = False) -> Path:
    """Check the output location before any work: never the input, never a non-empty dir without force."""
    out = Path(out).expanduser().resolve()
    for src in inputs:
        src = Path(src).expanduser().resolve()
        if out == src or src in out.parents or out in src.parents:
            raise OutputError(f"output {out} overlaps the input {src}; choose another --out")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"output {out} exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise OutputError(f"output directory {out} is not empty; pass --force to replace it")
    if not out.parent.exists():
        raise OutputError(f"parent directory of {out} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise OutputError(f"cannot write to {out.parent}")
    return out


def save_pruned(model: torch.nn.Module, out: str | Path, *, tokenizer: Any = None, report: dict | None = None,
                source_dir: Path | None = None, force: bool = False) -> Path:
    """Save config + safetensors (+ tokenizer, report.json, sentence-transformers files) into `out`.

    Everything goes to a temporary sibling directory first; it replaces `out` only when complete,
    so an interrupted run never leaves a half-written model that looks finished.
    """
    out = Path(out).expanduser().resolve()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if source_dir is not None:
            for name in SENTENCE_TRANSFORMERS_FILES:
                if (source_dir / name).exists():
                    shutil.copy2(source_dir / name, tmp / name)
            pooling = source_dir / "1_Pooling"
            if pooling.is_dir():
                shutil.copytree(pooling, tmp / "1_Pooling")
        if report is not None:
            (tmp / "graphprune_report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        if out.exists():
            if not force and any(out.iterdir()):
                raise OutputError(f"output directory {out} is not empty; pass --force to replace it")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_pruned(path: str | Path, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a graphprune output, including per-layer (heterogeneous) shapes that plain
    `from_pretrained` cannot build: transformers' `from_pretrained` runs on a subclass of the
    architecture that builds each layer from the config's `graphprune_layer_overrides`, so the
    family's checkpoint conversions apply; every tensor must match (none missing or left over)."""
    from transformers import AutoConfig
    import transformers

    from ..passes.config import per_layer_class

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    arch = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, arch, None) if arch else None
    if model_class is None:
        raise OutputError(f"{path}: config names no known architecture ({arch})")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the mismatch report table is replaced by the one-line error below
    try:
        model, info = per_layer_class(model_class).from_pretrained(path, config=config, dtype=dtype,
                                                                   output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or [])
    if missing or unexpected or mismatched:
        raise OutputError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}, wrong shape {mismatched[:3]})")
    return model.to(dtype).eval()
