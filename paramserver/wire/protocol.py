"""The wire format: message kinds, the header schema, and frame encoding and decoding.

A message is one ZeroMQ multipart message ``[header, frame, ...]``. The header is a small
msgpack map; arrays follow as raw little-endian frames, each array cut into frames of at most
:data:`CHUNK_BYTES` (1 MiB), because a fresh huge receive buffer per message costs more in page
faults than the transfer itself while 1 MiB buffers are reused by the allocator.

Every field of every incoming header is checked here, before anything else looks at it:
:func:`decode` either returns a header whose fields have the types and ranges the schema says,
or raises :class:`~paramserver.errors.ProtocolError` naming the field. Nothing here imports
zmq: frames are anything that exposes the buffer protocol.

Between a worker and a server on one host, a request may name a *slot*: a shared-memory region
the worker attached to that server (``attach_slot``). Its large arrays, and those of the
reply, then lie in the slot (layout entry ``[dtype, shape, 0, offset]``) instead of frames;
only the header crosses the socket.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np

from paramserver.errors import ProtocolError
from paramserver.wire.checks import (
    NAME,
    RANK,
    U63,
    Check,
    int_in,
    is_bool,
    is_map,
    is_number,
    is_status,
    is_timeout,
    optional,
    rank_list,
    str_up_to,
    table_names,
)

__all__ = [
    "CHUNK_BYTES",
    "DTYPES",
    "KINDS",
    "MAX_MESSAGE_BYTES",
    "decode",
    "encode",
    "error_header",
]

VERSION = 1
CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 4 << 30
MAX_HEADER_BYTES = 1 << 20
# No frame we send is larger than a header or a chunk; a bound socket drops a peer that sends
# one larger than this before it is ever read into memory.
MAX_FRAME_BYTES = 16 << 20
MAX_NDIM = 4
# No header we send nests deeper than a server's stats (5 levels); a deeper one is refused
# before any code walks it (repr, validation, a spec parser: all recursive).
MAX_DEPTH = 16
# the longest string or bytes, and the most entries of a list or map, in a header (msgpack
# refuses more before it allocates them); msgpack's own nesting limit is 1024 levels, and
# MAX_DEPTH then refuses a header deeper than 16
MAX_HEADER_ITEMS = 1 << 16
# arrays at least this large go into a message's shared slot (if it has one and they fit)
SLOT_MIN_BYTES = 32 << 10
SLOT_ALIGN = 64
MAX_SLOTS = 16  # slots per worker and server
MAX_REPLIES = 8  # reply regions of a dense table's shared segment

# Wire dtypes, always little-endian. bfloat16 travels as uint16 bit patterns.
DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("uint64", "int64", "float64", "float32", "float16", "uint16", "int8", "uint8")
}

MAX_SHARDS = 1 << 24
BULK = int_in(1, MAX_MESSAGE_BYTES)
ROLE: Check = lambda v: v in ("server", "worker")  # noqa: E731
CODEC: Check = lambda v: v in ("float16", "bfloat16", "int8")  # noqa: E731  (wire.codec)

# kind -> {field: (check, required)}. Fields common to all kinds ("kind", "id", "v", "arrays")
# are checked separately. Unknown fields are an error: a peer speaking another dialect is
# refused rather than half-understood.
SCHEMA: dict[str, dict[str, tuple[Check, bool]]] = {
    # coordinator requests
    "register": {
        "role": (ROLE, True),
        "address": (optional(str_up_to(256)), False),
        "rank": (optional(RANK), False),
        "host": (optional(str_up_to(256)), False),
        "pid": (optional(U63), False),
    },
    "heartbeat": {
        "role": (ROLE, True),
        "rank": (RANK, True),
        "token": (U63, True),
        "clock": (optional(U63), False),
        "examples": (optional(U63), False),  # a worker's examples so far (client.report)
        # a worker's training scalars and bytes per table (client.report; paramserver status)
        "metrics": (optional(is_map), False),
    },
    "get_view": {},
    "create_table": {"spec": (is_map, True)},
    "list_tables": {},
    "barrier": {"name": (NAME, True), "rank": (RANK, True), "timeout": (is_timeout, True)},
    "save": {"path": (str_up_to(4096), True), "clock": (U63, True), "timeout": (is_timeout, True)},
    "leave": {"role": (ROLE, True), "rank": (RANK, True), "token": (U63, True)},
    "shutdown": {},
    "status": {},  # the cluster's status (paramserver status); answered with reply.status
    # data leases (coordinator): which shard of a data set a worker reads next in an epoch
    "acquire_lease": {
        "dataset": (NAME, True),
        "epoch": (U63, True),
        "shards": (int_in(1, MAX_SHARDS), True),
        "rank": (RANK, True),
    },
    "complete_lease": {
        "dataset": (NAME, True),
        "epoch": (U63, True),
        "shard": (int_in(0, MAX_SHARDS - 1), True),
        "rank": (RANK, True),
    },
    # coordinator -> node
    "view": {"view": (is_map, True)},
    "stop": {},
    "checkpoint": {"path": (str_up_to(4096), True), "clock": (U63, True)},
    # server requests
    "create_shard": {"spec": (is_map, True)},
    "pull": {
        "table": (NAME, True),
        "rank": (RANK, True),
        "clock": (U63, True),
        "create": (is_bool, True),
        "timeout": (is_timeout, True),
        "shm": (is_bool, False),  # dense: answer into the attached shared-memory segment
        "region": (int_in(0, MAX_REPLIES - 1), False),  # shm: into this reply region
        "dirty": (is_bool, False),  # shm: the worker let that region be written since
        "sig": (U63, False),  # sparse: key-list signature (key caching)
        "slot": (int_in(0, MAX_SLOTS - 1), False),  # same host: arrays lie in this slot
        "reply_at": (U63, False),  # where in the slot the reply's arrays may go
        "bulk": (is_bool, False),  # dense: the values may come on the bulk channel
        "codec": (CODEC, False),  # dense: encode the values in this codec (wire.codec)
    },
    "push": {
        "table": (NAME, True),
        "rank": (RANK, True),
        "clock": (U63, True),
        "seq": (U63, True),
        "shm": (is_bool, False),  # dense: the gradient is in the attached segment
        "checked": (is_bool, False),  # the worker found every value finite (shm, slot)
        "region": (int_in(0, MAX_REPLIES - 1), False),  # shm: new values go there too
        "dirty": (is_bool, False),  # shm: the worker let that region be written since
        "sig": (U63, False),  # sparse: key-list signature (key caching)
        "slot": (int_in(0, MAX_SLOTS - 1), False),
        "reply_at": (U63, False),
        "bulk": (BULK, False),  # dense: this many gradient bytes follow on the bulk channel
        "codec": (CODEC, False),  # the gradient is encoded in this codec (wire.codec)
    },
    # rows written into a running table (server/assign.py): arrays [keys, rows] (sparse) or
    # [values] (dense); rows of the table's width set weights and reset the optimizer state,
    # rows as wide as a checkpoint's set the state too
    "assign": {"table": (NAME, True), "rank": (RANK, True), "seq": (U63, True)},
    # every table of this server back to a checkpoint (its part under the ring of the server
    # ranks ``ring``, else of ``servers``); check: only say whether it could
    "restore": {
        "path": (str_up_to(4096), True),
        "rank": (RANK, True),
        "servers": (int_in(1, 1 << 16), True),
        "ring": (rank_list, False),
        "check": (is_bool, False),
    },
    # many small dense tables of one server in one request (server/many.py): their values or
    # gradients as one array, the tables one after the other
    "pull_many": {
        "tables": (table_names, True),
        "rank": (RANK, True),
        "clock": (U63, True),
        "timeout": (is_timeout, True),
    },
    "push_many": {
        "tables": (table_names, True),
        "rank": (RANK, True),
        "clock": (U63, True),
        "seq": (U63, True),
    },
    # a worker asks for a ticket to open a bulk channel (paramserver.wire.bulk); the reply has the
    # port and the ticket
    "open_bulk": {"rank": (RANK, True)},
    # a worker offers a shared-memory segment for a dense table (same-host fast path)
    "attach": {
        "table": (NAME, True),
        "rank": (RANK, True),
        "path": (str_up_to(256), True),
        "nonce": (U63, True),
        "replies": (int_in(1, MAX_REPLIES), False),  # reply regions after the gradient's
    },
    # a worker offers a shared-memory slot for the arrays of its requests (same host)
    "attach_slot": {
        "rank": (RANK, True),
        "slot": (int_in(0, MAX_SLOTS - 1), True),
        "path": (str_up_to(256), True),
        "nonce": (U63, True),
        "size": (int_in(1, MAX_MESSAGE_BYTES), True),
    },
    "clock": {"rank": (RANK, True), "clock": (U63, True)},
    "set_lr": {"table": (NAME, True), "lr": (is_number, True)},
    "stats": {},
    "ping": {},
    # replies
    "reply": {
        "staleness": (optional(U63), False),
        "rank": (optional(RANK), False),
        "view": (optional(is_map), False),
        "spec": (optional(is_map), False),
        "tables": (optional(lambda v: isinstance(v, list)), False),
        "stats": (optional(is_map), False),
        "status": (optional(is_status), False),
        "path": (optional(str_up_to(4096)), False),
        "shard": (optional(int_in(-1, MAX_SHARDS - 1)), False),
        "shm": (is_bool, False),
        "bulk": (BULK, False),  # a pull's values follow on the bulk channel
        "port": (int_in(1, 65535), False),
        "ticket": (U63, False),
    },
    "error": {"code": (str_up_to(64), True), "message": (str_up_to(4096), True)},
}
_PURPOSE = frozenset({"move", "rebuild"}).__contains__  # a rebuild: server/rebuild.py
SCHEMA.update({  # servers joining and leaving: server/transfer.py, coordinator/scaling.py
    "transfer": {"move": (U63, True), "source": (RANK, True), "table": (optional(NAME), False),
                 "phase": (lambda v: v in ("copy", "final", "end"), True), "view": (U63, False),
                 "sync": (optional(lambda v: isinstance(v, list)), False),  # [clock, rank, rows]
                 "purpose": (_PURPOSE, False), "clock": (U63, False),  # [worker, seq] pairs:
                 "seqs": (lambda v: isinstance(v, list) and all(isinstance(p, list) and len(p)
                          == 2 and RANK(p[0]) and U63(p[1]) for p in v), False)},
    "switched": {"rank": (RANK, True), "move": (U63, True), "clock": (U63, True),
                 "view": (U63, False), "purpose": (_PURPOSE, False), "since": (U63, False)},
    "move_done": {"move": (U63, True), "source": (RANK, True), "stats": (optional(is_map), False),
                  "purpose": (_PURPOSE, False)},
    "drain": {"rank": (RANK, True)},
})  # fmt: skip
KINDS = frozenset(SCHEMA)
# a worker's request to a server names the cluster view it was sent in: a server that has not
# seen that view checks that it still holds its rank before it serves (server/cluster.py)
for _kind in ("create_shard", "pull", "push", "pull_many", "push_many", "open_bulk", "attach",
              "attach_slot", "clock", "set_lr", "stats", "ping", "assign", "restore"):  # fmt: skip
    SCHEMA[_kind]["view"] = (U63, False)


def _in_region(region: np.ndarray, a: np.ndarray) -> int | None:
    """The offset of ``a``'s bytes in ``region`` if they lie there, else None."""
    start = int(a.ctypes.data) - int(region.ctypes.data)
    return start if start >= 0 and start + a.nbytes <= region.nbytes else None


def slot_align(offset: int) -> int:
    """``offset`` rounded up to where an array in a slot may start."""
    return -(-offset // SLOT_ALIGN) * SLOT_ALIGN


def slot_end(arrays: Sequence[np.ndarray]) -> int:
    """Where a reply's arrays may start in a request's slot: after every array of the request
    that :func:`encode` puts there (the same placement, from offset 0)."""
    end = 0
    for a in arrays:
        if a.nbytes >= SLOT_MIN_BYTES:
            end = slot_align(end) + a.nbytes
    return slot_align(end)


def encode(
    header: dict[str, Any],
    arrays: Sequence[np.ndarray] = (),
    region: np.ndarray | None = None,
    start: int = 0,
) -> list[Any]:
    """Return the frames of one message: the msgpack header, then each array's raw bytes.

    Arrays larger than :data:`CHUNK_BYTES` are sent as several frames, all views of the
    caller's memory (no copy); the caller keeps the arrays alive and unchanged until sent.
    With a shared ``region`` (a uint8 slot), arrays of at least :data:`SLOT_MIN_BYTES` that fit
    go there instead, from offset ``start`` on (an array already in the region stays where it
    is); the header names their offsets.

    Example:
        frames = encode({"kind": "ping", "id": 1})
    """
    frames: list[Any] = [b""]
    layout = []
    pos = start
    for a in arrays:
        if a.dtype.byteorder == ">" or a.dtype.str.lstrip("<>=|") not in _WIRE_NAMES:
            raise ProtocolError(f"cannot send an array of dtype {a.dtype}")
        a = np.ascontiguousarray(a)
        name = _WIRE_NAMES[a.dtype.str.lstrip("<>=|")]
        if region is not None and a.nbytes >= SLOT_MIN_BYTES:
            off = _in_region(region, a)
            if off is None:
                off = slot_align(pos)
                if off + a.nbytes <= region.nbytes:
                    region[off : off + a.nbytes] = a.reshape(-1).view(np.uint8)
                else:
                    off = None
            if off is not None:
                layout.append([name, list(a.shape), 0, off])
                pos = max(pos, off + a.nbytes)
                continue
        flat = memoryview(a.reshape(-1).view(np.uint8).data) if a.size else memoryview(b"")
        n = len(flat)
        if n <= CHUNK_BYTES:
            frames.append(flat)
            nframes = 1
        else:
            nframes = -(-n // CHUNK_BYTES)
            frames.extend(flat[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES] for i in range(nframes))
        layout.append([name, list(a.shape), nframes])
    full = {"v": VERSION, **header}
    if layout:
        full["arrays"] = layout
    frames[0] = msgpack.packb(full, use_bin_type=True)
    return frames


_WIRE_NAMES = {dt.str.lstrip("<>=|"): name for name, dt in DTYPES.items()}


def error_header(request_id: int, code: str, message: str) -> dict[str, Any]:
    """The header of an error reply (message trimmed to the schema's limit)."""
    return {"kind": "error", "id": request_id, "code": code, "message": message[:4096] or code}


def _fail(message: str) -> ProtocolError:
    return ProtocolError(message)


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists and maps more than ``limit`` levels (no recursion): one
    level at a time, the containers of each level's values the next (every message is
    checked, so no tuple or generator per value)."""
    level: list[Any] = [value]
    depth = 1
    while level:
        below: list[Any] = []
        for v in level:
            if isinstance(v, dict):
                below.extend(v.values())
            elif isinstance(v, list):
                below.extend(v)
            else:
                continue
            if depth > limit:
                return True
        level = [v for v in below if isinstance(v, (dict, list))]
        depth += 1
    return False


def decode_header(raw: Any) -> dict[str, Any]:
    """Parse and validate a header frame; ProtocolError names what is wrong, and nothing else
    escapes: whatever a peer sends, the caller gets a header or a ProtocolError."""
    try:
        return _decode_header(raw)
    except ProtocolError:
        raise
    except Exception as exc:  # a check that broke on a value nobody foresaw
        raise _fail(f"header could not be validated ({type(exc).__name__})") from None


def _decode_header(raw: Any) -> dict[str, Any]:
    buf = memoryview(raw)
    if buf.nbytes > MAX_HEADER_BYTES:
        raise _fail(f"header of {buf.nbytes} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(
            buf,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_HEADER_ITEMS,
            max_bin_len=MAX_HEADER_ITEMS,
            max_array_len=MAX_HEADER_ITEMS,
            max_map_len=MAX_HEADER_ITEMS,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise _fail(f"header is not valid msgpack ({type(exc).__name__})") from None
    if _too_deep(header, MAX_DEPTH):
        raise _fail(f"header nests deeper than {MAX_DEPTH} levels")
    if not isinstance(header, dict):
        raise _fail(f"header must be a map, got {type(header).__name__}")
    if header.get("v") != VERSION:
        raise _fail(
            f"protocol version {_short(header.get('v'))} is not supported (this is {VERSION})"
        )
    kind = header.get("kind")
    if not isinstance(kind, str) or kind not in SCHEMA:
        raise _fail(f"unknown message kind {_short(kind)}")
    if not U63(header.get("id")):
        raise _fail(
            f"{kind}: field 'id' must be an integer in 0..2**63-1, got {_short(header.get('id'))}"
        )
    # from here on the request can be answered: its error reply carries its id, so that the
    # sender's request fails at once with the reason instead of waiting out its timeout
    rid = int(header["id"])
    schema = SCHEMA[kind]
    for key, value in header.items():
        if key in ("v", "kind", "id", "arrays"):
            continue
        spec = schema.get(key)
        if spec is None:
            raise ProtocolError(f"{kind}: unexpected field {_short(key)}", request_id=rid)
        if not spec[0](value):
            raise ProtocolError(
                f"{kind}: field {key!r} has an invalid value {_short(value)}", request_id=rid
            )
    for key, (_, required) in schema.items():
        if required and key not in header:
            raise ProtocolError(f"{kind}: missing field {key!r}", request_id=rid)
    return header


Alloc = Callable[[int, int], np.ndarray]
RegionOf = Callable[[dict[str, Any]], "np.ndarray | None"]


def decode(
    frames: Sequence[Any], alloc: Alloc | None = None, region_of: RegionOf | None = None
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Validate a whole message and return (header, arrays): :func:`decode_header`, then
    :func:`decode_arrays` with the slot ``region_of(header)`` (the message's slot, or None).
    A ProtocolError about the arrays carries the message's id.

    Example:
        header, arrays = decode(encode({"kind": "ping", "id": 1}))
    """
    if not frames:
        raise _fail("empty message")
    header = decode_header(frames[0])
    try:
        region = region_of(header) if region_of is not None else None
        return header, decode_arrays(header, frames, alloc, region)
    except ProtocolError as exc:
        exc.request_id = header["id"]
        raise
    except Exception as exc:  # nothing but a ProtocolError leaves the decoder
        raise ProtocolError(
            f"{header['kind']}: arrays could not be decoded ({type(exc).__name__})",
            request_id=header["id"],
        ) from None


def decode_arrays(
    header: dict[str, Any],
    frames: Sequence[Any],
    alloc: Alloc | None = None,
    region: np.ndarray | None = None,
) -> list[np.ndarray]:
    """The arrays of a message whose header :func:`decode_header` returned.

    Single-frame arrays are read-only views of the received frame (no copy); arrays that came in
    several frames are assembled into one array: ``alloc(i, nbytes)`` (a writable uint8 buffer
    of at least ``nbytes``, e.g. a reused one: no page faults) or a fresh one. Arrays in a
    shared slot are read-only views of ``region``.
    """
    layout = header.pop("arrays", [])
    if not isinstance(layout, list) or len(layout) > 8:
        raise _fail("field 'arrays' must be a list of at most 8 [dtype, shape, nframes] entries")
    arrays: list[np.ndarray] = []
    pos = 1
    total = 0
    for i, entry in enumerate(layout):
        if not (isinstance(entry, list) and len(entry) in (3, 4)):
            raise _fail(f"arrays[{i}] must be [dtype, shape, nframes] or [dtype, shape, 0, offset]")
        name, shape, nframes = entry[:3]
        dtype = DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise _fail(f"arrays[{i}]: unsupported dtype {_short(name)}")
        if not (
            isinstance(shape, list)
            and len(shape) <= MAX_NDIM
            and all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape
            )
        ):
            raise _fail(f"arrays[{i}]: invalid shape {_short(shape)}")
        nbytes = math.prod(shape) * dtype.itemsize
        if len(entry) == 4:
            if region is None:
                raise ProtocolError(
                    f"{header['kind']}: arrays in shared slot {header.get('slot')!r}, but no "
                    "such slot is attached",
                    code="no_slot",
                )
            arrays.append(_slot_array(region, entry[3], nbytes, dtype, shape, i))
            continue
        if not (isinstance(nframes, int) and not isinstance(nframes, bool) and nframes >= 1):
            raise _fail(f"arrays[{i}]: invalid frame count {_short(nframes)}")
        total += nbytes
        if total > MAX_MESSAGE_BYTES:
            raise _fail(f"message larger than the limit of {MAX_MESSAGE_BYTES} bytes")
        if pos + nframes > len(frames):
            raise _fail(f"arrays[{i}]: header announces more frames than the message has")
        parts = [memoryview(f).cast("B") for f in frames[pos : pos + nframes]]
        pos += nframes
        got = sum(p.nbytes for p in parts)
        if got != nbytes:
            raise _fail(f"arrays[{i}]: {got} bytes received, shape {shape} x {name} needs {nbytes}")
        if nframes == 1:
            arr = np.frombuffer(parts[0], dtype=dtype) if nbytes else np.empty(0, dtype)
        else:
            arr = np.empty(nbytes, dtype=np.uint8) if alloc is None else alloc(i, nbytes)[:nbytes]
            off = 0
            for p in parts:
                arr[off : off + p.nbytes] = np.frombuffer(p, dtype=np.uint8)
                off += p.nbytes
            arr = arr.view(dtype)
        arrays.append(arr.reshape(shape))
    if pos != len(frames):
        raise _fail(f"message has {len(frames) - pos} frames more than its header announces")
    return arrays


def _slot_array(
    region: np.ndarray, offset: Any, nbytes: int, dtype: np.dtype[Any], shape: list[int], i: int
) -> np.ndarray:
    if not (
        isinstance(offset, int)
        and not isinstance(offset, bool)
        and offset >= 0
        and offset % dtype.itemsize == 0
        and offset + nbytes <= region.nbytes
    ):
        raise _fail(
            f"arrays[{i}]: offset {_short(offset)} + {nbytes} bytes is not inside the "
            f"{region.nbytes}-byte slot (or not aligned to {dtype.itemsize})"
        )
    arr = region[offset : offset + nbytes].view(dtype).reshape(shape)
    arr.flags.writeable = False
    return arr


class Rejections:
    """Counts malformed messages so that a flood of them cannot flood the log as well: the
    first ``first`` are worth logging, then one in ``every``.

    Example:
        if rejections.count(): log.warning("malformed message dropped: %s", exc)
    """

    def __init__(self, first: int = 10, every: int = 1000) -> None:
        self.total = 0
        self.first = first
        self.every = every

    def count(self) -> bool:
        self.total += 1
        return self.total <= self.first or self.total % self.every == 0


def _short(value: Any) -> str:
    """A short description of a peer's value for an error text: never ``repr`` of anything
    unbounded (a deep or huge value would make the error itself fail)."""
    if value is None or isinstance(value, bool | int | float):
        text = repr(value)
    elif isinstance(value, str | bytes):
        text = repr(value[:60])
    elif isinstance(value, list | dict):
        return f"<{type(value).__name__} of {len(value)}>"
    else:
        return f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."
