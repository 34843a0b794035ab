"""Rewrite passes. Each pass is a small object with one job and a `run(...)` method."""

from .compensate import BiasCompensation
from .config import ConfigRewrite
from .slice import SliceParameters
from .validate import Validate

__all__ = ["BiasCompensation", "ConfigRewrite", "SliceParameters", "Validate"]
