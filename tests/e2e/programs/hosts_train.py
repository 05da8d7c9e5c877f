"""train.py of test_many_hosts: the ready FTRL logistic regression (``train_worker`` of
paramserver.models.logreg) on the synthetic data in ./data.npz, in sync mode, joined to the
cluster as README.md's "Many hosts" section tells (PS_COORDINATOR, PS_TOKEN_FILE). Prints one
RESULT line of JSON: its rank and, on rank 0, the test metrics after each epoch."""

import json
import socket

import numpy as np

import paramserver as ps
from paramserver.data.ctr import CTRBatch
from paramserver.models.logreg import train_worker

with np.load("data.npz") as d:
    train = CTRBatch(d["train_keys"], d["train_dense"], d["train_y"])
    test = CTRBatch(d["test_keys"], d["test_dense"], d["test_y"])
with ps.connect() as client:
    result = train_worker(client, train, test, epochs=2, consistency="sync", show=False)
print(
    "RESULT",
    json.dumps({"rank": client.rank, "host": socket.gethostname(), "curve": result["curve"]}),
    flush=True,
)
