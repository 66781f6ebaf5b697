"""`oss-mlx fuse --model M --adapter A --out DIR`: a converted model with a LoRA adapter merged in.

The conversion is the converter's (convert/converter.py: its plan, its producers, its one writer,
DEST.partial-<pid> renamed into place); only the tensors the adapter changes get producers of their
own, which add the delta (lora.weight_deltas: float32, canonical orientation) to the source weight
before it is cast or quantized as the preset says:

    attention (q/k/v rows of qkv, out), router   W + delta, then the output dtype (or the preset's
                                                  affine quantization of attention)
    experts (gate_up, down)                       dequantize(W) + delta, re-quantized to MXFP4, expert
                                                  by expert in blocks of rows

Re-quantizing is lossy where running the adapter beside the MXFP4 base (`--adapter`) is exact: MXFP4
rounds each value to one of 8 magnitudes times its group's power-of-two scale, so a delta smaller than
half a step rounds away. The report says, per target, the merged weights' error relative to their size
and to the delta's, and how much of the delta survived (<Q(W+d) - W, d> / |d|^2); config.json keeps it
(oss_mlx.fused_adapter).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from . import mxfp4


@dataclass
class Residual:
    """Sums over one target's merged tensors: what the output format kept of W + delta."""

    weight_sq: float = 0.0  # |W + d|^2
    delta_sq: float = 0.0  # |d|^2
    error_sq: float = 0.0  # |Q(W + d) - (W + d)|^2
    kept: float = 0.0  # <Q(W + d) - W, d>

    def add(self, base: mx.array, delta: mx.array, merged: mx.array, stored: mx.array) -> None:
        err = stored - merged
        sums = mx.stack(
            [
                (merged * merged).sum(),
                (delta * delta).sum(),
                (err * err).sum(),
                ((stored - base) * delta).sum(),
            ]
        )
        w, d, e, k = sums.tolist()
        self.weight_sq += w
        self.delta_sq += d
        self.error_sq += e
        self.kept += k

    def summary(self) -> dict[str, float]:
        d = max(self.delta_sq, 1e-30)
        return {
            "error_vs_weight": math.sqrt(self.error_sq / max(self.weight_sq, 1e-30)),
            "error_vs_delta": math.sqrt(self.error_sq / d),
            "delta_kept": self.kept / d,
        }


@dataclass
class FuseReport:
    """Per target, what the output format kept; `record` is the JSON of it, kept up to date while the
    tensors are written, so the converter's config.json (written last) holds the final numbers."""

    adapter: str
    kind: str
    by_target: dict[str, Residual] = field(default_factory=dict)
    record: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.record.update(adapter=self.adapter, kind=self.kind, targets={})

    def residual(self, name: str) -> Residual:
        return self.by_target.setdefault(_target_of(name), Residual())

    def add(self, name: str, base: mx.array, delta: mx.array, merged: mx.array, stored: mx.array) -> None:
        target = _target_of(name)
        residual = self.residual(name)
        residual.add(base, delta, merged, stored)
        self.record["targets"][target] = residual.summary()


def _target_of(name: str) -> str:
    for key, target in (
        (".experts.gate_up", "experts gate_up (MXFP4)"),
        (".experts.down", "experts down (MXFP4)"),
        (".attn.qkv", "attention qkv"),
        (".attn.out", "attention out"),
        (".router.", "router"),
    ):
        if key in name:
            return target
    return name


def plan_fuse(folder: Path, adapter: str | os.PathLike, preset, dtype: str = "bfloat16"):
    """The converter's plan for `folder`, with the adapter's tensors produced merged. Returns (plan,
    report); the report fills in while the plan is written."""
    from .adapters import load_adapter
    from .convert.plan import DTYPES, Job, _dense_part, plan_conversion
    from .lora import weight_deltas
    from .model import Transformer
    from .weights import EXPERT_WEIGHT

    plan = plan_conversion(folder, preset, dtype)
    skeleton = Transformer(plan.config, quantized_experts=True)  # lazy zeros: only the adapter is read
    summary = load_adapter(skeleton, adapter, dtype=mx.float32)
    deltas = weight_deltas(skeleton)
    report = FuseReport(str(Path(adapter).expanduser()), summary["kind"])
    target = DTYPES[dtype]
    for shard in plan.shards:
        jobs, skip = [], set()
        specs = {t.name: t for t in shard.tensors}
        for job in shard.jobs:
            name = job.outputs[0].name
            if name in skip:
                continue
            if name not in deltas:
                jobs.append(job)
                continue
            srcs, build = plan.recipes[name]
            if EXPERT_WEIGHT.search(name):
                scales = name.replace("_weight", "_scales")
                outputs = job.outputs if len(job.outputs) > 1 else [job.outputs[0], specs[scales]]
                skip.add(scales)  # produced with the weight
                produce = _expert_producer(plan, name, deltas[name], report)
                jobs.append(Job(outputs, produce, "experts"))
            else:
                q = preset.spec().get(_dense_part(name) or "")
                produce = _dense_producer(plan, name, srcs, build, deltas[name], target, q, report)
                jobs.append(Job(job.outputs, produce, job.component))
        shard.jobs = jobs
        assert [t.name for t in shard.tensors] == list(specs), "fuse changed the shard's tensor order"
    plan.provenance["fused_adapter"] = report.record
    return plan, report


def _dense_producer(plan, name, srcs, build, delta, target, q, report: FuseReport):
    def produce() -> Iterator[tuple[mx.array, ...]]:
        base = build(*(plan.tensors[s] for s in srcs)).astype(mx.float32)
        merged = base + delta
        if q:
            parts = mx.quantize(
                merged.astype(target),
                group_size=q["group_size"],
                bits=q["bits"],
                mode=q.get("mode", "affine"),
            )
            stored = mx.dequantize(
                *parts, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine")
            )
            report.add(name, base, delta, merged, stored.astype(mx.float32))
            yield tuple(parts)
        else:
            out = merged.astype(target)
            report.add(name, base, delta, merged, out.astype(mx.float32))
            yield (out,)

    return produce


def _expert_producer(plan, name: str, delta: mx.array, report: FuseReport):
    """dequantize(W_e) + delta_e -> MXFP4, expert by expert, in blocks of rows: (values, scales) chunks."""
    from .convert.produce import QUANTIZE_BLOCK_VALUES

    srcs, build = plan.recipes[name]
    scale_name = name.replace("_weight", "_scales")

    def produce() -> Iterator[tuple[mx.array, mx.array]]:
        w = build(*(plan.tensors[s] for s in srcs))
        float_source = mx.issubdtype(w.dtype, mx.floating)
        if not float_source:
            s_srcs, s_build = plan.recipes[scale_name]
            scales = s_build(*(plan.tensors[s] for s in s_srcs))
        for e in range(w.shape[0]):
            rows = w.shape[1]
            cols = delta.shape[-1]
            step = max(1, QUANTIZE_BLOCK_VALUES // cols)
            for r in range(0, rows, step):
                if float_source:
                    base = w[e, r : r + step].astype(mx.float32)
                else:
                    base = mxfp4.dequantize(w[e, r : r + step], scales[e, r : r + step])
                d = delta[e, r : r + step]
                merged = base + d
                values, new_scales = mxfp4.quantize(merged)
                stored = mxfp4.dequantize(values, new_scales)
                report.add(name, base, d, merged, stored)
                yield values, new_scales

    return produce


def fuse(model: str, adapter: str, out: Path, preset_name: str = "reference", dtype: str = "bfloat16",
         force: bool = False, on_progress=None):  # fmt: skip
    """Write the fused model; returns (the converter's Result, the report)."""
    from .convert import converter as C
    from .convert.hub import resolve_source
    from .convert.presets import get_preset

    source = resolve_source(model)
    plan, report = plan_fuse(source.folder, adapter, get_preset(preset_name), dtype)
    keep = [Path(adapter).expanduser()]  # --force must not replace the folder holding the adapter
    result = C.convert(source, out, plan, force=force, on_progress=on_progress, keep=keep)
    return result, report


# ---- CLI ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import cli_args as A
    from .convert.presets import PRESETS

    p = A.parser(
        "oss-mlx fuse",
        "Merge a LoRA adapter (oss-mlx finetune's or PEFT's) into a model and write it in the converted "
        "layout: attention and router weights merged exactly (then cast), experts re-quantized to MXFP4; "
        "the error of the re-quantization is reported. Running the adapter unmerged (--adapter) is exact.",
    )
    p.add_argument("--model", "-m", required=True, help="the base: hub id or checkpoint folder (any layout)")
    p.add_argument("--adapter", required=True, metavar="DIR", help="the adapter folder")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="the fused model's folder")
    p.add_argument("--quality", default="reference", choices=list(PRESETS), help="as oss-mlx convert")
    p.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="of the float weights"
    )
    p.add_argument("--force", action="store_true", help="replace --out (once the new one is complete)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    err, out = Console(stderr=True, highlight=False), Console(highlight=False)
    from .convert.folder import DestError, check_dest

    local = [p for p in (Path(args.model).expanduser(), Path(args.adapter).expanduser()) if p.exists()]
    try:  # before anything is read; fuse() checks again
        check_dest(args.out, args.force, keep=local)
    except DestError as e:
        print(f"oss-mlx fuse: error: {e}", file=sys.stderr)
        return 2
    err.print(f"fusing {args.adapter} into {args.model} -> {args.out} …")
    result, report = fuse(args.model, args.adapter, args.out, args.quality, args.dtype, args.force)
    t = Table(title=f"fused {report.kind} adapter: what the stored weights kept of W + delta")
    for col in ("target", "error / |W + delta|", "error / |delta|", "delta kept"):
        t.add_column(col, justify="left" if col == "target" else "right")
    for target, r in sorted(report.by_target.items()):
        s = r.summary()
        t.add_row(
            target, f"{s['error_vs_weight']:.2e}", f"{s['error_vs_delta']:.3f}", f"{s['delta_kept']:.1%}"
        )
    out.print(t)
    worst = max((r.summary()["error_vs_delta"] for r in report.by_target.values()), default=0.0)
    if worst > 0.5:
        err.print(
            "[yellow]the re-quantization lost much of the adapter's effect on some weights: for exact "
            f"results run the base with --adapter {args.adapter} instead of the fused model[/]"
        )
    out.print(f"written: {result.dest} ({result.bytes_written:,} bytes)")
    return 0
