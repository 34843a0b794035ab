"""The one way graphprune writes files: complete or not at all.

- `atomic_directory(out)`: a context manager yielding a temporary sibling directory
  (`.OUT.partial-<pid>`); when the block ends without an error the directory replaces `out` (an
  existing `out` is replaced only with ``force``; `io.paths.check_output` decided earlier whether
  that is allowed), otherwise it is removed. Every output folder (HF, ONNX export, streamed
  shards) is finished this way.
- `atomic_file(path, write)`: ``write(tmp)`` into a temporary sibling file, optionally flushed to
  disk, then renamed over `path`. Cache entries, streaming state, single .onnx files and JSON use it.

Both create files with the user's umask (a temporary directory from `mkdtemp` would be 0700 and
stay so). A process killed with SIGKILL cannot clean up; its leftover `.OUT.partial-<pid>` carries
a marker with the pid, and the next write to `OUT` removes it once that pid is gone. Nothing
without the marker is ever removed.

Write errors of the environment (a full disk, a file-size limit, a read-only filesystem) become one
`OutputError` line: exit code 2, not a bug report.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import OutputError

PARTIAL_MARKER = ".graphprune-partial"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove `.OUT.partial-<pid>` siblings left by killed graphprune processes (marker present,
    pid gone); returns what was removed."""
    removed = []
    parent = out.parent
    if not parent.is_dir():
        return removed
    for candidate in parent.glob(f".{out.name}.partial-*"):
        marker = candidate / PARTIAL_MARKER
        if not candidate.is_dir() or candidate.is_symlink() or not marker.is_file():
            continue
        try:
            pid = int(marker.read_text().strip() or 0)
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


@contextlib.contextmanager
def environment_errors(target: Path) -> Iterator[None]:
    """A full disk, a file-size limit or a read-only filesystem is the user's environment, not a bug:
    one line, exit 2."""
    from safetensors import SafetensorError

    try:
        yield
    except OutputError:
        raise
    except OSError as error:
        raise OutputError(f"could not write {target}: {error.strerror or error}; nothing was written") from error
    except SafetensorError as error:
        if "I/O error" not in str(error):
            raise
        detail = str(error).split("I/O error:", 1)[1].strip()
        raise OutputError(f"could not write {target}: {detail}; nothing was written") from error


def replace_path(tmp: Path, out: Path, *, force: bool = False) -> None:
    """Move the finished `tmp` (a file or directory) to `out`, replacing an existing `out` only with
    force (a directory is moved aside first and removed after the swap)."""
    if out.exists() or out.is_symlink():
        if not force and (not out.is_dir() or any(out.iterdir())):
            raise OutputError(f"output {out} exists; pass --force to replace it")
        if out.is_dir() and not out.is_symlink():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
            return
    os.replace(tmp, out)


@contextlib.contextmanager
def atomic_directory(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `out` that becomes `out` when the block succeeds."""
    out = Path(out)
    remove_stale_partials(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    with environment_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(mode=0o777 & ~_umask())
        (tmp / PARTIAL_MARKER).write_text(str(os.getpid()))
    try:
        with environment_errors(out):
            yield tmp
            (tmp / PARTIAL_MARKER).unlink()
            _apply_umask(tmp)
            replace_path(tmp, out, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _apply_umask(directory: Path) -> None:
    """Files as the user's umask says (some writers create 0600 files: safetensors does)."""
    mask = _umask()
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)
        elif path.is_dir() and not path.is_symlink():
            path.chmod(0o777 & ~mask)


def atomic_file(path: str | Path, write: Callable[[Path], object], *, fsync: bool = False) -> Path:
    """``write(tmp)`` then rename `tmp` over `path`: `path` exists only complete. The temporary file
    is removed when `write` fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        Path(tmp).chmod(0o666 & ~_umask())
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None, *,
                     fsync: bool = False) -> int:
    """Write a safetensors file atomically; returns its size in bytes."""
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_file(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata), fsync=fsync)
    return Path(path).stat().st_size
