"""Compiled kernels behind the shards, by job; ``from paramserver.server import kernels as k``
gives every one of them.

* ``jit.py``    how a kernel is compiled, and the prefetch hints
* ``index.py``  the hash index: keys to row ids (lookup, insert, rehash)
* ``rows.py``   the arena's rows: deterministic initialization, gather, scatter, repeated rows
* ``optim.py``  one update kernel per optimizer

Every kernel is a numba function over whole arrays; the Python side (``server/shard/``)
validates arguments, grows arrays and picks kernels; nothing here loops in Python per key or
per row. Storage is described in each module's docstring.

Example:
    >>> import numpy as np
    >>> from paramserver.server import kernels as k
    >>> index = k.new_index(2)
    >>> rows = np.empty(3, np.int64)
    >>> k.lookup_or_insert(index, 0, 4, np.array([5, 9, 5], np.uint64), rows, 0)
    (3, 2)
    >>> rows.tolist()
    [0, 1, 0]
"""

from __future__ import annotations

from paramserver.server.kernels.index import (
    BUCKET_CELLS,
    INDEX_MAX_ROWS,
    keys_by_row,
    lookup,
    lookup_or_insert,
    new_index,
    rehash,
)
from paramserver.server.kernels.optim import (
    adagrad_rows,
    adam_rows,
    ftrl_rows,
    momentum_rows,
    sgd_copy,
    sgd_rows,
)
from paramserver.server.kernels.rows import (
    INIT_CONSTANT,
    INIT_NORMAL,
    INIT_UNIFORM,
    INIT_ZEROS,
    STATE_FILL,
    STATE_FTRL,
    STATE_ZEROS,
    assign_rows,
    gather,
    gather_below,
    gather_or_init,
    has_duplicates,
    init_dense,
    init_rows,
    init_state,
    scatter_rows,
    sum_duplicates,
)

__all__ = [
    "BUCKET_CELLS",
    "INDEX_MAX_ROWS",
    "INIT_CONSTANT",
    "INIT_NORMAL",
    "INIT_UNIFORM",
    "INIT_ZEROS",
    "STATE_FILL",
    "STATE_FTRL",
    "STATE_ZEROS",
    "adagrad_rows",
    "adam_rows",
    "assign_rows",
    "ftrl_rows",
    "gather",
    "gather_below",
    "gather_or_init",
    "has_duplicates",
    "init_dense",
    "init_rows",
    "init_state",
    "keys_by_row",
    "lookup",
    "lookup_or_insert",
    "momentum_rows",
    "new_index",
    "rehash",
    "scatter_rows",
    "sgd_copy",
    "sgd_rows",
    "sum_duplicates",
]
