"""Reloading policies, in-process over `FakeEngine`: what changes, what is refused, what is counted.

The same reloads against the real engine and `steer serve` (SIGHUP, `steer reload`, a stream in
flight) are in `test_reload_live.py`.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from steering_cli.main import build_parser
from steering_server.app import create_app
from steering_server.completions.protocol import CompletionRequest
from steering_server.settings import ServerSettings

from steering.admission import Admission
from steering.config import PolicyChanges, check_reloadable, digest, parse_deployment, read_deployment
from steering.errors import RestartRequired
from steering.policy import Overrides
from tests.server.fake_engine import BOS, FakeEngine, answer
from tests.server.test_protocol import API_KEY, EXPERTS, INVALID, MAX_MODEL_LEN, POLICIES, assert_error, metric

CONFIG = {"base": "fake/base", "experts": EXPERTS, "policies": POLICIES}
PROMPT = "hello"
PROMPT_IDS = [BOS, *map(ord, PROMPT)]


class Served:
    """A server over `FakeEngine`, started from a YAML file that a test edits and reloads."""

    def __init__(self, path: Path):
        self.path = path
        self.config = json.loads(json.dumps(CONFIG))  # no dict shared between policies (deepcopy keeps them shared)
        self.write()
        self.engine = FakeEngine(read_deployment(path), max_model_len=MAX_MODEL_LEN)
        app = create_app(ServerSettings(config=path, api_key=API_KEY), engine=self.engine)
        self.client = TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"})

    def write(self, text: str | None = None) -> None:
        self.path.write_text(text if text is not None else yaml.safe_dump(self.config, sort_keys=False))

    def reload(self, **headers: str):
        return self.client.post("/v1/admin/reload", headers=headers)

    def complete(self, model: str):
        return self.client.post("/v1/completions", json={"model": model, "prompt": PROMPT})

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.client.get("/metrics").text, name, **labels)


@pytest.fixture
def served(tmp_path) -> Served:
    return Served(tmp_path / "deploy.yaml")


def alpha_row(alpha: dict[str, float]) -> list[float]:
    return [alpha.get(pair, 0.0) for pair in EXPERTS]


def test_an_edited_alpha_serves_from_the_next_request(served):
    before = served.complete("chat").json()["choices"][0]["text"]
    assert before == answer(PROMPT_IDS, alpha_row({"chat": 1.0}))
    old_digest = digest(served.engine.deployment)
    served.config["policies"]["chat"]["alpha"] = {"chat": 1.7, "code": 0.4}

    served.write()
    response = served.reload()

    assert response.status_code == 200, response.text
    body = response.json()
    new_digest = digest(read_deployment(served.path))
    assert body == {"object": "config.reload", "status": "reloaded", "digest": new_digest,
                    "previous_digest": old_digest, "added": [], "removed": [], "changed": {"chat": ["alpha"]},
                    "policies": list(POLICIES)}
    answered = served.complete("chat").json()
    assert answered["choices"][0]["text"] == answer(PROMPT_IDS, alpha_row({"chat": 1.7, "code": 0.4})) != before
    assert answered["steering"]["alpha"] == {"chat": 1.7, "code": 0.4}
    card = served.client.get("/v1/models/chat").json()
    assert card["alpha"] == {"chat": 1.7, "code": 0.4}
    assert card["experts"] == {"chat": {"tuned": "fake/chat-tuned", "untuned": "fake/chat-untuned"},
                               "code": {"tuned": "fake/code-tuned", "untuned": "fake/code-untuned"}}
    assert served.metric("steer_config_reloads_total", result="reloaded") == 1
    assert served.metric("steer_config_info", digest=new_digest) == 1
    assert served.metric("steer_config_info", digest=old_digest) == 0
    assert served.metric("steer_config_last_reload_successful") == 1


def test_a_reload_of_the_same_file_changes_nothing(served):
    response = served.reload()
    assert response.status_code == 200
    assert response.json()["status"] == "unchanged"
    assert response.json()["digest"] == response.json()["previous_digest"]
    assert served.metric("steer_config_reloads_total", result="unchanged") == 1


def test_policies_are_added_and_removed(served):
    started = served.client.get("/v1/models/chat").json()["created"]
    del served.config["policies"]["mix"]
    served.config["policies"]["chat-strong"] = {"description": "twice the chat pair", "alpha": {"chat": 2.0}}
    served.write()
    time.sleep(1.01)  # `created` is in whole seconds

    body = served.reload().json()

    assert (body["added"], body["removed"], body["changed"]) == (["chat-strong"], ["mix"], {})
    listed = {card["id"]: card for card in served.client.get("/v1/models").json()["data"]}
    assert set(listed) == set(POLICIES) - {"mix"} | {"chat-strong"}
    assert listed["chat"]["created"] == started < listed["chat-strong"]["created"]
    assert listed["chat-strong"]["description"] == "twice the chat pair"
    assert served.complete("chat-strong").json()["choices"][0]["text"] == answer(PROMPT_IDS, alpha_row({"chat": 2.0}))
    assert_error(served.complete("mix"), 404, type=INVALID, param="model", code="model_not_found",
                 says="the policy 'mix' does not exist")
    assert_error(served.client.get("/v1/models/mix"), 404, type=INVALID, param="model", code="model_not_found",
                 says="'mix'")


def test_a_request_admitted_before_a_reload_keeps_its_policy(served):
    """The swap happens between admissions: a plan holds the steering it resolved."""
    completions = served.client.app.state.server.completions
    plan = completions.plan(CompletionRequest(model="chat", prompt=PROMPT))
    served.config["policies"]["chat"]["alpha"] = {"chat": -1.0}
    served.write()
    assert served.reload().json()["changed"] == {"chat": ["alpha"]}

    pieces, _ = asyncio.run(completions.answer(plan))

    assert pieces[0].text == answer(PROMPT_IDS, alpha_row({"chat": 1.0}))
    assert served.complete("chat").json()["choices"][0]["text"] == answer(PROMPT_IDS, alpha_row({"chat": -1.0}))


def refused_keeps_serving(served: Served, response, status: int, param: str, code: str, says: str) -> None:
    assert_error(response, status, type=INVALID, param=param, code=code, says=says)
    assert served.complete("chat").json()["choices"][0]["text"] == answer(PROMPT_IDS, alpha_row({"chat": 1.0}))
    assert [card["id"] for card in served.client.get("/v1/models").json()["data"]] == list(POLICIES)
    assert served.metric("steer_config_reloads_total", result="refused") == 1
    assert served.metric("steer_config_last_reload_successful") == 0
    assert served.metric("steer_config_info", digest=digest(parse_deployment(CONFIG))) == 1


@pytest.mark.parametrize(("text", "param", "says"), [
    ("policies: [unclosed", "config", "is not valid YAML"),
    ("- a list", "config", "must be a mapping"),
])
def test_a_file_that_is_not_a_config_is_refused(served, text, param, says):
    served.write(text)
    refused_keeps_serving(served, served.reload(), 400, param, "invalid_config", says)


def test_a_file_that_is_not_utf8_is_refused_not_a_server_error(served):
    served.path.write_bytes(served.path.read_text().encode("utf-16"))  # e.g. saved by a Windows editor
    refused_keeps_serving(served, served.reload(), 400, "config", "invalid_config", "is not UTF-8 text")


@pytest.mark.parametrize(("edit", "param", "says"), [
    (lambda c: c["policies"]["chat"]["alpha"].update(nope=1.0), "policies.chat.alpha.nope", "unknown expert pair"),
    (lambda c: c["policies"]["chat"].update(max_alpha=-1), "policies.chat.max_alpha", "greater than or equal to 0"),
    (lambda c: c["policies"]["qa"]["abstain"].pop("threshold"), "policies.qa.abstain.threshold", "required"),
    (lambda c: c["policies"]["triage"]["decision"].update(labels=["yes", "yak"]), "policies.triage.decision.labels",
     "share their first token"),
    (lambda c: c["policies"].update(ghost={"calibration": "missing.json"}), "policies.ghost.calibration",
     "cannot read calibration file"),
    (lambda c: c.update(policies={}), "policies", "at least 1 item"),
])
def test_a_config_a_start_up_would_refuse_is_refused_by_name(served, edit, param, says):
    edit(served.config)
    served.write()
    refused_keeps_serving(served, served.reload(), 400, param, "invalid_config", says)


@pytest.mark.parametrize(("edit", "param"), [
    (lambda c: c["experts"]["chat"].update(tuned="fake/other"), "experts.chat.tuned"),
    (lambda c: c["experts"].pop("code"), "experts.code"),
    (lambda c: c.update(base="fake/other-base"), "base"),
    (lambda c: c.update(engine={"seed": 7}), "engine.seed"),
    (lambda c: c.update(tool_call_parser="hermes"), "tool_call_parser"),
])
def test_what_only_a_restart_changes_is_refused(served, edit, param):
    edit(served.config)
    if param == "experts.code":  # policies that name the pair would be refused first
        served.config["policies"]["mix"]["alpha"].pop("code")
    served.write()
    refused_keeps_serving(served, served.reload(), 409, param, "restart_required",
                          "takes effect only when the server restarts")


def test_a_fixed_file_reloads_after_a_refusal(served):
    served.write("{broken")
    assert served.reload().status_code == 400
    served.config["policies"]["chat"]["description"] = "edited"
    served.write()
    assert served.reload().json()["changed"] == {"chat": ["description"]}
    assert served.metric("steer_config_last_reload_successful") == 1
    assert served.client.get("/v1/models/chat").json()["description"] == "edited"


def test_watching_the_file_reloads_each_change_once(served, caplog):
    """`steer serve --watch-config`: what a replica does when its mounted ConfigMap changes."""
    reloader = served.client.app.state.server.reloader
    tick = 0.02

    def reloads(result: str) -> float:
        return served.metric("steer_config_reloads_total", result=result)

    async def until(condition, what: str) -> None:
        for _ in range(250):
            if condition():
                return
            await asyncio.sleep(tick)
        pytest.fail(f"the watcher did not {what}")

    async def scenario() -> None:
        watching = asyncio.create_task(reloader.watch(tick))
        try:
            await asyncio.sleep(10 * tick)  # an unchanged file is never reloaded
            assert reloads("reloaded") == reloads("unchanged") == reloads("refused") == 0

            served.config["policies"]["chat"]["alpha"] = {"chat": 1.7}
            served.write()
            await until(lambda: reloads("reloaded") == 1, "reload an edited alpha")
            text = (await asyncio.to_thread(served.complete, "chat")).json()["choices"][0]["text"]
            assert text == answer(PROMPT_IDS, alpha_row({"chat": 1.7}))

            served.write("{broken")  # refused once, and not again while it stays broken
            await until(lambda: reloads("refused") == 1, "refuse a broken file")
            served.config["engine"] = {"seed": 7}  # valid, but needs a restart: refused once too
            served.write()
            await until(lambda: reloads("refused") == 2, "refuse a change that needs a restart")
            await asyncio.sleep(10 * tick)
            assert reloads("refused") == 2 and reloads("reloaded") == 1
            assert served.metric("steer_config_last_reload_successful") == 0

            served.config.pop("engine")
            served.config["policies"]["chat"]["alpha"] = {"chat": 0.5}
            served.write()
            await until(lambda: reloads("reloaded") == 2, "reload the fixed file")
        finally:
            watching.cancel()

    with caplog.at_level("INFO", logger="steer.server"):
        asyncio.run(scenario())
    assert served.client.app.state.server.lifecycle.deployment.policies["chat"].alpha == {"chat": 0.5}
    assert served.metric("steer_config_last_reload_successful") == 1
    sources = [r.getMessage() for r in caplog.records if r.getMessage().startswith("config reload by")]
    assert len(sources) == 4 and all(f"config reload by a change to {served.path}" in m for m in sources)


def test_watch_config_takes_seconds_above_zero():
    assert build_parser().parse_args(["serve", "--watch-config", "2.5"]).watch_config == 2.5
    assert build_parser().parse_args(["serve"]).watch_config is None
    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--watch-config", bad])


def test_reloading_takes_the_api_key(served):
    assert_error(served.client.post("/v1/admin/reload", headers={"Authorization": "Bearer wrong"}), 401,
                 type="authentication_error", param=None, code="invalid_api_key", says="API key")


def test_a_server_handed_an_engine_without_a_file_has_nothing_to_reload(served):
    app = create_app(ServerSettings(api_key=API_KEY), engine=served.engine)
    response = TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"}).post("/v1/admin/reload")
    assert_error(response, 400, type=INVALID, param="config", code="invalid_config", says="no file to reload")


def test_changes_name_each_policys_changed_fields():
    old = parse_deployment(CONFIG)
    config = json.loads(json.dumps(CONFIG))
    config["policies"]["qa"]["abstain"]["threshold"] = 0.3
    config["policies"]["qa"]["description"] = "new"
    config["policies"]["triage"] = {**config["policies"]["triage"], "max_alpha": 1.0}
    changes = PolicyChanges.between(old, parse_deployment(config))
    assert changes.changed == {"qa": ("description", "abstain"), "triage": ("max_alpha",)}
    assert not changes.unchanged
    assert changes.describe() == (f"config {digest(old)} -> {changes.digest}; changed qa (description, abstain); "
                                  "changed triage (max_alpha)")


def test_the_digest_ignores_key_order_but_not_values():
    reordered = {"policies": dict(reversed(POLICIES.items())), "experts": EXPERTS, "base": "fake/base"}
    assert digest(parse_deployment(reordered)) == digest(parse_deployment(CONFIG))
    config = json.loads(json.dumps(CONFIG))
    config["policies"]["triage-calibrated"]["calibration"]["temperature"] = 2.5
    assert digest(parse_deployment(config)) != digest(parse_deployment(CONFIG))


def test_check_reloadable_names_the_first_field_only_a_restart_changes():
    config = json.loads(json.dumps(CONFIG))
    config["engine"] = {"max_model_len": 128}
    with pytest.raises(RestartRequired) as refused:
        check_reloadable(parse_deployment(CONFIG), parse_deployment(config))
    assert refused.value.field == "engine.max_model_len"
    assert "the running engine has none, the file now has 128" in str(refused.value)
    check_reloadable(parse_deployment(CONFIG), parse_deployment({**CONFIG, "policies": {"only": {}}}))


def test_a_plan_resolves_on_the_policies_of_its_admission():
    admission = Admission(FakeEngine(parse_deployment(CONFIG), max_model_len=MAX_MODEL_LEN))
    before = admission.policies["chat"].resolve(Overrides(alpha={"chat": 2.0}))
    config = json.loads(json.dumps(CONFIG))
    config["policies"]["chat"]["max_alpha"] = 1.0
    admission.reload(parse_deployment(config))
    assert before.alpha_row == (2.0, 0.0)
    with pytest.raises(Exception, match="beyond this policy's max_alpha 1.0"):
        admission.policies["chat"].resolve(Overrides(alpha={"chat": 2.0}))
