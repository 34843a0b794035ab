"""The recipe of a compress run (`graphprune_recipe.yaml` in every output) and its replay.

A recipe holds every `CompressOptions` field as the run resolved it (`options`), where the model came
from (`source`: the spec that loads the same files again, e.g. `org/name@<commit>`, plus a content
hash), what the driver resolved once the model was open (`run`: the criterion, compensation,
allocation and target actually used), and the versions of the packages that made the output.
`graphprune compress --config RECIPE` reads it back (`options_from_recipe`) and runs the same
compression: the same source, options and seed give byte-identical model files. Flags given next to
--config override the recipe's values. Options that only say how or where a run behaves (the output
path, progress, force, resume, the cache) are not part of it: the recipe, like the model files, is the
same wherever and however the same model was made (a resumed run, another --out). `command` is the
equivalent command line, derived from the options.
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from typing import Any

from ..errors import UserError
from .options import CompressOptions

RECIPE_VERSION = 1
# Not in a recipe: how or where a run behaves, not what it computes.
RUNTIME_ONLY = ("out", "progress", "force", "resume", "release_input", "use_cache")
# Options without a command-line flag (Python only), and those derived from the others.
NO_FLAG = ("floor", "batch_size", "pair_batch", "text_column", "backend", "example_inputs")
DERIVED = ("units_stage",)
PACKAGES = ("graphprune", "torch", "transformers", "tokenizers", "safetensors", "numpy", "huggingface_hub", "onnx",
            "onnxruntime", "onnxruntime-gpu", "sentence-transformers", "lm_eval")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape an output (those installed), and Python's."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _spec(value: Any) -> Any:
    """A calibration spec as the recipe keeps it: an existing file by its absolute path (a replay from
    another directory reads the same file); Python data by its kind and content hash."""
    from ..calibration.data import CalibrationData

    if isinstance(value, CalibrationData):
        return value.recipe_entry()
    if isinstance(value, Path) or (isinstance(value, str) and value not in ("default", "none")
                                   and not value.startswith("hf:")):
        path = Path(value).expanduser()
        return str(path.resolve()) if path.exists() else str(value)
    return value


def _plain(name: str, value: Any) -> Any:
    if name == "example_inputs" and value is not None:  # tensors: the recipe keeps what they were, not their values
        return describe_inputs(value)
    if name in ("calib", "calib_general"):
        return [_spec(v) for v in value] if isinstance(value, (list, tuple)) else _spec(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(k, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(name, v) for v in value]
    return value


def describe_inputs(value: Any) -> Any:
    """Shape and dtype of each example input (a tuple or a dict of tensors)."""
    def one(t):
        return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"

    if isinstance(value, dict):
        return {str(k): one(v) for k, v in value.items()}
    return [one(v) for v in value]


def command_of(model: str | None, options: dict[str, Any]) -> str:
    """The `graphprune compress` command line that asks for `options` (a recipe's), with the options at
    their defaults left out; options that have no flag are named in a trailing comment."""
    import shlex

    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(CompressOptions)}
    words = ["graphprune", "compress", shlex.quote(model) if model else "MODEL"]
    python_only = []
    for name, value in options.items():
        if name in RUNTIME_ONLY or name in DERIVED or value == defaults.get(name):
            continue
        if name in NO_FLAG:
            python_only.append(f"{name}={value!r}")
            continue
        flag = "--" + name.replace("_", "-")
        if name == "criterion_options":
            words += [f"--option {shlex.quote(f'{k}={v}')}" for k, v in value.items()]
        elif name == "stream":
            words.append("--stream" if value else "--no-stream")
        elif isinstance(value, bool):
            words.append(flag)
        elif isinstance(value, list):
            words += [f"{flag} {shlex.quote(str(v))}" for v in value]
        elif isinstance(value, dict):  # calibration data given from Python
            words.append(f"{flag} DATA")
            python_only.append(f"{name}=<{value.get('python')} data, sha256 {str(value.get('sha256'))[:12]}>")
        else:
            words.append(f"{flag} {shlex.quote(str(value))}")
    words.append("--out DIR")
    return " ".join(words) + (f"  # from Python: {', '.join(python_only)}" if python_only else "")


def build_recipe(options: CompressOptions, source: dict[str, Any], report: dict[str, Any], *,
                 backend: str) -> dict[str, Any]:
    """The recipe of a finished run (before its output is written)."""
    layerwise = report.get("layerwise") or {}
    run: dict[str, Any] = {
        "backend": backend,
        "criterion": report.get("criterion"),
        "criterion_options": report.get("criterion_options"),
        "compensate": report.get("compensate"),
        "sequential": bool(layerwise.get("sequential", False)) if isinstance(layerwise, dict) else False,
        "allocation": report.get("allocation"),
        "target": report.get("target"),
        "requested_sparsity": report.get("requested_sparsity"),
        "seed": report.get("seed"),
        "calibration_sha256": (report.get("calibration") or {}).get("sha256")
        if isinstance(report.get("calibration"), dict) else None,
    }
    if report.get("experts"):
        e = report["experts"]
        run["experts"] = {"criterion": e.get("criterion"), "allocation": e.get("allocation"),
                          "requested_sparsity": e.get("requested_sparsity")}
    recorded = {f.name: _plain(f.name, getattr(options, f.name)) for f in dataclasses.fields(options)
                if f.name not in RUNTIME_ONLY}
    return {
        "graphprune_recipe": RECIPE_VERSION,
        "source": source,
        "command": command_of(source.get("model"), recorded),
        "options": recorded,
        "run": run,
        "packages": package_versions(),
    }


def options_from_recipe(recipe: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(the model spec, CompressOptions keyword arguments) of a recipe read from `where`; a one-line
    UserError for anything that is not a graphprune recipe this version can replay."""
    if not isinstance(recipe, dict) or "graphprune_recipe" not in recipe:
        raise UserError(f"{where} is not a graphprune recipe (no graphprune_recipe key)")
    version = recipe["graphprune_recipe"]
    if version != RECIPE_VERSION:
        raise UserError(f"{where} is a version {version} recipe; this graphprune reads version {RECIPE_VERSION}")
    source, options = recipe.get("source"), recipe.get("options")
    if not isinstance(source, dict) or not isinstance(options, dict):
        raise UserError(f"{where} lacks its source or options section")
    model = source.get("model")
    if not isinstance(model, str) or not model:
        raise UserError(f"{where} was made from an in-memory {source.get('class', 'model')}, which a recipe cannot "
                        f"load again: give the model on the command line next to --config")
    known = {f.name for f in dataclasses.fields(CompressOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"{where} has option(s) this graphprune does not know: {', '.join(unknown)}")
    return model, {k: v for k, v in options.items() if k not in RUNTIME_ONLY}


def python_calibration(options: dict[str, Any]) -> str | None:
    """The option that holds calibration data given from Python (which a recipe cannot carry), if any."""
    for name in ("calib", "calib_general"):
        value = options.get(name)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, dict) for v in values):
            return name
    return None
