"""Stages, their times, and what the user sees while they run: one stage line per stage as it ends
(through `logging`, logger "graphprune"), and a progress bar for every stage that runs longer than a
few seconds without one of its own.

    timings = Timings()
    with timings.active():              # stage(...) anywhere below reports to this run
        with timings("load"):
            ...
        with timings("score"):          # the driver's stage
            with stage("calibrate"):    # a part of it, marked where the work is (calibration/...)
                ...

Times are exclusive: a stage nested in another is counted once, under its own name, so the stages
add up to the wall time of the run (`total`). The library only logs; the command line configures
the handler (`configure_logging`: stage lines by default on a terminal, -v shows them and debug
lines anywhere, -q only warnings and errors, and no bars).
No graphprune imports: every layer may mark a stage.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import sys
import threading
import time
from collections.abc import Iterator

log = logging.getLogger("graphprune")

_current: contextvars.ContextVar = contextvars.ContextVar("graphprune_timings", default=None)
# Whether progress bars are shown at all (the command line's -q turns them off for every command).
_bars = {"enabled": True}
SPINNER_DELAY_S = 2.0


class Timings(dict):
    """Stage name -> seconds spent in it, exclusive of the stages nested in it.

    `with timings(name):` times a block; once a top-level stage has ended and another starts (or
    `active()` ends), its line and the lines of the stages nested in it are logged at INFO. `progress`: show a bar for a stage that runs
    longer than `SPINNER_DELAY_S` without a bar of its own (only on a terminal)."""

    def __init__(self, *, progress: bool = True, started: float | None = None) -> None:
        super().__init__()
        self.started = time.perf_counter() if started is None else started
        self.progress = progress
        self._stack: list[list] = []  # [name, started, seconds of nested stages, {nested name: seconds}]
        self._pending: dict[str, float] = {}  # stage lines not yet logged

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self._stack and self._stack[-1][0] == name:  # the same stage again inside itself: counted once
            yield
            return
        if not self._stack and self._pending and name not in self._pending:
            self.flush()  # another stage starts: the one before is complete
        frame = [name, time.perf_counter(), 0.0, {}]
        self._stack.append(frame)
        spinner = _Spinner(name) if len(self._stack) == 1 and self.progress and bars_enabled() else None
        failed = True
        try:
            yield
            failed = False
        finally:
            if spinner is not None:
                spinner.stop()
            elapsed = time.perf_counter() - frame[1]
            own = max(elapsed - frame[2], 0.0)
            self._stack.pop()
            self[name] = self.get(name, 0.0) + own
            nested = {**frame[3]}
            if self._stack:
                parent = self._stack[-1]
                parent[2] += elapsed
                for key, seconds in {**nested, name: own}.items():
                    parent[3][key] = parent[3].get(key, 0.0) + seconds
            elif failed:  # a stage that failed has no line: the error is the one line the user reads
                self._pending.clear()
                for key, seconds in {**nested, name: own}.items():
                    log.debug(stage_line(key, seconds))
            else:  # logged when another stage starts (a stage entered twice in a row gets one line)
                for key, seconds in {**nested, name: own}.items():
                    self._pending[key] = self._pending.get(key, 0.0) + seconds

    def flush(self) -> None:
        """Log the lines of the stages that ended since the last flush."""
        for key, seconds in self._pending.items():
            log.info(stage_line(key, seconds))
        self._pending.clear()

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.started

    @contextlib.contextmanager
    def active(self) -> Iterator["Timings"]:
        """Make these the timings `stage(...)` reports to, for the block."""
        token = _current.set(self)
        try:
            yield self
            self.flush()
        finally:
            self._pending.clear()
            _current.reset(token)


def stage_line(name: str, seconds: float) -> str:
    return f"stage {name:<20} {seconds:8.2f} s"


def stage(name: str):
    """Time a block as stage `name` of the run in progress (a no-op outside one)."""
    timings = _current.get()
    return timings(name) if timings is not None else contextlib.nullcontext()


def in_stage(name: str):
    """Decorator: every call of the function is timed as stage `name` (see `stage`)."""

    def wrap(function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            with stage(name):
                return function(*args, **kwargs)

        return timed

    return wrap


def current() -> Timings | None:
    return _current.get()


def bars_enabled() -> bool:
    return _bars["enabled"]


def set_bars(enabled: bool) -> None:
    """Turn every progress bar on or off (the command line's -q turns them off)."""
    _bars["enabled"] = bool(enabled)


def show_progress(asked: bool = True) -> bool:
    """Whether a bar should be shown: asked for, and not turned off globally."""
    return bool(asked) and bars_enabled()


class _Spinner:
    """A bar with the elapsed time of a stage that has run for `delay` seconds without another bar on
    the screen; on a terminal only (a log file gets the stage line, not a redrawn bar)."""

    def __init__(self, name: str, *, stream=None, delay: float = SPINNER_DELAY_S, tick: float = 0.5) -> None:
        self.name, self.stream, self.delay, self.tick = name, stream, delay, tick
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        out = stream if stream is not None else sys.stderr
        if not getattr(out, "isatty", lambda: False)():
            return
        self._thread = threading.Thread(target=self._run, name=f"graphprune-stage-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            return
        if self._stop.wait(self.delay):
            return
        bar = None
        try:
            while not self._stop.is_set():
                others = [b for b in list(getattr(tqdm, "_instances", ())) if b is not bar]
                if others and bar is not None:  # the stage's own bar took over
                    bar.close()
                    bar = None
                elif not others and bar is None:
                    bar = tqdm(desc=self.name, bar_format="{desc}: {elapsed}", leave=False, delay=1e-6,
                               file=self.stream if self.stream is not None else sys.stderr)
                    bar.start_t = self.started  # the stage's elapsed time, not the bar's
                if bar is not None:
                    bar.refresh()
                self._stop.wait(self.tick)
        finally:
            if bar is not None:
                bar.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc/self/stat), or None where unknown: the command
    line counts its wall time from there, interpreter start-up and imports included."""
    import os

    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        started_ticks = int(fields[19])  # field 22 of stat(5), counted after the command name
        return max(time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


# ------------------------------------------------------------------ the command line's handler
class _Handler(logging.Handler):
    """Writes to the current sys.stderr (never a stale one), through tqdm so that an open bar is not
    torn."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            try:
                from tqdm import tqdm

                tqdm.write(message, file=sys.stderr)
            except ImportError:  # pragma: no cover
                sys.stderr.write(message + "\n")
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"graphprune: {record.levelname.lower()}: {' '.join(message.split())}"
        if record.levelno <= logging.DEBUG:
            return f"debug: {record.name}: {message}"
        return message


def level_for(verbosity: int, *, terminal: bool | None = None) -> int:
    """-q (negative): warnings and errors only; -v: stage lines and debug lines. By default: stage lines
    (INFO) when stderr is a terminal, where someone watches the run; warnings and errors only when it is
    not (a pipe, a log, CI), so that a failed run's stderr is its one error line; the stage times are in
    the command's summary and in graphprune_run.json either way."""
    if terminal is None:
        terminal = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if verbosity < 0:
        return logging.WARNING
    if verbosity > 0:
        return logging.DEBUG
    return logging.INFO if terminal else logging.WARNING


def configure_logging(verbosity: int = 0) -> logging.Logger:
    """The command line's setup: one handler on the "graphprune" logger at the level -v / -q ask
    for; with -q no progress bars either. Calling it again replaces the earlier setup."""
    for handler in [h for h in log.handlers if isinstance(h, _Handler)]:
        log.removeHandler(handler)
    handler = _Handler()
    handler.setFormatter(_Formatter())
    log.addHandler(handler)
    log.setLevel(level_for(verbosity))
    log.propagate = False
    set_bars(verbosity >= 0)
    return log
