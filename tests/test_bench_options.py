"""`oss-mlx bench`: option combinations that would measure something else than asked are refused in
words (exit status 2) before anything is built; the fresh processes take the memory budget; the
results and JSON files survive a cut-short line and an interrupted write."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from oss_mlx import bench
from oss_mlx.bench_results import ResultsFile, read_rows

BASE = ["--config", "tiny", "--prompt-lengths", "16", "--decode-tokens", "2", "--warmup", "0"]


def bench_process(*argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "oss_mlx.cli", "bench", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--concurrency", "2", "--cold"], "it takes no --cold"),
        (["--concurrency", "2", "--follow-up", "8"], "it takes no --follow-up"),
        (["--concurrency", "2", "--repeat", "2"], "it takes no --repeat"),
        (["--concurrency", "2", "--check-logits", "8"], "it takes no --check-logits"),
        (["--cold", "--repeat", "2"], "it takes no --repeat"),
        (["--ttft", "--check-layers", "8"], "it takes no --check-layers"),
        (["--cold", "--quality", "small", "--engines", "oss-mlx"], "--quality and --dtype do not apply"),
        (["--cold", "--dtype", "float32"], "--quality and --dtype do not apply"),
        (["--follow-up-tokens", "8"], "--follow-up-tokens applies to --follow-up"),
        (["--cold-timeout", "5"], "--cold-timeout applies to --cold"),
    ],
)
def test_options_a_mode_ignores_are_refused(extra, needle, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main([*BASE, *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_json_and_results_in_one_file_is_refused_before_anything_runs(tmp_path):
    """--json rewrites its file after every row: it would wipe the appended --results history."""
    history = tmp_path / "h.jsonl"
    history.write_text('{"kept": true}\n')
    r = bench_process(*BASE, "--json", str(history), "--results", str(tmp_path / "." / "h.jsonl"))
    assert r.returncode == 2, r.stderr
    assert "give two files" in r.stderr and "building" not in r.stdout
    assert history.read_text() == '{"kept": true}\n'


def test_cold_rows_stream_experts_within_the_budget(tmp_path, tiny_checkpoint):
    """--cold --memory-budget: the fresh process loads the model with the budget (its row says so
    through the streamed model's lower peak: it was the whole model before)."""
    from oss_mlx.bench_first import ChildSpec, run_fresh_process

    spec = dict(engine="oss-mlx", prompt="16", decode=2, config=None, model=str(tiny_checkpoint))
    spec.update(seed=0, prefill_chunk=None, spawned=0.0, warm_up=False)
    full = run_fresh_process(ChildSpec(**spec), 120)
    streamed = run_fresh_process(ChildSpec(**spec, memory_budget="1GB"), 120)
    assert not isinstance(full, str) and not isinstance(streamed, str), (full, streamed)
    # Without its experts and embedding table resident, the process peaks below the whole model.
    assert streamed.peak_gb < full.peak_gb


def test_a_fresh_process_without_a_result_fails_the_bench(tmp_path):
    r = bench_process("--model", str(tmp_path / "none"), "--engines", "oss-mlx", "--cold", "--warmup", "0")
    assert r.returncode == 1
    assert "gave no result" in r.stderr


def test_a_row_never_joins_a_line_cut_short(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"cut": ')  # a crash in the middle of a write
    ResultsFile(path, {"schema": 1}).append({"b": 2})
    lines = path.read_text().splitlines()
    assert lines[0] == '{"a": 1}' and lines[1] == '{"cut": ' and json.loads(lines[2])["b"] == 2


def test_two_writers_append_whole_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    code = (
        "import sys; from oss_mlx.bench_results import ResultsFile\n"
        "f = ResultsFile(sys.argv[1], {'who': sys.argv[2]})\n"
        "for i in range(200): f.append({'i': i, 'pad': 'x' * 3000})\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), w]) for w in "ab"]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    rows = read_rows(path)
    assert sorted((r["who"], r["i"]) for r in rows) == sorted((w, i) for w in "ab" for i in range(200))


def test_json_is_replaced_whole_when_a_write_is_interrupted(tmp_path, monkeypatch):
    """A Ctrl-C in the middle of rewriting --json keeps the rows written before."""
    path = tmp_path / "rows.json"
    bench.write_json(str(path), [{"row": 1}])

    def interrupted(fd):
        raise KeyboardInterrupt  # after the new text is written, before it is in place

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.write_json(str(path), [{"row": 1}, {"row": 2}])
    monkeypatch.undo()
    assert json.loads(path.read_text()) == [{"row": 1}]
    assert os.listdir(tmp_path) == ["rows.json"]  # no temporary file left behind
