"""What the server keeps between requests: stored responses and chat completions, in memory.

One :class:`ObjectStore` for both APIs, bounded by count (``--max-stored-responses``) and by size
(``--max-stored-bytes``), least recently used dropped first. Sizes are those of the objects written
as JSON, which is what a client could make large; Python's own per-object overhead comes on top.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from typing import Any

log = logging.getLogger("oss_mlx.server")


def json_size(*objects: Any) -> int:
    """Bytes of ``objects`` written as JSON (dataclasses such as harmony messages as their fields)."""

    def fields(o: Any) -> Any:
        if is_dataclass(o) and not isinstance(o, type):
            return asdict(o)
        raise TypeError(f"{type(o).__name__} is not JSON")

    return sum(len(json.dumps(o, ensure_ascii=False, default=fields).encode()) for o in objects)


class ObjectStore:
    """Objects by id, at most ``max_items`` of them and ``max_bytes`` in all."""

    def __init__(self, max_items: int, max_bytes: int):
        self.max_items = max(0, max_items)
        self.max_bytes = max(0, max_bytes)
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: str, value: Any, size: int) -> bool:
        """Keep ``value`` (``size`` bytes), dropping the least recently used to make room. An object
        larger than the whole budget is not kept (False)."""
        self.delete(key)
        if self.max_items == 0 or size > self.max_bytes:
            if self.max_items:
                log.warning("not stored: %s is %d bytes, more than --max-stored-bytes", key, size)
            return False
        self._items[key] = (value, size)
        self.bytes += size
        while len(self._items) > self.max_items or self.bytes > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self.bytes -= dropped
        return True

    def get(self, key: str) -> Any | None:
        entry = self._items.get(key)
        if entry is None:
            return None
        self._items.move_to_end(key)
        return entry[0]

    def resize(self, key: str, size: int) -> None:
        """``key``'s object changed (its metadata was updated): account for its new size."""
        value, old = self._items[key]
        self._items[key] = (value, size)
        self.bytes += size - old

    def delete(self, key: str) -> bool:
        entry = self._items.pop(key, None)
        if entry is None:
            return False
        self.bytes -= entry[1]
        return True

    def values(self) -> Iterator[Any]:
        """Every object, least recently used first (a snapshot: safe to delete while iterating)."""
        return iter([v for v, _ in self._items.values()])


def page(items: list[dict], after: str | None, limit: int, order: str) -> dict:
    """One page of an OpenAI list (``{"object": "list", "data", "first_id", "last_id", "has_more"}``):
    ``items`` in ascending order, each with an ``id``; ``after`` an id from the previous page."""
    if order == "desc":
        items = items[::-1]
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    data = items[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(items) > limit,
    }
