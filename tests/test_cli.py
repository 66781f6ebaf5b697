"""The `oss-mlx` command as a user runs it: subcommands, `generate`, errors without tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from server_helpers import free_port


def run(*args: str, env_extra: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "oss_mlx.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=120,
    )


def test_help_lists_subcommands():
    out = run("--help")
    assert out.returncode == 0
    for name in ("chat", "generate", "convert", "serve", "bench", "plan", "models"):
        assert name in out.stdout


def test_unknown_subcommand():
    out = run("frobnicate")
    assert out.returncode == 2 and "unknown subcommand 'frobnicate'" in out.stderr


def test_generate_streams_an_answer(tiny_checkpoint, vocab_dir):
    out = run(
        "generate",
        "--model",
        str(tiny_checkpoint),
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--stats",
        "Hello there",
    )
    assert out.returncode == 0, out.stderr
    assert "generated 8 tok" in out.stderr and "tok/s" in out.stderr


def test_generate_reads_stdin(tiny_checkpoint, vocab_dir):
    out = run("generate", "--model", str(tiny_checkpoint), "--max-tokens", "2", stdin="Hi from a pipe\n")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "model,message",
    [("/definitely/not/here", "no such folder"), ("not-a-repo-id", "not a hub repo id")],
)
def test_generate_bad_model_is_a_message_not_a_traceback(model, message):
    out = run("generate", "--model", model, "x")
    assert out.returncode == 1
    assert message in out.stderr and "Traceback" not in out.stderr


def test_generate_with_a_memory_budget_gives_the_same_tokens(tiny_checkpoint, vocab_dir):
    common = ["generate", "--model", str(tiny_checkpoint), "--max-tokens", "12", "--temperature", "0", "Hi"]
    resident = run(*common)
    streamed = run(*common, "--memory-budget", "0.7GB")
    assert resident.returncode == 0 and streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == resident.stdout and resident.stdout.strip()


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["generate", "--max-tokens", "0", "hi"], 2, "--max-tokens: must be between 1 and"),
        (["bench", "--model", "/definitely/not/here", "--engines", "oss-mlx"], 1, "cannot load"),
        (["serve", "--model", "/definitely/not/here", "--port", "0"], 2, "--port: must be between 1 and"),
        (["serve", "--model", "/definitely/not/here", "--port", str(free_port())], 1, "cannot load"),
        (["convert", "/definitely/not/here", "/tmp/oss-mlx-never-written"], 1, "no such folder"),
        (["plan", "/definitely/not/here"], 1, "no such folder"),
    ],
)
def test_bad_arguments_are_messages_not_tracebacks(args, code, message):
    out = run(*args, env_extra={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == code, out.stderr
    assert message in out.stderr + out.stdout and "Traceback" not in out.stderr


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`oss-mlx --help | head -1`: the pipe closes before the usage is written; the command ends
    quietly (no BrokenPipeError traceback on stderr)."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "oss_mlx.cli", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # before the interpreter has started: its write finds no reader
    err = proc.stderr.read().decode()
    assert proc.wait(60) in (0, 141)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def _closed(fd: int):
    """preexec_fn for `<&-` (fd 0) or `>&-` (fd 1): the child starts with that descriptor closed."""
    return lambda: os.close(fd)


def test_closed_stdin_or_stdout_is_said_in_words(tiny_checkpoint, vocab_dir):
    """`<&-`: the model still loads (a shard must not get fd 0, which MLX's loader takes for a failed
    open); with no prompt, a closed stdin is said. `>&-`: the answer could go nowhere, said."""
    model = str(tiny_checkpoint)
    cmd = [sys.executable, "-m", "oss_mlx.cli", "generate", "--model", model, "--max-tokens", "2"]
    out = subprocess.run([*cmd, "Hi"], capture_output=True, text=True, preexec_fn=_closed(0), timeout=120)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_closed(0), timeout=120)
    assert out.returncode == 2 and "standard input is closed" in out.stderr, out.stderr
    out = subprocess.run([*cmd, "Hi"], stderr=subprocess.PIPE, text=True, preexec_fn=_closed(1), timeout=120)
    assert out.returncode == 2 and "standard output is closed" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_ctrl_c_while_the_modules_load_is_one_line():
    """SIGINT while numpy and MLX are imported (the first second of any command): one line, 130."""
    code = (
        "import builtins, os, signal, sys\n"
        "import oss_mlx.cli\n"
        "real = builtins.__import__\n"
        "def interrupting(name, *a, **k):\n"  # Ctrl-C arrives as numpy is first imported
        "    if name == 'numpy' and 'numpy' not in sys.modules:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = interrupting\n"
        "sys.exit(oss_mlx.cli.main(['plan', '20b']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 130, out.stderr
    assert out.stderr.strip() == "interrupted", out.stderr


@pytest.mark.parametrize("value", ["5s", "-1", "0"])
def test_a_bad_heartbeat_timeout_breaks_only_a_distributed_run(
    tiny_checkpoint, vocab_dir, monkeypatch, value
):
    """OSS_MLX_HEARTBEAT_TIMEOUT is read when ranks link up: a one-rank command ignores it; a link
    refuses it naming the variable and the range."""
    from oss_mlx.cli_args import UsageError
    from oss_mlx.distributed.group import heartbeat_timeout

    env = {"OSS_MLX_HEARTBEAT_TIMEOUT": value}
    out = run("generate", "--model", str(tiny_checkpoint), "--max-tokens", "2", "Hi", env_extra=env)
    assert out.returncode == 0, out.stderr
    monkeypatch.setenv("OSS_MLX_HEARTBEAT_TIMEOUT", value)
    with pytest.raises(UsageError, match=r"^OSS_MLX_HEARTBEAT_TIMEOUT must be (a number )?between 1 and"):
        heartbeat_timeout()
    monkeypatch.setenv("OSS_MLX_HEARTBEAT_TIMEOUT", "2.5")
    assert heartbeat_timeout() == 2.5
