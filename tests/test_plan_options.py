"""`oss-mlx plan`: options that another option would silently ignore are refused in words (exit 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def plan(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "oss_mlx.cli", "plan", *argv], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--hosts", "hosts.json", "--memory", "16"], "it takes no --memory"),
        (["--hosts", "hosts.json", "--finetune"], "it takes no --finetune"),
        (["--distributed", "tensor"], "--distributed applies to --hosts"),
        (["--rank", "4"], "--rank applies to --finetune"),
    ],
)
def test_ignored_options_are_refused(argv, needle):
    r = plan("--config", "20b", *argv)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_rank_with_finetune_still_plans():
    r = plan("--config", "20b", "--finetune", "--rank", "4", "--memory", "16")
    assert r.returncode == 0, r.stderr
    assert "rank 4" in r.stdout
