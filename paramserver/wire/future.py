"""Futures: the outcome of a request, completed by whoever waits for it.

There is no background thread: :meth:`Future.result` drives its endpoint's sockets (its
``poll``) until the future is done, so replies from every peer are dispatched while any one
of them is awaited.

Example:
    fut = ep.request("server[0]", {"kind": "ping"}, what="ping server[0]")
    fut.result(timeout=10)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from paramserver.errors import PSTimeoutError

__all__ = ["Driver", "Future", "gather"]

T = TypeVar("T")


class Driver(Protocol):
    """What a future waits on: an endpoint that dispatches replies while it polls."""

    request_timeout: float

    def poll(self, timeout: float) -> None: ...


class Future(Generic[T]):
    """The outcome of one request (or a group of them), completed while someone waits.

    Example:
        fut = emb.push(keys, grads)
        fut.result(timeout=10)   # waits for the acknowledgement; raises on error
    """

    def __init__(self, endpoint: Driver | None, what: str) -> None:
        self._endpoint = endpoint
        self.what = what
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Future[T]], None]] = []

    def done(self) -> bool:
        return self._done

    def set_result(self, value: T) -> None:
        if not self._done:
            self._value, self._done = value, True
            self._run_callbacks()

    def set_exception(self, error: BaseException) -> None:
        if not self._done:
            self._error, self._done = error, True
            self._run_callbacks()

    def add_done_callback(self, fn: Callable[[Future[T]], None]) -> None:
        if self._done:
            fn(self)
        else:
            self._callbacks.append(fn)

    def _run_callbacks(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    @property
    def error(self) -> BaseException | None:
        """The error it ended with, without waiting (None while pending or on success)."""
        return self._error

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._error

    def result(self, timeout: float | None = None) -> T:
        """Wait for the outcome (default: the endpoint's request timeout) and return it."""
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[no-any-return]

    def _wait(self, timeout: float | None) -> None:
        if self._done:
            return
        if self._endpoint is None:
            raise PSTimeoutError(f"{self.what}: nothing will complete this future")
        limit = self._endpoint.request_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not self._done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PSTimeoutError(f"{self.what}: no answer after {limit:.3g}s")
            self._endpoint.poll(left)


def gather(
    futures: Sequence[Future[Any]],
    what: str,
    combine: Callable[[list[Any]], T],
    redo: Callable[[BaseException, Future[T]], bool] | None = None,
) -> Future[T]:
    """One future completed when all of ``futures`` are, with ``combine`` of their results.

    The first failure fails the group, unless ``redo`` (given the error and the group) says
    it completes the group itself (e.g. by asking again): the others' results are then not
    combined.
    """
    endpoint = futures[0]._endpoint if futures else None
    group: Future[T] = Future(endpoint, what)
    if not futures:
        group.set_result(combine([]))
        return group
    left = [len(futures)]

    def one_done(f: Future[Any]) -> None:
        if group.done() or left[0] < 0:
            return
        if f._error is not None:
            if redo is not None and redo(f._error, group):
                left[0] = -1  # taken over
                return
            group.set_exception(f._error)
            return
        left[0] -= 1
        if left[0] == 0:
            try:
                group.set_result(combine([g._value for g in futures]))
            except Exception as exc:  # a combine error belongs to the caller of result()
                group.set_exception(exc)

    for f in futures:
        f.add_done_callback(one_done)
    return group
