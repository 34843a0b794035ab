"""Least-squares reconstruction of a linear layer whose input channels were pruned, and structured OBS.

A consumer layer y = W x + b (o_proj, down_proj, ...) loses the input columns R of its pruned
units. With the calibration Gram matrix H = E[x̃ x̃ᵀ] of its augmented input x̃ = (x, 1), and
W̃ = [W | b], the kept columns K (the bias column always among them) are refit to minimise
E‖W̃ x̃ − W̃' x̃‖² subject to W̃'[:, R] = 0:

    W̃'[:, K] = W̃ · Hλ[:, K] · Hλ[K, K]⁻¹,      Hλ = H + λ·I,  λ = damp · mean(diag H)

The whole H is damped (SparseGPT's dampening), not only the kept block: the λ·W̃[:, K] term it
adds pulls the refit toward the original weights, where damping only Hλ[K, K] would shrink the kept
weights toward zero. Solved through a Cholesky factor; nothing is inverted explicitly except for
OBS, which needs H⁻¹ itself (from the Cholesky factor).

Structured OBS (ZipLM / SlimGPT): removing the column block C of one unit costs
    ε(C) = tr(W̃[:, C] · (H⁻¹[C, C])⁻¹ · W̃[:, C]ᵀ)
after the optimal update of the other columns, W̃ ← W̃ − W̃[:, C]·(H⁻¹[C, C])⁻¹·H⁻¹[C, :], and H⁻¹ is
downdated the same way. Greedy removal by smallest ε keeps selection and compensation consistent;
the final weights equal the least-squares refit above for the removed set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_DAMP = 0.01


def damped(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """H + λI with λ = damp · mean(diag H); a small floor keeps an all-zero (dead) input solvable."""
    diag_mean = float(torch.diagonal(gram).mean())
    lam = damp * diag_mean if diag_mean > 0 else 1.0
    return gram + max(lam, 1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype)


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Cholesky factor, adding jitter if rounding left the (damped) matrix not quite positive definite."""
    jitter = 0.0
    scale = float(torch.diagonal(matrix).abs().mean()) or 1.0
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(matrix + jitter * torch.eye(matrix.shape[0], dtype=matrix.dtype))
        if int(info) == 0:
            return factor
        jitter = scale * (1e-10 if jitter == 0 else jitter / scale * 100)
    raise ValueError("matrix is not positive definite even after jitter")


def augmented_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[W | b] in float64 (b = 0 for a layer without bias)."""
    w = weight.detach().to("cpu", torch.float64)
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.detach().to("cpu", torch.float64)
    return torch.cat([w, b[:, None]], dim=1)


def refit(weight_aug: torch.Tensor, gram: torch.Tensor, removed_columns: np.ndarray,
          damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """W̃' of the module docstring: the removed columns are zero, the kept ones (and bias) refit."""
    n = gram.shape[0]
    removed = np.unique(np.asarray(removed_columns, dtype=np.int64))
    if removed.size == 0:
        return weight_aug.clone()
    kept = torch.as_tensor(np.setdiff1d(np.arange(n), removed))
    h = damped(gram, damp)
    rhs = weight_aug @ h[:, kept]  # [out, |K|]
    factor = _cholesky(h[kept][:, kept])
    solved = torch.cholesky_solve(rhs.T.contiguous(), factor).T
    out = torch.zeros_like(weight_aug)
    out[:, kept] = solved
    return out


def bias_only(weight_aug: torch.Tensor, gram: torch.Tensor, removed_columns: np.ndarray) -> torch.Tensor:
    """FLAP's compensation in the same form: removed columns zeroed, b += W[:, R]·mean(x_R)."""
    removed = torch.as_tensor(np.unique(np.asarray(removed_columns, dtype=np.int64)))
    out = weight_aug.clone()
    if removed.numel():
        mean = gram[-1, :-1] / gram[-1, -1]  # E[x] / E[1]
        out[:, -1] += weight_aug[:, removed] @ mean[removed]
        out[:, removed] = 0
    return out


def reconstruction_error(weight_aug: torch.Tensor, new_aug: torch.Tensor, gram: torch.Tensor) -> float:
    """E‖W̃ x̃ − W̃' x̃‖² under the calibration Gram."""
    delta = weight_aug - new_aug
    return float(torch.einsum("oi,ij,oj->", delta, gram, delta))


@dataclass
class ObsPath:
    """Greedy OBS removal of one group's units on one consumer layer."""

    order: list[int]  # units in the order they were removed
    step_error: list[float]  # reconstruction error added by each removal (a chunk shares its error)
    weight_aug: torch.Tensor  # W̃ after the removals (only when asked for)


def obs_greedy(weight_aug: torch.Tensor, gram: torch.Tensor, unit_columns: np.ndarray, count: int, *,
               damp: float = DEFAULT_DAMP, steps: int = 16, dead_columns: np.ndarray | None = None) -> ObsPath:
    """Remove `count` of the units (`unit_columns[u]` = the consumer columns of unit u) greedily.

    Units are removed in chunks of ceil(count / steps) from one error snapshot each (a chunk's
    update is exact for the chunk; only its choice shares one snapshot). Removed columns are
    dropped from the working W and H⁻¹, so the downdates cost Σ (columns left)² · chunk rather
    than n² per unit. `dead_columns` are columns already removed by another group on the same
    layer (they start removed).
    """
    n = gram.shape[0]
    w = weight_aug.clone()
    # H⁻¹ from the Cholesky factor; cholesky_solve against I (torch.cholesky_inverse takes tens of
    # seconds on a 1537² matrix with the CPU build measured here, this well under one).
    hinv = torch.cholesky_solve(torch.eye(n, dtype=gram.dtype), _cholesky(damped(gram, damp)))
    hinv = (hinv + hinv.T) / 2
    live = torch.arange(n)  # original index of each working column
    columns = torch.as_tensor(np.asarray(unit_columns, dtype=np.int64))  # [U, width]
    alive = torch.ones(columns.shape[0], dtype=torch.bool)
    order: list[int] = []
    step_error: list[float] = []

    def remove(original: torch.Tensor) -> float:
        nonlocal w, hinv, live
        position = torch.full((n,), -1, dtype=torch.long)
        position[live] = torch.arange(live.numel())
        drop = position[original]
        keep_mask = torch.ones(live.numel(), dtype=torch.bool)
        keep_mask[drop] = False
        keep = torch.nonzero(keep_mask).flatten()
        factor = _cholesky(hinv[drop][:, drop])
        wc = w[:, drop]
        coef = torch.cholesky_solve(wc.T.contiguous(), factor).T  # W_C · B⁻¹   [out, |C|]
        rows = hinv[drop][:, keep]  # H⁻¹[C, K]
        w = w[:, keep] - coef @ rows
        hinv = hinv[keep][:, keep] - rows.T @ torch.cholesky_solve(rows, factor)
        live = live[keep]
        return float((coef * wc).sum())

    if dead_columns is not None and len(dead_columns):
        remove(torch.as_tensor(np.unique(np.asarray(dead_columns, dtype=np.int64))))
    chunk = max(1, -(-count // max(steps, 1)))
    while len(order) < count:
        candidates = torch.nonzero(alive).flatten()
        position = torch.full((n,), -1, dtype=torch.long)
        position[live] = torch.arange(live.numel())
        errors = _unit_errors(w, hinv, position[columns[candidates]])
        take = min(chunk, count - len(order))
        best = candidates[torch.argsort(errors, stable=True)[:take]]
        err = remove(columns[best].reshape(-1)) / take
        alive[best] = False
        order.extend(int(u) for u in best)
        step_error.extend([err] * take)
    full = torch.zeros_like(weight_aug)
    full[:, live] = w
    return ObsPath(order, step_error, full)


def _unit_errors(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """ε(C) for each row of `cols` (one unit's columns each)."""
    if cols.shape[1] == 1:
        c = cols[:, 0]
        return (w[:, c] ** 2).sum(0) / torch.diagonal(hinv)[c].clamp_min(1e-30)
    blocks = hinv[cols[:, :, None], cols[:, None, :]].contiguous()  # [U, width, width]
    wc = w[:, cols].permute(1, 2, 0).contiguous()  # [U, width, out]
    # Blocks of H⁻¹ are symmetric positive definite: Cholesky, not LU (whose batched MKL path
    # failed on some inputs after a model forward in the same process).
    factor, info = torch.linalg.cholesky_ex(blocks)
    if bool((info != 0).any()):
        factor = torch.stack([_cholesky(b) for b in blocks])
    solved = torch.cholesky_solve(wc, factor)
    return (wc * solved).sum(dim=(1, 2))
