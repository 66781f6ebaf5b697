"""`oss-mlx fuse`: an adapter merged into a converted model. Exact where the output format holds the
merged weights exactly (attention and router in float32); experts re-quantized to MXFP4 with the
error reported, and the report's numbers equal a computation of our own from the written files."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import rel_err
from hf_reference import VOCAB, add_lora, clear_routing_tokens

from oss_mlx import mxfp4
from oss_mlx.adapters import load_adapter
from oss_mlx.fuse import fuse
from oss_mlx.loader import load_model
from oss_mlx.lora import weight_deltas
from oss_mlx.synthetic import SyntheticSpec, write_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SPEC = SyntheticSpec.tiny(
    num_layers=3, num_experts=8, experts_per_token=4, vocab_size=VOCAB, hidden_size=64,
    intermediate_size=96, head_dim=16, num_attention_heads=8, num_key_value_heads=2, sliding_window=16,
)  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory, vocab_dir):  # the fused folder is a converted one: the vocabulary is copied in
    root = tmp_path_factory.mktemp("fuse")
    for layout in ("hf-mxfp4", "hf-float"):
        write_checkpoint(root / layout, SPEC, layout=layout, seed=5, dtype="float32")
    return root


def peft_adapter(base, out, **lora):
    """The adapter's folder, and tokens the adapted model routes with no near tie (hf_reference)."""
    model = transformers.GptOssForCausalLM.from_pretrained(
        base / "hf-float", dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    pm = add_lora(torch, peft, model.eval(), **lora)
    pm.save_pretrained(out)
    return out, clear_routing_tokens(torch, pm, (1, 48))


def logits(folder, tokens, adapter=None, **kw):
    model, _ = load_model(folder, dtype=mx.float32, **kw)
    if adapter is not None:
        load_adapter(model, adapter)
    return np.array(model(mx.array(tokens)))


def test_attention_and_router_fuse_exactly(base, tmp_path):
    adapter, ids = peft_adapter(base, tmp_path / "a", parameters=["mlp.router.weight"])
    result, report = fuse(str(base / "hf-mxfp4"), str(adapter), tmp_path / "fused", dtype="float32")
    fused = logits(result.dest, ids)
    unfused = logits(base / "hf-mxfp4", ids, adapter)
    assert rel_err(logits(base / "hf-mxfp4", ids), unfused) > 1e-2  # the adapter matters
    assert rel_err(fused, unfused) <= 1e-5
    for target, r in report.by_target.items():  # float32 holds W + delta exactly
        assert r.summary()["delta_kept"] == pytest.approx(1.0, abs=1e-5), target
    cfg = json.loads((result.dest / "config.json").read_text())["oss_mlx"]
    assert cfg["fused_adapter"]["kind"] == "peft" and "attention qkv" in cfg["fused_adapter"]["targets"]
    # experts the adapter does not touch are copied byte for byte
    src = mx.load(str(next((base / "hf-mxfp4").glob("*.safetensors"))))
    out = mx.load(str(result.dest / "model-layer-00.safetensors"))
    blocks = src["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    assert bytes(np.array(out["blocks.0.mlp.experts.gate_up_weight"])) == bytes(np.array(blocks))


def test_experts_requantized_with_the_error_reported(base, tmp_path):
    """Experts re-quantized to MXFP4: the report equals what the written tensors hold, computed here;
    the expert tensors the adapter leaves alone keep their bytes; the CLI prints the table."""
    adapter, ids = peft_adapter(
        base, tmp_path / "a", modules=[], parameters=["mlp.experts.gate_up_proj"], seed=4
    )
    out = tmp_path / "fused"
    run = subprocess.run(
        [sys.executable, "-m", "oss_mlx.cli", "fuse", "--model", str(base / "hf-mxfp4"), "--adapter",
         str(adapter), "--out", str(out), "--dtype", "float32"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "experts gate_up (MXFP4)" in run.stdout and "delta kept" in run.stdout
    report = json.loads((out / "config.json").read_text())["oss_mlx"]["fused_adapter"]["targets"]
    assert list(report) == ["experts gate_up (MXFP4)"]
    model, _ = load_model(base / "hf-mxfp4", dtype=mx.float32)
    load_adapter(model, adapter)
    deltas = weight_deltas(model)
    src = mx.load(str(next((base / "hf-mxfp4").glob("*.safetensors"))))
    sums = np.zeros(4)
    for i, block in enumerate(model.blocks):
        experts, name = block.mlp.experts.base, f"blocks.{i}.mlp.experts.gate_up_weight"
        w = mxfp4.dequantize(experts.gate_up_weight, experts.gate_up_scales)
        shard = mx.load(str(out / f"model-layer-{i:02d}.safetensors"))
        stored = mxfp4.dequantize(shard[name], shard[name.replace("_weight", "_scales")])
        d = np.array(deltas[name], dtype=np.float64)
        w, stored = np.array(w, dtype=np.float64), np.array(stored, dtype=np.float64)
        merged = w + d
        sums += [(merged**2).sum(), (d**2).sum(), ((stored - merged) ** 2).sum(), ((stored - w) * d).sum()]
        down = shard[f"blocks.{i}.mlp.experts.down_weight"]  # not adapted: the source's bytes
        assert bytes(np.array(down)) == bytes(np.array(src[f"model.layers.{i}.mlp.experts.down_proj_blocks"]))
    got = report["experts gate_up (MXFP4)"]
    assert got["error_vs_weight"] == pytest.approx(np.sqrt(sums[2] / sums[0]), rel=1e-4)
    assert got["error_vs_delta"] == pytest.approx(np.sqrt(sums[2] / sums[1]), rel=1e-4)
    assert got["delta_kept"] == pytest.approx(sums[3] / sums[1], rel=1e-4)
    assert 0 < got["error_vs_weight"] < 0.2
    # the fused model runs and carries the adapter's effect: nearer the unfused adapter than the base is
    # (this random delta is as large as the weights, so the re-quantization error is large as well)
    fused, unfused = logits(out, ids), logits(base / "hf-mxfp4", ids, adapter)
    assert 0 < rel_err(fused, unfused) < 0.5 * rel_err(logits(base / "hf-mxfp4", ids), unfused)


def test_force_never_deletes_the_adapter_or_a_users_files(base, tmp_path):
    """--out DIR --force replaces an earlier fused model only: not the folder holding the adapter, not a
    folder of the user's; refused in one line with status 2 before anything is read."""
    project = tmp_path / "project"
    adapter = project / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")  # refused before the adapter is read
    (project / "notes.txt").write_text("mine")
    for out, words in [(project, "contains"), (adapter, "contains"), (tmp_path, "contains")]:
        run = subprocess.run(
            [sys.executable, "-m", "oss_mlx.cli", "fuse", "--model", str(base / "hf-mxfp4"), "--adapter",
             str(adapter), "--out", str(out), "--force"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 2, run.stderr
        assert words in run.stderr and "Traceback" not in run.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.txt").write_text("years of work")
    run = subprocess.run(
        [sys.executable, "-m", "oss_mlx.cli", "fuse", "--model", str(base / "hf-mxfp4"), "--adapter",
         str(adapter), "--out", str(other), "--force"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2 and "is not an earlier conversion" in run.stderr, run.stderr
    assert (other / "thesis.txt").read_text() == "years of work"
    assert (project / "notes.txt").read_text() == "mine" and (adapter / "adapter_config.json").exists()
