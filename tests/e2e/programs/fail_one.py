"""Worker program of test_e2e: every rank joins and records its pid; rank 1 waits until the
others are on their way into a barrier that can never complete (its timeout is an hour), then
exits with code 3."""

import os
import sys
import time
from pathlib import Path

import paramserver as ps

folder = Path(sys.argv[1])
client = ps.connect()
(folder / f"worker-{client.rank}.pid").write_text(str(os.getpid()))
if client.rank == 1:
    others = [folder / f"worker-{r}.pid" for r in range(client.num_workers) if r != 1]
    deadline = time.monotonic() + 60
    while not all(p.exists() for p in others) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # let them reach the barrier
    print("rank 1 fails now", flush=True)
    os._exit(3)
print("waiting at the barrier", flush=True)
client.barrier(timeout=3600)
