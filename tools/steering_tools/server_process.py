"""A server in a subprocess: started, polled on /health until ready, stopped. Used by the demo,
`steer bench perf` and the tests, for `steer serve` and `vllm serve` alike."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_ready(url: str) -> bool:
    """Whether a server at `url` answers /health with 200."""
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@dataclass
class ServerProcess:
    """A running server: its address, process and log, and the /health statuses seen while starting."""

    url: str
    process: subprocess.Popen
    log: Path
    health_seen: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, command: list[str], *, port: int, log: Path, env: dict | None = None,
              detach: bool = False) -> ServerProcess:
        """Start `command` (which must serve on `port`), its output to `log`; `detach` outlives us."""
        process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                                   start_new_session=detach)
        return cls(f"http://127.0.0.1:{port}", process, log)

    def wait_ready(self, timeout: float) -> ServerProcess:
        """Poll /health until 200; a server that exits or stays unready raises with its log's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.log.name}: the server exited with {self.process.returncode}:\n"
                                   f"{self.log.read_text()[-4000:]}")
            try:
                status = httpx.get(f"{self.url}/health", timeout=5).status_code
            except httpx.TransportError:
                time.sleep(0.5)
                continue
            self.health_seen.append(status)
            if status == 200:
                return self
            time.sleep(0.5)
        self.process.kill()
        raise RuntimeError(f"{self.log.name}: the server was not ready in {timeout:.0f} s:\n{self.log.read_text()[-4000:]}")

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (the server drains), then SIGKILL after `timeout` seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
