"""The PyTorch backend: the whole model in memory (an alias, an HF folder, a GGUF file, a graphprune
output, or an nn.Module handed to the Python API).

Calibration is what the stage declares: activation statistics from one forward with hooks
(`calibration.stats.collect`), gradient statistics from the loss (`calibration.gradients`), and for
block-by-block work (least squares, --sequential, structured OBS) a `calibration.blocks.BlockRunner`
that keeps one block's inputs at a time. The rewrite runs the PyTorch passes (layerwise
compensation, FLAP's bias, slicing, config rewrite) on the state dict and builds a fresh model of
the pruned shape, which `Validate` runs on a few tokens.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect as pyinspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..calibration.cache import cache_key, load_cached, save_cached, tokenizer_fingerprint, weights_fingerprint
from ..calibration.stats import Calibration, collect
from ..criteria import available as available_criteria
from ..criteria import get as get_criterion
from ..criteria.base import ExpertCriterion, Form, Need, ScoringContext, consumer_slices, module_of
from ..criteria.scoring import Scores, score_blocks, score_expert_layers, score_units
from ..errors import PruningError, UserError
from ..graph import GroupSet, analyze
from ..guards import check_finite_weights
from ..models.encoders import is_encoder, pooling_of
from ..models.structure import check_windows_fit
from ..passes.rewrite import rewrite_model
from .base import Backend, Capabilities, Stage, StageResult, register

ALL_TARGETS = frozenset({"channels", "heads", "query-heads", "kv-groups", "experts", "hidden", "expert-channels"})


def resolve_model(model: Any, tokenizer: Any = None, **load_options) -> tuple[Any, torch.nn.Module | None, Any]:
    """(LoadedModel or None, module, tokenizer) from an alias, a path, a LoadedModel or a module;
    `load_options` go to `models.load_model` (allow_pickle, trust_remote_code)."""
    loaded = None
    if isinstance(model, (str, Path)):
        from ..models import load_model

        loaded = load_model(model, **load_options)
    elif hasattr(model, "model") and hasattr(model, "tokenizer") and not isinstance(model, torch.nn.Module):
        loaded = model
    if loaded is not None:
        return loaded, loaded.model, tokenizer or loaded.tokenizer
    return None, model, tokenizer


def all_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by every name (tied names too)."""
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(dict(model.named_buffers()))
    return out


def unique_param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass
class _Calibrated:
    """What one stage's calibration produced (kept until its rewrite is done)."""

    note: dict | None = None
    batches: torch.Tensor | None = None
    statistics: Calibration | None = None
    unit_gradients: dict = field(default_factory=dict)
    general_gradients: dict = field(default_factory=dict)
    alignment: dict = field(default_factory=dict)
    runner: Any = None  # calibration.blocks.BlockRunner
    cache_state: str | None = None
    gradient_cache: str | None = None
    generated_text: list | None = None
    identity: tuple | None = None  # (weights, tokenizer) fingerprints the cache keys were built on


@register
class MemoryBackend(Backend):
    """See the module docstring."""

    name = "memory"
    capabilities = Capabilities(
        needs=Need.ACTIVATIONS | Need.BLOCK_ANGLES | Need.GRADIENTS | Need.GENERAL_GRADIENTS | Need.GRAMS
        | Need.EXPERT_ROUTING,
        compensations=frozenset({"none", "bias", "lsq"}), sequential=True, targets=ALL_TARGETS, experts=True,
        self_generated_calibration=True)

    @classmethod
    def accepts(cls, source, options) -> bool:
        return True

    def __init__(self, source: Any, options, *, tokenizer: Any = None) -> None:
        self.options = options
        if options.resume:
            raise UserError("--resume continues an interrupted streaming run: add --stream")
        from ..devices import resolve_device, resolve_dtype

        # where calibration and the block-by-block work run, and in which precision (statistics are
        # accumulated in float64 on the CPU whatever these are; the rewrite runs on the CPU)
        self.device = resolve_device(options.device or "cpu")
        self.compute_dtype = resolve_dtype(options.dtype) if options.dtype else None
        self.loaded, model, self.tokenizer = resolve_model(source, tokenizer, allow_pickle=options.allow_pickle,
                                                           trust_remote_code=options.trust_remote_code)
        if model is None:
            raise UserError("compress needs a PyTorch model here")
        # A plain nn.Module (no Hugging Face config): traced and validated on the caller's example
        # inputs, rewritten in place of a rebuild from a config (passes/modules.py)
        self.plain = self.loaded is None and getattr(model, "config", None) is None
        self.example_inputs = options.example_inputs
        if self.plain:
            if self.example_inputs is None:
                raise UserError(f"{type(model).__name__} is a plain nn.Module (no Hugging Face config), so graphprune "
                                f"cannot guess its inputs: pass example_inputs=(x,), the inputs it is traced and "
                                f"checked on")
            # calibration runs it in eval mode and the rewrite writes into it: never the caller's module
            model = copy.deepcopy(model)
        check_finite_weights(model)
        model.eval()
        self.model = model
        self.encoder = is_encoder(model)
        self.pooling = pooling_of(self._source_dir()) if self.encoder else None
        self._groups: GroupSet | None = None
        self._calibrated: _Calibrated | None = None
        self.generated: dict = {}  # settings and text of self-generated calibration (the report records them)

    # ------------------------------------------------------------------ what the model is
    def _source_dir(self) -> Path | None:
        if self.loaded is not None and self.loaded.path.is_dir():
            return self.loaded.path
        return None

    @property
    def display_name(self) -> str:
        return getattr(self.loaded, "name", type(self.model).__name__) if self.loaded else type(self.model).__name__

    def param_counts(self) -> tuple[int, int]:
        """(unique parameters, parameters of the repeated blocks) of the model as it is now. Which
        parameters are the blocks' is found once, from the graph of the model as loaded
        (`graph.blocks.layer_parameters`); pruning keeps the names, and a parameter a rewrite adds
        (a compensation bias) counts with its module."""
        from ..graph.blocks import count_layer_parameters, layer_parameters, module_sizes

        if self.plain:
            # a CNN's residual adds do not make a stack of blocks with an embedding and a head outside it
            # (a ResNet's stages change width): every parameter of a plain module counts
            total = unique_param_count(self.model)
            return total, total

        if getattr(self, "_layer_names", None) is None:
            self._layer_names = layer_parameters(self.groups())
            self._known_names = {name for name, _ in self.model.named_parameters(remove_duplicate=False)}
        return (unique_param_count(self.model),
                count_layer_parameters(module_sizes(self.model), self._layer_names, self._known_names))

    def prepare_output(self, out):
        from ..guards import model_bytes
        from ..io.hf import prepare_output

        # A lower bound of the output's size (pruning keeps at least 1 - sparsity of the layers and all
        # the rest; 0.9 absorbs the allocator's rounding): a disk too small for it fails now, not at the end.
        needed = int(0.9 * (1 - self.options.sparsity) * model_bytes(self.model))
        return prepare_output(out, inputs=self.loaded.inputs if self.loaded is not None else [],
                              force=self.options.force, needed_bytes=needed)

    @property
    def config(self):
        return getattr(self.model, "config", None)

    def groups(self) -> GroupSet:
        if self._groups is None:
            self._groups = analyze(self.model, self.example_inputs)
        return self._groups

    def default_target(self, groups) -> tuple[str, str | None]:
        from ..passes.config import heads_expressible

        if self.plain:
            return "channels", None  # no config to state fewer heads in; attention modules are refused anyway
        if heads_expressible(self.model, groups):
            return "channels,heads", None
        return "channels", (f"{type(self.model.config).__name__} derives head_dim from hidden_size / heads, so "
                            f"removing heads cannot be written to its config: pruning channels only")

    def _without_data(self) -> str | None:
        """Why this run has no calibration text to fit a compensation on, or None."""
        if self.plain:
            return (None if self._module_data() is not None
                    else "a weight-only criterion on a plain nn.Module given no calib= inputs reads no data")
        if self.tokenizer is None:
            return "the model has no tokenizer to read calibration text with"
        if [str(c) for c in self.options.calib_sources] == ["none"]:
            return "--calib none with a weight-only criterion reads no data"
        return None

    def default_compensation(self, criterion: str, chosen: list) -> tuple[str, str | None]:
        from ..moe.channels import is_expert_channel
        from ..passes import compensation

        scorer = get_criterion(criterion)
        nodata = self._without_data() if not scorer.needs else None
        if nodata:
            return "none", f"--compensate none: {nodata}"
        if self.plain:
            fallback = compensation.fallback_for(criterion)
            return fallback, (f"--compensate {fallback}: least squares refits layers block by block through a Hugging "
                              f"Face model's repeated layers, which a plain nn.Module does not have"
                              + ("; bias compensation covers Linear and (ungrouped) Conv consumers"
                                 if fallback == "bias" else ""))
        if any(is_expert_channel(g) for g in chosen):
            fallback = "none" if criterion != "flap" else compensation.fallback_for(criterion)
            return fallback, (f"--compensate {fallback}: least squares refits plain linear layers, not the stacked "
                              f"weights of routed experts")
        if self.encoder and Need.GRADIENTS in scorer.needs:
            return "none", ("--compensate none: compensation refits the FFN output before the encoder's residual "
                            "LayerNorm, which a gradient criterion does not rank by (measured worse, "
                            "docs/benchmarks.md)")
        transposed = sorted({s.param for g in chosen for s in consumer_slices(g)
                             if s.expert is None and s.axis != self.model.get_parameter(s.param).dim() - 1})
        if transposed:
            fallback = compensation.fallback_for(criterion)
            return fallback, (f"--compensate {fallback}: least squares reads weights as [out, in] and "
                              f"{transposed[0]} (a Conv1D) stores [in, out]")
        return super().default_compensation(criterion, chosen)

    def default_pipeline(self, chosen: list) -> tuple[str, str, bool]:
        from ..moe.channels import is_expert_channel

        if self.plain:  # FLAP with its bias when the caller gave inputs to calibrate on, else weights only
            return ("flap", "bias", False) if self._module_data() is not None else ("magnitude", "none", False)
        if self.encoder:
            # the loss-Fisher ranking needs an LM loss; on encoders FLAP's ranking is the measured one
            return "flap", "lsq", False
        if any(is_expert_channel(g) for g in chosen):
            # structured OBS and least squares need plain linear layers, not stacked expert weights
            return "flap", "bias", False
        return super().default_pipeline(chosen)

    def default_allocation(self) -> str:
        # encoders keep one shape per layer, so plain AutoModel / SentenceTransformer load the output
        return "uniform" if self.encoder else "global"

    # ------------------------------------------------------------------ plain modules
    def _module_data(self):
        """The calib= data a plain module can run on (model-input batches, or token rows of one length), or None."""
        from ..calibration.data import CalibrationData

        calib = self.options.calib_sources[0] if self.options.calib_sources else None
        if isinstance(calib, CalibrationData) and (calib.is_model_inputs or calib.rows is not None):
            return calib
        return None

    def _prepare_plain(self, stage: Stage, chosen: list) -> list:
        from ..errors import CalibrationError

        name = type(self.model).__name__
        if self.options.export is not None:
            raise UserError(f"--export onnx writes a text model's ONNX interface (input_ids, logits); the plain "
                            f"nn.Module {name} is saved as model.safetensors and model.pt2 (torch.export)")
        if stage.layerwise:
            what = (f"criterion {stage.criterion!r}" if stage.scorer.form is Form.BLOCKS
                    else "--compensate lsq / --sequential")
            raise PruningError(f"{what} works block by block through a Hugging Face model's repeated layers; {name} is a "
                               f"plain nn.Module: use --compensate bias or none and a criterion such as magnitude, "
                               f"wanda-sp or flap")
        if Need.GRADIENTS in stage.needs or Need.BLOCK_ANGLES in stage.needs or Need.EXPERT_ROUTING in stage.needs:
            lacking = "a language-model loss" if Need.GRADIENTS in stage.needs else "repeated decoder blocks"
            raise PruningError(f"criterion '{stage.criterion}' (allocation {stage.allocation}) needs {lacking}, which "
                               f"the plain nn.Module {name} does not have; use magnitude, spectral, wanda-sp or flap")
        if stage.needs and self._module_data() is None:
            what = f"criterion '{stage.criterion}'" if stage.scorer.needs else f"--compensate {stage.compensate}"
            raise CalibrationError(f"{what} needs calibration inputs for the plain nn.Module {name}: pass calib= a "
                                   f"tensor (a batch of inputs), a list of tensors or a DataLoader yielding tensors or "
                                   f"(tensor, label) tuples (calib='none' only suits weight criteria such as magnitude)")
        return chosen

    def _calibrate_plain(self, stage: Stage, chosen: list) -> _Calibrated:
        from ..calibration.stats import collect_module_inputs

        out = _Calibrated()
        if not stage.needs:
            return out
        data = self._module_data()
        batches = data.model_inputs(self.example_inputs)
        convs = {n for n, m in self.model.named_modules()
                 if isinstance(m, torch.nn.modules.conv._ConvNd) and m.groups == 1 and not m.transposed}
        # channel statistics of Linear and plain Conv inputs (a grouped conv's weight holds in-group channels only)
        modules = sorted({module_of(s.param) for g in chosen for s in consumer_slices(g, conv=True)
                          if s.expert is None and (s.role != "conv.in" or module_of(s.param) in convs)})
        out.statistics = collect_module_inputs(self.model, batches, input_modules=modules,
                                               progress=self.options.progress)
        out.note = {"source": str(data), "batches": len(batches), "samples": out.statistics.tokens,
                    "sha256": data.sha256}
        out.cache_state = "off"  # the cache is keyed on tokenizers and token windows
        return out

    # ------------------------------------------------------------------ checks
    def prepare(self, stage: Stage, chosen: list) -> list:
        if stage.kind == "experts":
            return chosen
        if self.plain:
            stage.scorer.check_model(self.model)
            return self._prepare_plain(stage, chosen)
        scorer = stage.scorer
        scorer.check_model(self.model)
        if self.encoder and stage.compensate != "none" and Need.GRADIENTS in scorer.needs:
            stage.notes.append(
                f"--compensate {stage.compensate} refits the FFN output before the encoder's residual LayerNorm, "
                f"which a gradient criterion does not rank by: measured worse than none (docs/benchmarks.md, encoders)")
        if Need.GRADIENTS in stage.needs and not self.encoder \
                and "labels" not in pyinspect.signature(self.model.forward).parameters:
            others = [n for n in available_criteria() if Need.GRADIENTS not in get_criterion(n).needs
                      and not isinstance(get_criterion(n), ExpertCriterion)]
            raise PruningError(f"criterion '{stage.criterion}' needs the gradient of a language-model loss, which "
                               f"{type(self.model).__name__} does not compute; choose one of {', '.join(others)}")
        from ..moe.channels import is_expert_channel

        if stage.layerwise and any(is_expert_channel(g) for g in chosen):
            chosen = [g for g in chosen if not is_expert_channel(g)]
            stage.notes.append("channels inside routed experts are left as they are: least-squares compensation, "
                               "--sequential and obs need plain linear layers, not stacked expert weights")
            if not chosen:
                raise PruningError(f"no {stage.target} groups left to prune: channels inside routed experts cannot "
                                   f"be used with --compensate lsq, --sequential or criterion obs")
        if stage.layerwise:
            from ..passes.base import Plan
            from ..passes.layerwise import LayerwiseCompensation

            LayerwiseCompensation.check(Plan(self.model, chosen, stage))
        return chosen

    # ------------------------------------------------------------------ calibration and scores
    def _check_activation_memory(self, stage: Stage) -> None:
        """Refuse, before any work, a calibration set whose activations cannot fit in memory: block by
        block work keeps a block's inputs and outputs for every window (and the loss Fisher one block's
        inputs per layer for the windows it uses)."""
        from .stream.backend import available_memory_bytes

        hidden = getattr(self.config, "hidden_size", None) or getattr(self.config, "n_embd", None)
        available = available_memory_bytes()
        if not hidden or available is None or not stage.layerwise:
            return
        options = self.options
        tokens = options.nsamples * options.seqlen
        layers = getattr(self.config, "num_hidden_layers", None) or 1
        fisher = min(options.nsamples, getattr(stage.scorer, "fisher_windows", None) or options.nsamples)
        needed = 4 * hidden * (3 * tokens + fisher * options.seqlen * layers)
        if needed > 0.8 * available:
            raise UserError(f"--nsamples {options.nsamples} x --seqlen {options.seqlen} needs about "
                            f"{needed / 2**30:.1f} GiB of activations for block-by-block calibration and "
                            f"{available / 2**30:.1f} GiB are available: lower --nsamples or --seqlen, or prune "
                            f"layer by layer from disk with --stream")

    def _calibrate(self, stage: Stage, chosen: list) -> _Calibrated:
        options = self.options
        needs = stage.needs
        out = _Calibrated()
        if not needs:
            return out
        if self.plain:
            return self._calibrate_plain(stage, chosen)
        self._check_activation_memory(stage)
        if self.tokenizer is None:
            raise UserError(f"criterion '{stage.criterion}' needs calibration text but the model has no tokenizer")
        from ..calibration.sets import CalibrationSet, calibration_set, content_digest

        model = self.model
        calib = options.calib_sources[0]
        set_options = dict(encoder=self.encoder, pooling=self.pooling, nsamples=options.nsamples,
                           seqlen=options.seqlen, seed=options.seed,
                           batch_size=options.pair_batch if self.encoder else max(1, options.batch_size // 2))
        generated = None
        if str(calib) == "none":  # no data: the model writes its own calibration text
            from ..calibration.gradients import lm_steps
            from ..calibration.selfgen import self_generated

            if self.encoder:
                raise UserError("--calib none lets a causal LM write its own text; an embedding model needs "
                                "(query, positive) pairs: give --calib FILE")
            generated = self_generated(model, self.tokenizer, nsamples=options.nsamples, seqlen=options.seqlen,
                                       seed=options.seed, use_cache=options.use_cache, progress=options.progress)
            batches = generated.batches
            out.note = {"source": "none", "nsamples": options.nsamples, "seqlen": options.seqlen,
                        "seed": options.seed, "generation": generated.settings,
                        "sha256": content_digest(batches)}
            domain = CalibrationSet(batches, lm_steps(model, batches, set_options["batch_size"]), dict(out.note))
        else:
            domain = calibration_set(model, self.tokenizer, calib, **set_options)
            batches = domain.windows
            out.note = dict(domain.note)
        out.batches = batches
        check_windows_fit(self.config, batches)
        if options.use_cache:
            # Keys cover every byte of the weights and the tokenizer; the note carries the digest of the
            # calibration windows (not only the file's path: an edited file is new data).
            out.identity = (weights_fingerprint(model), tokenizer_fingerprint(self.tokenizer))
        if needs & (Need.ACTIVATIONS | Need.BLOCK_ANGLES):
            from ..moe.channels import expert_input_hooks

            modules = sorted({module_of(s.param) for g in chosen for s in consumer_slices(g) if s.expert is None})
            expert_keys, expert_hooks = expert_input_hooks(model, chosen)
            key = cache_key("stats-v2", out.identity, out.note, modules + expert_keys, Need.BLOCK_ANGLES in needs)
            statistics = load_cached(key, expect=modules + expert_keys) if options.use_cache else None
            out.cache_state = "hit" if statistics is not None else "miss" if options.use_cache else "off"
            if statistics is None:
                statistics = collect(model, batches, input_modules=modules, block_angles=Need.BLOCK_ANGLES in needs,
                                     extra_hooks=expert_hooks, batch_size=options.batch_size,
                                     progress=options.progress)
                if options.use_cache:
                    save_cached(key, statistics)
            out.statistics = statistics
        if Need.GRADIENTS in needs:
            from ..calibration.gradients import gradient_terms

            general = (calibration_set(model, self.tokenizer, options.calib_general, **set_options)
                       if options.calib_general else None)
            key = cache_key("grads-v2", out.identity, domain.note, general and general.note,
                            set_options["batch_size"], [(g.id, g.units) for g in chosen])
            terms = gradient_terms(model, chosen, domain.steps, general and general.steps, progress=options.progress,
                                   cache_key=key if options.use_cache else None)
            out.unit_gradients, out.general_gradients, out.alignment = terms.domain, terms.general, terms.alignment
            out.note = {**out.note, "mean_loss": round(terms.mean_loss["domain"], 6)}
            out.gradient_cache = "hit" if terms.cached else "miss" if options.use_cache else "off"
            if general is not None:
                out.note["general"] = {**general.note, "mean_loss": round(terms.mean_loss["general"], 6)}
        if Need.GRAMS in needs:
            from ..calibration.blocks import BlockRunner

            out.runner = BlockRunner(model, batches, batch_size=options.batch_size, progress=options.progress)
        if generated is not None:
            out.note["generated_text"] = generated.texts  # after the cache key: reproducibility record
        return out

    @contextlib.contextmanager
    def _on_device(self):
        """The model on --device, computing in --dtype (autocast), for the forward passes."""
        if self.device.type != "cpu":
            self.model.to(self.device)
        cast = (torch.autocast(self.device.type, dtype=self.compute_dtype) if self.compute_dtype is not None
                and self.compute_dtype != torch.float32 else contextlib.nullcontext())
        with cast:
            yield

    def _to_cpu(self) -> None:
        if self.device.type != "cpu":
            self.model.to("cpu")

    def score(self, stage: Stage, chosen: list) -> Scores:
        if stage.kind == "experts":
            return self._score_experts(stage, chosen)  # routing statistics are collected on the CPU
        scorer = stage.scorer
        comparable = stage.allocation == "global"
        with self._on_device():
            self._calibrated = calibrated = self._calibrate(stage, chosen)
            if calibrated.statistics is not None:
                calibrated.statistics.cpu()
            if scorer.form is Form.BLOCKS:
                key = (cache_key("obs-paths-v3", calibrated.identity, calibrated.note,
                                 scorer.path_options(self.model), self.options.floor,
                                 [(g.id, g.units) for g in chosen]) if self.options.use_cache else None)
                scores = score_blocks(scorer, calibrated.runner, chosen, all_params(self.model),
                                      floor=self.options.floor, comparable=comparable, cache_key=key)
        if scorer.form is not Form.BLOCKS:
            self._to_cpu()
        params = all_params(self.model)
        ctx = ScoringContext(self.model, self.groups(), params, calibrated.statistics, calibrated.unit_gradients,
                             calibrated.general_gradients, calibrated.alignment)
        if scorer.form is not Form.BLOCKS:
            scores = score_units(scorer, chosen, ctx, comparable=comparable)
        scores.diagnostics = scorer.diagnostics(chosen, ctx)
        return scores

    def calibration_note(self):
        return self._calibrated.note if self._calibrated is not None else None

    def run_report(self) -> dict:
        c = self._calibrated or _Calibrated()
        out = {"calibration_cache": c.cache_state}
        if c.gradient_cache:
            out["gradient_cache"] = c.gradient_cache
        return out

    def block_importance(self) -> dict[int, float] | None:
        c = self._calibrated
        return c.statistics.block_angle if c is not None and c.statistics is not None else None

    # ------------------------------------------------------------------ routed experts
    def expert_layers(self):
        from ..moe.layers import find_expert_layers

        return find_expert_layers(self.model, self.groups())

    def _score_experts(self, stage: Stage, layers: list) -> Scores:
        """Expert scores per layer (as a `Scores` keyed by the layers' expert group ids)."""
        from ..calibration.text import load_calibration, needs_bos
        from ..calibration.selfgen import self_generated

        options = self.options
        scorer = stage.scorer
        domains: dict[str, list] = {layer.experts: [] for layer in layers}
        sources = [str(c) for c in options.calib_sources]
        if scorer.needs:
            if self.tokenizer is None:
                raise UserError(f"criterion '{scorer.name}' needs calibration text but the model has no tokenizer")
            for source in options.calib_sources:
                if str(source) == "none":
                    text = self_generated(self.model, self.tokenizer, nsamples=options.nsamples, seqlen=options.seqlen,
                                          seed=options.seed, use_cache=options.use_cache, progress=options.progress)
                    batches = text.batches
                    self.generated.update(generation=text.settings, generated_text=text.texts)
                else:
                    batches = load_calibration(source, self.tokenizer, nsamples=options.nsamples,
                                               seqlen=options.seqlen, seed=options.seed, add_bos=needs_bos(self.model))
                stats = self._routing_statistics(layers, batches, str(source))
                for name, st in stats.items():
                    domains[name].append(st)
        per_layer = score_expert_layers(scorer, layers, domains)
        self._expert_calibration = ({"sources": sources, "nsamples": options.nsamples, "seqlen": options.seqlen,
                                     "seed": options.seed, **self.generated} if scorer.needs else None)
        return Scores({layer.group.id: per_layer[layer.layer] for layer in layers})

    def _routing_statistics(self, layers: list, batches: torch.Tensor, source: str) -> dict:
        """Routing statistics of `batches`, cached like the activation statistics (so comparing expert
        criteria on the same calibration collects them once)."""
        from ..calibration.cache import read_cache_entry, write_cache_tensors
        from ..moe.routing import ExpertStats, collect_expert_stats

        options = self.options
        key = cache_key("routing-v1", weights_fingerprint(self.model), source,
                        cache_key(batches.numpy().tobytes()), [layer.experts for layer in layers])
        cached = read_cache_entry(key) if options.use_cache else None
        names = [f.name for f in dataclasses.fields(ExpertStats)]
        if cached is not None and all(f"{layer.experts}/{n}" in cached for layer in layers for n in names):
            return {layer.experts: ExpertStats(**{n: (int(cached[f"{layer.experts}/{n}"][0])
                                                      if n in ("tokens", "residual_tokens")
                                                      else cached[f"{layer.experts}/{n}"]) for n in names})
                    for layer in layers}
        stats = collect_expert_stats(self.model, layers, batches, batch_size=options.batch_size,
                                     progress=options.progress)
        if options.use_cache:
            tensors = {}
            for module, st in stats.items():
                for n in names:
                    value = getattr(st, n)
                    tensors[f"{module}/{n}"] = torch.tensor([value]) if isinstance(value, int) else value
            write_cache_tensors(key, tensors)
        return stats

    def expert_calibration_note(self) -> dict | None:
        return getattr(self, "_expert_calibration", None)

    # ------------------------------------------------------------------ the rewrite
    def extra_passes(self) -> tuple:
        """Passes this backend adds to the rewrite after slicing (none; a subclass may add some)."""
        return ()

    def apply(self, stage: Stage, chosen: list, removed: dict[str, np.ndarray], scores) -> StageResult:
        calibrated = self._calibrated if stage.kind == "units" else None
        report: dict[str, Any] = {}
        compensated = None
        if calibrated is not None and stage.layerwise:
            from ..passes.layerwise import LayerwiseCompensation

            with self._on_device():
                result = LayerwiseCompensation("lsq" if stage.compensate == "lsq" else "bias",
                                               sequential=stage.sequential, damp=self.options.damp,
                                               criterion=stage.scorer).run(calibrated.runner, chosen, removed,
                                                                           all_params(self.model))
            removed, compensated = result.removed, result.weights
            report["layerwise"] = result.report(method=stage.compensate, sequential=stage.sequential,
                                                damp=self.options.damp)
            calibrated.runner = None
        elif stage.kind == "units":
            report["layerwise"] = None
        self._to_cpu()
        if self.plain:
            from ..passes.modules import output_shapes, rewrite_module

            expected = output_shapes(self.model, self.example_inputs)
            statistics = calibrated.statistics if calibrated is not None and stage.compensate == "bias" else None
            new_model, extra = rewrite_module(self.model, self.groups(), chosen, removed,
                                              example_inputs=self.example_inputs, expected=expected,
                                              statistics=statistics, before_adopt=self.extra_passes())
            report.update(extra)
            self.model = new_model
            self._groups = None
            return StageResult(removed, report)
        new_model, extra = rewrite_model(
            self.model, self.groups(), chosen, removed,
            statistics=calibrated.statistics if calibrated is not None and stage.compensate == "bias" else None,
            release_input=self.options.release_input, compensated=compensated, before_rebuild=self.extra_passes())
        report.update(extra)
        self.model = new_model
        self._groups = None
        return StageResult(removed, report)

    def output_dtype(self) -> torch.dtype | None:
        """--out-dtype, else the dtype the input's weights are stored in (None: as loaded)."""
        from ..devices import resolve_dtype

        if self.options.out_dtype is not None:
            return resolve_dtype(self.options.out_dtype)
        return getattr(self.loaded, "stored_dtype", None)

    def finish(self, report: dict, out) -> torch.nn.Module:
        dtype = self.output_dtype()
        if dtype is not None and dtype != next(self.model.parameters()).dtype:
            self.model = self.model.to(dtype)
        if out is not None and self.plain:
            from ..io.hf import save_module

            save_module(self.model, out, example_inputs=self.example_inputs, report=report, force=self.options.force)
            self.exported = []
        elif out is not None:
            from ..io.hf import save_pruned

            exported = []
            also = None
            if self.options.export == "onnx":
                from ..io.onnx_export import write_onnx

                def also(tmp):  # inside the temporary output: a failed parity check writes nothing
                    exported.append(write_onnx(self.model, tmp, tokenizer=self.tokenizer))
            save_pruned(self.model, out, tokenizer=self.tokenizer, report=report, source_dir=self._source_dir(),
                        force=self.options.force, also=also)
            self.exported = exported
        return self.model
