"""Worker program: ``save ROOT`` trains 3 sync clocks and saves; ``check`` verifies that a run
started with ``--restore ROOT`` resumes at clock 3 with the saved values."""

import sys

import numpy as np

import paramserver as ps

with ps.connect() as client:
    t = client.dense_table("w", shape=(4,), optimizer=ps.optim.SGD(lr=1.0), consistency="sync")
    if sys.argv[1] == "save":
        for _ in range(3):
            t.push(np.ones(4, np.float32)).result()
            client.clock()
        client.barrier("trained")
        if client.rank == 0:
            client.save(sys.argv[2])
        client.barrier("saved")
    else:
        assert client.current_clock == 3, client.current_clock
        w = t.pull()
        assert (w == -3.0).all(), w
    print("OK", client.rank, client.current_clock, flush=True)
