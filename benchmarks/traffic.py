"""The headline: training-shaped sparse traffic through the plain API, against one PyTorch process.

Every step is a fresh batch of 65,536 lookups (2,048 examples x 32 features) whose ids follow a
Zipf law over 2M ids: the head repeats inside a batch, the tail keeps bringing new ids. A step
is what a training loop does: ``rows = table.pull(keys)`` (a new array), a gradient of the rows'
shape, ``table.push(keys, grads).result()``, with Adagrad on the servers. The reference runs the
same batches in the same script: one process of PyTorch, ``nn.Embedding(sparse=True)`` over the
same ids (a table of 2M rows), forward, backward with the same gradient, and
``torch.optim.Adagrad``. Beside it, labelled best case: the same batch pulled and pushed again
(the key-list cache answers by signature).

    python benchmarks/traffic.py                 # dims 16, 64, 128; 1 worker + 1 server
    python benchmarks/traffic.py -s 2            # 2 servers
    python benchmarks/traffic.py --quick         # dim 16, a few small steps (CI)
    python benchmarks/traffic.py --server-only   # only the in-process shard cases

Then two more groups. ``cache``: the same fresh steps, each ending in ``client.clock()``,
without and with a worker-side cache (``ps.CacheSpec``: hot rows served at most 2 clocks
stale, gradients flushed every 4 steps), steps/s and bytes moved as ratios. ``server``: a
shard in this process creating the rows of new keys (Normal initial values, Adagrad) against
looking up as many existing rows, the slowest pull while the arena grows past 2**19 rows
(dim 64) against the median one, and the slowest making of room between pulls (what a server
does after its reply: ``SparseShard.prepare``).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
from common import emit, parser

import paramserver as ps
from paramserver.server.shard import SparseShard

IDS = 2_000_000  # the id space a Zipf draw falls into (both sides: the same rows)
ZIPF = 1.1


def batches(seed: int, lookups: int) -> Iterator[np.ndarray]:
    """Fresh batches of Zipf-distributed ids in [0, IDS), as int64."""
    rng = np.random.default_rng(seed)
    while True:
        ids = rng.zipf(ZIPF, size=lookups)
        yield ((ids - 1) % IDS).astype(np.int64)


def timed(step: Callable[[np.ndarray], None], data: Iterator[np.ndarray], steps: int) -> float:
    """Median seconds of ``step`` over ``steps`` fresh batches (batch making not timed)."""
    times = []
    for _ in range(steps):
        batch = next(data)
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_reference(dim: int, lookups: int, steps: int, warmup: int) -> float | None:
    try:
        import torch
    except ImportError:
        print("# traffic: PyTorch is not installed (pip install -e '.[torch]'): no reference")
        return None
    import warnings

    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    emb = torch.nn.Embedding(IDS, dim, sparse=True)
    torch.nn.init.normal_(emb.weight, std=0.01)
    opt = torch.optim.Adagrad(emb.parameters(), lr=0.05)
    rng = np.random.default_rng(1)
    grad = torch.from_numpy(rng.normal(0, 1e-3, (lookups, dim)).astype(np.float32))

    def step(ids: np.ndarray) -> None:
        out = emb(torch.from_numpy(ids))
        out.backward(grad)
        opt.step()
        opt.zero_grad(set_to_none=True)

    data = batches(7, lookups)
    timed(step, data, warmup)
    t = timed(step, data, steps)
    return t


def paramserver_steps(
    client: ps.Client, dim: int, lookups: int, steps: int, warmup: int
) -> tuple[float, float]:
    """(seconds per fresh-batch step, seconds per step of one batch repeated: best case)."""
    table = client.sparse_table(
        f"emb{dim}", dim=dim, init=ps.init.Normal(std=0.01), optimizer=ps.optim.Adagrad(lr=0.05)
    )
    rng = np.random.default_rng(1)
    grad = rng.normal(0, 1e-3, (lookups, dim)).astype(np.float32)

    def step(ids: np.ndarray) -> None:
        keys = ids.astype(np.uint64)
        table.pull(keys)  # a new array of rows, as a training step reads them
        table.push(keys, grad).result()

    data = batches(7, lookups)
    timed(step, data, warmup)
    fresh = timed(step, data, steps)
    same = itertools.repeat(next(data))
    timed(step, same, warmup)
    best = timed(step, same, steps)
    return fresh, best


def cache_steps(
    client: ps.Client, dim: int, lookups: int, steps: int, warmup: int, cache: ps.CacheSpec | None
) -> tuple[float, int, dict[str, int]]:
    """(seconds per fresh-batch step ending in a clock, bytes moved, cache counters)."""
    name = f"cache{dim}" if cache else f"nocache{dim}"
    table = client.sparse_table(
        name, dim=dim, init=ps.init.Normal(std=0.01), optimizer=ps.optim.Adagrad(lr=0.05),
        cache=cache,
    )  # fmt: skip
    grad = np.random.default_rng(1).normal(0, 1e-3, (lookups, dim)).astype(np.float32)

    def step(ids: np.ndarray) -> None:
        keys = ids.astype(np.uint64)
        table.pull(keys)
        table.push(keys, grad).result()
        client.clock()

    data = batches(11, lookups)
    timed(step, data, warmup)
    before = table.traffic()["bytes"]
    t = timed(step, data, steps)
    table.flush().result()
    moved = table.traffic()["bytes"] - before
    return t, moved, (table.cache.stats() if table.cache else {})


def server_cases(dim: int, new: int, grow_to: int, init: ps.init.Initializer) -> None:
    """A shard in this process: ``new`` rows created per request against as many looked up,
    and the slowest request while the arena grows (the median one beside it)."""
    rng = np.random.default_rng(5)
    shard = SparseShard(dim, np.float32, init, ps.optim.Adagrad(), seed=1)
    shard.pull(rng.integers(0, 2**63, 1000).astype(np.uint64))  # compile
    shard.contains(rng.integers(0, 2**63, 10).astype(np.uint64))  # as a server warms them
    times: list[float] = []
    between: list[float] = []
    prepare = getattr(shard, "prepare", lambda: None)  # a tree before it: nothing between
    while shard.num_rows < grow_to + new:
        keys = rng.integers(0, 2**63, new).astype(np.uint64)
        t0 = time.perf_counter()
        shard.pull(keys)
        times.append(time.perf_counter() - t0)
        # what a server does once its reply went out: room for the next new rows
        t0 = time.perf_counter()
        prepare()
        between.append(time.perf_counter() - t0)
    create = sorted(times)[len(times) // 2]
    existing = [0.0] * 5
    for i in range(5):
        t0 = time.perf_counter()
        shard.pull(keys)
        existing[i] = time.perf_counter() - t0
    emit(
        "traffic",
        f"server: {new} new rows x {dim} per pull ({type(init).__name__} init, Adagrad), "
        "in-process shard",
        new / create / 1e6,
        "M rows/s",
        baseline=new / min(existing) / 1e6,
        reference=f"looking up {new} existing rows",
    )
    emit(
        "traffic",
        f"server: slowest of {len(times)} such pulls ({type(init).__name__}) while the arena "
        f"grows past {grow_to} rows",
        max(times) * 1e3,
        "ms",
        higher_is_better=False,
        baseline=create * 1e3,
        reference="the median pull",
    )
    emit(
        "traffic",
        f"server: slowest making of room between two such pulls ({type(init).__name__}): "
        "the index doubled, pages mapped ahead (SparseShard.prepare, after a reply)",
        max(between) * 1e3,
        "ms",
        higher_is_better=False,
    )


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("-s", "--servers", type=int, default=1)
    p.add_argument(
        "--server-only", action="store_true", help="only the in-process shard cases (no cluster)"
    )
    args = p.parse_args()
    inits = [ps.init.Normal(std=0.01), ps.init.Zeros()]
    if args.server_only:
        for init in inits:
            server_cases(64, 20_000, 1 << 19, init)
        return
    dims = [16] if args.quick else [16, 64, 128]
    lookups = 8_192 if args.quick else 65_536
    steps = args.repeat or (3 if args.quick else 15)
    warmup = 2 if args.quick else 5
    ref = {dim: torch_reference(dim, lookups, steps, warmup) for dim in dims}
    with ps.LocalCluster(servers=args.servers, workers=1) as cluster:
        client = cluster.connect()
        for dim in dims:
            fresh, best = paramserver_steps(client, dim, lookups, steps, warmup)
            case = f"fresh Zipf batches, {lookups} lookups x {dim}, Adagrad, pull+push"
            base = ref[dim]
            emit(
                "traffic",
                case + f" ({args.servers} server{'s' if args.servers > 1 else ''})",
                lookups / fresh / 1e6,
                "M lookups/s",
                **({"baseline": lookups / base / 1e6} if base else {}),
                target_ratio=1.5,
                reference="one process of PyTorch: nn.Embedding(sparse=True) + Adagrad",
            )
            emit(
                "traffic",
                f"best case: one batch repeated, {lookups} lookups x {dim}",
                lookups / best / 1e6,
                "M lookups/s",
            )
        for dim in dims:
            spec = ps.CacheSpec(rows=1 << 18, staleness=2, flush_every=4)
            plain_t, plain_b, _ = cache_steps(client, dim, lookups, steps, warmup, None)
            cached_t, cached_b, stats = cache_steps(client, dim, lookups, steps, warmup, spec)
            emit(
                "traffic",
                f"cache: fresh Zipf, {lookups} lookups x {dim}, clock every step, "
                "staleness 2, flush every 4",
                lookups / cached_t / 1e6,
                "M lookups/s",
                baseline=lookups / plain_t / 1e6,
                reference="the same steps without a cache",
                bytes_ratio=round(cached_b / max(plain_b, 1), 3),
                hit_rate=round(stats["hits"] / max(stats["hits"] + stats["misses"], 1), 3),
                staleness=stats["staleness"],
            )
    for init in inits:
        if args.quick:
            server_cases(16, 2_000, 1 << 15, init)
        else:
            server_cases(64, 20_000, 1 << 19, init)


if __name__ == "__main__":
    main()
