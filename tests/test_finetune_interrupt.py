"""Interrupts and divergence in `oss-mlx finetune`: Ctrl-C in the middle of a step keeps the data
position, a checkpoint a killed save had moved aside is resumed from, an evaluation cut by Ctrl-C is
done again on --resume, and a diverging run stops instead of writing a NaN adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

TIMEOUT = 240


@pytest.fixture(scope="module")
def toy(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny model and ten one-answer conversations with different prompts (so skipping a batch
    changes the losses)."""
    root = tmp_path_factory.mktemp("interrupt")
    words = "red green apple tree river stone cloud fire window book".split()
    rows = []
    for i in range(10):
        question = " ".join(words[(i + j) % len(words)] for j in range(2 + i % 4)) + "?"
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": "blue."}]
        rows.append(json.dumps({"messages": messages}))
    (root / "train.jsonl").write_text("\n".join(rows[:7]) + "\n")
    (root / "valid.jsonl").write_text("\n".join(rows[7:]) + "\n")
    return root


def oss_mlx(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "oss_mlx.cli", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, **(env or {})},
    )


def finetune(model: Path, toy: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return oss_mlx(
        "finetune", "--model", str(model), "--data", str(toy / "train.jsonl"),
        "--valid", str(toy / "valid.jsonl"), "--out", str(out), "--lr", "3e-3", "--seed", "1", *extra,
    )  # fmt: skip


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line]


def make_trainer(model_dir: Path, toy: Path):
    from oss_mlx.finetune.data import RenderOptions, load_dataset
    from oss_mlx.finetune.trainer import TrainConfig, Trainer
    from oss_mlx.loader import load_model
    from oss_mlx.lora import LoRAConfig
    from oss_mlx.tokenizer import load_tokenizer

    data = load_dataset(toy / "train.jsonl", load_tokenizer(model_dir), RenderOptions())
    model, _ = load_model(model_dir, dtype=mx.float32)
    config = TrainConfig(lora=LoRAConfig(rank=4, dropout=0.1), steps=4, learning_rate=3e-3, seed=2)
    return Trainer(model, config, data)


def test_ctrl_c_inside_a_step_keeps_the_data_position(tiny_checkpoint, toy, monkeypatch):
    """KeyboardInterrupt while a step's gradients are computed (where a step spends its time): the
    trainer stays at the last completed step, so the checkpoint Ctrl-C saves resumes exactly."""
    from oss_mlx.finetune import trainer as T

    whole = make_trainer(tiny_checkpoint, toy)
    want = [whole.train_step().loss for _ in range(3)]

    cut = make_trainer(tiny_checkpoint, toy)
    assert cut.train_step().loss == want[0]
    real = T.value_and_grad

    def interrupted(*args, **kwargs):
        monkeypatch.setattr(T, "value_and_grad", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "value_and_grad", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cut.train_step()
    assert cut.step == 1 and (cut.order.position.epoch, cut.order.position.index) == (0, 1)
    assert int(cut.optimizer.step.item()) == 1
    assert [cut.train_step().loss for _ in range(2)] == want[1:]


def test_ctrl_c_while_a_step_is_applied_is_held_until_it_is_logged(tiny_checkpoint, toy, tmp_path):
    """SIGINT delivered while the optimizer update is applied: the step completes, its log row is
    written, the checkpoint Ctrl-C saves is of that step, and the resumed run equals an uninterrupted
    one (losses, eval losses, adapter bytes)."""
    steps = ["--steps", "4", "--save-every", "100", "--eval-every", "2"]
    whole = tmp_path / "whole"
    assert finetune(tiny_checkpoint, toy, whole, *steps).returncode == 0
    cut = tmp_path / "cut"
    # SIGINT to itself from inside the second step's update (a real signal, a real process)
    code = (
        "import os, signal, sys\n"
        "from oss_mlx.finetune import trainer as T\n"
        "real = T.Trainer.commit\n"
        "def commit(self, pending):\n"
        "    if self.step == 1:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(self, pending)\n"
        "T.Trainer.commit = commit\n"
        "from oss_mlx.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = [
        "finetune", "--model", str(tiny_checkpoint), "--data", str(toy / "train.jsonl"),
        "--valid", str(toy / "valid.jsonl"), "--out", str(cut), "--lr", "3e-3", "--seed", "1", *steps,
    ]  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 130, r.stderr
    assert "the last checkpoint (step-000002) is kept: continue with --resume" in r.stderr, r.stderr
    assert [row["step"] for row in log_rows(cut) if "loss" in row] == [1, 2]
    resumed = finetune(tiny_checkpoint, toy, cut, *steps, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = log_rows(whole), log_rows(cut)
    assert [(r["step"], "loss" in r) for r in a] == [(r["step"], "loss" in r) for r in b]
    for x, y in zip(a, b):
        key = "loss" if "loss" in x else "eval_loss"
        assert x[key] == pytest.approx(y[key], rel=1e-6), (x, y)
    assert (whole / "adapters.safetensors").read_bytes() == (cut / "adapters.safetensors").read_bytes()


def test_resume_redoes_an_evaluation_that_was_cut(tiny_checkpoint, toy, tmp_path):
    """Ctrl-C during the evaluation after step N saves step N's checkpoint without its eval loss:
    --resume evaluates it before going on, so the log is the uninterrupted run's."""
    out = tmp_path / "run"
    steps = ["--steps", "2", "--save-every", "2", "--eval-every", "2"]
    assert finetune(tiny_checkpoint, toy, out, *steps).returncode == 0
    full = log_rows(out)
    assert [r["step"] for r in full if "eval_loss" in r] == [0, 2]
    (out / "train_log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in full if not (r["step"] == 2 and "eval_loss" in r))
    )
    (out / "adapter_config.json").unlink()  # as an interrupted run leaves it
    r = finetune(tiny_checkpoint, toy, out, *steps, "--resume")
    assert r.returncode == 0, r.stderr
    again = log_rows(out)
    assert [r["step"] for r in again if "eval_loss" in r] == [0, 2]
    assert again[-1]["eval_loss"] == pytest.approx(full[-1]["eval_loss"], rel=1e-6)


def test_a_checkpoint_moved_aside_by_a_killed_save_is_resumed_from(tiny_checkpoint, toy, tmp_path):
    """A save that replaces step-N (a resumed run saving the same step) moves the old one to
    step-N.old-<pid> first; killed right then, --resume puts it back and continues from it, not from
    an older checkpoint."""
    out = tmp_path / "run"
    steps = ["--steps", "4", "--save-every", "2"]
    assert finetune(tiny_checkpoint, toy, out, *steps).returncode == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    last = out / "checkpoints" / "step-000004"
    last.rename(last.with_name(f"step-000004.old-{dead.pid}"))
    r = finetune(tiny_checkpoint, toy, out, *steps, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from step-000004" in r.stderr, r.stderr
    assert last.is_dir() and not list(last.parent.glob("*.old-*"))


def test_a_diverging_run_stops_and_writes_no_nan_adapter(tiny_checkpoint, toy, tmp_path):
    """A learning rate that sends the loss to NaN: status 1 naming the step and the fix, no final
    adapter, and no checkpoint holds a non-finite value."""
    out = tmp_path / "run"
    r = finetune(tiny_checkpoint, toy, out, "--steps", "4", "--save-every", "1", "--lr", "1e30")
    assert r.returncode == 1, r.stderr
    assert "training diverged" in r.stderr and "lower --learning-rate" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert not (out / "adapter_config.json").exists()
    for ck in (out / "checkpoints").glob("step-*"):
        for name, w in mx.load(str(ck / "adapters.safetensors")).items():
            assert mx.isfinite(w).all().item(), (ck.name, name)


def test_resume_without_a_checkpoint_says_to_start_over(tiny_checkpoint, toy, tmp_path):
    """A run stopped before its first checkpoint: --resume has nothing to continue, and the way out
    it names (--overwrite) is one that works."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_log.jsonl").write_text("")
    r = finetune(tiny_checkpoint, toy, out, "--steps", "1", "--resume")
    assert r.returncode == 2 and "start again with --overwrite instead of --resume" in r.stderr, r.stderr
    assert finetune(tiny_checkpoint, toy, out, "--steps", "1", "--overwrite").returncode == 0


def test_a_damaged_checkpoint_is_named_with_the_way_out(tiny_checkpoint, toy, tmp_path):
    """A cut optimizer file or a trainer_state.json whose step is not a number: --resume says which
    checkpoint cannot be used and which one deleting it would resume from (status 1, one line)."""
    out = tmp_path / "run"
    steps = ["--steps", "4", "--save-every", "2"]
    assert finetune(tiny_checkpoint, toy, out, *steps).returncode == 0
    last = out / "checkpoints" / "step-000004"
    optimizer = (last / "optimizer.safetensors").read_bytes()
    state = json.loads((last / "trainer_state.json").read_text())
    for damage in ("optimizer", "state"):
        if damage == "optimizer":
            (last / "optimizer.safetensors").write_bytes(optimizer[: len(optimizer) // 2])
        else:
            (last / "optimizer.safetensors").write_bytes(optimizer)
            (last / "trainer_state.json").write_text(json.dumps({**state, "step": "4x"}))
        r = finetune(tiny_checkpoint, toy, out, *steps, "--resume")
        assert r.returncode == 1, r.stderr
        assert f"cannot use {last}" in r.stderr, r.stderr
        assert "delete step-000004 to resume from step-000002" in r.stderr, r.stderr
        assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_second_run_on_a_folder_in_use_is_refused(tiny_checkpoint, toy, tmp_path):
    """Two runs on one --out would mix their checkpoints (and --overwrite would delete the other's):
    while a run writes there, another is refused in words; once it ended, --resume takes it up."""
    import signal
    import time

    out = tmp_path / "busy"
    args = ["finetune", "--model", str(tiny_checkpoint), "--data", str(toy / "train.jsonl"),
            "--out", str(out), "--steps", "12", "--save-every", "1"]  # fmt: skip
    first = subprocess.Popen(
        [sys.executable, "-m", "oss_mlx.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OSS_MLX_FINETUNE_DELAY": "0.5"},
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "checkpoints" / "step-000001").is_dir():
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended early"
            time.sleep(0.05)
        for extra in (["--overwrite"], ["--resume"]):
            second = oss_mlx(*args, *extra)
            assert second.returncode == 1 and "another oss-mlx finetune is writing to" in second.stderr, (
                second.stderr
            )
        assert first.poll() is None  # untouched by the refused runs
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    resumed = oss_mlx(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "adapter_config.json").is_file()
