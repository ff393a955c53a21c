"""`steer serve` start-up and shutdown: bad config refused, readiness logged, SIGTERM drains."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import httpx
import psutil
import pytest
import yaml

from tests.live_server import API_KEY, STEER, start_server, stop_server, write_config


def test_bad_config_fails_at_start_up_naming_the_field(llama_family, tmp_path):
    path = write_config(llama_family, tmp_path / "deploy.yaml")
    config = yaml.safe_load(path.read_text())
    config["policies"]["chat"]["max_alpha"] = float("inf")
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([STEER, "serve", "--config", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "policies.chat.max_alpha: Input should be a finite number" in result.stderr


def test_an_empty_api_key_is_refused_at_start_up(llama_family, tmp_path):
    # A Kubernetes Secret with an empty value, or `-e STEER_API_KEY=`: never a server guarded by "".
    path = write_config(llama_family, tmp_path / "deploy.yaml")
    result = subprocess.run([STEER, "serve", "--config", str(path)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "STEER_API_KEY": ""})
    assert result.returncode == 2
    assert "the API key (--api-key or STEER_API_KEY) is empty" in result.stderr


@pytest.fixture(scope="module")
def draining_server(llama_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("draining")
    server = start_server(write_config(llama_family, root / "deploy.yaml"), root / "server.log")
    yield server
    stop_server(server)


def test_log_says_when_and_where_it_is_ready(draining_server):
    log = draining_server.log.read_text()
    assert "engine ready in" in log
    assert ("serving policies ['base', 'chat', 'check', 'mix', 'qa', 'qa-agree', 'qa-base', 'qa-familiar', "
            "'qa-first', 'qa-profile', 'triage', 'triage-calibrated']") in log
    assert f"on {draining_server.url}" in log


def test_sigterm_drains_in_flight_requests_then_exits(draining_server):
    body = {"model": "chat", "prompt": "the moon", "max_tokens": 400, "ignore_eos": True, "temperature": 0.0}
    result = {}

    def long_request():
        with draining_server.http() as http:
            result["response"] = http.post("/v1/completions", json=body, timeout=300)

    worker = threading.Thread(target=long_request)
    worker.start()
    deadline = time.monotonic() + 60
    while "steer_engine_unfinished_requests 1.0" not in httpx.get(f"{draining_server.url}/metrics").text:
        assert time.monotonic() < deadline, "the request never reached the engine"
        time.sleep(0.05)
    draining_server.process.send_signal(signal.SIGTERM)
    worker.join(timeout=300)
    response = result["response"]
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 400
    # uvicorn re-raises the signal once shutdown is complete, as process managers expect.
    assert draining_server.process.wait(timeout=120) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in draining_server.log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{draining_server.url}/health", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)


def test_a_server_whose_engine_dies_stops_so_its_supervisor_restarts_it(llama_family, tmp_path):
    """As `vllm serve` does: nothing can be answered without the engine core, so the server exits 1
    (Kubernetes, or Docker's restart policy, then starts a fresh one) instead of serving 500s."""
    server = start_server(write_config(llama_family, tmp_path / "deploy.yaml"), tmp_path / "server.log")
    try:
        (core,) = [child for child in psutil.Process(server.process.pid).children(recursive=True)
                   if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name()]
        core.kill()
        assert server.process.wait(timeout=120) == 1
        assert "the engine died (vLLM's engine core process is gone); stopping the server" in server.log.read_text()
    finally:
        stop_server(server)
