"""Quality presets: which dense layers the converter quantizes, and how far their logits may drift.

Experts are always MXFP4 (as OpenAI ships them; float fine-tunes are quantized to MXFP4). The router,
the attention sinks and the norms are never quantized. A preset only chooses the MLX affine
quantization of the attention projections (qkv, out), the token embedding and the unembedding.

`max_deviation` is what `--verify` accepts: the largest relative RMS difference from the source of
any stage of a 16-token forward run stage by stage on the source's own activations (embedding,
each layer's attention and MoE update, logits; measured in float32, so it is the quantization
error alone; see convert/verify.py). The bounds are about twice what random synthetic models of
every size measure (docs/PERFORMANCE.md, "Converter"); the MoE stages are never quantized (0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PARTS = ("attention", "embedding", "unembedding")


def affine(bits: int, group_size: int = 64) -> dict[str, Any]:
    return {"bits": bits, "group_size": group_size, "mode": "affine"}


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    quantization: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    max_deviation: float = 0.0

    def spec(self) -> dict[str, dict[str, Any] | None]:
        """The `oss_mlx.quantization` section of a converted config.json (every part named)."""
        return {part: (dict(q) if (q := self.quantization.get(part)) else None) for part in PARTS}


PRESETS: dict[str, Preset] = {
    "reference": Preset(
        "reference",
        "experts MXFP4 as shipped, everything else bf16 (OpenAI's spec); same logits as the source",
        {},
        0.0,
    ),
    "balanced": Preset(
        "balanced",
        "attention, embedding and unembedding 8-bit (MLX affine, group 64)",
        {"attention": affine(8), "embedding": affine(8), "unembedding": affine(8)},
        0.03,
    ),
    "small": Preset(
        "small",
        "attention 8-bit, embedding and unembedding 6-bit (group 64): for 16 GB Macs",
        {"attention": affine(8), "embedding": affine(6), "unembedding": affine(6)},
        0.05,
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown quality preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def preset_of(quantization: dict | None) -> str | None:
    """The preset whose quantization equals `quantization` (a converted config's), if any."""
    spec = {part: (quantization or {}).get(part) for part in PARTS}
    for p in PRESETS.values():
        if p.spec() == spec:
            return p.name
    return None
