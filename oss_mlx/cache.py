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

    # A compiled decode step is traced once per buffer shape: the buffer grows by this many positions
    # ahead of decoding (one retrace per 1,024 tokens decoded).
    decode_step = 1024

    def decode_state(self, row: tuple[int, int, int], dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """The whole buffer for a decode step at position `offset`, grown first if it is full (the
        decode attention reads positions [0, offset] of it; the rest is never read). row: the
        (batch, heads, head_dim) of one position."""
        if self.keys is None or self.offset + 1 > self.keys.shape[2]:
            grow = max(self.decode_step, self.offset + 1 - (0 if self.keys is None else self.keys.shape[2]))
            grow = -(-grow // self.decode_step) * self.decode_step
            shape = (row[0], row[1], grow, row[2])
            new_k, new_v = mx.zeros(shape, dtype), mx.zeros(shape, dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys, new_k], axis=2)
                self.values = mx.concatenate([self.values, new_v], axis=2)
        return self.keys, self.values

    def commit_decode(self, keys: mx.array, values: mx.array) -> None:
        """Take the buffer a decode step wrote position `offset` into."""
        self.keys, self.values = keys, values
        self.offset += 1

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
    """A sliding-window layer's keys and values in a ring of `window` slots, plus marks.

    Position p lives in slot p % window: a decode step writes one slot in place (a fixed shape, which
    the compiled decode step needs) and the decode kernel attends every filled slot, as attention
    does not depend on the keys' order. Positions [lo, offset) are held; a query at q needs
    [q - window + 1, q], so rewinding to t needs lo <= max(0, t - window + 1): the last decode step can
    always be undone.
    """

    # A mark costs a ring of keys and values per sliding layer (~3 MB for the 20b); a chat marks a few
    # places per turn, so only the most recent ones are kept (older turns re-prefill).
    max_marks = 24

    def __init__(self, window: int) -> None:
        self.window = window
        self.keys: mx.array | None = None  # [B, H, window, D] ring
        self.values: mx.array | None = None
        self.offset = 0
        self.lo = 0  # oldest position still held
        self._marks: dict[int, tuple[int, mx.array | None, mx.array | None]] = {}
        self._before_last: tuple[int, int, mx.array | None, mx.array | None] = (0, 0, None, None)

    def kept(self) -> int:
        """Keys a future query can still see: at most window - 1."""
        return min(self.offset - self.lo, self.window - 1)

    def _ordered(self) -> tuple[mx.array, mx.array] | None:
        """The kept keys and values in position order (None when there are none)."""
        n = self.kept()
        if n == 0 or self.keys is None:
            return None
        slots = mx.array([p % self.window for p in range(self.offset - n, self.offset)], dtype=mx.uint32)
        return mx.take(self.keys, slots, axis=2), mx.take(self.values, slots, axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Return the kept keys followed by the new ones, in order; the caller masks by position.
        One token into a full ring is written in place and the ring returned (the window exactly:
        attention does not depend on the keys' order), two ops instead of a reordering."""
        self._before_last = (self.offset, self.lo, self.keys, self.values)
        if keys.shape[2] == 1 and self.keys is not None and self.kept() == self.window - 1:
            # A new array, not `self.keys[...] = keys`: that would change the array a mark holds.
            slot = mx.array([self.offset % self.window])
            self.keys = mx.slice_update(self.keys, keys, slot, axes=(2,))
            self.values = mx.slice_update(self.values, values, slot, axes=(2,))
            self.offset += 1
            self.lo = max(self.lo, self.offset - self.window)
            return self.keys, self.values
        kept = self._ordered()
        all_k, all_v = (
            (keys, values)
            if kept is None
            else (
                mx.concatenate([kept[0], keys], axis=2),
                mx.concatenate([kept[1], values], axis=2),
            )
        )
        end = self.offset + keys.shape[2]
        n = min(self.window, all_k.shape[2])
        first = end - n  # the ring holds positions [first, end)
        tail_k, tail_v = all_k[..., -n:, :], all_v[..., -n:, :]
        if n == self.window:
            shift = first % self.window
            self.keys, self.values = mx.roll(tail_k, shift, axis=2), mx.roll(tail_v, shift, axis=2)
        else:  # fewer positions than slots: first == 0, slot p holds position p
            pad = [(0, 0), (0, 0), (0, self.window - n), (0, 0)]
            self.keys, self.values = mx.pad(tail_k, pad), mx.pad(tail_v, pad)
        self.offset, self.lo = end, first
        return all_k, all_v

    def decode_state(self, row: tuple[int, int, int], dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """The ring for a decode step (allocated on first use; row: (batch, heads, head_dim))."""
        if self.keys is None:
            shape = (row[0], row[1], self.window, row[2])
            self.keys, self.values = mx.zeros(shape, dtype), mx.zeros(shape, dtype)
        return self.keys, self.values

    def commit_decode(self, keys: mx.array, values: mx.array) -> None:
        """Take the ring a decode step wrote position `offset` into."""
        self.keys, self.values = keys, values
        self.offset += 1
        self.lo = max(self.lo, self.offset - self.window)

    def mark(self) -> None:
        self._marks[self.offset] = (self.lo, self.keys, self.values)
        while len(self._marks) > self.max_marks:
            del self._marks[min(self._marks)]

    def can_rewind_to(self, offset: int) -> bool:
        if offset in self._marks or offset in (0, self.offset, self._before_last[0]):
            return True
        return 0 <= offset <= self.offset and self.lo <= max(0, offset - self.window + 1)

    def rewind_to(self, offset: int) -> None:
        if offset == self.offset:
            return
        if offset in self._marks:
            self.lo, self.keys, self.values = self._marks[offset]
        elif offset == 0:
            self.keys = self.values = None
            self.lo = 0
        elif offset == self._before_last[0]:
            _, self.lo, self.keys, self.values = self._before_last
        elif not self.can_rewind_to(offset):
            raise CacheRewindError(
                f"sliding-window cache at {self.offset} has no mark at {offset} "
                f"(marks: {sorted(self._marks)}); call mark() at turn boundaries"
            )
        # else: the ring still holds [lo, offset); slots past it are overwritten before being read
        self.offset = offset
        self._marks = {k: v for k, v in self._marks.items() if k <= offset}
        self._before_last = (offset, self.lo, self.keys, self.values)

    @property
    def nbytes(self) -> int:
        own = 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
        marks = sum(k.nbytes + v.nbytes for _, k, v in self._marks.values() if k is not None)
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
