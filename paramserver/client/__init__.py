"""The worker's side: joining a cluster and the handles on its tables.

* ``session.py`` :class:`Client` and :func:`connect`: membership, table creation, clock,
                 barriers, leases, requests that survive a server's replacement
* ``sparse.py``  :class:`SparseTable`: dedup, routing, key caching, pull and push of rows
* ``dense.py``   :class:`DenseTable`: one array in ranges, shared memory, the bulk channel
"""

from paramserver.client.dense import DenseTable
from paramserver.client.session import Client, connect
from paramserver.client.sparse import SparseTable

__all__ = ["Client", "DenseTable", "SparseTable", "connect"]
