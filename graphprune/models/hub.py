"""Models on the Hugging Face Hub (`org/name[@revision]`) and where a model came from.

A Hub id is resolved through `huggingface_hub.snapshot_download` into the local Hugging Face cache
(`$HF_HUB_CACHE`, `~/.cache/huggingface/hub`), downloading only the safetensors weights, configs and
tokenizer files (`ALLOW_PATTERNS`). With `HF_HUB_OFFLINE=1` nothing is downloaded: a snapshot that is
already cached is used, and one that is not is refused in one line. A path that exists always wins
over a Hub id of the same spelling (write `./org/name` to be explicit).

`describe_source` says where a model came from for the recipe: the Hub repository and the commit it
resolved to, the alias, or the path, with a content hash of the files that make up the model.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphprune.errors import ModelLoadError, UserError

# owner/name with an optional @revision (a branch, a tag or a commit hash)
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[A-Za-z0-9][\w./-]*))?$")
# A spelling that names a file of a model is a path, never a Hub repository.
_FILE_SUFFIXES = (".onnx", ".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".jsonl", ".tsv")
# What a snapshot brings: weights (safetensors only), configs (the model's, the tokenizer's, the
# sentence-transformers modules'), tokenizer vocabularies. Never pickles, never ONNX or GGUF copies.
ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.tiktoken", "*.jinja")
REMOTE_CODE_PATTERNS = ("*.py",)
# Files of a graphprune output that describe or measure it rather than make up the model.
_NOT_CONTENT = ("README.md", "graphprune_run.json", "graphprune_report.json", "graphprune_recipe.yaml",
                "kept_units.png", "graphprune_onnx.json")


@dataclass(frozen=True)
class HubModel:
    """A resolved Hub model: the snapshot directory in the local cache and the commit it holds."""

    repo_id: str
    revision: str | None  # as asked (None: the default branch)
    commit: str
    path: Path

    @property
    def spec(self) -> str:
        """The id pinned to the commit: loading it again gives the same files."""
        return f"{self.repo_id}@{self.commit}"


def parse_hub_id(spec: Any) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `spec` is meant as a Hub id, else None.

    Only a string of the form `owner/name[@revision]` that is not an existing path and does not
    end like a model file is a Hub id."""
    if not isinstance(spec, str):
        return None
    text = spec.strip()
    match = _HUB_ID.match(text)
    if match is None or text.startswith((".", "~")):
        return None
    if Path(text).expanduser().exists() or Path(match["repo"]).expanduser().exists():
        return None
    if match["repo"].lower().endswith(_FILE_SUFFIXES):
        return None
    return match["repo"], match["rev"]


def is_hub_id(spec: Any) -> bool:
    return parse_hub_id(spec) is not None


def offline() -> bool:
    """Whether Hub downloads are forbidden (HF_HUB_OFFLINE, or TRANSFORMERS_OFFLINE like transformers)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False


def hub_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover
        return "~/.cache/huggingface/hub"


def resolve_hub(spec: str, *, trust_remote_code: bool = False, progress: bool = True) -> HubModel:
    """Download (or find in the cache) the snapshot of Hub id `spec`; a one-line ModelLoadError when it
    cannot be had."""
    parsed = parse_hub_id(spec)
    if parsed is None:
        raise ModelLoadError(f"'{spec}' is not a Hugging Face Hub id (owner/name[@revision])")
    repo, revision = parsed
    try:
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import snapshot_download
    except ImportError as error:  # pragma: no cover - transformers depends on huggingface_hub
        raise ModelLoadError(f"{spec} names a Hub model, which needs huggingface_hub (pip install huggingface_hub)") \
            from error
    patterns = list(ALLOW_PATTERNS) + (list(REMOTE_CODE_PATTERNS) if trust_remote_code else [])
    no_network = offline()
    from ..progress import show_progress

    if not show_progress(progress):  # -q, or progress=False
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        path = snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=no_network)
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled) as error:
        if no_network:
            raise ModelLoadError(f"{spec} is not in the local Hugging Face cache ({hub_cache_dir()}) and HF_HUB_OFFLINE=1 "
                                 f"forbids downloading it: download it once with network access, or give a local "
                                 f"path") from error
        raise ModelLoadError(f"cannot download {spec} from the Hugging Face Hub (no connection?): "
                             f"{_first_line(error)}") from error
    except hub_errors.GatedRepoError as error:
        raise ModelLoadError(f"{repo} is a gated repository: accept its terms on the Hub and log in "
                             f"(`hf auth login`) first") from error
    except hub_errors.RepositoryNotFoundError as error:
        raise ModelLoadError(f"'{spec}' is neither an existing path nor a model repository on the Hugging Face Hub "
                             f"(a private one needs `hf auth login`)") from error
    except hub_errors.RevisionNotFoundError as error:
        raise ModelLoadError(f"{repo} has no revision '{revision}'") from error
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as error:
        raise ModelLoadError(f"cannot get {spec} from the Hugging Face Hub: {_first_line(error)}") from error
    snapshot = Path(path)
    if not any(snapshot.iterdir()):
        raise ModelLoadError(f"{spec} has no safetensors weights, configs or tokenizer files on the Hub")
    return HubModel(repo, revision, snapshot.name, snapshot)


def require_online(what: str) -> None:
    """A one-line UserError when HF_HUB_OFFLINE forbids reaching the Hub for `what`."""
    if offline():
        raise UserError(f"{what} needs the Hugging Face Hub, and HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) forbids "
                        f"network access: unset it, or upload the folder later with `hf upload`")


# ------------------------------------------------------------------ where a model came from
def content_sha256(path: str | Path) -> str:
    """sha256 over the files that make up the model at `path` (a file, or a directory: every regular
    file by relative name, hidden ones and graphprune's reports excluded). A file in a Hub cache
    snapshot whose blob is named by its sha256 (large files stored with LFS) is not read again."""
    from .aliases import sha256_of_file

    path = Path(path)
    if path.is_file():
        return sha256_of_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts) or relative.as_posix() in _NOT_CONTENT:
            continue
        blob = file.resolve().name if file.is_symlink() else ""
        file_digest = blob if re.fullmatch(r"[0-9a-f]{64}", blob) else sha256_of_file(file)
        digest.update(f"{relative.as_posix()}\0{file_digest}\n".encode())
    return digest.hexdigest()


def describe_source(source: Any, *, hub: HubModel | None = None) -> dict[str, Any]:
    """What the recipe says about where the model came from: `model` is the spec that loads the same
    files again (None for an in-memory object, which cannot be replayed from a recipe)."""
    from .aliases import BUNDLED_ALIASES, resolve_alias

    if hub is not None:
        return {"kind": "hub", "model": hub.spec, "repo_id": hub.repo_id, "revision": hub.revision or "main",
                "commit": hub.commit, "sha256": content_sha256(hub.path)}
    if isinstance(source, (str, Path)):
        text = str(source)
        if isinstance(source, str) and "/" not in text and text.strip().lower() in BUNDLED_ALIASES:
            alias = text.strip().lower()
            path = resolve_alias(alias)
            return {"kind": "alias", "model": alias, "hub_id": BUNDLED_ALIASES[alias].hub_id,
                    "sha256": content_sha256(path)}
        path = Path(text).expanduser().resolve()
        if path.exists():
            return {"kind": "path", "model": str(path), "sha256": content_sha256(path)}
        return {"kind": "path", "model": str(path), "sha256": None}
    loaded_path = getattr(source, "path", None)
    if isinstance(loaded_path, Path) and loaded_path.exists():  # a LoadedModel
        hub_model = getattr(source, "hub", None)
        return describe_source(None, hub=hub_model) if hub_model is not None else describe_source(loaded_path)
    return {"kind": "object", "model": None, "class": type(source).__name__, "sha256": None}


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
