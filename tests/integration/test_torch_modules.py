"""ps.torch's modules against their PyTorch counterparts: EmbeddingBag against
torch.nn.EmbeddingBag, DenseParameters against a torch optimizer, and what a user does around
them (hashed ids in a LongTensor, evaluation, save, restore, export)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import paramserver as ps
from paramserver.errors import ConfigError
from tests.timing import FAST

torch = pytest.importorskip("torch")
pst = pytest.importorskip("paramserver.torch")

pytestmark = pytest.mark.timeout(120)

VOCAB, DIM = 25, 4


def _rows(client: Any, name: str) -> int:
    return sum(int(s["tables"][name]["rows"]) for s in client.stats(timeout=10))


def _reference_bag(bag: Any, mode: str, pad: int | None) -> Any:
    """A torch.nn.EmbeddingBag holding the servers' rows (zero at the padding id, as torch
    keeps it)."""
    ref = torch.nn.EmbeddingBag(VOCAB, DIM, mode=mode, padding_idx=pad)
    with torch.no_grad():
        ref.weight.copy_(
            torch.from_numpy(bag.table.pull(np.arange(VOCAB, dtype=np.uint64), create=False))
        )
        if pad is not None:
            ref.weight[pad] = 0.0
    return ref


CASES = [
    # (mode, 2-D input, per_sample_weights, padding_idx)
    ("sum", False, False, None),
    ("mean", False, False, None),
    ("max", False, False, None),
    ("sum", True, False, None),
    ("mean", True, False, 3),
    ("sum", False, True, None),
    ("sum", False, True, 3),
    ("mean", False, False, 3),
    ("max", False, False, 3),
]


def test_embedding_bag_matches_torch_embedding_bag() -> None:
    """Forward values, the rows after three SGD steps and the gradient of per_sample_weights,
    for every mode, with offsets (empty bags included) and 2-D input, with padding."""
    rng = np.random.default_rng(7)
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect()
        for n, (mode, two_d, weighted, pad) in enumerate(CASES):
            bag = pst.EmbeddingBag(client, f"bag{n}", DIM, mode=mode, padding_idx=pad,
                                   optimizer=ps.optim.SGD(lr=0.5), consistency="async",
                                   init=ps.init.Uniform(-1.0, 1.0))  # fmt: skip
            ref = _reference_bag(bag, mode, pad)
            opt = torch.optim.SGD(ref.parameters(), lr=0.5)
            proj = torch.from_numpy(rng.standard_normal(DIM).astype(np.float32))
            seen: set[int] = set()
            for _ in range(3):
                if two_d:
                    ids = torch.from_numpy(rng.integers(0, VOCAB // 2, size=(5, 4)))
                    offsets = None
                else:
                    ids = torch.from_numpy(rng.integers(0, VOCAB // 2, size=12))
                    offsets = torch.tensor([0, 2, 2, 7, 11])  # bag 1 is empty
                psw = psw_ref = None
                if weighted:
                    psw = torch.from_numpy(rng.random(ids.shape).astype(np.float32))
                    psw.requires_grad_()
                    psw_ref = psw.detach().clone().requires_grad_()
                seen.update(ids.reshape(-1).tolist())
                out = bag(ids, offsets, per_sample_weights=psw)
                want = ref(ids, offsets, per_sample_weights=psw_ref)
                np.testing.assert_allclose(out.detach(), want.detach(), rtol=1e-6, atol=1e-6)
                (out @ proj + out.pow(2).sum(1)).sum().backward()
                bag.wait()
                opt.zero_grad()
                (want @ proj + want.pow(2).sum(1)).sum().backward()
                opt.step()
                if weighted:
                    np.testing.assert_allclose(psw.grad, psw_ref.grad, rtol=1e-5, atol=1e-6)
            got = bag.table.pull(np.arange(VOCAB, dtype=np.uint64), create=False)
            keep = np.arange(VOCAB) != (-1 if pad is None else pad)
            np.testing.assert_allclose(
                got[keep], ref.weight.detach().numpy()[keep], rtol=1e-5, atol=1e-5,
                err_msg=f"mode={mode} 2-D={two_d} weighted={weighted} padding_idx={pad}",
            )  # fmt: skip
            assert _rows(client, f"bag{n}") == len(seen - {pad})  # the padding id is not stored
        assert bag.mode == "max"
        last = pst.EmbeddingBag(client, "bag_last", DIM, mode="sum", include_last_offset=True,
                                init=ps.init.Uniform(-1.0, 1.0))  # fmt: skip
        ref = _reference_bag(last, "sum", None)
        ref.include_last_offset = True
        ids, offsets = torch.tensor([1, 5, 5, 2, 8]), torch.tensor([0, 2, 5])
        np.testing.assert_allclose(
            last(ids, offsets).detach(), ref(ids, offsets).detach(), atol=1e-6
        )
        with pytest.raises(ConfigError, match="per_sample_weights needs mode 'sum'"):
            bag(torch.tensor([1, 2]), torch.tensor([0]), per_sample_weights=torch.ones(2))
        with pytest.raises(ConfigError, match="a 1-D input needs offsets"):
            bag(torch.tensor([1, 2]))
        rows = _rows(client, "bag_last")
        for bad in ([0, 3, 2], [1, 2], [0, 9]):  # decreasing, not from 0, past the end
            with pytest.raises(ConfigError, match="offsets must start at 0, never decrease"):
                last(torch.tensor([20, 21, 22, 23]), torch.tensor(bad))
        with pytest.raises(ConfigError, match="input must be 1-D or 2-D"):
            last(torch.tensor([[[20]]]))
        assert _rows(client, "bag_last") == rows  # refused before anything was pulled
        with pytest.raises(ConfigError, match="mode must be one of"):
            pst.EmbeddingBag(client, "bag_bad", DIM, mode="median")


def test_embedding_padding_idx_matches_torch_embedding() -> None:
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect()
        emb = pst.Embedding(client, "padded", DIM, padding_idx=0, optimizer=ps.optim.SGD(lr=1.0),
                            consistency="async", init=ps.init.Uniform(-1.0, 1.0))  # fmt: skip
        ref = torch.nn.Embedding(VOCAB, DIM, padding_idx=0)
        with torch.no_grad():
            ref.weight[1:] = torch.from_numpy(
                emb.table.pull(np.arange(1, VOCAB, dtype=np.uint64), create=False)
            )
        opt = torch.optim.SGD(ref.parameters(), lr=1.0)
        ids = torch.tensor([[0, 3, 5, 0], [5, 5, 0, 9]])
        out, want = emb(ids), ref(ids)
        np.testing.assert_allclose(out.detach(), want.detach(), atol=1e-7)
        out.pow(2).sum().backward()
        emb.wait()
        want.pow(2).sum().backward()
        opt.step()
        np.testing.assert_allclose(
            emb.table.pull(np.arange(1, VOCAB, dtype=np.uint64), create=False),
            ref.weight.detach()[1:],
            atol=1e-6,
        )
        assert _rows(client, "padded") == 3  # 3, 5 and 9; never the padding id


def test_an_embedding_and_a_bag_over_one_table_step_once_per_pass() -> None:
    """The target item through an Embedding and the history through an EmbeddingBag of the same
    table: one Adagrad step per pass on the summed gradients, as one torch weight gets."""
    rng = np.random.default_rng(2)
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect()
        adagrad = ps.optim.Adagrad(lr=0.3)
        init = ps.init.Uniform(-1.0, 1.0)
        item = pst.Embedding(
            client, "items", DIM, optimizer=adagrad, init=init, consistency="async"
        )
        history = pst.EmbeddingBag(client, "items", DIM, mode="mean", optimizer=adagrad, init=init,
                                   consistency="async")  # fmt: skip
        weight = torch.nn.Parameter(
            torch.from_numpy(item.table.pull(np.arange(VOCAB, dtype=np.uint64), create=False))
        )
        opt = torch.optim.Adagrad([weight], lr=0.3)
        for _ in range(3):
            target = torch.from_numpy(rng.integers(0, VOCAB, size=6))
            seen = torch.from_numpy(rng.integers(0, VOCAB, size=(6, 4)))
            score = (item(target) * history(seen)).sum(1) + item(target).pow(2).sum(1)
            score.sum().backward()
            item.wait()
            opt.zero_grad()
            want = (
                torch.nn.functional.embedding(target, weight)
                * torch.nn.functional.embedding_bag(seen, weight, mode="mean")
            ).sum(1)
            want = want + torch.nn.functional.embedding(target, weight).pow(2).sum(1)
            np.testing.assert_allclose(score.detach(), want.detach(), rtol=1e-5, atol=1e-6)
            want.sum().backward()
            opt.step()
        got = item.table.pull(np.arange(VOCAB, dtype=np.uint64), create=False)
        np.testing.assert_allclose(got, weight.detach(), rtol=1e-5, atol=1e-6)


def test_int64_ids_are_the_bit_patterns_of_uint64_keys() -> None:
    """A hashed id >= 2**63 reaches the same row as a LongTensor (negative there) as it does as
    a uint64 NumPy key, for reading and for training."""
    keys = np.array([2**64 - 5, 2**63, 12345, 2**63 + 77], dtype=np.uint64)
    as_long = torch.from_numpy(keys.view(np.int64))
    assert (as_long[[0, 1, 3]] < 0).all()
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect()
        emb = pst.Embedding(client, "hashed", DIM, optimizer=ps.optim.SGD(lr=1.0),
                            consistency="async", init=ps.init.Uniform(-1.0, 1.0))  # fmt: skip
        before = emb.table.pull(keys)
        np.testing.assert_array_equal(emb(as_long).detach().numpy(), before)
        emb(as_long).sum().backward()  # d/dw of the sum is 1: each row moves by -lr
        emb.wait()
        np.testing.assert_allclose(emb.table.pull(keys), before - 1.0, atol=1e-6)
        np.testing.assert_array_equal(emb(keys).detach().numpy(), before - 1.0)  # uint64 input
        assert _rows(client, "hashed") == 4
        with pytest.raises(ConfigError, match="must be non-negative integers, got -1"):
            emb(torch.tensor([-1], dtype=torch.int32))


def test_eval_and_no_grad_read_without_creating_rows() -> None:
    """Outside training a forward creates no rows and pushes nothing; unseen ids get the value
    their row will start with when training first touches them."""
    seen = torch.tensor([1, 2, 3])
    unseen = torch.tensor([[40, 41], [42, 1]])
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect()
        emb = pst.Embedding(client, "e", DIM, optimizer=ps.optim.SGD(lr=1.0), consistency="async",
                            init=ps.init.Normal(std=0.5))  # fmt: skip
        bag = pst.EmbeddingBag(client, "b", DIM, mode="sum", optimizer=ps.optim.SGD(lr=1.0),
                               consistency="async", init=ps.init.Normal(std=0.5))  # fmt: skip
        emb(seen).sum().backward()
        bag(seen.reshape(1, 3)).sum().backward()
        emb.wait(), bag.wait()
        assert (_rows(client, "e"), _rows(client, "b")) == (3, 3)
        trained = emb.table.pull(np.array([1], np.uint64))
        emb.eval(), bag.eval()
        read = emb(unseen)
        bag_read = bag(unseen)
        assert not read.requires_grad
        with torch.no_grad():
            emb.train(), bag.train()
            read_no_grad = emb(unseen)
            bag(unseen)
        assert (_rows(client, "e"), _rows(client, "b")) == (3, 3)
        np.testing.assert_array_equal(read_no_grad, read)
        np.testing.assert_array_equal(read[1, 1].numpy(), trained[0])
        # training now creates the unseen rows, with the values the reads showed
        out = emb(unseen)
        assert _rows(client, "e") == 6
        np.testing.assert_array_equal(out.detach(), read)
        np.testing.assert_allclose(
            bag_read.numpy(), bag.table.pull(unseen.numpy()).sum(1), rtol=1e-6, atol=1e-6
        )


def _tiny_model() -> Any:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dense_parameters_step_like_a_torch_optimizer(dtype: str) -> None:
    """zero_grad / backward / step / clock, sync, Adagrad with an lr scheduler: the same
    weights as the same model under torch.optim.Adagrad and the same scheduler."""
    tdtype = getattr(torch, dtype)
    rng = np.random.default_rng(5)
    xs = [torch.from_numpy(rng.standard_normal((8, 6))).to(tdtype) for _ in range(6)]
    ys = [torch.from_numpy(rng.standard_normal((8, 1))).to(tdtype) for _ in range(6)]
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect()
        model = _tiny_model().to(tdtype)
        opt = pst.DenseParameters(client, "m", model, optimizer=ps.optim.Adagrad(lr=0.1),
                                  consistency="sync")  # fmt: skip
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        ref = _tiny_model().to(tdtype)
        ref.load_state_dict(model.state_dict())  # the servers' initial values
        ref_opt = torch.optim.Adagrad(ref.parameters(), lr=0.1, initial_accumulator_value=0.0,
                                      eps=1e-10)  # fmt: skip
        ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
        for x, y in zip(xs, ys, strict=True):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            client.clock()
            ref_opt.zero_grad()
            want = torch.nn.functional.mse_loss(ref(x), y)
            want.backward()
            ref_opt.step()
            ref_sched.step()
            assert loss.item() == pytest.approx(want.item(), rel=1e-5)
        opt.pull()
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            assert p.dtype == tdtype
            np.testing.assert_allclose(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, err_msg=name)
        assert opt.tables["0.weight"].spec.optimizer.lr == pytest.approx(
            0.1 * 0.5**2
        )  # the lr of the last step
        with pytest.raises(ConfigError, match=r"model.float\(\)|module.float\(\)"):
            pst.DenseParameters(client, "half", _tiny_model().half())


def test_save_restore_and_export(tmp_path: Path) -> None:
    """export() gives the table's keys and weights; a cluster restored from that checkpoint
    has the same rows, dense weights and Adagrad state: its next step equals the next step of
    the cluster that wrote it."""
    rng = np.random.default_rng(11)
    batches = [torch.from_numpy(rng.integers(0, 50, size=(6, 3))) for _ in range(4)]
    ys = [torch.from_numpy(rng.random((6, 1)).astype(np.float32)) for _ in range(4)]

    def build(client: Any) -> tuple[Any, Any, Any]:
        emb = pst.Embedding(client, "emb", DIM, optimizer=ps.optim.Adagrad(lr=0.2),
                            consistency="sync", init=ps.init.Normal(std=0.1))  # fmt: skip
        head = torch.nn.Linear(3 * DIM, 1)
        opt = pst.DenseParameters(client, "head", head, optimizer=ps.optim.Adagrad(lr=0.2),
                                  consistency="sync")  # fmt: skip
        return emb, head, opt

    def step(emb: Any, head: Any, opt: Any, client: Any, i: int) -> None:
        opt.zero_grad()
        logit = head(emb(batches[i]).reshape(6, -1))
        torch.nn.functional.binary_cross_entropy_with_logits(logit, ys[i]).backward()
        opt.step()
        client.clock()

    touched = np.unique(torch.cat(batches[:3]).numpy()).astype(np.uint64)
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect()
        emb, head, opt = build(client)
        for i in range(3):
            step(emb, head, opt, client, i)
        keys, weights = emb.export(tmp_path / "ckpt")
        np.testing.assert_array_equal(keys, touched)
        np.testing.assert_array_equal(weights, emb.table.pull(keys, create=False))
        opt.pull()
        saved_head = {k: v.clone() for k, v in head.state_dict().items()}
        step(emb, head, opt, client, 3)
        emb.wait()
        opt.pull()
        after_rows = emb.table.pull(keys, create=False)
        after_head = {k: v.clone() for k, v in head.state_dict().items()}
    k2, w2 = pst.read_embeddings(tmp_path / "ckpt", "emb")  # files only, no cluster
    np.testing.assert_array_equal(k2, keys)
    np.testing.assert_array_equal(w2, weights)
    with pytest.raises(ConfigError, match="no sparse table 'nope'"):
        pst.read_embeddings(tmp_path / "ckpt", "nope")
    with ps.LocalCluster(servers=3, workers=1, timeouts=FAST, restore=tmp_path / "ckpt") as cluster:
        client = cluster.connect()
        emb, head, opt = build(client)
        np.testing.assert_array_equal(emb.table.pull(keys, create=False), weights)
        for k, v in head.state_dict().items():
            np.testing.assert_array_equal(v, saved_head[k])
        step(emb, head, opt, client, 3)
        emb.wait()
        opt.pull()
        np.testing.assert_allclose(emb.table.pull(keys, create=False), after_rows, rtol=1e-6)
        for k, v in head.state_dict().items():
            np.testing.assert_allclose(v, after_head[k], rtol=1e-6, atol=1e-7)


def test_exported_model_loads_into_a_running_cluster(tmp_path: Path) -> None:
    """export(), then load_checkpoint() into another running cluster: the rows are the
    exported weights, the model's eval output is the first cluster's and a torch.nn.Embedding
    holding the exported weights gives it too; load() takes tensors as the forward does."""
    rng = np.random.default_rng(5)
    ids = [torch.from_numpy(rng.integers(0, 40, size=(8, 3))) for _ in range(3)]
    ys = [torch.from_numpy(rng.random((8, 1)).astype(np.float32)) for _ in range(3)]
    test_ids = ids[0][:5]  # ids the training touched

    def build(client: Any) -> tuple[Any, Any, Any]:
        torch.manual_seed(1)
        emb = pst.Embedding(client, "emb", DIM, optimizer=ps.optim.Adagrad(lr=0.3),
                            init=ps.init.Normal(std=0.1))  # fmt: skip
        head = torch.nn.Linear(3 * DIM, 1)
        return emb, head, pst.DenseParameters(client, "head", head, optimizer=ps.optim.Adam())

    def predict(emb: Any, head: Any) -> Any:
        emb.eval()
        with torch.no_grad():
            return head(emb(test_ids).reshape(len(test_ids), -1))

    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect()
        emb, head, opt = build(client)
        for x, y in zip(ids, ys, strict=True):
            opt.zero_grad()
            logit = head(emb(x).reshape(len(x), -1))
            torch.nn.functional.binary_cross_entropy_with_logits(logit, y).backward()
            opt.step()
            client.clock()
        keys, weights = emb.export(tmp_path / "ckpt")
        opt.pull()
        trained = predict(emb, head)
        head_state = {k: v.clone() for k, v in head.state_dict().items()}
    with ps.LocalCluster(servers=3, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect()
        emb, head, opt = build(client)
        assert not torch.equal(predict(emb, head), trained)
        assert emb.load_checkpoint(tmp_path / "ckpt") == len(keys)
        opt.load_checkpoint(tmp_path / "ckpt")
        np.testing.assert_array_equal(emb.table.pull(keys, create=False), weights)
        for k, v in head.state_dict().items():
            np.testing.assert_array_equal(v, head_state[k])
        np.testing.assert_array_equal(predict(emb, head), trained)
        ref = torch.nn.Embedding(40, DIM)
        with torch.no_grad():
            ref.weight[torch.from_numpy(keys.astype(np.int64))] = torch.from_numpy(weights)
            np.testing.assert_allclose(
                head(ref(test_ids).reshape(len(test_ids), -1)), trained, rtol=1e-6
            )
        # tensors, and int64 ids that are the bits of uint64 keys
        big = torch.tensor([-5, 7])  # -5: key 2**64 - 5
        vecs = torch.arange(2 * DIM, dtype=torch.float32).reshape(2, DIM)
        emb.load(big, vecs)
        np.testing.assert_array_equal(
            emb.table.pull(np.array([2**64 - 5, 7], np.uint64), create=False), vecs.numpy()
        )
        with pytest.raises(ConfigError, match="1-D array of integer ids"):
            emb.load(big.reshape(1, 2), vecs)
        with pytest.raises(ConfigError, match="float weights"):
            emb.load(big, vecs.long())
        with pytest.raises(ConfigError, match="no dense table 'other/weight'"):
            pst.DenseParameters(client, "other", torch.nn.Linear(2, 1)).load_checkpoint(
                tmp_path / "ckpt"
            )
        # the module's own values, written into the tables
        with torch.no_grad():
            head.weight.fill_(0.25)
        opt.assign()
        head.weight.data.zero_()
        opt.pull()
        assert torch.equal(head.weight, torch.full_like(head.weight, 0.25))
