"""Fault injection through seams, for tests: no test patches a module's internals.

- `use_backend(cls)`: every compress within the block uses backend `cls` (usually a subclass of
  `MemoryBackend` from `faulty_backend`), through the backend registry's `override`.
- `faulty_backend(...)`: a `MemoryBackend` that fails where asked: raises in `groups` (work that
  must not start), raises in `apply` (a bug), or adds a pass after slicing that sets a parameter to
  NaN (a rewrite that breaks the model).
- `disk_free(bytes)`: the free-space check sees `bytes` free (`guards.free_bytes`).
- `text_read_limit(bytes)`: text files (calibration, eval data) are read up to `bytes`
  (`calibration.text.MAX_TEXT_BYTES`), so a test needs no file of tens of megabytes.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .. import guards
from ..backends.base import override
from ..backends.memory import MemoryBackend
from ..passes.base import Pass, PassResult, RewriteState


class _Poison(Pass[RewriteState]):
    name = "poison"

    def __init__(self, parameter: str) -> None:
        self.parameter = parameter

    def call(self, state: RewriteState) -> PassResult[RewriteState]:
        state.tensors[self.parameter] = torch.full_like(state.tensors[self.parameter], math.nan)
        return PassResult(state, True)


def faulty_backend(*, groups_error: BaseException | None = None, apply_error: BaseException | None = None,
                   poison: str | None = None) -> type[MemoryBackend]:
    """A MemoryBackend subclass failing as asked (see the module docstring)."""

    class Faulty(MemoryBackend):
        def groups(self):
            if groups_error is not None:
                raise groups_error
            return super().groups()

        def apply(self, *args, **kwargs):
            if apply_error is not None:
                raise apply_error
            return super().apply(*args, **kwargs)

        def extra_passes(self) -> tuple:
            return (_Poison(poison),) if poison else ()

    return Faulty


def use_backend(cls):
    """Every compress in the block uses `cls`."""
    return override(cls)


@contextlib.contextmanager
def disk_free(free: int):
    """The free-space checks see `free` bytes."""
    original = guards.free_bytes
    guards.free_bytes = lambda directory: free
    try:
        yield
    finally:
        guards.free_bytes = original


@contextlib.contextmanager
def text_read_limit(limit: int):
    """Text files are read up to `limit` bytes within the block."""
    from ..calibration import text

    original = text.MAX_TEXT_BYTES
    text.MAX_TEXT_BYTES = limit
    try:
        yield
    finally:
        text.MAX_TEXT_BYTES = original


def preloaded(loaded) -> type[MemoryBackend]:
    """A MemoryBackend that prunes the already loaded model `loaded` (a `LoadedModel`) whatever
    source the command names: a test builds a model in memory and drives the command line with it."""

    class Preloaded(MemoryBackend):
        def __init__(self, source, options, *, tokenizer=None) -> None:
            super().__init__(loaded, options, tokenizer=tokenizer)

    return Preloaded
