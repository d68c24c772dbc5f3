"""`blip3o-rl rewards serve` as a child process, returned once it answers `/readyz`: for tests,
benchmarks and scripts that need a reward API on this machine. A server that exits or never gets
ready is an error that quotes the end of its log, not a hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalRewardServer:
    process: subprocess.Popen
    url: str
    log: Path | None
    """Where its stderr goes (None: discarded)."""

    def log_tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log and self.log.exists() else ""

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> LocalRewardServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_reward_server(args: list[str], *, port: int | None = None, env: dict[str, str] | None = None,
                        log: Path | None = None, ready_timeout_s: float = 180.0) -> LocalRewardServer:
    """Start `rewards serve --port PORT *args` (a free port if none) and wait until it is ready."""
    port = port or free_port()
    command = [sys.executable, "-m", "deploy.cli", "rewards", "serve", "--port", str(port), *args]
    with (log.open("wb") if log else open(os.devnull, "wb")) as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    server = LocalRewardServer(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + ready_timeout_s
    while True:
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"reward server exited with code {process.returncode}: {server.log_tail()}")
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"reward server not ready within {ready_timeout_s:.0f} s: {server.log_tail()}")
        time.sleep(0.5)


@contextmanager
def serve_in_thread(app, ready_timeout_s: float = 120.0):
    """Run an ASGI `app` with uvicorn on 127.0.0.1 and an ephemeral port in a background thread
    (tests, the benchmarks' latency proxy); yields the base URL, stops the server on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
