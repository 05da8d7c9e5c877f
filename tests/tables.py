"""Tables with known contents, for the tests that throw bad messages at a cluster and then check
that nothing changed (tests/integration/test_fuzz.py, test_fuzz_schema.py)."""

from __future__ import annotations

import numpy as np

import paramserver as ps


def filled_tables(client: ps.Client) -> tuple[ps.SparseTable, ps.DenseTable, np.ndarray]:
    """A sparse table "emb" (dim 8, Adagrad) with 40 rows pushed once, a dense table "dense"
    (1000 elements, Adam) pushed once, and the 40 keys."""
    emb = client.sparse_table(
        "emb", dim=8, init=ps.init.Normal(std=1.0), optimizer=ps.optim.Adagrad(lr=0.1)
    )
    dense = client.dense_table("dense", shape=(1000,), optimizer=ps.optim.Adam(lr=0.1))
    keys = np.arange(40, dtype=np.uint64)
    emb.push(keys, np.ones((40, 8), np.float32)).result()
    dense.push(np.ones(1000, np.float32)).result()
    return emb, dense, keys
