"""Worker program of test_ray: ``train TOKEN_FILE ROOT`` checks that the cluster token reached
it, then trains sync clocks until a periodic checkpoint appears in ROOT; ``check TOKEN_FILE
ROOT`` (a run with ``--restore ROOT``) checks that it resumed at the newest checkpoint's clock
with the values its files hold."""

import os
import sys
import time

import numpy as np

import paramserver as ps
from paramserver.checkpoint import load_dense_range, read_manifest

mode, token_file, root = sys.argv[1:4]
with open(token_file) as f:
    assert os.environ.get("PS_TOKEN") == f.read().strip(), "the cluster token did not arrive"
with ps.connect() as client:
    t = client.dense_table("w", shape=(4,), optimizer=ps.optim.SGD(lr=1.0), consistency="sync")
    if mode == "train":
        deadline = time.monotonic() + 90
        while not os.path.exists(os.path.join(root, "LATEST")):
            assert time.monotonic() < deadline, f"no periodic checkpoint in {root} after 90s"
            t.push(np.ones(4, np.float32)).result()
            client.clock()
            time.sleep(0.05)
    else:
        # what the checkpoint's own files hold: a periodic round still pending when the last
        # worker left may complete with a clock beyond the last one trained, so the values are
        # not simply -clock
        directory, manifest, _ = read_manifest(root)
        stored = load_dense_range(directory, manifest, "w", 0, 4)
        assert stored is not None and (stored[:, 0] <= -1).all(), stored
        assert client.current_clock == manifest["clock"], (client.current_clock, manifest)
        w = t.pull()
        assert (w == stored[:, 0]).all(), (w, stored)
    print("OK", mode, client.rank, client.current_clock, flush=True)
