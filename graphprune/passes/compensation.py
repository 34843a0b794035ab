"""Compensations: what a consumer layer (o_proj, down_proj, ...) does about its removed inputs.

A registry like the criteria's: `@register` (or the ``graphprune.compensations`` entry-point group)
adds one; each declares what it needs computed and whether it runs block by block. The passes
that carry them out are `passes.bias.BiasCompensation` (FLAP's mean, on the whole model) and
`passes.layerwise.LayerwiseCompensation` (least squares, and the mean with ``--sequential``).
"""

from __future__ import annotations

from dataclasses import dataclass
from ..plugins import load_entry_points

from ..criteria.base import Need
from ..errors import UserError


@dataclass(frozen=True)
class Compensation:
    name: str
    needs: Need  # computed before the rewrite (with --sequential: Gram matrices block by block)
    layerwise: bool  # refits each consumer on its input's Gram matrix, block by block
    summary: str

    def needs_for(self, *, sequential: bool) -> Need:
        """What it needs with or without --sequential (sequential runs are always block by block)."""
        return self.needs | (Need.GRAMS if sequential else Need.NONE)


_REGISTRY: dict[str, Compensation] = {}
# Without --compensate a criterion gets least squares where the backend and the layers support it
# (`backends.base.Backend.default_compensation`); where they do not, FLAP falls back to its own bias
# compensation and the others to none.
FALLBACKS = {"flap": "bias"}


def register(compensation: Compensation) -> Compensation:
    _REGISTRY[compensation.name] = compensation
    return compensation


register(Compensation("none", Need.NONE, False, "removed inputs are dropped"))
register(Compensation("bias", Need.ACTIVATIONS, False,
                      "FLAP: each removed input is replaced by its calibration mean, b' = b + W[:, R]·mean(x_R)"))
register(Compensation("lsq", Need.GRAMS, True,
                      "least squares: the kept columns and the bias are refit on the calibration inputs"))


def _load_entry_points() -> None:
    load_entry_points("graphprune.compensations", "compensation", _REGISTRY, lambda _, loaded: register(loaded))


def available() -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY)


def get(name: str) -> Compensation:
    names = available()
    if name not in _REGISTRY:
        raise UserError(f"unknown --compensate '{name}' (choose from {', '.join(names)})")
    return _REGISTRY[name]


def fallback_for(criterion: str | None) -> str:
    """The compensation a criterion gets where least squares is not available."""
    return FALLBACKS.get(criterion or "", "none")
