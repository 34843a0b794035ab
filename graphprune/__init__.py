"""graphprune: a structured pruning compiler for neural networks.

    import graphprune
    groups = graphprune.inspect("smollm2-135m")          # dependency groups
    result = graphprune.compress("smollm2-135m", criterion="flap", sparsity=0.2)
    graphprune.save_pruned(result.model, "out/", report=result.report)
    model = graphprune.load_pruned("out/")                # also per-layer (heterogeneous) outputs
    graphprune.compress("hf_dir/", out="out2/", stream=True)  # larger than memory: layer by layer, on disk
"""

__version__ = "0.1.0"

__all__ = ["compress", "compress_streaming", "inspect", "load_model", "load_module", "load_pruned", "save_pruned",
           "__version__"]


def inspect(model, example_inputs=None, *, seq_len: int = 8):
    """Dependency groups of a model (an alias, a path, a LoadedModel or an nn.Module)."""
    from .backends.memory import resolve_model
    from .graph import analyze

    return analyze(resolve_model(model)[1], example_inputs, seq_len=seq_len)


def __getattr__(name):  # heavy modules (torch, transformers) load on first use
    if name == "compress":
        from .pipeline.run import compress

        return compress
    if name in ("load_pruned", "save_pruned", "load_module"):
        from .io import hf as export

        return getattr(export, name)
    if name == "compress_streaming":
        from .pipeline.run import compress_streaming

        return compress_streaming
    if name == "load_model":
        from .models import load_model

        return load_model
    raise AttributeError(name)
