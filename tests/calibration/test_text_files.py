"""Calibration and evaluation text files that are not ordinary files, or are huge (issue 24, defect 7):
a pipe or a device is refused before it is opened, and no file is read past `MAX_TEXT_BYTES`."""

from __future__ import annotations

import os
import socket
import threading
import warnings
from pathlib import Path

import pytest

from graphprune.calibration import text as text_module
from graphprune.calibration.pairs import read_pairs
from graphprune.calibration.text import read_text_file
from graphprune.errors import CalibrationError, GraphpruneWarning
from graphprune.testing import faults


def _release_reader(fifo: Path) -> threading.Thread:
    """A writer that opens and closes `fifo`, so that a reader which (wrongly) opened it gets end of
    file instead of waiting forever; `_join` below lets the writer go when nobody opened it."""

    def write():
        with open(fifo, "wb"):
            pass

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def _join(fifo: Path, writer: threading.Thread) -> None:
    descriptor = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets a writer still waiting in open() go
    writer.join(10)
    os.close(descriptor)
    assert not writer.is_alive()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.parametrize("reader", [read_text_file, read_pairs], ids=["text", "pairs"])
def test_a_named_pipe_is_refused_before_it_is_opened(tmp_path, reader):
    fifo = tmp_path / "calib.txt"
    os.mkfifo(fifo)
    writer = _release_reader(fifo)
    try:
        with pytest.raises(CalibrationError, match=r"calib.txt is a named pipe \(FIFO\), not a regular file$"):
            reader(fifo)
    finally:
        _join(fifo, writer)


def _at_most_4_gib() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_device_is_refused_before_it_is_read():
    """/dev/zero once read until memory ran out. Read in a child process limited to 4 GiB of address
    space, so that a regression ends in MemoryError there, not in the OOM killer on a shared machine."""
    import subprocess
    import sys

    code = ("from graphprune.calibration.text import read_text_file\n"
            "from graphprune.errors import CalibrationError\n"
            "try:\n    read_text_file('/dev/zero')\nexcept CalibrationError as error:\n    print(error)\n")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           preexec_fn=_at_most_4_gib)
    assert child.stdout.strip() == "calibration file /dev/zero is a character device, not a regular file", child.stderr


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs unix sockets")
def test_a_socket_is_refused(tmp_path):
    path = tmp_path / "s"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        with pytest.raises(CalibrationError, match="is a socket, not a regular file"):
            read_text_file(path)
    finally:
        server.close()


def test_a_file_larger_than_the_limit_is_read_up_to_it_and_the_user_is_told(tmp_path):
    path = tmp_path / "big.txt"
    line = "caf\u00e9 au lait and a croissant\n"  # a two-byte character, so a cut may split one
    path.write_text(line * 400, encoding="utf-8")
    size = path.stat().st_size
    with faults.text_read_limit(1000), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = read_text_file(path)
    said = [str(w.message) for w in caught if issubclass(w.category, GraphpruneWarning)]
    assert said == [f"calibration file {path} holds {size:,} bytes; reading only its first {len(text.encode()):,} "
                    f"(more than any calibration set or evaluation needs)"]
    assert len(text.encode()) <= 1000 and text.endswith("\n") and text == line * (len(text) // len(line))
    assert text_module.MAX_TEXT_BYTES == 32 * 2**20  # the seam put it back


def test_a_cut_inside_a_character_and_without_a_newline_still_decodes(tmp_path):
    path = tmp_path / "one-line.txt"
    path.write_bytes("\u00e9".encode() * 600)  # 1200 bytes, no newline; the limit falls inside a character
    with faults.text_read_limit(999), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert read_text_file(path) == "\u00e9" * 499


def test_a_ten_megabyte_file_is_read_whole(tmp_path):
    """wiki.train.txt (about 10 MB) is a real calibration file: it must be read in full, silently."""
    path = tmp_path / "wiki.train.txt"
    line = "The river rises in the northern hills and flows south through farmland. " * 4 + "\n"
    path.write_text(line * (10_500_000 // len(line)), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphpruneWarning)
        assert len(read_text_file(path)) == path.stat().st_size


def _bytes_read() -> int:
    return int(next(line.split()[1] for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar:")))


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts bytes read through Linux's /proc/self/io")
def test_a_huge_file_is_never_read_whole(tmp_path):
    """A 2 GB file was read whole to be rejected. A sparse 1 GiB file (text, then a hole that reads as
    NUL bytes) is refused after reading no more than the limit."""
    path = tmp_path / "huge.txt"
    with open(path, "wb") as file:
        file.write(b"some text\n" * 1000)
        file.truncate(2**30)
    before = _bytes_read()
    with pytest.raises(CalibrationError, match="looks binary"):
        read_text_file(path)
    assert _bytes_read() - before < text_module.MAX_TEXT_BYTES + 2**20
