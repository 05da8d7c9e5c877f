"""Worker program of test_e2e: trains the sparse logistic regression on a small synthetic set
(the cluster is found through PS_COORDINATOR) and prints its metrics as one JSON line."""

import json
import math

import paramserver as ps
from paramserver.data.ctr import SyntheticCriteo
from paramserver.models.logreg import train_worker

train, test = SyntheticCriteo(examples=20000).make()
with ps.connect() as client:
    result = train_worker(client, train, test, epochs=3, batch=512, show=False)
rate = float(test.y.mean())  # the best constant predictor's test log-loss, for comparison
base = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
print(
    "RESULT", json.dumps({"rank": client.rank, "curve": result["curve"], "base": base}), flush=True
)
