"""Replicas behind vLLM's own router (`vllm-router`): what the router sends is taken, answers through
it equal the reference, a replica killed under load loses nothing, a policy change reaches all.

The router re-serialises every body with fields of its own at neutral values; the first test
captures what it really sends (a recording server stands where a replica would) rather than
copying a list."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import openai
import psutil
import pytest
import uvicorn
import yaml
from fastapi import FastAPI, Request
from pydantic import ValidationError
from steering_server.chat.protocol import ChatCompletionRequest
from steering_server.completions.protocol import CompletionRequest
from steering_server.protocol import NEUTRAL_FIELDS, REFUSAL
from steering_tools.router import start_router
from steering_tools.server_process import free_port

from steering.config import digest, read_deployment
from tests.live_server import API_KEY, Server, start_server, stop_server, write_config

MESSAGES = [{"role": "user", "content": "the moon"}]
GREEDY = {"max_tokens": 12, "temperature": 0.0}
FEEDBACK_SECRET = "one-secret-for-every-replica"


class Recorder:
    """An OpenAI-shaped server on loopback that keeps every body it is sent."""

    def __init__(self):
        self.bodies: dict[str, list[dict]] = {"chat": [], "completions": []}
        app = FastAPI()

        @app.get("/health")
        async def health() -> dict:
            return {"status": "ready"}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> dict:
            self.bodies["chat"].append(await request.json())
            return {"id": "x", "object": "chat.completion", "created": 0, "model": "chat", "usage": USAGE,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}

        @app.post("/v1/completions")
        async def completions(request: Request) -> dict:
            self.bodies["completions"].append(await request.json())
            return {"id": "x", "object": "text_completion", "created": 0, "model": "chat", "usage": USAGE,
                    "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]}

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


USAGE = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


def test_what_the_router_sends_is_taken_and_the_same_fields_at_other_values_refused_by_name(tmp_path):
    recorder = Recorder()
    port = free_port()
    router = start_router([f"http://127.0.0.1:{recorder.port}"], port=port, log=tmp_path / "router.log",
                          prometheus_port=free_port(), timeout=60)
    try:
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key=API_KEY, max_retries=0)
        client.chat.completions.create(model="chat", messages=MESSAGES, logprobs=True, top_logprobs=2,
                                       extra_body={"steering": {"alpha": {"chat": 1.5}}}, **GREEDY)
        client.completions.create(model="chat", prompt="the moon", extra_body={"steering": {"alpha": {"chat": 1.5}}},
                                  **GREEDY)
    finally:
        router.stop()
        recorder.stop()
    for endpoint, request_model in (("chat", ChatCompletionRequest), ("completions", CompletionRequest)):
        (body,) = recorder.bodies[endpoint]
        assert set(NEUTRAL_FIELDS[endpoint]) <= set(body), f"the router no longer sends {endpoint} all of these"
        taken = request_model.model_validate(body)
        assert taken.steering.alpha == {"chat": 1.5} and taken.max_tokens == 12
        for name, neutral in NEUTRAL_FIELDS[endpoint].items():
            other = not neutral if isinstance(neutral, bool) else None
            with pytest.raises(ValidationError) as refused:
                request_model.model_validate({**body, name: other})
            (error,) = refused.value.errors()
            assert (error["type"], error["ctx"]["param"]) == (REFUSAL, name)


@pytest.fixture(scope="module")
def replicas(llama_family, tmp_path_factory):
    """Two `steer serve` replicas watching one config file, and the router in front of them."""
    root = tmp_path_factory.mktemp("replicas")
    config = write_config(llama_family, root / "deploy.yaml")
    # Feedback on, one secret for both; the replicas read one YAML here, so they share its store.
    config.write_text(yaml.safe_dump(yaml.safe_load(config.read_text()) | {"feedback": {"secret": FEEDBACK_SECRET}},
                                     sort_keys=False))
    servers = [start_server(config, root / f"replica-{i}.log", "--watch-config", "0.5") for i in range(2)]
    router = start_router([server.url for server in servers], port=free_port(), log=root / "router.log",
                          prometheus_port=free_port(), api_key=API_KEY)
    yield servers, router
    router.stop()
    for server in servers:
        stop_server(server)


def router_client(router) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def expected(reference, tokenizer, ids: list[int], alpha: dict) -> str:
    return tokenizer.decode(reference.generate([ids], [alpha], max_tokens=GREEDY["max_tokens"])[0],
                            skip_special_tokens=True)


def test_steered_answers_through_the_router_equal_the_reference(replicas, llama_reference, tokenizer):
    _, router = replicas
    client = router_client(router)
    alpha = {"chat": 2.5, "code": -1.0}
    steering = {"steering": {"alpha": alpha}}
    completion = client.completions.create(model="mix", prompt="the moon", extra_body=steering, **GREEDY)
    assert completion.choices[0].text == expected(llama_reference, tokenizer, tokenizer.encode("the moon"), alpha)
    assert completion.steering["alpha"] == alpha
    chat_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    chat = client.chat.completions.create(model="chat", messages=MESSAGES, **GREEDY)
    assert chat.choices[0].message.content == expected(llama_reference, tokenizer, chat_ids, {"chat": 1.0})
    assert (chat.steering["policy"], chat.steering["alpha"]) == ("chat", {"chat": 1.0})
    chunks = list(client.chat.completions.create(model="chat", messages=MESSAGES, stream=True, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].steering == chat.steering


def test_the_api_key_holds_through_the_router(replicas):
    _, router = replicas
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(base_url=f"{router.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert refused.value.body["code"] == "invalid_api_key"


def digest_served(server: Server) -> str | None:
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("steer_config_info{"):
            return line.split('digest="', 1)[1].split('"', 1)[0]
    return None


def test_a_feedback_id_one_replica_issued_is_taken_by_the_other_and_through_the_router(replicas):
    servers, router = replicas
    headers = {"Authorization": f"Bearer {API_KEY}"}
    answer = httpx.post(f"{servers[0].url}/v1/completions", headers=headers, timeout=120,
                        json={"model": "qa", "prompt": "the moon", "max_tokens": 4})
    feedback_id = answer.json()["steering"]["feedback_id"]
    # The other replica verifies it with the same secret and no state of the first's.
    taken = httpx.post(f"{servers[1].url}/v1/feedback", headers=headers, json={"id": feedback_id, "outcome": "correct"})
    assert (taken.status_code, taken.json()["status"], taken.json()["policy"]) == (200, "recorded", "qa")
    # Through the router, to whichever replica (the router sends its own --api-key on this route):
    # the same outcome is already kept, another is refused.
    again = httpx.post(f"{router.url}/v1/feedback", headers=headers, json={"id": feedback_id, "outcome": "correct"})
    assert (again.status_code, again.json()["status"]) == (200, "already recorded"), again.text
    other = httpx.post(f"{router.url}/v1/feedback", headers=headers, json={"id": feedback_id, "outcome": "incorrect"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "outcome_conflict"
    forged_id = feedback_id[:-2] + ("AA" if not feedback_id.endswith("AA") else "BB")  # its signature's end
    forged = httpx.post(f"{router.url}/v1/feedback", headers=headers, json={"id": forged_id, "outcome": "correct"})
    assert forged.status_code == 400 and forged.json()["error"]["code"] == "invalid_feedback"


def test_a_policy_change_reaches_every_replica(replicas, llama_reference, tokenizer):
    servers, router = replicas
    config = yaml.safe_load(servers[0].config.read_text())
    config["policies"]["chat"]["alpha"] = {"chat": 1.5}
    started = time.monotonic()
    servers[0].config.write_text(yaml.safe_dump(config, sort_keys=False))
    want = digest(read_deployment(servers[0].config))
    while any(digest_served(server) != want for server in servers):
        assert time.monotonic() - started < 30, "a replica did not take the change within 30 s"
        time.sleep(0.1)
    print(f"\nthe change reached both replicas in {time.monotonic() - started:.1f} s (--watch-config 0.5)")
    client = router_client(router)
    chat_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    for _ in servers:  # round robin: one answer from each replica
        answer = client.chat.completions.create(model="chat", messages=MESSAGES, **GREEDY)
        assert answer.choices[0].message.content == expected(llama_reference, tokenizer, chat_ids, {"chat": 1.5})


def engine_pids(server: Server) -> set[int]:
    return {child.pid for child in psutil.Process(server.process.pid).children(recursive=True)}


async def bounded_load(router, sent: int, in_flight: int, kill_after: int, kill) -> dict[str, int]:
    """`sent` greedy requests through the router, `in_flight` at a time, every fourth a stream; `kill()`
    once `kill_after` have been answered. A request fails cleanly with an error status, an error
    event or a closed connection; a stream the router ends early, without its last chunk (usage,
    steering), is cut: its client knows, as it knows an error; one with no answer within its 120 s
    bound is lost."""
    client = openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    counts = {"sent": 0, "succeeded": 0, "failed cleanly": 0, "cut": 0, "lost": 0}
    gate = asyncio.Semaphore(in_flight)

    async def one(i: int) -> None:
        async with gate:
            counts["sent"] += 1
            ask = {"model": "chat", "prompt": f"the moon {i}", "max_tokens": 48, "temperature": 0.0,
                   "extra_body": {"ignore_eos": True}}
            try:
                if i % 4 == 3:  # a stream: once its first bytes are out, no router can retry it elsewhere
                    stream = await client.completions.create(stream=True, stream_options={"include_usage": True},
                                                             **ask)
                    chunks = [chunk async for chunk in stream]
                    whole = chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 48
                    counts["succeeded" if whole else "cut"] += 1
                else:
                    await client.completions.create(**ask)
                    counts["succeeded"] += 1
            except openai.APITimeoutError:
                counts["lost"] += 1
            except (openai.APIError, httpx.HTTPError):  # an error status, a broken stream, a closed connection
                counts["failed cleanly"] += 1
            if counts["succeeded"] + counts["failed cleanly"] + counts["cut"] == kill_after:
                kill()

    await asyncio.gather(*(one(i) for i in range(sent)))
    await client.close()
    return counts


def test_a_replica_killed_under_load_loses_nothing_and_rejoins(replicas):
    servers, router = replicas
    victim = servers[1]
    pids = engine_pids(victim) | {victim.process.pid}
    counts = asyncio.run(bounded_load(router, sent=40, in_flight=4, kill_after=10,
                                      kill=lambda: os.kill(victim.process.pid, signal.SIGKILL)))
    print(f"\nreplica killed under load: {json.dumps(counts)}")
    assert counts["lost"] == 0 and counts["sent"] == 40
    assert counts["succeeded"] + counts["failed cleanly"] + counts["cut"] == 40
    assert counts["succeeded"] >= 30, "new requests go to the survivor"
    victim.process.wait(timeout=30)
    time.sleep(2)
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"], \
        "the killed replica's engine outlived it"
    # Restarted on the same port, it rejoins: the router sends it requests again.
    restarted = start_server(victim.config, victim.log.with_name("replica-1-restarted.log"), "--watch-config", "0.5",
                             port=int(victim.url.rsplit(":", 1)[1]))
    servers[1] = restarted
    client = router_client(router)
    deadline = time.monotonic() + 60
    while restarted.metric("steer_requests_total", policy="chat") == 0:
        assert time.monotonic() < deadline, "the router never sent the restarted replica a request"
        client.completions.create(model="chat", prompt="the moon", **GREEDY)
