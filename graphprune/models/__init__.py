"""Finding and loading models: aliases for bundled models, HF directories, GGUF and ONNX files."""

from graphprune.models.aliases import (
    BUNDLED_ALIASES,
    BundledModel,
    PackagedFile,
    cache_root,
    resolve_alias,
    sha256_of_file,
    suggest_alias,
)
from graphprune.models.loading import (
    CAUSAL_LM_MODEL_TYPES,
    LoadedModel,
    check_safetensors_file,
    gguf_cache_dir,
    load_model,
)

__all__ = [
    "BUNDLED_ALIASES",
    "CAUSAL_LM_MODEL_TYPES",
    "BundledModel",
    "LoadedModel",
    "PackagedFile",
    "cache_root",
    "check_safetensors_file",
    "gguf_cache_dir",
    "load_model",
    "resolve_alias",
    "sha256_of_file",
    "suggest_alias",
]
