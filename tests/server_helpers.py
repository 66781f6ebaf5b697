"""Start `oss-mlx serve` in a subprocess on a free loopback port, wait for /health, stop it (or run
its app and engine in this process: InProcessServer)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, checkpoint: Path, log_path: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [
            sys.executable,
            "-m",
            "oss_mlx.cli",
            "serve",
            "--model",
            str(checkpoint),
            "--port",
            str(self.port),
        ]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [*cmd, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=Path(__file__).resolve().parents[1],
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@contextmanager
def running(*servers: ServerProcess) -> Iterator[tuple[ServerProcess, ...]]:
    """Servers started side by side: ready when entered, stopped on the way out (also on failure)."""
    try:
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


class InProcessServer:
    """The server's app and engine in this process (uvicorn on a thread, a real socket on 127.0.0.1),
    for tests that watch the engine's insides while real clients talk to it over HTTP."""

    def __init__(self, checkpoint: Path, **engine_options):
        import uvicorn

        from oss_mlx.server.app import create_app, listen
        from oss_mlx.server.common import ServerConfig, ServerState
        from oss_mlx.server.worker import Engine

        self.engine = Engine(str(checkpoint), **engine_options)
        self.engine.start()
        config = ServerConfig(model_id="tiny", aliases={"tiny", "gpt-oss"})
        self._server = uvicorn.Server(
            uvicorn.Config(create_app(ServerState(self.engine, config)), log_level="warning", ws="none")
        )
        self._sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> InProcessServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()
        self.engine.stop()
