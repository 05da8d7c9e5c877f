"""ps.torch against plain PyTorch: the same gradients, the same updates."""

from __future__ import annotations

import numpy as np
import pytest

import paramserver as ps
from paramserver.errors import ConfigError
from tests.timing import FAST

torch = pytest.importorskip("torch")
pst = pytest.importorskip("paramserver.torch")

pytestmark = pytest.mark.timeout(90)


def test_embedding_and_dense_match_a_local_torch_model() -> None:
    vocab, dim = 20, 4
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(rng.integers(0, vocab, size=(8, 3))) for _ in range(5)]
    ys = [torch.from_numpy(rng.random(8).astype(np.float32)) for _ in range(5)]
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect()
        emb = pst.Embedding(client, "e", dim, optimizer=ps.optim.SGD(lr=0.5), consistency="sync",
                            init=ps.init.Uniform(-0.1, 0.1))  # fmt: skip
        head = torch.nn.Linear(3 * dim, 1)
        dense = pst.DenseParameters(
            client, "h", head, optimizer=ps.optim.SGD(lr=0.5), consistency="sync"
        )
        # the local reference starts from the servers' initial values
        ref_emb = torch.nn.Embedding(vocab, dim)
        with torch.no_grad():
            ref_emb.weight.copy_(
                torch.from_numpy(emb.table.pull(np.arange(vocab, dtype=np.uint64)))
            )
        dense.pull()
        ref_head = torch.nn.Linear(3 * dim, 1)
        ref_head.load_state_dict(head.state_dict())
        opt = torch.optim.SGD([*ref_emb.parameters(), *ref_head.parameters()], lr=0.5)
        for i, (ids, y) in enumerate(zip(batches, ys, strict=True)):
            if i + 1 < len(batches):
                emb.prefetch(batches[i + 1])
            dense.pull()
            loss = torch.nn.functional.mse_loss(head(emb(ids).reshape(8, -1)).squeeze(1), y)
            loss.backward()
            dense.push()
            client.clock()
            opt.zero_grad()
            ref = torch.nn.functional.mse_loss(ref_head(ref_emb(ids).reshape(8, -1)).squeeze(1), y)
            ref.backward()
            opt.step()
            assert loss.item() == pytest.approx(ref.item(), rel=1e-4)
        emb.wait()
        dense.pull()
        got = emb.table.pull(np.arange(vocab, dtype=np.uint64))
        np.testing.assert_allclose(got, ref_emb.weight.detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(head.weight.detach(), ref_head.weight.detach(), atol=1e-5)
        # int64 holds uint64 bit patterns; a narrower signed id cannot be one
        with pytest.raises(ConfigError, match="must be non-negative integers, got -3"):
            emb(torch.tensor([[1, -3]], dtype=torch.int32))
        with pytest.raises(ConfigError, match="must be integers"):
            emb(torch.tensor([0.5]))


def test_import_paramserver_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, paramserver, paramserver.data; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    # ps.torch works as the docs write it, without `import paramserver.torch`
    code = (
        "import sys, paramserver as ps\n"
        "assert ps.torch.Embedding is not None and 'torch' in sys.modules\n"
        "try:\n    ps.no_such_part\nexcept AttributeError as e:\n    assert 'no_such_part' in str(e)\n"
        "else:\n    raise SystemExit('no AttributeError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_one_embedding_called_several_times_matches_torch(optimizer: str) -> None:
    """One table shared by several features: calls with overlapping keys and different lengths
    in one forward pass get the gradients torch.nn.Embedding gets, applied as one step."""
    vocab, dim = 30, 3
    rng = np.random.default_rng(1)
    steps = [
        (rng.integers(0, vocab, size=(4, 5)), rng.integers(0, vocab, size=(4,)),
         rng.integers(0, 10, size=(2, 7)))
        for _ in range(4)
    ]  # fmt: skip
    server_opt = ps.optim.SGD(lr=1.0) if optimizer == "sgd" else ps.optim.Adagrad(lr=0.3)
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect()
        emb = pst.Embedding(client, "shared", dim, optimizer=server_opt, consistency="async",
                            init=ps.init.Uniform(-0.1, 0.1))  # fmt: skip
        ref = torch.nn.Embedding(vocab, dim)
        with torch.no_grad():
            ref.weight.copy_(torch.from_numpy(emb.table.pull(np.arange(vocab, dtype=np.uint64))))
        if optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(ref.parameters(), lr=1.0)
        else:
            opt = torch.optim.Adagrad(ref.parameters(), lr=0.3, initial_accumulator_value=0.0,
                                      eps=1e-10)  # fmt: skip
        for a, b, c in steps:
            ids = [torch.from_numpy(x) for x in (a, b, c)]
            u, i, h = (emb(x) for x in ids)
            (u.sum() + 100 * i.pow(2).sum() + 3 * h.sum()).backward()
            emb.wait()
            opt.zero_grad()
            ru, ri, rh = (ref(x) for x in ids)
            (ru.sum() + 100 * ri.pow(2).sum() + 3 * rh.sum()).backward()
            opt.step()
        got = emb.table.pull(np.arange(vocab, dtype=np.uint64))
        np.testing.assert_allclose(got, ref.weight.detach().numpy(), rtol=1e-4, atol=1e-5)
