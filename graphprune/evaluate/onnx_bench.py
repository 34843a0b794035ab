"""`graphprune bench`: latency and throughput of ONNX models in onnxruntime, pruned vs dense.

Each (batch, sequence) shape runs `warmup` untimed then `runs` timed forward passes (graph
optimisations on). Reported per model and shape: median and p90 latency, tokens per second, the
forward pass's FLOPs (multiply-adds of MatMul/Gemm/Conv/attention x 2, counted on the IR at that
shape), and for a model with a baseline: the measured speed-up (baseline median / median) next to
the ideal one (baseline FLOPs / FLOPs) and their ratio.

On CUDA the inputs and outputs stay on the device through IO binding, so host copies are not
timed; on CPU the plain `run` is timed. A provider that is not installed is an error unless
`allow_fallback` is set (then the run is on CPU and says so).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io.onnx_files import load_checked, resolve_provider, session, token_feeds


@dataclass
class Measurement:
    model: str
    batch: int
    seqlen: int
    median_ms: float
    p90_ms: float
    tokens_per_s: float
    gflops: float
    speedup: float | None = None
    ideal_speedup: float | None = None
    profile_top: list[tuple[str, float]] = field(default_factory=list)  # (op type, share of node time)

    @property
    def of_ideal(self) -> float | None:
        if self.speedup is None or not self.ideal_speedup:
            return None
        return self.speedup / self.ideal_speedup


def forward_flops(path: str | Path, batch: int, seqlen: int) -> float:
    """FLOPs of one forward pass at [batch, seqlen], from the graph IR."""
    from ..graph.groups import flop_terms
    from ..graph.rules import propagate
    from ..graph.trace_onnx import graph_from_onnx

    graph = graph_from_onnx(path, batch_size=batch, seq_len=seqlen)
    return float(sum(total for _, total, _ in flop_terms(graph, propagate(graph))))


def _profile_summary(sess) -> list[tuple[str, float]]:
    trace = Path(sess.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink(missing_ok=True)
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            by_op[e.get("args", {}).get("op_name", "?")] += float(e.get("dur", 0))
    total = sum(by_op.values()) or 1.0
    return sorted(((op, t / total) for op, t in by_op.items()), key=lambda x: -x[1])[:6]


def measure(path: str | Path, batch: int, seqlen: int, *, provider: str = "CPUExecutionProvider",
            warmup: int = 3, runs: int = 20, threads: int | None = None, profile: bool = False) -> Measurement:
    sess = session(path, provider=provider, threads=threads)
    ids = np.random.default_rng(0).integers(3, 100, size=(batch, seqlen))
    feeds = token_feeds(sess, ids)
    if provider == "CUDAExecutionProvider":
        run = _bound_runner(sess, feeds)
    else:
        def run():
            sess.run(None, feeds)
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    top = []
    if profile:  # a separate profiled session: profiling overhead never enters the timings above
        prof = session(path, provider=provider, threads=threads, profile_prefix=os.path.join(
            os.environ.get("TMPDIR", "/tmp"), "graphprune-profile"))
        for _ in range(max(3, runs // 4)):
            prof.run(None, feeds)
        top = _profile_summary(prof)
    median = float(np.median(times))
    return Measurement(str(path), batch, seqlen, median * 1e3, float(np.percentile(times, 90)) * 1e3,
                       batch * seqlen / median, forward_flops(path, batch, seqlen) / 1e9, profile_top=top)


def _bound_runner(sess, feeds):
    """IO binding on the GPU: inputs copied once, outputs left on the device."""
    import onnxruntime as ort

    binding = sess.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0))
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cuda", 0)

    def run():
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
    return run


def parse_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{what} must be a comma list of positive integers, got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"--{what} must be a comma list of positive integers, got '{text}'")
    return values


def bench(model: str | Path, *, baseline: str | Path | None = None, provider: str = "cpu",
          allow_fallback: bool = False, shapes: list[tuple[int, int]] = ((1, 128),), warmup: int = 3,
          runs: int = 20, threads: int | None = None, profile: bool = False) -> tuple[list[Measurement], str | None]:
    """Measurements of `model` (and `baseline`) at every shape; the second value is a provider note."""
    ort_provider, note = resolve_provider(provider, allow_fallback=allow_fallback)
    paths = [Path(p) for p in ([baseline] if baseline else []) + [model]]
    for p in paths:
        if p.suffix.lower() != ".onnx":
            raise UserError(f"bench takes .onnx files; got {p} (export it first: graphprune export)")
        load_checked(p, load_data=False)  # opset, external data inside its directory
    rows: list[Measurement] = []
    for batch, seqlen in shapes:
        measured = [measure(p, batch, seqlen, provider=ort_provider, warmup=warmup, runs=runs, threads=threads,
                            profile=profile) for p in paths]
        if baseline:
            base, ours = measured
            ours.speedup = base.median_ms / ours.median_ms
            ours.ideal_speedup = base.gflops / ours.gflops if ours.gflops else None
        rows.extend(measured)
    return rows, note


def render(rows: list[Measurement], provider: str) -> str:
    lines = [f"onnxruntime {provider}",
             f"{'model':<28} {'shape':>8} {'median ms':>10} {'p90 ms':>9} {'tokens/s':>10} {'GFLOP':>8} "
             f"{'speed-up':>9} {'ideal':>7} {'of ideal':>9}"]
    for r in rows:
        name = Path(r.model).name if len(r.model) > 28 else r.model
        if len(name) > 28:
            name = "…" + name[-27:]
        extra = (f"{r.speedup:>8.2f}x {r.ideal_speedup:>6.2f}x {r.of_ideal:>9.2f}" if r.speedup is not None
                 else f"{'':>9} {'':>7} {'':>9}")
        lines.append(f"{name:<28} {r.batch:>3}x{r.seqlen:<4} {r.median_ms:>10.2f} {r.p90_ms:>9.2f} "
                     f"{r.tokens_per_s:>10.0f} {r.gflops:>8.2f} {extra}")
        if r.profile_top:
            lines.append("    profile: " + ", ".join(f"{op} {share:.0%}" for op, share in r.profile_top))
    return "\n".join(lines)


def to_json(rows: list[Measurement], provider: str, note: str | None) -> str:
    return json.dumps({"provider": provider, "note": note,
                       "rows": [{**asdict(r), "of_ideal": r.of_ideal} for r in rows]}, indent=1)
