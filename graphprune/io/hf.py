"""Write a pruned model as an HF directory (safetensors), atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import OutputError
from ..guards import OUTPUT_FILES_SLACK_BYTES, model_bytes, require_free_space

SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
# Report entries that measure the run (wall time, memory, cache hits) rather than describe its result.
# They go to graphprune_run.json so that graphprune_report.json, like the weights, is byte-identical
# for the same inputs and seed.
RUN_REPORT_KEYS = ("timings_s", "peak_rss_mb", "calibration_cache", "gradient_cache", "stream_run")
REPORT_FILE, RUN_FILE = "graphprune_report.json", "graphprune_run.json"


def prepare_output(out: str | Path, *, inputs: list[Path] = (), force: bool = False, needed_bytes: int = 0) -> Path:
    """Check the output location before any work (`io.paths.check_output`: never the input, never a
    non-empty directory without force, and with force only graphprune's own output) and that at least
    `needed_bytes` are free (a lower bound of the output's size, so a run that could fit is never
    refused)."""
    from .paths import check_output

    out = check_output(out, inputs=inputs, force=force)
    if needed_bytes:
        require_free_space(out.parent, needed_bytes, what="the pruned model")
    return out


def save_pruned(model: torch.nn.Module, out: str | Path, *, tokenizer: Any = None, report: dict | None = None,
                source_dir: Path | None = None, force: bool = False,
                also: Callable[[Path], None] | None = None) -> Path:
    """Save config + safetensors (+ tokenizer, report.json, sentence-transformers files) into `out`.

    Everything goes to a temporary sibling directory first; it replaces `out` only when complete,
    so an interrupted run never leaves a half-written model that looks finished. `also(tmp)`
    writes more files into that directory before it is renamed (the ONNX export of compress
    --export onnx): when it fails, nothing is written.
    """
    from .paths import check_output

    out = check_output(out, inputs=[source_dir] if source_dir is not None else [], force=force)
    require_free_space(out.parent, model_bytes(model) + OUTPUT_FILES_SLACK_BYTES, what=f"the pruned model to {out}")
    with _write_errors_as_output_errors(out):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        with _write_errors_as_output_errors(out):
            _write_files(model, tmp, tokenizer=tokenizer, report=report, source_dir=source_dir)
        if also is not None:
            also(tmp)
        replace_directory(tmp, out, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_files(model: torch.nn.Module, tmp: Path, *, tokenizer: Any, report: dict | None,
                 source_dir: Path | None) -> None:
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
        write_reports(tmp, report)


def write_reports(directory: Path, report: dict) -> None:
    """graphprune_report.json (what the result is: byte-identical for the same inputs and seed) and
    graphprune_run.json (what this run measured: RUN_REPORT_KEYS)."""
    result = {k: v for k, v in report.items() if k not in RUN_REPORT_KEYS}
    run = {k: report[k] for k in RUN_REPORT_KEYS if k in report}
    (directory / REPORT_FILE).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if run:
        (directory / RUN_FILE).write_text(json.dumps(run, indent=1, sort_keys=True) + "\n")


@contextlib.contextmanager
def _write_errors_as_output_errors(out: Path):
    """A full disk or a file-size limit is the user's environment, not a bug: one line, exit 2."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as error:
        raise OutputError(f"could not write {out}: {error.strerror or error}; nothing was written") from error
    except SafetensorError as error:
        if "I/O error" not in str(error):
            raise
        detail = str(error).split("I/O error:", 1)[1].strip()
        raise OutputError(f"could not write {out}: {detail}; nothing was written") from error


def replace_directory(tmp: Path, out: Path, *, force: bool = False) -> None:
    """Move the finished temporary directory `tmp` to `out` (replacing it only with force)."""
    if out.exists():
        if not force and any(out.iterdir()):
            raise OutputError(f"output directory {out} is not empty; pass --force to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


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
