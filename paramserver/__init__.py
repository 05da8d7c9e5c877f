"""paramserver: a parameter server for distributed machine-learning training, in Python.

Where things live:

* ``client/``        the worker's side: :func:`connect`, :class:`Client`, the table handles
* ``launch/``        :class:`LocalCluster`, ``paramserver run``, the role runners, supervision
* ``coordinator/``   membership, heartbeats, views, barriers, the table registry, leases
* ``server/``        one server process: event loop, shards, optimizer kernels, consistency
* ``wire/``          the message format, the ZeroMQ sockets and futures, the bulk channel,
                     shared memory and its slots, value codecs
* ``checkpoint.py``  the checkpoint files (written by servers, committed by the coordinator)
* ``parallel.py``    one pass over a large array on two cores
* ``partition.py``   which server owns a key or a range; ``spec.py`` table specs
* ``init.py`` / ``optim.py``  initializers and server-side optimizers (``ps.init``, ``ps.optim``)
* ``ray.py``         the Ray backend: ``ps.ray.launch(train, servers=, workers=)``
* ``metrics.py``     status, histograms, Prometheus; ``k8s.py`` Kubernetes manifests
* ``config.py``      settings and the ``PS_*`` variables; ``errors.py`` the exceptions

Example:
    import numpy as np
    import paramserver as ps

    with ps.LocalCluster(servers=2, workers=1) as cluster:
        client = cluster.connect()
        emb = client.sparse_table("emb", dim=16, optimizer=ps.optim.Adagrad(lr=0.05))
        rows = emb.pull(np.array([7, 42, 7], dtype=np.uint64))
"""

from types import ModuleType

from paramserver import errors, init, launch, optim, ray
from paramserver.client import Client, DenseTable, SparseTable, connect
from paramserver.client.cache import CacheSpec
from paramserver.config import Timeouts
from paramserver.launch import LocalCluster
from paramserver.wire.transport import Future

__version__ = "0.1.0"

__all__ = [
    "CacheSpec",
    "Client",
    "DenseTable",
    "Future",
    "LocalCluster",
    "SparseTable",
    "Timeouts",
    "__version__",
    "connect",
    "errors",
    "init",
    "launch",
    "optim",
    "ray",
]


def __getattr__(name: str) -> ModuleType:
    # ps.torch imports torch (seconds): only when a user asks for it
    if name == "torch":
        import importlib

        return importlib.import_module("paramserver.torch")
    raise AttributeError(f"module 'paramserver' has no attribute {name!r}")
