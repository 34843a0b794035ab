"""The streaming backend: prune a checkpoint larger than memory, one decoder layer at a time.

    graphprune.compress("path/to/hf-model", out="out/", stream=True, criterion="flap", sparsity=0.5)

`backend` is the backend the driver calls; `sweeps` runs the statistics and cut sweeps;
`architecture` finds the groups of a model that is never built; `workdir` keeps what `--resume`
needs.
"""

from .architecture import StreamingUnsupported
from .backend import StreamBackend

__all__ = ["StreamBackend", "StreamingUnsupported"]
