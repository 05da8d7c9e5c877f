"""CURVE security derived from the cluster token, and the ZAP handler that admits only peers
holding it.

Example:
    sec = Security.from_token(token)
    router = Router(ctx, "0.0.0.0", 7070, security=sec)   # serves CURVE, runs the ZAP handler
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils import z85

from paramserver.errors import ConfigError

if TYPE_CHECKING:  # imported when a token is set: it pulls in asyncio and ssl (~40 ms)
    from zmq.auth.thread import ThreadAuthenticator

__all__ = ["MIN_TOKEN_LENGTH", "Security", "start_authenticator"]

MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class Security:
    """CURVE keys derived from the cluster token: every node that knows the token can compute
    them, and no other. Binding sockets authenticate peers by the client key (ZAP), so a peer
    without the token cannot even complete the handshake; all traffic is encrypted.

    Example:
        sec = Security.from_token(open("token").read().strip())
    """

    server_public: bytes = field(repr=False)
    server_secret: bytes = field(repr=False)
    client_public: bytes = field(repr=False)
    client_secret: bytes = field(repr=False)

    @classmethod
    def from_token(cls, token: str) -> Security:
        if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(
                f"the cluster token must be a string of at least {MIN_TOKEN_LENGTH} characters"
            )

        def pair(purpose: bytes) -> tuple[bytes, bytes]:
            seed = hashlib.blake2b(token.encode(), digest_size=32, person=purpose).digest()
            secret = z85.encode(seed)  # any 32 bytes are an X25519 secret key
            return zmq.curve_public(secret), secret

        sp, ss = pair(b"paramserver-srv")
        cp, cs = pair(b"paramserver-cli")
        return cls(sp, ss, cp, cs)

    def serve(self, socket: zmq.Socket[Any]) -> None:
        socket.curve_secretkey = self.server_secret
        socket.curve_publickey = self.server_public
        socket.curve_server = True

    def client(self, socket: zmq.Socket[Any]) -> None:
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.client_public
        socket.curve_secretkey = self.client_secret


class _AllowClusterKey:
    def __init__(self, key: bytes) -> None:
        self.key = key

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.key


def start_authenticator(ctx: zmq.Context[Any], security: Security) -> ThreadAuthenticator:
    """Run the ZAP handler of ``ctx``: only peers holding the cluster's client key get in."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx, log=logging.getLogger("paramserver.auth"))
    auth.start()
    auth.configure_curve_callback("*", _AllowClusterKey(security.client_public))
    return auth
