"""Producing the converted tensors: each job's producer yields its output in chunks of rows, read
from the source lazily (a file is mapped afresh for every tensor, so nothing stays in memory), and
`write_shards` streams them into the shard files. The peak memory is a fixed overhead plus about the
largest source tensor (the 1.16 GB embedding of gpt-oss), whatever the model."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import mlx.core as mx

from oss_mlx import mxfp4
from oss_mlx import weights as W
from oss_mlx.config import CONVERTED_FORMAT_VERSION

from .writer import ShardWriter

if TYPE_CHECKING:
    from pathlib import Path

    from .plan import ConversionPlan

FORMAT_VERSION = CONVERTED_FORMAT_VERSION
CHUNK_BYTES = 64 << 20  # rows of a source tensor evaluated at once when it can be split
# Recipes whose output rows (axis 0) are the source's rows: a tensor can be produced in row chunks.
_ROW_WISE = (W.identity, W.blocks_to_uint32, W.transpose_last)
# Values per MXFP4 quantize call (4 MB of float32): MLX's CPU quantizer takes ~80 bytes of scratch per
# value, ~0.7 GB for one whole 20b expert. The fused experts (oss_mlx/fuse.py) go in the same blocks.
QUANTIZE_BLOCK_VALUES = 1 << 20


class StreamingTensors(W.LazyTensors):
    """LazyTensors that does not keep what it loads: every access maps the file afresh (reading only
    its header), so a tensor's memory is released as soon as its writer is done with it."""

    def __getitem__(self, name: str) -> mx.array:
        path = self.file_of[name]
        try:
            return mx.load(str(path))[name]
        except Exception as e:  # mlx says little about what went wrong
            raise W.CheckpointError(f"{path}: cannot read ({e})") from None


def _rows_per_chunk(shape: tuple[int, ...], itemsize: int) -> int:
    row = math.prod(shape[1:]) * itemsize if len(shape) > 1 else itemsize
    return max(1, CHUNK_BYTES // max(row, 1))


def _load(tensors: StreamingTensors, srcs: list[str]) -> list[mx.array]:
    return [tensors[s] for s in srcs]


def _plain_producer(tensors, srcs, build, target, shape):
    def produce():
        arrays = _load(tensors, srcs)

        def cast(x: mx.array) -> mx.array:
            return x.astype(target) if mx.issubdtype(x.dtype, mx.floating) else x

        if build in _ROW_WISE and len(arrays) == 1 and len(shape) > 1:
            step = _rows_per_chunk(arrays[0].shape, arrays[0].dtype.size)
            for a in range(0, shape[0], step):
                yield (cast(build(arrays[0][a : a + step])),)
        else:
            yield (cast(build(*arrays)),)

    return produce


def _quantized_producer(tensors, srcs, build, target, q):
    def produce():
        arrays = _load(tensors, srcs)
        if build in _ROW_WISE and len(arrays) == 1:
            step = _rows_per_chunk(arrays[0].shape, 4)  # float32 intermediates
            pieces = (build(arrays[0][a : a + step]) for a in range(0, arrays[0].shape[0], step))
        else:
            pieces = iter([build(*arrays)])
        for x in pieces:
            yield tuple(
                mx.quantize(
                    x.astype(target), group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine")
                )
            )

    return produce


def _float_expert_producer(tensors, srcs, build):
    """A float fine-tune's experts -> MXFP4, exactly as the loader quantizes them (groups of 32 along
    the input axis, so rows are independent), in blocks of rows (QUANTIZE_BLOCK_VALUES)."""

    def produce():
        (array,) = _load(tensors, srcs)
        for e in range(array.shape[0]):
            x = build(array[e : e + 1])[0]  # [out, in]
            step = max(1, QUANTIZE_BLOCK_VALUES // x.shape[-1])
            for r in range(0, x.shape[0], step):
                yield mxfp4.quantize(x[r : r + step])

    return produce


def _delay() -> float:
    """Testing hook: seconds to sleep after each tensor (lets a test kill the process mid-way)."""
    try:
        return float(os.environ.get("OSS_MLX_CONVERT_DELAY", "0") or 0)
    except ValueError:
        return 0.0


def write_shards(
    plan: ConversionPlan, out: Path, on_progress: Callable[[str, int], None] | None = None
) -> tuple[dict[str, str], dict[str, dict], dict[str, str]]:
    """Write every shard of `plan` into `out`. Returns (sha256 per shard, expert byte ranges, weight map)."""
    delay = _delay()
    digests: dict[str, str] = {}
    experts: dict[str, dict] = {}
    weight_map: dict[str, str] = {}
    for shard in plan.shards:
        meta = {"format": "mlx", "producer": "oss-mlx convert", "format_version": str(FORMAT_VERSION)}
        with ShardWriter(out / shard.name, shard.tensors, meta) as w:
            for job in shard.jobs:
                primary, rest = job.outputs[0], job.outputs[1:]
                kept: list[list[mx.array]] = [[] for _ in rest]
                for chunk in job.produce():
                    mx.eval(*chunk)
                    w.write(primary.name, chunk[0])
                    for k, c in zip(kept, chunk[1:], strict=True):
                        k.append(c)
                    if on_progress:
                        on_progress(primary.name, chunk[0].nbytes)
                    del chunk
                for spec, chunks in zip(rest, kept, strict=True):
                    for c in chunks:
                        w.write(spec.name, c)
                        if on_progress:
                            on_progress(spec.name, c.nbytes)
                del kept
                # MLX keeps freed buffers for reuse; a 1 GB buffer of the last tensor would otherwise
                # sit beside the next one, doubling the peak (docs/PERFORMANCE.md, "Converter").
                mx.clear_cache()
                if delay:
                    time.sleep(delay)
            digests[shard.name] = w.close()
            for t in shard.tensors:
                weight_map[t.name] = shard.name
            if shard.kind == "layer":
                E = plan.config.num_experts
                experts[f"blocks.{shard.layer}"] = {
                    "shard": shard.name,
                    "tensors": {
                        t.name.rsplit(".", 1)[1]: {"offset": w.offset_of(t.name), "stride": t.nbytes // E}
                        for t in shard.tensors
                        if ".mlp.experts." in t.name
                    },
                }
    return digests, experts, weight_map
