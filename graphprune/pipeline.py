"""`compress`: trace -> groups -> calibration -> scores -> allocation -> rewrite -> validate -> save."""

from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import allocation as alloc_mod
from . import criteria as criteria_mod
from .calibrate import Calibration, cache_key, collect, find_blocks, load_cached, save_cached
from .criteria.base import MissingStatistics, ScoringContext, consumer_slices, module_of
from .errors import PruningError, UserError
from .guards import check_finite_weights
from .graph import GroupSet, analyze
from .graph.groups import BLOCKED, PRUNABLE, OPT_IN, Group
from .passes import BiasCompensation, ConfigRewrite, SliceParameters, Validate
from .passes.config import instantiate

# "heads" means whole KV groups under GQA and plain heads otherwise (see select_groups).
TARGETS = {"channels": ("channel",), "heads": ("kv-group",), "query-heads": ("head",), "kv-groups": ("kv-group",),
           "experts": ("expert",), "hidden": ("hidden",), "expert-channels": ("channel",)}
COMPENSATIONS = ("none", "bias", "lsq")
DEFAULT_TARGET = "channels,heads"
# flap keeps FLAP's own bias compensation and obs needs least squares. lsq measures better for flap
# (README: 32.9 vs 36.6 PPL at 20%, 288 vs 922 at 50%) but takes about twice the time, is refused on
# Conv1D layouts (GPT-2) and does not exist for ONNX input, so it is asked for, not the default.
DEFAULT_COMPENSATION = {"flap": "bias", "obs": "lsq"}


@dataclass
class CompressResult:
    model: torch.nn.Module
    report: dict[str, Any]
    groups: GroupSet
    removed: dict[str, np.ndarray] = field(default_factory=dict)


def _layer_params(model: torch.nn.Module) -> int:
    """Parameters inside the repeated blocks (decoder/encoder layers): the sparsity denominator."""
    found = find_blocks(model)
    if found is None:
        return sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in found[1].parameters())


def resolve_model(model: Any, tokenizer: Any = None) -> tuple[Any, torch.nn.Module | None, Any]:
    """(LoadedModel or None, module, tokenizer) from an alias, a path, a LoadedModel or a module."""
    loaded = None
    if isinstance(model, (str, Path)):
        from .models import load_model

        loaded = load_model(model)
    elif hasattr(model, "model") and hasattr(model, "tokenizer") and not isinstance(model, torch.nn.Module):
        loaded = model
    if loaded is not None:
        return loaded, loaded.model, tokenizer or loaded.tokenizer
    return None, model, tokenizer


def heads_expressible(model: torch.nn.Module, groups: GroupSet) -> bool:
    """Can the config describe one head fewer per layer? Tried on a meta model: families that
    derive head_dim from hidden_size / heads (BERT, GPT-2) cannot."""
    import copy

    from .passes.config import HEAD_KEYS, KV_KEYS, _find_key, head_dim_of

    config = getattr(model, "config", None)
    head_groups = [g for g in groups if g.kind in ("kv-group", "head") and g.prunable]
    heads = next((getattr(config, k) for k in HEAD_KEYS if getattr(config, k, None)), None)
    if heads is None or not head_groups:
        return False
    kv = next((g for g in head_groups if g.kind == "kv-group"), None)
    trial = copy.deepcopy(config)
    try:
        setattr(trial, _find_key(config, HEAD_KEYS, heads), heads - (heads // kv.units if kv is not None else 1))
        if kv is not None:
            kv_key = _find_key(config, KV_KEYS, kv.units)
            if kv_key:
                setattr(trial, kv_key, kv.units - 1)
        trial.head_dim = head_dim_of(config)
        meta = instantiate(type(model), trial)
    except Exception:  # noqa: BLE001 - the config refuses such a head count
        return False
    probe = head_groups[0].slices[0]
    size = dict(meta.named_parameters(remove_duplicate=False)).get(probe.param)
    if size is None:
        return False
    expected = model.get_parameter(probe.param).shape[probe.axis] - probe.width
    return size.shape[probe.axis] == expected


def default_target(model: torch.nn.Module, groups) -> tuple[str, str | None]:
    """(target, note): channels and heads where the config can state fewer heads, else channels."""
    if heads_expressible(model, groups):
        return DEFAULT_TARGET, None
    return "channels", (f"{type(model.config).__name__} derives head_dim from hidden_size / heads, so removing "
                        f"heads cannot be written to its config: pruning channels only")


def select_groups(groups: GroupSet, target: str, inside_experts: bool = True) -> list[Group]:
    """The prunable groups of the target's kinds. Channels inside routed experts (one group per
    expert of stacked weights, `graphprune.moe.channels`) are "channels" unless `inside_experts`
    is False (for callers whose rewrite cannot keep the experts' widths equal)."""
    kinds: set[str] = set()
    parts = [t.strip() for t in target.split(",") if t.strip()]
    for part in parts:
        if part not in TARGETS:
            raise UserError(f"unknown --target '{part}' (choose from {', '.join(TARGETS)})")
        kinds.update(TARGETS[part])
    # "expert-channels": the channels inside routed experts only (attention, shared experts and
    # dense FFNs untouched)
    only_inside_experts = "expert-channels" in parts and "channels" not in parts

    def wanted(g: Group) -> bool:
        if g.kind == "channel" and only_inside_experts:
            return any(s.expert is not None for s in g.slices)
        if g.kind in kinds:
            return True
        # "heads" removes whole KV groups under GQA; with plain multi-head attention (no KV group
        # above the heads) it removes heads.
        return "kv-group" in kinds and g.kind == "head" and g.parent is None

    chosen = [g for g in groups if wanted(g) and g.status in (PRUNABLE, OPT_IN)]
    if not inside_experts:
        chosen = [g for g in chosen if not any(s.expert is not None for s in g.slices)]
    if not chosen:
        blocked = [g for g in groups if g.kind in kinds]
        if blocked:
            # An op without a rule is what the user can act on: name it before structural reasons.
            reasons = "; ".join(sorted({(g.reason or g.status) for g in blocked},
                                       key=lambda r: (not r.startswith("blocked by"), r))[:2])
            raise PruningError(f"no prunable {target} groups: {reasons}")
        raise PruningError(f"the model has no {target} groups to prune")
    return chosen


def _target_parts(target: str | None) -> list[str]:
    parts = [t.strip() for t in (target or DEFAULT_TARGET).split(",") if t.strip()] or [""]
    for part in parts:
        if part not in TARGETS:
            raise UserError(f"unknown --target '{part}' (choose from {', '.join(TARGETS)})")
    return parts


def resolve_criteria(criterion: str | None, expert_criterion: str | None, target: str | None
                     ) -> tuple[str | None, str | None]:
    """(criterion for channels/heads, criterion for routed experts); None where that stage does not run.

    Expert criteria (easyep, reap, ...) score experts only, the others channels and heads only:
    `--target experts` takes `--criterion` when it names an expert criterion, a combined target
    takes the expert one from `--expert-criterion` (default easyep)."""
    from .criteria.base import ExpertCriterion

    parts = _target_parts(target)
    is_expert = criterion is not None and isinstance(criteria_mod.get(criterion), ExpertCriterion)
    if expert_criterion is not None:
        criteria_mod.get(expert_criterion)
    if "experts" not in parts:
        if is_expert:
            raise UserError(f"criterion '{criterion}' scores routed experts: use it with --target experts")
        if expert_criterion is not None:
            raise UserError("--expert-criterion needs --target experts (e.g. --target experts,channels)")
        return criterion or "flap", None
    if parts == ["experts"]:
        if criterion is not None and not is_expert and expert_criterion is None:
            from .moe import expert_criterion as check_expert

            check_expert(criterion)  # raises: names the expert criteria
        return None, expert_criterion or (criterion if is_expert else None) or "easyep"
    if is_expert:
        raise UserError(f"criterion '{criterion}' scores experts only; with --target {target} name the channel/head "
                        f"criterion with --criterion and the expert one with --expert-criterion {criterion}")
    return criterion or "flap", expert_criterion or "easyep"


def check_options(*, criterion: str | None, sparsity: float, allocation: str | None, target: str | None,
                  compensate: str | None, round_to: int = 1, sequential: bool = False,
                  calib_general: str | None = None, expert_criterion: str | None = None,
                  expert_sparsity: float | None = None, expert_allocation: str = "uniform",
                  calib_sources: int = 1) -> str:
    """Validate the options before any expensive work; returns the effective compensation."""
    for name, value in (("--sparsity", sparsity), ("--expert-sparsity", expert_sparsity)):
        if value is None and name == "--expert-sparsity":
            continue
        if not isinstance(value, (int, float)) or math.isnan(value) or not (0.0 < float(value) < 1.0):
            raise UserError(f"{name} must be a number strictly between 0 and 1, got {value}")
    criterion, expert = resolve_criteria(criterion, expert_criterion, target)
    if expert is not None:
        from .moe import EXPERT_ALLOCATIONS, expert_criterion as check_expert

        check_expert(expert)
        if expert_allocation not in EXPERT_ALLOCATIONS:
            raise UserError(f"unknown --expert-allocation '{expert_allocation}' (choose from "
                            f"{', '.join(EXPERT_ALLOCATIONS)})")
    if criterion is not None and calib_sources > 1:
        raise UserError("several --calib sources are combined by the expert criteria only; channels and heads "
                        "calibrate on one (gaprune takes its second set with --calib-general)")
    two_sets = criterion is not None and "general_gradients" in criteria_mod.get(criterion).needs
    if two_sets and calib_general is None:
        raise UserError(f"criterion '{criterion}' compares a domain and a general calibration set: give the general "
                        f"one with --calib-general FILE (and the domain one with --calib)")
    if not two_sets and calib_general is not None:
        raise UserError(f"--calib-general is only used by criteria that compare two calibration sets (gaprune), "
                        f"not by '{criterion or expert}'")
    if allocation is not None and allocation not in alloc_mod.ALLOCATIONS:
        raise UserError(f"unknown --allocation '{allocation}' (choose from {', '.join(alloc_mod.ALLOCATIONS)})")
    if compensate is None:
        compensate = DEFAULT_COMPENSATION.get(criterion, "none")
    if compensate not in COMPENSATIONS:
        raise UserError(f"unknown --compensate '{compensate}' (choose from {', '.join(COMPENSATIONS)})")
    if criterion == "obs" and compensate != "lsq":
        raise UserError("criterion 'obs' chooses units for a least-squares update: use --compensate lsq (its default)")
    if sequential and compensate == "none":
        raise UserError("--sequential recalibrates each layer for its compensation: it needs --compensate bias or lsq")
    if round_to < 1:
        raise UserError("--round-to must be a positive integer")
    return compensate


def compress(model: Any, *, criterion: str | None = None, sparsity: float = 0.2, allocation: str | None = None,
             target: str | None = None, calib: str | list[str] = "default", calib_general: str | None = None,
             nsamples: int = 128, seqlen: int = 128,
             seed: int = 0, compensate: str | None = None, round_to: int = 1, floor: int = 1,
             batch_size: int = 8, progress: bool = True, tokenizer: Any = None, use_cache: bool = True,
             criterion_options: dict | None = None, release_input: bool = False, sequential: bool = False,
             damp: float = 0.01, pair_batch: int = 16, expert_criterion: str | None = None,
             expert_sparsity: float | None = None, expert_allocation: str = "uniform") -> CompressResult:
    """Prune `model` (an alias, a path, a LoadedModel or an HF nn.Module) and return the smaller model.

    Embedding models (encoders) calibrate on (query, positive) pairs: `calib` (and for gaprune
    `calib_general`) name pair files or texts to derive pairs from, `nsamples` is the number of
    pairs, `seqlen` the tokens per text, `pair_batch` the pairs per InfoNCE batch. Allocation
    defaults to `global` for decoders and `uniform` for encoders, whose output then keeps shapes
    that plain `AutoModel` / `SentenceTransformer` can load.

    Nothing is written here: `save_pruned` writes the result atomically. The input model is left
    as it was unless `release_input=True`, which lets the pruned parameters of the input be freed
    during the rewrite (the CLI does this: it keeps peak memory near one model).

    `criterion` defaults to flap (easyep for `target="experts"`). With "experts" in `target`, routed
    experts are removed first (`expert_sparsity`, default `sparsity`, is the fraction of routed
    experts removed; see `graphprune.moe`), then the other targets of the expert-pruned model lose
    `sparsity` of its layer parameters. `calib` may list several sources: expert criteria combine
    them by per-layer normalised sums, channel statistics are taken over all of them.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    compensate = check_options(criterion=criterion, sparsity=sparsity, allocation=allocation, target=target,
                               compensate=compensate, round_to=round_to, sequential=sequential,
                               calib_general=calib_general, expert_criterion=expert_criterion,
                               expert_sparsity=expert_sparsity, expert_allocation=expert_allocation,
                               calib_sources=1 if isinstance(calib, (str, Path)) else len(calib))
    criterion, expert_criterion = resolve_criteria(criterion, expert_criterion, target)
    calib_sources = [calib] if isinstance(calib, (str, Path)) else list(calib)
    calib = calib_sources[0]  # the channel/head stage calibrates on one source (checked above)

    loaded, model, tokenizer = resolve_model(model, tokenizer)
    if model is None:
        raise UserError("compress needs a PyTorch model here (ONNX-native pruning is not available yet)")
    check_finite_weights(model)
    model.eval()
    from .embedding import is_encoder, pooling_of

    encoder = is_encoder(model)
    pooling = pooling_of(loaded.path if loaded is not None and loaded.path.is_dir() else None) if encoder else None
    if allocation is None:
        allocation = "uniform" if encoder else "global"
    timings["load"] = time.perf_counter() - started

    t = time.perf_counter()
    groups = analyze(model)
    experts_stage = None
    if expert_criterion is not None:
        from .moe import prune_experts

        original = {"before": sum(p.numel() for p in _unique_params(model)), "layers_before": _layer_params(model),
                    "flops_before": _flops_per_token(groups)}
        experts_stage = prune_experts(
            model, groups, criterion=expert_criterion, sparsity=expert_sparsity or sparsity,
            allocation=expert_allocation, calib=calib_sources, tokenizer=tokenizer, nsamples=nsamples,
            seqlen=seqlen, seed=seed, batch_size=batch_size, progress=progress,
            criterion_options=criterion_options if criterion is None else None, release_input=release_input,
            use_cache=use_cache)
        timings.update({f"experts_{k}": v for k, v in experts_stage.timings.items()})
        timings["experts"] = time.perf_counter() - t
        model = experts_stage.model
        target = ",".join(p for p in _target_parts(target) if p != "experts")
        if not target:
            return _experts_result(loaded, model, groups, experts_stage, original, timings, started)
        t = time.perf_counter()
        groups = analyze(model)
    scorer = criteria_mod.get(criterion, **(criterion_options or {}))
    scorer.check_model(model)
    target, target_note = default_target(model, groups) if target is None else (target, None)
    chosen = select_groups(groups, target)
    timings["trace"] = time.perf_counter() - t
    if encoder and compensate != "none" and "gradients" in scorer.needs:
        target_note = "; ".join(filter(None, [target_note, (
            f"--compensate {compensate} refits the FFN output before the encoder's residual LayerNorm, which "
            f"a gradient criterion does not rank by: measured worse than none (MiniLM-L6, fisher at 50%: "
            f"domain MRR 0.573 without, 0.524 bias, 0.134 lsq)")]))

    needs = scorer.needs | ({"activations"} if compensate == "bias" else set())
    # Encoders get InfoNCE on pairs (embedding.py); other models need an LM loss.
    if "gradients" in needs and not encoder and "labels" not in inspect.signature(model.forward).parameters:
        from .criteria.base import ExpertCriterion

        others = [n for n in criteria_mod.available() if "gradients" not in criteria_mod.get(n).needs
                  and not isinstance(criteria_mod.get(n), ExpertCriterion)]
        raise PruningError(f"criterion '{criterion}' needs the gradient of a language-model loss, which "
                           f"{type(model).__name__} does not compute; choose one of {', '.join(others)}")
    layerwise = compensate == "lsq" or sequential or "gram" in scorer.needs
    from .moe.channels import ExpertChannelBundles, expert_input_hooks, is_expert_channel

    if layerwise and any(is_expert_channel(g) for g in chosen):
        chosen = [g for g in chosen if not is_expert_channel(g)]
        target_note = "; ".join(filter(None, [target_note, (
            "channels inside routed experts are left as they are: least-squares compensation, --sequential and "
            "obs need plain linear layers, not stacked expert weights")]))
        if not chosen:
            raise PruningError(f"no {target} groups left to prune: channels inside routed experts cannot be used "
                               f"with --compensate lsq, --sequential or criterion obs")
    if layerwise:
        needs = needs | {"gram"}
        # The least-squares path reads consumer weights as [out, in]; GPT-2's Conv1D stores [in, out].
        transposed = sorted({s.param for g in chosen for s in consumer_slices(g)
                             if s.expert is None and s.axis != model.get_parameter(s.param).dim() - 1})
        if transposed:
            asked = [what for what, on in (("--compensate lsq", compensate == "lsq"), ("--sequential", sequential),
                                           (f"criterion '{criterion}'", "gram" in scorer.needs)) if on]
            raise PruningError(f"{' and '.join(asked)} cannot handle weights stored as [in, out] yet (e.g. "
                               f"{transposed[0]}, a Conv1D): use --compensate bias or none, without --sequential")
    if allocation == "cfsp":
        needs = needs | {"block_angles"}
    calibration: Calibration | None = None
    unit_grads: dict = {}
    general_grads: dict = {}
    alignment: dict = {}
    calib_note = None
    cache_state = None
    gradient_cache = None
    if needs:
        t = time.perf_counter()
        if tokenizer is None:
            raise UserError(f"criterion '{criterion}' needs calibration text but the model has no tokenizer")
        from .calibration_sets import calibration_set

        set_options = dict(encoder=encoder, pooling=pooling, nsamples=nsamples, seqlen=seqlen, seed=seed,
                           batch_size=pair_batch if encoder else max(1, batch_size // 2))
        if str(calib) == "none":  # no data: the model writes its own calibration text
            from .calibration_sets import CalibrationSet
            from .data.selfgen import self_generated
            from .gradients import lm_steps

            if encoder:
                raise UserError("--calib none lets a causal LM write its own text; an embedding model needs "
                                "(query, positive) pairs: give --calib FILE")
            generated = self_generated(model, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                       use_cache=use_cache, progress=progress)
            batches = generated.batches
            calib_note = {"source": "none", "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
                          "generation": generated.settings}
            domain = CalibrationSet(batches, lm_steps(model, batches, set_options["batch_size"]), dict(calib_note))
        else:
            domain = calibration_set(model, tokenizer, calib, **set_options)
            batches = domain.windows
            calib_note = dict(domain.note)
        if needs & {"activations", "block_angles"}:
            modules = sorted({module_of(s.param) for g in chosen for s in consumer_slices(g) if s.expert is None})
            expert_keys, expert_hooks = expert_input_hooks(model, chosen)
            key = cache_key("stats-v1", _fingerprint(model), calib_note, modules + expert_keys,
                            "block_angles" in needs)
            calibration = load_cached(key) if use_cache else None
            cache_state = "hit" if calibration is not None else "miss" if use_cache else "off"
            if calibration is None:
                calibration = collect(model, batches, input_modules=modules, block_angles="block_angles" in needs,
                                      extra_hooks=expert_hooks,
                                      batch_size=batch_size, progress=progress)
                if use_cache:
                    save_cached(key, calibration)
        if "gradients" in needs:
            from .gradients import gradient_terms

            general = calibration_set(model, tokenizer, calib_general, **set_options) if calib_general else None
            key = cache_key("grads-v1", _fingerprint(model), domain.note, general and general.note,
                            set_options["batch_size"], [(g.id, g.units) for g in chosen])
            terms = gradient_terms(model, chosen, domain.steps, general and general.steps, progress=progress,
                                   cache_key=key if use_cache else None)
            unit_grads, general_grads, alignment = terms.domain, terms.general, terms.alignment
            calib_note = {**calib_note, "mean_loss": round(terms.mean_loss["domain"], 6)}
            gradient_cache = "hit" if terms.cached else "miss" if use_cache else "off"
            if general is not None:
                calib_note["general"] = {**general.note, "mean_loss": round(terms.mean_loss["general"], 6)}
        if layerwise:
            from .layerwise import BlockRunner

            runner = BlockRunner(model, batches, batch_size=batch_size, progress=progress)
        if str(calib) == "none":
            calib_note["generated_text"] = generated.texts  # after the cache key: reproducibility record
        timings["calibration"] = time.perf_counter() - t

    t = time.perf_counter()
    params = _all_params(model)
    ctx = ScoringContext(model, groups, params, calibration, unit_grads, general_grads, alignment)
    scores: dict[str, np.ndarray] = {}
    comparable: dict[str, np.ndarray] = {}
    if "gram" in scorer.needs:
        try:
            paths_key = cache_key("obs-paths-v2", _fingerprint(model), calib_note, scorer.path_options(model), floor,
                                  [(g.id, g.units) for g in chosen]) if use_cache else None
            scores, comparable = scorer.score_blocks(runner, chosen, params, floor=floor, cache_key=paths_key)
        except MissingStatistics as exc:
            raise PruningError(f"criterion '{criterion}' cannot score {exc}") from exc
        if allocation != "global":
            comparable = {}
    for g in chosen if "gram" not in scorer.needs else ():
        try:
            scores[g.id] = np.asarray(scorer.score(g, ctx), dtype=np.float64)
        except MissingStatistics as exc:
            raise PruningError(f"criterion '{criterion}' cannot score {exc}") from exc
        if not np.all(np.isfinite(scores[g.id])):
            raise PruningError(f"criterion '{criterion}' gave non-finite scores for {g.scope} ({g.kind})")
        if allocation == "global":
            ranked = scorer.global_score(g, ctx, scores[g.id])
            if ranked is not None:
                comparable[g.id] = np.asarray(ranked, dtype=np.float64)
    diagnostics = scorer.diagnostics(chosen, ctx)
    timings["scoring"] = time.perf_counter() - t

    t = time.perf_counter()
    total_layer_params = _layer_params(model)
    flops_before = _flops_per_token(groups)
    # channels inside routed experts: one count per layer, each expert its own lowest channels
    bundles = ExpertChannelBundles.of(chosen, getattr(model, "config", None))
    alloc_groups, alloc_scores, alloc_comparable = bundles.for_allocation(chosen, scores, comparable or None)
    plan = alloc_mod.allocate(alloc_groups, alloc_scores, method=allocation, sparsity=float(sparsity),
                              total_params=total_layer_params, floor=floor, round_to=round_to,
                              block_importance=calibration.block_angle if calibration else None,
                              comparable=alloc_comparable)
    plan = bundles.expand(plan, scores, round_to)
    if bundles and compensate == "bias":
        target_note = "; ".join(filter(None, [target_note, "channels inside routed experts are not bias-compensated "
                                                           "(stacked experts have no bias per expert)"]))
    before = sum(p.numel() for p in _unique_params(model))
    timings["allocation"] = time.perf_counter() - t
    removed = plan.removed
    compensated = None
    layerwise_report = None
    if layerwise:
        t = time.perf_counter()
        from .passes.layerwise import LayerwiseCompensation

        lw = LayerwiseCompensation("lsq" if compensate == "lsq" else "bias", sequential=sequential, damp=damp,
                                   criterion=scorer).run(runner, chosen, plan.removed, params)
        removed, compensated = lw.removed, lw.weights
        errors = list(lw.relative_error.values())
        layerwise_report = {
            "method": compensate, "sequential": sequential, "damp": damp, "layers": len(errors),
            "mean_relative_error_uncompensated": float(np.mean([e["uncompensated"] for e in errors])) if errors else 0.0,
            "mean_relative_error_compensated": float(np.mean([e["compensated"] for e in errors])) if errors else 0.0,
        }
        del runner
        timings["compensation"] = time.perf_counter() - t
    t = time.perf_counter()
    result_model, report_extra = rewrite(model, groups, chosen, removed, calibration=calibration,
                                         compensate=compensate, release_input=release_input,
                                         compensated=compensated)
    timings["rewrite"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started

    after = sum(p.numel() for p in _unique_params(result_model))
    layer_after = _layer_params(result_model)
    flops_removed = sum(len(r) * groups.by_id(g).flops_per_unit for g, r in removed.items())
    kept = {}
    for g in chosen:
        if not is_expert_channel(g):
            kept.setdefault(g.kind, {})[str(g.layer)] = g.units - len(removed.get(g.id, ()))
    if bundles:
        kept["expert_channel"] = bundles.kept(removed)  # per expert: every expert of a layer keeps as many
    report = {
        "graphprune_version": _version(),
        "model": getattr(loaded, "name", type(model).__name__) if loaded else type(model).__name__,
        "criterion": criterion, "criterion_options": criterion_options or {}, "allocation": allocation,
        "target": target, "target_note": target_note, "compensate": compensate, "layerwise": layerwise_report,
        "requested_sparsity": float(sparsity), "seed": seed,
        "calibration": calib_note, "criterion_diagnostics": diagnostics,
        "params": {"before": before, "after": after, "layers_before": total_layer_params, "layers_after": layer_after,
                   "achieved_sparsity": (total_layer_params - layer_after) / total_layer_params},
        "flops_per_token": {"before": flops_before, "after": flops_before - flops_removed},
        "kept_units": kept, "floored_groups": plan.floored, "allocation_notes": plan.notes,
        "blocked_groups": [{"scope": g.scope, "kind": g.kind, "reason": g.reason} for g in groups if g.status == BLOCKED],
        # Measurements of this run, not of its result: save_pruned writes them apart from the rest
        # (RUN_REPORT_KEYS) so that the same inputs and seed give a byte-identical report.
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "calibration_cache": cache_state,
        **({"gradient_cache": gradient_cache} if gradient_cache else {}),
        "trace": groups.graph.notes,
        **report_extra,
    }
    if experts_stage is not None:
        _merge_experts_report(report, experts_stage, original)
    return CompressResult(result_model, report, groups, removed)


def _merge_experts_report(report: dict, stage, original: dict) -> None:
    """A combined run reports against the model before expert pruning."""
    p = report["params"]
    p["before"], p["layers_before"] = original["before"], original["layers_before"]
    p["achieved_sparsity"] = (p["layers_before"] - p["layers_after"]) / p["layers_before"]
    report["flops_per_token"]["before"] = original["flops_before"]
    report["kept_units"]["expert"] = stage.report["kept_per_layer"]
    report["experts"] = stage.report
    report["uniform_layers"] = report["uniform_layers"] and stage.report["uniform_layers"]


def _experts_result(loaded, model: torch.nn.Module, groups: GroupSet, stage, original: dict,
                    timings: dict[str, float], started: float) -> CompressResult:
    """The report of a run that removed routed experts only (same keys as a channel run)."""
    timings["total"] = time.perf_counter() - started
    layer_after = _layer_params(model)
    # Top-k routing runs the same number of experts per token: only the router's rows save FLOPs.
    flops_removed = sum(len(stage.removed[layer.group.id]) * layer.group.flops_per_unit for layer in stage.layers)
    report = {
        "graphprune_version": _version(),
        "model": getattr(loaded, "name", type(model).__name__) if loaded else type(model).__name__,
        "criterion": stage.report["criterion"], "criterion_options": {}, "allocation": stage.report["allocation"],
        "target": "experts", "target_note": None, "compensate": "none",
        "requested_sparsity": stage.report["requested_sparsity"], "seed": (stage.report["calibration"] or {}).get("seed"),
        "calibration": stage.report["calibration"],
        "params": {"before": original["before"], "after": sum(p.numel() for p in _unique_params(model)),
                   "layers_before": original["layers_before"], "layers_after": layer_after,
                   "achieved_sparsity": (original["layers_before"] - layer_after) / original["layers_before"]},
        "flops_per_token": {"before": original["flops_before"], "after": original["flops_before"] - flops_removed},
        "kept_units": {"expert": stage.report["kept_per_layer"]}, "floored_groups": [], "allocation_notes": [],
        "timings_s": {k: round(v, 3) for k, v in timings.items()}, "peak_rss_mb": round(peak_rss_mb(), 1),
        "trace": groups.graph.notes, "experts": stage.report, "uniform_layers": stage.report["uniform_layers"],
    }
    return CompressResult(model, report, groups, stage.removed)


def rewrite(model: torch.nn.Module, groups: GroupSet, chosen: list[Group], removed: dict[str, np.ndarray], *,
            calibration: Calibration | None = None, compensate: str = "none",
            release_input: bool = False, compensated: dict[str, torch.Tensor] | None = None,
            ) -> tuple[torch.nn.Module, dict]:
    """Apply the passes and return a freshly built, validated model of the pruned shape.

    Unpruned tensors are shared with the input model, not copied. With `release_input` the input
    model is consumed: each pruned parameter of it is emptied as soon as its slice exists.
    """
    # References, not copies: the passes replace entries with new tensors and never write into the
    # input's tensors, so only the pruned parameters cost new memory.
    state = {k: v.detach() for k, v in model.state_dict().items()}
    extra: dict[str, Any] = {}
    new_biases: list[str] = []
    if compensated is not None:  # [W | b] per consumer from the layerwise pass (removed columns are zero)
        for module, w_aug in compensated.items():
            dtype = state[f"{module}.weight"].dtype
            state[f"{module}.weight"] = w_aug[:, :-1].to(dtype).contiguous()
            if f"{module}.bias" not in state:
                new_biases.append(module)
            state[f"{module}.bias"] = w_aug[:, -1].to(dtype).contiguous()
        extra["compensated_layers"] = len(compensated)
    elif compensate == "bias" and calibration is not None:
        comp = BiasCompensation().run(state, chosen, removed, calibration)
        new_biases = comp.new_biases
        extra["compensated_layers"] = len(comp.bias_delta)
    release = None
    if release_input:
        owners = dict(model.named_parameters(remove_duplicate=False))
        owners.update(model.named_buffers())

        def release(name: str) -> None:  # the caller gave the input away: free each pruned tensor
            tensor = owners.get(name)
            if tensor is not None:
                tensor.data = torch.empty(0, dtype=tensor.dtype)

    sliced = SliceParameters().run(state, chosen, removed, groups.graph.aliases, release=release)
    del state
    shapes = {k: tuple(v.shape) for k, v in sliced.state.items()}
    blocks = find_blocks(model)
    n_layers = len(blocks[1]) if blocks else 0
    config_result = ConfigRewrite().run(model.config, type(model), chosen, removed, shapes, new_biases, n_layers)
    new_model = instantiate(type(model), config_result.config, device="cpu")
    new_state = new_model.state_dict()
    for name, tensor in new_state.items():
        if name not in sliced.state:
            if name.endswith(".bias"):  # a bias the new config flag added where none was compensated
                sliced.state[name] = torch.zeros_like(tensor, device="cpu")
    # assign=True adopts our tensors; the uninitialised ones `instantiate` allocated were never
    # touched, so building the new model costs almost no resident memory.
    missing, unexpected = new_model.load_state_dict(sliced.state, strict=False, assign=True)
    missing = [m for m in missing if m not in _non_persistent(new_model)]
    if missing or unexpected:
        raise PruningError(f"rebuilt model does not match the pruned weights (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    if getattr(new_model.config, "tie_word_embeddings", False):
        new_model.tie_weights()
    new_model.eval()
    Validate().run(new_model)
    extra["uniform_layers"] = config_result.uniform
    extra["config_bias_flags"] = config_result.bias_keys
    return new_model, extra


def _non_persistent(model: torch.nn.Module) -> set[str]:
    persistent = set(model.state_dict())
    return {n for n, _ in model.named_buffers() if n not in persistent}


def _all_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(dict(model.named_buffers()))
    return out


def _unique_params(model: torch.nn.Module):
    return list({id(p): p for p in model.parameters()}.values())


def _flops_per_token(groups: GroupSet) -> float:
    from .graph.groups import _flop_ops

    return sum(total for total, _ in _flop_ops(groups.graph, groups.propagation)) / max(groups.tokens, 1)


def _fingerprint(model: torch.nn.Module) -> str:
    """Cheap identity of the weights: shapes plus a few sampled values of every tensor."""
    h = []
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 16)][:16].float().tolist() if flat.numel() else []
        h.append((name, tuple(p.shape), [round(x, 6) for x in sample]))
    return cache_key(h)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB: Linux's VmHWM, which a new program starts afresh.
    `ru_maxrss` is the fallback elsewhere; on Linux it survives fork + exec, so a process started by
    a parent that once held 8 GB reports at least 8 GB."""
    import resource

    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _version() -> str:
    from . import __version__

    return __version__
