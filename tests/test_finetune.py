"""`oss-mlx finetune` end to end on a tiny model (real processes): a toy task is learned and changes
the greedy output; kill -9 then --resume continues exactly; bad inputs fail in words."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PHRASE = "The answer is blue."
WORDS = "red green apple tree river stone cloud fire window book lamp sand".split()
TIMEOUT = 240


def records(n: int, seed: int) -> list[dict]:
    import random

    r = random.Random(seed)
    out = []
    for _ in range(n):
        question = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 6))) + "?"
        out.append(
            {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": PHRASE}]}
        )
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory, vocab_dir):
    from oss_mlx.synthetic import SyntheticSpec, write_checkpoint
    from oss_mlx.tokenizer import copy_vocabulary

    root = tmp_path_factory.mktemp("toy")
    write_checkpoint(root / "model", SyntheticSpec.tiny(num_layers=2), layout="hf-mxfp4", seed=7)
    copy_vocabulary(root / "model")
    write_jsonl(root / "train.jsonl", records(10, 0))
    write_jsonl(root / "valid.jsonl", records(6, 1))
    return root


def oss_mlx(*args: str, env: dict | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "oss_mlx.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def finetune_args(toy: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune", "--model", str(toy / "model"), "--data", str(toy / "train.jsonl"),
        "--valid", str(toy / "valid.jsonl"), "--out", str(out), "--lr", "3e-3", "--batch-size", "2",
        "--dropout", "0.05", "--seed", "3", *extra,
    ]  # fmt: skip


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line]


def test_toy_task_is_learned_and_changes_greedy_output(toy, tmp_path):
    out = tmp_path / "adapter"
    prompt = "stone river lamp?"
    before = oss_mlx(
        "generate", "--model", str(toy / "model"), "--temperature", "0", "--max-tokens", "12", prompt
    )
    assert before.returncode == 0, before.stderr
    assert PHRASE not in before.stdout
    run = oss_mlx(
        *finetune_args(toy, out, "--steps", "20", "--lr", "5e-3", "--eval-every", "10", "--save-every", "10")
    )
    assert run.returncode == 0, run.stderr
    assert "memory:" in run.stderr and "loss" in run.stderr
    evals = [r["eval_loss"] for r in log_rows(out) if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < 0.6 * evals[0], evals  # held-out loss, steps 0, 10, 20
    after = oss_mlx(
        "generate", "--model", str(toy / "model"), "--adapter", str(out), "--temperature", "0",
        "--max-tokens", "12", prompt,
    )  # fmt: skip
    assert after.returncode == 0, after.stderr
    assert after.stdout.strip() == PHRASE, (after.stdout, run.stderr[-600:])
    # the same adapter behind the server, asked through the openai client
    from openai import OpenAI
    from server_helpers import ServerProcess, running

    with running(ServerProcess(toy / "model", tmp_path / "serve.log", "--adapter", str(out))) as (server,):
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=60)
        reply = client.chat.completions.create(
            model="model", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=12
        )
    assert reply.choices[0].message.content == PHRASE


def test_kill_9_then_resume_loses_nothing(toy, tmp_path):
    """Uninterrupted vs killed (-9, mid-run, a real process) and resumed: the same steps, the same losses
    (dropout on, batches crossing an epoch, so the RNG and the data position both matter)."""
    steps = ["--steps", "8", "--save-every", "2", "--eval-every", "4"]
    whole = tmp_path / "whole"
    ref = oss_mlx(*finetune_args(toy, whole, *steps))
    assert ref.returncode == 0, ref.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "oss_mlx.cli", *finetune_args(toy, killed, *steps)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OSS_MLX_FINETUNE_DELAY": "0.3"},
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (killed / "checkpoints" / "step-000004").is_dir():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    from oss_mlx.finetune.trainer import complete_checkpoints

    left = complete_checkpoints(killed)
    assert left and not (killed / "adapter_config.json").exists()  # the run did not finish
    for ck in left:  # every checkpoint the kill left is whole
        assert json.loads((ck / "trainer_state.json").read_text())["step"] == int(ck.name.split("-")[1])
    last = int(left[-1].name.split("-")[1])
    assert last < 8

    resumed = oss_mlx(*finetune_args(toy, killed, *steps, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step-{last:06d}" in resumed.stderr
    assert not list((killed / "checkpoints").glob("*.partial-*"))  # no half-written checkpoint left
    a, b = log_rows(whole), log_rows(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "eval_loss"):
            if key in x:
                assert abs(x[key] - y[key]) <= 1e-6 * abs(x[key]), (x, y)
    state = json.loads((killed / "checkpoints" / "step-000008" / "trainer_state.json").read_text())
    assert (
        state["position"]
        == json.loads((whole / "checkpoints" / "step-000008" / "trainer_state.json").read_text())["position"]
    )
    assert state["position"]["epoch"] == 1  # 5 batches an epoch: the run crossed into the second
    import mlx.core as mx

    wa, wb = mx.load(str(whole / "adapters.safetensors")), mx.load(str(killed / "adapters.safetensors"))
    assert all(mx.array_equal(wa[k], wb[k]).item() for k in wa)
    # resuming with other settings is refused, in words
    other = oss_mlx(*finetune_args(toy, killed, "--steps", "8", "--rank", "4", "--resume"))
    assert other.returncode == 1 and "rank" in other.stderr and "Traceback" not in other.stderr


def test_bad_inputs_are_told_in_words(toy, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(records(1, 0)[0]) + "\n" + '{"messages": [{"role": "user", "content": "hi"}]}\n'
    )
    r = oss_mlx("finetune", "--model", str(toy / "model"), "--data", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and f"{bad}:2: no assistant message" in r.stderr and "Traceback" not in r.stderr
    r = oss_mlx(*finetune_args(toy, tmp_path / "o2", "--steps", "1", "--resume"))
    assert r.returncode == 2 and "holds no checkpoint" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    r = oss_mlx(*finetune_args(toy, tmp_path / "full", "--steps", "1"))
    assert r.returncode == 2 and "not empty" in r.stderr and (tmp_path / "full" / "something").exists()
    r = oss_mlx(*finetune_args(toy, tmp_path / "full", "--steps", "1", "--overwrite"))  # not a run: kept
    assert r.returncode == 2 and "not a training run's folder (it also holds something)" in r.stderr, r.stderr
    assert (tmp_path / "full" / "something").exists()
    assert oss_mlx(*finetune_args(toy, tmp_path / "run", "--steps", "1")).returncode == 0
    r = oss_mlx(*finetune_args(toy, tmp_path / "run", "--steps", "1", "--overwrite"))  # a run: replaced
    assert r.returncode == 0, r.stderr
    r = oss_mlx(*finetune_args(toy, tmp_path / "o3", "--steps", "1"), env={"OSS_MLX_MEMORY_GB": "0.02"})
    assert r.returncode == 1 and "training does not fit" in r.stderr and "alone need" in r.stderr
    r = oss_mlx(*finetune_args(toy, tmp_path / "o4", "--layers", "7"))
    assert r.returncode == 1 and "layer 7 does not exist" in r.stderr
    r = oss_mlx("generate", "--model", str(toy / "model"), "--adapter", str(tmp_path / "nope"), "hi")
    assert r.returncode == 1 and "no such adapter folder" in r.stderr and "Traceback" not in r.stderr


def test_bad_settings_are_refused_before_training(toy, tmp_path):
    """Status 2, one line naming the flag (or variable), before the model is loaded."""
    cases = [
        (["--layers", "1-0"], "runs backwards"),
        (["--expert-layers", "3-1"], "--expert-layers"),
        (["--steps", "1e18"], "--steps: must be a whole number between 1 and 1,000,000,000"),
        (["--steps", "100000000000000000000000"], "between 1 and 1,000,000,000"),
        (["--epochs", "1e30"], "--epochs"),
        (["--min-learning-rate", "1", "--lr", "1e-3"], "above the peak --learning-rate"),
        (["--steps", "4", "--warmup", "4"], "--warmup 4 must be below --steps 4"),
        # 10 sequences in batches of 2: a step of 6 micro-batches would see some twice
        (["--steps", "1", "--grad-accum", "6"], "--grad-accum 6 is more than the 5 batches of 2"),
    ]
    for extra, needle in cases:
        r = oss_mlx(*finetune_args(toy, tmp_path / "o", *extra), timeout=60)
        assert r.returncode == 2, (extra, r.stderr)
        assert needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    r = oss_mlx(*finetune_args(toy, tmp_path / "o", "--steps", "1"), env={"OSS_MLX_FINETUNE_DELAY": "soon"})
    assert r.returncode == 2 and "OSS_MLX_FINETUNE_DELAY must be a number between 0 and 60" in r.stderr
    r = oss_mlx(*finetune_args(toy, tmp_path / "o9", "--expert-layers", "9"))
    assert r.returncode == 1 and "--expert-layers: layer 9 does not exist" in r.stderr
    # --epochs over a small data set: warmup past the end is said once the step count is known
    r = oss_mlx(*finetune_args(toy, tmp_path / "o10", "--warmup", "50"))
    assert r.returncode == 2 and "--warmup 50 must be below the run's 5 steps" in r.stderr, r.stderr


def test_the_eta_shows_days_past_24_hours():
    from oss_mlx.finetune.cli import duration

    assert duration(59) == "00:00:59"
    assert duration(3 * 86400 + 4 * 3600 + 5 * 60 + 6) == "3d 04:05:06"
