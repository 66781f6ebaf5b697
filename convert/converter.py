"""The conversion itself: `plan_conversion` (plan.py) lays out every output tensor from the source's
headers, `convert` streams them out (produce.py) into a folder written atomically (folder.py), with the
vocabulary, the index and the config that describe it.

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
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from oss_mlx.errors import ConvertError

from .folder import atomic_folder, clean_stale, pid_alive
from .plan import DTYPES, EXPERT_ORDER, ConversionPlan, plan_conversion
from .produce import FORMAT_VERSION, write_shards

__all__ = [
    "DTYPES",
    "EXPERT_ORDER",
    "ConversionPlan",
    "ConvertError",
    "Result",
    "clean_stale",
    "convert",
    "converted_config",
    "pid_alive",
    "plan_conversion",
    "write_shards",
]

METADATA_FILES = (
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def converter_version() -> str:
    try:
        from importlib.metadata import version

        v = version("oss-mlx")
    except Exception:  # not installed (a bare checkout)
        v = "0"
    return f"oss-mlx {v} (convert format {FORMAT_VERSION})"


@dataclass
class Result:
    dest: Path
    plan: ConversionPlan
    seconds: float
    bytes_written: int
    shards: dict[str, str]


def converted_config(
    plan: ConversionPlan,
    source,
    digests: dict,
    experts: dict,
    tensor_bytes: int,
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
        **plan.provenance,
    }
    return cfg


def copy_metadata(src: Path, out: Path) -> list[str]:
    copied = []
    for name in METADATA_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


def convert(
    source,
    dest: Path,
    plan: ConversionPlan,
    force: bool = False,
    on_progress: Callable[[str, int], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    keep: Iterable[Path] = (),
) -> Result:
    """Write `plan` to DEST through DEST.partial-<pid>, renamed into place once complete. DEST must not
    hold or be inside the source or a folder in `keep`; --force replaces only an earlier conversion."""
    from oss_mlx.tokenizer import copy_vocabulary

    dest = Path(dest).absolute()
    start = time.monotonic()
    needed = plan.file_bytes_estimate + 64 * 1024 * 1024
    with atomic_folder(dest, force, needed, keep=[plan.folder, *keep]) as partial:
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
        cfg = converted_config(plan, source, digests, experts, plan.tensor_bytes)
        (partial / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    written = sum((dest / n).stat().st_size for n in digests)
    return Result(dest, plan, time.monotonic() - start, written, digests)
