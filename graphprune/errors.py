"""One exception hierarchy for the whole package.

`UserError` (and its subclasses) means the user asked for something that cannot be done: the CLI
prints its message as one line and exits with code 2. Anything else escaping the API is a bug in
graphprune: the CLI prints a short message with a hint to report it (traceback with --debug).
"""


class GraphpruneError(Exception):
    """Base class of every error graphprune raises on purpose."""


class UserError(GraphpruneError):
    """Bad input or an impossible request. The message is one line meant for the user."""


class ModelLoadError(UserError):
    """The model path, alias or file cannot be loaded."""


class CalibrationError(UserError):
    """The calibration data is missing, empty, unreadable or too short."""


class PruningError(UserError):
    """The requested pruning cannot be carried out (e.g. it would remove every unit of a group)."""


class OutputError(UserError):
    """The output location is unusable (exists, equals the input, no space, ...)."""


class TraceError(UserError):
    """The model could not be traced to a graph."""


class GraphpruneWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI prints it as one line)."""


class ValidationError(GraphpruneError):
    """The rewritten model failed validation (NaN/Inf, shape mismatch): nothing was written."""
