"""The playground in a real browser: Debian's headless Chromium, driven by Playwright, against the
session's live `steer serve` (API key `test-key`, the tiny Llama family). One browser for the
module, a fresh context (no storage, no cache) per test.

What the page shows is checked against what the server sent it: the streamed body as the browser
received it (Playwright's response API), or a direct API call with the same body, greedy.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, Response, sync_playwright

from tests.live_server import API_KEY, Server

CHROMIUM = Path("/usr/bin/chromium")
# As root, in a container: no sandbox; and nothing that would reach for the network on its own.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
LEVEL_EDGES = (0.1, 0.5, 1.5, 3)  # app.js: the shading level of |logprob - base_logprob|
MAX_TOKENS = "12"
SHOWN_TEXT = "answer => [...answer.childNodes].filter(node => !node.classList?.contains('unshown'))" \
    ".map(node => node.textContent).join('')"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: `make test` installs Debian's chromium (under CI a skip fails the run)")
    with sync_playwright() as playwright:
        # Playwright gives the browser a fresh, temporary --user-data-dir of its own.
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield browser
        browser.close()


class Playground:
    """A page open on the playground, and what it logged: console errors (CSP violations are),
    uncaught exceptions, and every request it sent."""

    def __init__(self, browser: Browser, server: Server):
        self.server = server
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.goto(f"{server.url}/playground")

    def enter_key(self, key: str = API_KEY) -> None:
        self.page.wait_for_selector("#key-form:not([hidden])")
        self.page.fill("#api-key", key)
        self.page.click("#key-form button")

    def open(self) -> Playground:
        """With the key given and the policies listed."""
        self.enter_key()
        self.page.wait_for_selector("#policy option", state="attached")
        return self

    def run(self, policy: str, *, max_tokens: str = MAX_TOKENS) -> Response:
        """Run `policy` beside the base; the steered request's response once both panes ended."""
        if self.page.input_value("#policy") != policy:  # choosing a policy sets its sliders anew
            self.page.select_option("#policy", policy)
        self.page.fill("#max-tokens", max_tokens)
        with self.page.expect_response(lambda response: self.posted(response, policy)) as steered:
            self.page.click("#run")
        for pane in ("#steered-pane", "#base-pane"):
            self.page.wait_for_selector(f"{pane}:not([data-state=running])", timeout=120_000)
        return steered.value

    @staticmethod
    def posted(response: Response, policy: str) -> bool:
        request = response.request
        return request.method == "POST" and json.loads(request.post_data or "{}").get("model") == policy

    def tokens(self) -> list[dict]:
        return self.page.eval_on_selector_all("#steered-pane .answer .token", "spans => spans.map(span => "
                                              "({text: span.textContent, ...span.dataset}))")


@pytest.fixture
def playground(browser, server) -> Iterator[Playground]:
    opened = Playground(browser, server)
    yield opened
    opened.context.close()


def streamed(response: Response) -> list[dict]:
    """The chunks of a server-sent event stream, as the browser received them."""
    events = [line.removeprefix("data: ") for line in response.body().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def screenshot(page: Page, name: str) -> None:
    """With $STEER_SCREENSHOTS set (to docs/, say), the page as the test left it: the README's pictures."""
    if os.environ.get("STEER_SCREENSHOTS"):
        page.screenshot(path=Path(os.environ["STEER_SCREENSHOTS"]) / f"{name}.png", full_page=True)


def content(chunks: list[dict]) -> str:
    return "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"])


def answer(server: Server, body: dict) -> httpx.Response:
    with server.http() as http:
        return http.post("/v1/chat/completions", json={**body, "stream": False})


def test_the_page_asks_for_the_key_then_lists_the_policies_and_logs_no_error(playground, server):
    page = playground.page
    page.wait_for_selector("#key-form:not([hidden])")
    assert not [url for url in playground.requests if "/v1/" in url], "nothing is asked of the API before the key"
    playground.open()
    with server.http() as http:
        policies = [card["id"] for card in http.get("/v1/models").json()["data"]]
    assert page.eval_on_selector_all("#policy option", "options => options.map(o => o.value)") == policies
    assert page.input_value("#policy") == "chat"  # the first policy whose alpha may be moved
    assert page.is_hidden("#key-form") and page.input_value("#api-key") == ""
    assert playground.errors == []
    assert all(url.startswith(f"{server.url}/") for url in playground.requests)
    # The key is kept in the page's memory only.
    assert page.evaluate("[localStorage.length, sessionStorage.length, document.cookie]") == [0, 0, ""]
    # What the page would log if it broke its Content-Security-Policy: this check sees it.
    with page.expect_console_message(lambda message: "Content Security Policy" in message.text):
        page.evaluate("document.body.setAttribute('style', 'color: red')")
    assert playground.errors


def test_a_wrong_key_is_asked_for_again(playground):
    playground.enter_key("wrong")
    playground.page.wait_for_selector("#key-form:not([hidden])")
    assert playground.page.locator("#policy option").count() == 0
    playground.open()
    assert playground.page.locator("#policy option").count() > 0


def test_a_run_streams_both_panes_and_shades_each_token_by_its_trace(playground, server):
    response = playground.open().run("chat")
    page = playground.page
    assert page.get_attribute("#steered-pane", "data-state") == "done"
    assert page.get_attribute("#base-pane", "data-state") == "done"
    body = json.loads(response.request.post_data)
    assert body["stream"] is True and body["steering"] == {"trace": True}
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = streamed(response)
    trace = [entry for chunk in chunks for choice in chunk["choices"] for entry in choice.get("trace") or ()]
    text = content(chunks)
    # The answer's text, and as badges the tokens it does not show (special tokens, the end).
    assert trace and page.eval_on_selector("#steered-pane .answer", SHOWN_TEXT) == text

    tokens = playground.tokens()
    assert len(tokens) == len(trace)
    for token, entry in zip(tokens, trace):
        shift = entry["logprob"] - entry["base_logprob"]
        assert int(token["tokenId"]) == entry["token_id"]
        assert (float(token["logprob"]), float(token["baseLogprob"])) == (entry["logprob"], entry["base_logprob"])
        assert float(token["shift"]) == pytest.approx(shift, abs=1e-12)
        assert int(token["level"]) == sum(abs(shift) >= edge for edge in LEVEL_EDGES)
        assert token["direction"] == ("up" if shift >= 0 else "down")
        assert json.loads(token["contributions"]) == pytest.approx(entry["contributions"])
        flip = entry["flip"]
        assert token.get("flipTokenId") == (None if flip is None else str(flip["token_id"]))
    # The cue is not colour alone: the underline's style says the direction, its thickness the level.
    styles = page.eval_on_selector_all("#steered-pane .answer .token", "spans => spans.map(span => { "
                                       "const s = getComputedStyle(span); return [s.textDecorationLine, "
                                       "s.textDecorationStyle, s.textDecorationThickness]; })")
    for token, (line, style, thickness) in zip(tokens, styles):
        assert line == ("none" if token["level"] == "0" else "underline")
        if token["level"] != "0":
            assert (style, thickness) == ("solid" if token["direction"] == "up" else "dotted", f"{token['level']}px")

    # Hovering a token shows its probabilities, steered and base alone, and the base's own choice.
    first = trace[0]
    page.hover("#steered-pane .answer .token >> nth=0")
    facts = page.inner_text("#token-facts")
    assert f"p {math.exp(first['logprob']):.3f}" in facts and f"p {math.exp(first['base_logprob']):.3f}" in facts
    flipped = next((k for k, entry in enumerate(trace) if entry["flip"]), None)
    if flipped is not None:  # focus (keyboard, or a tap) shows it too
        page.focus(f"#steered-pane .answer .token >> nth={flipped}")
        assert f"(id {trace[flipped]['flip']['token_id']})" in page.inner_text("#token-facts")
    screenshot(page, "playground")

    # Greedy: each pane says what the API answers to the same body.
    assert text == answer(server, body).json()["choices"][0]["message"]["content"]
    base = answer(server, {**{key: value for key, value in body.items() if key != "steering"}, "model": "base"})
    assert page.inner_text("#base-pane .answer") == base.json()["choices"][0]["message"]["content"]
    assert playground.errors == []


def test_a_slider_moved_by_keyboard_changes_the_alpha_sent(playground):
    page = playground.open().page
    page.select_option("#policy", "chat")
    assert page.get_attribute("#alpha-chat", "max") == "4" and page.get_attribute("#alpha-chat", "min") == "-4"
    page.focus("#alpha-chat")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert page.inner_text("output[for=alpha-chat]") == "1.2"
    assert '"alpha": {"chat": 1.2}' in page.text_content("#export-sdk")
    response = playground.run("chat")
    assert json.loads(response.request.post_data)["steering"] == {"alpha": {"chat": 1.2}, "trace": True}
    assert streamed(response)[-1]["steering"]["alpha"] == {"chat": 1.2}
    assert "Alpha applied: chat = 1.2" in page.inner_text("#steered-pane .rule-report")


def test_the_exported_code_sends_the_same_request(playground, monkeypatch):
    page = playground.open().page
    shown = content(streamed(playground.run("chat")))
    curl = page.text_content("#export-curl")
    assert curl.startswith(f"curl -sN {playground.server.url}/v1/chat/completions")
    assert 'Authorization: Bearer $STEER_API_KEY' in curl
    monkeypatch.setenv("STEER_API_KEY", API_KEY)
    for code in (page.text_content("#export-openai"), page.text_content("#export-sdk")):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "exported", "exec"), {})
        assert printed.getvalue().startswith(shown)


def test_a_refused_request_shows_the_server_s_message(playground, server):
    response = playground.open().run("chat", max_tokens="100000")
    assert response.status == 400
    error = answer(server, json.loads(response.request.post_data)).json()["error"]
    shown = playground.page.inner_text("#steered-pane .pane-error")
    assert error["message"] in shown and f"(param: {error['param']})" in shown
    assert playground.page.get_attribute("#steered-pane", "data-state") == "error"


def test_the_rules_are_shown_as_the_steering_block_says(playground):
    page = playground.open().page
    steering = streamed(playground.run("qa"))[-1]["steering"]
    report = page.inner_text("#steered-pane .rule-report")
    abstention = steering["abstention"]
    assert f"Confidence {abstention['confidence']:.3f}" in report and f"threshold {abstention['threshold']:.3f}" in report
    assert ("abstained" if steering["abstained"] else "answered") in report

    chunks = streamed(playground.run("triage"))
    decision = chunks[-1]["steering"]["decision"]
    rows = page.eval_on_selector_all("#steered-pane .rule-report tbody tr", "rows => rows.map(row => "
                                     "[row.cells[0].textContent, row.querySelector('meter').value, "
                                     "row.cells[3].textContent])")
    assert [action for action, _, _ in rows] == list(decision["expected_costs"])
    assert [cost for _, cost, _ in rows] == pytest.approx(list(decision["expected_costs"].values()))
    assert [action for action, _, chosen in rows if chosen] == [decision["action"]]
    assert page.inner_text("#steered-pane .answer") == content(chunks)
    screenshot(page, "playground-decision")

    # A claim check asks for the claim, and sends it.
    page.select_option("#policy", "check")
    page.fill("#claim", " the model")
    response = playground.run("check")
    assert json.loads(response.request.post_data)["steering"] == {"claim": " the model"}
    assert streamed(response)[-1]["steering"]["decision"]["claim"] == " the model"
