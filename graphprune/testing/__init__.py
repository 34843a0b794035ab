"""Test and benchmark helpers for graphprune.

`graphprune.testing.zoo` builds tiny, deterministic, randomly initialised models for
each supported Hugging Face family (plus a small CNN) and describes the pruning groups
a correct tracer must find in them.
"""

from graphprune.testing.zoo import (
    TINY_FAMILIES,
    ParamSlice,
    build_tiny,
    example_inputs,
    expected_structure,
    permute_units,
    save_tiny,
    tiny_cnn,
)

__all__ = [
    "TINY_FAMILIES",
    "ParamSlice",
    "build_tiny",
    "example_inputs",
    "expected_structure",
    "permute_units",
    "save_tiny",
    "tiny_cnn",
]
