"""`graphprune compress --stream`: choosing streaming, resolving the input, reporting interrupts."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError
from .architecture import StreamingUnsupported
from .workdir import PartialRunError

# In memory, compress holds the fp32 model plus calibration and the rewrite's new tensors; above
# this fraction of the available memory it would swap or be killed, so `--stream` is chosen.
AUTO_STREAM_FRACTION = 0.8


def available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def wants_stream(args) -> bool:
    """--stream / --no-stream decide; otherwise stream when the model is a safetensors folder too big
    for memory in fp32 (saying so), or when --resume asks to continue a streaming run."""
    stream = args.stream
    if stream is None and args.resume:
        stream = True
    if stream is None:
        reason = _too_big_for_memory(args.model)
        if reason:
            print(f"note: {reason}: pruning layer by layer (--stream); pass --no-stream to load it whole")
            stream = True
    if not stream:
        asked = [flag for flag, on in (("--resume", args.resume), ("--device cuda", args.device == "cuda"),
                                       (f"--dtype {args.dtype}", args.dtype not in (None, "fp32"))) if on]
        if asked:
            raise UserError(f"{' and '.join(asked)} {'is' if len(asked) == 1 else 'are'} only used by streaming runs: "
                            f"add --stream")
    return bool(stream)


def _too_big_for_memory(spec: str) -> str | None:
    path = Path(spec).expanduser()
    if not path.is_dir():
        return None
    try:
        from .checkpoint import Checkpoint

        checkpoint = Checkpoint(path)
    except (UserError, OSError):
        return None  # the in-memory loader reports what is wrong with it (unreadable, malformed)
    fp32 = 4 * checkpoint.numel()
    available = available_memory_bytes()
    if available is None or fp32 <= AUTO_STREAM_FRACTION * available:
        return None
    return f"{path.name} needs about {fp32 / 2**30:.1f} GiB in fp32 and {available / 2**30:.1f} GiB are available"


def stream_source(spec: str) -> tuple[Path, str]:
    """(safetensors folder, display name) for a model argument, or a one-line refusal."""
    from ..models.aliases import BUNDLED_ALIASES, resolve_alias

    name = None
    path = Path(spec).expanduser()
    if "/" not in spec and spec.strip().lower() in BUNDLED_ALIASES:
        name = spec.strip().lower()
        path = resolve_alias(name)
    if path.suffix.lower() == ".gguf":
        from ..models.loading import gguf_cache_dir

        cache = gguf_cache_dir(path)
        hint = (f"stream its converted folder {cache}" if cache.is_dir() else
                "convert it once (any graphprune command that loads it, e.g. `graphprune inspect`, writes a "
                "safetensors copy) and stream that folder")
        raise StreamingUnsupported(f"--stream reads safetensors folders, not GGUF files ({path.name}): {hint}")
    if path.suffix.lower() == ".onnx":
        raise StreamingUnsupported("--stream prunes Hugging Face safetensors folders; an ONNX model is pruned in memory")
    if not path.exists():
        from ..errors import ModelLoadError

        raise ModelLoadError(f"model path {path} does not exist")
    if (path / "modules.json").is_file():
        raise StreamingUnsupported(f"{path} is a sentence-transformers encoder; streaming prunes decoder language "
                                   f"models only")
    return path, name or path.name


def compress_stream(args, print_summary) -> int:
    from .compress import compress_streaming

    if args.export:
        raise StreamingUnsupported("--export onnx needs the whole pruned model in memory: run `graphprune export` on "
                                   "the streamed output instead")
    if args.sequential:
        raise StreamingUnsupported("--sequential is not available with --stream yet")
    path, name = stream_source(args.model)
    out = Path(args.out).expanduser().resolve()
    partial = out.parent / f".{out.name}.partial"
    try:
        result = compress_streaming(
            path, out, criterion=args.criterion, sparsity=args.sparsity, allocation=args.allocation,
            target=args.target, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
            compensate=args.compensate, round_to=args.round_to, device=args.device or "cpu",
            dtype=args.dtype or "fp32", resume=args.resume, force=args.force, progress=not args.quiet,
            trust_remote_code=args.trust_remote_code, name=name)
    except BaseException as error:
        # A crash, Ctrl-C, SIGTERM, a full disk: what is finished is kept for --resume. (Bad inputs
        # fail before the work directory exists; a partial run in the way says so itself.)
        if partial.exists() and not isinstance(error, PartialRunError):
            print(f"graphprune: the finished layers are kept in {partial}; rerun the same command with --resume to "
                  f"continue", file=sys.stderr)
        raise
    print_summary(result.report, result.out, args)
    s = result.report["streaming"]
    print(f"streamed {s['layers']} layers on {s['device']} ({s['dtype']}) into {s['shards']} shards; peak RSS "
          f"{result.report['peak_rss_mb']:.0f} MB")
    return 0
