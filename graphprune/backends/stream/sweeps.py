"""The two sweeps of the streaming backend: prune a checkpoint on disk layer by layer, never
holding the whole model.

Two sweeps over the layers, each reading one layer's tensors from the memory-mapped shards:

1. statistics: the calibration hidden states go through the layer (on `device`, in `dtype`); the
   input statistics its consumer layers need are accumulated (float64, the hooks of the in-memory
   calibration) and the criterion scores the layer's groups. Only the scores and the per-channel
   statistics are kept (a few kB per layer); the layer's output becomes the next layer's input.
2. cut: after the allocation has seen every layer's scores (uniform and global alike), each layer
   is compensated (FLAP's bias), sliced, checked against the rewritten config, run once on a probe
   of 8 tokens, and written as its own safetensors shard.

The embedding is materialized once per sweep to make the layer-0 inputs, and the final norm and
LM head once at the end, to check that the pruned model's logits on the probe are finite. Peak
memory is about one layer (twice when the compute dtype differs from the stored one) plus the
calibration activations, whatever the depth. Everything is written into `.OUT.partial/` first
(see `workdir`), which `--resume` continues after a crash and which becomes OUT when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from ...calibration.stats import Calibration, InputStats
from ...criteria.base import Need, ScoringContext, consumer_slices, module_of
from ...criteria.scoring import score_units
from ...errors import ModelLoadError, PruningError, UserError, ValidationError
from ...graph.groups import Group
from ...io.atomic import environment_errors, save_safetensors, write_text
from ...passes import PassManager, RewriteState
from ...passes.bias import BiasCompensation
from ...passes.rewrite import CompensatedWeights
from ...passes.config import ConfigRewrite, instantiate
from ...models.structure import check_windows_fit
from ...passes.slice import SliceParameters
from .architecture import Architecture, tie
from .checkpoint import Checkpoint
from .runner import Shell, load_layer, release, return_freed_memory, run_layer
from .workdir import WorkDir

# What a criterion may read to be scored one layer at a time.
# Statistics the statistics sweep's forward collects, layer by layer.
FORWARD_NEEDS = Need.ACTIVATIONS | Need.BLOCK_ANGLES
# What streaming computes for a criterion: those, and gradients of the LM loss (one or two calibration
# sets) from a layer-by-layer backward sweep (`calibration.gradients.gradient_terms_by_blocks`).
STREAMABLE_NEEDS = FORWARD_NEEDS | Need.GRADIENTS | Need.GENERAL_GRADIENTS
# A test hook: "statistics:3" or "write:1" raises before that stage of that layer (resume tests).
CRASH_ENV = "GRAPHPRUNE_STREAM_CRASH_AT"
PROBE_TOKENS = 8


# ====================================================================== calibration text
def calibration_windows(checkpoint: Checkpoint, arch: Architecture, calib, needs, nsamples, seqlen, seed, criterion):
    if not needs & (STREAMABLE_NEEDS | Need.GRAMS):  # weight-only: no text is read
        return _tokenizer(checkpoint, required=False), None, None
    from ...calibration.text import load_calibration, needs_bos

    tokenizer = _tokenizer(checkpoint, required=True, criterion=criterion)
    windows = load_calibration(calib, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                               add_bos=needs_bos(arch.config))
    check_windows_fit(arch.config, windows)
    note = {"source": str(calib), "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "loss": "lm"}
    return tokenizer, windows, note


def _tokenizer(checkpoint: Checkpoint, *, required: bool, criterion: str | None = None):
    from ...models.loading import load_tokenizer_if_present

    tokenizer = load_tokenizer_if_present(checkpoint.directory)
    if tokenizer is None and required:
        raise UserError(f"criterion '{criterion}' needs calibration text but {checkpoint.directory} has no tokenizer")
    return tokenizer


class GroupIndex:
    """Groups by id (what a criterion's `ctx.groups.by_id` reads)."""

    def __init__(self, groups) -> None:
        self._by_id = {g.id: g for g in groups}

    def __iter__(self):
        return iter(self._by_id.values())

    def by_id(self, gid: str):
        return self._by_id[gid]


# ====================================================================== the two sweeps
class Job:
    def __init__(self, arch: Architecture, checkpoint: Checkpoint, work: WorkDir, per_layer: list[list[Group]],
                 scorer, needs, allocation: str, device: torch.device, dtype: torch.dtype, batch_size: int,
                 progress: bool) -> None:
        self.arch, self.checkpoint, self.work, self.per_layer = arch, checkpoint, work, per_layer
        self.scorer, self.needs, self.allocation = scorer, needs, allocation
        self.device, self.dtype, self.batch_size, self.progress = device, dtype, batch_size, progress
        self.forward = bool(needs & FORWARD_NEEDS)
        self.gradients = None  # GradientTerms of every chosen group, for the gradient criteria
        self.groups = None  # the GroupSet (a criterion may normalise over every group of a kind)
        self.n = arch.n_layers
        self.shard_names = [f"model-{k + 1:05d}-of-{self.n + 1:05d}.safetensors" for k in range(self.n + 1)]

    def _read(self, names):
        return self.checkpoint.read(names, dtype=self.dtype, device=self.device)

    def _read_stored(self, names):
        """Tensors as stored, on the device: the final logits check needs no more precision than the
        weights have (fp16 excepted, whose range a pruned model's logits may exceed)."""
        stored = self.checkpoint.storage_dtype()
        return self.checkpoint.read(names, dtype=self.dtype if stored == torch.float16 else stored,
                                    device=self.device)

    def _bar(self, desc: str, initial: int):
        return tqdm(total=self.n, initial=initial, desc=desc, unit="layer", disable=not self.progress)

    # ------------------------------------------------------------------ sweep 1
    def statistics(self, windows: torch.Tensor | None) -> None:
        start = self.work.scored_layers(self.n)
        if start == self.n:
            return
        calls: list = []
        inputs: list[torch.Tensor] = []
        if self.forward:
            shell = Shell(self.arch.skeleton, self.arch.prefix, self.arch.blocks, self._read, device=self.device,
                          dtype=self.dtype)
            for chunk in windows.split(self.batch_size):
                hidden, call = shell.capture(chunk.to(self.device))
                calls.append(call)
                inputs.append(hidden)
            shell.close()
            if start > 0:
                inputs = self.work.load_inputs(start, self.device)
        with self._bar("statistics", start) as bar:
            for i in range(start, self.n):
                _maybe_crash("statistics", i)
                inputs = self._score_layer(i, inputs, calls)
                return_freed_memory()
                bar.update(1)

    def _score_layer(self, i: int, inputs, calls):
        names = self.arch.layer_names(i)
        groups = self.per_layer[i]
        modules = sorted({module_of(s.param) for g in groups for s in consumer_slices(g)})
        stats: dict[str, InputStats] = {}
        angle = 0.0
        outputs = []
        if self.forward:
            block_name = f"{self.arch.prefix}.{i}"
            block = self.arch.blocks[i]
            running = self.checkpoint.read(names, device=self.device)  # as stored
            _check_finite(running)
            load_layer(self.arch.skeleton, block, block_name, running, device=self.device, dtype=self.dtype)
            del running
            outputs, stats, angle = run_layer(block, block_name, inputs, calls, i, stat_modules=modules,
                                              angles=Need.BLOCK_ANGLES in self.needs, keep_outputs=i < self.n - 1)
            release(block)
        # The criteria read the stored values, one tensor at a time (a criterion converts a whole
        # weight to float64: with the rest of the layer in memory too, that would be the peak).
        ctx = ScoringContext(self.arch.skeleton, self.groups, _TensorsOnDemand(self.checkpoint, names),
                             Calibration(inputs=stats))
        if self.gradients is not None:
            ctx.unit_gradients, ctx.general_unit_gradients = self.gradients.domain, self.gradients.general
            ctx.unit_alignment = self.gradients.alignment
        tensors: dict[str, torch.Tensor] = {}
        scores = score_units(self.scorer, groups, ctx, comparable=self.allocation == "global")
        for gid, raw in scores.raw.items():
            tensors[f"raw/{gid}"] = torch.from_numpy(raw.copy())
        for gid, ranked in scores.comparable.items():
            tensors[f"cmp/{gid}"] = torch.from_numpy(ranked.copy())
        for module, st in stats.items():
            tensors[f"in/{module}/sum"] = st.sum
            tensors[f"in/{module}/sumsq"] = st.sumsq
            tensors[f"in/{module}/count"] = torch.tensor([st.count], dtype=torch.int64)
        if Need.BLOCK_ANGLES in self.needs:
            tensors["angle"] = torch.tensor([angle], dtype=torch.float64)
        del ctx
        # The next layer's inputs are on disk before this layer counts as done, and this layer's
        # inputs are deleted only after: a crash anywhere leaves what the resumed run needs.
        if outputs:
            self.work.save_inputs(i + 1, outputs)
        self.work.save_scores(i, tensors)
        self.work.drop_inputs(i)
        return outputs

    def collected(self):
        scores: dict[str, np.ndarray] = {}
        comparable: dict[str, np.ndarray] = {}
        stats: dict[int, dict[str, InputStats]] = {}
        angles: dict[int, float] = {}
        for i in range(self.n):
            layer: dict[str, InputStats] = {}
            for key, value in self.work.load_scores(i).items():
                kind, rest = key.split("/", 1) if "/" in key else (key, "")
                if kind == "raw":
                    scores[rest] = value.numpy()
                elif kind == "cmp":
                    comparable[rest] = value.numpy()
                elif kind == "angle":
                    angles[i] = float(value[0])
                else:
                    module, field = rest.rsplit("/", 1)
                    st = layer.setdefault(module, InputStats(0, None, None))  # type: ignore[arg-type]
                    if field == "count":
                        st.count = int(value[0])
                    else:
                        setattr(st, field, value)
            stats[i] = layer
        return scores, comparable, stats, angles

    # ------------------------------------------------------------------ sweep 2
    def cut(self, removed: dict[str, np.ndarray], stats: dict[int, dict[str, InputStats]], compensate: str,
            new_config, compensated=None) -> dict:
        """Write every layer's pruned tensors; returns how much was already written (resume).
        `compensated(i)`, when given, returns layer i's layerwise-compensated consumers ({module: [W | b]})
        and the units removed (which --sequential may re-choose); otherwise `compensate` "bias" applies
        FLAP's bias from `stats`."""
        self.new_model = instantiate(self.arch.model_class, new_config)  # meta
        tie(self.new_model)
        new_blocks = self.new_model.get_submodule(self.arch.prefix)
        expected = {k: tuple(v.shape) for k, v in self.new_model.state_dict().items()}
        probe_ids = (torch.arange(PROBE_TOKENS, dtype=torch.long) * 7919 % max(new_config.vocab_size - 1, 1))[None]
        shell = Shell(self.new_model, self.arch.prefix, new_blocks, self._read, device=self.device, dtype=self.dtype)
        probe, self.probe_calls = shell.capture(probe_ids.to(self.device))
        shell.close()
        self.probe_outputs: list[torch.Tensor] = []
        outside = self.work.written("outside")
        if outside is None:
            _maybe_crash("write", -1)
            names = self.arch.outside_names()
            self._write_shard(0, self.checkpoint.read(names), "outside", {})
        already = 0
        for i in range(self.n):
            kept = self.work.written(f"{i:05d}")
            if kept is None:
                break
            probe = kept["probe"].to(self.device, self.dtype)
            self.probe_outputs.append(probe)
            already += 1
        with self._bar("writing", already) as bar:
            for i in range(already, self.n):
                _maybe_crash("write", i)
                weights, layer_removed = compensated(i) if compensated is not None else (None, removed)
                probe = self._cut_layer(i, layer_removed, stats.get(i, {}), compensate, new_blocks, expected, probe,
                                        weights)
                self.probe_outputs.append(probe)
                return_freed_memory()
                bar.update(1)
        self._check_logits(probe_ids)
        return {"layers": already, "outside": outside is not None}

    def _cut_layer(self, i, removed, stats, compensate, new_blocks, expected, probe, weights=None):
        names = self.arch.layer_names(i)
        state = self.checkpoint.read(names)
        _check_finite(state)
        rewrite = RewriteState(state, self.per_layer[i], removed,
                               statistics=Calibration(inputs=stats) if compensate == "bias" else None)
        del state
        if weights is not None:
            first = [CompensatedWeights(weights)]
        else:
            first = [BiasCompensation()] if compensate == "bias" else []
        PassManager(first + [SliceParameters()])(rewrite)
        sliced = rewrite.tensors
        del rewrite
        prefix = self.arch.layer_prefix(i)
        wanted = {k: v for k, v in expected.items() if k.startswith(prefix)}
        storage = self.checkpoint.tensors[names[0]].dtype
        for k, shape in wanted.items():
            if k not in sliced and k.endswith(".bias"):  # a bias the new config flag added where none was compensated
                sliced[k] = torch.zeros(shape, dtype=storage)
        wrong = sorted(set(sliced) ^ set(wanted)) or [k for k in wanted if tuple(sliced[k].shape) != wanted[k]]
        if wrong:
            raise PruningError(f"layer {i}: the pruned weights do not match the rewritten config (e.g. {wrong[0]})")
        block_name = f"{self.arch.prefix}.{i}"
        block = new_blocks[i]
        load_layer(self.new_model, block, block_name, sliced, device=self.device, dtype=self.dtype)
        out, _, _ = run_layer(block, block_name, [probe], [self.probe_calls], i)
        release(block)
        if not torch.isfinite(out[0]).all():
            raise ValidationError(f"the pruned layer {i} produces NaN/Inf outputs; nothing was written")
        self._write_shard(i + 1, sliced, f"{i:05d}", {"probe": out[0]})
        return out[0]

    def _write_shard(self, index: int, tensors: dict[str, torch.Tensor], key: str, keep: dict) -> None:
        name = self.shard_names[index]
        with environment_errors(self.work.files):
            size = save_safetensors(self.work.files / name, tensors, {"format": "pt"}, fsync=True)
        self.work.mark_written(key, name, size, keep)

    def _check_logits(self, probe_ids: torch.Tensor) -> None:
        """The pruned model's own forward (embedding, final norm, LM head; the layers replaced by their
        probe outputs) gives finite logits of the right shape, as the in-memory Validate checks."""
        blocks = self.new_model.get_submodule(self.arch.prefix)
        shell = Shell(self.new_model, self.arch.prefix, blocks, self._read_stored, device=self.device,
                      dtype=self.dtype, head=True)
        dtype = next(iter(shell.tensors.values())).dtype
        try:
            logits = shell.logits(probe_ids.to(self.device), [p.to(dtype) for p in self.probe_outputs])
        finally:
            shell.close()
        if not torch.isfinite(logits).all():
            raise ValidationError("the pruned model produces NaN/Inf outputs; nothing was written")
        if tuple(logits.shape[:2]) != tuple(probe_ids.shape):
            raise ValidationError(f"the pruned model's output has shape {tuple(logits.shape)}")

    # ------------------------------------------------------------------ the rest of the folder
    def finish_files(self, config, tokenizer, report: dict, *, total_params: int) -> None:
        from ...io.hf import write_reports

        files = self.work.files
        weight_map: dict[str, str] = {}
        total_size = 0
        from safetensors import safe_open

        for name in self.shard_names:
            with safe_open(str(files / name), framework="pt") as f:
                for key in f.keys():
                    weight_map[key] = name
                    sl = f.get_slice(key)
                    total_size += int(np.prod(sl.get_shape())) * _itemsize(sl.get_dtype())
        index = {"metadata": {"total_parameters": total_params, "total_size": total_size},
                 "weight_map": dict(sorted(weight_map.items()))}
        write_text(files / "model.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")
        config.architectures = [self.arch.model_class.__name__]
        config.dtype = self.checkpoint.storage_dtype()
        config.save_pretrained(files)
        source = self.checkpoint.directory
        if (source / "generation_config.json").is_file():
            shutil.copy2(source / "generation_config.json", files / "generation_config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(files)
        write_reports(files, report)


class _TensorsOnDemand(Mapping):
    """Checkpoint tensors by name, read (and checked for NaN/Inf) when asked for, never kept."""

    def __init__(self, checkpoint: Checkpoint, names: list[str]) -> None:
        self.checkpoint, self.names = checkpoint, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        tensors = self.checkpoint.read([name])
        _check_finite(tensors)
        return tensors[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _itemsize(safetensors_dtype: str) -> int:
    from .checkpoint import DTYPES

    return torch.empty((), dtype=DTYPES[safetensors_dtype]).element_size()


def _check_finite(weights: dict[str, torch.Tensor]) -> None:
    for name, tensor in weights.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ModelLoadError(f"the input model is broken: {name} holds {bad} NaN/Inf value(s); refusing to "
                                     f"prune it")


def _maybe_crash(stage: str, layer: int) -> None:
    if os.environ.get(CRASH_ENV) == f"{stage}:{layer}":
        raise RuntimeError(f"injected crash before {stage} of layer {layer} ({CRASH_ENV})")


# ====================================================================== config and report
def rewrite_config(arch: Architecture, chosen: list[Group], per_layer, removed, compensate):
    """The pruned config (per-layer overrides as the in-memory rewrite writes them), computed from the
    allocation alone: shapes follow from the removed units, new biases from the compensated layers."""
    from ...passes.slice import removed_indices

    shapes = dict(arch.shapes)
    whole, inside_experts = removed_indices(chosen, removed)
    assert not inside_experts, "streaming refuses mixture-of-experts models (Architecture)"
    for (param, axis), gone in whole.items():
        shape = list(shapes[param])
        shape[axis] -= len(gone)
        shapes[param] = tuple(shape)
    new_biases: list[str] = []
    if compensate in ("bias", "lsq"):  # a compensated consumer that lost inputs carries a bias
        for i, groups in enumerate(per_layer):
            for g in groups:
                if len(removed.get(g.id, ())) == 0:
                    continue
                for s in consumer_slices(g):
                    module = module_of(s.param)
                    if f"{module}.bias" not in arch.shapes and module not in new_biases:
                        new_biases.append(module)
                        shapes[f"{module}.bias"] = (shapes[s.param][0],)
    result = ConfigRewrite().run(arch.config, arch.model_class, chosen, removed, shapes, new_biases, arch.n_layers)
    return result, new_biases
