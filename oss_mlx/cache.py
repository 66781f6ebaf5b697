"""KV caches: a growing cache for full-attention layers, a bounded one for sliding-window layers.

Why our own and not mlx-lm's: mlx-lm's RotatingKVCache cannot be trimmed once it wrapped, so a
chat that drops the previous turn's analysis (as harmony requires) must re-process the whole
history. Here a sliding layer keeps only the last `window - 1` keys (all a future query can see),
and `mark()` remembers that small state at turn boundaries; MLX arrays are immutable, so a mark is
a reference, not a copy. `rewind_to(offset)` then works at any marked offset, however far back.
The state before the latest update is kept too, so an interrupted step (Ctrl-C) can be undone.
"""

from __future__ import annotations

import mlx.core as mx


class CacheRewindError(RuntimeError):
    """The cache cannot be rewound to the requested offset (no mark there)."""


class FullCache:
    """All keys and values, in a buffer that grows in steps (amortised appends)."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append [B, H, T, D] keys/values; return everything cached so far."""
        start, t = self.offset, keys.shape[2]
        if self.keys is None or start + t > self.keys.shape[2]:
            grow = ((t + self.step - 1) // self.step) * self.step
            shape = (*keys.shape[:2], grow, keys.shape[3])
            new_k, new_v = mx.zeros(shape, keys.dtype), mx.zeros(shape, values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :start, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :start, :], new_v], axis=2)
        self.keys[..., start : start + t, :] = keys
        self.values[..., start : start + t, :] = values
        self.offset = start + t
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def mark(self) -> None:
        pass  # every offset can be returned to by trimming

    def can_rewind_to(self, offset: int) -> bool:
        return 0 <= offset <= self.offset

    def rewind_to(self, offset: int) -> None:
        if not self.can_rewind_to(offset):
            raise CacheRewindError(f"cannot rewind a cache at {self.offset} to {offset}")
        self.offset = offset

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return 2 * self.keys[..., : self.offset, :].nbytes


class WindowCache:
    """The last `window - 1` keys and values of a sliding-window layer, plus marks."""

    # A mark costs (window - 1) keys and values per sliding layer (~3 MB for the 20b); a chat marks
    # a few places per turn, so only the most recent ones are kept (older turns re-prefill).
    max_marks = 24

    def __init__(self, window: int) -> None:
        self.window = window
        self.keys: mx.array | None = None  # [B, H, n, D], n <= window - 1 between calls
        self.values: mx.array | None = None
        self.offset = 0
        self._marks: dict[int, tuple[mx.array | None, mx.array | None]] = {}
        self._before_last: tuple[int, mx.array | None, mx.array | None] = (0, None, None)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Return the kept keys followed by the new ones; the caller masks by position."""
        self._before_last = (self.offset, self.keys, self.values)
        if self.keys is None:
            all_k, all_v = keys, values
        else:
            all_k = mx.concatenate([self.keys, keys], axis=2)
            all_v = mx.concatenate([self.values, values], axis=2)
        self.offset += keys.shape[2]
        keep = self.window - 1
        self.keys, self.values = all_k[..., -keep:, :], all_v[..., -keep:, :]
        return all_k, all_v

    def kept(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def mark(self) -> None:
        self._marks[self.offset] = (self.keys, self.values)
        while len(self._marks) > self.max_marks:
            del self._marks[min(self._marks)]

    def can_rewind_to(self, offset: int) -> bool:
        if offset in self._marks or offset in (0, self.offset, self._before_last[0]):
            return True
        # The kept keys cover positions [offset - kept, offset); rewinding needs the last
        # min(target, window - 1) of them before the target.
        first = self.offset - self.kept()
        return 0 <= offset <= self.offset and offset - min(offset, self.window - 1) >= first

    def rewind_to(self, offset: int) -> None:
        if offset == self.offset:
            return
        if offset in self._marks:
            self.keys, self.values = self._marks[offset]
        elif offset == 0:
            self.keys = self.values = None
        elif offset == self._before_last[0]:
            _, self.keys, self.values = self._before_last
        elif self.can_rewind_to(offset):
            cut = self.offset - offset
            self.keys, self.values = (
                self.keys[..., : self.kept() - cut, :],
                self.values[..., : self.kept() - cut, :],
            )
            if self.kept() == 0:
                self.keys = self.values = None
        else:
            raise CacheRewindError(
                f"sliding-window cache at {self.offset} has no mark at {offset} "
                f"(marks: {sorted(self._marks)}); call mark() at turn boundaries"
            )
        self.offset = offset
        self._marks = {k: v for k, v in self._marks.items() if k <= offset}
        self._before_last = (offset, self.keys, self.values)

    @property
    def nbytes(self) -> int:
        own = 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
        marks = sum(k.nbytes + v.nbytes for k, v in self._marks.values() if k is not None)
        return own + marks


class ModelCache:
    """One cache per layer, moved together (the model's `make_cache()` returns this)."""

    def __init__(self, layers: list[FullCache | WindowCache]) -> None:
        self.layers = layers

    def __getitem__(self, i: int) -> FullCache | WindowCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    @property
    def offset(self) -> int:
        return self.layers[0].offset if self.layers else 0

    def mark(self) -> None:
        """Remember this offset as a place to come back to (a turn boundary)."""
        for c in self.layers:
            c.mark()

    def can_rewind_to(self, offset: int) -> bool:
        return all(c.can_rewind_to(offset) for c in self.layers)

    def rewind_point(self, limit: int) -> int:
        """The largest offset <= limit this cache can be rewound to (0 always works)."""
        candidates = {limit, *(m for c in self.layers if isinstance(c, WindowCache) for m in c._marks)}
        return max((o for o in candidates if o <= limit and self.can_rewind_to(o)), default=0)

    def rewind_to(self, offset: int) -> None:
        """Forget everything after `offset` tokens; raises CacheRewindError if impossible."""
        if not self.can_rewind_to(offset):
            raise CacheRewindError(
                f"cannot rewind the cache from {self.offset} to {offset}: sliding-window layers keep "
                "only their last window of keys; call mark() at offsets you may return to"
            )
        for c in self.layers:
            c.rewind_to(offset)

    def arrays(self) -> list[mx.array]:
        """Arrays to evaluate so the cache state is materialised."""
        out = []
        for c in self.layers:
            if c.keys is not None:
                out += [c.keys, c.values]
        return out

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)
