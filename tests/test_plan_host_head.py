"""The memory planner counts the CPU decode step's float32 copy of the unembedding (host_head.py)
where this process runs on the CPU, and the expert-streaming plan counts it in what stays resident:
the planner's minimum budget is then the loader's, byte for byte."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import pytest

from oss_mlx import host_head
from oss_mlx.config import read_config
from oss_mlx.decode import DecodeStep
from oss_mlx.errors import MemoryBudgetError
from oss_mlx.loader import load_model
from oss_mlx.memory import MemoryPlan
from oss_mlx.runtime import runtime_of

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the host head runs on the CPU only")


def test_the_copy_the_decode_step_makes_is_what_the_plan_counts(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint, warm_up=False)
    made = DecodeStep(model).host_heads.for_model(model)
    assert made is not None
    config, _ = read_config(tiny_checkpoint)
    plan = MemoryPlan(config, "reference")
    assert plan.host_head_bytes == made.weight.nbytes > 0
    assert plan.total == plan.weights_total + made.weight.nbytes + plan.kv_bytes + plan.activation_bytes
    # Another machine (oss-mlx plan --memory N): its backend is not this one's.
    assert MemoryPlan(config, "reference", host_head=False).host_head_bytes == 0
    # A quantized unembedding takes MLX's quantized matmul: no copy.
    assert MemoryPlan(config, "small").host_head_bytes == 0


def test_the_switch_off_means_no_copy_counted(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv(host_head.ENV, "0")
    config, _ = read_config(tiny_checkpoint)
    assert MemoryPlan(config, "reference").host_head_bytes == 0


def test_streaming_counts_the_copy_and_agrees_with_the_planner(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint, memory_budget="10GB", warm_up=False)
    plan = runtime_of(model).streaming
    copy = host_head.model_copy_bytes(model)
    assert copy == model.unembedding.weight.size * 4
    config, raw = read_config(tiny_checkpoint)
    planner = MemoryPlan(
        config, "reference", 4096, quantization=(raw.get("oss_mlx") or {}).get("quantization")
    )
    assert planner.streaming_minimum() == plan.minimum_budget
    with pytest.raises(MemoryBudgetError, match="too small"):
        load_model(tiny_checkpoint, memory_budget=plan.minimum_budget - 1, warm_up=False)
    assert runtime_of(load_model(tiny_checkpoint, memory_budget=plan.minimum_budget)[0]).streaming.slots


def test_oss_mlx_plan_shows_the_copy_on_this_machine_only(tiny_checkpoint):
    def plan(*extra: str) -> str:
        argv = [sys.executable, "-m", "oss_mlx.cli", "plan", str(tiny_checkpoint), *extra]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout

    config, _ = read_config(tiny_checkpoint)
    here = plan()
    assert "host head" in here
    assert f"{host_head.copy_bytes(config.vocab_size, config.hidden_size):,}" in here
    assert "host head" not in plan("--memory", "16")
