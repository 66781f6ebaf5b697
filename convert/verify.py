"""`oss-mlx convert --verify`: the converted folder is intact and computes what the source computes.

1. every shard's sha256 equals the one recorded in config.json (and no shard is missing or extra);
2. a short forward pass (16 tokens by default) of the converted model against the source loaded
   directly (same dtype): identical logits for `reference`; for the quantized presets a relative RMS
   difference within the preset's `max_deviation`.

The forward runs layer by layer, releasing each layer's weights once used, so verifying a 20b
conversion needs about the embedding + unembedding + one layer of memory per model, not the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from oss_mlx.attention import attention_mask
from oss_mlx.loader import _quantize_dense, load_model

from .presets import get_preset
from .writer import sha256_file


class VerifyError(RuntimeError):
    """The converted folder does not match its checksums or its source."""


@dataclass
class Comparison:
    tokens: int
    max_abs: float
    rel_rms: float
    top1_agree: float
    identical: bool


def check_shards(dest: Path, on_file=None) -> dict[str, str]:
    cfg = json.loads((dest / "config.json").read_text())
    shards = (cfg.get("oss_mlx") or {}).get("shards")
    if not shards:
        raise VerifyError(f"{dest}/config.json has no oss_mlx.shards checksums: not a converted folder")
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    indexed = set(index["weight_map"].values())
    if indexed != set(shards):
        raise VerifyError(
            f"{dest}: the index lists shards {sorted(indexed)} but config.json has checksums for "
            f"{sorted(shards)}"
        )
    for name, want in shards.items():
        path = dest / name
        if not path.is_file():
            raise VerifyError(f"{path} is missing: convert again")
        got = sha256_file(path)
        if on_file:
            on_file(name)
        if got != want:
            raise VerifyError(
                f"{path}: sha256 {got[:16]}… does not match the {want[:16]}… recorded at conversion: "
                "the file was modified or corrupted. Convert again."
            )
    return shards


def streamed_logits(
    path: Path, tokens: np.ndarray, dtype: mx.Dtype | None = None, quantization: dict | None = None
) -> np.ndarray:
    """Logits [T, vocab] (float32) of a full forward over `tokens`, one layer in memory at a time.

    quantization: quantize the loaded model's dense layers in memory first, as a preset does (the
    loader's own `_quantize_dense`), to check a quantized conversion wrote exactly those weights.
    """
    model, _ = load_model(path, dtype=dtype)
    if quantization:
        _quantize_dense(model, quantization)
    emb, blocks, norm, unemb = model.embedding, list(model.blocks), model.norm, model.unembedding
    del model
    T = len(tokens)
    x = emb(mx.array(np.asarray(tokens)[None, :]))
    mx.eval(x)
    del emb
    for i in range(len(blocks)):
        block, blocks[i] = blocks[i], None
        x = block(x, attention_mask(T, 0, T, block.attn.window))
        mx.eval(x)
        del block
    logits = unemb(norm(x)).astype(mx.float32)
    mx.eval(logits)
    return np.array(logits[0])


def verify_tokens(vocab_size: int, n: int = 16) -> np.ndarray:
    return np.random.default_rng(1234).integers(0, vocab_size, size=n)


def compare(converted: np.ndarray, reference: np.ndarray) -> Comparison:
    d = converted.astype(np.float64) - reference.astype(np.float64)
    rms_ref = float(np.sqrt(np.mean(reference.astype(np.float64) ** 2))) or 1.0
    return Comparison(
        tokens=reference.shape[0],
        max_abs=float(np.abs(d).max()),
        rel_rms=float(np.sqrt(np.mean(d**2)) / rms_ref),
        top1_agree=float(np.mean(converted.argmax(-1) == reference.argmax(-1))),
        identical=bool(np.array_equal(converted, reference)),
    )


def verify_logits(dest: Path, source: Path, n_tokens: int = 16) -> tuple[Comparison, float]:
    """Compare a forward pass of DEST with SOURCE loaded directly; returns (comparison, allowed deviation).

    reference: the logits must be identical. Quantized presets: identical to SOURCE quantized in memory
    with the same spec (the conversion wrote exactly the right bytes), and within the preset's
    documented deviation from SOURCE itself.
    """
    cfg = json.loads((dest / "config.json").read_text())
    section = cfg["oss_mlx"]
    preset = get_preset(section.get("preset", "reference"))
    dtype = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}[
        section.get("dtype", "bfloat16")
    ]
    tokens = verify_tokens(cfg["vocab_size"], n_tokens)
    ref = streamed_logits(source, tokens, dtype)
    got = streamed_logits(dest, tokens)
    cmp = compare(got, ref)
    spec = section.get("quantization") or {}
    if any(spec.values()):
        expect = streamed_logits(source, tokens, dtype, quantization=spec)
        exact = compare(got, expect)
        if not exact.identical:
            raise VerifyError(
                f"logits differ from the source quantized in memory with the same spec (max |diff| "
                f"{exact.max_abs:.3g}): the converted weights are not what preset {preset.name} should write"
            )
    if preset.max_deviation == 0.0:
        if not cmp.identical:
            raise VerifyError(
                f"logits differ from the source (max |diff| {cmp.max_abs:.3g}, "
                f"relative RMS {cmp.rel_rms:.3g}) "
                f"although preset {preset.name} must reproduce them exactly"
            )
    elif not cmp.rel_rms <= preset.max_deviation:
        raise VerifyError(
            f"logits deviate from the source by relative RMS {cmp.rel_rms:.4f}, more than the "
            f"{preset.max_deviation} documented for preset {preset.name}"
        )
    return cmp, preset.max_deviation
