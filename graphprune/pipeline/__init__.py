"""The compress pipeline: options, the driver, the report."""

from .run import CompressResult, compress

__all__ = ["CompressResult", "compress"]
