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


# Errors of the environment rather than of graphprune: the machine ran out of something or refused
# an operation. Reported like a user error (one line, exit 2), never as a bug.
_ENVIRONMENT_ERRNOS = {
    "ENOSPC": "no space left on the device",
    "EDQUOT": "disk quota exceeded",
    "EFBIG": "file too large for the filesystem or the process's file-size limit",
    "EROFS": "read-only filesystem",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
    "EMFILE": "too many open files",
}


def classify(error: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for an error that is the user's or the environment's, None for a
    bug (the CLI reports those as internal errors). Every command goes through this one decision."""
    import errno

    if isinstance(error, UserError):
        return 2, f"graphprune: error: {' '.join(str(error).split())}"
    if isinstance(error, ValidationError):
        return 1, f"graphprune: validation failed: {error}"
    if isinstance(error, MemoryError):
        return 2, ("graphprune: error: out of memory; lower --nsamples, --seqlen or the batch size, or prune "
                   "layer by layer with --stream")
    if isinstance(error, OSError) and error.errno is not None:
        name = errno.errorcode.get(error.errno, "")
        if name in _ENVIRONMENT_ERRNOS:
            where = f" ({error.filename})" if error.filename else ""
            return 2, f"graphprune: error: {_ENVIRONMENT_ERRNOS[name]}{where}: {error.strerror or error}"
    text = str(error)
    if isinstance(error, RuntimeError) and ("DefaultCPUAllocator: can't allocate memory" in text
                                            or "not enough memory" in text):
        return 2, ("graphprune: error: out of memory; lower --nsamples, --seqlen or the batch size, or prune "
                   "layer by layer with --stream")
    return None
