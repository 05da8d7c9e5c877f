"""A handler's "no": :class:`Refusal`, a code and a reason, sent back as an ``error`` reply.

Raised by a server's request handlers and by the paths a request's arrays take
(:mod:`paramserver.wire.paths`) before they change anything; the loop answers it with
``protocol.error_header(id, code, message)``, which a worker raises as
:class:`paramserver.errors.RemoteError` with the same code.
"""

from __future__ import annotations

__all__ = ["Refusal"]


class Refusal(Exception):
    """A request turned down: ``code`` for the error reply, and the reason.

    Example:
        raise Refusal("unknown_table", "table 'emb' does not exist on server[0]")
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
