"""Worker program of test_e2e: records its pid, joins, says it is ready, then sleeps until it
is stopped."""

import os
import sys
import time

import paramserver as ps

with open(os.path.join(sys.argv[1], f"worker-{os.environ['PS_RANK']}.pid"), "w") as f:
    f.write(str(os.getpid()))
client = ps.connect()
print("ready", flush=True)
time.sleep(3600)
