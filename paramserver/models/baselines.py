"""Single-process references the distributed programs are compared with (same features)."""

from __future__ import annotations

from typing import Any

import numpy as np

from paramserver.data.evaluate import auc, logloss

__all__ = ["one_hot", "sklearn_logreg"]


def one_hot(train_keys: np.ndarray, test_keys: np.ndarray) -> tuple[Any, Any]:
    """Sparse one-hot matrices of hashed keys; keys unseen in training are dropped."""
    from scipy.sparse import csr_matrix

    vocab, inv = np.unique(train_keys.reshape(-1), return_inverse=True)
    n, f = train_keys.shape
    x_train = csr_matrix((np.ones(n * f), inv, np.arange(0, n * f + 1, f)), shape=(n, len(vocab)))
    flat = test_keys.reshape(-1)
    pos = np.clip(np.searchsorted(vocab, flat), 0, len(vocab) - 1)
    seen = vocab[pos] == flat
    m = len(test_keys)
    rows = np.repeat(np.arange(m), f)[seen]
    x_test = csr_matrix((np.ones(int(seen.sum())), (rows, pos[seen])), shape=(m, len(vocab)))
    return x_train, x_test


def sklearn_logreg(train: Any, test: Any, *, c: float = 1.0) -> dict[str, float]:
    """scikit-learn's LogisticRegression (L2) on one-hot hashed keys: test AUC, log-loss.

    The liblinear solver (trust-region Newton; it regularizes the intercept too): on the demo's
    synthetic data, 6 iterations and 5.3 s where lbfgs took 192 and 11.6 s, test AUC 0.7921
    against 0.7919; on MovieLens-100K (time split) 0.68638 against 0.68633."""
    from sklearn.linear_model import LogisticRegression

    x_train, x_test = one_hot(train.keys, test.keys)
    model = LogisticRegression(C=c, max_iter=1000, solver="liblinear")
    model.fit(x_train, train.y)
    p = model.predict_proba(x_test)[:, 1]
    return {"test_auc": auc(test.y, p), "test_logloss": logloss(test.y, p)}
