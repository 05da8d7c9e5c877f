"""One server process: it holds shards of tables and applies the workers' pushes.

Files and their jobs:

- ``loop.py``: ``Server``, the event loop: poll, decode, dispatch to a handler, answer; and
  ``progress``, what a clock's advance makes due (sync updates, a checkpoint, deferred pulls).
- ``pull.py``, ``push.py``, ``admin.py``: the request handlers, by job. A handler gets its
  header and a ``wire.paths.Request`` (arrays and a reply target), never the transport.
- ``many.py``: ``pull_many`` / ``push_many``, many small dense tables in one request (a
  worker's dense group); each table's push goes through ``push.py``.
- ``state.py``: ``ServerState``, what the handlers share (tables, clocks, deferred pulls).
- ``table.py``: ``Table``, one table on this server, and the checks a request to it passes.
- ``keycache.py``: ``KeyCache``, the key lists workers sent with a signature.
- ``consistency.py``: clocks, the rule whether a pull waits (``pull_ready``), the queue of
  pulls that wait (``DeferredPulls``), sync aggregation.
- ``cluster.py``: the link to the coordinator: registration, views, checkpoint and stop orders.
- ``snapshot.py``: checkpoints written at a clock boundary, and loaded back.
- ``transfer.py``, ``recut.py``, ``rebuild.py``: ranges moving between servers (a join's or a
  drain's keys, its dense ranges cut anew; a copy rebuilt from live ones).
- ``process.py``: process set-up: malloc arenas and trimming, kernels warmed.
- ``shard/``: ``SparseShard`` and ``DenseShard``, a table's storage; pure (no sockets, no I/O).
- ``kernels/``: compiled numba kernels: hash index, rows (init, gather, repeats), optimizers.
- ``codec_kernels.py``: compiled encoders of pull replies for the value codecs.
"""
