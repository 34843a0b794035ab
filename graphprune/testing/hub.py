"""A Hugging Face Hub cache laid out by hand, for tests of Hub ids without a network.

`cache_as_hub(folder, cache, "org/name")` puts every file of `folder` into `cache` the way
`huggingface_hub` stores a download: `models--org--name/blobs/<sha256>` (the content),
`refs/<revision>` (the commit a branch points at) and `snapshots/<commit>/<path>` (relative symlinks
into blobs/). With `HF_HUB_CACHE=cache HF_HUB_OFFLINE=1`, `org/name` then resolves with no network.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_as_hub(folder: str | Path, cache: str | Path, repo_id: str, *, revision: str = "main",
                 commit: str | None = None) -> Path:
    """Lay `folder` out in `cache` as a snapshot of `repo_id`; returns the snapshot directory."""
    folder, cache = Path(folder), Path(cache)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if commit is None:  # a commit id derived from the content, like git's
        digest = hashlib.sha1()
        for file in files:
            digest.update(file.relative_to(folder).as_posix().encode() + b"\0" + file.read_bytes())
        commit = digest.hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    for file in files:
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        relative = file.relative_to(folder)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs" / revision).write_text(commit)
    return snapshot
