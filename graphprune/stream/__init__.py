"""Streaming compress: prune a checkpoint larger than memory, one decoder layer at a time.

    from graphprune.stream import compress_streaming
    compress_streaming("path/to/hf-model", "out/", criterion="flap", sparsity=0.5)

See `compress` for how it works and `architecture` for how the groups of a model that is never
built are found.
"""

from .architecture import StreamingUnsupported
from .compress import StreamResult, check_streamable, compress_streaming, resolve_device, resolve_dtype

__all__ = ["StreamResult", "StreamingUnsupported", "check_streamable", "compress_streaming", "resolve_device",
           "resolve_dtype"]
