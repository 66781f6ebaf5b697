"""Parts of safetensors tensors read straight from their files: only the bytes asked for.

A safetensors tensor is stored row-major from `Header.offset(name)` (safetensors_file.py), so rows
[a, b) along axis 0 are one contiguous byte range. Expert streaming reads one expert at a time this
way (streaming.py); a distributed rank reads only its experts, heads and vocabulary rows
(distributed/shard_load.py): `mx.load` would read a whole tensor as soon as any part of it is evaluated.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import mlx.core as mx

from . import safetensors_file as st
from .errors import CheckpointError

Headers = dict[Path, st.Header]


def header_of(path: Path, cache: Headers) -> st.Header:
    """The checked header of a safetensors file, read once per cache."""
    if path not in cache:
        cache[path] = st.read_header(path)
    return cache[path]


def pread_into(fd: int, view: memoryview, pos: int, path: Path | str, what: str) -> None:
    """Fill the byte view from file offset `pos` (pread may return short reads: signals, network
    filesystems); `what` names the read in the error."""
    done = 0
    while done < view.nbytes:
        n = os.preadv(fd, [view[done:]], pos + done)
        if n <= 0:
            raise OSError(f"{path}: unexpected end of file reading {what} at {pos + done}")
        done += n


def read_rows(path: Path, name: str, ranges: list[range], headers: Headers) -> mx.array:
    """Rows `ranges` of tensor `name` (along axis 0, concatenated in the order given) as one array,
    read into MLX's memory directly (no intermediate copy)."""
    header = header_of(path, headers)
    info = header.tensors.get(name)
    if info is None:
        raise CheckpointError(f"{path}: no tensor {name!r}")
    dtype = st.MLX_DTYPES.get(info["dtype"])
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which MLX cannot hold")
    shape = tuple(info["shape"])
    if not shape:
        raise CheckpointError(f"{path}: tensor {name!r} is a scalar; it has no rows to read")
    row = math.prod(shape[1:]) * dtype.size
    for r in ranges:
        if r.step != 1 or r.start < 0 or r.stop > shape[0] or r.start > r.stop:
            raise ValueError(f"rows {r} of {name!r} (shape {list(shape)})")
    rows = sum(len(r) for r in ranges)
    out = mx.zeros((rows, *shape[1:]), dtype)
    mx.eval(out)
    if rows == 0 or row == 0:
        return out
    view = memoryview(out).cast("B")  # MLX's buffer, writable: the file's bytes go straight in
    base = header.offset(name)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        at = 0
        for r in ranges:
            n = len(r) * row
            pread_into(
                fd, view[at : at + n], base + r.start * row, path, f"rows {r.start}-{r.stop - 1} of {name}"
            )
            at += n
    finally:
        os.close(fd)
    return out
