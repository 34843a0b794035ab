"""Which paths graphprune may write, replace or read: one decision each, used by every command.

- `check_output` decides whether an output location may be written (and, with ``--force``,
  replaced). An output is never one of the files the input reads, never inside or around the
  input, never empty, the current directory, one of its parents, ``/`` or the home directory;
  and ``--force`` replaces only what graphprune itself wrote, recognised by its report file (a
  directory) or its report metadata (an ``.onnx`` file). Anything else is the user's data.
- `check_inside` decides whether a path read from a file (a shard index, a sentence-transformers
  module list, ONNX external data) may be opened: only a relative path that stays inside the
  model's directory once symlinks are resolved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..errors import ModelLoadError, OutputError

# What marks a directory as graphprune's own output: the compress report, the export record.
OUTPUT_MARKERS = ("graphprune_report.json", "graphprune_onnx.json")
ONNX_REPORT_KEY = "graphprune_report"


def _refuse_special(out: Path, given: str) -> None:
    home = Path.home().resolve()
    cwd = Path.cwd().resolve()
    if out == Path(out.anchor):
        raise OutputError(f"--out {given!r} is the filesystem root; choose a new directory for the output")
    if out == home or out in home.parents:
        raise OutputError(f"--out {given!r} is your home directory{'' if out == home else ' or above it'}; "
                          f"choose a new directory for the output")
    if out == cwd or out in cwd.parents:
        raise OutputError(f"--out {given!r} is the current directory{'' if out == cwd else ' or a parent of it'}; "
                          f"choose a new directory for the output")


def _overlaps(out: Path, inputs: Iterable[Path]) -> None:
    for src in inputs:
        src = Path(src).expanduser().resolve()
        if out == src and not src.is_dir():
            raise OutputError(f"output {out} is a file the input reads ({src.name}); choose another --out")
        if out == src or src in out.parents or out in src.parents:
            raise OutputError(f"output {out} overlaps the input {src}; choose another --out")


def is_graphprune_directory(path: Path) -> bool:
    return any((path / marker).is_file() for marker in OUTPUT_MARKERS)


def is_graphprune_onnx(path: Path) -> bool:
    """True for an .onnx file whose metadata carries graphprune's report (only the graph is read)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    return any(p.key == ONNX_REPORT_KEY for p in proto.metadata_props)


def check_output(out: str | Path, *, inputs: Iterable[Path] = (), force: bool = False,
                 kind: str = "directory") -> Path:
    """The resolved output path, or a one-line OutputError (see the module docstring).

    `inputs` are every file and directory the input reads (an ONNX model's external data files
    too). `kind` is "directory" (an HF folder) or "onnx" (one .onnx file, plus `<name>_data` when
    its weights are large)."""
    given = str(out)
    if not given.strip():
        raise OutputError("--out is empty; give the directory to write the pruned model to")
    out = Path(given).expanduser().resolve()
    _refuse_special(out, given)
    inputs = [Path(p) for p in inputs]
    if kind == "onnx":
        if out.suffix.lower() != ".onnx":
            raise OutputError(f"output {out} must be an .onnx file")
        _overlaps(out, inputs)
        _overlaps(out.with_name(f"{out.name}_data"), inputs)
        if out.exists():
            if out.is_dir():
                raise OutputError(f"output {out} is a directory")
            if not force:
                raise OutputError(f"output {out} exists; pass --force to replace it")
            if not is_graphprune_onnx(out):
                raise OutputError(f"output {out} exists and was not written by graphprune; --force replaces only "
                                  f"graphprune's own outputs: remove it yourself or choose another --out")
    else:
        _overlaps(out, inputs)
        if out.exists():
            if not out.is_dir():
                raise OutputError(f"output {out} exists and is not a directory")
            if any(out.iterdir()):
                if not force:
                    raise OutputError(f"output directory {out} is not empty; pass --force to replace it")
                if not is_graphprune_directory(out):
                    raise OutputError(f"output directory {out} is not empty and was not written by graphprune (no "
                                      f"{OUTPUT_MARKERS[0]}); --force replaces only graphprune's own outputs: remove "
                                      f"it yourself or choose another --out")
    # Missing parent directories are created when the output is written (like `mkdir -p`); the
    # nearest existing one must be a writable directory.
    existing = next(p for p in out.parents if p.exists())
    if not existing.is_dir():
        raise OutputError(f"cannot create {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK):
        raise OutputError(f"cannot write to {existing}")
    return out


def check_inside(base: Path, relative: str, *, what: str, says: str = "names") -> Path:
    """`base / relative`, resolved, when it stays inside `base`; else a one-line ModelLoadError.
    `what` names the file (or entry) that holds the path (e.g. "…/model.safetensors.index.json"),
    `says` how it refers to it: the message reads "{what} {says} '{relative}', which is ..."."""
    where = f"{what} {says} '{relative}'"
    if not relative or os.path.isabs(relative) or Path(relative).drive:
        raise ModelLoadError(f"{where}, which is not a path relative to the model directory {base} (so outside "
                             f"the model directory); refusing to read it")
    root = Path(base).resolve()
    target = (root / relative).resolve()  # symlinks resolved: a link to elsewhere is outside too
    if target != root and root not in target.parents and not _in_hub_blobs(root, relative, target):
        raise ModelLoadError(f"{where}, which is outside the model directory {root}; refusing to read it")
    return target


def _in_hub_blobs(root: Path, relative: str, target: Path) -> bool:
    """A Hugging Face cache snapshot (`models--org--name/snapshots/REV/`) holds symlinks into its
    repository's `blobs/`: such a file is the model's own, provided the name itself stays in the
    snapshot (no `..`) and the link lands in that repository's blobs."""
    snapshots = root.parent
    repo = snapshots.parent
    if snapshots.name != "snapshots" or not repo.name.startswith(("models--", "datasets--")):
        return False
    if ".." in Path(relative).parts:
        return False
    return (repo / "blobs") in target.parents
