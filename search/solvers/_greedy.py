"""Greedy single-variable moves shared by the heuristic solvers (knapsack's polish, lp's rounding).

Both work on per-variable matrices: `obj` (G, K) with +inf on disallowed cells and normalised budget rows
`rows` (each (G, K), capacity `cap`), vectorised over every (variable, option) move at once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _stack(rows: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    return np.stack(list(rows)) if len(rows) else np.zeros((0, *shape))


def improve(
    obj: np.ndarray, rows: Sequence[np.ndarray], cap: float, x: np.ndarray, max_moves: int | None = None
) -> np.ndarray:
    """Apply the best objective-lowering single-variable change that keeps every row within `cap`, until
    none is left. `x` must be feasible; the result is feasible and never worse."""
    G, K = obj.shape
    r = np.arange(G)
    A = _stack(rows, (G, K))
    x = np.array(x, dtype=np.int64, copy=True)
    finite = np.isfinite(obj)
    cur = obj[r, x].copy()
    eps = 1e-12 * (1.0 + float(np.abs(cur).sum()))  # no churning on zero-gain moves
    tot = A[:, r, x].sum(axis=1)
    for _ in range(max_moves if max_moves is not None else 4 * G + 16):
        slack = cap - tot
        dA = A - A[:, r, x][:, :, None]
        ok = finite & (dA <= slack[:, None, None]).all(axis=0)
        d_obj = np.where(ok, obj - cur[:, None], np.inf)
        flat = int(np.argmin(d_obj))
        g, k = divmod(flat, K)
        if not d_obj[g, k] < -eps:
            break
        tot = tot + dA[:, g, k]
        x[g], cur[g] = k, obj[g, k]
    return x


def repair(obj: np.ndarray, rows: Sequence[np.ndarray], cap: float, x: np.ndarray) -> np.ndarray | None:
    """Make `x` feasible by single-variable changes, each the one that buys the most reduction of the total
    normalised overshoot per unit of objective given up. None when no change reduces the overshoot."""
    G, K = obj.shape
    r = np.arange(G)
    A = _stack(rows, (G, K))
    x = np.array(x, dtype=np.int64, copy=True)
    finite = np.isfinite(obj)
    cur = obj[r, x].copy()
    tot = A[:, r, x].sum(axis=1)
    for _ in range(8 * G * K + 16):
        over = np.maximum(tot - cap, 0.0).sum()
        if over <= 0:
            return x
        dA = A - A[:, r, x][:, :, None]
        new_over = np.maximum(tot[:, None, None] + dA - cap, 0.0).sum(axis=0)
        gain = over - new_over
        valid = finite & (gain > 1e-15)
        if not valid.any():
            return None
        d_obj = obj - cur[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(valid, d_obj / np.where(valid, gain, 1.0), np.inf)
        g, k = divmod(int(np.argmin(score)), K)
        tot = tot + dA[:, g, k]
        x[g], cur[g] = k, obj[g, k]
    return None
