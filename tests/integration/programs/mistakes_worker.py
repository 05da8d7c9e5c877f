"""Worker program of test_mistakes, the way a user writes one with a mistake in it:

``noclock``: a sync training loop that never calls ``client.clock()`` (its pushes stay
buffered: every pull sees the initial rows); ``noclose``: joins and exits without ``close()``.
"""

import sys

import numpy as np

import paramserver as ps

mode = sys.argv[1]
client = ps.connect()
if mode == "noclock":
    emb = client.sparse_table("emb", dim=2, optimizer=ps.optim.SGD(lr=1.0), consistency="sync")
    keys = np.array([1, 2], dtype=np.uint64)
    for _ in range(3):
        rows = emb.pull(keys)
        emb.push(keys, np.ones((2, 2), np.float32)).result()
    print("rows", rows.tolist(), flush=True)
    client.close()
else:
    print("joined as", client.rank, flush=True)  # and gone, without close()
