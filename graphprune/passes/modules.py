"""The rewrite of a plain nn.Module (no Hugging Face config to rewrite and rebuild from).

    BiasCompensation (conv consumers too)?  → SliceParameters → AdoptTensors → ValidateModule

A plain module cannot be rebuilt from a config, so the sliced tensors are put back into the module
itself (the backend's private deep copy, never the caller's module) and every attribute that states
a size is rewritten to match: `Conv*d.in_channels/out_channels/groups`, `Linear.in_features/
out_features`, `BatchNorm*d`/`GroupNorm`/`InstanceNorm` `num_features`/`num_channels`,
`LayerNorm.normalized_shape`, `Embedding.embedding_dim`. The result is an ordinary module of the same
class and call signature whose `state_dict()` has the pruned shapes.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import PruningError, ValidationError
from .base import Pass, PassError, PassManager, PassResult, RewriteState
from .bias import BiasCompensation
from .slice import SliceParameters


def _leaves(value: Any) -> list:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _leaves(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _leaves(v)]
    return []


def output_shapes(model: torch.nn.Module, example_inputs) -> list[tuple[int, ...]]:
    """Shapes of every tensor `model` returns on `example_inputs` (a tuple or a dict)."""
    with torch.no_grad():
        out = model(**example_inputs) if isinstance(example_inputs, dict) else model(*example_inputs)
    return [tuple(t.shape) for t in _leaves(out)]


class AdoptTensors(Pass[RewriteState]):
    """Install the rewritten tensors into `rewrite.model` and restate its modules' sizes."""

    name = "adopt-tensors"

    def requires(self, rewrite: RewriteState) -> None:
        if rewrite.model is None:
            raise PassError("the plain-module rewrite needs the module to write the tensors into")

    def call(self, rewrite: RewriteState) -> PassResult[RewriteState]:
        model = rewrite.model
        modules = dict(model.named_modules(remove_duplicate=False))
        changed = set()
        adopted: dict[int, torch.Tensor] = {}  # tied names share one sliced tensor: they keep sharing one Parameter
        for name, tensor in rewrite.tensors.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = modules.get(owner_name)
            if owner is None:
                raise PruningError(f"{name}: no module {owner_name!r} to hold it")
            current = owner._parameters.get(leaf) if leaf in owner._parameters else owner._buffers.get(leaf)
            if current is not None and current.shape == tensor.shape and current.data_ptr() == tensor.data_ptr():
                continue  # untouched: already this module's tensor
            if leaf in owner._parameters or (leaf == "bias" and name.rpartition(".")[0] in rewrite.new_biases):
                requires_grad = current.requires_grad if current is not None else True
                if id(tensor) not in adopted:
                    adopted[id(tensor)] = torch.nn.Parameter(tensor.detach(), requires_grad=requires_grad)
                owner._parameters[leaf] = adopted[id(tensor)]
            elif leaf in owner._buffers:
                owner._buffers[leaf] = adopted.setdefault(id(tensor), tensor.detach())
            else:
                raise PruningError(f"{name} is neither a parameter nor a buffer of {type(owner).__name__}")
            changed.add(owner_name)
        for name in sorted(changed):
            restate_sizes(name, modules[name], rewrite.kept)
        return PassResult(rewrite, bool(changed))


SIZE_ATTRIBUTES = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                   "num_channels", "normalized_shape", "num_embeddings", "embedding_dim")


def module_size_attributes(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """module name -> its size attributes (`SIZE_ATTRIBUTES` it has), for the modules that hold tensors:
    what a fresh module of the same class needs set to take a pruned state dict (`resize_to`)."""
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if module._parameters or module._buffers:
            attrs = {a: getattr(module, a) for a in SIZE_ATTRIBUTES if isinstance(getattr(module, a, None), (int, tuple))}
            if attrs:
                out[name] = {a: list(v) if isinstance(v, tuple) else v for a, v in attrs.items()}
    return out


def resize_to(model: torch.nn.Module, tensors: dict[str, torch.Tensor],
              sizes: dict[str, dict[str, Any]] | None = None) -> torch.nn.Module:
    """Make `model` (a freshly built module of the class that was pruned) take `tensors`, a pruned state
    dict: every parameter and buffer gets its stored shape (uninitialised until loaded) and each
    module its size attributes, from `sizes` (`module_size_attributes` of the pruned module) or, where
    absent, from the tensors' shapes (a grouped convolution then keeps its number of groups)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    touched = set()
    for name, tensor in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            continue  # load_state_dict names it
        if leaf in owner._parameters:
            current = owner._parameters[leaf]
            if current is None or current.shape != tensor.shape:
                owner._parameters[leaf] = torch.nn.Parameter(torch.empty(tensor.shape, dtype=tensor.dtype),
                                                             requires_grad=True if current is None
                                                             else current.requires_grad)
                touched.add(owner_name)
        elif leaf in owner._buffers:
            current = owner._buffers[leaf]
            if current is None or current.shape != tensor.shape:
                owner._buffers[leaf] = torch.empty(tensor.shape, dtype=tensor.dtype)
                touched.add(owner_name)
    for name in sorted(touched | set(sizes or ())):
        if name not in modules:
            continue
        if sizes and name in sizes:
            for attr, value in sizes[name].items():
                setattr(modules[name], attr, tuple(value) if isinstance(value, list) else value)
        else:
            restate_sizes(name, modules[name], {})
    model.load_state_dict(tensors, strict=True)
    return model


def restate_sizes(name: str, module: torch.nn.Module, kept: dict) -> None:
    """The size attributes of `module` from its (sliced) tensors; `kept` ((param, axis) -> kept
    indices) tells how many groups a grouped convolution keeps."""
    nn = torch.nn
    if isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight
        groups = module.groups
        rows = kept.get((f"{name}.weight", 0))
        if groups > 1 and rows is not None:  # whole groups may have gone: count those the kept rows belong to
            per_group = (module.in_channels if module.transposed else module.out_channels) // groups
            by_group: dict[int, int] = {}
            for r in rows.tolist():
                by_group[r // per_group] = by_group.get(r // per_group, 0) + 1
            if len(set(by_group.values())) != 1:
                raise PruningError(f"{name}: a grouped convolution must keep as many output channels in every "
                                   f"group it keeps")
            groups = len(by_group)
            module.groups = groups
        out_c, in_c = (w.shape[1] * groups, w.shape[0]) if module.transposed else (w.shape[0], w.shape[1] * groups)
        module.out_channels, module.in_channels = int(out_c), int(in_c)
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = int(module.weight.shape[0]), int(module.weight.shape[1])
    elif isinstance(module, nn.modules.batchnorm._NormBase):  # BatchNorm*d, InstanceNorm*d
        ref = module.weight if module.weight is not None else module.running_mean
        module.num_features = int(ref.shape[0])
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = int(module.weight.shape[0])
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = (int(s) for s in module.weight.shape)
    elif isinstance(module, nn.MultiheadAttention):
        raise PruningError(f"{name}: nn.MultiheadAttention states its width in several attributes graphprune does "
                           f"not rewrite; it cannot be pruned in a plain module")


class SliceNewBiases(Pass[RewriteState]):
    """A bias the compensation added (a consumer conv without one) did not exist when the groups were
    traced, so no group slices it: it loses the output rows its weight lost."""

    name = "slice-new-biases"

    def call(self, rewrite: RewriteState) -> PassResult[RewriteState]:
        changed = False
        for module in rewrite.new_biases:
            keep = rewrite.kept.get((f"{module}.weight", 0))
            bias = rewrite.tensors.get(f"{module}.bias")
            if keep is not None and bias is not None and bias.shape[0] != len(keep):
                rewrite.tensors[f"{module}.bias"] = bias.index_select(0, torch.as_tensor(keep)).contiguous()
                changed = True
        return PassResult(rewrite, changed)


class ValidateModule(Pass[RewriteState]):
    """Run the rewritten module on the example inputs: finite outputs of the shapes the dense module gave."""

    name = "validate-module"

    def __init__(self, example_inputs, expected: list[tuple[int, ...]]) -> None:
        self.example_inputs, self.expected = example_inputs, expected

    def call(self, rewrite: RewriteState) -> PassResult[RewriteState]:
        model = rewrite.model
        try:
            with torch.no_grad():
                out = model(**self.example_inputs) if isinstance(self.example_inputs, dict) \
                    else model(*self.example_inputs)
        except Exception as exc:  # noqa: BLE001 - any failure here means the rewrite is wrong
            raise ValidationError(f"the pruned module does not run on the example inputs: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        leaves = _leaves(out)
        shapes = [tuple(t.shape) for t in leaves]
        if shapes != self.expected:
            raise ValidationError(f"the pruned module's outputs have shapes {shapes}, the dense one's {self.expected}")
        if not all(torch.isfinite(t).all() for t in leaves if t.is_floating_point()):
            raise ValidationError("the pruned module produces NaN/Inf outputs; nothing was written")
        return PassResult(rewrite, False)


def rewrite_module(model: torch.nn.Module, groups, chosen: list, removed: dict, *, example_inputs,
                   expected: list[tuple[int, ...]], statistics=None,
                   before_adopt: tuple[Pass, ...] = ()) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Slice `model` (modified in place: the caller hands its own copy) and validate it on `example_inputs`."""
    state = RewriteState(tensors={k: v.detach() for k, v in model.state_dict(keep_vars=True).items()},
                         groups=chosen, removed=removed, aliases=groups.graph.aliases, statistics=statistics,
                         model=model)
    passes: list[Pass] = [BiasCompensation(conv=True)] if statistics is not None else []
    passes += [SliceParameters(), SliceNewBiases(), *before_adopt, AdoptTensors(), ValidateModule(example_inputs, expected)]
    PassManager(passes)(state)
    extra: dict[str, Any] = {"uniform_layers": False}
    if statistics is not None:
        extra["compensated_layers"] = state.compensated_layers
    return state.model, extra
