"""Reloading policies on the real `steer serve` (real vLLM engine): the engine keeps running, the
next request follows the edited file, a request in flight finishes on its old policy, and a bad
edit changes nothing. Each test edits its own policies and the file is restored afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import pytest
import yaml
from steering_client import BadRequestError, ConflictError, SteeringClient
from steering_tools.fixtures import corpus

from tests.live_server import API_KEY, LABELS, MAX_MODEL_LEN, STEER, start_server, stop_server, write_config
from tests.server.test_protocol import metric

PROMPT = "every cat reads a long story"
GREEDY = {"temperature": 0.0, "max_tokens": 16}


class Config:
    """The server's deployment YAML, edited as a mapping."""

    def __init__(self, path: Path):
        self.path = path
        self.data = yaml.safe_load(path.read_text())

    @property
    def policies(self) -> dict:
        return self.data["policies"]

    def save(self) -> None:
        self.path.write_text(yaml.safe_dump(self.data, sort_keys=False))


@pytest.fixture
def config(server):
    """The served config, for a test to edit; restored (and reloaded) when the test ends."""
    original = server.config.read_text()
    yield Config(server.config)
    server.config.write_text(original)
    assert reload(server).status_code == 200


def reload(server) -> httpx.Response:
    with server.http() as http:
        return http.post("/v1/admin/reload")


def engine_processes(server) -> set[int]:
    """The server and every process under it (vLLM's engine core among them)."""
    process = psutil.Process(server.process.pid)
    return {process.pid, *(child.pid for child in process.children(recursive=True))}


def greedy(server, policy: str, **fields) -> str:
    return server.openai().completions.create(model=policy, prompt=PROMPT, **GREEDY, **fields).choices[0].text


def expected(reference, tokenizer, alpha: dict, max_tokens: int = 16) -> str:
    (ids,) = reference.generate([tokenizer.encode(PROMPT)], [alpha], max_tokens=max_tokens)
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_an_edited_alpha_serves_the_reference_at_the_new_alpha_in_the_same_engine(
        server, config, llama_reference, tokenizer):
    config.policies["rollout"] = {"alpha": {"chat": 1.0}}
    config.save()
    assert reload(server).json()["added"] == ["rollout"]
    assert greedy(server, "rollout") == expected(llama_reference, tokenizer, {"chat": 1.0})
    processes = engine_processes(server)
    new_alpha = {"chat": 2.5, "code": -1.0}
    assert expected(llama_reference, tokenizer, new_alpha) != expected(llama_reference, tokenizer, {"chat": 1.0})

    config.policies["rollout"]["alpha"] = new_alpha
    config.save()
    report = subprocess.run([STEER, "reload", "--url", f"{server.url}/v1", "--api-key", API_KEY],
                            capture_output=True, text=True, timeout=60)

    assert report.returncode == 0, report.stderr
    assert "changed rollout: alpha" in report.stdout
    answer = server.openai().completions.create(model="rollout", prompt=PROMPT, **GREEDY)
    assert answer.choices[0].text == expected(llama_reference, tokenizer, new_alpha)
    assert answer.steering["alpha"] == new_alpha
    assert engine_processes(server) == processes
    log = server.log.read_text()
    assert "(steer reload): config " in log  # who: the client's address and user agent
    assert "changed rollout (alpha)" in log


def test_policies_added_and_removed_are_listed_by_every_client(server, config):
    before = [m.id for m in server.openai().models.list()]
    del config.policies["mix"]
    config.policies["chat-twice"] = {"description": "the chat pair, doubled", "alpha": {"chat": 2.0}}
    config.save()
    reloads = server.metric("steer_config_reloads_total", result="reloaded")

    with SteeringClient(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as client:
        result = client.policies.reload()
        listed = [policy.id for policy in client.policies.list()]

    assert (result.status, result.added, result.removed) == ("reloaded", ["chat-twice"], ["mix"])
    assert listed == [m.id for m in server.openai().models.list()] == [p for p in before if p != "mix"] + ["chat-twice"]
    assert server.metric("steer_config_reloads_total", result="reloaded") == reloads + 1
    assert server.metric("steer_config_info", digest=result.digest) == 1
    with pytest.raises(openai.NotFoundError, match="the policy 'mix' does not exist"):
        greedy(server, "mix")
    assert greedy(server, "chat-twice") == greedy(server, "chat", extra_body={"steering": {"alpha": {"chat": 2.0}}})


def test_a_stream_in_flight_finishes_on_its_old_policy(server, config, llama_reference, tokenizer):
    config.policies["rollout"] = {"alpha": {"chat": 1.0}}
    config.save()
    assert reload(server).status_code == 200
    old, new = {"chat": 1.0}, {"chat": -2.0}
    want_old, want_new = (expected(llama_reference, tokenizer, alpha, max_tokens=24) for alpha in (old, new))
    assert want_old[:8] != want_new[:8]
    body = {"model": "rollout", "prompt": PROMPT, "stream": True, "temperature": 0.0, "ignore_eos": True,
            "max_tokens": MAX_MODEL_LEN - 32}

    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as stream:
        events = stream.iter_lines()
        first = next(line for line in events if line.startswith("data: "))
        config.policies["rollout"]["alpha"] = new
        config.save()
        assert reload(server).json()["changed"] == {"rollout": ["alpha"]}
        assert server.metric("steer_engine_unfinished_requests") >= 1  # still generating after the reload
        now = greedy(server, "rollout")
        assert now == want_new[:len(now)]
        chunks = [json.loads(first.removeprefix("data: "))]
        chunks += [json.loads(line.removeprefix("data: ")) for line in events
                   if line.startswith("data: ") and line != "data: [DONE]"]

    text = "".join(choice["text"] for chunk in chunks for choice in chunk["choices"])
    assert text.startswith(want_old)
    assert chunks[-1]["steering"]["alpha"] == old
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_an_invalid_config_is_refused_and_the_old_policies_keep_serving(server, config, llama_reference, tokenizer):
    serving = [m.id for m in server.openai().models.list()]
    config.path.write_text(config.path.read_text() + "\n  broken: [\n")
    refused = subprocess.run([STEER, "reload", "--url", server.url, "--api-key", API_KEY],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "the server refused the reload (400 invalid_config: config:" in refused.stderr
    assert "is not valid YAML" in refused.stderr

    config.policies["chat"]["alpha"] = {"nope": 1.0}
    config.save()
    with SteeringClient(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as client, \
            pytest.raises(BadRequestError) as invalid:
        client.policies.reload()

    error = invalid.value.body["error"]
    assert (invalid.value.status_code, error["code"], error["param"]) == (400, "invalid_config",
                                                                          "policies.chat.alpha.nope")
    assert "unknown expert pair" in error["message"]
    assert server.metric("steer_config_last_reload_successful") == 0
    assert [m.id for m in server.openai().models.list()] == serving
    assert greedy(server, "chat") == expected(llama_reference, tokenizer, {"chat": 1.0})
    assert "refused; still serving config" in server.log.read_text()


def test_a_change_to_the_experts_is_refused(server, config, llama_reference, tokenizer):
    pair = config.data["experts"]["chat"]
    pair["tuned"], pair["untuned"] = pair["untuned"], pair["tuned"]
    config.save()
    with SteeringClient(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as client, \
            pytest.raises(ConflictError) as refused:
        client.policies.reload()
    error = refused.value.body["error"]
    assert (refused.value.status_code, error["code"], error["param"]) == (409, "restart_required", "experts.chat.tuned")
    assert "takes effect only when the server restarts" in error["message"]
    assert greedy(server, "chat") == expected(llama_reference, tokenizer, {"chat": 1.0})


def test_sighup_reloads_the_file(server, config):
    config.policies["hup"] = {"description": "added by SIGHUP", "alpha": {"chat": 0.5}}
    config.save()
    os.kill(server.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while "hup" not in [m.id for m in server.openai().models.list()]:
        assert time.monotonic() < deadline, "SIGHUP did not reload the config"
        time.sleep(0.1)
    assert server.process.poll() is None
    assert "config reload by SIGHUP" in server.log.read_text()


def test_calibrate_apply_rolls_out_a_recalibrated_policy(server, config, tokenizer, llama_reference):
    """One command: fit on labelled data, replace the file the policy names, reload the server."""
    root = config.path.parent
    (root / "rollout.json").write_text(json.dumps(
        {"kind": "decision", "policy": "rollout", "temperature": 2.5, "labels": LABELS}))
    config.policies["rollout"] = {"alpha": {"chat": 1.0}, "calibration": "rollout.json",
                                  "decision": {"labels": LABELS, "costs": [[0, 1, 1], [1, 0, 1], [1, 1, 0]]}}
    config.save()
    assert reload(server).status_code == 200
    rng = np.random.default_rng(0)
    rows = [{"prompt": p, "label": LABELS[rng.integers(3)]} for p in corpus()[::7][:40]]
    (root / "labels.jsonl").write_text("\n".join(map(json.dumps, rows)))
    reloads = server.metric("steer_config_reloads_total", result="reloaded")

    run = subprocess.run([STEER, "calibrate", "--config", str(config.path), "--policy", "rollout", "--data",
                          str(root / "labels.jsonl"), "--apply", "--url", f"{server.url}/v1", "--api-key", API_KEY],
                         capture_output=True, text=True, timeout=600)

    assert run.returncode == 0, run.stderr[-3000:]
    assert "changed rollout: calibration" in run.stdout
    fitted = json.loads((root / "rollout.json").read_text())["temperature"]
    assert fitted != 2.5
    assert server.metric("steer_config_reloads_total", result="reloaded") == reloads + 1
    decision = server.openai().chat.completions.create(
        model="rollout", messages=[{"role": "user", "content": PROMPT}]).steering["decision"]
    raw = np.log([decision["probabilities"][label] for label in LABELS])
    calibrated = np.exp(raw / fitted) / np.exp(raw / fitted).sum()
    assert decision["temperature"] == fitted
    assert [decision["calibrated"][label] for label in LABELS] == pytest.approx(calibrated.tolist(), abs=1e-9)


def test_calibrate_apply_needs_a_file_the_policy_names(server, config, tmp_path):
    (tmp_path / "labels.jsonl").write_text(json.dumps({"prompt": PROMPT, "label": "yes"}))
    run = subprocess.run([STEER, "calibrate", "--config", str(config.path), "--policy", "triage", "--data",
                          str(tmp_path / "labels.jsonl"), "--apply", "--url", server.url, "--api-key", API_KEY],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "policies.triage.calibration: --apply replaces the calibration file a policy names" in run.stderr


def kubelet_update(folder: Path, files: dict[str, str]) -> None:
    """Write `files` into `folder` as the kubelet updates a mounted ConfigMap: the new version in a
    hidden folder of its own, made current by renaming one `..data` symlink over the old one; each
    key is a symlink through `..data`."""
    version = folder / f"..{time.time_ns()}"
    version.mkdir()
    for name, text in files.items():
        (version / name).write_text(text)
    staged = folder / "..data_tmp"
    staged.symlink_to(version.name)
    os.replace(staged, folder / "..data")
    for name in files:
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(Path("..data") / name)


def test_a_configmap_update_reaches_a_server_that_watches_its_config(
        llama_family, tmp_path, llama_reference, tokenizer):
    """`steer serve --watch-config`, as each replica of deploy/kubernetes runs it: no reload call."""
    source = tmp_path / "source"
    source.mkdir()
    write_config(llama_family, source / "deploy.yaml")
    files = {path.name: path.read_text() for path in source.iterdir()}  # deploy.yaml and its calibration
    mount = tmp_path / "etc-steering"
    mount.mkdir()
    kubelet_update(mount, files)
    server = start_server(mount / "deploy.yaml", tmp_path / "server.log", "--watch-config", "0.2")

    def reloads(result: str) -> float:
        with server.http() as http:
            return metric(http.get("/metrics").text, "steer_config_reloads_total", result=result)

    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, f"the server did not {what}"
            time.sleep(0.1)

    try:
        assert greedy(server, "chat") == expected(llama_reference, tokenizer, {"chat": 1.0})
        edited = yaml.safe_load(files["deploy.yaml"])
        edited["policies"]["chat"]["alpha"] = {"chat": 2.5}
        kubelet_update(mount, {**files, "deploy.yaml": yaml.safe_dump(edited, sort_keys=False)})
        wait_for(lambda: reloads("reloaded") == 1, "reload the updated ConfigMap")
        assert greedy(server, "chat") == expected(llama_reference, tokenizer, {"chat": 2.5})
        assert f"config reload by a change to {mount / 'deploy.yaml'}: config " in server.log.read_text()

        kubelet_update(mount, {**files, "deploy.yaml": "{broken"})
        wait_for(lambda: reloads("refused") == 1, "refuse a broken ConfigMap")
        time.sleep(1.0)  # five more looks at the same broken file: not refused again
        assert reloads("refused") == 1 and reloads("reloaded") == 1
        assert greedy(server, "chat") == expected(llama_reference, tokenizer, {"chat": 2.5})
    finally:
        stop_server(server)
