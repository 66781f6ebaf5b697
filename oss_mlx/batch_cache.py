"""The decode batch's keys and values: every decoding sequence as a row of one buffer per layer.

A full-attention layer holds [2, R, Hkv, S, D] (keys, then values) for R rows; a sliding-window
layer holds a ring [2, R, Hkv, window, D], position p of a row in slot p % window. Each row has its
own length (its next position): the compiled decode step (decode.py) writes every row's new key and
value at that row's position and attends, per row, the positions written so far. Shapes only change
when rows are added or removed past a bucket (R: 1, 2, 4, 8, ...) or a row outgrows S (the full
layers grow by GROW positions), so the step is traced again rarely, not when a sequence joins.

A sequence is prefilled in its own ModelCache (cache.py: marks, rewinding, the prefix a Session
reuses) and joins the batch with what it holds; when it leaves, its row goes back into that cache.
Why copy rather than prefill in place: the prefill is then exactly a single sequence's (same chunks,
same results), the per-sequence cache keeps its marks for the next turn, and the copy is
O(context) once per request against the prefill's O(context) compute. A lone sequence is moved, not
copied: an empty batch takes its cache's buffers as they are and gives them back the same way, so
one stream costs what it cost before the batch existed.

Rows past the sequences (R above their count) are computed and ignored: their position stays 0.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import mlx.core as mx

from . import kernels
from .cache import FullCache, ModelCache

GROW = 1024  # full layers' buffers grow by this many positions: one retrace of the step per 1,024
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def row_bucket(n: int) -> int:
    """The batch's row count for n sequences."""
    for b in ROW_BUCKETS:
        if b >= n:
            return b
    raise ValueError(f"a decode batch holds at most {ROW_BUCKETS[-1]} sequences (asked for {n})")


def grown(size: int, need: int) -> int:
    """A full layer's buffer length once it holds `need` positions: grown by GROW at a time."""
    return size if need <= size else size + GROW * -(-(need - size) // GROW)


class BatchCache:
    """The rows of the decode batch, their lengths, and the per-layer buffers (see the module doc)."""

    def __init__(self, windows: Sequence[int | None], kv_heads: int, head_dim: int, dtype: mx.Dtype):
        self.windows = list(windows)  # per layer: its sliding window, None for full attention
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.buffers: list[mx.array] | None = None  # None: no rows
        self.keys: list[Hashable | None] = []  # row -> who occupies it (None: free)
        self.caches: list[ModelCache | None] = []  # row -> the cache it came from and returns to
        self.lengths: list[int] = []  # row -> positions held (its next position)
        self._positions: mx.array | None = None  # device_ints(lengths), advanced each step
        self._advance: mx.array | None = None  # 1 for occupied rows, 0 for free ones

    @classmethod
    def for_model(cls, model) -> BatchCache:
        attn = model.blocks[0].attn
        return cls([b.attn.window for b in model.blocks], attn.num_kv_heads, attn.head_dim, model.dtype)

    # ---- rows -----------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """R: the buffers' row count (sequences plus free rows)."""
        return len(self.keys)

    @property
    def size(self) -> int:
        """Sequences in the batch."""
        return sum(k is not None for k in self.keys)

    @property
    def length(self) -> int:
        """S: the full layers' buffer length (0 without rows or full layers)."""
        full = [b for b, w in zip(self.buffers or [], self.windows) if w is None]
        return full[0].shape[3] if full else 0

    def row(self, key: Hashable) -> int:
        return self.keys.index(key)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.keys

    def shape_after_join(self, offset: int, held: int = 0) -> tuple[int, int]:
        """(R, S) the buffers will have once a sequence of `offset` positions joins and the next step
        makes room for one more (for tracing the step ahead); held: its full layers' buffer length."""
        if self.buffers is None:
            return 1, grown(held, offset + 1)
        rows = self.rows if self.size < self.rows else row_bucket(self.size + 1)
        longest = max([offset, *(n for k, n in zip(self.keys, self.lengths) if k is not None)])
        return rows, grown(self.length, longest + 1)

    def join(self, key: Hashable, cache: ModelCache) -> int:
        """Take a sequence's cache (B = 1) into a free row (the batch grows a bucket if none is free)
        and return the row. The cache keeps its offsets and marks; its buffers now live here."""
        if key in self.keys:
            raise ValueError("this sequence is in the batch already")
        n = cache.offset
        held = [layer.held() for layer in cache]
        if any(h is not None and h.shape[1] != 1 for h in held):
            raise ValueError("a decode batch takes caches of one sequence (batch 1)")
        if self.buffers is None:  # the first row: move the buffers in as they are
            self.buffers = [h if h is not None else self._empty(1, w, 0) for h, w in zip(held, self.windows)]
            self.keys, self.caches, self.lengths = [key], [cache], [n]
            self._fit(n + 1)
            row = 0
        else:
            if None not in self.keys:
                self._resize(row_bucket(self.size + 1))
            row = self.keys.index(None)
            self._fit(n + 1)
            for i, (h, w) in enumerate(zip(held, self.windows)):
                if h is None:
                    continue  # nothing written yet: the step masks every slot it has not written
                part = h if w is not None else h[..., :n, :]
                self.buffers[i] = mx.slice_update(
                    self.buffers[i], part.astype(self.dtype), mx.array([0, row]), (0, 1)
                )
            self.keys[row], self.caches[row], self.lengths[row] = key, cache, n
        for layer in cache:
            layer.adopt(None, n)  # the batch holds its keys and values until it leaves
        self._rows_changed()
        return row

    def leave(self, key: Hashable) -> ModelCache:
        """Hand a sequence's row back to the cache it came from (its offsets now include what the
        batch decoded) and free the row; returns that cache."""
        row = self.row(key)
        cache, n = self.caches[row], self.lengths[row]
        if self.size == 1 and self.rows == 1:  # the last row: the buffers go back as they are
            parts = self.buffers
            self.buffers = None
            self.keys, self.caches, self.lengths = [], [], []
        else:
            keep = min(self.length, -(-n // FullCache.step) * FullCache.step)
            parts = [
                mx.contiguous(b[:, row : row + 1] if w is not None else b[:, row : row + 1, :, :keep])
                for b, w in zip(self.buffers, self.windows)
            ]
            # Now, not lazily: a buffer still referenced by a slice cannot be written in place, and
            # the next step would copy all of it.
            mx.eval(parts)
            self.keys[row], self.caches[row], self.lengths[row] = None, None, 0
            if self.size == 0:
                self.buffers = None
                self.keys, self.caches, self.lengths = [], [], []
            elif row_bucket(self.size) < self.rows:
                self._resize(row_bucket(self.size))
        for layer, part in zip(cache, parts):
            layer.adopt(part, n)
        self._rows_changed()
        return cache

    # ---- the step ---------------------------------------------------------------------------------

    def positions(self) -> mx.array:
        """int32 [R]: each row's next position (0 for free rows)."""
        return self._positions[: self.rows]

    def state(self) -> list[mx.array]:
        """Each layer's buffer for the next step, the full layers grown first where a row's next
        position does not fit."""
        self._fit(max(self.lengths) + 1)
        return self.buffers

    def commit(self, written: list[mx.array]) -> None:
        """Take the buffers a step wrote each row's position into; every sequence advanced one."""
        self.buffers = written
        self.lengths = [n + (k is not None) for k, n in zip(self.keys, self.lengths)]
        self._positions = self._positions + self._advance

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers or [])

    # ---- shapes -----------------------------------------------------------------------------------

    def _empty(self, rows: int, window: int | None, length: int) -> mx.array:
        return mx.zeros((2, rows, self.kv_heads, window or length, self.head_dim), self.dtype)

    def _fit(self, need: int) -> None:
        """Grow the full layers' buffers to hold `need` positions."""
        for i, (b, w) in enumerate(zip(self.buffers, self.windows)):
            if w is None and b.shape[3] < need:
                more = grown(b.shape[3], need) - b.shape[3]
                self.buffers[i] = mx.concatenate([b, self._empty(b.shape[1], None, more)], axis=3)

    def _resize(self, rows: int) -> None:
        """`rows` rows: added free at the end, or the sequences packed into the first ones (and the
        full layers cut to what the longest needs)."""
        if rows > self.rows:
            extra = rows - self.rows
            self.buffers = [
                mx.concatenate([b, self._empty(extra, w, b.shape[3])], axis=1)
                for b, w in zip(self.buffers, self.windows)
            ]
            self.keys += [None] * extra
            self.caches += [None] * extra
            self.lengths += [0] * extra
            return
        used = [r for r, k in enumerate(self.keys) if k is not None]
        order = used + [r for r, k in enumerate(self.keys) if k is None][: rows - len(used)]
        index = mx.array(order)
        need = grown(0, max(self.lengths[r] for r in used) + 1)
        self.buffers = [
            mx.take(b, index, axis=1)[..., : min(b.shape[3], need), :]
            if w is None
            else mx.take(b, index, axis=1)
            for b, w in zip(self.buffers, self.windows)
        ]
        self.keys = [self.keys[r] for r in order]
        self.caches = [self.caches[r] for r in order]
        self.lengths = [self.lengths[r] for r in order]

    def _rows_changed(self) -> None:
        self._positions = kernels.device_ints(self.lengths)
        self._advance = kernels.device_ints([int(k is not None) for k in self.keys])
