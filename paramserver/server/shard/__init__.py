"""A server's share of a table: ``SparseShard`` (keyed rows, ``sparse.py``) and
``DenseShard`` (a range of a flat array, ``dense.py``); ``rule.py`` binds the optimizer and the
initializer to the kernels and checks the arguments both take; ``arena.py`` holds a sparse
shard's rows in an address range reserved once, so growing copies nothing.

Pure state: no sockets, no clocks, no I/O. ``from paramserver.server.shard import SparseShard``
is the way in.
"""

from __future__ import annotations

from paramserver.server.shard.dense import DenseShard
from paramserver.server.shard.sparse import SparseShard

__all__ = ["DenseShard", "SparseShard"]
