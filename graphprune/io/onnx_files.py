"""Reading, checking, writing and running ONNX files: what export, ONNX-native pruning and the
benchmark share.

External data is checked before anything reads it: every file an initializer points to must exist
inside the model's directory (an absolute path, ``..`` or a symlink leaving the directory is
refused: a model file must not make us read arbitrary files). Files are written to a temporary
sibling and renamed, so an interrupted run never leaves a half-written model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import ModelLoadError, OutputError, UserError
from ..guards import graph_tensors
from .paths import check_inside

# Opsets the ONNX frontend's translations were written and tested for (torch exports 17..20).
MIN_OPSET = 11
EXTERNAL_DATA_THRESHOLD = 1_500_000_000  # bytes of weights above which a model is saved with external data
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def max_opset() -> int:
    """The newest default-domain opset the installed onnx knows (its shape inference and schemas)."""
    return int(onnx.defs.onnx_opset_version())


def check_opset(proto: onnx.ModelProto, source: str) -> int:
    version = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None:
        raise ModelLoadError(f"{source}: the model imports no default-domain (ai.onnx) opset")
    if version < MIN_OPSET:
        raise ModelLoadError(f"{source}: opset {version} is older than the oldest opset graphprune's ONNX rules "
                             f"support ({MIN_OPSET}); re-export the model with opset >= {MIN_OPSET}")
    if version > max_opset():
        raise ModelLoadError(f"{source}: opset {version} is newer than the installed onnx {onnx.__version__} "
                             f"knows (<= {max_opset()}); upgrade onnx or re-export with an older opset")
    return version


def _external_location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def check_external_data(proto: onnx.ModelProto, model_dir: Path | None, source: str) -> list[Path]:
    """The external data files of `proto`, each checked to exist inside `model_dir`."""
    files: dict[str, Path] = {}
    for tensor in graph_tensors(proto.graph):
        location = _external_location(tensor)
        if location is None:
            continue
        if model_dir is None:
            raise ModelLoadError(f"{source}: initializer '{tensor.name}' keeps its data in an external file "
                                 f"('{location}'), but the model was given without its directory")
        where = f"{source}: tensor '{tensor.name}' stores its data in '{location}'"
        # the one rule for every path read from a file (`io.paths.check_inside`): relative, inside, symlinks resolved
        target = check_inside(model_dir, location, what=f"{source}: tensor '{tensor.name}'", says="stores its data in")
        if not target.is_file():
            raise ModelLoadError(f"{where}: external data file '{location}' is missing (copy it next to the "
                                 f".onnx file)")
        files[location] = target
    return sorted(set(files.values()))


def load_checked(path: str | Path, *, load_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file after checking its opset and external data (see the module docstring)."""
    return load_checked_with_files(path, load_data=load_data)[0]


def load_checked_with_files(path: str | Path, *, load_data: bool = True) -> tuple[onnx.ModelProto, list[Path]]:
    """`load_checked`, plus the external data files the model reads (resolved paths)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError and friends
        raise ModelLoadError(f"{path} is not a readable ONNX model (corrupt or truncated?): "
                             f"{_first_line(exc)}") from exc
    check_opset(proto, str(path))
    files = check_external_data(proto, path.parent, str(path))
    if load_data:
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:  # noqa: BLE001 - short files
            raise ModelLoadError(f"{path}: cannot read its external data: {_first_line(exc)}") from exc
    return proto, files


def weight_bytes(proto: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in proto.graph.initializer if t.data_type not in (0, onnx.TensorProto.STRING))


def save_model(proto: onnx.ModelProto, path: Path) -> Path:
    """Write `proto` to `path` (and `path`_data when the weights are large). The caller chose a
    fresh location (a temporary directory) so nothing here needs to be atomic."""
    path = Path(path)
    if weight_bytes(proto) > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}_data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    return path


def save_model_atomically(proto: onnx.ModelProto, out: Path, *, force: bool = False) -> Path:
    """Write a single .onnx file (plus `<name>_data` when its weights are large): each file is written
    to a temporary name and renamed into place (`io.atomic`), the data file first, so the .onnx that
    names it never exists without it."""
    from .atomic import atomic_file, environment_errors

    out = Path(out).expanduser().resolve()
    if out.exists() and not force:
        raise OutputError(f"output {out} exists; pass --force to replace it")
    with environment_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        if weight_bytes(proto) > EXTERNAL_DATA_THRESHOLD:
            import tempfile

            with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.partial-") as tmp:
                written = save_model(proto, Path(tmp) / out.name)
                data = written.with_name(f"{written.name}_data")
                os.replace(data, out.with_name(data.name))
                os.replace(written, out)
        else:
            atomic_file(out, lambda tmp: onnx.save_model(proto, str(tmp)))
    return out


def prepare_output_file(out: str | Path, *, inputs: list[Path] = (), force: bool = False) -> Path:
    """Check an output .onnx file location before any work (`io.paths.check_output`)."""
    from .paths import check_output

    return check_output(out, inputs=inputs, force=force, kind="onnx")


# ---------------------------------------------------------------------------- onnxruntime
def onnxruntime():
    """The onnxruntime module, or a one-line UserError saying which extra installs it (it is not a core
    dependency: the CPU and the GPU builds cannot be installed side by side)."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise UserError("running an ONNX model needs onnxruntime: pip install 'graphprune[cpu]' (or "
                        "'graphprune[gpu]' for onnxruntime-gpu, never both)") from error
    return ort


def resolve_provider(provider: str, *, allow_fallback: bool = False) -> tuple[str, str | None]:
    """(onnxruntime provider name, note) for `cpu` / `cuda`; a clear error when it is not there."""
    ort = onnxruntime()

    if provider not in PROVIDERS:
        raise UserError(f"unknown --provider '{provider}' (choose from {', '.join(PROVIDERS)})")
    name = PROVIDERS[provider]
    available = ort.get_available_providers()
    if name in available:
        return name, None
    why = (f"onnxruntime {ort.__version__} has no {name} (available: {', '.join(available)}); "
           f"install the GPU build: pip install 'graphprune[gpu]' (onnxruntime-gpu, which replaces onnxruntime: "
           f"pip uninstall onnxruntime first) on a machine with CUDA")
    if not allow_fallback:
        raise UserError(f"provider '{provider}' is not available: {why}; or pass --allow-fallback to run on CPU")
    return PROVIDERS["cpu"], f"provider '{provider}' unavailable, fell back to CPU: {why}"


def session(model: str | Path | bytes, *, provider: str = "CPUExecutionProvider", threads: int | None = None,
            optimize: bool = True, profile_prefix: str | None = None) -> Any:
    ort = onnxruntime()

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    source = str(model) if isinstance(model, (str, Path)) else model
    try:
        return ort.InferenceSession(source, options, providers=[provider])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types
        raise ModelLoadError(f"onnxruntime cannot load the model: {_first_line(exc)}") from exc


def token_feeds(sess, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Feeds for a language model session from token ids: Optimum-style input names."""
    feeds: dict[str, np.ndarray] = {}
    mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = input_ids.astype(np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = mask.astype(np.int64)
        elif i.name in ("token_type_ids", "position_ids"):
            feeds[i.name] = (np.zeros_like(input_ids) if i.name == "token_type_ids" else
                             np.broadcast_to(np.arange(input_ids.shape[1]), input_ids.shape)).astype(np.int64)
        else:
            raise UserError(f"the ONNX model has an input '{i.name}' graphprune cannot fill; it supports "
                            f"input_ids, attention_mask, token_type_ids and position_ids")
    if "input_ids" not in feeds:
        raise UserError("the ONNX model has no 'input_ids' input (expected an Optimum-style language model export)")
    return feeds


def _first_line(error: BaseException) -> str:
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__
