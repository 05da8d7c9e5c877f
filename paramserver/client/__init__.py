"""The worker's side: joining a cluster and the handles on its tables.

* ``worker.py``  :class:`Client` and :func:`connect`: table creation, barriers, checkpoints,
                  data leases (a :class:`Session` with tables)
* ``session.py`` ``Session``: registration, view changes, requests that survive a server's
                  replacement, shared-memory slot pools, sequence numbers, the clock
* ``ring.py``    ``RingRouting``: the ring a worker routes sparse keys by, switched at a step's
                  end when servers join or leave (a part of the session)
* ``replicas.py`` with replication: reads to the first live copy (then the next), writes to
                  every live copy
* ``table.py``   ``TableHandle``: what every table handle shares (staleness, lr, headers)
* ``sparse.py``  :class:`SparseTable`: pull and push of rows through key plans
* ``cache.py``   ``CacheSpec``, ``RowCache``: hot rows kept on the worker, read at most N
                  clocks stale, gradients flushed every M pushes and at ``clock()``
                  (kernels in ``cache_kernels.py``, imported on first use)
* ``keyplan.py`` key plans: dedup (``unique_inverse``), routing keys to servers, signatures
* ``dense.py``   :class:`DenseTable`: one array in ranges, shared memory, the bulk channel
* ``feedback.py`` error feedback of encoded pushes: residual rows (a bounded compiled hash
                  map) and elements, imported by a table whose pushes have a codec
* ``kernels.py`` compiled worker kernels (a hash dedup, the sum of repeated keys' gradients),
                  imported on first use so that ``import paramserver`` loads no numba
* ``warm.py``    those kernels loaded ahead on a daemon thread (``connect``)
* ``group.py``   ``DenseGroup``: small dense tables pulled and pushed with one request per server

Imports go one way: worker -> group -> dense; worker -> sparse, dense -> table, keyplan ->
session -> replicas, ring; the session knows no table.
"""

from paramserver.client.dense import DenseTable
from paramserver.client.sparse import SparseTable
from paramserver.client.worker import Client, connect

__all__ = ["Client", "DenseTable", "SparseTable", "connect"]
