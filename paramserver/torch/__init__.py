"""PyTorch integration (extra ``torch``): embeddings and dense parameters kept on the servers.

* ``embedding.py``: :class:`Embedding` and :class:`EmbeddingBag`, ``nn.Module``s like
  ``torch.nn.Embedding`` / ``torch.nn.EmbeddingBag`` over a sparse table. A forward pulls the
  distinct ids' rows once (read-only in ``eval()`` and under ``torch.no_grad()``); the backward
  pushes their gradients, once per backward pass. :func:`read_embeddings` reads a table's keys
  and weights from a checkpoint.
* ``dense.py``: :class:`DenseParameters`, a torch optimizer (``zero_grad``, ``step``) whose
  parameters live in dense tables and whose update runs on the servers.

``import paramserver`` does not import this package (nor torch); ``ps.torch`` does, on first
use. The guide is docs/pytorch.md.

Example:
    import torch
    from torch import nn

    import paramserver as ps

    with ps.LocalCluster(servers=2, workers=1) as cluster:
        client = cluster.connect()
        emb = ps.torch.Embedding(client, "emb", dim=16, optimizer=ps.optim.Adagrad(lr=0.05))
        mlp = nn.Linear(16, 1)
        opt = ps.torch.DenseParameters(client, "mlp", mlp, optimizer=ps.optim.Adam(lr=1e-3))
        ids = torch.tensor([[3, 9], [3, 4]])
        loss = mlp(emb(ids).sum(1)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step(); client.clock()
"""

from paramserver.torch.dense import DenseParameters
from paramserver.torch.embedding import Embedding, EmbeddingBag, read_embeddings

__all__ = ["DenseParameters", "Embedding", "EmbeddingBag", "read_embeddings"]
