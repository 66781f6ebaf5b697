"""`oss-mlx bench` on the tiny config (CPU): it runs both engines, writes the rows, maps weights."""

from __future__ import annotations

import json
from dataclasses import replace

import mlx.core as mx
import pytest

from oss_mlx import bench

pytest.importorskip("mlx_lm")


def refused(main, argv: list[str]) -> None:
    """A bad argument or combination: argparse's error (exit status 2), before anything runs."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_bench_tiny_writes_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(
        [
            "--config",
            "tiny",
            "--prompt-lengths",
            "12,40",
            "--decode-tokens",
            "4",
            "--warmup",
            "8",
            "--engines",
            "oss-mlx,oss-mlx:reference,mlx-lm",
            "--json",
            str(out),
            "--check-logits",
            "20",
        ]
    )
    assert rc == 0
    rows = json.loads(out.read_text())
    keys = {(r["label"], r["phase"], r["context"]) for r in rows}
    for label in ("oss-mlx", "oss-mlx:reference", "mlx-lm"):
        for phase in ("prefill", "decode"):
            for ctx in (12, 40):
                assert (label, phase, ctx) in keys
    for r in rows:
        assert r["engine"] in ("oss-mlx", "mlx-lm")
        assert r["tokens_per_s"] > 0 and r["peak_gb"] > 0
        assert {"engine", "phase", "context", "tokens_per_s", "peak_gb"} <= set(r)
    check = json.loads((tmp_path / "bench.json.check.json").read_text())["logits_check"]
    assert check["max_rel_err"] < 3e-2
    printed = capsys.readouterr().out
    assert "mlx-lm" in printed and "prefill" in printed


def test_repeat_keeps_the_last_run_of_each_length(tmp_path, capsys, monkeypatch):
    """--repeat N: each length runs N times per engine; the earlier runs are printed, only the last
    becomes a row (the first run at a new length pays MLX's one-time setup for its shapes)."""
    calls = []
    real = bench.run_oss_mlx

    def counted(model, prompt, decode, prefill_chunk=None):
        calls.append(len(prompt))
        return real(model, prompt, decode, prefill_chunk)

    monkeypatch.setattr(bench, "run_oss_mlx", counted)
    out = tmp_path / "bench.json"
    args = ["--config", "tiny", "--prompt-lengths", "12,20", "--decode-tokens", "3", "--warmup", "0"]
    assert bench.main([*args, "--engines", "oss-mlx", "--repeat", "3", "--json", str(out)]) == 0
    assert calls == [12, 12, 12, 20, 20, 20]
    rows = json.loads(out.read_text())
    assert sorted((r["phase"], r["context"]) for r in rows) == [
        ("decode", 12),
        ("decode", 20),
        ("prefill", 12),
        ("prefill", 20),
    ]
    assert all(r["repeat"] == 3 for r in rows)
    printed = capsys.readouterr().out
    assert printed.count("(not kept)") == 4  # two earlier runs for each of the two lengths
    refused(bench.main, [*args, "--repeat", "0"])


def test_rows_are_written_as_they_are_measured(tmp_path, monkeypatch):
    """A run cut short (a time limit, a crash in the second engine) keeps the rows measured so far."""

    def broken(*a, **k):
        raise RuntimeError("mlx-lm went away")

    monkeypatch.setattr(bench, "run_mlx_lm", broken)
    out = tmp_path / "bench.json"
    args = ["--config", "tiny", "--prompt-lengths", "12", "--decode-tokens", "2", "--warmup", "0"]
    with pytest.raises(RuntimeError, match="went away"):
        bench.main([*args, "--engines", "oss-mlx,mlx-lm", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert sorted((r["engine"], r["phase"]) for r in rows) == [("oss-mlx", "decode"), ("oss-mlx", "prefill")]


def test_results_file_is_appended_with_provenance(tmp_path, monkeypatch):
    """--results FILE appends one JSON line per measurement as it is measured (the repeats' earlier
    runs marked "kept": false, a crash keeps what was measured), each row with date, device,
    versions, the command and the git commit; a second run appends, never rewrites; --json still
    writes its list beside it."""
    from oss_mlx.bench_results import read_rows

    results, out = tmp_path / "h200.jsonl", tmp_path / "bench.json"
    args = ["--config", "tiny", "--prompt-lengths", "12", "--decode-tokens", "2", "--warmup", "0"]
    assert (
        bench.main(
            [*args, "--engines", "oss-mlx", "--repeat", "2", "--results", str(results), "--json", str(out)]
        )
        == 0
    )
    first = read_rows(results)
    assert [(r["phase"], r["kept"]) for r in first] == [
        ("prefill", False),
        ("decode", False),
        ("prefill", True),
        ("decode", True),
    ]
    for r in first:
        assert r["schema"] == 1 and r["kind"] == "bench" and r["date"].endswith("Z")
        assert r["versions"]["mlx"] == mx.__version__ and r["versions"]["mlx-lm"]
        assert r["command"].startswith("oss-mlx bench --config tiny") and "--results" in r["command"]
        assert r["commit"] is None or len(r["commit"].split("+")[0]) == 40
        assert r["device"] and r["source"] == "--config tiny (random weights)" and r["tokens_per_s"] > 0
    assert len(json.loads(out.read_text())) == 2  # --json: the kept rows of this run

    def broken(*a, **k):
        raise RuntimeError("mlx-lm went away")

    monkeypatch.setattr(bench, "run_mlx_lm", broken)
    with pytest.raises(RuntimeError, match="went away"):
        bench.main([*args, "--engines", "oss-mlx,mlx-lm", "--results", str(results)])
    rows = read_rows(results)
    assert rows[:4] == first and [r["engine"] for r in rows[4:]] == ["oss-mlx", "oss-mlx"]
    results.write_text(results.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"h200.jsonl:7: not a JSON row"):
        read_rows(results)
    refused(bench.main, [*args, "--results", str(tmp_path / "no-such-folder" / "r.jsonl")])


def test_the_results_files_hold_rows_that_read_back():
    """benchmarks/results/*.jsonl: every line a row with the keys the docs' tables are read by."""
    from pathlib import Path

    from oss_mlx.bench_results import read_rows

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    files = sorted(folder.glob("*.jsonl"))
    assert {f.name for f in files} >= {"h200.jsonl", "cpu-2core.jsonl"}
    for f in files:
        rows = read_rows(f)
        assert rows
        for r in rows:
            assert {"date", "device", "versions", "command", "commit", "kind"} <= set(r), (f, r)
        dates = [r["date"][:10] for r in rows]
        assert dates == sorted(dates), f"{f.name}: rows are appended in time order"


def test_unknown_engine_is_an_error():
    refused(bench.main, ["--config", "tiny", "--engines", "vllm"])


def test_mlx_lm_model_holds_the_same_weights():
    """Same logits from both engines in float32 (YaRN rounded both ways, as mlx-lm always rounds)."""
    config = replace(bench.preset_config("tiny"), rope_truncate=True)
    model = bench.random_model(config, seed=1, dtype=mx.float32)
    lm = bench.mlx_lm_model(model)
    tokens = mx.array([[5, 17, 300, 2, 9, 11, 4]])  # under the tiny window (8)
    a, b = model(tokens), lm(tokens)
    assert mx.max(mx.abs(a - b)).item() < 1e-4 * mx.max(mx.abs(b)).item()


def test_bench_with_a_memory_budget_reports_the_hit_rate(tmp_path, capsys):
    from oss_mlx.bench import main
    from oss_mlx.synthetic import SyntheticSpec, write_checkpoint

    folder = write_checkpoint(tmp_path / "m", SyntheticSpec.tiny(vocab_size=1024), layout="hf-mxfp4")
    common = ["--model", str(folder), "--prompt-lengths", "16", "--decode-tokens", "4", "--warmup", "0"]
    assert main([*common, "--engines", "oss-mlx", "--memory-budget", "0.6GB"]) == 0
    assert "expert cache hit rate" in capsys.readouterr().out
    refused(main, [*common, "--memory-budget", "0.6GB"])  # mlx-lm cannot stream experts


def test_bench_quality_preset_quantizes_the_random_model(tmp_path, monkeypatch):
    """--quality small: the dense layers are quantized as the converter's preset does (smaller peak),
    --prefill-step reaches the token loop; both are refused where they cannot apply."""
    seen = {}
    real = bench.run_oss_mlx

    def spy(model, prompt, decode, prefill_chunk=None):
        seen["attention"] = type(model.blocks[0].attn.qkv).__name__
        seen["step"] = prefill_chunk
        return real(model, prompt, decode, prefill_chunk)

    monkeypatch.setattr(bench, "run_oss_mlx", spy)
    common = ["--config", "tiny", "--prompt-lengths", "20", "--decode-tokens", "2", "--warmup", "0"]
    out = tmp_path / "q.json"
    args = [*common, "--engines", "oss-mlx", "--quality", "small", "--prefill-step", "8", "--json", str(out)]
    assert bench.main(args) == 0
    assert seen == {"attention": "QuantizedLinear", "step": 8}
    assert "--quality small" in json.loads(out.read_text())[0]["source"]
    refused(bench.main, [*common, "--quality", "small"])  # mlx-lm maps float weights only
    converted = ["--model", str(tmp_path), "--engines", "oss-mlx", "--quality", "small"]
    refused(bench.main, converted)  # a converted folder already has its preset


def test_bench_quality_refusals_say_why(tmp_path, capsys):
    refused(bench.main, ["--config", "tiny", "--quality", "small"])
    err = capsys.readouterr().err
    assert "--quality applies to --config random weights and oss-mlx engines only" in err


def test_check_layers_compares_each_layer_and_can_fail(monkeypatch):
    """--check-layers: each block's decode update, fast path vs reference, same inputs. With the
    reference forced, both sides are the reference, so 0; a fast MoE path off by 1% of its update
    must show as ~1%."""
    import contextlib

    from oss_mlx.moe import MLPBlock, Router

    # The reference on both sides on every machine (on a GPU the kernels differ by bf16's spread)
    monkeypatch.setenv("OSS_MLX_KERNELS", "reference")
    model = bench.random_model(bench.preset_config("tiny"))
    ok = bench.check_layers(model, 12, steps=2)
    assert ok["max_rel_rms"] == {"attention": 0.0, "moe": 0.0, "moe_experts": 0.0}
    assert ok["router_disagreements"] == 0 and ok["of"] == 2 * len(model.blocks)

    reference = {"on": False}

    @contextlib.contextmanager
    def use_backend(name):
        reference["on"] = True
        try:
            yield
        finally:
            reference["on"] = False

    real = MLPBlock.__call__

    def skewed(self, x):
        y = real(self, x)
        return y if reference["on"] else x + (y - x) * 1.01

    monkeypatch.setattr(bench.kernels, "use_backend", use_backend)
    monkeypatch.setattr(MLPBlock, "__call__", skewed)
    bad = bench.check_layers(model, 12, steps=2)["max_rel_rms"]
    assert bad["attention"] == 0.0 and 0.005 < bad["moe"] < 0.02

    # A fast router that picks other experts is counted apart, with the reference's logit gap
    route = Router.__call__

    def other_experts(self, x):
        wts, ids = route(self, x)
        return (wts, ids) if reference["on"] else (wts, (ids + 1) % self.weight.shape[0])

    monkeypatch.setattr(Router, "__call__", other_experts)
    flipped = bench.check_layers(model, 12, steps=2)
    assert flipped["router_disagreements"] == flipped["of"] == 2 * len(model.blocks)
    assert len(flipped["disagreement_gaps_in_bf16_ulps"]) == flipped["of"]
    assert all(g >= 0 for g in flipped["disagreement_gaps_in_bf16_ulps"])


def test_profile_script_runs_and_counts_the_graph(tmp_path):
    """benchmarks/profile_decode.py (a GPU-machine tool) stays runnable: on CPU with the tiny config
    it counts a decode step's primitives and times its parts."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_decode.py"
    out = tmp_path / "profile.json"
    args = ["--config", "tiny", "--layers", "2", "--depths", "40", "--steps", "4", "--json", str(out)]
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True, timeout=300)
    row = json.loads(out.read_text())["depth_40"]
    assert row["primitives_per_step"]["total"] > 10
    assert row["pipelined_ms"] > 0 and row["no_blocks_ms"] > 0


def test_cold_and_ttft_run_in_fresh_processes(tmp_path, capsys, vocab_dir):  # --ttft: harmony renders
    """--cold / --ttft: each measurement in a new process (its own pid, its PTX-cache count, its load),
    the first prompt then the same again, for both engines in one run; a chat's first message of
    200-400 tokens rendered by harmony; the rows say what each number includes; the table puts each
    prompt's engines side by side."""
    out = tmp_path / "cold.json"
    argv = ["--config", "tiny", "--prompt-lengths", "48", "--decode-tokens", "3"]
    argv += ["--engines", "oss-mlx,mlx-lm"]
    assert bench.main([*argv, "--cold", "--ttft", "--load-warmup", "on", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    chat = rows[2]["context"]
    assert 200 <= chat <= 400  # the chat message's tokens
    assert [(r["engine"], r["phase"], r["context"]) for r in rows] == [
        (engine, phase, n)
        for engine in ("oss-mlx", "mlx-lm")
        for n, first in ((48, "cold prefill"), (chat, "ttft"))
        for phase in (first, "warm prefill")
    ]
    for cold, warm in zip(rows[::2], rows[1::2]):
        d = cold["detail"]
        assert warm["tokens_per_s"] == d["warm_prefill_tps"] and cold["tokens_per_s"] == d["cold_prefill_tps"]
        assert d["imports_s"] > 0 and d["load_s"] > 0 and d["ptx_cache_files"] >= 0
        assert 0 < d["ttft_from_load_s"] < d["ttft_from_start_s"]  # the start includes the load
        assert d["ttft_from_start_s"] >= d["imports_s"] + d["load_s"]
        if cold["engine"] == "oss-mlx":  # --load-warmup on: the warm-up ran (oss-mlx's model only)
            assert d["warmup_s"] > 0 and "prompt" in d["warmup"]
        else:
            assert d["warmup_s"] is None and d["kernels"] == ""
    printed = capsys.readouterr().out
    assert "first prompt of a fresh process" in printed and "after the load" in printed
    table = printed[printed.index("first prompt of a fresh process") :]
    order = [line.split("│")[1:3] for line in table.splitlines() if line.startswith("│")]
    assert [(e.strip(), p.strip()) for e, p in order] == [
        ("oss-mlx", "48"),
        ("mlx-lm", "48"),
        ("oss-mlx", "chat"),
        ("mlx-lm", "chat"),
    ]


def test_follow_up_at_depth_beside_a_fresh_prompt(tmp_path):
    out = tmp_path / "follow.json"
    argv = ["--config", "tiny", "--prompt-lengths", "16", "--decode-tokens", "2", "--warmup", "0"]
    argv += ["--follow-up", "100,300", "--follow-up-tokens", "64", "--engines", "oss-mlx,mlx-lm"]
    assert bench.main([*argv, "--json", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text()) if r["phase"] == "follow-up"]
    assert [(r["label"], r["context"]) for r in rows] == [
        ("oss-mlx", 100),
        ("oss-mlx", 300),
        ("mlx-lm", 100),
        ("mlx-lm", 300),
    ]
    for r in rows:
        d = r["detail"]
        assert d["new"] == 64 and d["follow_up_tps"] == r["tokens_per_s"] > 0 and d["fresh_tps"] > 0
        assert d["ratio"] == pytest.approx(d["follow_up_tps"] / d["fresh_tps"])


def test_four_streams_decode_in_one_step_each_token(monkeypatch):
    """Four streams of the tiny model decode together as `bench --concurrency` runs them
    (bench_concurrency.oss_mlx_decode): each batched step advances all four, so 48 tokens each take
    about 48 steps of four rows, not 192 of one. (How much faster that is, is the benchmark's to say:
    docs/PERFORMANCE.md, Concurrency; on the 2-core CPU 1.3-2.2x, the unembedding's matmul growing with
    the rows there; no timed assertion here.)"""
    from oss_mlx import bench_concurrency as bc
    from oss_mlx.decode import DecodeStep
    from oss_mlx.testing.random_model import random_prompt

    model = bench.random_model(bench.preset_config("tiny"), seed=3)
    prompts = [random_prompt(32, model.config.vocab_size, seed) for seed in range(4)]
    rows: list[int] = []
    real = DecodeStep.__call__

    def counted(self, tokens, batch):
        rows.append(tokens.shape[0])
        return real(self, tokens, batch)

    monkeypatch.setattr(DecodeStep, "__call__", counted)
    bc.oss_mlx_decode(model, prompts, 48, rate=False)
    assert 48 <= len(rows) <= 52, len(rows)
    assert sum(r >= 4 for r in rows) >= 46, rows


def test_a_copied_tree_names_its_commit_by_the_environment(monkeypatch, tmp_path):
    """OSS_MLX_COMMIT names the commit a row was measured on where the tree's git metadata is not its
    code's (the GPU machine's copy); without it, the checkout's HEAD (none outside git)."""
    from oss_mlx import bench_results

    monkeypatch.setenv(bench_results.COMMIT_ENV, "0123abc")
    assert bench_results.git_commit() == "0123abc"
    monkeypatch.delenv(bench_results.COMMIT_ENV)
    assert bench_results.git_commit(tmp_path) is None


def test_batch_decode_refuses_bad_equality_sizes():
    """benchmarks/batch_decode.py names a bad --equality-sizes and exits 2 before building a model."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "batch_decode.py"
    for bad in ("4,x", "0", "4,,8"):
        r = subprocess.run(
            [sys.executable, str(script), "--equality-sizes", bad], capture_output=True, text=True
        )
        assert r.returncode == 2, (bad, r.stderr)
        assert (
            "--equality-sizes" in r.stderr and "batch sizes >= 1" in r.stderr and "Traceback" not in r.stderr
        )


def test_decode_variants_probe_refuses_bad_settings():
    """benchmarks/probes/decode_variants_probe.py names a bad --set (no '=', no module, no such name,
    unequal value counts) and exits before building a model, with no traceback."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "probes" / "decode_variants_probe.py"
    cases = {
        ("MOE_MMA_ISSUE",): "write MODULE.NAME=V1,V2",
        ("nosuch.MOE_MMA_ISSUE=1",): "no module oss_mlx.kernels.nosuch",
        ("decode_moe.NOSUCH=1",): "has no NOSUCH",
        ("decode_moe.MOE_MMA_ISSUE=1,2", "decode_moe.ONE_TOKEN_COMBINED=True"): "the same number of values",
    }
    for settings, message in cases.items():
        args = [a for s in settings for a in ("--set", s)]
        r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, (settings, r.stderr)
