"""Replication on the worker's side: where a request about server ``s``'s ranges goes when
every range lives on ``k`` servers (``s`` and the next ``k - 1`` servers of the ring this worker
routes by, :func:`paramserver.partition.replicas_of`: a move's new ring from the worker's switch
on).

* A read (``pull``, ``pull_many``) goes to the first live copy (the primary). Lost with it, it
  goes to the next live copy as soon as a view declares that server dead or rebuilding, without
  waiting for a replacement.
* A write (``push``, ``push_many``, ``assign``) goes to every live copy and completes once all of them
  answered, so an acknowledged push is held by every live copy. A copy lost meanwhile and then
  declared dead no longer counts: the push completes with the others. A push gets one sequence
  number per owner (not one per call), so that a server holding several owners' ranges sees
  each part as a push of its own, in increasing order.
* Anything else (``clock``, ``create_shard``) is about the server itself: sent to ``s`` if it
  is alive, done at once if not (a dead or rebuilding server needs no clock).

:class:`~paramserver.client.session.Session` calls :func:`request_copies` from
``request_server`` when the view says ``replication`` > 1; without replication nothing here runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Unpack

import numpy as np

from paramserver.errors import NodeLostError, RemoteError
from paramserver.partition import replicas_of
from paramserver.wire.messages import VIEW_NUMBER
from paramserver.wire.transport import Future, gather

if TYPE_CHECKING:
    from paramserver.client.session import RequestOptions, Session

__all__ = ["READS", "WRITES", "copies_of", "live_copies", "request_copies", "settle"]

READS = frozenset({"pull", "pull_many"})
WRITES = frozenset({"push", "push_many", "assign"})


def settle(outer: Future[Any], done: Future[Any]) -> None:
    """Complete ``outer`` as ``done`` (already done) completed."""
    err = done.exception(0)
    if err is not None:
        outer.set_exception(err)
    else:
        outer.set_result(done.result(0))


def live_copies(session: Session, s: int) -> list[int]:
    """The servers holding server ``s``'s ranges that the newest view lists as alive, primary
    first.

    Example:
        live_copies(session, 2)   # [2, 0] with 3 servers and replication 2, both alive
    """
    return [r for r in copies_of(session, s) if session.server_alive(r)]


def copies_of(session: Session, s: int) -> list[int]:
    """Every server holding server ``s``'s ranges on the ring this worker routes by now."""
    return replicas_of(s, session.ring_servers or session.num_servers, session.replication)


def _done(session: Session, what: str) -> Future[Any]:
    return gather([], what, lambda _: None)


def _lost(session: Session, s: int, what: str) -> Future[Any]:
    copies = copies_of(session, s)
    fut: Future[Any] = Future(session.endpoint, what)
    fut.set_exception(
        NodeLostError(
            f"{what}: no live copy of server[{s}]'s ranges (servers {copies} are dead or "
            f"rebuilding in view {session.view.get(VIEW_NUMBER)}); more servers died than "
            f"replication={session.replication} covers"
        )
    )
    return fut


def request_copies(
    session: Session,
    s: int,
    header: dict[str, Any],
    arrays: Sequence[np.ndarray] = (),
    *,
    what: str,
    **kw: Unpack[RequestOptions],
) -> Future[Any]:
    """A request about server ``s``'s ranges under replication (see the module docstring);
    the arguments are :meth:`Session.request_one`'s."""
    kind = header["kind"]
    if kind in READS:
        return _read(session, s, header, arrays, what, kw, ())
    if kind in WRITES:
        copies = live_copies(session, s)
        if not copies:
            return _lost(session, s, what)
        # a copy being rebuilt is written to as well (server/rebuild.py), never read
        copies += [r for r in copies_of(session, s)
                   if r in session.writing_to and r not in copies]  # fmt: skip
        if kind in ("push", "assign"):  # one sequence number per owner: see the module docstring
            header = {**header, "seq": session.next_seq()}
        futs = [
            _request_copy(
                session,
                r,
                header,
                arrays,
                kw,
                what=what if r == s else f"{what} (copy on server[{r}])",
                on_dead=lambda: _done(session, what),
            )
            for r in copies
        ]
        return gather(futs, what, lambda results: results[0])
    if not session.server_alive(s) and s not in session.writing_to:
        return _done(session, what)
    return _request_copy(session, s, header, arrays, kw, what=what,
                         on_dead=lambda: _done(session, what))  # fmt: skip


def _for_copy(
    session: Session,
    r: int,
    header: dict[str, Any],
    arrays: Sequence[np.ndarray],
    kw: RequestOptions,
) -> tuple[dict[str, Any], Sequence[np.ndarray], RequestOptions]:
    """The request for copy ``r``: a copy that was replaced (being rebuilt, or rebuilt) may
    share no memory with this worker, so it gets the request as a resend would send it."""
    if r in session.writing_to:  # it holds requests until rebuilt: a slot would not be known
        kw = kw.copy()
        kw["reply_bytes"] = None
    again = kw.get("again")
    if again is None or not (r in session.writing_to or session.replaced[r]):
        return header, arrays, kw
    resend, resend_arrays, parse = again()
    seq = {k: header[k] for k in ("seq",) if k in header}
    kw = kw.copy()
    kw["parse"] = parse
    return {**resend, **seq}, resend_arrays, kw


def _read(
    session: Session,
    s: int,
    header: dict[str, Any],
    arrays: Sequence[np.ndarray],
    what: str,
    kw: RequestOptions,
    tried: tuple[int, ...],
) -> Future[Any]:
    copies = [r for r in live_copies(session, s) if r not in tried]
    if not copies:
        return _lost(session, s, what)
    target = copies[0]
    return _request_copy(
        session, target, header, arrays, kw,
        what=what if target == s else f"{what} (served by server[{target}])",
        on_dead=lambda: _read(session, s, header, arrays, what, kw, (*tried, target)),
    )  # fmt: skip


def _request_copy(
    session: Session,
    r: int,
    header: dict[str, Any],
    arrays: Sequence[np.ndarray],
    kw: RequestOptions,
    *,
    what: str,
    on_dead: Callable[[], Future[Any]],
) -> Future[Any]:
    header, arrays, kw = _for_copy(session, r, header, arrays, kw)
    fut = session.request_one(r, header, arrays, what=what, on_dead=on_dead, **kw)
    if r not in session.writing_to:
        return fut
    # a copy being rebuilt again (its source died) turns down what the new copy holds anyway
    outer: Future[Any] = Future(session.endpoint, what)

    def done(f: Future[Any]) -> None:
        err = f.exception(0)
        if isinstance(err, RemoteError) and err.code == "rebuilding":
            outer.set_result(None)
        else:
            settle(outer, f)

    fut.add_done_callback(done)
    return outer
