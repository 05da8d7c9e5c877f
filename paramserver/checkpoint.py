"""Checkpoint files: what one server writes, the manifest, and reading shards back onto any
number of servers.

Layout of a checkpoint root::

    root/
      LATEST                       name of the newest complete checkpoint (replaced atomically)
      ckpt-00000120-3/             one checkpoint: clock 120, round 3
        manifest.json              format, clock, table specs, servers that wrote
        server-0/index.json        what server 0 wrote: per table its files and range
        server-0/t0.keys.npy       sparse: keys (n,) uint64
        server-0/t0.rows.npy       full rows [w | optimizer state], (n, stride)
        ...

A checkpoint is written into ``root/.partial-...`` and becomes visible by one ``rename``, so a
crash in the middle of a save leaves the previous checkpoint whole. Arrays are ``.npy`` read
with ``allow_pickle=False``; manifests are JSON. Nothing here talks to sockets.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from paramserver.errors import ConfigError
from paramserver.partition import HashRing
from paramserver.spec import TableSpec

__all__ = [
    "FORMAT_VERSION",
    "ExportableShard",
    "commit_checkpoint",
    "describe",
    "find_checkpoint",
    "fsync_dir",
    "load_dense_range",
    "load_sparse_rows",
    "read_manifest",
    "write_server_shards",
]

FORMAT_VERSION = 1
LATEST = "LATEST"


class ExportableShard(Protocol):
    """What a server's shard gives a checkpoint: copies of its rows (this module stands below
    ``paramserver.server``, so it names what it needs instead of importing the shards)."""

    def export(self) -> dict[str, npt.NDArray[Any]]:
        """``rows`` (n, stride), each row ``[w | optimizer state]``; and for a sparse shard
        ``keys`` (n,) uint64, in the same order."""
        ...


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable (a file created or renamed there)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_server_shards(
    directory: Path,
    rank: int,
    tables: dict[str, tuple[TableSpec, ExportableShard | None, int, int]],
) -> dict[str, Any]:
    """Write one server's shards into ``directory/server-<rank>/``: per table name its spec,
    its shard (None: nothing here) and, for a dense table, the range it holds. Returns the
    index it wrote.

    Example:
        write_server_shards(Path(".partial-00000010-1"), 0, {"emb": (spec, shard, 0, 0)})
    """
    out = directory / f"server-{rank}"
    # the round's directory must exist already (shared storage): a round that was given up
    # must not be recreated by a late writer
    out.mkdir(exist_ok=True)
    index: dict[str, Any] = {"rank": rank, "tables": {}}
    for i, name in enumerate(sorted(tables)):
        _, shard, start, stop = tables[name]
        if shard is None:
            continue
        stem = f"t{i}"
        data = shard.export()
        entry: dict[str, Any] = {"rows": f"{stem}.rows.npy", "count": len(data["rows"])}
        _save_npy(out / entry["rows"], data["rows"])
        if "keys" in data:  # a sparse shard
            entry["keys"] = f"{stem}.keys.npy"
            _save_npy(out / entry["keys"], data["keys"])
        else:
            entry["start"], entry["stop"] = start, stop
        entry["nbytes"] = int(data["rows"].nbytes + (data["keys"].nbytes if "keys" in data else 0))
        index["tables"][name] = entry
    _write_json(out / "index.json", index)
    fsync_dir(out)
    return index


def commit_checkpoint(
    root: Path,
    partial: Path,
    *,
    clock: int,
    round_id: int,
    tables: list[TableSpec],
    num_servers: int,
    num_workers: int,
    keep: int | None = None,
    servers: list[int] | None = None,
) -> Path:
    """Write the manifest into ``partial``, rename it into place, point LATEST at it.
    ``servers``: the ranks that wrote (a server drained off the ring writes nothing), if not
    every rank below ``num_servers``."""
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "clock": clock,
        "round": round_id,
        "created": time.time(),
        "num_servers": num_servers,
        "num_workers": num_workers,
        "tables": [t.to_wire() for t in tables],
    }
    if servers is not None and servers != list(range(num_servers)):
        manifest["servers"] = sorted(servers)
    _write_json(partial / "manifest.json", manifest)
    fsync_dir(partial)
    final = root / f"ckpt-{clock:08d}-{round_id}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(final.name + "\n")
    os.replace(tmp, root / LATEST)
    fsync_dir(root)
    if keep is not None:
        done = sorted(p for p in root.glob("ckpt-*") if p.is_dir() and p != final)
        for old in done[: max(0, len(done) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint directory that ``path`` means: itself, or the one its LATEST names."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return p
    latest = p / LATEST
    if latest.is_file():
        target = p / latest.read_text().strip()
        if (target / "manifest.json").is_file():
            return target
        raise ConfigError(f"checkpoint {p}: LATEST names {target.name}, which has no manifest")
    if not p.exists():
        raise ConfigError(f"checkpoint {p} does not exist")
    raise ConfigError(f"{p} is not a checkpoint: no manifest.json and no LATEST file")


def read_manifest(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any], list[TableSpec]]:
    """Find, read and validate a checkpoint's manifest: (directory, manifest, table specs)."""
    directory = find_checkpoint(path)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint {directory}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise ConfigError(
            f"checkpoint {directory}: format {manifest.get('format')!r} is not "
            f"supported (this is {FORMAT_VERSION})"
        )
    for key in ("clock", "num_servers", "num_workers", "tables"):
        if key not in manifest:
            raise ConfigError(f"checkpoint {directory}: manifest is missing {key!r}")
    specs = [TableSpec.from_wire(t) for t in manifest["tables"]]
    return directory, manifest, specs


def _indexes(directory: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in manifest.get("servers") or range(int(manifest["num_servers"])):
        f = directory / f"server-{r}" / "index.json"
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"checkpoint {directory}: cannot read {f} ({exc})") from None
    return out


def _load(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        arr: np.ndarray = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint file {path}: {exc}") from None
    return arr


def load_sparse_rows(
    directory: Path,
    manifest: dict[str, Any],
    name: str,
    ring: HashRing,
    rank: int | Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Keys and full rows of sparse table ``name`` that server ``rank`` owns under ``ring``
    (or any of the ranks ``rank`` lists: a replica holds the keys of several). A key that
    several servers wrote (copies of one range, with replication) is taken once, from the
    first server that wrote it: the copies are equal at a checkpoint's clock in sync mode."""
    wanted = np.asarray([rank] if isinstance(rank, int) else list(rank), dtype=np.int32)
    keys_out, rows_out = [], []
    for idx in _indexes(directory, manifest):
        entry = idx["tables"].get(name)
        if entry is None:
            continue
        base = directory / f"server-{idx['rank']}"
        keys = _load(base / entry["keys"])
        mine = np.isin(ring.route(keys), wanted)
        if mine.any():
            rows = _load(base / entry["rows"], mmap=True)
            if rows.shape[0] != keys.shape[0]:
                raise ConfigError(
                    f"checkpoint {base}: {entry['rows']} has {rows.shape[0]} rows "
                    f"for {keys.shape[0]} keys"
                )
            keys_out.append(keys[mine])
            rows_out.append(np.asarray(rows[mine]))
    if not keys_out:
        return np.empty(0, np.uint64), np.empty((0, 0))
    keys, rows = np.concatenate(keys_out), np.concatenate(rows_out)
    if len(keys_out) > 1:  # copies of one key from several servers (replication)
        _, first = np.unique(keys, return_index=True)
        if len(first) < len(keys):
            first.sort()
            keys, rows = keys[first], rows[first]
    return keys, rows


def load_dense_range(
    directory: Path, manifest: dict[str, Any], name: str, start: int, stop: int
) -> np.ndarray | None:
    """Full rows of elements ``[start, stop)`` of dense table ``name``, from whatever ranges the
    servers that wrote the checkpoint held."""
    parts: list[np.ndarray] = []
    covered = start
    pieces = []
    for idx in _indexes(directory, manifest):
        entry = idx["tables"].get(name)
        if entry is not None:
            pieces.append(
                (entry["start"], entry["stop"], directory / f"server-{idx['rank']}" / entry["rows"])
            )
    for a, b, path in sorted(pieces):
        lo, hi = max(a, start), min(b, stop)
        if lo >= hi:
            continue
        if lo != covered:
            break
        rows = _load(path, mmap=True)
        parts.append(np.asarray(rows[lo - a : hi - a]))
        covered = hi
    if covered != stop:
        raise ConfigError(
            f"checkpoint {directory}: table {name!r} elements {covered}..{stop} are missing"
        )
    return np.concatenate(parts) if parts else None


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a checkpoint holds: clock, servers, and per table its kind, rows and bytes.

    Example:
        describe("ckpt/")["tables"]["emb"]["rows"]
    """
    directory, manifest, specs = read_manifest(path)
    indexes = _indexes(directory, manifest)
    tables: dict[str, Any] = {}
    for spec in specs:
        entries = [idx["tables"][spec.name] for idx in indexes if spec.name in idx["tables"]]
        tables[spec.name] = {
            "kind": spec.kind,
            "dtype": spec.dtype,
            "shape": [spec.dim] if spec.kind == "sparse" else list(spec.shape),
            "optimizer": spec.optimizer.to_spec()["kind"],
            "consistency": spec.consistency,
            "rows": sum(int(e["count"]) for e in entries) if spec.kind == "sparse" else spec.size,
            "bytes": sum(int(e.get("nbytes", 0)) for e in entries),
        }
    return {
        "path": str(directory),
        "format": manifest["format"],
        "clock": manifest["clock"],
        "created": manifest.get("created"),
        "servers": manifest["num_servers"],
        "workers": manifest["num_workers"],
        "tables": tables,
    }
