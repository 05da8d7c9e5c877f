"""A worker of test_many_hosts' returning-server test: creates a table and pushes to it, says
READY, and on a line ``ADDRESS`` from its stdin asks the server at ADDRESS directly (past the
cluster view, with the cluster token) for its stats. Prints ``ANSWER {...}`` (the server still
serves: its rank and tables) or ``REFUSED why``."""

import json
import sys
import time

import numpy as np

import paramserver as ps
from paramserver.config import from_env
from paramserver.errors import PSError
from paramserver.wire.transport import Endpoint, Security, new_context

with ps.connect() as client:
    table = client.sparse_table(
        "probe/w", dim=1, optimizer=ps.optim.SGD(lr=1.0), init=ps.init.Constant(0.0),
        consistency="async",
    )  # fmt: skip
    table.push(np.arange(1000, dtype=np.uint64), np.ones((1000, 1), np.float32)).result()
    print("READY", flush=True)
    address = sys.stdin.readline().strip()
    token = from_env().token
    assert token is not None
    ctx = new_context()
    ep = Endpoint(ctx, 5.0, security=Security.from_token(token))
    try:
        ep.connect("old", address)
        fut = ep.request("old", {"kind": "stats"}, what=f"stats of the server at {address}")
        deadline = time.monotonic() + 5.0
        while not fut.done() and time.monotonic() < deadline:
            ep.poll(0.05)
        try:
            print("ANSWER", json.dumps(fut.result(0.001)["stats"]), flush=True)
        except PSError as exc:
            print("REFUSED", exc, flush=True)
    finally:
        ep.close()
        ctx.term()
