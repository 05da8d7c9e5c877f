"""The checks of the wire schema's field values (:data:`paramserver.wire.protocol.SCHEMA`):
each a predicate that says whether a decoded header value may stand in a field.

Example:
    RANK(3), NAME("emb"), int_in(1, 10)(11)   # True, True, False
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "MAX_GROUP",
    "NAME",
    "RANK",
    "U63",
    "Check",
    "int_in",
    "is_bool",
    "is_map",
    "is_number",
    "is_status",
    "is_timeout",
    "optional",
    "rank_list",
    "str_up_to",
    "table_names",
]

Check = Callable[[Any], bool]


def int_in(lo: int, hi: int) -> Check:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def str_up_to(max_len: int) -> Check:
    return lambda v: isinstance(v, str) and 0 < len(v) <= max_len


def is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def is_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) for k in v)


def is_timeout(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def is_status(v: Any) -> bool:
    """A coordinator's status map: its sections have the types paramserver.metrics reads."""
    return (
        is_map(v)
        and all(isinstance(v.get(k), list) for k in ("nodes", "tables", "servers"))
        and all(is_map(n) for k in ("nodes", "tables", "servers") for n in v[k])
        and is_map(v.get("staleness"))
        and is_map(v.get("buckets"))
    )


def optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


U63 = int_in(0, (1 << 63) - 1)
RANK = int_in(0, 1 << 20)
NAME = str_up_to(128)
MAX_GROUP = 1024  # tables in one pull_many / push_many


def table_names(v: Any) -> bool:
    return (
        isinstance(v, list)
        and 0 < len(v) <= MAX_GROUP
        and all(NAME(n) for n in v)
        and len(set(v)) == len(v)
    )


def rank_list(v: Any) -> bool:
    return (
        isinstance(v, list)
        and 0 < len(v) <= 1 << 16
        and all(isinstance(r, int) and not isinstance(r, bool) and RANK(r) for r in v)
    )
