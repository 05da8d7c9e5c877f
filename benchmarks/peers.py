"""paramserver beside the tools people would use instead, in one run, on the same data with the
same settings; throughput and quality printed as ratios (paramserver / peer).

- sparse embeddings: fresh Zipf batches through plain ``pull()`` / ``push()`` with Adagrad
  (``benchmarks/traffic.py``'s step) against one PyTorch process, ``nn.Embedding(sparse=True)``
  + ``torch.optim.Adagrad``, on the same batches;
- word2vec: ``paramserver.models.word2vec`` against gensim's ``Word2Vec`` (skip-gram, same
  tokens, dim, window, negatives, min-count, sample, rate, epochs; 2 threads each: gensim's
  workers, the worker's kernel threads); quality: Google analogy accuracy and WordSim353
  Spearman correlation, evaluated by the same function (``--w2v-epochs 5``: the issue's run);
  then the same paramserver run with a worker-side cache of both tables (``ps.CacheSpec``):
  its speed, bytes moved and quality against the uncached run;
- FTRL logistic regression: ``paramserver.models.logreg`` against Vowpal Wabbit
  (``--ftrl``, same alpha, beta, l1, l2), one pass over the same synthetic Criteo-format data;
  examples/s and test AUC;
- DeepFM: ``paramserver.models.deepfm`` against deepctr-torch's ``DeepFM`` (same embedding
  width, hidden layers, batch), one epoch; examples/s and test AUC.

Peers come with ``pip install -e '.[bench]'``; a missing one is skipped with a message.
Every paramserver case runs 1 worker + 1 server (``-s`` servers) on this host.

    python benchmarks/peers.py                  # all four
    python benchmarks/peers.py --only word2vec  # one of torch, word2vec, vw, deepfm
    python benchmarks/peers.py --quick          # small sizes (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import time
from typing import Any

import numpy as np
from common import emit, parser
from traffic import paramserver_steps, torch_reference

import paramserver as ps
from paramserver.data.ctr import CTRBatch, SyntheticCriteo
from paramserver.data.evaluate import auc

PEERS = ("torch", "word2vec", "vw", "deepfm")
BATCH = 512
# word2vec's worker-side cache: every word of the corpus fits (its vocabulary is ~15k words at
# min-count 5), rows served at most 1, then 2 steps stale (a clock is a step)
W2V_CACHE_ROWS, W2V_CACHE_STALENESS = 1 << 16, (1, 2)
# The embeddings' Adagrad rate for DeepFM's one epoch. train_worker's default (0.05) overfits
# within it: test AUC 0.8038 against deepctr-torch's 0.8117 on the default data (seed 0); 0.03
# gave 0.8090, 0.02 0.8107, 0.01 0.8117. Checked on other data: see docs/performance.md.
DEEPFM_LR_SPARSE = 0.01
THREADS = 2  # word2vec: gensim's worker threads and paramserver's kernel threads (2 cores)
ALPHA, BETA, L1, L2 = 0.2, 1.0, 0.1, 1.0  # logreg.train_worker's defaults


def missing(module: str, what: str) -> bool:
    """Whether ``module`` is not installed (then say so on stderr: stdout is results only)."""
    if importlib.util.find_spec(module) is None:
        print(
            f"peers: {what} skipped: {module} is not installed (pip install -e '.[bench]')",
            file=sys.stderr,
        )
        return True
    return False


def torch_case(args: argparse.Namespace) -> None:
    if missing("torch", "PyTorch sparse embeddings"):
        return
    lookups = 8_192 if args.quick else 65_536
    steps, warmup = (3, 2) if args.quick else (10, 5)
    dims = [16] if args.quick else [16, 64, 128]
    ref = {d: torch_reference(d, lookups, steps, warmup) for d in dims}
    with ps.LocalCluster(servers=args.servers, workers=1) as cluster:
        client = cluster.connect()
        for dim in dims:
            fresh, _ = paramserver_steps(client, dim, lookups, steps, warmup)
            base = ref[dim]
            emit(
                "peers",
                f"sparse embeddings + Adagrad, fresh Zipf batches of {lookups} x {dim}",
                lookups / fresh / 1e6,
                "M lookups/s",
                **({"baseline": lookups / base / 1e6} if base else {}),
                peer="PyTorch nn.Embedding(sparse=True) + optim.Adagrad, one process",
            )


def word2vec_case(args: argparse.Namespace) -> None:
    if missing("gensim", "word2vec against gensim"):
        return
    from paramserver.data.datasets import load_analogies, load_text_corpus, load_wordsim
    from paramserver.models import word2vec as w2v

    words = load_text_corpus(wiki=not args.quick)
    if args.quick:
        words = words[:60_000]
    settings = argparse.Namespace(
        dim=100, window=5, negative=5, min_count=5, sample=1e-3, lr=0.025,
        epochs=args.w2v_epochs or 1,
    )  # fmt: skip
    evaluation = (load_analogies(), load_wordsim())
    t0 = time.perf_counter()
    theirs = w2v.gensim_reference(words, settings, evaluation)
    t_gensim = time.perf_counter() - t0

    def ours(cache: ps.CacheSpec | None) -> tuple[dict[str, Any], float]:
        with ps.LocalCluster(servers=args.servers, workers=1) as cluster:
            client = cluster.connect()
            t0 = time.perf_counter()
            out = w2v.train_worker(
                client, words, epochs=settings.epochs, dim=settings.dim, window=settings.window,
                negative=settings.negative, min_count=settings.min_count, sample=settings.sample,
                lr=settings.lr, evaluation=evaluation, show=False, threads=THREADS, cache=cache,
            )  # fmt: skip
            # the per-epoch evaluation included, as for gensim
            return out, time.perf_counter() - t0

    out, t_ours = ours(None)
    mine = out["curve"][-1]
    tokens = len(words) * settings.epochs
    case = f"word2vec skip-gram d={settings.dim}, {len(words)} tokens x {settings.epochs} epochs"
    emit(
        "peers",
        case,
        tokens / t_ours,
        "tokens/s",
        baseline=tokens / t_gensim,
        peer=f"gensim Word2Vec (workers={THREADS}), same tokens and settings",
        threads=THREADS,
        batch=w2v.BATCH,
        seconds=round(t_ours, 2),
        peer_seconds=round(t_gensim, 2),
        analogy=round(mine["analogy_accuracy"], 4),
        peer_analogy=round(theirs["analogy_accuracy"], 4),
        analogy_ratio=_ratio(mine["analogy_accuracy"], theirs["analogy_accuracy"]),
        wordsim=round(mine["wordsim_spearman"], 4),
        peer_wordsim=round(theirs["wordsim_spearman"], 4),
        wordsim_ratio=_ratio(mine["wordsim_spearman"], theirs["wordsim_spearman"]),
        bytes_moved=out["traffic"]["bytes"],
    )
    # the same run with a worker-side cache of both tables (issue 12, item 6): its effect on
    # speed, bytes moved and quality, against the uncached run above
    for staleness in W2V_CACHE_STALENESS:
        spec = ps.CacheSpec(rows=W2V_CACHE_ROWS, staleness=staleness, flush_every=1)
        cached_case(case, tokens, spec, ours(spec), (mine, out, t_ours))


def cached_case(
    case: str,
    tokens: int,
    spec: ps.CacheSpec,
    run: tuple[dict[str, Any], float],
    plain: tuple[dict[str, Any], dict[str, Any], float],
) -> None:
    """Emit a word2vec run with a cache against the same run without it."""
    (cached, t_cached), (mine, out, t_ours) = run, plain
    got, counts = cached["curve"][-1], cached["cache"]
    emit(
        "peers",
        f"{case}, worker-side cache (CacheSpec rows={spec.rows}, staleness={spec.staleness})",
        tokens / t_cached,
        "tokens/s",
        baseline=tokens / t_ours,
        peer="the same run without the cache",
        seconds=round(t_cached, 2),
        bytes_moved=cached["traffic"]["bytes"],
        bytes_ratio=_ratio(cached["traffic"]["bytes"], out["traffic"]["bytes"]),
        hit_rate=_ratio(counts["hits"], counts["hits"] + counts["misses"]),
        staleness=counts["staleness"],
        analogy=round(got["analogy_accuracy"], 4),
        analogy_ratio=_ratio(got["analogy_accuracy"], mine["analogy_accuracy"]),
        wordsim=round(got["wordsim_spearman"], 4),
        wordsim_ratio=_ratio(got["wordsim_spearman"], mine["wordsim_spearman"]),
    )


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def _vw_lines(data: CTRBatch) -> list[str]:
    labels = np.where(data.y > 0.5, "1", "-1")
    keys = data.keys.astype(str)
    return [f"{y} |f {' '.join(k)}" for y, k in zip(labels, keys, strict=True)]


def vw_case(args: argparse.Namespace) -> None:
    if missing("vowpalwabbit", "FTRL logistic regression against Vowpal Wabbit"):
        return
    from vowpalwabbit import Workspace

    from paramserver.models.logreg import train_worker

    train, test = SyntheticCriteo(
        examples=args.examples or (20_000 if args.quick else 400_000), seed=args.seed
    ).make()
    lines, test_lines = _vw_lines(train), _vw_lines(test)  # the text VW reads, made untimed
    vw = Workspace(
        f"--loss_function logistic --ftrl --ftrl_alpha {ALPHA} --ftrl_beta {BETA} "
        f"--l1 {L1} --l2 {L2} -b 24 --link logistic --quiet"
    )
    t0 = time.perf_counter()
    for line in lines:  # one pass, example by example: VW's online learning
        vw.learn(line)
    t_vw = time.perf_counter() - t0
    p_vw = np.array([vw.predict(line) for line in test_lines])
    vw.finish()
    with ps.LocalCluster(servers=args.servers, workers=1) as cluster:
        client = cluster.connect()
        t0 = time.perf_counter()
        res = train_worker(client, train, test, epochs=1, batch=BATCH, show=False)
        t_ps = time.perf_counter() - t0  # with its test evaluation; VW's predictions untimed
    ours, theirs = res["curve"][-1]["test_auc"], auc(test.y, p_vw)
    emit(
        "peers",
        f"FTRL logistic regression, {len(train)} synthetic Criteo-format examples, 1 pass",
        len(train) / t_ps,
        "examples/s",
        baseline=len(train) / t_vw,
        peer="Vowpal Wabbit --ftrl (pyvw, example by example)",
        auc=round(ours, 4),
        peer_auc=round(theirs, 4),
        auc_difference=round(ours - theirs, 4),
    )


def _deepctr_inputs(
    train: CTRBatch, test: CTRBatch
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[int]]:
    """Per field, ids 1.. of the training set's values (0: unseen), and the dense columns."""
    xs: dict[str, np.ndarray] = {}
    xt: dict[str, np.ndarray] = {}
    sizes = []
    for f in range(train.keys.shape[1]):
        vocab = np.unique(train.keys[:, f])
        for x, data in ((xs, train), (xt, test)):
            pos = np.clip(np.searchsorted(vocab, data.keys[:, f]), 0, len(vocab) - 1)
            x[f"C{f}"] = np.where(vocab[pos] == data.keys[:, f], pos + 1, 0).astype(np.int64)
        sizes.append(len(vocab) + 1)
    for j in range(train.dense.shape[1]):
        xs[f"I{j}"] = train.dense[:, j]
        xt[f"I{j}"] = test.dense[:, j]
    return xs, xt, sizes


def deepfm_case(args: argparse.Namespace) -> None:
    if missing("torch", "DeepFM") or missing("deepctr_torch", "DeepFM against deepctr-torch"):
        return
    import torch

    with contextlib.redirect_stdout(sys.stderr):  # deepctr prints; stdout is results only
        from deepctr_torch.inputs import DenseFeat, SparseFeat
        from deepctr_torch.models import DeepFM

    from paramserver.models.deepfm import train_worker

    dim, hidden = 8, (64, 32)
    train, test = SyntheticCriteo(
        examples=args.examples or (10_000 if args.quick else 200_000), seed=args.seed
    ).make()
    xs, xt, sizes = _deepctr_inputs(train, test)
    cols = [SparseFeat(f"C{f}", size, embedding_dim=dim) for f, size in enumerate(sizes)]
    cols += [DenseFeat(f"I{j}", 1) for j in range(train.dense.shape[1])]
    torch.manual_seed(0)
    with contextlib.redirect_stdout(sys.stderr):
        model = DeepFM(cols, cols, dnn_hidden_units=hidden, task="binary", device="cpu")
        model.compile("adam", "binary_crossentropy")
        t0 = time.perf_counter()
        model.fit(xs, train.y, batch_size=BATCH, epochs=1, verbose=0)
        t_peer = time.perf_counter() - t0
        theirs = auc(test.y, model.predict(xt, batch_size=8192).reshape(-1))
    with ps.LocalCluster(servers=args.servers, workers=1) as cluster:
        client = cluster.connect()
        t0 = time.perf_counter()
        res = train_worker(client, train, test, epochs=1, batch=BATCH, dim=dim, hidden=hidden,
                           lr_sparse=DEEPFM_LR_SPARSE, show=False)  # fmt: skip
        t_ps = time.perf_counter() - t0  # with its test evaluation; deepctr's untimed
    ours = res["curve"][-1]["test_auc"]
    emit(
        "peers",
        f"DeepFM, {len(train)} synthetic Criteo-format examples, 1 epoch",
        len(train) / t_ps,
        "examples/s",
        baseline=len(train) / t_peer,
        peer="deepctr-torch DeepFM (Adam, same width, hidden layers and batch)",
        auc=round(ours, 4),
        peer_auc=round(theirs, 4),
        auc_difference=round(ours - theirs, 4),
    )


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("-s", "--servers", type=int, default=1)
    p.add_argument("--only", nargs="+", choices=PEERS, default=list(PEERS))
    p.add_argument("--examples", type=int, default=0, help="CTR examples (logreg, DeepFM)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic CTR data")
    p.add_argument("--w2v-epochs", type=int, default=0, help="word2vec epochs (default 1)")
    args = p.parse_args()
    cases: dict[str, Any] = {
        "torch": torch_case,
        "word2vec": word2vec_case,
        "vw": vw_case,
        "deepfm": deepfm_case,
    }
    for name in args.only:
        cases[name](args)


if __name__ == "__main__":
    main()
