"""Export a (pruned) Hugging Face model to ONNX, laid out like Optimum's exports, and check it.

The directory gets ``model.onnx`` (weights inline; in ``model.onnx_data`` above 1.5 GB), the
config, the tokenizer and ``graphprune_onnx.json`` (how it was exported, the parity numbers).

* Inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for BERT-like encoders), all
  int64 ``[batch_size, sequence_length]``; output ``logits`` (``last_hidden_state`` for a base
  encoder), with dynamic batch and sequence axes. No KV-cache inputs or outputs: this is the
  prefill / encoder graph (Optimum's "without past" export), which is what the benchmark runs.
* Any module works, including per-layer (heterogeneous) pruned models from `load_pruned`: the
  exporter traces the module as it is.
* MoE models: transformers' default expert kernels do not export (eager loops over a
  data-dependent expert set, grouped_mm has no ONNX symbolic), so the export switches the model to
  ``experts_implementation="batched_mm"`` (every token through its top-k experts with batched
  matmuls, numerically the same) and back afterwards.
* Parity: the exported file runs in onnxruntime on sample inputs of other shapes than the traced
  ones (so the dynamic axes are exercised, one row right-padded; tokens of the bundled text excerpt
  when a tokenizer is given, random tokens otherwise) and its outputs are compared with
  PyTorch's on the non-padded positions. PyTorch runs in float64 for this, so the difference is
  onnxruntime's own fp32 error, not the sum of two fp32 runtimes' rounding; PyTorch's fp32 error
  on the same inputs is reported next to it (a model that cannot run in float64 is compared with
  fp32 PyTorch). Above the tolerance `ValidationError` is raised and nothing is written. The
  tolerance is ``atol · max(1, max|reference|)``: an absolute 1e-4 for outputs of order one,
  relative to the output scale beyond (on SmolLM2's logits of order 35, onnxruntime is 7e-5 from
  float64 on text but 3e-4 on random tokens, where PyTorch fp32 itself is 1.2e-4 off).
* Initializers that the exporter constant-folded from a parameter (``W.T`` of every Linear, which
  it names ``onnx::MatMul_123`` / ``val_42``) are renamed ``<parameter>_t`` so the ONNX file
  keeps the model's layer structure for inspection and ONNX-native pruning.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import math
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError, ValidationError

ONNX_FILE = "model.onnx"
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "torchscript"
DEFAULT_ATOL = 1e-4
# (batch, sequence) of the parity inputs: neither is the traced (2, 8), so the dynamic axes are used.
PARITY_SHAPES = ((1, 11), (3, 19))
TRACE_SHAPE = (2, 8)
AXES = {0: "batch_size", 1: "sequence_length"}


@dataclass
class OnnxExport:
    path: Path
    exporter: str
    opset: int
    inputs: list[str]
    output: str
    max_abs_diff: float
    reference_scale: float
    tolerance: float
    seconds: float
    notes: list[str] = field(default_factory=list)
    # The PyTorch reference the difference is taken against: "float64" (the model run in double
    # precision, so the number is onnxruntime's own fp32 error) or "float32" where the model cannot
    # run in double precision.
    reference: str = "float64"
    # max |PyTorch fp32 - PyTorch fp64| on the same inputs: the rounding error the fp32 model has
    # in PyTorch as well, for scale (None with a float32 reference).
    torch_fp32_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


class _LogitsOnly(torch.nn.Module):
    """The model with Optimum's interface: named token inputs in, one tensor out, no cache.

    The model's children are registered here under their own names, so parameter names (and the
    ONNX initializer names) are the model's, without a wrapper prefix."""

    def __init__(self, model: torch.nn.Module, input_names: list[str], output: str) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        self.__dict__["_model"] = model
        self._input_names = input_names
        self._output = output
        params = inspect.signature(model.forward).parameters
        self._extra = {"use_cache": False} if "use_cache" in params else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        inputs = {n: given[n] for n in self._input_names}
        return self._model(**inputs, **self._extra, return_dict=True)[self._output]


def interface(model: torch.nn.Module) -> tuple[list[str], str]:
    """(input names, output name) of the export, Optimum-style."""
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params:
        raise UserError(f"{type(model).__name__} takes no input_ids: only token models export to ONNX here")
    names = ["input_ids"]
    if "attention_mask" in params:
        names.append("attention_mask")
    config = getattr(model, "config", None)
    if "token_type_ids" in params and getattr(config, "type_vocab_size", 0):
        names.append("token_type_ids")
    probe = _sample(model, names, (1, 4))
    with torch.no_grad():
        out = model(**dict(zip(names, probe)), **({"use_cache": False} if "use_cache" in params else {}),
                    return_dict=True)
    output = "logits" if out.get("logits") is not None else "last_hidden_state"
    if out.get(output) is None:
        raise UserError(f"{type(model).__name__} returns neither logits nor last_hidden_state")
    return names, output


def _vocab(model: torch.nn.Module) -> int:
    return int(getattr(getattr(model, "config", None), "vocab_size", 0) or 100)


def _sample(model: torch.nn.Module, names: list[str], shape: tuple[int, int], *, pad_row: int | None = None,
            seed: int = 0, text_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    n = shape[0] * shape[1]
    if text_ids is not None and text_ids.numel() >= n * (seed + 1):
        ids = text_ids[n * seed:n * (seed + 1)].reshape(shape)
    else:
        ids = torch.randint(3, max(_vocab(model), 4), shape, generator=generator)
    mask = torch.ones(shape, dtype=torch.long)
    if pad_row is not None and shape[1] > 4:
        mask[pad_row, shape[1] - 4:] = 0  # right padding: the last 4 tokens of that row
    by_name = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros(shape, dtype=torch.long)}
    return [by_name[n] for n in names]


@contextlib.contextmanager
def _exportable(model: torch.nn.Module):
    """Switch an MoE model to batched_mm experts for the export; restore it afterwards.

    Every config the modules hold is switched, not only the model's: the layers `load_pruned` rebuilt
    with other sizes (per-layer overrides) keep their own copy of the config, which
    `set_experts_implementation` on the model does not reach."""
    is_moe = any(type(m).__name__.endswith("Experts") for m in model.modules())
    configs = {id(c): c for c in [getattr(model, "config", None)] + [getattr(m, "config", None) for m in model.modules()]
               if c is not None and hasattr(c, "_experts_implementation")}
    previous = {key: c._experts_implementation for key, c in configs.items()}
    switched = is_moe and any(v not in (None, "batched_mm") for v in previous.values())
    if switched:
        for c in configs.values():
            c._experts_implementation = "batched_mm"
    try:
        yield switched
    finally:
        if switched:
            for key, c in configs.items():
                c._experts_implementation = previous[key]


def _run_exporter(wrapper: torch.nn.Module, args: tuple, path: Path, names: list[str], output: str,
                  exporter: str, opset: int | None) -> int:
    dynamic_names = names + [output]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # tracer and deprecation warnings: the parity check decides
        if exporter == "torchscript":
            opset = opset or 17
            torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=[output],
                              dynamic_axes={n: AXES for n in dynamic_names}, opset_version=opset,
                              dynamo=False, do_constant_folding=True)
        else:
            opset = opset or 18
            batch, seq = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
            torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=[output],
                              dynamic_shapes=tuple({0: batch, 1: seq} for _ in names), opset_version=opset,
                              dynamo=True, optimize=True, verbose=False, external_data=True)
    return opset


def _name_folded_weights(proto, model: torch.nn.Module) -> int:
    """Rename initializers that hold a parameter's transpose to ``<parameter>_t``; returns the count."""
    from onnx import numpy_helper

    by_digest: dict[bytes, str] = {}
    for name, p in model.named_parameters():
        if p.ndim == 2:
            t = np.ascontiguousarray(p.detach().float().numpy().T)
            by_digest.setdefault(hashlib.sha1(t.tobytes() + str(t.shape).encode()).digest(), name)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    renames: dict[str, str] = {}
    taken = {i.name for i in proto.graph.initializer}
    for init in proto.graph.initializer:
        if init.name in params or len(init.dims) != 2 or init.data_type != 1:
            continue
        value = numpy_helper.to_array(init)
        source = by_digest.get(hashlib.sha1(value.tobytes() + str(value.shape).encode()).digest())
        if source and f"{source}_t" not in taken:
            renames[init.name] = f"{source}_t"
            taken.add(f"{source}_t")
    if not renames:
        return 0
    for init in proto.graph.initializer:
        if init.name in renames:
            init.name = renames[init.name]
    for vi in list(proto.graph.input) + list(proto.graph.value_info):
        if vi.name in renames:
            vi.name = renames[vi.name]
    for node in proto.graph.node:
        for k, i in enumerate(node.input):
            if i in renames:
                node.input[k] = renames[i]
    return len(renames)


def _text_ids(tokenizer: Any, vocab: int) -> torch.Tensor | None:
    """Token ids of the bundled text excerpt: parity on text, as the model will be used."""
    if tokenizer is None:
        return None
    from ..calibration.text import default_calibration_text, tokenize_text

    try:
        ids = tokenize_text(tokenizer, default_calibration_text()).reshape(-1)
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode it: random tokens instead
        return None
    return ids if ids.numel() and int(ids.max()) < vocab else None


@contextlib.contextmanager
def _float64(model: torch.nn.Module):
    """The model's floating parameters and buffers in float64 for the block, then back in float32
    (exact: every float32 value is a float64 value). Tied weights stay tied (`Module._apply`)."""
    model.double()
    try:
        yield model
    finally:
        model.float()


def parity(model: torch.nn.Module, onnx_path: Path, names: list[str], output: str,
           atol: float = DEFAULT_ATOL, tokenizer: Any = None) -> dict[str, Any]:
    """Max abs difference between onnxruntime (fp32) and PyTorch run in float64, on text when a
    tokenizer is given (random tokens otherwise), with the reference scale, the tolerance and
    PyTorch's own fp32 difference from float64 on the same inputs.

    The reference is float64 because fp32 PyTorch is itself off by about as much as the 1e-4 budget
    on a 30-layer LM (different summation orders in its matmuls): comparing two fp32 runtimes would
    measure both runtimes' rounding, not the export."""
    from .onnx_files import session

    sess = session(onnx_path)
    text_ids = _text_ids(tokenizer, _vocab(model))
    samples = [_sample(model, names, shape, pad_row=1 if shape[0] > 1 else None, seed=k + 1, text_ids=text_ids)
               for k, shape in enumerate(PARITY_SHAPES)]
    logits = _LogitsOnly(model, names, output)
    with torch.no_grad():
        fp32 = [logits(*inputs).float().numpy().astype(np.float64) for inputs in samples]
        try:
            with _float64(model):
                refs = [logits(*inputs).double().numpy() for inputs in samples]
            reference = "float64"
        except (RuntimeError, TypeError, NotImplementedError):  # an op without a float64 kernel
            refs, reference = fp32, "float32"
    worst = scale = torch_fp32 = 0.0
    for inputs, ref, ref32 in zip(samples, refs, fp32):
        got = sess.run([output], {n: t.numpy() for n, t in zip(names, inputs)})[0]
        if got.shape != ref.shape:
            raise ValidationError(f"ONNX output {output} has shape {got.shape}, PyTorch {ref.shape}")
        valid = inputs[names.index("attention_mask")].numpy().astype(bool) if "attention_mask" in names \
            else np.ones(got.shape[:2], dtype=bool)
        if not np.all(np.isfinite(got[valid])):
            raise ValidationError("the ONNX model produces NaN/Inf outputs")
        worst = max(worst, float(np.abs(got.astype(np.float64) - ref)[valid].max()))
        torch_fp32 = max(torch_fp32, float(np.abs(ref32 - ref)[valid].max()))
        scale = max(scale, float(np.abs(ref[valid]).max()))
    # atol for outputs of order one, relative to the output's scale beyond: onnxruntime's MatMul
    # kernels sum in another order than PyTorch's, and through 30 layers that differs by up to
    # ~3e-4 on logits of order 35 for random tokens (PyTorch fp32 itself is 1.2e-4 off there).
    return {"max_abs_diff": worst, "reference_scale": scale, "tolerance": atol * max(1.0, scale),
            "reference": reference, "torch_fp32_diff": torch_fp32 if reference == "float64" else None}


def write_onnx(model: torch.nn.Module, directory: Path, *, exporter: str = DEFAULT_EXPORTER,
               opset: int | None = None, atol: float = DEFAULT_ATOL, tokenizer: Any = None) -> OnnxExport:
    """Export `model` into the (fresh, existing) `directory` as ``model.onnx`` and check parity.
    Raises ValidationError above the tolerance (the caller discards the directory)."""
    import onnx

    from .onnx_files import save_model

    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter '{exporter}' (choose from {', '.join(EXPORTERS)})")
    atol = check_atol(atol)
    started = time.perf_counter()
    model = model.float().eval()
    notes = []
    names, output = interface(model)
    with _exportable(model) as switched, torch.no_grad():
        if switched:
            notes.append("MoE experts exported with experts_implementation='batched_mm'")
        wrapper = _LogitsOnly(model, names, output).eval()
        raw = Path(tempfile.mkdtemp(prefix=".export-", dir=directory))
        try:
            opset = _run_exporter(wrapper, tuple(_sample(model, names, TRACE_SHAPE)), raw / ONNX_FILE, names, output,
                                  exporter, opset)
            proto = onnx.load(str(raw / ONNX_FILE))  # (reads any external data the exporter wrote)
            renamed = _name_folded_weights(proto, model)
            if renamed:
                notes.append(f"{renamed} folded weight transposes named <parameter>_t")
            path = save_model(proto, directory / ONNX_FILE)
        finally:
            shutil.rmtree(raw, ignore_errors=True)
        checked = parity(model, path, names, output, atol, tokenizer)
    result = OnnxExport(path, exporter, opset, names, output, seconds=round(time.perf_counter() - started, 2),
                        notes=notes, **checked)
    if result.max_abs_diff > result.tolerance:
        raise ValidationError(f"ONNX parity check failed: max abs {output} difference {result.max_abs_diff:.3g} "
                              f"between onnxruntime and PyTorch ({result.reference}) exceeds the tolerance "
                              f"{result.tolerance:.3g} (atol {atol:g} x output scale "
                              f"{max(1.0, result.reference_scale):.3g}); nothing was written")
    (directory / "graphprune_onnx.json").write_text(json.dumps(result.to_dict(), indent=1, sort_keys=True) + "\n")
    return result


def check_atol(atol: Any) -> float:
    """The parity tolerance as a float, or a UserError: it must be a finite number above 0 (NaN would
    pass every comparison, infinity every model)."""
    try:
        value = float(atol)
    except (TypeError, ValueError):
        raise UserError(f"--atol must be a finite number greater than 0, got {atol!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"--atol must be a finite number greater than 0, got {atol!r}")
    return value


def check_opset(opset: int | None, exporter: str = DEFAULT_EXPORTER) -> int | None:
    """Refuse an opset the exporter, the installed onnx or graphprune's ONNX rules cannot handle."""
    from .onnx_files import MIN_OPSET, max_opset

    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter '{exporter}' (choose from {', '.join(EXPORTERS)})")
    if opset is None:
        return None
    lowest = 18 if exporter == "dynamo" else MIN_OPSET
    # torch's TorchScript exporter stops at opset 20; the dynamo exporter follows onnx
    highest = min(max_opset(), 20) if exporter == "torchscript" else max_opset()
    if not lowest <= int(opset) <= highest:
        raise UserError(f"--opset {opset} is outside what the {exporter} exporter and the installed onnx support "
                        f"({lowest}..{highest})")
    return int(opset)


def export_onnx(model: torch.nn.Module, out: str | Path, *, tokenizer: Any = None, exporter: str = DEFAULT_EXPORTER,
                opset: int | None = None, atol: float = DEFAULT_ATOL, force: bool = False,
                source_dir: Path | None = None) -> OnnxExport:
    """Export into the directory `out` (model.onnx + config + tokenizer), atomically: a temporary
    sibling directory replaces `out` only after the parity check passed. A tolerance that is not a
    finite positive number, or weights holding NaN/Inf, are refused before anything is written."""
    from ..guards import check_finite_weights
    from .paths import check_output

    atol = check_atol(atol)
    check_opset(opset, exporter)
    check_finite_weights(model, action="export")
    out = check_output(out, inputs=[source_dir] if source_dir is not None else [], force=force)
    from .atomic import atomic_directory

    with atomic_directory(out, force=force) as tmp:
        result = write_onnx(model, tmp, exporter=exporter, opset=opset, atol=atol, tokenizer=tokenizer)
        config = getattr(model, "config", None)
        if config is not None:
            config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if source_dir is not None and (source_dir / "graphprune_report.json").is_file():
            shutil.copy2(source_dir / "graphprune_report.json", tmp / "graphprune_report.json")
    result.path = out / ONNX_FILE
    return result
