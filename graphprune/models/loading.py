"""Load a model given as an alias, a Hugging Face directory, a .gguf file or an .onnx file.

Every input is validated before a third-party loader sees it, so that a bad input ends in one
ModelLoadError line instead of a traceback from deep inside transformers or onnx. Nothing here
writes to the input; GGUF files are converted once into a cache of plain safetensors.

transformers and onnx are imported inside the functions that need them: importing transformers
alone takes about a second, which the CLI should not pay for `--help` or argument errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import warnings
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from graphprune.errors import GraphpruneWarning, ModelLoadError
from graphprune.guards import check_config_fits_weights, safetensors_elements
from graphprune.models.hub import parse_hub_id, resolve_hub
from graphprune.models.aliases import (
    BUNDLED_ALIASES,
    cache_root,
    resolve_alias,
    sha256_of_file,
    unknown_alias_message,
)

if TYPE_CHECKING:
    import onnx
    from transformers import PretrainedConfig

ModelKind = Literal["causal-lm", "encoder", "onnx"]

# model_type values of decoder-only language models, for configs that do not list architectures
# (GGUF-derived configs, for instance). When architectures are listed they decide instead.
CAUSAL_LM_MODEL_TYPES = frozenset(
    {
        "bloom", "codegen", "cohere", "falcon", "gemma", "gemma2", "gemma3", "gemma3_text", "gpt2",
        "gpt_bigcode", "gpt_neox", "gptj", "granite", "llama", "mistral", "mixtral", "mpt", "olmo",
        "olmo2", "opt", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "smollm3",
        "stablelm", "starcoder2",
    }
)  # fmt: skip

CAUSAL_LM_ARCHITECTURE_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PICKLE_WEIGHTS_TRANSFORMERS_LOADS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# safetensors itself refuses headers above 100 MB; a larger length field means a corrupt file.
_MAX_SAFETENSORS_HEADER_BYTES = 100_000_000
# A conversion that started this long ago and left its temp directory behind was killed.
_STALE_CONVERSION_SECONDS = 3600


@dataclass
class LoadedModel:
    """A loaded model and what came with it.

    `path` is what was loaded: the given directory or file, or the file or directory an alias stands
    for. For a sentence-transformers folder it is the folder's root, so that its other files
    (pooling config, modules.json) can be copied. `hf_dir` is the directory whose Hugging Face files
    were actually read: the Transformer module's folder for sentence-transformers, the conversion
    cache for GGUF, None for ONNX.
    """

    model: torch.nn.Module | None
    tokenizer: Any | None
    onnx_model: onnx.ModelProto | None
    kind: ModelKind
    path: Path
    name: str
    config: PretrainedConfig | None
    hf_dir: Path | None = None
    # Every other file or directory the model was read from (an ONNX model's external data): an
    # output may never be written over any of them.
    extra_inputs: tuple[Path, ...] = ()
    # The floating-point dtype the weights are stored in (most elements), whatever dtype they were
    # loaded in: a pruned output keeps it (bf16 in, bf16 out). None where unknown (pickle weights).
    stored_dtype: torch.dtype | None = None
    # The Hugging Face Hub snapshot it came from (models.hub.HubModel), for a model given as org/name.
    hub: Any = None

    @property
    def inputs(self) -> list[Path]:
        """Everything this model was read from (`path`, `hf_dir`, `extra_inputs`)."""
        return [self.path, *([self.hf_dir] if self.hf_dir is not None else []), *self.extra_inputs]

    @property
    def is_sentence_transformers(self) -> bool:
        """True when `path` is a sentence-transformers folder (it has a modules.json)."""
        return self.path.is_dir() and (self.path / "modules.json").is_file()


def load_model(
    spec: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load `spec`: a model alias, a Hugging Face model directory, a Hub id `org/name[@revision]` (through
    the local Hugging Face cache, see `models.hub`), a .gguf file or an .onnx file.

    A bare name that matches an alias (see `BUNDLED_ALIASES`) is the alias, even if a directory of
    that name exists; write `./name` for the directory. The torch model comes back in eval mode.
    Only safetensors weights are read unless `allow_pickle` is set (then `pytorch_model.bin` is
    read with `torch.load(weights_only=True)`). Raises ModelLoadError with a one-line message for
    anything that cannot be loaded.
    """
    alias = _as_alias(spec)
    hub = None
    if alias is not None:
        path = resolve_alias(alias)
        name = alias
    elif parse_hub_id(spec) is not None:  # org/name[@revision] on the Hugging Face Hub (an existing path wins)
        hub = resolve_hub(str(spec), trust_remote_code=trust_remote_code)
        path, name = hub.path, hub.repo_id
    else:
        path = Path(spec).expanduser()
        _check_exists_and_readable(path, spec)
        name = path.name if path.is_dir() else path.stem

    if path.is_dir():
        loaded = _load_hf_directory(
            path, name=name, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
        )
        return dataclasses.replace(loaded, hub=hub) if hub is not None else loaded
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return _load_gguf(path, name=name, dtype=dtype)
    if suffix == ".onnx":
        return _load_onnx(path, name=name)
    if suffix == ".safetensors" or path.name in ("config.json", *_PICKLE_WEIGHTS_TRANSFORMERS_LOADS):
        raise ModelLoadError(f"{path} is one file of a Hugging Face model: pass the directory {path.parent} instead")
    raise ModelLoadError(
        f"cannot load {path}: expected a Hugging Face model directory, a .gguf file, an .onnx file or an alias"
    )


def gguf_cache_dir(gguf_path: Path) -> Path:
    """Where the safetensors conversion of `gguf_path` is (or will be) cached.

    The name carries the GGUF's content hash, so a changed file never reuses a stale conversion.
    """
    return cache_root() / "models" / f"{gguf_path.stem}-{sha256_of_file(gguf_path)[:12]}"


def _is_bare_name(spec: str | Path) -> bool:
    """True for a string without path separators: an alias, or a directory in the working dir."""
    return isinstance(spec, str) and "/" not in spec and os.sep not in spec


def _as_alias(spec: str | Path) -> str | None:
    """The alias `spec` names, or None when it is meant as a path."""
    if not _is_bare_name(spec):
        return None
    normalized = spec.strip().lower()
    return normalized if normalized in BUNDLED_ALIASES else None


def _check_exists_and_readable(path: Path, spec: str | Path) -> None:
    if not path.exists():
        if _is_bare_name(spec) and not path.suffix:
            raise ModelLoadError(unknown_alias_message(spec, could_be_path=True))
        raise ModelLoadError(f"model path {path} does not exist")
    # A directory must also be searchable (X) for its files to be opened.
    needed = os.R_OK | os.X_OK if path.is_dir() else os.R_OK
    if not os.access(path, needed):
        raise ModelLoadError(f"model path {path} is not readable (permission denied)")


# --- Hugging Face directories -------------------------------------------------------------------


def _load_hf_directory(
    directory: Path, *, name: str, dtype: torch.dtype, allow_pickle: bool, trust_remote_code: bool
) -> LoadedModel:
    model_dir = directory
    if (directory / "modules.json").is_file():
        model_dir = _sentence_transformers_model_dir(directory)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json{_missing_config_hint(model_dir)}")
    read_json(config_path)
    headers = _check_weights(model_dir, allow_pickle=allow_pickle)
    use_safetensors = headers is not None
    config = load_config(model_dir, trust_remote_code=trust_remote_code)
    kind: ModelKind = "causal-lm" if is_causal_lm(config) else "encoder"
    if headers is not None:
        check_config_fits_weights(_model_class(kind), config, safetensors_elements(headers),
                                  described_by=f"config.json in {model_dir}")
    if getattr(config, "graphprune_layer_overrides", None):
        # A graphprune output with per-layer sizes: transformers cannot build it from one config.
        from ..io.hf import load_pruned

        try:
            model = load_pruned(model_dir, dtype=dtype)
        except Exception as error:  # noqa: BLE001
            raise ModelLoadError(f"cannot load the per-layer pruned model in {model_dir}: {_first_line(error)}") from error
        tokenizer = load_tokenizer_if_present(model_dir, trust_remote_code=trust_remote_code)
        return LoadedModel(model=model, tokenizer=tokenizer, onnx_model=None, kind=kind, path=directory, name=name,
                           config=model.config, hf_dir=model_dir, stored_dtype=stored_float_dtype(headers))
    model = _load_weights(
        model_dir,
        config,
        kind=kind,
        dtype=dtype,
        use_safetensors=use_safetensors,
        trust_remote_code=trust_remote_code,
    )
    if headers is not None:
        _check_storage_dtypes(model, headers, model_dir)
    tokenizer = load_tokenizer_if_present(model_dir, trust_remote_code=trust_remote_code)
    return LoadedModel(
        model=model.eval(),
        tokenizer=tokenizer,
        onnx_model=None,
        kind=kind,
        path=directory,
        name=name,
        config=model.config,
        hf_dir=model_dir,
        stored_dtype=stored_float_dtype(headers),
    )


def read_json(path: Path) -> Any:
    """Parsed content of an existing JSON file; ModelLoadError when unreadable or invalid."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except PermissionError as error:
        raise ModelLoadError(f"{path} is not readable (permission denied)") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        detail = f"line {error.lineno} column {error.colno}" if isinstance(error, json.JSONDecodeError) else "not UTF-8"
        raise ModelLoadError(f"{path} is not valid JSON ({detail})") from error


def _missing_config_hint(directory: Path) -> str:
    """Point at a loadable file when the directory holds one instead of a Hugging Face model."""
    try:
        loadable = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in (".gguf", ".onnx"))
    except OSError:
        loadable = []
    if loadable:
        return f" (not a Hugging Face model directory); did you mean {directory / loadable[0]}?"
    return " (not a Hugging Face model directory)"


def _sentence_transformers_model_dir(directory: Path) -> Path:
    """The directory of the Transformer module listed in a sentence-transformers modules.json."""
    from ..io.paths import check_inside

    modules = read_json(directory / "modules.json")
    if isinstance(modules, list):
        for module in modules:
            if isinstance(module, dict) and str(module.get("type", "")).endswith(".Transformer"):
                # "" is the folder itself (all-MiniLM-L6-v2); anything else must stay inside it
                relative = str(module.get("path") or ".")
                check_inside(directory, relative, what=str(directory / "modules.json"))
                return directory / relative
    raise ModelLoadError(f"{directory / 'modules.json'} lists no sentence_transformers Transformer module")


def _check_weights(model_dir: Path, *, allow_pickle: bool) -> list[dict] | None:
    """Validate the weight files; their safetensors headers, or None for an allowed pickle."""
    single_file = model_dir / "model.safetensors"
    index_file = model_dir / "model.safetensors.index.json"
    if single_file.is_file():
        return [check_safetensors_file(single_file)]
    if index_file.is_file():
        return [check_safetensors_file(shard) for shard in shards_listed_in(index_file)]

    pickle_files = sorted(p.name for p in model_dir.iterdir() if p.name.endswith(_PICKLE_SUFFIXES))
    if not pickle_files:
        raise ModelLoadError(f"{model_dir} has no weights (expected model.safetensors or model.safetensors.index.json)")
    if not allow_pickle:
        raise ModelLoadError(
            f"{model_dir} holds only a pickle checkpoint ({', '.join(pickle_files)}); loading pickle can run "
            "arbitrary code, so pass allow_pickle=True (--allow-pickle) only if you trust this file"
        )
    if not any((model_dir / name).is_file() for name in _PICKLE_WEIGHTS_TRANSFORMERS_LOADS):
        raise ModelLoadError(
            f"{model_dir} has pickle files ({', '.join(pickle_files)}) but none named pytorch_model.bin, "
            "the only pickle checkpoint transformers loads"
        )
    return None


def shards_listed_in(index_file: Path) -> list[Path]:
    index = read_json(index_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index_file} has no weight_map")
    from ..io.paths import check_inside

    # every shard must be a file inside the model's directory: an index naming ../../etc/passwd (or an
    # absolute path, or a symlink leading out) would otherwise get that file opened
    names = sorted({str(shard) for shard in weight_map.values()})
    shards = [check_inside(index_file.parent, name, what=str(index_file)) for name in names]
    for name, shard in zip(names, shards):
        if not shard.is_file():
            raise ModelLoadError(f"{index_file} lists shard {name}, which is missing")
    return [index_file.parent / name for name in names]


def check_safetensors_file(path: Path) -> dict:
    """Raise ModelLoadError unless `path` is a complete, well-formed safetensors file; returns its header.

    A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's
    byte range within the data section, then the data. A truncated file still has a valid header,
    so the file size is compared with the end of the last tensor the header declares.
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as file:
            header_length = int.from_bytes(file.read(8), "little")
            if size < 8 or header_length > min(size - 8, _MAX_SAFETENSORS_HEADER_BYTES):
                raise ModelLoadError(
                    f"{path} is corrupt or truncated: its header length field says {header_length} bytes "
                    f"but the file has {size}"
                )
            header = json.loads(file.read(header_length))
            data_end = int(
                max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
            )
    except PermissionError as error:
        raise ModelLoadError(f"{path} is not readable (permission denied)") from error
    except (ValueError, AttributeError, KeyError, TypeError, IndexError) as error:
        # ValueError covers undecodable bytes and invalid JSON; the others a header of the wrong shape.
        raise ModelLoadError(f"{path} is corrupt: its header is not a valid safetensors header") from error

    expected_size = 8 + header_length + data_end
    if size != expected_size:
        problem = "truncated" if size < expected_size else "corrupt (trailing bytes)"
        raise ModelLoadError(f"{path} is {problem}: its header declares {expected_size} bytes but the file has {size}")

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as opened:
            opened.keys()
    except Exception as error:  # safetensors raises its own SafetensorError and plain OSErrors
        raise ModelLoadError(f"{path} is not a valid safetensors file: {_first_line(error)}") from error
    return header


def load_config(model_dir: Path, *, trust_remote_code: bool) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as error:  # unknown model_type, remote code refused, bad field values, ...
        if "trust_remote_code" in str(error) and not trust_remote_code:
            raise ModelLoadError(f"the model config in {model_dir} needs the model's own Python code (auto_map), "
                                 "which is not run unless you pass --trust-remote-code") from error
        raise ModelLoadError(f"cannot read the model config in {model_dir}: {_first_line(error)}") from error


def is_causal_lm(config: PretrainedConfig) -> bool:
    # Listed architectures win: a bare `LlamaModel` checkpoint has no lm_head to load.
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(arch.endswith(CAUSAL_LM_ARCHITECTURE_SUFFIXES) for arch in architectures)
    return config.model_type in CAUSAL_LM_MODEL_TYPES


def _load_weights(
    model_dir: Path,
    config: PretrainedConfig,
    *,
    kind: ModelKind,
    dtype: torch.dtype,
    use_safetensors: bool,
    trust_remote_code: bool,
) -> torch.nn.Module:
    model_class = _model_class(kind)
    try:
        # ignore_mismatched_sizes=True makes transformers report shape mismatches in the loading
        # info (checked below) instead of raising a RuntimeError that points at a logged report.
        # That multi-line report table is silenced: the checks below say the same in one line.
        with _transformers_errors_only():
            model, loading_info = model_class.from_pretrained(
                model_dir,
                config=config,
                dtype=dtype,
                use_safetensors=use_safetensors,
                trust_remote_code=trust_remote_code,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
            )
    except Exception as error:
        if "Weights only load failed" in str(error):  # torch.load(weights_only=True) met a non-tensor object
            blocked = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), "")
            raise ModelLoadError(f"the pickle checkpoint in {model_dir} holds more than tensors and is refused even "
                                 f"with --allow-pickle, which only reads tensors ({blocked})") from error
        raise ModelLoadError(f"transformers could not load {model_dir}: {_first_line(error)}") from error

    mismatched = sorted(loading_info.get("mismatched_keys") or [])
    if mismatched:
        key, weights_shape, config_shape = mismatched[0]
        raise ModelLoadError(
            f"config.json in {model_dir} does not match its weights: {len(mismatched)} tensors differ in shape, "
            f"e.g. {key} is {tuple(weights_shape)} in the weights but {tuple(config_shape)} per the config"
        )
    # transformers fills missing tensors with random values and only logs it; a pruner working on
    # random weights would be silently wrong. Encoder checkpoints often omit the unused pooler.
    missing = sorted(
        key for key in loading_info.get("missing_keys") or [] if not (kind == "encoder" and key.startswith("pooler."))
    )
    if missing:
        raise ModelLoadError(
            f"config.json in {model_dir} does not match its weights: {len(missing)} tensors are missing "
            f"from the weights, e.g. {missing[0]}"
        )
    # ... and drops tensors the config's model has no place for (a config with fewer layers than the
    # checkpoint, a stray tensor): the pruned model would be silently truncated. transformers already
    # leaves out what a family declares ignorable (old rotary inv_freq buffers, position_ids, a tied
    # lm_head.weight). A task head the loaded class does not have (BERT's `cls.*` pretraining head when
    # the encoder is loaded as BertModel) is a whole module outside the model: it is left out with a
    # warning; anything inside the model's own modules is refused.
    unexpected = sorted(loading_info.get("unexpected_keys") or [])
    heads = _outside_the_model(model, unexpected)
    if heads:
        warnings.warn(f"{model_dir}: {len(heads)} tensor(s) of a head {type(model).__name__} does not have were "
                      f"left out ({', '.join(sorted({k.split('.')[0] for k in heads}))}.*)", GraphpruneWarning,
                      stacklevel=2)
        unexpected = [k for k in unexpected if k not in heads]
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (", ..." if len(unexpected) > 3 else "")
        raise ModelLoadError(
            f"config.json in {model_dir} does not match its weights: {len(unexpected)} tensor(s) in the weights "
            f"are not part of the model it describes ({shown}); they would be dropped, so the model is refused"
        )
    return model


def _outside_the_model(model: torch.nn.Module, keys: list[str]) -> list[str]:
    """The keys whose top-level module the model has no trace of (neither as a child nor under its
    base-model prefix): a task head of another class, not a part of this model."""
    children = {name for name, _ in model.named_children()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    inner = {name for name, _ in base.named_children()} if isinstance(base, torch.nn.Module) else set()

    def outside(key: str) -> bool:
        first = key.split(".")[0]
        # under the base model (or any module the model has) a key is the model's own: never a head
        return first != prefix and first not in children and first not in inner

    return [k for k in keys if outside(k)]


SAFETENSORS_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_float_dtype(headers: list[dict] | None) -> torch.dtype | None:
    """The floating-point dtype most of the elements of safetensors `headers` are stored in."""
    counts: dict[str, int] = {}
    for header in headers or []:
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_FLOAT_DTYPES:
                counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + math.prod(entry.get("shape") or [1])
    return SAFETENSORS_FLOAT_DTYPES[max(counts, key=counts.get)] if counts else None


def _check_storage_dtypes(model: torch.nn.Module, headers: list[dict], model_dir: Path) -> None:
    """Refuse a checkpoint that stores an integer or boolean tensor where the model holds a floating
    one (or the reverse): transformers casts it to the model's dtype without a word, and the cast
    values (a quantized checkpoint's int8 codes, a mask) would then be scored and pruned as weights.
    Integer tensors the model itself declares as integers keep their dtype."""
    state = model.state_dict()
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    for header in headers:
        for name, entry in header.items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            tensor = state.get(name)
            if tensor is None and name.startswith(prefix):
                tensor = state.get(name[len(prefix):])
            if tensor is None:  # a name the family renames on load, or one transformers ignores
                continue
            stored = str(entry.get("dtype", ""))
            stored_floating = stored.startswith(("F", "BF"))
            if stored_floating != tensor.is_floating_point():
                what = ("integer or boolean tensors (a quantized checkpoint?) would be cast to floating point and "
                        "pruned as weights" if not stored_floating else "floating-point values would be cast to "
                        "integers")
                raise ModelLoadError(f"the weights in {model_dir} store {name} as {stored}, but "
                                     f"{type(model).__name__} holds it as {str(tensor.dtype).replace('torch.', '')}: "
                                     f"{what}; refusing to load it")


def _model_class(kind: ModelKind):
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if kind == "causal-lm" else AutoModel


@contextlib.contextmanager
def _transformers_errors_only() -> Iterator[None]:
    """Raise transformers' log level to ERROR for the duration of the block."""
    from transformers.utils import logging as transformers_logging

    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(previous)


def load_tokenizer_if_present(directory: Path, *, trust_remote_code: bool = False) -> Any | None:
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise ModelLoadError(f"cannot load the tokenizer in {directory}: {_first_line(error)}") from error


# --- GGUF ---------------------------------------------------------------------------------------


def _load_gguf(gguf_path: Path, *, name: str, dtype: torch.dtype) -> LoadedModel:
    _check_gguf_magic(gguf_path)
    cache_dir = gguf_cache_dir(gguf_path)
    if not cache_dir.is_dir():
        _convert_gguf(gguf_path, cache_dir)
    try:
        loaded = _load_hf_directory(cache_dir, name=name, dtype=dtype, allow_pickle=False, trust_remote_code=False)
    except ModelLoadError as error:
        raise ModelLoadError(
            f"the cached conversion of {gguf_path.name} is damaged ({error}); delete {cache_dir} and retry"
        ) from error
    return dataclasses.replace(loaded, path=gguf_path)


def _check_gguf_magic(gguf_path: Path) -> None:
    try:
        with gguf_path.open("rb") as file:
            magic = file.read(4)
    except PermissionError as error:
        raise ModelLoadError(f"{gguf_path} is not readable (permission denied)") from error
    if magic != b"GGUF":
        raise ModelLoadError(f"{gguf_path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def _convert_gguf(gguf_path: Path, cache_dir: Path) -> None:
    """Dequantize `gguf_path` to fp32 safetensors (+ tokenizer) in `cache_dir`, atomically.

    transformers dequantizes and converts the tokenizer on every GGUF load (about 20 s for
    SmolLM2-135M); reading the converted directory takes about a second.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_conversions(cache_dir)
        # Build in a temp sibling, then rename: a killed conversion never leaves a half-written cache.
        temp_dir = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    except OSError as error:
        raise ModelLoadError(f"cannot write the converted model into the cache {cache_dir.parent}: "
                             f"{error.strerror or error}; set GRAPHPRUNE_CACHE to a writable directory") from error
    try:
        try:
            source = {"pretrained_model_name_or_path": gguf_path.parent, "gguf_file": gguf_path.name}
            config = AutoConfig.from_pretrained(**source)
            model_class = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
            check_config_fits_weights(model_class, config, _gguf_elements(gguf_path),
                                      described_by=f"the metadata of {gguf_path}")
            model = model_class.from_pretrained(**source, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(**source)
        except ModelLoadError:
            raise
        except Exception as error:  # truncated file, unsupported architecture, bad metadata, ...
            raise ModelLoadError(
                f"cannot load GGUF file {gguf_path} (corrupt, truncated or unsupported): {_first_line(error)}"
            ) from error
        # Without this the saved config.json still says "quant_method: gguf" and reloading it
        # would look for a GGUF file again.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(temp_dir)
        tokenizer.save_pretrained(temp_dir)
        del model
        try:
            os.rename(temp_dir, cache_dir)
        except OSError:
            if not cache_dir.is_dir():
                raise
            # Another process finished the same conversion first; its result is the same.
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _gguf_elements(gguf_path: Path) -> int:
    """Total elements of the tensors a GGUF file declares (read from its header, memory-mapped)."""
    import gguf

    return sum(int(tensor.n_elements) for tensor in gguf.GGUFReader(str(gguf_path)).tensors)


def _remove_stale_conversions(cache_dir: Path) -> None:
    """Delete temp directories that killed conversions of the same file left behind."""
    now = time.time()
    for leftover in cache_dir.parent.glob(f".{cache_dir.name}.tmp-*"):
        try:
            if now - leftover.stat().st_mtime > _STALE_CONVERSION_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass  # removed meanwhile by another process


# --- ONNX ---------------------------------------------------------------------------------------


def _load_onnx(onnx_path: Path, *, name: str) -> LoadedModel:
    import onnx

    from ..io.onnx_files import load_checked_with_files

    # opset within the rules' range; external data present and inside the model's directory
    onnx_model, data_files = load_checked_with_files(onnx_path)
    try:
        # The path form also works for models over 2 GB with external data.
        onnx.checker.check_model(str(onnx_path))
    except Exception as error:
        raise ModelLoadError(f"{onnx_path} is not a valid ONNX model: {_first_line(error)}") from error
    return LoadedModel(
        model=None,
        tokenizer=load_tokenizer_if_present(onnx_path.parent),
        onnx_model=onnx_model,
        kind="onnx",
        path=onnx_path,
        name=name,
        config=None,
        hf_dir=None,
        extra_inputs=tuple(data_files),
    )


def _first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, for one-line user errors; with the next
    line when the first only announces it (ends with a colon)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]
