"""`oss-mlx convert --verify`: the converted folder is intact and computes what the source computes.

1. every shard's sha256 equals the one recorded in config.json (and no shard is missing or extra);
2. a short forward pass (16 tokens by default) of the converted model against the source loaded
   directly (same dtype), stage by stage (embedding, each layer's attention and MoE, logits), every
   stage fed the source's own input (teacher forcing):
   - `reference`: every stage, and so the logits, identical;
   - quantized presets: every stage identical to the source quantized in memory with the same spec
     (the converter wrote exactly the right bytes), and each stage's deviation from the source within
     the preset's `max_deviation` (relative RMS: of the output for embedding and logits, of the
     residual update `out - in` for attention and MoE), measured in float32 so that it is the
     quantization's alone (see `lockstep`).
   Stage by stage, because a free-running forward of a *random* MoE model is chaotic: one flipped
   expert choice early on decorrelates its logits (bf16 rounding alone moves the logits of a random
   20b-shaped model by O(1)), so an end-to-end bound would say nothing. The end-to-end difference is
   reported too.

The forward runs stage by stage, releasing each stage's weights once used, so verifying a 20b
conversion needs about one embedding + one layer + one unembedding per model run, not the models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from oss_mlx.attention import attention_mask
from oss_mlx.loader import load_model, quantize_dense

from .plan import DTYPES
from .presets import get_preset
from .writer import sha256_file


class VerifyError(RuntimeError):
    """The converted folder does not match its checksums or its source."""


@dataclass
class Stage:
    name: str
    deviation: float  # relative RMS difference from the source (see the module docstring)
    identical: bool  # to the expected output (the source, or the source quantized in memory)


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


def _release(parts: list, i: int):
    part, parts[i] = parts[i], None
    return part


def _stages(model) -> list:
    """[embedding, attention 0, MoE 0, attention 1, ..., (norm, unembedding)].

    Attention and MoE are separate stages: a preset quantizes the attention projections but never the
    MoE (router, experts), so each stage's deviation is the direct effect of its own quantization,
    not of expert choices flipped by an earlier one.
    """
    return [
        model.embedding,
        *(p for b in model.blocks for p in (b.attn, b.mlp)),
        (model.norm, model.unembedding),
    ]


def lockstep(
    source: Path,
    dest: Path,
    tokens: np.ndarray,
    dtype: mx.Dtype | None = None,
    quantization: dict | None = None,
) -> tuple[list[Stage], Comparison]:
    """Run SOURCE and DEST stage by stage on the source's trajectory (teacher forcing).

    Exactness (`Stage.identical`) is checked in the conversion's dtype, against SOURCE (reference) or
    SOURCE quantized in memory with the same spec. The deviation of a quantized conversion is measured
    in float32 (SOURCE and DEST both run in float32): the quantization error alone, the same on every
    machine, without the rounding of bf16 kernels (MLX's CPU quantized matmul loses ~2.6% at 512
    inputs and ~6% at 2880 in bf16, more than 8-bit quantization itself). Each stage's weights are
    released once used. Returns the stages and the end-to-end comparison (DEST running free on its
    own outputs, in its dtype).
    """
    tracks = {"src": load_model(source, dtype=dtype)[0], "dest": load_model(dest)[0]}
    if quantization:
        tracks["expect"] = load_model(source, dtype=dtype)[0]
        quantize_dense(tracks["expect"], quantization)
        tracks["src32"] = load_model(source, dtype=mx.float32)[0]
        tracks["dest32"] = load_model(dest, dtype=mx.float32)[0]
    stages = {k: _stages(m) for k, m in tracks.items()}
    del tracks
    T, last = len(tokens), len(stages["src"]) - 1

    def apply(f, i: int, inp: mx.array) -> mx.array:
        if i == 0:
            out = f(inp)
        elif i == last:
            out = f[1](f[0](inp)).astype(mx.float32)
        elif i % 2:  # attention
            out = f(inp, attention_mask(T, 0, T, f.window))
        else:
            out = f(inp)
        mx.eval(out)
        return out

    def rel(a: mx.array, b: mx.array, base: mx.array | None) -> float:
        a, b = (np.array(v.astype(mx.float32), dtype=np.float64) for v in (a, b))
        scale = b if base is None else b - np.array(base.astype(mx.float32), dtype=np.float64)
        denom = float(np.sqrt(np.mean(scale**2))) or 1.0
        return float(np.sqrt(np.mean((a - b) ** 2)) / denom)

    x = x32 = free = mx.array(np.asarray(tokens)[None, :])
    results: list[Stage] = []
    for i in range(last + 1):
        ref = apply(_release(stages["src"], i), i, x)
        f_dest = _release(stages["dest"], i)
        got = apply(f_dest, i, x)
        free = got if i == 0 else apply(f_dest, i, free)
        del f_dest
        base = None if i in (0, last) else x
        if quantization:
            identical = bool(mx.array_equal(got, apply(_release(stages["expect"], i), i, x)).item())
            ref32 = apply(_release(stages["src32"], i), i, x32)
            deviation = rel(
                apply(_release(stages["dest32"], i), i, x32), ref32, None if base is None else x32
            )
            x32 = ref32
        else:
            identical = bool(mx.array_equal(got, ref).item())
            deviation = rel(got, ref, base)
        kind = "attention" if i % 2 else "mlp"
        name = "embedding" if i == 0 else "logits" if i == last else f"layer {(i - 1) // 2} {kind}"
        results.append(Stage(name, deviation, identical))
        x = ref
    return results, compare(np.array(free[0]), np.array(x[0]))


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


@dataclass
class Report:
    preset: str
    allowed: float
    stages: list[Stage]
    end_to_end: Comparison

    @property
    def worst(self) -> Stage:
        return max(self.stages, key=lambda s: s.deviation)


def verify_logits(dest: Path, source: Path, n_tokens: int = 16) -> Report:
    """Compare DEST with SOURCE loaded directly, stage by stage (see the module docstring)."""
    cfg = json.loads((dest / "config.json").read_text())
    section = cfg["oss_mlx"]
    preset = get_preset(section.get("preset", "reference"))
    dtype = DTYPES[section.get("dtype", "bfloat16")]
    spec = section.get("quantization") or {}
    tokens = verify_tokens(cfg["vocab_size"], n_tokens)
    stages, end = lockstep(source, dest, tokens, dtype, spec if any(spec.values()) else None)
    report = Report(preset.name, preset.max_deviation, stages, end)
    wrong = [s.name for s in stages if not s.identical]
    if wrong:
        what = "the source" if not any(spec.values()) else "the source quantized in memory with the same spec"
        raise VerifyError(
            f"logits differ from {what} at {', '.join(wrong[:4])}{' …' if len(wrong) > 4 else ''} "
            f"(end to end: max |diff| {end.max_abs:.3g}, relative RMS {end.rel_rms:.3g}): "
            f"the converted weights are not what preset {preset.name} should write"
        )
    worst = report.worst
    if worst.deviation > preset.max_deviation:
        raise VerifyError(
            f"{worst.name} deviates from the source by relative RMS {worst.deviation:.4f}, more than the "
            f"{preset.max_deviation} documented for preset {preset.name}"
        )
    return report
