"""One server process: it holds shards of tables and applies the workers' pushes.

Files and their jobs:

- ``kernels.py``: compiled numba kernels: hash index, row arena, deterministic
  initialization, gather, duplicate summing, one update kernel per optimizer.
- ``codec_kernels.py``: compiled encoders of pull replies for the value codecs.
- ``shard.py``: ``SparseShard`` and ``DenseShard``, the storage of one table on
  one server, built on the kernels; pure (no sockets, no I/O).
- ``consistency.py``: clocks, consistency modes and sync aggregation.
- ``loop.py``: the server process: registration, the event loop, the request handlers.
"""
