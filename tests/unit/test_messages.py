"""The TypedDicts of the messages and the wire schema describe the same fields."""

from __future__ import annotations

import typing

from paramserver.wire.messages import MESSAGES
from paramserver.wire.protocol import SCHEMA


def test_every_kind_has_a_typed_message_with_the_schema_fields() -> None:
    assert set(MESSAGES) == set(SCHEMA)
    for kind, cls in MESSAGES.items():
        hints = typing.get_type_hints(cls)
        assert set(hints) - {"kind", "id"} == set(SCHEMA[kind]), kind
        required = {f for f, (_, req) in SCHEMA[kind].items() if req} | {"kind", "id"}
        assert cls.__required_keys__ == required, kind  # type: ignore[attr-defined]
        assert typing.get_args(hints["kind"]) == (kind,)
