"""The exceptions paramserver raises. Catch :class:`PSError` for all of them."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "NodeLostError",
    "PSError",
    "PSTimeoutError",
    "ProtocolError",
    "RemoteError",
]


class PSError(Exception):
    """Base class of every error paramserver raises on purpose."""


class ConfigError(PSError, ValueError):
    """Bad settings or arguments: a wrong shape, dtype, option or spec."""


class DataError(PSError, ValueError):
    """Bad input data: a malformed line (named by file and line), a missing file, a label
    outside {0, 1}, a download whose checksum does not match its pin."""


class ProtocolError(PSError):
    """A malformed or incompatible message. ``request_id`` is the message's id when its header
    was readable (0 otherwise), so that the sender's request can be answered; ``code`` names
    the kind of problem for the error reply."""

    def __init__(self, message: str, *, request_id: int = 0, code: str = "protocol") -> None:
        super().__init__(message)
        self.request_id = request_id
        self.code = code


class RemoteError(PSError):
    """A server or the coordinator refused a request; the message is the remote's reason."""

    def __init__(self, message: str, *, node: str = "", code: str = "error") -> None:
        super().__init__(f"{node}: {message}" if node else message)
        self.node = node
        self.code = code
        self.reason = message


class NodeLostError(PSError):
    """A peer stopped answering (its heartbeat expired) or was declared dead."""


class PSTimeoutError(PSError, TimeoutError):
    """A blocking call ran out of time; the message says what it waited for and on whom."""
