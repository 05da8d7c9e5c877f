"""One TypedDict per message kind of :data:`paramserver.wire.protocol.SCHEMA`: a handler
declares which message it reads, and ``mypy --strict`` checks every field it touches.

:func:`paramserver.wire.protocol.decode` validates a header against the schema first, so a
header handed to a handler has exactly these fields, with these types. A unit test holds the
two in step (tests/unit/test_messages.py). Beside them: the names of the two fields the wire
still calls by old names (:data:`VIEW_NUMBER`, :data:`INCARNATION`), and the ``register``
request every node sends (:func:`register_header`).

Example:
    def on_pull(h: PullMsg) -> None:
        h["table"], h["clock"]          # str, int; h["tabel"] is a type error
"""

# No "from __future__ import annotations" here: TypedDict reads NotRequired at class creation.
import os
import socket
from typing import Any, Final, Literal, NotRequired, TypedDict

__all__ = [
    "INCARNATION",
    "MESSAGES",
    "VIEW_NUMBER",
    "AcquireLeaseMsg",
    "AssignMsg",
    "AttachMsg",
    "AttachSlotMsg",
    "BarrierMsg",
    "CheckpointMsg",
    "ClockMsg",
    "CompleteLeaseMsg",
    "CreateShardMsg",
    "CreateTableMsg",
    "DrainMsg",
    "ErrorMsg",
    "GetViewMsg",
    "Header",
    "HeartbeatMsg",
    "LeaveMsg",
    "ListTablesMsg",
    "MoveDoneMsg",
    "OpenBulkMsg",
    "PingMsg",
    "PullManyMsg",
    "PullMsg",
    "PushManyMsg",
    "PushMsg",
    "RegisterMsg",
    "ReplyMsg",
    "RestoreMsg",
    "Role",
    "SaveMsg",
    "SetLrMsg",
    "ShutdownMsg",
    "StatsMsg",
    "StatusMsg",
    "StopMsg",
    "SwitchedMsg",
    "TransferMsg",
    "ViewMsg",
    "register_header",
]

# Two fields keep their first names on the wire (renaming them would break the wire format; a
# protocol version bump may): a view's number travels as "epoch" (in a view, and in the
# coordinator's journal), and a member's incarnation (which registration of a rank a message
# comes from) as "token" (in a member's first view, heartbeats and leave). The code calls them
# view number and incarnation, and reads and writes the two fields through these names only.
VIEW_NUMBER: Final = "epoch"
INCARNATION: Final = "token"

Role = Literal["server", "worker"]


class Header(TypedDict):
    """What every message carries: its kind and its request id (0: not a request)."""

    kind: str
    id: int


class _Request(TypedDict):
    """The request id every message kind below carries (0: not a request)."""

    id: int


class _Fenced(_Request):
    """A request to a server: the cluster view it was sent in (fencing)."""

    view: NotRequired[int]


class RegisterMsg(_Request):
    """``register``."""

    kind: Literal["register"]
    role: Role
    address: NotRequired[str | None]
    rank: NotRequired[int | None]
    host: NotRequired[str | None]
    pid: NotRequired[int | None]


def register_header(role: Role, rank: int | None, address: str | None = None) -> dict[str, Any]:
    """This process's ``register`` request: its host name and pid let the coordinator tell a
    replacement from a live member whose rank it asks for.

    Example:
        endpoint.request("coordinator", register_header("worker", None), what="registering")
    """
    header: dict[str, Any] = {
        "kind": "register",
        "role": role,
        "rank": rank,
        "host": socket.gethostname()[:256],
        "pid": os.getpid(),
    }
    if address is not None:
        header["address"] = address
    return header


class HeartbeatMsg(_Request):
    """``heartbeat``."""

    kind: Literal["heartbeat"]
    role: Role
    rank: int
    token: int  # the incarnation: read it as h[INCARNATION]
    clock: NotRequired[int | None]
    examples: NotRequired[int | None]
    metrics: NotRequired[dict[str, Any] | None]


class GetViewMsg(_Request):
    """``get_view``."""

    kind: Literal["get_view"]


class CreateTableMsg(_Request):
    """``create_table``."""

    kind: Literal["create_table"]
    spec: dict[str, Any]


class ListTablesMsg(_Request):
    """``list_tables``."""

    kind: Literal["list_tables"]


class BarrierMsg(_Request):
    """``barrier``."""

    kind: Literal["barrier"]
    name: str
    rank: int
    timeout: float


class SaveMsg(_Request):
    """``save``."""

    kind: Literal["save"]
    path: str
    clock: int
    timeout: float


class LeaveMsg(_Request):
    """``leave``."""

    kind: Literal["leave"]
    role: Role
    rank: int
    token: int  # the incarnation: read it as h[INCARNATION]


class ShutdownMsg(_Request):
    """``shutdown``."""

    kind: Literal["shutdown"]


class StatusMsg(_Request):
    """``status``."""

    kind: Literal["status"]


class AcquireLeaseMsg(_Request):
    """``acquire_lease``."""

    kind: Literal["acquire_lease"]
    dataset: str
    epoch: int
    shards: int
    rank: int


class CompleteLeaseMsg(_Request):
    """``complete_lease``."""

    kind: Literal["complete_lease"]
    dataset: str
    epoch: int
    shard: int
    rank: int


class ViewMsg(_Request):
    """``view``."""

    kind: Literal["view"]
    view: dict[str, Any]


class StopMsg(_Request):
    """``stop``."""

    kind: Literal["stop"]


class CheckpointMsg(_Request):
    """``checkpoint``."""

    kind: Literal["checkpoint"]
    path: str
    clock: int


class CreateShardMsg(_Fenced):
    """``create_shard``."""

    kind: Literal["create_shard"]
    spec: dict[str, Any]


class PullMsg(_Fenced):
    """``pull``."""

    kind: Literal["pull"]
    table: str
    rank: int
    clock: int
    create: bool
    timeout: float
    shm: NotRequired[bool]
    region: NotRequired[int]
    dirty: NotRequired[bool]
    sig: NotRequired[int]
    slot: NotRequired[int]
    reply_at: NotRequired[int]
    bulk: NotRequired[bool]
    codec: NotRequired[str]


class PushMsg(_Fenced):
    """``push``."""

    kind: Literal["push"]
    table: str
    rank: int
    clock: int
    seq: int
    shm: NotRequired[bool]
    checked: NotRequired[bool]
    region: NotRequired[int]
    dirty: NotRequired[bool]
    sig: NotRequired[int]
    slot: NotRequired[int]
    reply_at: NotRequired[int]
    bulk: NotRequired[int]
    codec: NotRequired[str]


class AssignMsg(_Fenced):
    """``assign``."""

    kind: Literal["assign"]
    table: str
    rank: int
    seq: int


class RestoreMsg(_Fenced):
    """``restore``."""

    kind: Literal["restore"]
    path: str
    rank: int
    servers: int
    ring: NotRequired[list[int]]  # the server ranks keys are hashed over (servers join, leave)
    check: NotRequired[bool]


class PullManyMsg(_Fenced):
    """``pull_many``."""

    kind: Literal["pull_many"]
    tables: list[str]
    rank: int
    clock: int
    timeout: float


class PushManyMsg(_Fenced):
    """``push_many``."""

    kind: Literal["push_many"]
    tables: list[str]
    rank: int
    clock: int
    seq: int


class OpenBulkMsg(_Fenced):
    """``open_bulk``."""

    kind: Literal["open_bulk"]
    rank: int


class AttachMsg(_Fenced):
    """``attach``."""

    kind: Literal["attach"]
    table: str
    rank: int
    path: str
    nonce: int
    replies: NotRequired[int]


class AttachSlotMsg(_Fenced):
    """``attach_slot``."""

    kind: Literal["attach_slot"]
    rank: int
    slot: int
    path: str
    nonce: int
    size: int


class TransferMsg(_Request):
    """``transfer``: rows of moving ranges from one server to another (server/transfer.py)."""

    kind: Literal["transfer"]
    move: int
    source: int
    phase: Literal["copy", "final", "end"]
    table: NotRequired[str | None]
    sync: NotRequired[list[list[int]] | None]  # final: [clock, worker rank, rows] per run
    view: NotRequired[int]  # the view that announced the move
    # "rebuild": a replica rebuilt from a live copy (server/rebuild.py), ``move`` its id; its
    # end carries the clock T of the final and the source's last sequence number per worker
    purpose: NotRequired[Literal["move", "rebuild"]]
    clock: NotRequired[int]
    seqs: NotRequired[list[list[int]]]


class SwitchedMsg(_Request):
    """``switched``: a worker routes by a move's new ring from now on."""

    kind: Literal["switched"]
    view: NotRequired[int]
    rank: int
    move: int
    clock: int
    purpose: NotRequired[Literal["move", "rebuild"]]  # "rebuild": writes to a rebuilt copy
    since: NotRequired[int]  # a move: the first clock it reads by the new ring


class MoveDoneMsg(_Request):
    """``move_done``: a source's ranges of a move reached their destinations."""

    kind: Literal["move_done"]
    move: int
    source: int
    stats: NotRequired[dict[str, Any] | None]
    purpose: NotRequired[Literal["move", "rebuild"]]  # "rebuild": ``move`` is a rebuild's id


class DrainMsg(_Request):
    """``drain``: move a server's ranges to the others, then stop it."""

    kind: Literal["drain"]
    rank: int


class ClockMsg(_Fenced):
    """``clock``."""

    kind: Literal["clock"]
    rank: int
    clock: int


class SetLrMsg(_Fenced):
    """``set_lr``."""

    kind: Literal["set_lr"]
    table: str
    lr: float


class StatsMsg(_Fenced):
    """``stats``."""

    kind: Literal["stats"]


class PingMsg(_Fenced):
    """``ping``."""

    kind: Literal["ping"]


class ReplyMsg(_Request):
    """``reply``."""

    kind: Literal["reply"]
    staleness: NotRequired[int | None]
    rank: NotRequired[int | None]
    view: NotRequired[dict[str, Any] | None]
    spec: NotRequired[dict[str, Any] | None]
    tables: NotRequired[list[Any] | None]
    stats: NotRequired[dict[str, Any] | None]
    status: NotRequired[dict[str, Any] | None]
    path: NotRequired[str | None]
    shard: NotRequired[int | None]
    shm: NotRequired[bool]
    bulk: NotRequired[int]
    port: NotRequired[int]
    ticket: NotRequired[int]


class ErrorMsg(_Request):
    """``error``."""

    kind: Literal["error"]
    code: str
    message: str


# kind -> its TypedDict
MESSAGES: dict[str, type] = {
    "register": RegisterMsg,
    "heartbeat": HeartbeatMsg,
    "get_view": GetViewMsg,
    "create_table": CreateTableMsg,
    "list_tables": ListTablesMsg,
    "barrier": BarrierMsg,
    "save": SaveMsg,
    "leave": LeaveMsg,
    "shutdown": ShutdownMsg,
    "status": StatusMsg,
    "acquire_lease": AcquireLeaseMsg,
    "complete_lease": CompleteLeaseMsg,
    "view": ViewMsg,
    "stop": StopMsg,
    "checkpoint": CheckpointMsg,
    "create_shard": CreateShardMsg,
    "pull": PullMsg,
    "push": PushMsg,
    "assign": AssignMsg,
    "restore": RestoreMsg,
    "pull_many": PullManyMsg,
    "push_many": PushManyMsg,
    "open_bulk": OpenBulkMsg,
    "attach": AttachMsg,
    "attach_slot": AttachSlotMsg,
    "clock": ClockMsg,
    "transfer": TransferMsg,
    "move_done": MoveDoneMsg,
    "switched": SwitchedMsg,
    "drain": DrainMsg,
    "set_lr": SetLrMsg,
    "stats": StatsMsg,
    "ping": PingMsg,
    "reply": ReplyMsg,
    "error": ErrorMsg,
}
