"""Checks of the ONNX export that must not be switched off by accident (issue 24, defect 12): a parity
tolerance that is not a finite positive number, and weights holding NaN/Inf, are refused before
anything is written."""

from __future__ import annotations

import math

import pytest
import torch

from graphprune.errors import ModelLoadError, UserError
from graphprune.io.onnx_export import check_atol, export_onnx, write_onnx
from graphprune.testing.fixtures import tiny_llama


@pytest.mark.parametrize("atol", [math.nan, math.inf, -math.inf, 0.0, -1e-4, "x"], ids=str)
def test_a_tolerance_that_is_not_finite_and_positive_is_refused(tmp_path, atol):
    """`--atol nan` once passed every parity check (any comparison with NaN is false)."""
    with pytest.raises(UserError, match=r"^--atol must be a finite number greater than 0, got "):
        export_onnx(tiny_llama(), tmp_path / "out", atol=atol)
    with pytest.raises(UserError, match="--atol must be a finite number greater than 0"):
        write_onnx(tiny_llama(), tmp_path, atol=atol)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_good_tolerances_pass():
    assert check_atol(1e-4) == 1e-4 and check_atol("0.5") == 0.5


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_weights_holding_nan_or_inf_are_refused_before_exporting(tmp_path, value):
    """It was a failed parity check (exit 1) where compress says exit 2 for the same model."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[3, 5] = value
    with pytest.raises(ModelLoadError, match=r"^the input model is broken: model\.layers\.1\.self_attn\.o_proj\.weight "
                                             r"holds 1 NaN/Inf value\(s\); refusing to export it$"):
        export_onnx(model, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
