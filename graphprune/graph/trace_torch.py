"""PyTorch frontend: trace a module with torch.export (or, as the FX fallback, record the executed
ops into an FX graph) and translate its ATen ops into the canonical IR ops.

The translation table `ATEN_TRANSLATIONS` maps an ATen op name to a function that reads the op's
arguments and returns ``(canonical_op, tensor_inputs, attrs)``. An ATen op missing from the table
becomes an ``unknown`` op: the rules pin every axis it touches and the report names it. Nothing is
ever guessed to be elementwise.
"""

from __future__ import annotations

import contextlib

import operator
from typing import Any, Callable

import torch
import torch.fx

from ..errors import TraceError
from .ir import ACTIVATION, DERIVED, INPUT, PARAM, STATE, Graph, Op, Tensor

Translation = tuple[str, list, dict]


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        try:
            return tuple(int(s) for s in value.shape)
        except TypeError as exc:  # symbolic sizes: we only trace static shapes
            raise TraceError(f"dynamic shape in traced graph: {value.shape}") from exc
    return None


# ----------------------------------------------------------------------------- translations
# Each translator receives (args, kwargs, in_shape_of) where in_shape_of(arg) is the shape of a
# tensor argument, and returns (op, inputs, attrs). Inputs are fx nodes (tensors) or None.

def _tensors(args) -> list:
    out = []
    for a in args:
        if isinstance(a, torch.fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.fx.Node))
    return out


def _elementwise(args, kwargs, shape_of) -> Translation:
    return "elementwise", _tensors(list(args) + list(kwargs.values())), {}


def _first_only(args, kwargs, shape_of) -> Translation:
    """Ops whose output follows the first tensor's shape and other args are scalars/options."""
    return "elementwise", [args[0]], {}


def _reshape(args, kwargs, shape_of) -> Translation:
    return "reshape", [args[0]], {}


def _permute(args, kwargs, shape_of) -> Translation:
    nd = len(shape_of(args[0]))
    return "permute", [args[0]], {"perm": [_dim(d, nd) for d in args[1]]}


def _transpose(args, kwargs, shape_of) -> Translation:
    nd = len(shape_of(args[0]))
    perm = list(range(nd))
    a, b = _dim(args[1], nd), _dim(args[2], nd)
    perm[a], perm[b] = perm[b], perm[a]
    return "permute", [args[0]], {"perm": perm}


def _t(args, kwargs, shape_of) -> Translation:
    nd = len(shape_of(args[0]))
    return "permute", [args[0]], {"perm": list(range(nd))[::-1]}


def _expand(args, kwargs, shape_of) -> Translation:
    return "expand", [args[0]], {}


def _linear(args, kwargs, shape_of) -> Translation:
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return "linear", [args[0], args[1], bias], {}


def _matmul(args, kwargs, shape_of) -> Translation:
    return "matmul", [args[0], args[1]], {}


def _addmm(args, kwargs, shape_of) -> Translation:
    return "addmm", [args[0], args[1], args[2]], {}


def _conv(args, kwargs, shape_of) -> Translation:
    # aten.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    # aten.conv2d(input, weight, bias, stride, padding, dilation, groups)
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if len(args) > 8:  # aten.convolution
        transposed, groups = bool(args[6]), int(args[8])
    else:
        transposed, groups = False, int(args[6]) if len(args) > 6 else int(kwargs.get("groups", 1))
    return "conv", [x, w, bias], {"groups": groups, "transposed": transposed}


def _batch_norm(args, kwargs, shape_of) -> Translation:
    # _native_batch_norm_legit_no_training(input, weight, bias, running_mean, running_var, momentum, eps)
    # batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
    return "batch_norm", [args[0], args[1], args[2], args[3], args[4]], {}


def _layer_norm(args, kwargs, shape_of) -> Translation:
    # layer_norm(input, normalized_shape, weight, bias, eps); native_layer_norm likewise
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    bias = args[3] if len(args) > 3 else kwargs.get("bias")
    return "layer_norm", [args[0], weight, bias], {"normalized_ndim": len(args[1])}


def _rms_norm(args, kwargs, shape_of) -> Translation:
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    return "layer_norm", [args[0], weight, None], {"normalized_ndim": len(args[1])}


def _reduce(args, kwargs, shape_of) -> Translation:
    nd = len(shape_of(args[0]))
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(nd))
    if isinstance(dims, int):
        dims = [dims]
    keepdim = bool(args[2]) if len(args) > 2 and isinstance(args[2], bool) else bool(kwargs.get("keepdim", False))
    return "reduce", [args[0]], {"axes": [_dim(d, nd) for d in dims], "keepdim": keepdim}


def _reduce_all(args, kwargs, shape_of) -> Translation:
    nd = len(shape_of(args[0]))
    return "reduce", [args[0]], {"axes": list(range(nd)), "keepdim": False}


def _var(args, kwargs, shape_of) -> Translation:
    nd = len(shape_of(args[0]))
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    dims = list(range(nd)) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
    return "reduce", [args[0]], {"axes": [_dim(d, nd) for d in dims], "keepdim": bool(kwargs.get("keepdim", False))}


def _softmax(args, kwargs, shape_of) -> Translation:
    return "elementwise", [args[0]], {}


def _slice_window(shape, dim, start, end, step) -> dict:
    dim = _dim(dim, len(shape))
    n = shape[dim]
    start = 0 if start is None else int(start)
    end = n if end is None else int(end)
    start = max(0, start + n if start < 0 else min(start, n))
    end = max(0, end + n if end < 0 else min(end, n))
    return {"axis": dim, "start": start, "end": end, "step": int(step)}


def _slice(args, kwargs, shape_of) -> Translation:
    # slice(self, dim=0, start=None, end=None, step=1)
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    start = args[2] if len(args) > 2 else kwargs.get("start")
    end = args[3] if len(args) > 3 else kwargs.get("end")
    step = args[4] if len(args) > 4 else kwargs.get("step", 1)
    return "slice", [args[0]], _slice_window(shape_of(args[0]), dim, start, end, step)


def _slice_scatter(args, kwargs, shape_of) -> Translation:
    # slice_scatter(self, src, dim=0, start=None, end=None, step=1): the functional form of
    # `x[..., start:end] = src` (what functionalisation makes of copy_ into a slice view)
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    start = args[3] if len(args) > 3 else kwargs.get("start")
    end = args[4] if len(args) > 4 else kwargs.get("end")
    step = args[5] if len(args) > 5 else kwargs.get("step", 1)
    return "slice_scatter", [args[0], args[1]], _slice_window(shape_of(args[0]), dim, start, end, step)


def _select_scatter(args, kwargs, shape_of) -> Translation:
    # select_scatter(self, src, dim, index): `x.select(dim, index) = src`
    return "select_scatter", [args[0], args[1]], {"axis": _dim(args[2], len(shape_of(args[0])))}


def _split(args, kwargs, shape_of) -> Translation:
    shape = shape_of(args[0])
    dim = _dim(args[2] if len(args) > 2 else kwargs.get("dim", 0), len(shape))
    spec = args[1]
    if isinstance(spec, int):
        n = shape[dim]
        sizes = [spec] * (n // spec) + ([n % spec] if n % spec else [])
    else:
        sizes = [int(s) for s in spec]
    return "split", [args[0]], {"axis": dim, "sizes": sizes}


def _chunk(args, kwargs, shape_of) -> Translation:
    shape = shape_of(args[0])
    dim = _dim(args[2] if len(args) > 2 else kwargs.get("dim", 0), len(shape))
    n, chunks = shape[dim], int(args[1])
    each = -(-n // chunks)
    sizes = [min(each, n - i) for i in range(0, n, each)]
    return "split", [args[0]], {"axis": dim, "sizes": sizes}


def _unbind(args, kwargs, shape_of) -> Translation:
    shape = shape_of(args[0])
    dim = _dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), len(shape))
    return "unbind", [args[0]], {"axis": dim}


def _cat(args, kwargs, shape_of) -> Translation:
    tensors = [t for t in args[0] if isinstance(t, torch.fx.Node)]
    nd = max(len(shape_of(t)) for t in tensors)
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    return "cat", tensors, {"axis": _dim(dim, nd)}


def _stack(args, kwargs, shape_of) -> Translation:
    tensors = [t for t in args[0] if isinstance(t, torch.fx.Node)]
    nd = len(shape_of(tensors[0])) + 1
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    return "stack", tensors, {"axis": _dim(dim, nd)}


def _select(args, kwargs, shape_of) -> Translation:
    nd = len(shape_of(args[0]))
    return "select", [args[0]], {"axis": _dim(args[1], nd)}


def _index(args, kwargs, shape_of) -> Translation:
    # aten.index.Tensor(self, indices: list[Optional[Tensor]])
    positions = [i for i, t in enumerate(args[1]) if t is not None]
    return "index", [args[0]] + [t for t in args[1] if t is not None], {"positions": positions}


def _gather(args, kwargs, shape_of) -> Translation:
    nd = len(shape_of(args[0]))
    return "gather", [args[0], args[2]], {"axis": _dim(args[1], nd)}


def _index_select(args, kwargs, shape_of) -> Translation:
    nd = len(shape_of(args[0]))
    return "index_select", [args[0], args[2]], {"axis": _dim(args[1], nd)}


def _embedding(args, kwargs, shape_of) -> Translation:
    return "embedding", [args[0], args[1]], {}


def _topk(args, kwargs, shape_of) -> Translation:
    nd = len(shape_of(args[0]))
    dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
    return "topk", [args[0]], {"axis": _dim(dim, nd)}


def _sort(args, kwargs, shape_of) -> Translation:
    nd = len(shape_of(args[0]))
    dim = args[1] if len(args) > 1 and isinstance(args[1], int) else kwargs.get("dim", -1)
    return "topk", [args[0]], {"axis": _dim(dim, nd)}


def _argreduce(args, kwargs, shape_of) -> Translation:
    nd = len(shape_of(args[0]))
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if dim is None:
        return "unknown", [args[0]], {"why": "arg-reduction over all axes"}
    keepdim = bool(args[2]) if len(args) > 2 else bool(kwargs.get("keepdim", False))
    return "argreduce", [args[0]], {"axis": _dim(dim, nd), "keepdim": keepdim}


def _max_dim(args, kwargs, shape_of) -> Translation:
    if len(args) > 1 and isinstance(args[1], torch.fx.Node):  # max.other: elementwise maximum
        return _elementwise(args, kwargs, shape_of)
    if len(args) == 1 and "dim" not in kwargs:  # max.default: reduce over everything
        return _reduce_all(args, kwargs, shape_of)
    nd = len(shape_of(args[0]))
    keepdim = bool(args[2]) if len(args) > 2 else bool(kwargs.get("keepdim", False))
    return "max_dim", [args[0]], {"axis": _dim(args[1], nd), "keepdim": keepdim}


def _one_hot(args, kwargs, shape_of) -> Translation:
    return "one_hot", [args[0]], {}


def _sdpa(args, kwargs, shape_of) -> Translation:
    # scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    scale = args[6] if len(args) > 6 else kwargs.get("scale")
    gqa = args[7] if len(args) > 7 else kwargs.get("enable_gqa", False)
    return "sdpa", [args[0], args[1], args[2], mask], {"scale_given": scale is not None, "enable_gqa": bool(gqa)}


def _create(args, kwargs, shape_of) -> Translation:
    return "create", [], {}


def _arange(args, kwargs, shape_of) -> Translation:
    return "create", [], {"arange": True}


def _like(args, kwargs, shape_of) -> Translation:
    return "like", [args[0]], {}


def _index_add(args, kwargs, shape_of) -> Translation:
    # index_add(self, dim, index, source, alpha=1)
    nd = len(shape_of(args[0]))
    return "index_add", [args[0], args[2], args[3]], {"axis": _dim(args[1], nd)}


def _scatter(args, kwargs, shape_of) -> Translation:
    # scatter.src / scatter_add(self, dim, index, src); scatter.value(self, dim, index, value)
    nd = len(shape_of(args[0]))
    src = args[3] if len(args) > 3 and isinstance(args[3], torch.fx.Node) else None
    return "scatter", [args[0], args[2], src], {"axis": _dim(args[1], nd)}


def _scan(args, kwargs, shape_of) -> Translation:
    nd = len(shape_of(args[0]))
    dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
    if isinstance(dim, (list, tuple)):
        return "scan", [args[0]], {"axes": [_dim(d, nd) for d in dim]}
    return "scan", [args[0]], {"axes": [_dim(dim, nd)]}


def _diff(args, kwargs, shape_of) -> Translation:
    nd = len(shape_of(args[0]))
    dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
    return "scan", _tensors(args), {"axes": [_dim(dim, nd)]}


def _pool(args, kwargs, shape_of) -> Translation:
    nd = len(shape_of(args[0]))
    return "pool", [args[0]], {"spatial": list(range(2, nd))}


def _repeat(args, kwargs, shape_of) -> Translation:
    return "repeat", [args[0]], {"repeats": [int(r) for r in args[1]]}


def _repeat_interleave(args, kwargs, shape_of) -> Translation:
    if not isinstance(args[1], int):
        return "unknown", _tensors(args), {"why": "repeat_interleave with tensor repeats"}
    nd = len(shape_of(args[0]))
    dim = args[2] if len(args) > 2 else kwargs.get("dim")
    if dim is None:
        return "unknown", [args[0]], {"why": "repeat_interleave without dim flattens"}
    return "repeat_interleave", [args[0]], {"axis": _dim(dim, nd), "repeats": int(args[1])}


def _einsum(args, kwargs, shape_of) -> Translation:
    return "einsum", list(args[1]), {"equation": args[0]}


def _pad(args, kwargs, shape_of) -> Translation:
    nd = len(shape_of(args[0]))
    pads = list(args[1])
    axes = [nd - 1 - i // 2 for i in range(len(pads)) if pads[i] != 0]
    return "pad", [args[0]], {"axes": sorted(set(axes))}


def _noop(args, kwargs, shape_of) -> Translation:
    return "noop", [], {}


def _where(args, kwargs, shape_of) -> Translation:
    if len(args) == 1:
        return "unknown", [args[0]], {"why": "where(condition) returns data-dependent indices"}
    return _elementwise(args, kwargs, shape_of)


def _masked_fill(args, kwargs, shape_of) -> Translation:
    return "elementwise", _tensors(args), {}


ELEMENTWISE_OPS = """
add sub mul div true_divide pow neg abs exp exp2 log log1p log2 sqrt rsqrt reciprocal sin cos tan tanh
sigmoid silu gelu relu relu_ leaky_relu hardtanh hardswish hardsigmoid elu selu celu mish softplus erf
erfc sign clamp clamp_min clamp_max clip square maximum minimum fmod remainder floor ceil round trunc
eq ne lt le gt ge logical_and logical_or logical_not logical_xor bitwise_and bitwise_or bitwise_not
bitwise_xor __and__ __or__ __xor__ __invert__ where masked_fill lerp addcmul addcdiv fill sigmoid_
isnan isinf isfinite nan_to_num xlogy rsub mul_ add_ div_ sub_ copy copy_ glu_ threshold
""".split()

SHAPE_PRESERVING_FIRST_ARG = """
to _to_copy clone contiguous alias detach lift_fresh_copy dropout native_dropout type_as
_log_softmax _softmax softmax log_softmax feature_dropout alpha_dropout view_as_real
""".split()

ATEN_TRANSLATIONS: dict[str, Callable] = {}
for _name in ELEMENTWISE_OPS:
    ATEN_TRANSLATIONS[_name] = _elementwise
for _name in SHAPE_PRESERVING_FIRST_ARG:
    ATEN_TRANSLATIONS[_name] = _first_only
ATEN_TRANSLATIONS.update({
    "masked_fill": _masked_fill, "where": _where,
    "view": _reshape, "reshape": _reshape, "_unsafe_view": _reshape, "unsqueeze": _reshape,
    "squeeze": _reshape, "flatten": _reshape, "unflatten": _reshape, "view_as": _reshape,
    "permute": _permute, "transpose": _transpose, "t": _t, "numpy_T": _t,
    "expand": _expand, "expand_as": _expand, "broadcast_to": _expand,
    "linear": _linear, "matmul": _matmul, "mm": _matmul, "bmm": _matmul, "addmm": _addmm,
    "conv1d": _conv, "conv2d": _conv, "conv3d": _conv, "convolution": _conv, "_convolution": _conv,
    "_native_batch_norm_legit_no_training": _batch_norm, "batch_norm": _batch_norm,
    "_native_batch_norm_legit_functional": _batch_norm, "native_batch_norm": _batch_norm,
    "layer_norm": _layer_norm, "native_layer_norm": _layer_norm, "rms_norm": _rms_norm,
    "_fused_rms_norm": _rms_norm,
    "mean": _reduce, "sum": _reduce, "amax": _reduce, "amin": _reduce, "prod": _reduce,
    "logsumexp": _reduce, "norm": _reduce, "linalg_vector_norm": _reduce, "all": _reduce, "any": _reduce,
    "var": _var, "std": _var, "var_mean": _var,
    "slice": _slice, "split": _split, "split_with_sizes": _split, "chunk": _chunk,
    "unbind": _unbind, "cat": _cat, "concat": _cat, "stack": _stack,
    "slice_scatter": _slice_scatter, "select_scatter": _select_scatter,
    "select": _select, "index": _index, "gather": _gather, "index_select": _index_select,
    "embedding": _embedding, "topk": _topk, "sort": _sort, "argsort": _sort,
    "argmax": _argreduce, "argmin": _argreduce, "max": _max_dim, "min": _max_dim,
    "one_hot": _one_hot,
    "scaled_dot_product_attention": _sdpa,
    "zeros": _create, "ones": _create, "full": _create, "empty": _create, "scalar_tensor": _create,
    "randn": _create, "rand": _create, "new_zeros": _create, "new_ones": _create, "new_full": _create,
    "new_empty": _create, "empty_strided": _create, "tensor": _create, "_local_scalar_dense": _create,
    "arange": _arange,
    "zeros_like": _like, "ones_like": _like, "full_like": _like, "empty_like": _like, "rand_like": _like,
    "randn_like": _like,
    "index_add": _index_add, "index_add_": _index_add, "scatter": _scatter, "scatter_add": _scatter,
    "scatter_reduce": _scatter,
    "cumsum": _scan, "cumprod": _scan, "flip": _scan, "roll": _scan, "diff": _diff,
    "max_pool2d": _pool, "max_pool2d_with_indices": _pool, "avg_pool2d": _pool,
    "adaptive_avg_pool2d": _pool, "_adaptive_avg_pool2d": _pool, "max_pool1d": _pool, "avg_pool1d": _pool,
    "adaptive_avg_pool1d": _pool,
    "repeat": _repeat, "repeat_interleave": _repeat_interleave, "einsum": _einsum,
    "constant_pad_nd": _pad, "pad": _pad,
    "_assert_tensor_metadata": _noop, "_assert_async": _noop, "_assert_scalar": _noop,
    "sym_constrain_range_for_size": _noop, "_functional_assert_async": _noop,
})


def _triangle(args, kwargs, shape_of) -> Translation:
    """triu/tril keep entries by their position in the last two axes: those axes are pinned."""
    nd = len(shape_of(args[0]))
    return "scan", [args[0]], {"axes": [nd - 2, nd - 1]}


ATEN_TRANSLATIONS["triu"] = ATEN_TRANSLATIONS["tril"] = _triangle

HIGHER_ORDER_WRAPPERS = {"wrap_with_set_grad_enabled": 1, "wrap_with_autocast": 4}


def aten_name(target: Any) -> str:
    """'aten.linear.default' -> 'linear'."""
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


# ----------------------------------------------------------------------------- graph building
class _Builder:
    def __init__(self, graph: Graph, root: torch.fx.GraphModule) -> None:
        self.graph = graph
        self.root = root
        self.tensor_of: dict[torch.fx.Node, Any] = {}  # fx node -> tensor name or tuple of names

    def location(self, node: torch.fx.Node) -> str:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            return str(path) or node.name
        return node.name

    def add_value_tensors(self, node: torch.fx.Node, prefix: str, kind: str = ACTIVATION) -> Any:
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            names = []
            for i, v in enumerate(val):
                shape = _shape(v)
                if shape is None:
                    names.append(None)
                    continue
                name = f"{prefix}{node.name}.{i}"
                self.graph.add_tensor(Tensor(name, shape, str(v.dtype).replace("torch.", ""), kind))
                names.append(name)
            return tuple(names)
        shape = _shape(val)
        if shape is None:
            return None
        name = prefix + node.name
        self.graph.add_tensor(Tensor(name, shape, str(val.dtype).replace("torch.", ""), kind))
        return name

    def run(self, gm: torch.fx.GraphModule, prefix: str, bindings: dict[str, Any]) -> Any:
        """Translate the ops of `gm`; placeholders are bound by name in `bindings`."""
        result = None
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for n in placeholders:
            if n.name in bindings:
                self.tensor_of[n] = bindings[n.name]
            else:
                self.tensor_of[n] = self.add_value_tensors(n, prefix, DERIVED)
        for node in gm.graph.nodes:
            if node.op in ("placeholder",):
                continue
            if node.op == "output":
                result = node.args[0]
                continue
            if node.op == "get_attr":
                attr = getattr(gm, str(node.target), None)
                if isinstance(attr, torch.fx.GraphModule):
                    self.tensor_of[node] = attr
                else:
                    self.tensor_of[node] = self.add_value_tensors(node, prefix, DERIVED)
                continue
            if node.op != "call_function":
                self.tensor_of[node] = self.add_value_tensors(node, prefix)
                self.graph.add_op(Op(prefix + node.name, "unknown", [], _flat_names(self.tensor_of[node]),
                                     {"why": f"fx {node.op} {node.target}"}, str(node.target), self.location(node)))
                continue
            if node.target is operator.getitem:
                src = self.tensor_of.get(node.args[0])
                self.tensor_of[node] = src[node.args[1]] if isinstance(src, tuple) else None
                continue
            name = aten_name(node.target)
            if name in HIGHER_ORDER_WRAPPERS:
                self._inline(node, prefix, HIGHER_ORDER_WRAPPERS[name])
                continue
            self._translate(node, name, prefix)
        return result

    def _inline(self, node: torch.fx.Node, prefix: str, submodule_position: int) -> None:
        sub = self.tensor_of.get(node.args[submodule_position])
        if not isinstance(sub, torch.fx.GraphModule):
            sub = getattr(self.root, str(node.args[submodule_position].target))
        operands = node.args[submodule_position + 1:]
        sub_placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        bindings = {p.name: self.tensor_of.get(a) if isinstance(a, torch.fx.Node) else None
                    for p, a in zip(sub_placeholders, operands)}
        sub_prefix = f"{prefix}{node.name}/"
        out = self.run(sub, sub_prefix, bindings)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        # Inside the submodule, tensor_of maps its own output nodes; expose them as a tuple.
        self.tensor_of[node] = tuple(self.tensor_of.get(o) if isinstance(o, torch.fx.Node) else None for o in outs)

    def _translate(self, node: torch.fx.Node, name: str, prefix: str) -> None:
        def shape_of(arg):
            tname = self.tensor_of.get(arg)
            return self.graph.tensors[tname].shape

        outputs = self.add_value_tensors(node, prefix)
        translate = ATEN_TRANSLATIONS.get(name)
        try:
            if translate is None:
                op, inputs, attrs = "unknown", _tensors(list(node.args) + list(node.kwargs.values())), {}
            else:
                op, inputs, attrs = translate(node.args, node.kwargs, shape_of)
        except (IndexError, TypeError, KeyError) as exc:
            op, inputs, attrs = "unknown", _tensors(node.args), {"why": f"unexpected arguments ({exc})"}
        input_names = []
        for inp in inputs:
            if inp is None:
                input_names.append(None)
            else:
                tname = self.tensor_of.get(inp)
                input_names.append(tname if isinstance(tname, str) else None)
        self.tensor_of[node] = outputs
        if op == "noop":
            return
        self.graph.add_op(Op(prefix + node.name, op, input_names, _flat_names(outputs), attrs,
                             str(node.target), self.location(node)))


def _flat_names(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)]


# ----------------------------------------------------------------------------- public API
def default_example_inputs(model: torch.nn.Module, seq_len: int = 8) -> dict[str, Any]:
    """Example kwargs for tracing: token ids for HF text models."""
    config = getattr(model, "config", None)
    if config is None:
        raise TraceError("cannot guess example inputs for a non-HF module: pass example_inputs")
    device = next(iter(model.parameters())).device
    ids = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    kwargs: dict[str, Any] = {"input_ids": ids}
    if getattr(config, "is_decoder", False) or getattr(config, "use_cache", None) is not None:
        kwargs["use_cache"] = False
    return kwargs


def trace(model: torch.nn.Module, example_inputs: dict[str, Any] | tuple | None = None, *,
          seq_len: int = 8, allow_fallback: bool = True) -> Graph:
    """Trace `model` into a `Graph`: torch.export first; when export fails, an FX graph recorded
    from the ops executed on the example input."""
    if example_inputs is None:
        example_inputs = default_example_inputs(model, seq_len)
    args, kwargs = (tuple(example_inputs), {}) if isinstance(example_inputs, (tuple, list)) else ((), dict(example_inputs))
    with _batched_experts(model):
        return _trace(model, args, kwargs, allow_fallback)


@contextlib.contextmanager
def _batched_experts(model: torch.nn.Module):
    """Trace transformers' stacked MoE experts through their ``batched_mm`` implementation.

    The ``grouped_mm`` default (what ``from_pretrained`` picks) sorts tokens by expert and calls an
    opaque custom op, and ``eager`` loops over data-dependent hits: neither has dimension rules.
    ``batched_mm`` gathers ``W[expert_ids]`` and runs ``bmm``, computes the same function, and is
    what the expert groups are read from. The model's own setting is restored afterwards.
    """
    configs = {id(c): c for m in model.modules() for c in [getattr(m, "config", None)]
               if c is not None and getattr(c, "_experts_implementation", None) not in (None, "batched_mm")}
    previous = {key: c._experts_implementation for key, c in configs.items()}
    try:
        for c in configs.values():
            c._experts_implementation = "batched_mm"
        yield
    finally:
        for key, c in configs.items():
            c._experts_implementation = previous[key]


def _trace(model, args, kwargs, allow_fallback: bool) -> Graph:
    try:
        with torch.no_grad():
            exported = torch.export.export(model, args, kwargs, strict=False)
            if _has_mutations(exported.graph_module):
                # In-place ops (copy_, index_put_, ...) hide data flow from the rules; functionalise
                # only when needed, since it costs about one more export.
                exported = exported.run_decompositions({})
        graph = _from_exported(model, exported)
        graph.notes.append("traced with torch.export")
        return graph
    except TraceError:
        raise
    except Exception as exc:  # noqa: BLE001 - any export failure falls back to FX
        if not allow_fallback:
            raise TraceError(f"torch.export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
        export_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    graph = _trace_recorded(model, args, kwargs)
    # Notes describe the graph, not the run: no timings (the report must be reproducible).
    graph.notes.append(f"torch.export failed ({export_error[:200]}); traced by recording the executed ops "
                       f"into FX: the graph follows the branches the example input takes")
    return graph


def _has_mutations(gm: torch.fx.GraphModule) -> bool:
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            schema = getattr(node.target, "_schema", None)
            if node.op == "call_function" and schema is not None and schema.is_mutable:
                return True
    return False


def _tied_aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return {names[0]: names[1:] for names in by_id.values() if len(names) > 1}


def _from_exported(model: torch.nn.Module, exported: "torch.export.ExportedProgram") -> Graph:
    graph = Graph(type(model).__name__, "torch.export")
    sig = exported.graph_signature
    non_persistent = set(sig.non_persistent_buffers)
    gm = exported.graph_module
    builder = _Builder(graph, gm)
    bindings: dict[str, Any] = {}
    constants = getattr(sig, "inputs_to_lifted_tensor_constants", {})
    user_inputs = set(sig.user_inputs)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.name in sig.inputs_to_parameters:
            kind, source = PARAM, sig.inputs_to_parameters[node.name]
        elif node.name in sig.inputs_to_buffers:
            source = sig.inputs_to_buffers[node.name]
            kind = DERIVED if source in non_persistent else STATE
        elif node.name in constants:
            kind, source = DERIVED, constants[node.name]
        elif node.name in user_inputs:
            kind, source = INPUT, node.name
        else:
            kind, source = DERIVED, node.name
        _bind_placeholder(graph, builder, bindings, node, kind, source)
    return _finish(graph, builder, gm, bindings, model)


def _bind_placeholder(graph: Graph, builder: _Builder, bindings: dict, node: torch.fx.Node, kind: str,
                      source: str) -> None:
    tname = builder.add_value_tensors(node, "", kind)
    if isinstance(tname, str):
        graph.tensors[tname].source_name = source
    bindings[node.name] = tname


def _finish(graph: Graph, builder: _Builder, gm: torch.fx.GraphModule, bindings: dict,
            model: torch.nn.Module) -> Graph:
    """Translate the ops with the placeholders bound, then mark outputs and tied weights."""
    out = builder.run(gm, "", bindings)
    _mark_outputs(graph, builder, out)
    graph.aliases = _tied_aliases(model)
    return graph


def _mark_outputs(graph: Graph, builder: _Builder, out: Any) -> None:
    for node in _iter_nodes(out):
        names = builder.tensor_of.get(node)
        for name in _flat_names(names if not isinstance(names, str) else [names]):
            graph.tensors[name].is_output = True


def _iter_nodes(value: Any):
    if isinstance(value, torch.fx.Node):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _iter_nodes(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _iter_nodes(v)


class _Recorder:
    """Builds an FX graph of the ATen ops that actually run on the example inputs.

    A TorchDispatchMode sees every op with real tensors, so Python control flow on tensor values
    (which torch.export and make_fx refuse) simply takes the branch the example takes; the graph
    is specialised to that path, like torch.jit.trace. Tensors are matched to graph nodes by
    identity; only shapes are kept (as meta tensors), never activations.
    """

    def __init__(self) -> None:
        self.graph = torch.fx.Graph()
        self.node_of: dict[int, torch.fx.Node] = {}
        self.keep_alive: list[torch.Tensor] = []  # ids stay valid while the trace runs
        self.constants = 0

    @staticmethod
    def meta(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")

    def placeholder(self, t: torch.Tensor, name: str) -> torch.fx.Node:
        node = self.graph.placeholder(name)
        node.meta["val"] = self.meta(t)
        self.node_of[id(t)] = node
        self.keep_alive.append(t)
        return node

    def node_for(self, t: torch.Tensor) -> torch.fx.Node:
        node = self.node_of.get(id(t))
        if node is None:  # a tensor made outside any recorded op: a constant
            self.constants += 1
            node = self.placeholder(t, f"constant_{self.constants}")
        return node

    def record(self, func, args, kwargs, out) -> None:
        from torch.utils._pytree import tree_map

        def to_node(a):
            return self.node_for(a) if isinstance(a, torch.Tensor) else a

        node = self.graph.call_function(func, tree_map(to_node, tuple(args)), tree_map(to_node, dict(kwargs)))
        if isinstance(out, torch.Tensor):
            node.meta["val"] = self.meta(out)
            self.node_of[id(out)] = node
            self.keep_alive.append(out)
        elif isinstance(out, (tuple, list)):
            node.meta["val"] = tuple(self.meta(o) if isinstance(o, torch.Tensor) else None for o in out)
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    item = self.graph.call_function(operator.getitem, (node, i))
                    item.meta["val"] = self.meta(o)
                    self.node_of[id(o)] = item
                    self.keep_alive.append(o)


def _trace_recorded(model: torch.nn.Module, args: tuple, kwargs: dict) -> Graph:
    """FX fallback: an FX graph of the ops executed on the example inputs (see `_Recorder`)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    recorder = _Recorder()
    persistent = set(model.state_dict().keys())
    sources: dict[str, tuple[str, str]] = {}
    for name, p in model.named_parameters():
        sources[recorder.placeholder(p, f"p_{len(sources)}").name] = (PARAM, name)
    for name, b in model.named_buffers():
        sources[recorder.placeholder(b, f"b_{len(sources)}").name] = (STATE if name in persistent else DERIVED, name)
    inputs = list(enumerate(args)) + list(kwargs.items())
    for key, value in inputs:
        if isinstance(value, torch.Tensor):
            sources[recorder.placeholder(value, f"in_{key}").name] = (INPUT, str(key))

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            kw = kw or {}
            out = func(*a, **kw)
            recorder.record(func, a, kw, out)
            return out

    try:
        with torch.no_grad(), Mode():
            out = model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise TraceError(f"could not trace {type(model).__name__} with torch.export nor by recording: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    outputs = [recorder.node_of[id(t)] for t in tree_leaves(out) if isinstance(t, torch.Tensor) and id(t) in recorder.node_of]
    recorder.graph.output(tuple(outputs))
    gm = torch.fx.GraphModule(torch.nn.Module(), recorder.graph)
    graph = Graph(type(model).__name__, "torch.fx (recorded)")
    builder = _Builder(graph, gm)
    bindings: dict = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            kind, source = sources.get(node.name, (DERIVED, node.name))
            _bind_placeholder(graph, builder, bindings, node, kind, source)
    return _finish(graph, builder, gm, bindings, model)
