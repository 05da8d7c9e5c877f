"""Worker program of test_e2e: trains the sparse logistic regression on a small synthetic set
(the cluster is found through PS_COORDINATOR) and prints its metrics as one JSON line."""

import json

import paramserver as ps
from paramserver.models.logreg import SyntheticCTR, train

data = SyntheticCTR(examples=20000).make()
with ps.connect() as client:
    result = train(client, data, epochs=3, batch=512)
print("RESULT", json.dumps({"rank": client.rank, "history": result["history"]}), flush=True)
