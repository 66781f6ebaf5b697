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


class _JointKV:
    """Keys and values held in one buffer `kv` [2, B, H, S, D] (keys, then values), so a decode step
    writes its key and value rows with one scatter: a launch per layer fewer, and at batch 1 the step
    is bound by launches (docs/PERFORMANCE.md). `keys` and `values` are views of it: always index it
    as kv[i, ...] - a bare kv[i] is a gather in MLX 0.32, a copy of the whole buffer."""

    kv: mx.array | None = None

    @property
    def keys(self) -> mx.array | None:
        return None if self.kv is None else self.kv[0, ...]

    @property
    def values(self) -> mx.array | None:
        return None if self.kv is None else self.kv[1, ...]

    def update_and_fetch(self, keys: mx.array, values: mx.array, **fetch) -> tuple[mx.array, mx.array]:
        """Append [B, H, T, D] keys and values (update_and_fetch_kv with the two stacked)."""
        return self.update_and_fetch_kv(mx.stack([keys, values.astype(keys.dtype)]), **fetch)

    def update_and_fetch_kv(self, kv: mx.array) -> tuple[mx.array, mx.array]:
        raise NotImplementedError


class FullCache(_JointKV):
    """All keys and values, in a buffer that grows in steps (amortised appends)."""

    step = 256

    def __init__(self) -> None:
        self.kv: mx.array | None = None
        self.offset = 0

    def update_and_fetch_kv(self, kv: mx.array, keys_to: int | None = None) -> tuple[mx.array, mx.array]:
        """Append [2, B, H, T, D] keys and values; return everything cached so far (keys, values).

        keys_to: return the first `keys_to` positions instead (at least the cached ones; those past
        them hold zeros or older keys), row-contiguous whatever the buffer's size, so that their shape
        and strides depend on keys_to alone (attention.QueryBlock: one attention graph per block)."""
        start, t = self.offset, kv.shape[3]
        need = start + t if keys_to is None else max(start + t, keys_to)
        if self.kv is None or need > self.kv.shape[3]:
            # to the block's end exactly (its keys are then the whole buffer: no copy), else in steps
            grow = keys_to - start if keys_to is not None else -(-t // self.step) * self.step
            new = mx.zeros((*kv.shape[:3], grow, kv.shape[4]), kv.dtype)
            self.kv = new if self.kv is None else mx.concatenate([self.kv[..., :start, :], new], axis=3)
        self.kv[..., start : start + t, :] = kv
        self.offset = start + t
        n = self.offset if keys_to is None else keys_to
        keys, values = self.kv[0, ..., :n, :], self.kv[1, ..., :n, :]
        if keys_to is not None and self.kv.shape[3] != n:
            keys, values = mx.contiguous(keys), mx.contiguous(values)
        return keys, values

    def held(self) -> mx.array | None:
        """The buffer [2, B, H, S, D] whose first `offset` positions are this cache's keys and values
        (the decode batch takes it: batch_cache.py)."""
        return self.kv

    def adopt(self, kv: mx.array | None, offset: int) -> None:
        """Take back a buffer holding `offset` positions (what the decode batch wrote)."""
        self.kv, self.offset = kv, offset

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
        if self.kv is None:
            return 0
        return self.kv[..., : self.offset, :].nbytes


class WindowCache(_JointKV):
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
        self.kv: mx.array | None = None  # [2, B, H, window, D] ring: keys, then values
        self.offset = 0
        self.lo = 0  # oldest position still held
        self._marks: dict[int, tuple[int, mx.array | None]] = {}
        self._before_last: tuple[int, int, mx.array | None] = (0, 0, None)

    def kept(self) -> int:
        """Keys a future query can still see: at most window - 1."""
        return min(self.offset - self.lo, self.window - 1)

    def _ordered(self) -> mx.array | None:
        """The kept keys and values [2, B, H, n, D] in position order (None when there are none)."""
        n = self.kept()
        if n == 0 or self.kv is None:
            return None
        slots = mx.array([p % self.window for p in range(self.offset - n, self.offset)], dtype=mx.uint32)
        return mx.take(self.kv, slots, axis=3)

    def update_and_fetch_kv(self, new: mx.array) -> tuple[mx.array, mx.array]:
        """Take [2, B, H, T, D] keys and values; return the kept keys followed by the new ones, in
        order (keys, values); the caller masks by position. One token into a full ring is written in
        place and the ring returned (the window exactly: attention does not depend on the keys'
        order), one op instead of a reordering."""
        self._before_last = (self.offset, self.lo, self.kv)
        if new.shape[3] == 1 and self.kv is not None and self.kept() == self.window - 1:
            # A new array, not `self.kv[...] = new`: that would change the array a mark holds.
            slot = mx.array([self.offset % self.window])
            self.kv = mx.slice_update(self.kv, new, slot, axes=(3,))
            self.offset += 1
            self.lo = max(self.lo, self.offset - self.window)
            return self.kv[0, ...], self.kv[1, ...]
        kept = self._ordered()
        every = new if kept is None else mx.concatenate([kept, new], axis=3)
        end = self.offset + new.shape[3]
        n = min(self.window, every.shape[3])
        first = end - n  # the ring holds positions [first, end)
        tail = every[..., -n:, :]
        if n == self.window:
            self.kv = mx.roll(tail, first % self.window, axis=3)
        else:  # fewer positions than slots: first == 0, slot p holds position p
            self.kv = mx.pad(tail, [(0, 0), (0, 0), (0, 0), (0, self.window - n), (0, 0)])
        self.offset, self.lo = end, first
        return every[0, ...], every[1, ...]

    def held(self) -> mx.array | None:
        """The ring [2, B, H, window, D], position p in slot p % window (the decode batch takes it:
        batch_cache.py); None before the first position."""
        return self.kv

    def adopt(self, ring: mx.array | None, offset: int) -> None:
        """Take back the ring after the decode batch wrote positions up to `offset` into it."""
        self.kv, self.offset = ring, offset
        self.lo = max(self.lo, offset - self.window)

    def mark(self) -> None:
        self._marks[self.offset] = (self.lo, self.kv)
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
            self.lo, self.kv = self._marks[offset]
        elif offset == 0:
            self.kv = None
            self.lo = 0
        elif offset == self._before_last[0]:
            _, self.lo, self.kv = self._before_last
        elif not self.can_rewind_to(offset):
            raise CacheRewindError(
                f"sliding-window cache at {self.offset} has no mark at {offset} "
                f"(marks: {sorted(self._marks)}); call mark() at turn boundaries"
            )
        # else: the ring still holds [lo, offset); slots past it are overwritten before being read
        self.offset = offset
        self._marks = {k: v for k, v in self._marks.items() if k <= offset}
        self._before_last = (offset, self.lo, self.kv)

    @property
    def nbytes(self) -> int:
        own = 0 if self.kv is None else self.kv.nbytes
        return own + sum(kv.nbytes for _, kv in self._marks.values() if kv is not None)


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
        return [c.kv for c in self.layers if c.kv is not None]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)
