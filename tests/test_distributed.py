"""Distributed runs: the planner and hosts.json in process; then real processes on 127.0.0.1 with
MLX's ring backend, under mlx.launch and through `--hosts`: greedy tokens against the single-process
model (float32) in both modes through chunked prefill, decode and a two-turn session; each rank's
peak RSS against its share of the weights; a rank killed or frozen mid-generation; ranks holding
different models.

The multi-process tests are bounded (timeouts) and kept few: each starts 2-4 Python processes."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from oss_mlx.config import ModelConfig, official_config
from oss_mlx.distributed.hosts import Hostfile, HostsError, rank_environments
from oss_mlx.distributed.plan import PlanError, choose_mode, make_plan, pipeline_shares, tensor_shares
from oss_mlx.machine import GiB

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "distributed_probe.py"
_SCRIPT = Path(sys.executable).with_name("mlx.launch")  # the console script mlx installs
MLX_LAUNCH = (
    [str(_SCRIPT)]
    if _SCRIPT.is_file()
    else [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
)

# ---- the planner -------------------------------------------------------------------------------------


def test_pipeline_splits_layers_by_memory_and_rank0_holds_the_ends():
    c = official_config("120b")
    even = pipeline_shares(c, [48 * GiB, 48 * GiB])
    assert [s.layers for s in even] == [range(0, 18), range(18, 36)]
    assert even[0].ends and not even[1].ends
    assert even[0].weight_bytes > even[1].weight_bytes  # embedding + unembedding on rank 0
    uneven = pipeline_shares(c, [32 * GiB, 96 * GiB])
    assert len(uneven[0].layers) < len(uneven[1].layers)
    for s, budget in zip(uneven, (32 * GiB, 96 * GiB)):
        assert s.total <= budget
    assert sum(len(s.layers) for s in uneven) == 36 and uneven[1].layers.stop == 36


def test_pipeline_rank0_holds_every_attention_kind_and_errors_say_why():
    c = ModelConfig(num_layers=6, vocab_size=1024, hidden_size=64, intermediate_size=64, num_experts=4)
    shares = pipeline_shares(c, [GiB, 20 * GiB, 20 * GiB])  # in proportion rank 0 would take none
    assert len(shares[0].layers) >= 2  # sliding and full
    with pytest.raises(PlanError, match="does not fit these 2 machines.*Add a machine"):
        pipeline_shares(official_config("120b"), [16 * GiB, 16 * GiB])
    with pytest.raises(PlanError, match="at least one layer per rank"):
        pipeline_shares(c, [GiB] * 7)


def test_tensor_shares_split_heads_kv_heads_experts_and_vocabulary():
    c = official_config("20b")
    shares = tensor_shares(c, 4)
    assert [s.heads for s in shares] == [range(0, 16), range(16, 32), range(32, 48), range(48, 64)]
    assert [s.kv_heads for s in shares] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert [s.experts for s in shares] == [range(0, 8), range(8, 16), range(16, 24), range(24, 32)]
    assert sum(len(s.vocab) for s in shares) == c.vocab_size
    # Each rank holds about a quarter of the whole (the router and norms are whole on every rank).
    from oss_mlx.memory import weight_bytes

    total = sum(weight_bytes(c).values())
    assert all(abs(s.weight_bytes - total / 4) < 0.02 * total for s in shares)
    # 16 ranks: each query head pair reads one KV head, shared by two ranks.
    wide = tensor_shares(c, 16)
    assert wide[0].kv_heads == wide[1].kv_heads == range(0, 1)


def test_plan_chooses_by_link_and_memory():
    c = official_config("20b")
    fast = make_plan(c, [32 * GiB] * 2, latency=5e-6)
    slow = make_plan(c, [32 * GiB] * 2, latency=5e-3)
    assert (fast.mode, slow.mode) == ("tensor", "pipeline")
    assert "all_sum latency measured" in fast.why
    # Unequal machines: 1/2 of the 120b does not fit the small one, layers by memory do.
    c120 = official_config("120b")
    plan = make_plan(c120, [26 * GiB, 96 * GiB], latency=1e-6)
    assert plan.mode == "pipeline" and "cannot hold 1/2" in plan.why
    with pytest.raises(PlanError, match="tensor parallel over 3 ranks is not possible.*64 query heads"):
        make_plan(c, [32 * GiB] * 3, mode="tensor")
    assert choose_mode(c, 2, 1e-6)[0] == "tensor"


# ---- hosts.json ----------------------------------------------------------------------------------------


def _hosts(n: int, **extra) -> dict:
    return {"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"], **extra} for _ in range(n)]}


def test_hostfile_errors_name_the_problem(tmp_path):
    with pytest.raises(HostsError, match="no such hosts file"):
        Hostfile.read(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(HostsError, match="not a readable JSON"):
        Hostfile.read(bad)
    with pytest.raises(HostsError, match='needs its "ips"'):
        Hostfile.parse({"hosts": [{"ssh": "a"}, {"ssh": "b"}]})
    with pytest.raises(HostsError, match="at least two hosts"):
        Hostfile.parse(_hosts(1))
    with pytest.raises(HostsError, match="'10.0.0' is not an IP"):
        Hostfile.parse({"hosts": [{"ssh": "a", "ips": ["10.0.0"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]})
    with pytest.raises(HostsError, match="backend 'tcp'"):
        Hostfile.parse({"backend": "tcp", **_hosts(2)})


def test_rank_environments_follow_mlx_launch():
    ring = rank_environments(Hostfile.parse(_hosts(3)))
    assert [e["MLX_RANK"] for e in ring] == ["0", "1", "2"]
    addresses = json.loads(ring[0]["MLX_HOSTFILE"])
    assert len(addresses) == 3 and all(a[0].startswith("127.0.0.1:") for a in addresses)
    nccl = rank_environments(Hostfile.parse({"backend": "nccl", **_hosts(2)}))
    assert [e["CUDA_VISIBLE_DEVICES"] for e in nccl] == ["0", "1"]
    assert {e["NCCL_HOST_IP"] for e in nccl} == {"127.0.0.1"} and nccl[1]["MLX_WORLD_SIZE"] == "2"


def test_plan_cli_shows_the_split_and_memory_per_machine(tmp_path):
    hosts = tmp_path / "hosts.json"
    hosts.write_text(
        json.dumps(
            {
                "hosts": [
                    {"ssh": "mac-a.local", "ips": ["10.0.0.1"], "memory_gb": 48},
                    {"ssh": "mac-b.local", "ips": ["10.0.0.2"], "memory_gb": 48},
                ]
            }
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "oss_mlx.cli", "plan", "--config", "120b", "--hosts", str(hosts)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "pipeline over 2 ranks" in out and "mac-a.local" in out and "mac-b.local" in out
    assert "layers 0-17" in out and "layers 18-35" in out and "why pipeline" in out
    forced = subprocess.run(
        [sys.executable, "-m", "oss_mlx.cli", "plan", "--config", "120b", "--hosts", str(hosts)]
        + ["--distributed", "tensor"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert forced.returncode == 0 and "heads 0-31" in forced.stdout and "experts 0-63" in forced.stdout


# ---- real processes ------------------------------------------------------------------------------------


# 6 layers (sliding/full), window 8: shares the planner can split 4 ways both ways. 256 small experts
# (top-2): 7.4 MB a layer in MXFP4 at about the compute of 4, so that a pipeline stage's layers weigh
# more than the RSS check's tolerance (not only the embeddings' 103 MB on rank 0).
TINY = dict(num_layers=6, sliding_window=8, num_experts=256, intermediate_size=256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, vocab_dir) -> Path:
    """The TINY model, float32 outside the experts."""
    from oss_mlx.synthetic import SyntheticSpec, write_checkpoint
    from oss_mlx.tokenizer import copy_vocabulary

    folder = tmp_path_factory.mktemp("tiny-dist")
    write_checkpoint(folder, SyntheticSpec.tiny(**TINY), seed=3, dtype="float32")
    copy_vocabulary(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_converted(tiny, tmp_path_factory) -> Path:
    """The same model in the converted layout (float32: the same logits as the source)."""
    from oss_mlx.convert.cli import main as convert

    dest = tmp_path_factory.mktemp("tiny-dist-converted") / "model"
    assert convert([str(tiny), str(dest), "--dtype", "float32"]) == 0
    return dest


@pytest.fixture(scope="module")
def reference(tiny):
    """reference(max_tokens): the probe's checks on the hub layout in this process."""
    import oss_mlx

    sys.path.insert(0, str(PROBE.parent))
    from distributed_probe import checks

    model, tokenizer = oss_mlx.load(tiny)
    done: dict[int, dict] = {}

    def get(max_tokens: int) -> dict:
        if max_tokens not in done:
            done[max_tokens] = checks(model, tokenizer, max_tokens=max_tokens, prefill_chunk=24)
        return done[max_tokens]

    return get


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def _start(cmd: list[str], env: dict, stderr=subprocess.PIPE) -> subprocess.Popen:
    """A process in its own session (so that every rank it starts can be ended with it), stdin an
    open pipe: mlx.launch (0.32.4) polls a closed stdin in a busy loop."""
    return subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
        start_new_session=True,
    )


def _end(proc: subprocess.Popen) -> None:
    """End proc and everything it started (its session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


def _run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = _start(cmd, env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _end(proc)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {cmd}\n{out[-2000:]}\n{err[-3000:]}") from None
    finally:
        if proc.poll() is None:
            _end(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _children(pid: int) -> list[int]:
    """Every descendant of pid (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        out += kids
        todo += kids
    return out


def _rank_pid(root: int, rank: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in _children(root):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if f"MLX_RANK={rank}".encode() in env and b"python" in cmd.split(b"\0")[0]:
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} under {root}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return bool(stat) and stat.rsplit(")", 1)[1].split()[0] != "Z"


def _gone(pid: int, seconds: float) -> bool:
    """Whether process `pid` has ended within `seconds`."""
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


def _launch(n: int, mode: str, model: Path, report: Path, *extra: str, **env: str) -> dict:
    cmd = [*MLX_LAUNCH, "--backend", "ring", "-n", str(n), "--starting-port", str(_free_port_base(n))]
    cmd += ["--", sys.executable, str(PROBE), str(model), "--distributed", mode, *extra]
    run = _run(cmd, _env(OSS_MLX_DISTRIBUTED_REPORT=str(report), **env), timeout=150)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and lines, f"exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return json.loads(lines[-1])


def _free_port_base(n: int) -> int:
    """A run of n free ports on 127.0.0.1 (mlx.launch takes consecutive ones)."""
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65536:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def _check_greedy(got: dict, reference: dict, report: Path, mode: str, n: int) -> None:
    assert got["plan"]["mode"] == mode and len(got["plan"]["shares"]) == n
    # two turns (prefill in 24-token chunks cut at message starts, decode), the second reusing the
    # first's cache
    assert got["turns"] == reference["turns"]
    assert got["turns"][1]["prefilled"] < got["turns"][1]["prompt"] / 2
    if "argmax" in got:  # a forward over the whole prompt without cache; the same prompt generated
        assert got["argmax"] == reference["argmax"]
        assert got["generated"] == reference["generated"]
        logits, ref = np.array(got["logits"]), np.array(reference["logits"])
        if mode == "pipeline":  # the same operations in the same order
            assert np.array_equal(logits, ref)
        else:  # sums in another order
            assert np.abs(logits - ref).max() <= 1e-5 * np.abs(ref).max()
    # Peak RSS per rank: its share of the weights, plus a few MB (MLX's buffers, the control link),
    # below what one process holds: not even half of the other ranks' weights on top of its own.
    reports = [json.loads((report / f"rank-{r}.json").read_text()) for r in range(n)]
    whole = sum(rep["planned_weight_bytes"] for rep in reports)
    for r, rep in enumerate(reports):
        grown = rep["peak_rss_after_load"] - rep["baseline_rss"]
        share = rep["planned_weight_bytes"]
        assert abs(grown - share) <= 8e6 + 0.05 * share, (r, grown, share)
        assert grown < share + 0.5 * (whole - share), (r, grown, share, whole)


@pytest.mark.parametrize("mode,n", [("pipeline", 2), ("pipeline", 4), ("tensor", 4)])
def test_greedy_tokens_identical_to_one_process(tiny, tiny_converted, reference, tmp_path, mode, n):
    """2 ranks read the converted layout, 4 the hub layout (the session only, fewer tokens: 4 processes
    on 2 cores);
    the reference is the hub layout in one process. Pipeline on 4 ranks hands the hidden state on
    with all_sums, as on NCCL (no send/recv there). Tensor on 2 ranks: the next test."""
    tokens = 8 if n == 2 else 2
    handoff = {"OSS_MLX_PIPELINE_HANDOFF": "collective"} if (mode, n) == ("pipeline", 4) else {}
    model = tiny_converted if n == 2 else tiny
    parts = ["--parts", "session"] if n == 4 else []  # 4 processes on 2 cores: the session alone
    got = _launch(n, mode, model, tmp_path, "--max-tokens", str(tokens), *parts, **handoff)
    _check_greedy(got, reference(tokens), tmp_path, mode, n)


class _Lines:
    """A process's stdout lines, read by a thread (so waiting for one can time out)."""

    def __init__(self, proc: subprocess.Popen, stderr: Path | None = None):
        import queue
        import threading

        self.proc, self.lines, self._queue, self.stderr = proc, [], queue.Queue(), stderr
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float) -> str:
        import queue

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if text in line:
                return line
        err = self.stderr.read_text()[-3000:] if self.stderr and self.stderr.exists() else ""
        raise AssertionError(f"no {text!r} within {timeout} s; output: {self.lines[-10:]}; stderr: {err}")


def test_tensor_parallel_greedy_then_a_killed_rank_ends_the_request_under_mlx_launch(
    tiny_converted, reference, tmp_path
):
    """One run: the greedy checks on 2 tensor-parallel ranks, then decoding until rank 1 is killed
    (SIGKILL) and rank 0 gets mlx.launch's SIGTERM: rank 0's request ends with an error naming rank 1
    within seconds, and every rank exits."""
    cmd = [*MLX_LAUNCH, "--backend", "ring", "-n", "2", "--starting-port", str(_free_port_base(2))]
    cmd += [
        "--",
        sys.executable,
        str(PROBE),
        str(tiny_converted),
        "--distributed",
        "tensor",
        "--then-endless",
    ]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = _start(cmd, _env(OSS_MLX_DISTRIBUTED_REPORT=str(tmp_path)), stderr=err)
    try:
        out = _Lines(proc, log)
        _check_greedy(json.loads(out.wait_for('"generated"', 120)), reference(8), tmp_path, "tensor", 2)
        out.wait_for('"tokens": 20', 60)
        victim, rank0 = _rank_pid(proc.pid, 1), _rank_pid(proc.pid, 0)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # mlx.launch stops the other ranks (SIGTERM) when one ends, at times before rank 0's link has
        # noticed which: sent here at once, rank 0 must still say it.
        os.kill(rank0, signal.SIGTERM)
        error = json.loads(out.wait_for('"error"', 10))["error"]
        said = time.monotonic() - killed
        assert "rank 1" in error and "connection" in error, error
        assert said < 5, said
        proc.wait(timeout=20)
        assert not _alive(rank0)
    finally:
        _end(proc)


def test_frozen_rank_ends_the_request_within_the_heartbeat_timeout_with_hosts(tiny, tmp_path):
    """--hosts: this probe is rank 0 and starts rank 1; SIGSTOP on rank 1 leaves its sockets open
    (the ring would wait forever): the heartbeat notices, rank 0 ends with an error, rank 1 is killed."""
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps(_hosts(2)))
    cmd = [
        sys.executable,
        str(PROBE),
        str(tiny),
        "--distributed",
        "tensor",
        "--hosts",
        str(hosts),
        "--endless",
    ]
    env = _env(OSS_MLX_HEARTBEAT_TIMEOUT="2")
    proc = _start(cmd, env, stderr=subprocess.DEVNULL)
    try:
        out = _Lines(proc)
        out.wait_for('"tokens": 20', 90)
        victim = _rank_pid(proc.pid, 1)
        stopped = time.monotonic()
        os.kill(victim, signal.SIGSTOP)
        error = json.loads(out.wait_for('"error"', 15))["error"]
        said = time.monotonic() - stopped
        assert "rank 1" in error and "has not answered for" in error, error
        assert said < 2 + 4, said
        assert proc.wait(timeout=20) == 1
        assert _gone(victim, 5)
    finally:
        _end(proc)


def test_generate_with_hosts_matches_one_process_and_refuses_different_models(tiny, tmp_path):
    """`oss-mlx generate --hosts`: the same answer as without; a rank with another model is named."""
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps(_hosts(2)))
    import oss_mlx

    model, tokenizer = oss_mlx.load(tiny)
    alone = oss_mlx.generate(model, tokenizer, "Hello!", reasoning_effort="low", temperature=0, max_tokens=6)
    args = ["--temperature", "0", "--max-tokens", "6", "--reasoning-effort", "low", "Hello!"]
    base = [sys.executable, "-m", "oss_mlx.cli", "generate", "--model", str(tiny), *args]
    both = _run([*base, "--hosts", str(hosts), "--distributed", "pipeline"], _env(), timeout=120)
    assert both.returncode == 0, both.stderr[-2000:]
    assert both.stdout == alone.text + "\n"

    from oss_mlx.synthetic import SyntheticSpec, write_checkpoint

    other = tmp_path / "other"
    write_checkpoint(other, SyntheticSpec.tiny(**TINY), seed=4, dtype="float32")
    (other / "o200k_base.tiktoken").write_bytes((tiny / "o200k_base.tiktoken").read_bytes())
    mixed = tmp_path / "mixed.json"
    spec = _hosts(2)
    spec["hosts"][1]["model"] = str(other)
    mixed.write_text(json.dumps(spec))
    start = time.monotonic()
    refused = _run([*base, "--hosts", str(mixed)], _env(), timeout=120)
    assert refused.returncode == 1
    assert "rank 1" in refused.stderr and "another model" in refused.stderr, refused.stderr[-2000:]
    assert time.monotonic() - start < 60


# ---- each rank reads its part, in every layout (in process: loading needs no collective) ----------------


class _Ranks:
    """Stands in for mx.distributed's group while loading (rank and size only)."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def _expected_part(name: str, full: np.ndarray, share, rank: int, c: ModelConfig) -> np.ndarray:
    """What a tensor-parallel rank should hold of the full model's `name` (written out here, apart
    from tensor_parallel.cut)."""
    D, hq, hkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    h, k = share.heads, share.kv_heads
    if name.startswith(("embedding.", "unembedding.")):
        return full[share.vocab.start : share.vocab.stop]
    if ".mlp.experts." in name:
        return full[share.experts.start : share.experts.stop]
    if ".attn.qkv." in name:
        q = full[h.start * D : h.stop * D]
        kk = full[(hq + k.start) * D : (hq + k.stop) * D]
        v = full[(hq + hkv + k.start) * D : (hq + hkv + k.stop) * D]
        return np.concatenate([q, kk, v])
    if name.endswith(".attn.sinks"):
        return full[h.start : h.stop]
    if name.endswith(".attn.out.bias"):
        return full if rank == 0 else np.zeros_like(full)
    if ".attn.out." in name:
        cols = full.shape[1]
        return full[:, cols * h.start // hq : cols * h.stop // hq]
    return full


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, vocab_dir) -> dict[str, Path]:  # convert copies the vocabulary
    from oss_mlx.convert.cli import main as convert
    from oss_mlx.synthetic import SyntheticSpec, write_checkpoint

    spec = SyntheticSpec.tiny(num_layers=4, vocab_size=512, head_dim=32, num_key_value_heads=2)
    root = tmp_path_factory.mktemp("dist-layouts")
    out = {}
    for layout in ("hf-mxfp4", "hf-float", "original"):
        out[layout] = write_checkpoint(root / layout, spec, layout=layout, seed=5)
    for quality in ("reference", "balanced"):
        assert convert([str(out["hf-mxfp4"]), str(root / quality), "--quality", quality]) == 0
        out[f"converted-{quality}"] = root / quality
    return out


@pytest.mark.parametrize(
    "layout", ["hf-mxfp4", "hf-float", "original", "converted-reference", "converted-balanced"]
)
def test_each_rank_reads_exactly_its_part(layouts, layout):
    from mlx.utils import tree_flatten

    from oss_mlx.distributed.group import Group
    from oss_mlx.distributed.shard_load import build_rank_model
    from oss_mlx.loader import load_model, open_checkpoint

    path = layouts[layout]
    whole, _ = load_model(path)
    full = {
        k: np.array(v.astype(mx.float32)) if v.dtype == mx.bfloat16 else np.array(v)
        for k, v in tree_flatten(whole.parameters())
    }
    ckpt = open_checkpoint(path)
    c = ckpt.config
    for mode, world in (("pipeline", 2), ("tensor", 2)):
        plan = make_plan(c, [GiB] * world, mode=mode)
        for rank in range(world):
            model, _ = build_rank_model(ckpt, plan, Group(_Ranks(rank, world), "test"))
            share = plan.shares[rank]
            got = dict(tree_flatten(model.parameters()))
            for local, array in got.items():
                name = model.canonical_name(local)
                value = np.array(array.astype(mx.float32)) if array.dtype == mx.bfloat16 else np.array(array)
                want = full[name] if mode == "pipeline" else _expected_part(name, full[name], share, rank, c)
                assert value.shape == want.shape and np.array_equal(value, want), (layout, mode, rank, name)
            held = {model.canonical_name(k).split(".")[0] for k in got}
            if mode == "pipeline":
                assert ("embedding" in held) == (rank == 0)
                assert len(model.blocks) == len(share.layers)


def test_every_rank_refuses_a_checkpoint_one_process_would_refuse(layouts, tmp_path):
    """A tensor only rank 0 holds (the embedding) with a wrong shape: rank 1 of a pipeline refuses the
    checkpoint too, naming the tensor (the whole checkpoint is checked on every rank first)."""
    import shutil

    from oss_mlx.distributed.group import Group
    from oss_mlx.distributed.shard_load import build_rank_model
    from oss_mlx.loader import open_checkpoint
    from oss_mlx.weights import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(layouts["hf-mxfp4"], bad)
    [path] = [p for p in bad.glob("*.safetensors") if "model.embed_tokens.weight" in mx.load(str(p))]
    tensors = mx.load(str(path))
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:-1]
    mx.save_safetensors(str(path), tensors)
    ckpt = open_checkpoint(bad)
    plan = make_plan(ckpt.config, [GiB] * 2, mode="pipeline")
    assert not plan.shares[1].ends
    with pytest.raises(CheckpointError, match="model.embed_tokens.weight"):
        build_rank_model(ckpt, plan, Group(_Ranks(1, 2), "test"))


# ---- chat and serve with --hosts (real processes: tmux, an HTTP server on 127.0.0.1) ------------------

LONG_REPLY = "<|channel|>final<|message|>" + " ".join(f"word{i}" for i in range(3000)) + "<|return|>"


def _conversation(path: Path) -> list[dict]:
    return json.loads(path.read_text())["messages"]


def test_chat_with_hosts_replies_as_one_process_and_a_killed_rank_ends_it_in_words(tiny, tmp_path, vocab_dir):
    """`oss-mlx chat --hosts` in a real terminal: the greedy reply (and what is saved) equals the
    one-process chat's; then rank 1 is killed mid-reply: the chat says so naming rank 1, keeps the
    conversation and exits with status 1 (no traceback, no hang)."""
    sys.path.insert(0, str(PROBE.parent))
    from chat_helpers import TmuxChat, env_has_tmux

    if not env_has_tmux():
        pytest.skip("tmux is not installed (apt-get install -y tmux)")
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps(_hosts(2)))
    flags = ["--model", str(tiny), "--temperature", "0", "--max-tokens", "12", "--reasoning-effort", "low"]
    apps = []
    try:
        alone = TmuxChat(tmp_path / "home-a", vocab_dir).start(
            [*flags, "--history", str(tmp_path / "a.json")]
        )
        apps.append(alone)
        alone.wait_prompt(timeout=90)
        alone.command("Hello!", r"tok/s", timeout=60)
        alone.type("/exit")
        assert alone.wait_exit() == 0

        both = TmuxChat(tmp_path / "home-b", vocab_dir).start(
            [*flags, "--hosts", str(hosts), "--distributed", "tensor", "--history", str(tmp_path / "b.json")],
            replies=[None, LONG_REPLY],  # the first reply sampled for real, the second scripted
        )
        apps.append(both)
        both.wait_prompt(timeout=120)
        both.command("Hello!", r"tok/s", timeout=60)
        assert _conversation(tmp_path / "b.json") == _conversation(tmp_path / "a.json")

        both.command("/set max_tokens 100000", r"max_tokens: 100000")
        pane = int(both.tmux("display-message", "-p", "#{pane_pid}").strip())
        victim = _rank_pid(pane, 1)
        both.type("Tell me a long story")
        both.wait_for(r"word12 ", timeout=60)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        both.wait_for(r"rank 1 .*closed its connection", timeout=10)
        assert time.monotonic() - killed < 5
        assert both.wait_exit(timeout=45) == 1  # CI under load once needed more than 20 s
        screen = both.screen()
        assert "Traceback" not in screen, screen
        users = [m["content"] for m in _conversation(tmp_path / "b.json") if m["role"] == "user"]
        assert users == ["Hello!", "Tell me a long story"], users
        assert not _alive(victim)
    finally:
        for app in apps:
            app.close()


def test_serve_with_hosts_answers_as_one_process_and_a_killed_rank_ends_the_stream(tiny, tmp_path):
    """`oss-mlx serve --hosts` through the openai client: the greedy completion equals a one-process
    server's; rank 1 killed mid-stream: the stream ends with an error within seconds and the server
    exits, its log naming rank 1."""
    openai = pytest.importorskip("openai")
    sys.path.insert(0, str(PROBE.parent))
    from server_helpers import ServerProcess, running

    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps(_hosts(2)))
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"match": "story", "reply": LONG_REPLY.removesuffix("<|return|>")}]))
    env = {"PYTHONPATH": str(REPO), "OSS_MLX_SCRIPTED_REPLIES": str(rules)}
    alone = ServerProcess(tiny, tmp_path / "alone.log", env=env)
    both = ServerProcess(
        tiny, tmp_path / "both.log", "--hosts", str(hosts), "--distributed", "pipeline", env=env
    )
    request = {
        "model": "gpt-oss",
        "messages": [{"role": "user", "content": "Hello!"}],
        "temperature": 0,
        "max_tokens": 10,
    }
    try:
        with running(alone, both):
            answers = []
            for server in (alone, both):
                client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=60)
                r = client.chat.completions.create(**request)
                answers.append((r.choices[0].message.model_dump(), r.usage.completion_tokens))
            assert answers[0] == answers[1] and answers[0][1] > 0, answers

            # Two requests at once: the distributed server decodes one at a time, each as alone.
            def ask(server, text: str):
                c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=60)
                r = c.chat.completions.create(**{**request, "messages": [{"role": "user", "content": text}]})
                return r.choices[0].message.content, r.usage.completion_tokens

            texts = ["Hi there", "What is two plus two?"]
            want = [ask(alone, t) for t in texts]
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                got = list(pool.map(lambda t: ask(both, t), texts))
            assert got == want, (got, want)
            sizes = {int(n) for n in re.findall(r"decoded in a batch of up to (\d+)", both.log())}
            assert sizes == {1}, sizes

            victim = _rank_pid(both.proc.pid, 1)
            stream = client.chat.completions.create(
                model="gpt-oss",
                messages=[{"role": "user", "content": "Tell me a story"}],
                max_tokens=100000,
                stream=True,
            )
            text, killed, failed = "", None, None
            try:
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        text += chunk.choices[0].delta.content
                    if killed is None and "word12 " in text:
                        killed = time.monotonic()
                        os.kill(victim, signal.SIGKILL)
                    if killed is not None and time.monotonic() - killed > 10:
                        raise AssertionError(
                            f"the stream went on for 10 s after rank 1 was killed: {text[-200:]}"
                        )
            except openai.APIError as e:  # the server's error event, in words
                failed = e
            ended = time.monotonic() - killed
            assert killed is not None and ended < 5, (ended, text[-200:])
            assert "word2999" not in text
            assert both.proc.wait(timeout=20) != 0
            log = both.log()
            assert "rank 1" in log and "closed its connection" in log, log[-2000:]
            assert "Traceback" not in log, log[-3000:]
            assert isinstance(failed, openai.APIError) and "rank 1" in str(failed), (failed, text[-200:])
    finally:
        for server in (alone, both):
            if server.proc.poll() is None:
                for pid in _children(server.proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass


# ---- bad input and faults at the edges: start-up, Ctrl-C, a rank lost between requests -----------------


def test_hostfile_refuses_fields_of_the_wrong_type():
    """Each field's type is checked where the file is read (not later, as a bug, on another machine)."""
    with pytest.raises(HostsError, match='"ips" must be a list'):
        Hostfile.parse({"hosts": [{"ssh": "a", "ips": "10.0.0.1"}, {"ssh": "b", "ips": ["10.0.0.2"]}]})
    with pytest.raises(HostsError, match="5 is not an IP"):
        Hostfile.parse({"hosts": [{"ssh": "a", "ips": [5]}, {"ssh": "b", "ips": ["10.0.0.2"]}]})
    with pytest.raises(HostsError, match="memory_gb must be a positive number"):
        Hostfile.parse(_hosts(2, memory_gb=True))
    with pytest.raises(HostsError, match='"model" must be a path'):
        Hostfile.parse(_hosts(2, model=5))
    with pytest.raises(HostsError, match='"python" must be a path'):
        Hostfile.parse(_hosts(2, python=["python3"]))


def _worker_pid(root: int, timeout: float = 30.0) -> int:
    """The first rank --hosts started (as soon as it exists: before it joins the group)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in _children(root):
            try:
                if b"oss_mlx.distributed.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
        time.sleep(0.01)
    raise AssertionError(f"no worker under {root}")


def test_agreed_start_up_failure_says_each_reason_once(tiny, tmp_path):
    """More ranks than a pipeline can hold: every rank refuses the plan for the same reason, said once."""
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps(_hosts(3)))
    from oss_mlx.synthetic import SyntheticSpec, write_checkpoint

    two = tmp_path / "two-layers"
    write_checkpoint(two, SyntheticSpec.tiny(num_layers=2), seed=1, dtype="float32")
    cmd = [sys.executable, "-m", "oss_mlx.cli", "generate", "--model", str(two), "--max-tokens", "2"]
    run = _run([*cmd, "--hosts", str(hosts), "--distributed", "pipeline", "Hi"], _env(), timeout=90)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "ranks 0, 1, 2: plan the split: 3 ranks for 2 layers" in run.stderr, run.stderr[-2000:]
    assert run.stderr.count("at least one layer per rank") == 1, run.stderr[-2000:]


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_a_rank_that_hangs_or_ends_before_joining_ends_the_start_up(tiny, tmp_path, fault):
    """Rank 1 stopped or killed while it starts (before it joins the group, where MLX's set-up waits
    for it for good): rank 0 says so and ends within the connect timeout, and rank 1 is gone."""
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps(_hosts(2)))
    cmd = [sys.executable, "-m", "oss_mlx.cli", "generate", "--model", str(tiny), "--max-tokens", "2"]
    proc = _start([*cmd, "--hosts", str(hosts), "Hi"], _env(OSS_MLX_CONNECT_TIMEOUT="2"))
    try:
        victim = _worker_pid(proc.pid)
        os.kill(victim, getattr(signal, fault))
        hit = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - hit < 2 + 5 + 5, err[-2000:]
        assert proc.returncode != 0
        if fault == "SIGSTOP":
            assert "did not all join the group within 2 s" in err, err[-2000:]
        else:  # said by the launcher's watch or, while MLX waits, by the join's
            said = r"rank 1 \(.*pid \d+\).* (was killed by signal 9|ended before the group)"
            assert re.search(said, err), err[-2000:]
        assert "Traceback" not in err, err[-3000:]
        assert _gone(victim, 5)
    finally:
        _end(proc)


@pytest.mark.parametrize("target", ["group", "rank0"])
def test_ctrl_c_stops_every_rank_in_order_with_hosts(tiny, tmp_path, target):
    """SIGINT mid-generation, to the terminal's process group (as Ctrl-C) or to rank 0 alone: rank 0
    says "interrupted" and stops the others (they leave as stopped, not as failed); no failure is
    reported and every rank exits within seconds."""
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps(_hosts(2)))
    cmd = [sys.executable, "-m", "oss_mlx.cli", "generate", "--model", str(tiny), "--max-tokens", "100000"]
    cmd += ["--temperature", "0", "--reasoning-effort", "low", "--hosts", str(hosts), "Tell me a story"]
    proc = _start(cmd, _env(OSS_MLX_DISTRIBUTED_LOG="1"))
    try:
        out = _Lines(proc)
        worker = _worker_pid(proc.pid, timeout=60)
        while len("".join(out.lines)) < 40:  # decoding
            out.wait_for("", 60)
        sent = time.monotonic()
        if target == "group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - sent < 5, err[-2000:]
        assert proc.returncode == 130, err[-2000:]
        assert "interrupted" in err and "stopped by rank 0" in err, err[-2000:]
        assert "failed" not in err and "Traceback" not in err, err[-3000:]
        assert not _alive(worker)
    finally:
        _end(proc)


def test_a_rank_lost_between_requests_ends_the_next_one_in_words(tiny, tmp_path):
    """Rank 1 killed while rank 0 waits for the next message: that message ends with an error naming
    rank 1 at once (it was once left queued for good, the stepping thread logging the error in a loop)."""
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps(_hosts(2)))
    cmd = [sys.executable, str(PROBE), str(tiny), "--distributed", "pipeline", "--hosts", str(hosts)]
    proc = _start([*cmd, "--after-a-line"], _env())
    try:
        out = _Lines(proc)
        out.wait_for('"ready"', 90)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
        time.sleep(1.0)  # the link notices
        proc.stdin.write("go\n")
        proc.stdin.flush()
        error = json.loads(out.wait_for('"error"', 10))["error"]
        assert "rank 1" in error and "closed its connection" in error, error
        assert proc.wait(timeout=20) == 1
        err = proc.stderr.read()
        assert err.count("closed its connection") <= 2, err[-3000:]  # not logged over and over
    finally:
        _end(proc)


def test_a_bad_connect_timeout_is_refused_before_any_rank_starts(tiny, tmp_path):
    """OSS_MLX_CONNECT_TIMEOUT is checked on rank 0 before it starts the others: status 2, one line
    naming the variable and its range, no rank left behind."""
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps(_hosts(2)))
    cmd = [sys.executable, "-m", "oss_mlx.cli", "generate", "--model", str(tiny), "--max-tokens", "2"]
    proc = _start([*cmd, "--hosts", str(hosts), "Hi"], _env(OSS_MLX_CONNECT_TIMEOUT="abc"))
    try:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        assert "OSS_MLX_CONNECT_TIMEOUT must be a number between 1 and" in err and "Traceback" not in err
        assert not _ranks_with(b"OSS_MLX_CONNECT_TIMEOUT=abc")
    finally:
        _end(proc)


def _ranks_with(setting: bytes) -> list[int]:
    """The worker ranks alive whose environment holds `setting`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if b"oss_mlx.distributed.worker" in (entry / "cmdline").read_bytes():
                if setting in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
        except (OSError, ValueError):
            pass
    return found
