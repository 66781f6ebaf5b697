"""The conversion itself: plan every output tensor from the source's headers, then stream them out.

A `ConversionPlan` lists the shards of the converted layout and, per shard, the jobs that produce its
tensors in file order. Nothing is read while planning except safetensors headers (the loader's
`LazyTensors`, `iter_canonical` with its checks: missing tensors, shapes, dtypes). Writing evaluates
one tensor at a time, in chunks of rows when the source allows it, so the peak memory is a fixed
overhead plus about the largest source tensor (the 1.16 GB embedding of gpt-oss), whatever the model.

Converted layout ("oss-mlx", format_version 1), see docs/MEMORY.md:
    config.json                          HF dialect + "oss_mlx" section (provenance, quantization,
                                         per-shard sha256, byte offsets of each layer's experts)
    model.safetensors.index.json         weight_map + metadata.total_size
    model-embedding.safetensors          embedding.weight (+ .scales/.biases when quantized)
    model-layer-NN.safetensors           everything of blocks.NN: the expert tensors first
                                         (gate_up_weight, gate_up_scales, down_weight, down_scales,
                                         gate_up_bias, down_bias), then attention, norms, router
    model-unembedding.safetensors        unembedding.weight (+ .scales/.biases), norm.weight
    o200k_base.tiktoken                  the vocabulary (runs offline)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from oss_mlx import weights as W
from oss_mlx.config import CONVERTED_FORMAT_VERSION, ModelConfig, read_config
from oss_mlx.memory import weight_bytes
from oss_mlx.model import Transformer

from .presets import Preset
from .writer import ShardWriter, TensorSpec

FORMAT_VERSION = CONVERTED_FORMAT_VERSION
CHUNK_BYTES = 64 << 20  # rows of a source tensor evaluated at once when it can be split
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
EXPERT_ORDER = ("gate_up_weight", "gate_up_scales", "down_weight", "down_scales", "gate_up_bias", "down_bias")
METADATA_FILES = (
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# Recipes whose output rows (axis 0) are the source's rows: a tensor can be produced in row chunks.
_ROW_WISE = (W.identity, W.blocks_to_uint32, W.transpose_last)


class ConvertError(RuntimeError):
    """The conversion cannot proceed; the message says why and what to do."""


def converter_version() -> str:
    try:
        from importlib.metadata import version

        v = version("oss-mlx")
    except Exception:  # not installed (a bare checkout)
        v = "0"
    return f"oss-mlx {v} (convert format {FORMAT_VERSION})"


class StreamingTensors(W.LazyTensors):
    """LazyTensors that does not keep what it loads: every access maps the file afresh (reading only
    its header), so a tensor's memory is released as soon as its writer is done with it."""

    def __getitem__(self, name: str) -> mx.array:
        path = self.file_of[name]
        try:
            return mx.load(str(path))[name]
        except Exception as e:  # mlx says little about what went wrong
            raise W.CheckpointError(f"{path}: cannot read ({e})") from None


# ---- the plan -------------------------------------------------------------------------------------


@dataclass
class Job:
    """Produces `outputs` (consecutive in their shard) chunk by chunk: each step yields one array per
    output, the next rows of each (any leading shape, with the tensor's last axis). Only the first
    output is written as it comes; the others (scales, biases: small) are kept until the first is
    complete."""

    outputs: list[TensorSpec]
    produce: Callable[[], Iterator[tuple[mx.array, ...]]]
    component: str

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


@dataclass
class ShardPlan:
    name: str
    kind: str  # "embedding" | "layer" | "unembedding"
    layer: int | None
    jobs: list[Job] = field(default_factory=list)

    @property
    def tensors(self) -> list[TensorSpec]:
        return [t for j in self.jobs for t in j.outputs]

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


@dataclass
class ConversionPlan:
    folder: Path
    config: ModelConfig
    raw_config: dict
    layout: str
    preset: Preset
    dtype: str
    shards: list[ShardPlan]

    @property
    def tensor_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def file_bytes_estimate(self) -> int:
        """Tensor bytes + headers (< 4 KiB + 100 B per tensor each) + the vocabulary (~3.6 MB)."""
        headers = sum(4096 + 200 * len(s.tensors) for s in self.shards)
        return self.tensor_bytes + headers + 4 * 1024 * 1024

    def component_bytes(self) -> dict[str, int]:
        out = {c: 0 for c in ("experts", "attention", "embedding", "unembedding", "other")}
        for s in self.shards:
            for j in s.jobs:
                out[j.component] += j.nbytes
        return out

    def expected_component_bytes(self) -> dict[str, int]:
        """The memory planner's arithmetic for the same model (equal to component_bytes, tested)."""
        return weight_bytes(self.config, self.preset.spec(), DTYPES[self.dtype].size)


def component_of(name: str) -> str:
    if ".mlp.experts." in name:
        return "experts"
    if ".attn." in name and not name.endswith("norm.weight"):
        return "attention"
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("unembedding."):
        return "unembedding"
    return "other"


def _dense_part(name: str) -> str | None:
    """Which preset part quantizes this canonical tensor (None: never quantized)."""
    if name in ("embedding.weight", "unembedding.weight"):
        return name.split(".")[0]
    if name.endswith((".attn.qkv.weight", ".attn.out.weight")):
        return "attention"
    return None


def _rows_per_chunk(shape: tuple[int, ...], itemsize: int) -> int:
    row = math.prod(shape[1:]) * itemsize if len(shape) > 1 else itemsize
    return max(1, CHUNK_BYTES // max(row, 1))


def plan_conversion(folder: Path, preset: Preset, dtype: str = "bfloat16") -> ConversionPlan:
    """Read the source's config and headers, check every tensor, and lay out the converted shards."""
    if dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    target = DTYPES[dtype]
    config, raw = read_config(folder)
    tensors = StreamingTensors.from_folder(folder)
    layout = W.detect_layout(folder, raw, tensors.names())
    if layout == "oss-mlx":
        section = raw["oss_mlx"]
        if any((section.get("quantization") or {}).values()) or not section.get("experts_mxfp4", True):
            raise ConvertError(
                f"{folder} is already converted (preset {section.get('preset')!r}, quantized layers): "
                "convert from the original checkpoint instead, so nothing is quantized twice."
            )
        recipes = W.canonical_recipes(tensors.names())
    elif layout == "original":
        recipes = W.original_recipes(config)
    else:
        recipes = W.hf_recipes(config, mxfp4=layout == "hf-mxfp4")
    float_experts = layout == "hf-float"
    H = config.hidden_size
    for part, q in preset.spec().items():
        if q:
            cols = [H] if part != "attention" else [H, config.num_attention_heads * config.head_dim]
            if any(c % q["group_size"] for c in cols):
                raise ConvertError(
                    f"preset {preset.name}: {part} rows of {cols} values are not a multiple of its group "
                    f"size {q['group_size']}; use --quality reference"
                )

    model = Transformer(config, quantized_experts=True)  # lazy: nothing is allocated
    expected = {k: (v.shape, v.dtype) for k, v in tree_flatten(model.parameters())}
    del model
    # Every check of the loader (missing tensors, shapes, dtypes), on lazy arrays: reads headers only.
    canon = {
        name: (tuple(a.shape), a.dtype)
        for name, a in W.iter_canonical(
            tensors,
            recipes,
            expected,
            dtype=target,
            quantize_float_experts=float_experts,
            folder=folder,
            config=config,
        )
    }

    jobs: dict[str, Job] = {}
    for name, (shape, out_dtype) in canon.items():
        if name in jobs or (float_experts and name.endswith("_scales") and ".mlp.experts." in name):
            continue
        srcs, build = recipes[name]
        part = _dense_part(name)
        q = preset.spec().get(part) if part else None
        if float_experts and W.EXPERT_WEIGHT.search(name):
            scales = name.replace("_weight", "_scales")
            outs = [TensorSpec(name, shape, out_dtype), TensorSpec(scales, *canon[scales])]
            jobs[name] = Job(outs, _float_expert_producer(tensors, srcs, build), "experts")
        elif q:
            base = name[: -len(".weight")]
            rows, cols = shape
            groups = cols // q["group_size"]
            outs = [TensorSpec(name, (rows, cols * q["bits"] // 32), mx.uint32)]
            outs.append(TensorSpec(f"{base}.scales", (rows, groups), target))
            if q.get("mode", "affine") == "affine":
                outs.append(TensorSpec(f"{base}.biases", (rows, groups), target))
            else:
                outs[1] = TensorSpec(f"{base}.scales", (rows, groups), mx.uint8)
            jobs[name] = Job(outs, _quantized_producer(tensors, srcs, build, target, q), component_of(name))
        else:
            outs = [TensorSpec(name, shape, out_dtype)]
            jobs[name] = Job(outs, _plain_producer(tensors, srcs, build, target, shape), component_of(name))

    return ConversionPlan(folder, config, raw, layout, preset, dtype, _assign_shards(config, jobs))


def _assign_shards(config: ModelConfig, jobs: dict[str, Job]) -> list[ShardPlan]:
    width = max(2, len(str(config.num_layers - 1)))
    emb = ShardPlan("model-embedding.safetensors", "embedding", None)
    layers = [
        ShardPlan(f"model-layer-{i:0{width}d}.safetensors", "layer", i) for i in range(config.num_layers)
    ]
    unemb = ShardPlan("model-unembedding.safetensors", "unembedding", None)
    for name, job in jobs.items():
        if name.startswith("blocks."):
            layers[int(name.split(".")[1])].jobs.append(job)
        elif name.startswith("embedding."):
            emb.jobs.append(job)
        else:  # unembedding, final norm
            unemb.jobs.append(job)

    def key(job: Job) -> tuple:
        first = job.outputs[0]
        tail = first.name.rsplit(".", 1)[-1]
        if ".mlp.experts." in first.name:
            return (0, EXPERT_ORDER.index(tail), "")
        if len(job.outputs) > 1:  # quantized dense: uint32 values + scales (+ biases), kept together
            return (1, 0, first.name)
        # the rest by decreasing item size (alignment), then name
        return (2, -first.dtype.size, first.name)

    shards = [emb, *layers, unemb]
    for s in shards:
        s.jobs.sort(key=key)
    return shards


# ---- producers: each yields tuples of chunks (rows along axis 0) ----------------------------------


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
    the input axis, so rows are independent), in blocks of rows: MLX's CPU mxfp4 quantization takes
    ~80 bytes of scratch per value, ~0.7 GB for one whole 20b expert."""
    rows_per_block = 1 << 20  # values per quantize call (4 MB of float32)

    def produce():
        (array,) = _load(tensors, srcs)
        for e in range(array.shape[0]):
            x = build(array[e : e + 1])[0]  # [out, in]
            step = max(1, rows_per_block // x.shape[-1])
            for r in range(0, x.shape[0], step):
                yield tuple(
                    mx.quantize(x[r : r + step].astype(mx.float32), group_size=32, bits=4, mode="mxfp4")
                )

    return produce


# ---- writing --------------------------------------------------------------------------------------


@dataclass
class Result:
    dest: Path
    plan: ConversionPlan
    seconds: float
    bytes_written: int
    shards: dict[str, str]


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
                # sit beside the next one (measured: 2.4 GB instead of 1.3 GB converting a float 20b).
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


def converted_config(
    plan: ConversionPlan,
    source,
    digests: dict,
    experts: dict,
    tensor_bytes: int,
    seconds: float | None = None,
) -> dict:
    cfg = plan.config.to_hf_dict()
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if key in plan.raw_config:
            cfg[key] = plan.raw_config[key]
    cfg["torch_dtype"] = plan.dtype
    cfg["oss_mlx"] = {
        "format_version": FORMAT_VERSION,
        "experts_mxfp4": True,
        "quantization": plan.preset.spec(),
        "preset": plan.preset.name,
        "dtype": plan.dtype,
        "source": source.name,
        "source_layout": plan.layout,
        "revision": source.revision,
        "converter_version": converter_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tensor_bytes": tensor_bytes,
        "vocabulary": "o200k_base.tiktoken",
        "shards": digests,
        # Expert e of tensor T in layer i lies at experts["blocks.i"]["tensors"][T]["offset"] + e * stride
        # in its shard (a file offset; stride = that tensor's bytes / num_experts).
        "experts": experts,
    }
    return cfg


# ---- destination handling -------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(dest: Path) -> list[Path]:
    """Remove `DEST.partial-<pid>` folders of dead converters; restore an old DEST a killed --force run
    had moved aside (`DEST.old-<pid>`) when no new DEST replaced it. Returns what was removed."""
    removed = []
    parent = dest.parent
    if not parent.is_dir():
        return removed
    for kind in ("partial", "old"):
        for p in sorted(parent.glob(f"{dest.name}.{kind}-*")):
            try:
                pid = int(p.name.rsplit("-", 1)[1])
            except ValueError:
                continue
            if _pid_alive(pid):
                continue
            if kind == "old" and not dest.exists():
                p.rename(dest)
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def check_disk(dest: Path, needed: int) -> None:
    free = shutil.disk_usage(dest.parent).free
    if free < needed:
        raise ConvertError(
            f"not enough free disk space in {dest.parent}: the conversion needs {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free. Free some space or choose another DEST."
        )


def copy_metadata(src: Path, out: Path) -> list[str]:
    copied = []
    for name in METADATA_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def convert(
    source,
    dest: Path,
    plan: ConversionPlan,
    force: bool = False,
    on_progress: Callable[[str, int], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> Result:
    """Write `plan` to DEST through DEST.partial-<pid>, renamed into place once complete."""
    from oss_mlx.tokenizer import copy_vocabulary

    dest = Path(dest).absolute()
    src_folder = plan.folder.resolve()
    if dest.resolve() == src_folder or src_folder in dest.resolve().parents:
        raise ConvertError(f"DEST {dest} is (inside) the source folder; choose another DEST")
    if dest.exists() and not force:
        raise ConvertError(
            f"{dest} already exists; pass --force to replace it (once the new one is complete)"
        )
    if dest.exists() and not dest.is_dir():
        raise ConvertError(f"{dest} exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    check_disk(dest, plan.file_bytes_estimate + 64 * 1024 * 1024)

    start = time.monotonic()
    partial = dest.parent / f"{dest.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        if on_stage:
            on_stage("vocabulary")
        copy_vocabulary(partial, plan.folder)
        copy_metadata(plan.folder, partial)
        if on_stage:
            on_stage("tensors")
        digests, experts, weight_map = write_shards(plan, partial, on_progress)
        index = {
            "metadata": {"total_size": plan.tensor_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        seconds = time.monotonic() - start
        cfg = converted_config(plan, source, digests, experts, plan.tensor_bytes, seconds)
        (partial / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        _fsync_dir(partial)
        if dest.exists():  # --force: the old DEST goes only now that the new one is complete
            old = dest.parent / f"{dest.name}.old-{os.getpid()}"
            dest.rename(old)
            partial.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            partial.rename(dest)
        _fsync_dir(dest.parent)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        if e.errno == 28:  # ENOSPC
            raise ConvertError(
                f"the disk of {dest.parent} filled up during the conversion; nothing was kept"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    written = sum((dest / n).stat().st_size for n in digests)
    return Result(dest, plan, time.monotonic() - start, written, digests)
