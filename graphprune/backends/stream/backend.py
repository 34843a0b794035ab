"""The streaming backend: a safetensors checkpoint pruned layer by layer, never held whole.

`score` is the statistics sweep (`sweeps.Job.statistics`: each layer's calibration forward, its
statistics and its scores, kept in the resumable work directory `.OUT.partial/`); `apply` is the
cut sweep (each layer compensated, sliced, probed and written as its own shard); `finish` writes
the index, config, tokenizer and report and moves the folder into place. Peak memory is about one
layer plus the calibration activations, whatever the depth.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ... import allocation as allocation_registry
from ...criteria import available as available_criteria
from ...criteria import get as get_criterion
from ...criteria.base import ExpertCriterion, Form, Need, consumer_slices, module_of
from ...criteria.scoring import Scores, score_blocks
from ...devices import resolve_device, resolve_dtype
from ...errors import ModelLoadError, UserError
from ..base import Backend, Capabilities, Stage, StageResult, register
from .architecture import Architecture, StreamingUnsupported
from .blocks import StreamBlocks
from .checkpoint import Checkpoint
from .runner import keep_heap_small
from .sweeps import STREAMABLE_NEEDS, GroupIndex, Job, calibration_windows, rewrite_config
from .workdir import WorkDir

STREAMABLE_TARGETS = frozenset({"channels", "heads", "query-heads", "kv-groups"})
# In memory, compress holds the fp32 model plus calibration and the rewrite's new tensors; above
# this fraction of the available memory it would swap or be killed, so streaming is chosen.
AUTO_STREAM_FRACTION = 0.8


def available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def too_big_for_memory(spec: Any) -> str | None:
    """Why `spec` (a safetensors folder) should be streamed, or None."""
    if not isinstance(spec, (str, Path)):
        return None
    path = Path(spec).expanduser()
    if not path.is_dir():
        return None
    try:
        checkpoint = Checkpoint(path)
    except (UserError, OSError):
        return None  # the in-memory loader reports what is wrong with it (unreadable, malformed)
    fp32 = 4 * checkpoint.numel()
    available = available_memory_bytes()
    if available is None or fp32 <= AUTO_STREAM_FRACTION * available:
        return None
    return f"{path.name} needs about {fp32 / 2**30:.1f} GiB in fp32 and {available / 2**30:.1f} GiB are available"


def stream_source(spec: Any) -> tuple[Path, str]:
    """(safetensors folder, display name) for a model argument, or a one-line refusal."""
    from ...models.aliases import BUNDLED_ALIASES, resolve_alias

    if not isinstance(spec, (str, Path)):
        raise StreamingUnsupported("--stream reads a safetensors folder from disk; an in-memory model is pruned in "
                                   "memory")
    spec = str(spec)
    name = None
    path = Path(spec).expanduser()
    if "/" not in spec and spec.strip().lower() in BUNDLED_ALIASES:
        name = spec.strip().lower()
        path = resolve_alias(name)
    if path.suffix.lower() == ".gguf":
        from ...models.loading import gguf_cache_dir

        cache = gguf_cache_dir(path)
        hint = (f"stream its converted folder {cache}" if cache.is_dir() else
                "convert it once (any graphprune command that loads it, e.g. `graphprune inspect`, writes a "
                "safetensors copy) and stream that folder")
        raise StreamingUnsupported(f"--stream reads safetensors folders, not GGUF files ({path.name}): {hint}")
    if path.suffix.lower() == ".onnx":
        raise StreamingUnsupported("--stream prunes Hugging Face safetensors folders; an ONNX model is pruned in memory")
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if (path / "modules.json").is_file():
        raise StreamingUnsupported(f"{path} is a sentence-transformers encoder; streaming prunes decoder language "
                                   f"models only")
    return path, name or path.name


@register
class StreamBackend(Backend):
    """See the module docstring."""

    name = "stream"
    capabilities = Capabilities(needs=STREAMABLE_NEEDS | Need.GRAMS, compensations=frozenset({"none", "bias", "lsq"}),
                                sequential=True, targets=STREAMABLE_TARGETS, experts=False,
                                self_generated_calibration=False)

    @classmethod
    def accepts(cls, source, options) -> bool:
        """--stream asks for it, --resume continues a streamed run, or the folder would not fit in
        memory in fp32 (said in a note)."""
        if options.stream is not None:
            return bool(options.stream)
        if options.resume:
            return True
        reason = too_big_for_memory(source)
        if reason:
            print(f"note: {reason}: pruning layer by layer (--stream); pass --no-stream to load it whole")
            return True
        return False

    @classmethod
    def refusal_of(cls, scorer, compensate, *, sequential=False, target_parts=()) -> str | None:
        streamable = cls.capabilities.needs
        needs = scorer.needs
        if isinstance(scorer, ExpertCriterion) or not needs.within(streamable):
            ok = [n for n in available_criteria() if get_criterion(n).needs.within(streamable)
                  and not isinstance(get_criterion(n), ExpertCriterion)]
            missing = ", ".join(sorted((needs & ~streamable).names())) or "routing statistics"
            return (f"criterion '{scorer.name}' needs {missing} of the whole model, which streaming does not compute; "
                    f"with --stream use one of {', '.join(ok)}")
        for part in target_parts:
            if part and part not in STREAMABLE_TARGETS:
                return (f"--target {part} is not available with --stream (it supports "
                        f"{', '.join(sorted(STREAMABLE_TARGETS))})")
        return super().refusal_of(scorer, compensate, sequential=sequential, target_parts=target_parts)

    def unsupported(self, reason: str) -> Exception:
        return StreamingUnsupported(reason)

    def __init__(self, source: Any, options, *, tokenizer: Any = None) -> None:
        self.options = options
        if options.export:
            raise StreamingUnsupported("--export onnx needs the whole pruned model in memory: run `graphprune export` "
                                       "on the streamed output instead")
        calib = options.calib_sources
        if len(calib) != 1:
            raise StreamingUnsupported("--stream calibrates on one --calib source")
        if str(calib[0]) == "none":
            raise StreamingUnsupported("--calib none generates text with the whole model; give calibration text with "
                                       "--stream")
        if options.out_dtype is not None:
            raise StreamingUnsupported("--out-dtype converts the whole pruned model in memory; a streamed output keeps "
                                       "the checkpoint's stored dtype (convert the output afterwards)")
        self.device = resolve_device(options.device or "cpu")
        self.compute_dtype = resolve_dtype(options.dtype or "fp32")
        self.path, self.name_ = stream_source(source)
        self.checkpoint = Checkpoint(self.path)
        self.arch = Architecture(self.checkpoint, trust_remote_code=options.trust_remote_code)
        self.config = self.arch.config
        self.layer_groups = None
        self.out: Path | None = None
        self.work: WorkDir | None = None
        self.job: Job | None = None
        self.per_layer: list[list] = []
        self.stats: dict = {}
        self.angles: dict = {}
        self.calib_note = None
        self.tokenizer = None
        self.resumed: dict | None = None
        self.config_result = None
        self.new_biases: list[str] = []

    @property
    def display_name(self) -> str:
        return self.name_

    def param_counts(self) -> tuple[int, int]:
        """(unique parameters, parameters of the repeated blocks) of the (meta) model as it is now.
        The blocks' parameters are those of the traced 2-layer instance (`graph.blocks`, from its
        graph's structure) carried onto every real layer by the layer renaming."""
        from ...graph.blocks import count_layer_parameters, module_sizes

        model = self.job.new_model if self.job is not None and getattr(self.job, "new_model", None) is not None \
            else self.arch.skeleton
        if getattr(self, "_layer_names", None) is None:
            self.groups()  # traces the small instance once (cached)
            self._layer_names = self._real_layer_names()
            self._known_names = {name for name, _ in self.arch.skeleton.named_parameters(remove_duplicate=False)}
        return (sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
                count_layer_parameters(module_sizes(model), self._layer_names, self._known_names))

    def _real_layer_names(self) -> set[str]:
        """The traced instance's layer parameters, as names of the real model: a name inside a traced
        layer stands for that name in every real layer; any other keeps its name."""
        from ...graph.blocks import layer_parameters
        from .architecture import TRACE_LAYERS

        arch = self.arch
        names: set[str] = set()
        for name in layer_parameters(self.layer_groups.traced):
            inside = next((name[len(arch.layer_prefix(k)):] for k in range(TRACE_LAYERS)
                           if name.startswith(arch.layer_prefix(k))), None)
            if inside is None:
                names.add(name)
            else:
                names.update(arch.layer_prefix(i) + inside for i in range(arch.n_layers))
        return names

    def prepare_output(self, out) -> Path:
        from ...io.hf import prepare_output

        checkpoint, arch = self.checkpoint, self.arch
        layer_bytes = sum(checkpoint.tensors[n].nbytes for i in range(arch.n_layers) for n in arch.layer_names(i))
        needed = int(0.9 * (1 - self.options.sparsity) * layer_bytes) + checkpoint.nbytes - layer_bytes
        self.out = prepare_output(out, inputs=[checkpoint.directory], force=self.options.force, needed_bytes=needed)
        return self.out

    def groups(self) -> list:
        if self.layer_groups is None:
            self.layer_groups = self.arch.groups()
        return self.layer_groups.all()

    def flops_per_token(self, groups) -> float:
        return self.layer_groups.flops_per_token

    def trace_notes(self, groups) -> list[str]:
        return self.layer_groups.traced.graph.notes + [
            f"traced a {self.arch.model_class.__name__} of 2 layers (hidden size "
            f"{self.arch.trace_config().hidden_size}) and mapped its layer-0 groups onto the {self.arch.n_layers} "
            f"layers"]

    def default_target(self, groups) -> tuple[str, str | None]:
        from ...passes.config import heads_expressible

        if heads_expressible(self.arch.skeleton, groups):
            return "channels,heads", None
        return "channels", (f"{type(self.arch.config).__name__} derives head_dim from hidden_size / heads, so "
                            f"removing heads cannot be written to its config: pruning channels only")

    def prepare(self, stage: Stage, chosen: list) -> list:
        if self.out is None:
            raise StreamingUnsupported("streaming writes the pruned model layer by layer: give an output directory")
        stage.scorer.check_model(self.arch.skeleton)
        self.per_layer = [[g for g in chosen if g.layer == i] for i in range(self.arch.n_layers)]
        # Requests that cannot be met (sparsity above what the groups hold, sizes or biases the config
        # cannot state) fail now, on a dry allocation, not after the statistics sweep.
        dry = allocation_registry.allocate(chosen, {g.id: np.zeros(g.units) for g in chosen}, method=stage.allocation,
                                           sparsity=float(stage.sparsity), total_params=self.param_counts()[1],
                                           floor=self.options.floor, round_to=self.options.round_to,
                                           block_importance={i: 1.0 for i in range(self.arch.n_layers)})
        rewrite_config(self.arch, chosen, self.per_layer, dry.removed, stage.compensate)
        return chosen

    def score(self, stage: Stage, chosen: list) -> Scores:
        options = self.options
        needs = stage.needs
        calib = options.calib_sources[0]
        self.tokenizer, windows, self.calib_note = calibration_windows(
            self.checkpoint, self.arch, calib, needs, options.nsamples, options.seqlen, options.seed, stage.criterion)
        recorded = {"criterion": stage.criterion, "criterion_options": dict(options.criterion_options),
                    "sparsity": float(stage.sparsity), "allocation": stage.allocation, "target": stage.target,
                    "compensate": stage.compensate, "sequential": stage.sequential, "damp": options.damp,
                    "round_to": options.round_to, "floor": options.floor, "calib": str(calib),
                    "calib_general": None if options.calib_general is None else str(options.calib_general),
                    "nsamples": options.nsamples, "seqlen": options.seqlen, "seed": options.seed,
                    "batch_size": options.batch_size, "device": self.device.type, "dtype": options.dtype or "fp32"}
        from ... import __version__  # noqa: PLC0415 - the package's version, not the driver

        fingerprint = hashlib.sha256(json.dumps(
            [self.checkpoint.fingerprint(), recorded, __version__,
             None if windows is None else hashlib.sha256(windows.numpy().tobytes()).hexdigest()],
            sort_keys=True).encode()).hexdigest()[:32]
        self.work = WorkDir(self.out, fingerprint, recorded, resume=options.resume, force=options.force)
        keep_heap_small()
        self.job = Job(self.arch, self.checkpoint, self.work, self.per_layer, stage.scorer, needs, stage.allocation,
                       self.device, self.compute_dtype, options.batch_size, options.progress)
        self.resumed = {"scored": self.work.scored_layers(self.arch.n_layers)}
        if stage.layerwise:
            # least squares, --sequential and block-scored criteria run on the layers one at a time
            self.blocks = StreamBlocks(self.arch, self.checkpoint, windows, batch_size=options.batch_size,
                                       device=self.device, dtype=self.compute_dtype, work=self.work,
                                       progress=options.progress)
        if stage.scorer.form is Form.BLOCKS:
            return score_blocks(stage.scorer, self.blocks, chosen, self.blocks.params, floor=options.floor,
                                comparable=stage.allocation == "global")
        if Need.GRADIENTS in needs:
            self.job.gradients = self._gradient_terms(chosen, windows)
            self.job.groups = GroupIndex(chosen)
        self.job.statistics(windows)
        raw, comparable, self.stats, self.angles = self.job.collected()
        return Scores(raw, comparable, None)

    def _gradient_terms(self, chosen: list, windows: torch.Tensor):
        """The gradient criteria's statistics from a layer-by-layer backward sweep over the domain
        windows (and the general ones, for two-set criteria), in batches of half the batch size as
        in memory; kept in the work directory, so a resumed run does not sweep again."""
        from ...calibration.gradients import gradient_terms_by_blocks, terms_from_tensors, terms_to_tensors
        from ...calibration.text import load_calibration, needs_bos

        options = self.options
        general_note = None if options.calib_general is None else {
            "source": str(options.calib_general), "nsamples": options.nsamples, "seqlen": options.seqlen,
            "seed": options.seed, "loss": "lm"}
        saved = self.work.load_gradients()
        if saved is not None:
            terms = terms_from_tensors(saved, chosen)
        else:
            size = max(1, options.batch_size // 2)
            batches = list(windows.split(size))
            sets = [len(batches)]
            if general_note is not None:
                general = load_calibration(options.calib_general, self.tokenizer, nsamples=options.nsamples,
                                           seqlen=options.seqlen, seed=options.seed,
                                           add_bos=needs_bos(self.arch.config))
                batches += list(general.split(size))
                sets.append(len(batches) - sets[0])
            source = StreamBlocks(self.arch, self.checkpoint, batches, batch_size=size, device=self.device,
                                  dtype=self.compute_dtype, work=self.work, progress=options.progress)
            terms = gradient_terms_by_blocks(source, chosen, sets, progress=options.progress)
            self.work.save_gradients(terms_to_tensors(terms))
        self.calib_note = {**self.calib_note, "mean_loss": round(terms.mean_loss["domain"], 6)}
        if general_note is not None:
            self.calib_note["general"] = {**general_note, "mean_loss": round(terms.mean_loss["general"], 6)}
        return terms

    def block_importance(self):
        return self.angles or None

    def calibration_note(self):
        return self.calib_note

    def apply(self, stage: Stage, chosen: list, removed: dict[str, np.ndarray], scores) -> StageResult:
        self.config_result, self.new_biases = rewrite_config(self.arch, chosen, self.per_layer, removed,
                                                             stage.compensate)
        report: dict[str, Any] = {"layerwise": None}
        provider = None
        if stage.layerwise:
            from ...passes.layerwise import LayerwiseCompensation, LayerwiseResult

            result = LayerwiseResult(removed=dict(removed))
            sweep = LayerwiseCompensation("lsq" if stage.compensate == "lsq" else "bias", sequential=stage.sequential,
                                          damp=self.options.damp, criterion=stage.scorer).blocks(
                self.blocks, chosen, result, self.blocks.params)
            done = {"last": -1}

            def provider(index: int):
                """Layer `index`'s compensated consumers (the sweep runs as far as that layer) and units."""
                while done["last"] < index:
                    done["last"] = next(sweep, len(self.per_layer))
                mine = {m: result.weights.pop(m) for m in list(result.weights)
                        if m.startswith(f"{self.arch.prefix}.{index}.")}
                return mine, result.removed

            self.layerwise_result = result
        self.resumed["written"] = self.job.cut(removed, self.stats, stage.compensate, self.config_result.config,
                                               compensated=provider)
        final_removed = self.layerwise_result.removed if stage.layerwise else removed
        if stage.layerwise:
            report["layerwise"] = self.layerwise_result.report(method=stage.compensate, sequential=stage.sequential,
                                                               damp=self.options.damp)
        if stage.compensate != "none":
            report["compensated_layers"] = len({module_of(s.param) for g in chosen if len(final_removed.get(g.id, ()))
                                                for s in consumer_slices(g)})
        report["uniform_layers"] = self.config_result.uniform
        report["config_bias_flags"] = self.config_result.bias_keys
        return StageResult(final_removed, report)

    def run_report(self) -> dict:
        peak_cuda = (round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
                     if self.device.type == "cuda" else None)
        return {"stream_run": {"resumed": self.resumed if self.work is not None and self.work.resumed else None,
                               "peak_cuda_mb": peak_cuda}}

    def report_extra(self) -> dict:
        return {"criterion_diagnostics": None,
                "streaming": {"device": self.device.type, "dtype": self.options.dtype or "fp32",
                              "layers": self.arch.n_layers, "shards": self.arch.n_layers + 1,
                              "batch_size": self.options.batch_size}}

    def finish(self, report: dict, out) -> None:
        from ...io.atomic import environment_errors

        with environment_errors(self.work.root):
            self.job.finish_files(self.config_result.config, self.tokenizer, report,
                                  total_params=report["params"]["after"])
            self.work.finish(force=self.options.force)
        return None

    def close(self) -> None:
        if self.work is not None:
            self.work.close()
