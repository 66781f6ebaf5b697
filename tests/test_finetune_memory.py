"""The training memory planner against measured peaks (MLX's CPU backend, small shapes), and the GPU
benchmark's command run here at tiny shapes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from oss_mlx.config import ModelConfig
from oss_mlx.lora import LoRAConfig, parameter_count
from oss_mlx.machine import GiB, Machine
from oss_mlx.memory import TrainingPlan, choose_checkpointing

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "finetune_bench.py"


def bench():
    spec = importlib.util.spec_from_file_location("finetune_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "plain"])
def test_plan_bounds_the_measured_peak(checkpointing):
    """Shapes unlike the fit's (docs/FINETUNE.md): the plan is above the peak, and not far above."""
    row = bench().run(
        "tiny", length=300, batch=1, rank=8, targets="attention,experts", checkpointing=checkpointing,
        steps=1, warmup=1, num_layers=3, vocab_size=4096, hidden_size=128, intermediate_size=192,
    )  # fmt: skip
    ratio = row["planned_over_measured"]
    assert 1.0 <= ratio <= 1.6, row


def test_the_benchmark_command_runs_at_tiny_shapes(tmp_path):
    from oss_mlx.bench_results import read_rows

    out, results = tmp_path / "rows.json", tmp_path / "results.jsonl"
    argv = ["--config", "tiny", "--length", "16", "--steps", "1", "--warmup", "1", "--json", str(out)]
    assert bench().main([*argv, "--results", str(results)]) == 0
    rows = json.loads(out.read_text())
    appended = read_rows(results)  # the results files' rows: provenance + the measurement
    assert [r["kind"] for r in appended] == ["finetune"] * 2 and all(r["commit"] for r in appended)
    assert [r["peak_memory_bytes"] for r in appended] == [r["peak_memory_bytes"] for r in rows]
    assert [r["checkpointing"] for r in rows] == [True, False]
    for r in rows:
        assert r["tokens_per_second"] > 0 and r["peak_memory_bytes"] > r["planned_parts"]["weights"]
        assert r["planned_over_measured"] >= 1.0
    assert rows[0]["losses"] == rows[1]["losses"]  # checkpointing changes memory, not the math


def test_auto_checkpointing_and_refusal_at_20b_shapes():
    config = ModelConfig()  # gpt-oss-20b
    sites = LoRAConfig(rank=8).sites(config.num_layers)
    plan = TrainingPlan(config, parameter_count(sites, config), length=2048, fused_attention=True)
    big, mac24, mac16 = (Machine.of_size(g).working_set_bytes for g in (128, 24, 16))
    chosen, why = choose_checkpointing(plan, big)
    assert not chosen.checkpointing and "off" in why
    off = plan.replace(checkpointing=False)
    on = plan.replace(checkpointing=True)
    assert on.total < off.total
    if on.fits(mac24) and not off.fits(mac24):
        chosen, why = choose_checkpointing(plan, mac24)
        assert chosen.checkpointing and "without it" in why
    with pytest.raises(MemoryError, match="training does not fit.*--max-length"):
        choose_checkpointing(plan.replace(length=32768), mac24)
    with pytest.raises(MemoryError, match="alone need"):
        choose_checkpointing(plan, mac16 // 2)
    assert plan.weights == pytest.approx(12.82 * GiB, rel=1e-3)  # the inference planner's weights


@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("--length", "0", "--length: must be between 1 and 131,072"),
        ("--checkpointing", "sometimes", "--checkpointing: must be a comma-separated list of on, off"),
        ("--targets", "mlp", "unknown LoRA target 'mlp'"),
        ("--steps", "-1", "--steps: must be at least 1"),
        ("--results", "/no/such/folder/r.jsonl", "the folder /no/such/folder does not exist"),
    ],
)
def test_the_benchmark_refuses_bad_values_before_building_anything(flag, value, words):
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, str(BENCH), "--config", "tiny", flag, value],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2 and words in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_the_gpu_stage_command_parses(tmp_path):
    """device_profile.sh's `finetune` stage, printed by DRY_RUN: the flags the GPU run will get are the
    benchmark's (a typo would cost a GPU call)."""
    import os
    import shlex
    import subprocess

    script = BENCH.parent / "device_profile.sh"
    env = {**os.environ, "DRY_RUN": "1", "STAGES": "finetune", "OUT": str(tmp_path)}
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60, env=env)
    lines = [x for x in run.stdout.splitlines() if "finetune_bench.py" in x]
    assert run.returncode == 0 and len(lines) == 1, run.stdout + run.stderr
    argv = shlex.split(lines[0])
    args = bench().build_parser().parse_args(argv[argv.index("benchmarks/finetune_bench.py") + 1 :])
    assert (args.config, args.length, args.batch, args.rank) == ("20b", 2048, 1, 8)
    assert args.checkpointing == ["on", "off"] and args.results == str(tmp_path / "results.jsonl")


def test_plan_finetune_prints_the_training_plan(capsys):
    """`oss-mlx plan --config 20b --finetune --memory 32`: both plans in words and the table row, the
    numbers the planner computes for the same settings."""
    from oss_mlx.plan_cli import main, training_plans

    assert main(["--config", "20b", "--finetune", "--context", "2048", "--memory", "32"]) == 0
    out = capsys.readouterr().out
    plans = training_plans(ModelConfig(), 8, 2048)
    words = " ".join(out.split())  # rich wraps the lines at the terminal's width
    for plan in plans.values():
        assert " ".join(plan.summary().split()) in words
    on, off = (plans[ck].total / GiB for ck in (True, False))
    assert f"{on:.2f} GiB fits" in out and f"{off:.2f} GiB no" in out  # 32 GB Mac: on fits, off does not


def test_a_macs_plan_counts_the_unfused_attention_and_cuda_only_aligned_rows_are_fused():
    """MLX trains with the unfused attention on Metal (docs/UPSTREAM.md item 12): the Mac predictions
    count a full layer's scores, in query tiles of FULL_TRAIN_TILE (attention.causal_tiles_sdpa) for
    longer rows; CUDA's fused backward takes rows of a multiple of 128 queries only, so other lengths
    count a full layer's whole scores in the backward there (untiled), none kept."""
    from dataclasses import replace

    from oss_mlx.attention import FULL_TRAIN_TILE
    from oss_mlx.memory import (
        ATTENTION_BACKWARD_SCORES,
        ATTENTION_SAVED_SCORES,
        ATTENTION_TILED_BACKWARD_SCORES,
        attention_score_bytes,
    )
    from oss_mlx.plan_cli import training_plans

    config = replace(ModelConfig(), vocab_size=1024)  # the blocks, not the loss, set the peak
    T, per_key = 2048, 64 * 2  # 64 heads, bf16
    mac = training_plans(config, rank=8, length=T)
    assert not mac[True].fused_attention and not mac[False].fused_attention and not mac[True].cuda
    full, sliding = attention_score_bytes(config, T, 1, 2)
    assert full == per_key * T * T
    tiles = [(s, min(s + FULL_TRAIN_TILE, T)) for s in range(0, T, FULL_TRAIN_TILE)]
    saved = per_key * sum((e - s) * e for s, e in tiles)  # each tile's queries over its keys
    assert saved < 0.6 * full
    backward = (
        ATTENTION_TILED_BACKWARD_SCORES * per_key * FULL_TRAIN_TILE * T + ATTENTION_SAVED_SCORES * saved
    )
    fused = mac[True].replace(fused_attention=True)
    scores = mac[True].activation_parts["block"] - fused.activation_parts["block"]
    assert scores == pytest.approx(backward, rel=1e-6) and scores < ATTENTION_BACKWARD_SCORES * full / 2
    kept = (
        mac[False].activation_parts["kept"]
        - mac[False].replace(fused_attention=True).activation_parts["kept"]
    )
    assert kept == pytest.approx(ATTENTION_SAVED_SCORES * 12 * (saved + sliding), rel=1e-6)
    short = mac[True].replace(length=FULL_TRAIN_TILE)  # one tile: the whole scores, as before
    short_full, _ = attention_score_bytes(config, FULL_TRAIN_TILE, 1, 2)
    short_scores = (
        short.activation_parts["block"] - short.replace(fused_attention=True).activation_parts["block"]
    )
    assert short_scores == pytest.approx(ATTENTION_BACKWARD_SCORES * short_full, rel=1e-6)
    ragged, aligned = fused.replace(length=T - 1), fused.replace(length=T)
    full_ragged, _ = attention_score_bytes(config, T - 1, 1, 2)
    assert ragged.activation_parts["kept"] == aligned.replace(length=T - 1).activation_parts["kept"]
    extra = ragged.activation_parts["block"] - aligned.activation_parts["block"]
    assert extra == pytest.approx(ATTENTION_BACKWARD_SCORES * full_ragged, rel=1e-3)


def test_checkpointed_loss_holds_one_chunk_of_logits(monkeypatch):
    """With gradient checkpointing the loss and its gradient are evaluated a chunk of LOSS_CHUNK rows
    at a time: the same values to the bit as one graph, whose peak held every chunk's logits (on CUDA
    5.2 GB for 2,048 rows of the real vocabulary)."""
    import mlx.core as mx
    import numpy as np

    from oss_mlx.bench import preset_config
    from oss_mlx.finetune import loss
    from oss_mlx.finetune.data import Batch
    from oss_mlx.testing.random_model import random_model

    monkeypatch.setattr(loss, "LOSS_CHUNK", 128)
    from dataclasses import replace

    config = replace(preset_config("tiny"), vocab_size=16384)
    model = random_model(config, dtype=mx.float32)
    T = 1024  # 8 chunks
    labels = np.random.default_rng(0).integers(0, config.vocab_size, T).astype(np.int32)
    batch = Batch(np.zeros((1, T), np.int32), np.arange(T, dtype=np.int32), labels, T)
    x = mx.random.normal((1, T, config.hidden_size))
    mx.eval(x)

    def peak(f):
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        out = f()
        mx.eval(out)
        return mx.get_peak_memory() - base, out

    one_graph, (l1, g1) = peak(lambda: mx.value_and_grad(lambda x: loss.head_loss(model, x, batch))(x))
    chunked, (l2, g2) = peak(lambda: loss.head_value_and_grad(model, x, batch))
    assert l1.item() == l2.item() and mx.array_equal(g1, g2).item()
    chunk_logits = 128 * config.vocab_size * 4
    assert chunked < 4 * chunk_logits < one_graph / 2, (chunked, one_graph, chunk_logits)
