"""Gradient statistics per unit, for the gradient-based criteria (taylor, fisher, gaprune).

For every calibration batch b and unit u of a chosen group, s_b(u) = Σ_{w in u} w · ∂L_b/∂w: the
derivative of the batch loss when all of the unit's weights are scaled together, i.e. the gradient
of a multiplicative mask on the unit at 1. We keep Σ_b s_b and Σ_b s_b² per unit; with
`keep_gradients` also Σ_b ∂L_b/∂w for the parameters of the chosen groups, from which
`unit_alignment` measures how two calibration sets' gradients agree on each unit.

The loss is whatever the batch closures compute: the LM loss for decoders, InfoNCE for encoders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .blocks import ActivationStack
from .cache import discard, read_cache_entry, write_cache_tensors
from ..errors import PruningError
from ..graph.groups import Group
from ..progress import in_stage

LossStep = Callable[[], torch.Tensor]


@dataclass
class GradientStats:
    units: dict[str, dict[str, np.ndarray | int]]  # group id -> {"sum", "sumsq", "batches"}
    gradient_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # param -> Σ_b ∂L_b/∂w (float64)
    mean_loss: float = 0.0


def lm_steps(model: torch.nn.Module, batches: torch.Tensor, batch_size: int) -> list[LossStep]:
    """LM-loss closures over [n, seqlen] token windows, `batch_size` windows each."""
    device = next(model.parameters()).device

    def step(chunk):
        chunk = chunk.to(device)
        return lambda: model(input_ids=chunk, labels=chunk).loss
    return [step(batches[i:i + batch_size]) for i in range(0, batches.shape[0], batch_size)]


def empty_unit_stats(chosen: list[Group]) -> dict[str, dict]:
    return {g.id: {"sum": np.zeros(g.units), "sumsq": np.zeros(g.units), "batches": 0} for g in chosen}


def add_unit_sums(chosen: list[Group], params, units: dict[str, dict]) -> None:
    """One batch: s_b(u) = Σ_{w in u} w · ∂L_b/∂w from `params[name]` and its `.grad`, added to each
    group's sum and sum of squares (`units`, as `empty_unit_stats` makes it)."""
    for g in chosen:
        per_unit = torch.zeros(g.units, dtype=torch.float64)
        counted = set()
        for s in g.slices:
            p = params[s.param]
            # A tied tensor's gradient already sums both uses: count its slice once.
            key = (id(p), s.axis, s.expert, np.asarray(s.indices).tobytes())
            if p.grad is None or key in counted:
                continue
            counted.add(key)
            wg = s.units_first((p.detach() * p.grad).to("cpu", torch.float64))
            idx = torch.as_tensor(s.indices)
            per_unit += wg[idx.reshape(-1)].reshape(g.units, -1).sum(1)
        units[g.id]["sum"] += per_unit.numpy()
        units[g.id]["sumsq"] += (per_unit ** 2).numpy()
        units[g.id]["batches"] += 1


def add_gradient_sums(names, params, sums: dict[str, torch.Tensor]) -> None:
    """One batch: ∂L_b/∂w of each named parameter added to `sums` (float64)."""
    for name in names:
        grad = params[name].grad
        if grad is not None:
            acc = sums.setdefault(name, torch.zeros(grad.shape, dtype=torch.float64))
            acc += grad.to("cpu", torch.float64)


def unit_gradients(model: torch.nn.Module, steps: Sequence[LossStep], chosen: list[Group], *, progress: bool = False,
                   keep_gradients: bool = False, desc: str = "gradients") -> GradientStats:
    from tqdm.auto import tqdm

    # Every name of a tied tensor (lm_head.weight and embed_tokens.weight), since groups use either.
    params = dict(model.named_parameters(remove_duplicate=False))
    units = empty_unit_stats(chosen)
    needed = {s.param for g in chosen for s in g.slices}
    needed_ids = {id(params[name]) for name in needed}
    sums: dict[str, torch.Tensor] = {}
    total_loss = 0.0
    was_training = model.training
    model.eval()  # dropout off: the statistics describe the deployed model
    for p in params.values():
        p.requires_grad_(id(p) in needed_ids)
    try:
        for step in tqdm(steps, desc=desc, disable=not progress, leave=False):
            model.zero_grad(set_to_none=True)
            loss = step()
            loss.backward()
            total_loss += float(loss.detach())
            if keep_gradients:
                add_gradient_sums(needed, params, sums)
            add_unit_sums(chosen, params, units)
    finally:
        model.zero_grad(set_to_none=True)
        for p in params.values():
            p.requires_grad_(False)
        model.train(was_training)
    return GradientStats(units, sums, total_loss / max(len(steps), 1))


def unit_alignment(chosen: list[Group], a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Per unit: cosine between two summed gradients restricted to the unit's weights (all its
    slices), in [-1, 1]; 0 where either gradient vanishes on the unit."""
    out = {}
    for g in chosen:
        dot = torch.zeros(g.units, dtype=torch.float64)
        norm_a = torch.zeros(g.units, dtype=torch.float64)
        norm_b = torch.zeros(g.units, dtype=torch.float64)
        for s in g.slices:
            if s.param not in a or s.param not in b:
                continue
            idx = torch.as_tensor(s.indices).reshape(-1)
            ga = s.units_first(a[s.param])[idx].reshape(g.units, -1)
            gb = s.units_first(b[s.param])[idx].reshape(g.units, -1)
            dot += (ga * gb).sum(1)
            norm_a += (ga * ga).sum(1)
            norm_b += (gb * gb).sum(1)
        denominator = (norm_a * norm_b).sqrt()
        cosine = torch.where(denominator > 0, dot / denominator.clamp_min(1e-300), torch.zeros_like(dot))
        out[g.id] = cosine.clamp(-1.0, 1.0).numpy()
    return out


@dataclass
class GradientTerms:
    """What the gradient criteria read: per group id, the domain statistics, and for two sets the
    general statistics and the per-unit alignment."""

    domain: dict[str, dict]
    general: dict[str, dict] = field(default_factory=dict)
    alignment: dict[str, np.ndarray] = field(default_factory=dict)
    mean_loss: dict[str, float] = field(default_factory=dict)
    cached: bool = False


@in_stage("calibrate")
def gradient_terms(model: torch.nn.Module, chosen: list[Group], domain_steps: Sequence[LossStep],
                   general_steps: Sequence[LossStep] | None, *, progress: bool, cache_key: str | None) -> GradientTerms:
    """Gradient statistics of one or two calibration sets, from the cache when `cache_key` is
    given and present (scores do not depend on the sparsity: re-pruning skips the backward passes)."""
    if cache_key is not None:
        cached = _load_terms(cache_key, chosen)
        if cached is not None:
            return cached
    two_sets = general_steps is not None
    stats = unit_gradients(model, domain_steps, chosen, progress=progress, keep_gradients=two_sets)
    terms = GradientTerms(stats.units, mean_loss={"domain": stats.mean_loss})
    if two_sets:
        general = unit_gradients(model, general_steps, chosen, progress=progress, keep_gradients=True,
                                 desc="general gradients")
        terms.general = general.units
        terms.alignment = unit_alignment(chosen, stats.gradient_sums, general.gradient_sums)
        terms.mean_loss["general"] = general.mean_loss
    if cache_key is not None:
        _save_terms(cache_key, terms)
    return terms


@in_stage("calibrate")
def gradient_terms_by_blocks(source, chosen: list[Group], set_batches: Sequence[int], *,
                             progress: bool = False) -> GradientTerms:
    """What `gradient_terms` computes, one block at a time, for a model that is never whole (the
    streaming backend's block source; `calibration.blocks.BlockRunner` offers the same interface).

    `source`'s batches are the calibration sets' batches one after the other: `set_batches[0]` of the
    domain set, then (for two sets) `set_batches[1]` of the general one. A forward over the blocks
    keeps each block's inputs from the first block with a chosen group on (the streaming source
    spills them to its work directory), the model's head gives ∂(Σ token loss)/∂(last output) per
    batch, scaled to the batch's mean loss (the loss `lm_steps` backpropagates), then the backward
    recomputes each block from its inputs with the chosen groups' parameters taking gradients, and
    takes s_b(u) of that block's groups from each batch's gradients. With two sets, Σ_b ∂L_b/∂w of each
    set is kept only while its block is done: the alignment of a block's units is computed there."""
    from tqdm.auto import tqdm

    if len(set_batches) not in (1, 2) or sum(set_batches) != len(source.inputs):
        raise ValueError(f"set_batches {list(set_batches)} does not split the source's {len(source.inputs)} batches")
    by_block: dict[int, list[Group]] = {}
    for g in chosen:
        blocks = {next((i for i in range(len(source)) if s.param.startswith(source.block_name(i) + ".")), None)
                  for s in g.slices}
        if len(blocks) != 1 or None in blocks:
            raise PruningError(f"group {g.id} is not inside one block, so its gradients cannot be taken block by block")
        by_block.setdefault(blocks.pop(), []).append(g)
    first = min(by_block, default=len(source))
    two_sets = len(set_batches) == 2
    set_of = [0] * set_batches[0] + [1] * (set_batches[1] if two_sets else 0)
    stats = [empty_unit_stats(chosen), empty_unit_stats(chosen) if two_sets else {}]
    alignment: dict[str, np.ndarray] = {}
    losses: list[float] = []
    requires = {p: p.requires_grad for p in source.model.parameters()}
    for p in requires:
        p.requires_grad_(False)
    store = source.activation_store() if hasattr(source, "activation_store") else ActivationStack()
    try:
        hidden = list(source.inputs)
        for index in tqdm(range(len(source)), desc="gradients (forward)", disable=not progress, leave=False):
            if index >= first:
                store.push(hidden)
            hidden = source.run_block(index, hidden).outputs
        grads = []
        for b, last in enumerate(hidden):
            g, _ = source.head_gradient(b, last, losses)
            ids = source.batches_by_batch[b]
            grads.append(g / (ids.shape[0] * (ids.shape[1] - 1)))  # ∂(mean loss of the batch)
        del hidden
        for index in tqdm(reversed(range(first, len(source))), total=len(source) - first, desc="gradients (backward)",
                          disable=not progress, leave=False):
            groups = by_block.get(index, [])
            names = tuple(sorted({s.param for g in groups for s in g.slices}))
            sums: list[dict[str, torch.Tensor]] = [{}, {}]

            def after_batch(b, params, groups=groups, sums=sums):
                which = set_of[b]
                add_unit_sums(groups, params, stats[which])
                if two_sets:
                    add_gradient_sums(params, params, sums[which])

            grads = source.backward_block(index, store.pop(), grads, [], {}, grad_params=names,
                                          after_batch=after_batch if groups else None)
            if two_sets and groups:
                alignment.update(unit_alignment(groups, sums[0], sums[1]))
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
    mean_loss = {"domain": float(np.mean(losses[:set_batches[0]]))}
    terms = GradientTerms(stats[0], mean_loss=mean_loss)
    if two_sets:
        terms.general, terms.alignment = stats[1], alignment
        terms.mean_loss["general"] = float(np.mean(losses[set_batches[0]:]))
    return terms


def _save_terms(key: str, terms: GradientTerms) -> None:
    write_cache_tensors(key, terms_to_tensors(terms))


def terms_to_tensors(terms: GradientTerms) -> dict[str, torch.Tensor]:
    """The terms as named tensors (a cache entry, the streaming work directory); `terms_from_tensors`
    reads them back."""
    tensors = {}
    for which, table in (("domain", terms.domain), ("general", terms.general)):
        for gid, st in table.items():
            tensors[f"{which}/{gid}/sum"] = torch.from_numpy(np.asarray(st["sum"], dtype=np.float64))
            tensors[f"{which}/{gid}/sumsq"] = torch.from_numpy(np.asarray(st["sumsq"], dtype=np.float64))
            tensors[f"{which}/{gid}/batches"] = torch.tensor([int(st["batches"])], dtype=torch.int64)
    for gid, values in terms.alignment.items():
        tensors[f"alignment/{gid}"] = torch.from_numpy(np.asarray(values, dtype=np.float64))
    for which, loss in terms.mean_loss.items():
        tensors[f"loss/{which}"] = torch.tensor([loss], dtype=torch.float64)
    return tensors


def _load_terms(key: str, chosen: list[Group]) -> GradientTerms | None:
    """The terms stored under `key`; None when absent, damaged or not for `chosen` (a damaged or
    malformed entry is discarded with a one-line warning and recomputed)."""
    tensors = read_cache_entry(key)
    if tensors is None:
        return None
    try:
        terms = terms_from_tensors(tensors, chosen)
    except (KeyError, ValueError, IndexError, TypeError, AttributeError, RuntimeError) as error:
        discard(key, str(error) or type(error).__name__)
        return None
    if any(g.id not in terms.domain or len(terms.domain[g.id]["sum"]) != g.units for g in chosen):
        return None
    terms.cached = True
    return terms


def terms_from_tensors(tensors: dict[str, torch.Tensor], chosen: list[Group]) -> GradientTerms:
    """`terms_to_tensors` read back; ValueError (or KeyError) when they are malformed or not for `chosen`."""
    terms = GradientTerms({})
    for name, value in tensors.items():
        kind, _, rest = name.partition("/")
        if kind == "alignment":
            terms.alignment[rest] = value.numpy()
        elif kind == "loss":
            terms.mean_loss[rest] = float(value.reshape(-1)[0])
        elif kind in ("domain", "general"):
            gid, _, field_name = rest.rpartition("/")
            if field_name not in ("sum", "sumsq", "batches"):
                raise ValueError(f"unexpected tensor '{name}'")
            entry = getattr(terms, kind).setdefault(gid, {})
            entry[field_name] = int(value.reshape(-1)[0]) if field_name == "batches" else value.numpy()
        else:
            raise ValueError(f"unexpected tensor '{name}'")
    if "domain" not in terms.mean_loss:
        raise ValueError("no tensor 'loss/domain'")
    units = {g.id: g.units for g in chosen}
    for kind in ("domain", "general"):
        for gid, entry in getattr(terms, kind).items():
            absent = sorted({"sum", "sumsq", "batches"} - set(entry))
            if absent:
                raise ValueError(f"no tensor '{kind}/{gid}/{absent[0]}'")
            if entry["sum"].shape != entry["sumsq"].shape or entry["sum"].ndim != 1:
                raise ValueError(f"the {kind} statistics of {gid} have shapes {entry['sum'].shape} and "
                                 f"{entry['sumsq'].shape}")
            if gid in units and len(entry["sum"]) != units[gid]:
                raise ValueError(f"the {kind} statistics of {gid} have {len(entry['sum'])} units, the group "
                                 f"{units[gid]}")
    for gid, values in terms.alignment.items():
        if gid in units and values.shape != (units[gid],):
            raise ValueError(f"the alignment of {gid} has shape {values.shape}, the group {units[gid]} units")
    return terms
