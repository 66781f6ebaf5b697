"""The safetensors file format, in one place: its dtypes, the checked header reader, the header writer.

A file is an 8-byte little-endian header length N, N bytes of JSON header (``name -> {"dtype", "shape",
"data_offsets"}`` plus an optional ``__metadata__`` of strings), then the tensors' bytes; a tensor's
bytes are at file offset ``8 + N + data_offsets[0]``. The loader, expert streaming, the converter's
writer and the synthetic checkpoints all read and write it through this module.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from .errors import CheckpointError


class Dtype(NamedTuple):
    """One safetensors dtype: its bytes per element, the MLX dtype (None: MLX cannot read it) and the
    numpy dtype holding its bytes (bfloat16, which numpy lacks, as its uint16 bit patterns)."""

    itemsize: int
    mlx: mx.Dtype | None
    numpy: np.dtype


DTYPES: dict[str, Dtype] = {
    "BOOL": Dtype(1, mx.bool_, np.dtype("?")),
    "U8": Dtype(1, mx.uint8, np.dtype("u1")),
    "I8": Dtype(1, mx.int8, np.dtype("i1")),
    "F8_E4M3": Dtype(1, None, np.dtype("u1")),
    "F8_E5M2": Dtype(1, None, np.dtype("u1")),
    "U16": Dtype(2, mx.uint16, np.dtype("<u2")),
    "I16": Dtype(2, mx.int16, np.dtype("<i2")),
    "F16": Dtype(2, mx.float16, np.dtype("<f2")),
    "BF16": Dtype(2, mx.bfloat16, np.dtype("<u2")),
    "U32": Dtype(4, mx.uint32, np.dtype("<u4")),
    "I32": Dtype(4, mx.int32, np.dtype("<i4")),
    "F32": Dtype(4, mx.float32, np.dtype("<f4")),
    "U64": Dtype(8, mx.uint64, np.dtype("<u8")),
    "I64": Dtype(8, mx.int64, np.dtype("<i8")),
    "F64": Dtype(8, None, np.dtype("<f8")),
}
ITEMSIZE = {name: d.itemsize for name, d in DTYPES.items()}
# mx.load reads all but these, and refuses a whole file that holds one, naming neither the tensor nor the fix.
MLX_UNREADABLE = {"F8_E4M3": "float8", "F8_E5M2": "float8", "F64": "float64"}
MLX_DTYPES = {name: d.mlx for name, d in DTYPES.items() if d.mlx is not None}
FLOATS = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}
INTEGERS = {name for name in DTYPES if name[0] in "UI"}
NAME_OF = {d: name for name, d in MLX_DTYPES.items()}  # mx dtype -> safetensors dtype
# The float dtypes a user names (`--dtype`, config.json's "dtype") -> safetensors dtype.
FLOAT_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}

MAX_HEADER_BYTES = 100_000_000


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * ITEMSIZE[dtype]


@dataclass(frozen=True)
class Header:
    """A file's header, checked: ``tensors`` (name -> dtype, shape, data_offsets; no ``__metadata__``)
    and ``data_start``, the file offset of the first data byte."""

    tensors: dict[str, dict]
    metadata: dict
    data_start: int

    def offset(self, name: str) -> int:
        """The file offset of a tensor's first byte."""
        return self.data_start + self.tensors[name]["data_offsets"][0]


def read_header(path: Path) -> Header:
    """The header of a safetensors file, checked: every tensor's dtype (one MLX reads), shape and byte
    range are consistent, and the file holds all the data it promises. CheckpointError otherwise."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path} is truncated or not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path} is truncated or not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not a valid safetensors file (unreadable header)") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a valid safetensors file (its header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    for name, info in header.items():
        _check_entry(path, name, info)
    end = _check_disjoint(path, header)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: it holds {size} bytes but its header describes {8 + n + end}. "
            "Re-download or re-copy this file."
        )
    return Header(header, metadata if isinstance(metadata, dict) else {}, 8 + n)


def _check_entry(path: Path, name: str, info: object) -> None:
    corrupt = f"{path}: tensor {name!r} has a corrupt header entry"
    if not isinstance(info, dict):
        raise CheckpointError(f"{corrupt} ({info!r}); re-download or re-save this file")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPES:
        raise CheckpointError(f"{corrupt}: unknown dtype {dtype!r}")
    if dtype in MLX_UNREADABLE:
        raise CheckpointError(
            f"{path}: tensor {name!r} is stored as {MLX_UNREADABLE[dtype]}, which MLX cannot read. "
            "Save the checkpoint with float weights in bfloat16, float16 or float32."
        )
    if not _naturals(shape) or not _naturals(offsets, 2) or offsets[0] > offsets[1]:
        raise CheckpointError(f"{corrupt} (shape {shape!r}, data_offsets {offsets!r})")
    want = nbytes(shape, dtype)
    if offsets[1] - offsets[0] != want:
        raise CheckpointError(
            f"{corrupt}: {offsets[1] - offsets[0]} bytes for {shape} {dtype} ({want} bytes). "
            "Re-download or re-save this file."
        )


def _check_disjoint(path: Path, tensors: dict[str, dict]) -> int:
    """The end of the data; CheckpointError when two tensors' byte ranges overlap (a header edited
    or damaged so that one tensor would be read out of another's bytes)."""
    end, last = 0, None
    for name, info in sorted(tensors.items(), key=lambda item: item[1]["data_offsets"]):
        start, stop = info["data_offsets"]
        if start < end:
            raise CheckpointError(
                f"{path}: tensor {name!r} (bytes {start}-{stop}) overlaps tensor {last!r} (ending at "
                f"{end}): the header is corrupt. Re-download or re-save this file."
            )
        if stop > start:
            end, last = stop, name
    return end


def _naturals(value: object, length: int | None = None) -> bool:
    """A JSON list of non-negative integers (of `length` items, when given)."""
    return (
        isinstance(value, list)
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)
        and (length is None or len(value) == length)
    )


def build_header(
    tensors: list[tuple[str, tuple[int, ...], str]], metadata: dict[str, str] | None = None, align: int = 8
) -> tuple[bytes, dict]:
    """(the header's bytes, with the 8-byte length in front; the header dict) for tensors (name, shape,
    safetensors dtype) laid out back to back in the given order. The JSON is padded with spaces so that
    the data starts at a multiple of `align` bytes (8: every offset aligned to its dtype when tensors
    come by decreasing itemsize; 4096: a page, for memory mapping)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, shape, dtype in tensors:
        size = nbytes(shape, dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % align)
    return struct.pack("<Q", len(raw)) + raw, header
