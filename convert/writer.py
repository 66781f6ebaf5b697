"""A safetensors shard written streaming: header first (every offset computed up front), then the
tensors' bytes in order, chunk by chunk, hashed on the way. Never holds more than the chunk it is given.

The format is `oss_mlx.safetensors_file`'s; here the data starts on a 4096-byte boundary (a page, for
memory mapping) and the tensors follow back to back in the order given (`ShardWriter.data_start`,
`ShardWriter.offset_of`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from oss_mlx import safetensors_file as st

DATA_ALIGN = 4096


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        return st.nbytes(self.shape, st.NAME_OF[self.dtype])


def build_header(tensors: list[TensorSpec], metadata: dict[str, str] | None = None) -> tuple[bytes, dict]:
    """(the header bytes incl. the 8-byte length, the header dict); tensors laid out in the given order."""
    entries = [(t.name, t.shape, st.NAME_OF[t.dtype]) for t in tensors]
    return st.build_header(entries, metadata, align=DATA_ALIGN)


class ShardWriter:
    """with ShardWriter(path, specs) as w: w.write(name, array) ... in the order of `specs`."""

    def __init__(self, path: Path, tensors: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.tensors = list(tensors)
        head, self.header = build_header(self.tensors, metadata)
        self.data_start = len(head)
        self.size = self.data_start + sum(t.nbytes for t in self.tensors)
        self._sha = hashlib.sha256()
        self._f = open(self.path, "wb")
        self._put(head)
        self._i = 0  # index of the tensor being written
        self._done = 0  # bytes of it written so far

    def _put(self, data) -> None:
        self._f.write(data)
        self._sha.update(data)

    def offset_of(self, name: str) -> int:
        """Absolute file offset of a tensor's first byte."""
        return self.data_start + self.header[name]["data_offsets"][0]

    def write(self, name: str, chunk: mx.array) -> None:
        """Append `chunk` (the next rows of tensor `name`: any leading shape, the tensor's last axis)."""
        t = self.tensors[self._i] if self._i < len(self.tensors) else None
        if t is None or t.name != name:
            raise RuntimeError(f"{self.path.name}: wrote {name!r}, expected {t.name if t else 'nothing'}")
        if chunk.dtype != t.dtype or (t.shape and chunk.shape[-1:] != t.shape[-1:]):
            raise RuntimeError(
                f"{name}: chunk {chunk.dtype} {list(chunk.shape)} does not fit {t.dtype} {list(t.shape)}"
            )
        chunk = mx.contiguous(chunk)
        mx.eval(chunk)
        view = memoryview(chunk)
        if not view.c_contiguous:  # pragma: no cover - mx.contiguous guarantees it
            raise RuntimeError(f"{name}: chunk is not row-contiguous")
        if self._done + view.nbytes > t.nbytes:
            raise RuntimeError(f"{name}: more bytes than its shape {list(t.shape)} holds")
        self._put(view)
        self._done += view.nbytes
        if self._done == t.nbytes:
            self._i += 1
            self._done = 0

    def close(self) -> str:
        """Check every byte was written, flush to disk; returns the file's sha256."""
        if self._i != len(self.tensors):
            raise RuntimeError(f"{self.path.name}: closed before {self.tensors[self._i].name} was written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._sha.hexdigest()

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def sha256_file(path: Path, block: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()
