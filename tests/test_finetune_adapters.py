"""Adapter folders that are damaged or hold values no model can use: one AdapterError naming the file
and the value (the commands print it as one line), never another exception or NaN logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from oss_mlx.adapters import AdapterError, load_adapter, save_adapter
from oss_mlx.loader import load_model
from oss_mlx.lora import LoRAConfig, adapter_weights, attach


@pytest.fixture(scope="module")
def saved(tiny_checkpoint, tmp_path_factory) -> Path:
    """A random adapter on attention and experts, in our format (ours/) and PEFT's (peft/)."""
    root = tmp_path_factory.mktemp("adapters")
    model, _ = load_model(tiny_checkpoint, dtype=mx.float32)
    attach(model, LoRAConfig(rank=2, targets="attention,experts").sites(model.config.num_layers), seed=3)
    model.load_weights(
        [(k, mx.random.normal(v.shape, key=mx.random.key(1))) for k, v in adapter_weights(model).items()],
        strict=False,
    )
    save_adapter(model, root / "ours")
    save_adapter(model, root / "peft", format="peft")
    return root


def variant(saved: Path, tmp_path: Path, kind: str, name: str, **changes) -> Path:
    """A copy of saved/KIND with adapter_config.json's keys changed."""
    folder = tmp_path / name
    folder.mkdir()
    for f in (saved / kind).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    return folder


def with_tensors(folder: Path, change) -> Path:
    """Rewrite the folder's safetensors file with change(name, array) applied to every tensor."""
    path = next(folder.glob("*.safetensors"))
    tensors = {k: change(k, v) for k, v in mx.load(str(path)).items()}
    mx.save_safetensors(str(path), tensors)
    return folder


def test_damaged_configs_are_adapter_errors(tiny_checkpoint, saved, tmp_path):
    cases = [
        ("ours", "sites_text", {"sites": "abc"}, r"no valid 'sites' section"),
        ("ours", "sites_list", {"sites": [[2, 1.0]]}, r"no valid 'sites' section"),
        ("ours", "version_text", {"format_version": "2"}, r"format_version '2' must be a whole number"),
        ("peft", "bad_pattern", {"alpha_pattern": {"[": 4}}, r"alpha_pattern '\[' is not a valid pattern"),
        ("peft", "pattern_list", {"alpha_pattern": [1, 2]}, r"alpha_pattern must be an object"),
    ]
    for kind, name, changes, message in cases:
        folder = variant(saved, tmp_path, kind, name, **changes)
        model, _ = load_model(tiny_checkpoint, dtype=mx.float32)
        with pytest.raises(AdapterError, match=message):
            load_adapter(model, folder)


def test_peft_tensors_of_impossible_shapes_are_adapter_errors(tiny_checkpoint, saved, tmp_path):
    """Rank 0 (a division by zero), a 1-D lora_A, lora_A and lora_B of different ranks."""
    shapes = {
        "rank0": lambda k, v: mx.zeros((0, v.shape[1])) if "lora_A" in k else mx.zeros((v.shape[0], 0)),
        "flat": lambda k, v: v.reshape(-1) if "lora_A" in k else v,
        "ranks": lambda k, v: v[:, :1] if "lora_B" in k else v,
    }
    for name, change in shapes.items():
        folder = with_tensors(variant(saved, tmp_path, "peft", name), change)
        model, _ = load_model(tiny_checkpoint, dtype=mx.float32)
        with pytest.raises(AdapterError, match=r"LoRA needs A \[r, in\] and B \[out, r\]"):
            load_adapter(model, folder)


def test_non_finite_adapter_values_are_refused(tiny_checkpoint, saved, tmp_path):
    """A NaN anywhere in an adapter (a diverged run) makes every logit NaN: refused, ours and PEFT's."""
    for kind in ("ours", "peft"):
        folder = variant(saved, tmp_path, kind, f"nan-{kind}")
        first = sorted(mx.load(str(next(folder.glob("*.safetensors")))))[0]
        with_tensors(folder, lambda k, v, first=first: mx.full(v.shape, float("nan")) if k == first else v)
        model, _ = load_model(tiny_checkpoint, dtype=mx.float32)
        with pytest.raises(AdapterError, match=r"holds NaN or infinite values"):
            load_adapter(model, folder)
    model, _ = load_model(tiny_checkpoint, dtype=mx.float32)
    load_adapter(model, saved / "ours")  # the undamaged one loads
    assert mx.isfinite(model(mx.array([[1, 2, 3]]))).all().item()


def test_the_commands_say_it_in_one_line(tiny_checkpoint, saved, tmp_path):
    """generate --adapter and fuse on a damaged config: status 1, `error:`, no internal error."""
    folder = variant(saved, tmp_path, "ours", "damaged", sites="abc")
    env = {**os.environ}
    for args in (
        ["generate", "--model", str(tiny_checkpoint), "--adapter", str(folder), "--max-tokens", "2", "hi"],
        ["fuse", "--model", str(tiny_checkpoint), "--adapter", str(folder), "--out", str(tmp_path / "f")],
    ):
        r = subprocess.run(
            [sys.executable, "-m", "oss_mlx.cli", *args], capture_output=True, text=True, timeout=120, env=env
        )
        assert r.returncode == 1, r.stderr
        assert "error:" in r.stderr and "no valid 'sites' section" in r.stderr, r.stderr
        assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "f").exists()
