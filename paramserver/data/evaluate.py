"""Evaluation measures over labels and scores: AUC, log-loss, rank correlation. Vectorized."""

from __future__ import annotations

import numpy as np

__all__ = ["auc", "logloss", "spearman"]


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (rank formula, ties averaged); NaN if one class is absent.

    Example:
        auc(np.array([0, 1]), np.array([0.1, 0.9]))  # 1.0
    """
    y = np.asarray(y).reshape(-1)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    ranks = _ranks(s)
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1, counts)
    return ranks


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean logistic loss of probabilities ``p`` (clipped to [1e-7, 1 - 1e-7]).

    Example:
        logloss(np.array([1.0]), np.array([0.5]))  # 0.693...
    """
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    yy = np.asarray(y, dtype=np.float64)
    return float(-np.mean(yy * np.log(q) + (1 - yy) * np.log(1 - q)))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties averaged).

    Example:
        spearman(np.array([1, 2, 3]), np.array([10, 20, 30]))  # 1.0
    """
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    if len(ra) < 2:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
