"""Write a pruned model as an HF directory (safetensors), atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import OutputError
from ..guards import OUTPUT_FILES_SLACK_BYTES, model_bytes, require_free_space
from .atomic import atomic_directory

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
    with atomic_directory(out, force=force) as tmp:
        _write_files(model, tmp, tokenizer=tokenizer, report=report, source_dir=source_dir)
        if also is not None:
            also(tmp)
    return out


def _write_files(model: torch.nn.Module, tmp: Path, *, tokenizer: Any, report: dict | None,
                 source_dir: Path | None) -> None:
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if source_dir is not None:
        copy_sentence_transformers_modules(source_dir, tmp)
    if report is not None:
        write_reports(tmp, report)


def copy_sentence_transformers_modules(source_dir: Path, tmp: Path) -> None:
    """The sentence-transformers files of `source_dir` into the output `tmp`, whose root holds the pruned
    Transformer: the root config files, and every module folder `modules.json` lists (Pooling, Dense,
    Normalize, ...), each checked to stay inside the source. A Transformer module kept in a subfolder
    (`0_Transformer`) moves to the root with its sentence_bert_config.json, and modules.json says so."""
    from .paths import check_inside

    for name in SENTENCE_TRANSFORMERS_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, tmp / name)
    modules_file = source_dir / "modules.json"
    if not modules_file.is_file():
        return
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise OutputError(f"cannot read {modules_file}: {error}") from error
    if not isinstance(modules, list):
        return
    moved = False
    for module in modules:
        if not isinstance(module, dict):
            continue
        relative = str(module.get("path") or "")
        if relative in ("", "."):
            continue
        folder = check_inside(source_dir, relative, what=str(modules_file))
        if str(module.get("type", "")).endswith(".Transformer"):  # the pruned model is saved at the root
            for name in ("sentence_bert_config.json", "config_sentence_transformers.json"):
                if (folder / name).is_file() and not (tmp / name).exists():
                    shutil.copy2(folder / name, tmp / name)
            module["path"] = ""
            moved = True
        elif folder.is_dir():
            # (links are followed: a Hub cache snapshot's files are symlinks into its blobs)
            shutil.copytree(folder, tmp / relative, dirs_exist_ok=True)
    if moved:
        (tmp / "modules.json").write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")


# Keys of the report that are written to their own file, not graphprune_report.json.
OWN_FILE_KEYS = ("recipe",)


def write_reports(directory: Path, report: dict) -> None:
    """graphprune_report.json (what the result is: byte-identical for the same inputs and seed),
    graphprune_run.json (what this run measured: RUN_REPORT_KEYS), graphprune_recipe.yaml (how to
    make it again: the report's recipe) and the model card README.md (with kept_units.png). Every
    writer of an output folder calls this (save_pruned, the streamed writer)."""
    from .card import write_card
    from .recipe import RECIPE_FILE, write_recipe

    directory = Path(directory)
    result = {k: v for k, v in report.items() if k not in RUN_REPORT_KEYS and k not in OWN_FILE_KEYS}
    run = {k: report[k] for k in RUN_REPORT_KEYS if k in report}
    (directory / REPORT_FILE).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if run:
        (directory / RUN_FILE).write_text(json.dumps(run, indent=1, sort_keys=True) + "\n")
    recipe = report.get("recipe")
    if recipe:
        write_recipe(directory / RECIPE_FILE, recipe)
    write_card(directory, result, recipe)


def update_run_file(directory: str | Path, report: dict) -> None:
    """Rewrite graphprune_run.json of a finished output folder (the run's final timings include the
    write, which ends after the folder was complete)."""
    from .atomic import write_text

    path = Path(directory) / RUN_FILE
    if not path.is_file():
        return
    run = {k: report[k] for k in RUN_REPORT_KEYS if k in report}
    write_text(path, json.dumps(run, indent=1, sort_keys=True) + "\n")


def record_evaluation(directory: str | Path, rows: list[dict]) -> bool:
    """Add evaluation results to a graphprune output folder: its report's `evaluation` list (a row
    with the same kind, data or task, metric and settings is replaced) and its model card. False
    (nothing written) when the folder is not a writable graphprune output, or a Hub cache snapshot."""
    from .atomic import write_text
    from .card import write_card

    directory = Path(directory)
    report_path = directory / REPORT_FILE
    if not report_path.is_file() or directory.parent.name == "snapshots" or not os.access(directory, os.W_OK):
        return False
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(report, dict):
        return False

    def key(row: dict) -> tuple:
        return (row.get("kind"), row.get("data") or row.get("task"), row.get("metric"), row.get("settings"))

    new = {key(row) for row in rows}
    kept = [row for row in report.get("evaluation") or [] if isinstance(row, dict) and key(row) not in new]
    report["evaluation"] = kept + list(rows)
    write_text(report_path, json.dumps(report, indent=1, sort_keys=True) + "\n")
    write_card(directory, report, _read_recipe(directory))
    return True


def _read_recipe(directory: Path) -> dict | None:
    from .recipe import RECIPE_FILE

    if not (directory / RECIPE_FILE).is_file():
        return None
    import yaml

    try:
        recipe = yaml.safe_load((directory / RECIPE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return recipe if isinstance(recipe, dict) else None


def refresh_card(directory: str | Path, *, repo_id: str | None = None) -> bool:
    """Rewrite the model card of an output folder from its report and recipe (e.g. to load from
    `repo_id`); False when the folder has no graphprune report."""
    from .card import write_card

    directory = Path(directory)
    try:
        report = json.loads((directory / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    write_card(directory, report, _read_recipe(directory), repo_id=repo_id)
    return True


def load_pruned(path: str | Path, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a graphprune output, including per-layer (heterogeneous) shapes that plain
    `from_pretrained` cannot build: transformers' `from_pretrained` runs on a subclass of the
    architecture that builds each layer from the config's `graphprune_layer_overrides`, so the
    family's checkpoint conversions apply; every tensor must match (none missing or left over)."""
    from transformers import AutoConfig
    import transformers

    from ..models.hub import parse_hub_id, resolve_hub
    from ..passes.config import per_layer_class

    if parse_hub_id(path) is not None:  # org/name[@revision]: its snapshot in the local HF cache
        path = resolve_hub(str(path)).path
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


# --- plain nn.Modules (no Hugging Face config) ----------------------------------------------------
MODULE_WEIGHTS, MODULE_PROGRAM = "model.safetensors", "model.pt2"
_SIZES_KEY = "graphprune_module_sizes"  # safetensors metadata: module name -> size attributes


def save_module(model: torch.nn.Module, out: str | Path, *, example_inputs, report: dict | None = None,
                force: bool = False) -> Path:
    """A pruned plain nn.Module into `out`, atomically: `model.safetensors` (its state dict, with the size
    attributes of its modules in the metadata, so `load_module` can resize a fresh module of the class),
    `model.pt2` (`torch.export.save` of the pruned module: `torch.export.load(...).module()` runs it
    without its class) and the reports. A module torch.export cannot export (traced by the FX
    fallback) gets no model.pt2, and its report says so."""
    import safetensors.torch

    from ..passes.modules import module_size_attributes
    from .paths import check_output

    out = check_output(out, force=force)
    require_free_space(out.parent, 2 * model_bytes(model) + OUTPUT_FILES_SLACK_BYTES,
                       what=f"the pruned module to {out}")
    args, kwargs = (((), dict(example_inputs)) if isinstance(example_inputs, dict) else (tuple(example_inputs), {}))
    with atomic_directory(out, force=force) as tmp:
        # save_model, not save_file: tied parameters share storage, which save_file refuses
        safetensors.torch.save_model(model, str(tmp / MODULE_WEIGHTS),
                                     metadata={_SIZES_KEY: json.dumps(module_size_attributes(model), sort_keys=True)})
        files = [MODULE_WEIGHTS]
        try:
            with torch.no_grad():
                program = torch.export.export(model, args, kwargs, strict=False)
            torch.export.save(program, str(tmp / MODULE_PROGRAM))
            files.append(MODULE_PROGRAM)
            why = None
        except Exception as error:  # noqa: BLE001 - the weights are still usable with the class
            why = f"torch.export could not export the pruned module ({type(error).__name__}); no {MODULE_PROGRAM}"
        if report is not None:
            report["module"] = {
                "class": f"{type(model).__module__}.{type(model).__qualname__}", "files": files,
                "example_inputs": [f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"
                                   for t in (kwargs.values() if kwargs else args)],
                "reload": (f"graphprune.load_module({type(model).__name__}(...), DIR) resizes a freshly built module "
                           f"to the pruned shapes and loads {MODULE_WEIGHTS}"
                           + (f"; torch.export.load('DIR/{MODULE_PROGRAM}').module() runs it without the class"
                              if MODULE_PROGRAM in files else "")),
                **({"note": why} if why else {}),
            }
            write_reports(tmp, report)
    return out


def load_module(module: torch.nn.Module, source: str | Path | dict) -> torch.nn.Module:
    """Load a pruned plain module's weights into `module`, a freshly built module of the class that was
    pruned (its dense shapes): every tensor takes its pruned shape and every Conv/Linear/norm its size
    attributes, then `load_state_dict(strict=True)`. `source`: a graphprune output folder, its
    model.safetensors, or a state dict (`torch.load` of `state_dict()`; sizes then come from the shapes)."""
    from ..passes.modules import resize_to

    sizes = None
    if isinstance(source, dict):
        tensors = dict(source)
    else:
        import safetensors
        from safetensors.torch import load_file

        path = Path(source)
        path = path / MODULE_WEIGHTS if path.is_dir() else path
        if not path.is_file():
            raise OutputError(f"{path} does not exist: expected a graphprune output folder or its {MODULE_WEIGHTS}")
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        sizes = json.loads(metadata[_SIZES_KEY]) if _SIZES_KEY in metadata else None
        tensors = load_file(str(path))
        # save_model kept one name of each tied parameter: give the others back
        by_id: dict[int, list[str]] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(param), []).append(name)
        for names in by_id.values():
            stored = next((n for n in names if n in tensors), None)
            for name in names if stored is not None else ():
                tensors.setdefault(name, tensors[stored])
    try:
        return resize_to(module, tensors, sizes).eval()
    except RuntimeError as error:
        raise OutputError(f"the pruned weights do not fit {type(module).__name__}: "
                          f"{str(error).strip().splitlines()[0]}") from error
