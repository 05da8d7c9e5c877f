"""Shared-memory segments between processes on one host (the same-host fast path).

A worker creates a segment per dense table (a file under ``/dev/shm``), writes a random nonce
into its first page and asks each server to map it. A server that can open the file and reads
the same nonce shares this host's memory with the worker; one that cannot (another host,
another container, no ``/dev/shm``) refuses, and the worker falls back to TCP. Once every
server has mapped it the worker unlinks the file at once, so nothing is left behind when a
process dies later, even by SIGKILL. A process killed in the short window between create and
unlink leaves a file named ``paramserver-<pid>-...``; the next :func:`create` removes every
such file whose process is gone.

Layout: page 0 holds the nonce; then ``regions`` regions (for a dense table the gradient, then
one or more reply regions that a worker may hand out as pull results; one for a worker's message
slot), each ``nbytes`` rounded up to whole pages.
Nothing here imports zmq, and nothing is pickled.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from paramserver.metrics import process_gone

__all__ = ["Segment", "attach", "cleanup_stale", "create", "layout"]

SHM_DIR = "/dev/shm"
PAGE = mmap.PAGESIZE
PREFIX = "paramserver-"
_NAME = re.compile(r"^paramserver-(\d+)-[0-9a-f]{16}$")


def _round(n: int) -> int:
    return -(-n // PAGE) * PAGE


def layout(nbytes: int, regions: int = 2) -> tuple[list[int], int]:
    """(offset of each region, total size) of a segment of ``regions`` x ``nbytes``."""
    step = _round(max(nbytes, 1))
    return [PAGE + i * step for i in range(regions)], PAGE + regions * step


@dataclass
class Segment:
    """A mapped segment: ``regions`` are uint8 views of its regions; a dense table's segment
    has ``grad`` and then its ``replies``."""

    path: str
    nonce: int
    mm: mmap.mmap
    regions: list[np.ndarray]

    @property
    def grad(self) -> np.ndarray:
        return self.regions[0]

    @property
    def replies(self) -> list[np.ndarray]:
        return self.regions[1:]

    def typed(self, i: int, dtype: np.dtype[Any], count: int) -> np.ndarray:
        """Region ``i`` as ``count`` elements of ``dtype``, an array of its own: views made of
        it hold it (not the whole mapping), so its reference count tells whether anything still
        does."""
        offsets, _ = layout(self.regions[0].nbytes, len(self.regions))
        return np.frombuffer(self.mm, dtype, count=count, offset=offsets[i])

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def drop_pages(self) -> None:
        """Take this process's page mappings of the segment away (the contents stay in the
        file): its resident memory shrinks until the pages are touched again."""
        with contextlib.suppress(OSError, ValueError):
            self.mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.unlink()
        # numpy views keep the buffer exported; the mapping goes when the last view does
        with contextlib.suppress(BufferError):
            self.mm.close()


def cleanup_stale() -> int:
    """Unlink segments left by processes that no longer exist; returns how many."""
    removed = 0
    with contextlib.suppress(OSError):
        for name in os.listdir(SHM_DIR):
            m = _NAME.match(name)
            if m and process_gone(int(m.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(SHM_DIR, name))
                    removed += 1
    return removed


def _views(mm: mmap.mmap, nbytes: int, regions: int) -> list[np.ndarray]:
    offsets, _ = layout(nbytes, regions)
    buf = np.frombuffer(mm, np.uint8)
    return [buf[o : o + nbytes] for o in offsets]


def create(nbytes: int, regions: int = 2) -> Segment | None:
    """Create and map a segment with ``regions`` regions of ``nbytes``; None where shared
    memory is unavailable (no ``/dev/shm``, or it is full)."""
    if not os.path.isdir(SHM_DIR):
        return None
    cleanup_stale()
    path = os.path.join(SHM_DIR, f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}")
    _, total = layout(nbytes, regions)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        # reserved now: a full /dev/shm (64 MiB in a default container) refuses here, instead
        # of a SIGBUS when a page is first written
        os.posix_fallocate(fd, 0, total)
        mm = mmap.mmap(fd, total)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None
    finally:
        os.close(fd)
    nonce = secrets.randbits(63)
    np.frombuffer(mm, np.uint64, count=1)[0] = nonce
    return Segment(path, nonce, mm, _views(mm, nbytes, regions))


def attach(path: str, nonce: int, nbytes: int, regions: int = 2) -> Segment:
    """Map a segment another process created; raises OSError (with the reason) if it is not
    there, has the wrong size, or does not hold ``nonce``."""
    name = os.path.basename(path)
    if os.path.dirname(path) != SHM_DIR or not _NAME.match(name):
        raise OSError(f"{path!r} is not a paramserver segment")
    _, total = layout(nbytes, regions)
    fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    try:
        size = os.fstat(fd).st_size
        if size != total:
            raise OSError(f"segment {name} has {size} bytes, expected {total}")
        mm = mmap.mmap(fd, total)
    finally:
        os.close(fd)
    if int(np.frombuffer(mm, np.uint64, count=1)[0]) != nonce:
        mm.close()
        raise OSError(f"segment {name} belongs to another worker (nonce differs)")
    return Segment(path, nonce, mm, _views(mm, nbytes, regions))
