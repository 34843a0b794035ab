"""Reload saved pruned models in a fresh Python process (nothing of the pruning process's state, no
registered classes or patched configs, carries over) and return their logits."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch


def logits_in_fresh_process(cases: dict[str, tuple[str, torch.Tensor, bool]], workdir: str | Path, *,
                            experts_implementation: str | None = None) -> dict[str, torch.Tensor]:
    """`cases`: name -> (saved directory, input ids, uniform). Uniform outputs load with transformers'
    `AutoModelForCausalLM.from_pretrained`, the others with `graphprune.load_pruned`. With
    `experts_implementation` every MoE layer runs that experts kernel (else transformers' default)."""
    workdir = Path(workdir)
    torch.save(cases, workdir / "reload_inputs.pt")
    child = textwrap.dedent(f"""
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        from graphprune.io.hf import load_pruned
        cases = torch.load({str(workdir / 'reload_inputs.pt')!r})
        out = {{}}
        for name, (path, ids, uniform) in cases.items():
            model = (AutoModelForCausalLM.from_pretrained(path) if uniform else load_pruned(path)).eval()
            if {experts_implementation!r} is not None:
                for m in model.modules():  # every layer's config copy, also those load_pruned rebuilt
                    if getattr(m, "config", None) is not None and hasattr(m.config, "_experts_implementation"):
                        m.config._experts_implementation = {experts_implementation!r}
            with torch.no_grad():
                out[name] = model(input_ids=ids).logits.contiguous()
        save_file(out, {str(workdir / 'reloaded.safetensors')!r})
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"reloading in a fresh process failed:\n{proc.stderr[-2000:]}")
    from safetensors.torch import load_file

    return load_file(str(workdir / "reloaded.safetensors"))
