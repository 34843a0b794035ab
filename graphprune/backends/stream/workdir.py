"""The `.partial` work directory of a streaming run: partial output plus what is needed to resume.

Layout, next to the target `OUT`::

    .OUT.partial/
        run.json                      fingerprint and options of the run that owns it
        lock                          held (flock) while a process works here
        out/                          the output being built; renamed to OUT when complete
        state/scores-00005.safetensors   layer 5 scored: unit scores and input statistics
        state/inputs-00006.safetensors   hidden states entering layer 6 (the statistics sweep)
        state/written-00005.safetensors  layer 5 written: its shard's size, the probe's output

Every file is written to a temporary name, flushed to disk, then renamed, so a file that exists
is complete: a run killed at any point resumes from the last layer whose file exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from ...errors import OutputError
from ...io.atomic import environment_errors, replace_path, save_safetensors, write_text

STATE_VERSION = 1


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}, dict(f.metadata() or {})


class PartialRunError(OutputError):
    """A partial run is in the way: it needs --resume (same inputs) or --force."""


class WorkDir:
    def __init__(self, out: Path, fingerprint: str, options: dict, *, resume: bool, force: bool) -> None:
        self.out = out
        self.root = out.parent / f".{out.name}.partial"
        self.files = self.root / "out"
        self.state = self.root / "state"
        self.resumed = False
        self._lock_file = None
        if self.root.exists():
            # the lock first: a running job's directory is never touched, not even with --force
            self._lock()
            previous = self._read_run()
            if not resume:
                if not force:
                    self.close()
                    raise PartialRunError(f"an interrupted streaming run of {out} left {self.root}: pass --resume to "
                                          f"continue it, or --force to discard it and start over")
                self.close()
                shutil.rmtree(self.root)
            else:
                try:
                    self._check_same_run(previous, fingerprint, options)
                except PartialRunError:
                    self.close()
                    raise
                self.resumed = True
        try:
            self.files.mkdir(parents=True, exist_ok=True)
            self.state.mkdir(exist_ok=True)
            for leftover in [*self.files.glob(".*.tmp"), *self.state.glob(".*.tmp")]:  # io.atomic's temporaries
                leftover.unlink()
        except OSError as error:
            raise OutputError(f"cannot create the work directory {self.root}: {error.strerror or error}") from error
        if self._lock_file is None:
            self._lock()
        if not self.resumed:
            write_text(self.root / "run.json", json.dumps(
                {"version": STATE_VERSION, "fingerprint": fingerprint, "options": options,
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ ownership
    def _read_run(self) -> dict | None:
        try:
            return json.loads((self.root / "run.json").read_text())
        except (OSError, ValueError):
            return None

    def _check_same_run(self, previous: dict | None, fingerprint: str, options: dict) -> None:
        if previous is None or previous.get("version") != STATE_VERSION:
            raise PartialRunError(f"{self.root} is not a resumable graphprune run (no readable run.json of this version): "
                              f"pass --force without --resume to discard it")
        if previous.get("fingerprint") == fingerprint:
            return
        before = previous.get("options") or {}
        changed = [f"{k} {before.get(k)!r} -> {options.get(k)!r}" for k in sorted(set(before) | set(options))
                   if before.get(k) != options.get(k)]
        what = "; ".join(changed[:3]) if changed else "the model weights, the calibration text or the tokenizer"
        raise PartialRunError(f"the partial run in {self.root} was made with other inputs ({what}): rerun with the same "
                          f"ones, or pass --force without --resume to discard it")

    def _lock(self) -> None:
        import fcntl

        self._lock_file = open(self.root / "lock", "w")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            self._lock_file.close()
            self._lock_file = None
            raise PartialRunError(f"another graphprune process is working in {self.root}") from error

    def close(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(Exception):
                self._lock_file.close()
            self._lock_file = None

    # ------------------------------------------------------------------ sweep 1: statistics and scores
    def scores_path(self, layer: int) -> Path:
        return self.state / f"scores-{layer:05d}.safetensors"

    def inputs_path(self, layer: int) -> Path:
        return self.state / f"inputs-{layer:05d}.safetensors"

    def scored_layers(self, n_layers: int) -> int:
        """How many layers, from the first, have their scores."""
        done = 0
        while done < n_layers and self.scores_path(done).exists():
            done += 1
        return done

    def save_scores(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        with environment_errors(self.root):
            save_safetensors(self.scores_path(layer), tensors, fsync=True)

    def load_scores(self, layer: int) -> dict[str, torch.Tensor]:
        return _load(self.scores_path(layer))[0]

    def save_inputs(self, layer: int, batches: list[torch.Tensor]) -> None:
        with environment_errors(self.root):
            save_safetensors(self.inputs_path(layer), {f"batch{i}": b for i, b in enumerate(batches)}, fsync=True)

    def load_inputs(self, layer: int, device) -> list[torch.Tensor]:
        path = self.inputs_path(layer)
        if not path.exists():
            raise PartialRunError(f"{self.root} lacks the hidden states entering layer {layer}; pass --force without "
                              f"--resume to start over")
        tensors = _load(path)[0]
        return [tensors[f"batch{i}"].to(device) for i in range(len(tensors))]

    def drop_inputs(self, layer: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.inputs_path(layer).unlink()

    def save_gradients(self, tensors: dict[str, torch.Tensor]) -> None:
        """The gradient criteria's statistics (`calibration.gradients.terms_to_tensors`)."""
        with environment_errors(self.root):
            save_safetensors(self.state / "gradients.safetensors", tensors, fsync=True)

    def load_gradients(self) -> dict[str, torch.Tensor] | None:
        path = self.state / "gradients.safetensors"
        return _load(path)[0] if path.exists() else None

    # ------------------------------------------------------------------ activations of the layer-by-layer backward
    def activations_path(self, depth: int) -> Path:
        return self.state / f"activations-{depth:05d}.safetensors"

    def save_activations(self, depth: int, batches: list[torch.Tensor]) -> None:
        with environment_errors(self.root):
            save_safetensors(self.activations_path(depth), {f"batch{i}": b for i, b in enumerate(batches)})

    def load_activations(self, depth: int, device) -> list[torch.Tensor]:
        tensors = _load(self.activations_path(depth))[0]
        return [tensors[f"batch{i}"].to(device) for i in range(len(tensors))]

    def drop_activations(self, depth: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.activations_path(depth).unlink()

    # ------------------------------------------------------------------ sweep 2: pruned layers written
    def written_path(self, key: str) -> Path:
        return self.state / f"written-{key}.safetensors"

    def mark_written(self, key: str, shard: str, size: int, tensors: dict[str, torch.Tensor]) -> None:
        with environment_errors(self.root):
            save_safetensors(self.written_path(key), tensors, {"shard": shard, "bytes": str(size)}, fsync=True)

    def written(self, key: str) -> dict[str, torch.Tensor] | None:
        """What was kept when `key` was written, or None when it was not (or its shard is gone)."""
        path = self.written_path(key)
        if not path.exists():
            return None
        tensors, meta = _load(path)
        shard = self.files / meta.get("shard", "")
        if not shard.is_file() or shard.stat().st_size != int(meta.get("bytes", -1)):
            return None
        return tensors

    # ------------------------------------------------------------------ the end
    def finish(self, *, force: bool) -> None:
        """Move the complete output into place and remove the work directory."""
        replace_path(self.files, self.out, force=force)
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)
