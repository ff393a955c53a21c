"""A real `steer serve` subprocess (real vLLM CPU engine): what the server and client tests drive."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import openai
import yaml
from steering_tools.server_process import ServerProcess, free_port

STEER = str(Path(sys.executable).parent / "steer")
API_KEY = "test-key"
MAX_MODEL_LEN = 1024


class Server(ServerProcess):
    """A running `steer serve` with the tests' API key: clients for it, and its metrics."""

    config: Path | None = None  # the deployment YAML it serves (and reloads)

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
CLAIM_LABELS = ["true", "false"]  # a claim check's labels are names: they need no tokens of their own
# `qa-profile`'s fitted weights: on each of the 22 levels of the base's surprise at the prompt
# (the deeper, the worse), on the mean log-probability, then the intercept.
PROFILE_WEIGHTS = [*(0.1 * level - 1.0 for level in range(22)), 0.05, 0.3]


def write_config(family: dict, path: Path, **engine) -> Path:
    calibration = {"kind": "decision", "policy": "triage-calibrated", "temperature": CALIBRATED_TEMPERATURE,
                   "labels": LABELS}
    (path.parent / "triage.json").write_text(json.dumps(calibration))
    profile = {"kind": "abstention", "policy": "qa-profile", "score": "base_familiarity_fit",
               "weights": PROFILE_WEIGHTS, "platt_a": 1.5, "platt_b": -0.2}
    (path.parent / "qa-profile.json").write_text(json.dumps(profile))
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
            "qa-base": {"alpha": {"chat": 1.0}, "abstain": {"score": "base_prob", "threshold": 0.0,
                                                             "threshold_bounds": [0.0, 1.0]}},
            "qa-agree": {"alpha": {"chat": 1.0}, "abstain": {"score": "base_agreement", "threshold": 0.0,
                                                              "threshold_bounds": [0.0, 1.0]}},
            "qa-familiar": {"alpha": {"chat": 1.0}, "abstain": {"score": "base_familiarity", "threshold": 0.0}},
            "qa-profile": {"alpha": {"chat": 1.0}, "abstain": {"score": "base_familiarity_fit", "threshold": 0.0},
                           "calibration": "qa-profile.json"},
            "check": {"alpha": {"chat": 1.0}, "decision": {"claim": True, "labels": CLAIM_LABELS, "cost_fp": 4.0,
                                                            "cost_fn": 1.0, "max_cost": 100}},
        },
        "engine": {"dtype": "float32", "max_model_len": MAX_MODEL_LEN, "enforce_eager": True,
                   "kv_cache_memory_bytes": 256 * 2**20, **engine},
        "tool_call_parser": "hermes",  # and the default tool_strict_level, parameter, as LangChain's tests need
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_server(config: Path, log: Path, *extra: str, port: int | None = None) -> Server:
    port = port or free_port()
    command = [STEER, "serve", "--config", str(config), "--port", str(port), "--api-key", API_KEY, *extra]
    server = Server.start(command, port=port, log=log)
    server.config = config
    server.wait_ready(600)
    return server


def stop_server(server: Server) -> None:
    server.stop()
