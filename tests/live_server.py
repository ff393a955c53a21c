"""A real `steer serve` subprocess (real vLLM CPU engine): what the server and client tests drive."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import yaml

STEER = str(Path(sys.executable).parent / "steer")
API_KEY = "test-key"
MAX_MODEL_LEN = 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A running `steer serve`: its address, process and log, and the /health statuses seen."""

    url: str
    process: subprocess.Popen
    log: Path
    health_seen: list[int] = field(default_factory=list)

    def http(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kwargs)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0)

    def async_openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0)

    def metric(self, name: str, **labels) -> float:
        """The sum of a Prometheus sample over the series whose labels include `labels`."""
        total = 0.0
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


LABELS = ["yes", "no", "cat"]  # first tokens 'y', 'n', 'ca' in the fixture tokenizer
ZERO_ONE = [[0, 1, 1], [1, 0, 1], [1, 1, 0]]
CALIBRATED_TEMPERATURE = 2.5


def write_config(family: dict, path: Path, **engine) -> Path:
    calibration = {"kind": "decision", "policy": "triage-calibrated", "temperature": CALIBRATED_TEMPERATURE,
                   "labels": LABELS}
    (path.parent / "triage.json").write_text(json.dumps(calibration))
    decision = {"labels": LABELS, "costs": ZERO_ONE, "max_cost": 100}
    config = {
        "base": family["base"],
        "experts": family["experts"],
        "policies": {
            "base": {"description": "the frozen base"},
            "chat": {"description": "the chat pair", "alpha": {"chat": 1.0}, "max_alpha": 4.0},
            "mix": {"alpha": {"chat": 1.5, "code": -0.5}, "max_alpha": 3.0},
            "triage": {"alpha": {"chat": 1.0}, "decision": {**decision, "abstain_cost": 0.9}},
            "triage-calibrated": {"alpha": {"chat": 1.0}, "decision": decision, "calibration": "triage.json"},
            "qa": {"alpha": {"chat": 1.0}, "abstain": {"score": "mean_prob", "threshold": 0.0,
                                                        "threshold_bounds": [0.0, 1.0]}},
            "qa-first": {"alpha": {"chat": 1.0}, "abstain": {"score": "first_prob", "threshold": 0.0,
                                                              "threshold_bounds": [0.0, 1.0], "message": "Pass."}},
        },
        "engine": {"dtype": "float32", "max_model_len": MAX_MODEL_LEN, "enforce_eager": True,
                   "kv_cache_memory_bytes": 256 * 2**20, **engine},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_server(config: Path, log: Path, *extra: str) -> Server:
    port = free_port()
    process = subprocess.Popen(
        [STEER, "serve", "--config", str(config), "--port", str(port), "--api-key", API_KEY, *extra],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"steer serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            status = httpx.get(f"{server.url}/health", timeout=5).status_code
        except httpx.TransportError:
            time.sleep(0.5)
            continue
        server.health_seen.append(status)
        if status == 200:
            return server
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"steer serve was not ready in time:\n{log.read_text()[-4000:]}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.process.kill()
