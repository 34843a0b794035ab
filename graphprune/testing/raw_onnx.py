"""ONNX files as `torch.onnx.export` writes them, without graphprune's weight renaming.

`graphprune export` names folded weights after their parameters (``model.layers.0.mlp.up_proj.weight_t``);
files written by `torch.onnx.export` itself or by Optimum do not: the TorchScript exporter calls a
transposed linear weight ``onnx::MatMul_123``, the dynamo exporter's optimizer ``val_42``. Tests and
benchmarks use `export_raw` to get such files (the Optimum interface: named token inputs, one output).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import warnings
from pathlib import Path

import torch


class _TokensToOutput(torch.nn.Module):
    """`model` with named token inputs and one tensor out (logits or last_hidden_state), no cache.

    The model is a child named ``model`` (so parameter names carry that prefix, as in Optimum's
    exports of a wrapped model): nothing depends on them."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, input_ids, attention_mask=None):
        given = {"input_ids": input_ids, "attention_mask": attention_mask}
        out = self.model(**{n: given[n] for n in self.names}, **self.extra, return_dict=True)
        return out["logits"] if out.get("logits") is not None else out["last_hidden_state"]


def export_raw(model: torch.nn.Module, path: str | Path, *, dynamo: bool, seq_len: int = 8,
               with_attention_mask: bool = True, example: tuple | None = None) -> Path:
    """Write `model` to `path` with `torch.onnx.export` (TorchScript when not `dynamo`), keeping the
    exporter's own initializer names. A token model gets (batch, sequence) dynamic axes; any other
    module is exported with `example` as its positional inputs, shapes static. Token models take
    an attention mask by default (without one, transformers' packed-sequence check runs
    ``aten::diff``, which the TorchScript exporter cannot write)."""
    path = Path(path)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if example is not None:
            torch.onnx.export(model.eval(), example, str(path), dynamo=dynamo, verbose=False,
                              **({"external_data": False} if dynamo else {}))
            return path
        names = ["input_ids"] + (["attention_mask"] if with_attention_mask else [])
        vocab = int(getattr(model.config, "vocab_size", 100))
        ids = torch.randint(3, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
        args = (ids, torch.ones_like(ids)) if with_attention_mask else (ids,)
        wrapper = _TokensToOutput(model.eval(), names)
        if dynamo:
            batch, seq = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
            torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=["output"],
                              dynamic_shapes=tuple({0: batch, 1: seq} for _ in names), dynamo=True,
                              verbose=False, external_data=False)
        else:
            axes = {0: "batch_size", 1: "sequence_length"}
            torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=["output"],
                              dynamic_axes={n: axes for n in names + ["output"]}, opset_version=17,
                              dynamo=False, do_constant_folding=True)
    return path
