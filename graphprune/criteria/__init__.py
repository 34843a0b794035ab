"""Criteria: score the units of a dependency group (higher = more important = kept).

Each criterion lives in its own module and registers itself by name with `@register`. Third-party
criteria are discovered through the ``graphprune.criteria`` entry-point group: an entry point
``name = package.module:CriterionClass`` makes ``--criterion name`` work.
"""

from __future__ import annotations

import difflib
from ..plugins import load_entry_points

from ..errors import UserError
from .base import Criterion, ScoringContext

_REGISTRY: dict[str, type[Criterion]] = {}


def register(cls: type[Criterion]) -> type[Criterion]:
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    from . import (
        cfsp,
        easyep,
        fisher,
        flap,
        frequency,
        gaprune,
        magnitude,
        obs,
        random_experts,
        reap,
        spectral,
        taylor,
        wanda_sp,
    )


def _load_entry_points() -> None:
    load_entry_points("graphprune.criteria", "criterion", _REGISTRY, _REGISTRY.__setitem__)


def available() -> list[str]:
    _load_builtin()
    _load_entry_points()
    return sorted(_REGISTRY)


def get(name: str, **options) -> Criterion:
    names = available()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown criterion '{name}'{hint} (available: {', '.join(names)})")
    return _REGISTRY[name](**options)


__all__ = ["Criterion", "ScoringContext", "available", "get", "register"]
