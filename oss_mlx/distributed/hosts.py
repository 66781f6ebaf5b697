"""hosts.json: the machines of a distributed run, and starting the other ranks on them (`--hosts`).

The file is mlx.launch's hostfile, so one file serves both ways of starting a run:

    {"backend": "ring",                      optional: ring (default), nccl, jaccl, jaccl-ring
     "envs": ["NAME=value", ...],            optional: set on every rank
     "hosts": [                              rank order; rank 0 first (the machine you type on)
        {"ssh": "mac-studio.local",          how to reach it (127.0.0.1: a local process, no ssh)
         "ips": ["10.0.0.1"],                the addresses the backend uses (ring: required)
         "rdma": [null, "rdma_en3"],         jaccl only, as mlx.launch wants it
         "memory_gb": 48,                    optional, ours: the memory budget planned for that rank
         "model": "/Volumes/models/120b",    optional, ours: the model folder on that machine
         "python": "/opt/venv/bin/python3"}  optional, ours: the interpreter there
     ]}

(A bare list of host objects works too.) Why we start the ranks ourselves rather than through
mlx.launch: mlx.launch pipes every rank's terminal, so rank 0 would have no terminal for `oss-mlx
chat`; with `--hosts` this process is rank 0 and keeps its terminal, and the others are started
with ssh (or as local processes for 127.0.0.1), with the environment mlx.launch would give them.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("ring", "nccl", "jaccl", "jaccl-ring")
RING_PORT = 32323  # mlx.launch's default first port; loopback runs pick free ports instead
LOG_ENV = "OSS_MLX_DISTRIBUTED_LOG"  # 1: echo the other ranks' output, prefixed with their rank


class HostsError(ValueError):
    """A hosts.json that cannot describe a run; the message names the problem and the fix."""


@dataclass(frozen=True)
class Host:
    ssh: str
    ips: tuple[str, ...] = ()
    rdma: tuple = ()
    memory_gb: float | None = None
    model: str | None = None
    python: str | None = None

    @property
    def local(self) -> bool:
        return self.ssh in ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Hostfile:
    hosts: tuple[Host, ...]
    backend: str = "ring"
    envs: tuple[str, ...] = ()
    path: Path | None = None

    @classmethod
    def read(cls, path: str | os.PathLike) -> Hostfile:
        p = Path(path).expanduser()
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise HostsError(f"{p}: no such hosts file") from None
        except (OSError, json.JSONDecodeError) as e:
            raise HostsError(f"{p}: not a readable JSON hosts file ({e})") from None
        return cls.parse(data, p)

    @classmethod
    def parse(cls, data, path: Path | None = None) -> Hostfile:
        where = f"{path}: " if path else ""
        if isinstance(data, list):
            data = {"hosts": data}
        if not isinstance(data, dict) or not isinstance(data.get("hosts"), list):
            raise HostsError(
                f'{where}expected {{"hosts": [{{"ssh": ..., "ips": [...]}}, ...]}} (mlx.launch\'s hostfile)'
            )
        backend = data.get("backend") or "ring"
        if backend not in BACKENDS:
            raise HostsError(f"{where}backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        envs = data.get("envs") or []
        if not all(isinstance(e, str) and "=" in e for e in envs):
            raise HostsError(f'{where}"envs" must be a list of "NAME=value" strings')
        hosts = [_host(i, h, backend, where) for i, h in enumerate(data["hosts"])]
        if len(hosts) < 2:
            raise HostsError(f"{where}a distributed run needs at least two hosts (ranks); {len(hosts)} given")
        return cls(tuple(hosts), backend, tuple(envs), path)


def _host(i: int, h, backend: str, where: str) -> Host:
    """One entry of "hosts", checked: each field's type too (a number where a path belongs would
    otherwise fail later, as a bug, on another machine)."""
    if not isinstance(h, dict) or not isinstance(h.get("ssh"), str) or not h["ssh"]:
        raise HostsError(f'{where}host {i}: needs "ssh": the name or address to reach it')
    name = f"{where}host {i} ({h['ssh']})"
    ips = h.get("ips") or []
    if not isinstance(ips, list):
        raise HostsError(f'{name}: "ips" must be a list of addresses, e.g. ["10.0.0.1"]')
    for ip in ips:
        try:
            ipaddress.ip_address(ip if isinstance(ip, str) else "")  # (a number would pass as one)
        except ValueError:
            raise HostsError(f"{name}: {ip!r} is not an IP address") from None
    if backend == "ring" and not ips:
        raise HostsError(f'{name}: the ring backend needs its "ips"')
    memory = h.get("memory_gb")
    if memory is not None and (
        isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory <= 0
    ):
        raise HostsError(f"{name}: memory_gb must be a positive number of GB")
    for key in ("model", "python"):
        if h.get(key) is not None and (not isinstance(h[key], str) or not h[key]):
            raise HostsError(f'{name}: "{key}" must be a path (a string)')
    rdma = h.get("rdma") or []
    if not isinstance(rdma, list):
        raise HostsError(f'{name}: "rdma" must be a list, as mlx.launch wants it')
    return Host(h["ssh"], tuple(ips), tuple(rdma), memory, h.get("model"), h.get("python"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environments(hostfile: Hostfile) -> list[dict[str, str]]:
    """What each rank's environment needs for the backend (as mlx.launch sets it); MLX_HOSTFILE and
    MLX_IBV_DEVICES hold file contents here (`Launch` writes the files)."""
    hosts, n = hostfile.hosts, len(hostfile.hosts)
    loopback = all(ip.startswith("127.") for h in hosts for ip in h.ips)
    base = dict(e.split("=", 1) for e in hostfile.envs)
    envs = [{**base, "MLX_RANK": str(r), "OSS_MLX_BACKEND": hostfile.backend} for r in range(n)]
    if hostfile.backend == "ring":
        port = RING_PORT
        ring = []
        for h in hosts:
            node = []
            for ip in h.ips:
                node.append(f"{ip}:{_free_port() if loopback else port}")
                port += 1
            ring.append(node)
        for e in envs:
            e["MLX_HOSTFILE"] = json.dumps(ring)
    elif hostfile.backend == "nccl":
        if not hosts[0].ips:
            raise HostsError('nccl: rank 0 needs "ips" reachable from all other ranks')
        nccl_port = str(_free_port() if loopback else 12345)
        seen: collections.Counter = collections.Counter()
        for e, h in zip(envs, hosts):
            e.update(NCCL_HOST_IP=hosts[0].ips[0], NCCL_PORT=nccl_port, MLX_WORLD_SIZE=str(n))
            e["CUDA_VISIBLE_DEVICES"] = str(seen[h.ssh])  # one GPU per rank on a machine
            seen[h.ssh] += 1
    else:  # jaccl, jaccl-ring
        if not hosts[0].ips:
            raise HostsError('jaccl: rank 0 needs "ips" reachable from all other ranks')
        for e in envs:
            e["MLX_JACCL_COORDINATOR"] = f"{hosts[0].ips[0]}:{RING_PORT}"
            e["MLX_IBV_DEVICES"] = json.dumps([list(h.rdma) for h in hosts])
            if hostfile.backend == "jaccl-ring":
                e["MLX_JACCL_RING"] = "1"
    return envs


_FILE_VARS = ("MLX_HOSTFILE", "MLX_IBV_DEVICES")


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


@dataclass
class _Worker:
    rank: int
    host: Host
    process: subprocess.Popen
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=12))


class Launch:
    """The ranks this process started (1..N-1); this process becomes rank 0 (`prepare_self`).

    A rank that exits before `wait` is a failure, reported to `on_failure` (by default: said, then
    this process exits: during start-up nothing is lost)."""

    def __init__(self, hostfile: Hostfile, worker_args: list[str]) -> None:
        self.hostfile = hostfile
        self.worker_args = worker_args
        self.envs = rank_environments(hostfile)
        self.workers: list[_Worker] = []
        self.on_failure: Callable[[str], None] = self._fail_at_start
        self._ending = False
        self._claimed = False  # a rank's end was reported (once: by the watcher or by `exited`)
        self._lock = threading.Lock()
        self._files: list[str] = []
        self._echo = os.environ.get(LOG_ENV, "") not in ("", "0")

    # -- rank 0 ----------------------------------------------------------------------------------

    def prepare_self(self) -> None:
        """Make this process rank 0: the backend's environment, before the group is joined."""
        for key, value in self.envs[0].items():
            os.environ[key] = self._file(value) if key in _FILE_VARS else value

    def _file(self, content: str) -> str:
        fd, path = tempfile.mkstemp(prefix="oss-mlx-hosts-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(content)
        self._files.append(path)
        return path

    # -- the others ------------------------------------------------------------------------------

    def start(self) -> None:
        for rank in range(1, len(self.hostfile.hosts)):
            host = self.hostfile.hosts[rank]
            model_args = list(self.worker_args)
            if host.model:
                model_args = _replace_model(model_args, host.model)
            if host.local:
                python = host.python or sys.executable
                env = {
                    **os.environ,
                    **{k: self._file(v) if k in _FILE_VARS else v for k, v in self.envs[rank].items()},
                }
                cmd = [python, "-m", "oss_mlx.distributed.worker", *model_args]
                proc = _spawn(cmd, env)
            else:
                proc = _spawn(
                    ["ssh", "-o", "BatchMode=yes", host.ssh, self._remote_script(rank, host, model_args)]
                )
            worker = _Worker(rank, host, proc)
            self.workers.append(worker)
            threading.Thread(target=self._read, args=(worker,), daemon=True).start()
        threading.Thread(target=self._watch, name="oss-mlx-launch", daemon=True).start()

    def _remote_script(self, rank: int, host: Host, args: list[str]) -> str:
        script = ""
        for key, value in self.envs[rank].items():
            if key in _FILE_VARS:
                script += f"f=$(mktemp); printf %s {shlex.quote(value)} > $f; export {key}=$f; "
            else:
                script += f"export {key}={shlex.quote(value)}; "
        python = host.python or "python3"
        return script + "exec " + shlex.join([python, "-m", "oss_mlx.distributed.worker", *args])

    def _read(self, worker: _Worker) -> None:
        for raw in iter(worker.process.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            worker.tail.append(line)
            if self._echo:
                print(f"[rank {worker.rank}] {line}", file=sys.stderr, flush=True)

    def _watch(self) -> None:
        while not self._ending:
            ended = self._ended()
            if ended is not None:
                time.sleep(0.2)  # its last words
                if self._claim():
                    self.on_failure(self._describe(ended))
                return
            time.sleep(0.1)

    def _ended(self) -> _Worker | None:
        return next((w for w in self.workers if w.process.poll() is not None), None)

    def _describe(self, w: _Worker) -> str:
        said = " | ".join(line for line in w.tail if line.strip())[-600:]
        where = "this machine" if w.host.local else w.host.ssh
        return f"rank {w.rank} (on {where}, pid {w.process.pid}) {describe_exit(w.process.poll())}" + (
            f"; its last output: {said}" if said else ""
        )

    def _claim(self) -> bool:
        """Whether this caller is the one to report a rank's end (the watcher, or `exited`)."""
        with self._lock:
            claimed, self._claimed = self._claimed, True
        return not claimed and not self._ending

    def exited(self, wait: float = 1.0) -> str | None:
        """Why a rank we started has ended, if one has within `wait` seconds: the cause to report
        when start-up fails (MLX's own error then is only a refused or lost connection). Claims the
        report: the watcher stays silent."""
        deadline = time.monotonic() + wait
        while (ended := self._ended()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if ended is None:
            return None
        time.sleep(0.2)  # its last words
        return self._describe(ended) if self._claim() else None

    def _fail_at_start(self, reason: str) -> None:
        print(f"oss-mlx: {reason}", file=sys.stderr, flush=True)
        self.kill()
        os._exit(1)

    def kill(self) -> None:
        """End every rank we started, now (SIGKILL: a stopped or blocked process ends too)."""
        self._ending = True
        for w in self.workers:
            if w.process.poll() is None:
                try:
                    w.process.kill()
                except OSError:
                    pass
        self._cleanup()

    def wait(self, timeout: float = 15.0) -> None:
        """A planned end: let the ranks exit, then end any that did not."""
        self._ending = True
        deadline = time.monotonic() + timeout
        for w in self.workers:
            try:
                w.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.process.kill()
        self._cleanup()

    def _cleanup(self) -> None:
        for path in self._files:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._files.clear()


def _spawn(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    """A rank's process, in a session of its own: the terminal's Ctrl-C is meant for rank 0 (the chat
    stops a reply on it), which stops the others itself; a rank interrupted mid-collective would end
    the run."""
    return subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _replace_model(args: list[str], model: str) -> list[str]:
    out = list(args)
    if "--model" in out:
        out[out.index("--model") + 1] = model
    return out
