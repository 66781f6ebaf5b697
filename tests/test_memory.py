"""oss_mlx.memory: the planner's arithmetic, fit and advice; oss_mlx.machine; `oss-mlx plan` (plan_cli)."""

from __future__ import annotations

import math

import pytest

from oss_mlx import machine
from oss_mlx.config import ModelConfig
from oss_mlx.memory import GiB, Machine, MemoryPlan, kv_bytes, weight_bytes
from oss_mlx.plan_cli import main, named_config
from oss_mlx.synthetic import SyntheticSpec, checkpoint_tensors

C20, C120 = named_config("20b"), named_config("120b")


def _st_bytes(shape, dtype: str) -> int:
    return math.prod(shape) * {"BF16": 2, "F16": 2, "F32": 4, "U8": 1}[dtype]


@pytest.mark.parametrize("size", ["20b", "120b"])
def test_reference_weights_equal_the_hub_checkpoint(size):
    """The hub layout holds exactly the reference preset's bytes (13.76 GB for 20b, 65.2 GB for 120b)."""
    spec = SyntheticSpec.preset(size)
    hub = sum(_st_bytes(shape, dt) for shape, dt in checkpoint_tensors(spec, "hf-mxfp4").values())
    assert sum(weight_bytes(named_config(size)).values()) == hub


def test_20b_components_by_hand():
    w = weight_bytes(C20)
    per_expert = 5760 * 2880 // 2 + 5760 * 90 + 5760 * 2 + 2880 * 2880 // 2 + 2880 * 90 + 2880 * 2
    assert w["experts"] == 24 * 32 * per_expert == 10_165_616_640
    assert w["embedding"] == w["unembedding"] == 201088 * 2880 * 2
    attn = (5120 * 2880 + 5120 + 2880 * 4096 + 2880 + 64) * 2
    assert w["attention"] == 24 * attn
    assert sum(w.values()) == 13_761_264_768
    # 8-bit affine, group 64: 1 byte per value + a bf16 scale and bias per 64 values
    b = weight_bytes(C20, {"embedding": {"bits": 8, "group_size": 64, "mode": "affine"}})
    assert b["embedding"] == 201088 * 2880 + 201088 * 45 * 2 * 2


def test_kv_cache_full_layers_grow_sliding_layers_are_bounded():
    per_token = 2 * 8 * 64 * 2  # keys + values, 8 kv heads of 64, bf16
    assert kv_bytes(C20, 1024) == 12 * per_token * 1024 + 12 * per_token * 128
    assert kv_bytes(C20, 100) == 24 * per_token * 100
    plan = MemoryPlan(C20, "reference", 4096)
    grow, bounded = plan.kv_bytes_per_1k()
    assert grow == 12 * per_token * 1024 == 24 << 20  # 24 MiB per 1k tokens
    assert bounded == 12 * per_token * 128
    assert plan.with_context(8192).kv_bytes - plan.kv_bytes == 4 * grow


def test_presets_shrink_and_fit():
    ref, bal, small = (MemoryPlan(C20, p) for p in ("reference", "balanced", "small"))
    assert ref.weights_total > bal.weights_total > small.weights_total
    assert ref.weights["experts"] == small.weights["experts"]  # experts stay MXFP4
    assert ref.weights["other"] == small.weights["other"]  # router, norms never quantized
    assert ref.total == ref.weights_total + ref.kv_bytes + ref.activation_bytes
    assert ref.fits(ref.total) and not ref.fits(ref.total - 1)


def test_max_context_is_the_boundary():
    plan = MemoryPlan(C20, "small", 8192)
    ws = plan.weights_total + plan.activation_bytes + kv_bytes(C20, 5000)
    n = plan.max_context(ws)
    assert n == 5000
    assert plan.with_context(n).fits(ws) and not plan.with_context(n + 1).fits(ws)
    assert plan.max_context(plan.weights_total) == 0
    assert plan.max_context(1 << 50) == C20.max_position_embeddings


def test_machines():
    assert Machine.of_size(16).working_set_bytes == 16 * GiB * 2 // 3
    assert Machine.of_size(64).working_set_bytes == 48 * GiB
    assert Machine.of_size(24, "linux").working_set_bytes == 24 * GiB
    m = Machine.detect()
    assert m.ram_bytes > 0 and m.working_set_bytes > 0


def test_detect_uses_metal_working_set_on_a_mac(monkeypatch):
    monkeypatch.setattr(machine.sys, "platform", "darwin")
    monkeypatch.setattr(machine, "_metal_working_set", lambda: 12 * GiB)
    m = Machine.detect()
    assert m.platform == "mac" and m.working_set_bytes == 12 * GiB and "Metal" in m.how
    monkeypatch.setattr(machine, "_metal_working_set", lambda: None)  # no Metal: the approximation
    assert Machine.detect().working_set_bytes == machine.mac_working_set(Machine.detect().ram_bytes)


def test_advice():
    mac16 = Machine.of_size(16)
    advice = MemoryPlan(C20, "reference", 8192).advice(mac16)
    assert advice[0].startswith("does not fit")
    assert any("iogpu.wired_limit_mb=" in a for a in advice)
    mb = int(next(a for a in advice if "wired_limit_mb" in a).rsplit("=", 1)[1])
    assert mb % 1024 == 0 and mb * (1 << 20) <= machine.wired_limit_cap(16 * GiB)
    # a 24 GB Mac: smaller presets fit
    advice = MemoryPlan(C20, "reference", 8192).advice(Machine.of_size(24))
    assert any(a.startswith("use --quality") for a in advice) or advice[0].startswith("fits")
    assert MemoryPlan(C20, "small", 8192).advice(Machine.of_size(32))[0].startswith("fits")
    # 120b on 64 GB: no preset or context helps, expert streaming does
    advice = MemoryPlan(C120, "small", 8192).advice(Machine.of_size(64))
    assert len(advice) == 2 and "--memory-budget" in advice[1]
    assert MemoryPlan(C120, "reference", 8192).advice(Machine.of_size(128))[0].startswith("fits")
    assert MemoryPlan(named_config("20b"), "small", 1024).advice()  # this machine


def test_context_advice_when_weights_fit():
    plan = MemoryPlan(C20, "small", 131072)
    ws = plan.weights_total + plan.activation_bytes + kv_bytes(C20, 20000)
    m = Machine(ws * 2, ws, "linux", "test")
    assert any("--context 20000" in a for a in plan.advice(m))


def test_plan_cli(capsys, tmp_path):
    assert main(["--config", "20b", "--memory", "16", "--preset", "small"]) == 0
    out = capsys.readouterr().out
    for word in ("experts", "attention", "embedding", "unembedding", "kv cache", "total", "wired_limit_mb"):
        assert word in out
    assert main(["120b", "--memory", "128", "--context", "131072"]) == 0
    assert "fits" in capsys.readouterr().out
    cfg = tmp_path / "config.json"
    import json

    cfg.write_text(json.dumps(ModelConfig().to_hf_dict()))
    assert main([str(cfg), "--memory", "24", "--platform", "linux"]) == 0
    assert "fits" in capsys.readouterr().out
    cfg.write_text(json.dumps({"model_type": "llama"}))
    assert main([str(tmp_path)]) == 1
    assert "model_type" in capsys.readouterr().err


def test_a_memory_below_what_macos_keeps_is_not_a_negative_limit(capsys):
    assert main(["20b", "--memory", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "below what macOS itself needs" in out and "raised to -" not in out
    assert main(["20b", "--memory", "4"]) == 0  # room to raise the limit: the advice stays
    assert "GPU limit raised to" in capsys.readouterr().out


def test_plan_of_a_converted_folder_uses_its_preset(tmp_path, capsys):
    import json

    d = ModelConfig().to_hf_dict()
    d["oss_mlx"] = {"format_version": 1, "preset": "balanced", "dtype": "bfloat16"}
    from oss_mlx.convert.presets import PRESETS

    d["oss_mlx"]["quantization"] = PRESETS["balanced"].spec()
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert main([str(tmp_path), "--memory", "32"]) == 0
    assert "preset balanced" in capsys.readouterr().out


def test_weights_are_wired_on_metal(monkeypatch, tmp_path):
    """On a Mac the loader wires the weights (up to Metal's working set); elsewhere nothing is set."""
    import mlx.core as mx

    from oss_mlx.loader import load_model
    from oss_mlx.synthetic import SyntheticSpec, write_checkpoint

    folder = write_checkpoint(tmp_path / "m", SyntheticSpec.tiny(vocab_size=1024), layout="hf-mxfp4")
    calls = []
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 0)
    load_model(folder)
    assert calls == []  # no Metal here
    monkeypatch.setattr(machine, "_metal_working_set", lambda: 64 * GiB)
    model, _ = load_model(folder)
    from mlx.utils import tree_flatten

    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert calls == [weights + GiB]
    monkeypatch.setattr(machine, "_metal_working_set", lambda: GiB // 2)
    load_model(folder)
    assert calls[-1] == GiB // 2  # never above the working set


def test_streaming_advice_agrees_with_what_streaming_accepts(tmp_path):
    """The planner's --memory-budget advice uses the same minimum as expert streaming itself."""
    import re

    from oss_mlx.loader import load_model
    from oss_mlx.streaming import MemoryBudgetError, parse_budget, plan_streaming
    from oss_mlx.synthetic import SyntheticSpec, write_checkpoint

    plan20 = MemoryPlan(C20, "reference", 8192)
    advice = "\n".join(plan20.advice(Machine.of_size(16)))
    budget = re.search(r"--memory-budget (\S+)", advice)
    assert budget and parse_budget(budget.group(1)) >= plan20.streaming_minimum()

    spec = SyntheticSpec.tiny(vocab_size=1024, num_layers=4, num_experts=16)
    model, info = load_model(write_checkpoint(tmp_path / "m", spec, layout="hf-mxfp4"))
    need = MemoryPlan(info.config, "reference", 4096).streaming_minimum()
    assert plan_streaming(model, int(need * 1.02), context=4096).slots >= spec.experts_per_token
    with pytest.raises(MemoryBudgetError):
        plan_streaming(model, int(need * 0.98), context=4096)


def test_prefill_chunk_shrinks_where_memory_is_tight():
    """2,048-token chunks where their measured transient fits beside weights + KV, else 512: the
    120b at 8k needs ~74.6 GB with 2,048-token chunks, which a 72 GiB (77.3 GB) working set holds and
    a 72 GB one does not."""
    w120 = sum(weight_bytes(named_config("120b")).values())
    kv = kv_bytes(named_config("120b"), 8192)
    assert machine.prefill_chunk_for(w120, kv, 72 * 10**9) == 512
    assert machine.prefill_chunk_for(w120, kv, 72 * GiB) == 2048
    assert machine.prefill_chunk_for(10**9, 0, 64 * GiB) == 2048
    assert machine.prefill_chunk_for(10**9, 0, 10**9) == 512  # never below the smallest chunk


@pytest.mark.parametrize("gb,step", [("0.01", 512), ("1000", 2048)])
def test_load_picks_the_prefill_chunk_and_generation_uses_it(tiny_checkpoint, monkeypatch, gb, step):
    from oss_mlx import generation, runtime, scheduler
    from oss_mlx.loader import load_model
    from oss_mlx.runtime import runtime_of

    monkeypatch.setenv("OSS_MLX_MEMORY_GB", gb)
    model, _ = load_model(tiny_checkpoint)
    assert runtime_of(model).prefill_chunk == step
    seen = []
    real = generation.prefill_cuts

    def spy(n, chunk, marks=(), start=0):
        seen.append(chunk)
        return real(n, chunk, marks, start)

    monkeypatch.setattr(scheduler, "prefill_cuts", spy)
    options = generation.SamplingOptions(temperature=0, max_tokens=2)
    list(runtime.generate_tokens(model, [1, 2, 3], model.make_cache(), options, stop_ids=set()))
    list(runtime.generate_tokens(model, [4], model.make_cache(), options, set(), prefill_chunk=64))
    assert seen == [step, 64]


def test_a_streaming_budget_counts_toward_the_prefill_chunk(tiny_checkpoint, monkeypatch):
    """With expert streaming the expert cache fills up to the budget: that is the model's footprint."""
    from oss_mlx.loader import load_model
    from oss_mlx.runtime import runtime_of

    monkeypatch.setenv("OSS_MLX_MEMORY_GB", "10")  # room for 9 GB of prefill beside a tiny model...
    model, _ = load_model(tiny_checkpoint)
    assert runtime_of(model).prefill_chunk == 2048
    model, _ = load_model(tiny_checkpoint, memory_budget="2GB")  # ...not beside a 2 GB budget
    assert runtime_of(model).prefill_chunk == 512


def test_plan_shows_the_prefill_chunk_the_runtime_will_use(capsys):
    assert main(["--config", "120b", "--memory", "96", "--platform", "linux"]) == 0
    assert "prefill chunk at run time: 2,048 tokens" in capsys.readouterr().out
    assert main(["--config", "120b", "--memory", "68", "--platform", "linux"]) == 0  # 73.0 GB
    assert "prefill chunk at run time: 512 tokens" in capsys.readouterr().out
