"""Worker program of test_ray: ``train TOKEN_FILE ROOT`` checks that the cluster token reached
it, then trains sync clocks until a periodic checkpoint appears in ROOT; ``check TOKEN_FILE
ROOT`` (a run with ``--restore ROOT``) checks that it resumed at that checkpoint's clock with
its values."""

import os
import sys
import time

import numpy as np

import paramserver as ps
from paramserver.checkpoint import describe

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
        clock = describe(root)["clock"]
        assert client.current_clock == clock, (client.current_clock, clock)
        w = t.pull()
        assert (w == -float(clock)).all(), (w, clock)
    print("OK", mode, client.rank, client.current_clock, flush=True)
