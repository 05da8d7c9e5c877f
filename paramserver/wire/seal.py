"""Sealed records: the bulk channel's encryption when a cluster token is set.

With a token, every ZeroMQ socket uses CURVE; the bulk channel then carries its payloads as
AES-256-GCM records (the optional ``cryptography`` package: ``pip install
'paramserver[secure]'``; without it a token turns the bulk channel off, as before). The key is
derived per ticket from the cluster secret, so each connection has a key of its own, known only
to nodes that hold the token; a worker proves it holds the key in its hello. Each direction of
a connection numbers its records, and a record's nonce is its direction and its number: a
record tampered with, replayed, dropped or moved fails authentication, and the payload it
belongs to is refused whole (the connection is closed: it is out of step).

A payload of n bytes travels as ceil(n / RECORD) records, each a 4-byte length (little-endian,
authenticated as the record's associated data), its ciphertext and a 16-byte tag: the length
lets the receiving connection's reader thread open each record as it arrives, before the
header saying which payload it belongs to is there (a record never spans two payloads).

Example:
    key = ticket_key(secret, ticket)
    out, back = Seal(key, WORKER_TO_SERVER), Seal(key, WORKER_TO_SERVER)
    back.open(out.seal(memoryview(b"x" * 10), bytearray(30)), memoryview(bytearray(10)))
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from typing import Any

__all__ = [
    "HEAD",
    "RECORD",
    "SERVER_TO_WORKER",
    "TAG",
    "WORKER_TO_SERVER",
    "Seal",
    "available",
    "hello_tag",
    "record_length",
    "ticket_key",
    "verify_hello",
    "wire_size",
]

RECORD = 256 << 10  # plaintext bytes per record
TAG = 16
HEAD = 4  # a record's length field
WORKER_TO_SERVER, SERVER_TO_WORKER = 0, 1


@functools.cache
def available() -> bool:
    """Whether the ``cryptography`` package (AES-GCM) can be imported here."""
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: F401
    except ImportError:
        return False
    return True


def ticket_key(secret: bytes, ticket: int) -> bytes:
    """The 32-byte key of the connection opened with ``ticket``, from the cluster ``secret``."""
    base = hashlib.blake2b(secret, digest_size=32, person=b"ps-bulk-key").digest()
    return hashlib.blake2b(
        ticket.to_bytes(8, "little"), key=base, digest_size=32, person=b"ps-bulk-tkt"
    ).digest()


def wire_size(n: int) -> int:
    """The bytes a payload of ``n`` takes on the connection, sealed (a length and a tag per
    record)."""
    return n + -(-n // RECORD) * (HEAD + TAG)


def record_length(head: memoryview, number: int) -> int:
    """The plaintext bytes of the record whose length field is ``head``; ConnectionError if no
    record can be that long (the stream is out of step, or not sealed by a peer)."""
    n = int.from_bytes(head, "little")
    if not 0 < n <= RECORD:
        raise ConnectionError(
            f"record {number} claims {n} bytes (1 to {RECORD} are possible): the stream is out "
            "of step, or not sealed by a node with the token"
        )
    return n


def hello_tag(key: bytes) -> bytes:
    """What a worker shows in its hello to prove it derived the connection's key."""
    return hashlib.blake2b(b"hello", key=key, digest_size=TAG, person=b"ps-bulk-hi").digest()


def verify_hello(key: bytes, tag: bytes) -> bool:
    return hmac.compare_digest(hello_tag(key), tag)


class Seal:
    """AES-256-GCM records of one direction of one connection, numbered from 0."""

    def __init__(self, key: bytes, direction: int) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.aead: Any = AESGCM(key)
        self.prefix = bytes([direction, 0, 0, 0])
        self.count = 0

    def _nonce(self) -> bytes:
        nonce = self.prefix + self.count.to_bytes(8, "little")
        self.count += 1
        return nonce

    def seal(self, plain: memoryview, out: bytearray | memoryview) -> memoryview:
        """The next record: ``plain`` (1 to RECORD bytes) sealed into ``out`` (its length,
        ciphertext and tag: HEAD + plain.nbytes + TAG bytes)."""
        view = memoryview(out)[: HEAD + plain.nbytes + TAG]
        head = plain.nbytes.to_bytes(HEAD, "little")
        view[:HEAD] = head
        self.aead.encrypt_into(self._nonce(), plain, head, view[HEAD:])
        return view

    def open(self, record: memoryview, out: memoryview) -> None:
        """Check the next ``record`` (length, ciphertext, tag) and write its plaintext into
        ``out`` (``record.nbytes - HEAD - TAG`` bytes; nothing there is to be used unless this
        returns); ConnectionError if it fails authentication."""
        from cryptography.exceptions import InvalidTag

        number = self.count
        try:
            self.aead.decrypt_into(self._nonce(), record[HEAD:], bytes(record[:HEAD]), out)
        except InvalidTag:
            raise ConnectionError(
                f"record {number} failed authentication (tampered with, replayed, dropped or "
                "out of order, or sealed with another token)"
            ) from None
