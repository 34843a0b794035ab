"""Where a model computes (`--device`) and in which precision (`--dtype`)."""

from __future__ import annotations

import torch

from .errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("cpu", "cuda", "auto")


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise UserError(f"unknown --device '{device}' (choose from {', '.join(DEVICES)})")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to this torch "
                        f"({torch.__version__}); use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]
