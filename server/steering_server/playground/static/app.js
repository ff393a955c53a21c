// The steering playground: a policy's answer beside the base's, both streamed from this server's
// /v1 API, the steered one shaded token by token from its trace. Nothing is fetched from another
// host; the API key lives in this page's memory only (no storage, no cookie).

const page = {
  apiKey: null,
  keyed: false,
  policies: [], // the cards of GET /v1/models
  controller: null, // aborts the runs in flight
  retry: null, // what to do again once a key is given
};

// Shading levels 1..4 start at these |logprob - base_logprob| (nats); below the first, level 0.
const LEVEL_EDGES = [0.1, 0.5, 1.5, 3];

class KeyNeeded extends Error {}

const $ = (selector, root = document) => root.querySelector(selector);

function element(tag, properties = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, properties);
  node.append(...children);
  return node;
}

const number = (value, digits = 3) => (value === null || value === undefined ? "–" : Number(value).toFixed(digits));
const percent = (value) => `${(100 * value).toFixed(1)}%`;
const signed = (value) => `${value >= 0 ? "+" : "−"}${Math.abs(value).toFixed(3)}`;
const alphaText = (alpha) => Object.entries(alpha).map(([pair, value]) => `${pair} = ${value}`).join(", ");

// The API

async function api(method, path, body, signal) {
  const headers = { "content-type": "application/json" };
  if (page.apiKey !== null) headers.authorization = `Bearer ${page.apiKey}`;
  const response = await fetch(path, { method, headers, signal, body: body && JSON.stringify(body) });
  if (response.status === 401) {
    page.keyed = true;
    throw new KeyNeeded();
  }
  return response;
}

// The server's own words for a refusal: error.message, and the field it names.
async function refusal(response) {
  try {
    const { error } = await response.json();
    return error.param ? `${error.message} (param: ${error.param})` : error.message;
  } catch {
    return `HTTP ${response.status} ${response.statusText}`;
  }
}

// The JSON of each `data:` line of a server-sent event stream, up to `[DONE]`.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffered += value;
    const lines = buffered.split("\n");
    buffered = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data: ")) continue;
      const data = line.slice("data: ".length);
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// The key

function askForKey(retry) {
  page.retry = retry;
  $("#key-form").hidden = false;
  $("#api-key").focus();
}

function useKey(event) {
  event.preventDefault();
  page.apiKey = $("#api-key").value;
  $("#api-key").value = "";
  $("#key-form").hidden = true;
  const retry = page.retry;
  page.retry = null;
  retry?.().catch(showFailure);
}

function showPageError(message) {
  $("#page-error").textContent = message;
  $("#page-error").hidden = !message;
}

// Policies

async function start() {
  const facts = await (await fetch("/playground/server.json")).json();
  page.keyed = facts.keyed;
  if (page.keyed && page.apiKey === null) {
    askForKey(start);
    return;
  }
  await loadPolicies();
}

async function loadPolicies() {
  let response;
  try {
    response = await api("GET", "/v1/models");
  } catch (error) {
    if (error instanceof KeyNeeded) return askForKey(loadPolicies);
    throw error;
  }
  if (!response.ok) return showPageError(await refusal(response));
  showPageError("");
  page.policies = (await response.json()).data;
  const select = $("#policy");
  select.replaceChildren(...page.policies.map((card) => element("option", { value: card.id, text: card.id })));
  const steered = page.policies.find((card) => card.max_alpha !== null && Object.keys(card.alpha).length);
  select.value = (steered || page.policies[0]).id;
  showPolicy();
}

const selected = () => page.policies.find((card) => card.id === $("#policy").value);

// The unsteered policy the steered answer is set beside: `base`, else any plain one without alpha.
function basePolicy() {
  const unsteered = page.policies.filter(
    (card) => card.kind === "plain" && Object.values(card.alpha).every((alpha) => alpha === 0));
  return unsteered.find((card) => card.id === "base") || unsteered[0] || null;
}

function certifiedText(certified) {
  return `Certified: ${certified.risk} at most ${percent(certified.epsilon)}, with probability at least ` +
    `${percent(1 - certified.delta)}, on ${certified.n} calibration rows (threshold ${number(certified.threshold)}).`;
}

function policyFacts(card) {
  const facts = [];
  if (card.description) facts.push(card.description);
  facts.push(Object.keys(card.alpha).length ? `Alpha: ${alphaText(card.alpha)}` : "No expert pair: the base alone.");
  if (card.abstention) {
    const { score, threshold, message } = card.abstention;
    facts.push(`Abstains below calibrated confidence ${number(threshold)} (score ${score}): “${message}”`);
  }
  if (card.decision) {
    facts.push(`Decides among ${card.decision.actions.join(", ")}, at the least expected cost.`);
  }
  if (card.certified) facts.push(certifiedText(card.certified));
  return facts.map((fact) => element("p", { textContent: fact }));
}

function alphaSliders(card) {
  const pairs = Object.keys(card.experts);
  if (!pairs.length) return [element("p", { textContent: "This policy steers with no expert pair." })];
  if (card.max_alpha === null) {
    return [element("p", { textContent: `${alphaText(card.alpha)}: this policy takes no alpha overrides.` })];
  }
  return pairs.map((pair) => {
    const id = `alpha-${pair}`;
    const slider = element("input", {
      type: "range", id, min: -card.max_alpha, max: card.max_alpha, step: 0.1, value: card.alpha[pair],
    });
    slider.dataset.pair = pair;
    const shown = element("output", { htmlFor: id, textContent: slider.value });
    slider.addEventListener("input", () => {
      slider.dataset.moved = "true";
      shown.textContent = slider.value;
    });
    return element("div", { className: "slider" },
      element("label", { htmlFor: id, textContent: `${pair} (|alpha| ≤ ${card.max_alpha})` }), slider, shown);
  });
}

function showPolicy() {
  const card = selected();
  $("#policy-facts").replaceChildren(...policyFacts(card));
  $("#alpha-sliders").replaceChildren(...alphaSliders(card));
  $("#claim-field").hidden = !card.decision?.claim;
  showExport();
}

// The request

function addMessage(role = "user", content = "") {
  const item = $("#message-template").content.firstElementChild.cloneNode(true);
  $(".message-role", item).value = role;
  $(".message-content", item).value = content;
  $(".remove-message", item).addEventListener("click", () => {
    item.remove();
    labelMessages();
    showExport();
  });
  $("#messages").append(item);
  labelMessages();
}

function labelMessages() {
  document.querySelectorAll("#messages .message").forEach((item, i) => {
    $(".remove-message", item).setAttribute("aria-label", `Remove message ${i + 1}`);
  });
}

function messages() {
  return [...document.querySelectorAll("#messages .message")].map((item) => ({
    role: $(".message-role", item).value,
    content: $(".message-content", item).value,
  }));
}

function requestBody(model) {
  return {
    model, messages: messages(), max_tokens: Number($("#max-tokens").value),
    temperature: Number($("#temperature").value), stream: true,
  };
}

// The chosen policy's request: the alphas moved, a claim where the policy checks one, and the trace
// (decision policies answer with a label: they have none).
function steeredBody() {
  const card = selected();
  const steering = {};
  const moved = [...document.querySelectorAll("#alpha-sliders input[data-moved]")];
  if (moved.length) steering.alpha = Object.fromEntries(moved.map((s) => [s.dataset.pair, Number(s.value)]));
  if (card.decision?.claim) steering.claim = $("#claim").value;
  if (card.kind !== "decision") steering.trace = true;
  const body = requestBody(card.id);
  if (Object.keys(steering).length) body.steering = steering;
  return body;
}

// A run: both panes at once

function resetPane(pane, policy) {
  $(".pane-policy", pane).textContent = policy ? policy.id : "none";
  $(".answer", pane).replaceChildren();
  $(".pane-error", pane).hidden = true;
  const report = $(".rule-report", pane);
  if (report) report.replaceChildren();
  pane.dataset.state = "running";
  pane.setAttribute("aria-busy", "true");
}

function endPane(pane, state, message = "") {
  pane.dataset.state = state;
  pane.removeAttribute("aria-busy");
  $(".pane-error", pane).textContent = message;
  $(".pane-error", pane).hidden = !message;
}

async function run(event) {
  event?.preventDefault();
  if (!$("#request-form").reportValidity()) return;
  page.controller?.abort();
  const controller = new AbortController();
  page.controller = controller;
  $("#stop").disabled = false;
  showExport();
  const base = basePolicy();
  resetPane($("#steered-pane"), selected());
  resetPane($("#base-pane"), base);
  const panes = [stream($("#steered-pane"), steeredBody(), controller.signal)];
  if (base) panes.push(stream($("#base-pane"), requestBody(base.id), controller.signal));
  else endPane($("#base-pane"), "error", "This deployment serves no unsteered policy to compare with.");
  const ended = await Promise.allSettled(panes);
  if (page.controller === controller) $("#stop").disabled = true;
  if (ended.some((result) => result.reason instanceof KeyNeeded)) {
    controller.abort();
    askForKey(run);
  }
}

async function stream(pane, body, signal) {
  try {
    const response = await api("POST", "/v1/chat/completions", body, signal);
    if (!response.ok) return endPane(pane, "error", await refusal(response));
    for await (const chunk of events(response)) {
      if (chunk.error) return endPane(pane, "error", chunk.error.param
        ? `${chunk.error.message} (param: ${chunk.error.param})` : chunk.error.message);
      for (const choice of chunk.choices) appendDelta($(".answer", pane), choice.delta.content || "", choice.trace);
      if (chunk.steering) showReport(pane, chunk.steering);
    }
    endPane(pane, "done");
  } catch (error) {
    if (error instanceof KeyNeeded) {
      endPane(pane, "error", "The server asks for an API key.");
      throw error;
    }
    endPane(pane, signal.aborted ? "stopped" : "error", signal.aborted ? "" : String(error));
  }
}

function stop() {
  page.controller?.abort();
  $("#stop").disabled = true;
}

// Tokens

function level(shift) {
  return LEVEL_EDGES.filter((edge) => Math.abs(shift) >= edge).length;
}

// One token of the steered answer, carrying its trace entry; `text` null: a token the answer's
// text does not show (an end-of-sequence token), shown as itself.
function tokenSpan(entry, text) {
  const shift = entry.logprob - entry.base_logprob;
  const span = element("span", { className: text === null ? "token unshown" : "token", tabIndex: 0 });
  span.textContent = text === null ? entry.token : text;
  Object.assign(span.dataset, {
    tokenId: entry.token_id, logprob: entry.logprob, baseLogprob: entry.base_logprob, shift,
    level: level(shift), direction: shift >= 0 ? "up" : "down", contributions: JSON.stringify(entry.contributions),
  });
  if (entry.flip) {
    Object.assign(span.dataset, {
      flipToken: entry.flip.token, flipTokenId: entry.flip.token_id, flipBaseLogprob: entry.flip.base_logprob,
    });
  }
  return span;
}

// A delta's text, a span per traced token where the trace's tokens spell it out.
function appendDelta(answer, text, trace) {
  if (!trace || !trace.length) {
    if (text) answer.append(text);
    return;
  }
  let at = 0;
  for (const entry of trace) {
    const shown = entry.token !== "" && text.startsWith(entry.token, at);
    answer.append(tokenSpan(entry, shown ? entry.token : null));
    if (shown) at += entry.token.length;
  }
  if (at < text.length) answer.append(text.slice(at));
}

function showToken(span) {
  const d = span.dataset;
  const pairs = Object.entries(JSON.parse(d.contributions));
  const rows = [
    ["token", `${JSON.stringify(span.textContent)} (id ${d.tokenId})`],
    ["steered", `p ${number(Math.exp(d.logprob))} (logprob ${number(d.logprob)})`],
    ["base alone", `p ${number(Math.exp(d.baseLogprob))} (logprob ${number(d.baseLogprob)})`],
    ["moved by steering", `${signed(Number(d.shift))} nats`],
    ["per pair", pairs.length ? pairs.map(([pair, value]) => `${pair} ${signed(value)}`).join(", ") : "none"],
    ["base alone's choice", d.flipToken === undefined ? "this token too"
      : `${JSON.stringify(d.flipToken)} (id ${d.flipTokenId}), p ${number(Math.exp(d.flipBaseLogprob))}`],
  ];
  $("#token-facts").replaceChildren(element("dl", {},
    ...rows.flatMap(([term, value]) => [element("dt", { textContent: term }), element("dd", { textContent: value })])));
}

function onToken(event) {
  const span = event.target.closest(".token");
  if (span) showToken(span);
}

// What the policy's rule made of the answer

function meter(value, max, label) {
  return element("meter", { min: 0, max, value, title: label, ariaLabel: label });
}

function abstentionReport(steering) {
  const { score, raw, confidence, threshold } = steering.abstention;
  const verdict = steering.abstained ? "is below the threshold: abstained" : "reaches the threshold: answered";
  return [
    element("h3", { textContent: "Abstention" }),
    element("p", {
      textContent: `Confidence ${number(confidence)} (score ${score}, raw ${number(raw)}) ${verdict} ` +
        `(threshold ${number(threshold)}).`,
    }),
    element("div", { className: "bar" }, element("span", { textContent: "confidence" }),
      meter(confidence, 1, "confidence"), element("span", { textContent: number(confidence) })),
    element("div", { className: "bar" }, element("span", { textContent: "threshold" }),
      meter(threshold, 1, "threshold"), element("span", { textContent: number(threshold) })),
  ];
}

function decisionReport(decision) {
  const costs = Object.entries(decision.expected_costs);
  const most = Math.max(...costs.map(([, cost]) => cost), 1e-9);
  const rows = costs.map(([action, cost]) => element("tr", { className: action === decision.action ? "chosen" : "" },
    element("th", { scope: "row", textContent: action }),
    element("td", {}, meter(cost, most, `expected cost of ${action}`)),
    element("td", { textContent: number(cost) }),
    element("td", { textContent: action === decision.action ? "← chosen" : "" })));
  const probabilities = Object.entries(decision.calibrated).map(([label, p]) => `${label} ${number(p)}`).join(", ");
  return [
    element("h3", { textContent: "Decision" }),
    element("p", { textContent: `Calibrated probabilities: ${probabilities}.` }),
    element("table", {},
      element("caption", { textContent: "Expected cost per action" }),
      element("thead", {}, element("tr", {}, ...["action", "expected cost", "", ""].map(
        (head) => element("th", { scope: "col", textContent: head })))),
      element("tbody", {}, ...rows)),
  ];
}

function showReport(pane, steering) {
  const report = $(".rule-report", pane);
  if (!report) return;
  const parts = [element("p", { textContent: `Alpha applied: ${alphaText(steering.alpha) || "none"}` })];
  if (steering.abstention) parts.push(...abstentionReport(steering));
  if (steering.decision) parts.push(...decisionReport(steering.decision));
  if (steering.certified) {
    parts.push(element("p", { className: "certified", textContent: certifiedText(steering.certified) }));
  }
  report.replaceChildren(...parts);
}

// Export: the steered request as code

function python(value) {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return `[${value.map(python).join(", ")}]`;
  if (typeof value === "object") {
    return `{${Object.entries(value).map(([key, item]) => `${JSON.stringify(key)}: ${python(item)}`).join(", ")}}`;
  }
  return JSON.stringify(value); // numbers, and strings: JSON's escapes are Python's
}

const keywords = (fields, indent) =>
  Object.entries(fields).map(([name, value]) => `${indent}${name}=${python(value)},`);

function curlCode(body, url) {
  const auth = page.keyed ? ["  -H \"Authorization: Bearer $STEER_API_KEY\" \\"] : [];
  const json = JSON.stringify(body, null, 2).replaceAll("'", "'\\''");
  return [`curl -sN ${url}/chat/completions \\`, "  -H 'content-type: application/json' \\", ...auth,
    `  -d '${json}'`].join("\n");
}

function openaiCode(body, url) {
  const { steering, ...fields } = body;
  const extra = steering ? { extra_body: { steering } } : {};
  return [
    "import os", "", "from openai import OpenAI", "",
    `client = OpenAI(base_url=${python(url)}, api_key=os.environ.get("STEER_API_KEY", "unused"))`,
    "stream = client.chat.completions.create(", ...keywords({ ...fields, ...extra }, "    "), ")",
    "for chunk in stream:",
    "    print(\"\".join(choice.delta.content or \"\" for choice in chunk.choices), end=\"\")",
    "print()",
  ].join("\n");
}

function sdkCode(body, url) {
  const { model, messages: conversation, steering, stream, ...fields } = body;
  const given = { model, messages: conversation, ...(steering ? { steering } : {}), ...fields, stream };
  return [
    "from steering_client import SteeringClient", "",
    `client = SteeringClient(base_url=${python(url)})  # the API key from $STEER_API_KEY`,
    "with client.chat.completions.create(", ...keywords(given, "    "), ") as stream:",
    "    for chunk in stream:",
    "        print(\"\".join(choice.delta.content or \"\" for choice in chunk.choices), end=\"\")",
    "print()",
    "print(stream.steering)",
  ].join("\n");
}

function showExport() {
  if (!selected()) return;
  const body = steeredBody();
  const url = `${location.origin}/v1`;
  $("#export-curl").textContent = curlCode(body, url);
  $("#export-openai").textContent = openaiCode(body, url);
  $("#export-sdk").textContent = sdkCode(body, url);
}

// Wiring

function showFailure(error) {
  showPageError(`The playground failed: ${error}`);
}

$("#key-form").addEventListener("submit", useKey);
$("#request-form").addEventListener("submit", (event) => run(event).catch(showFailure));
$("#request-form").addEventListener("input", showExport);
$("#request-form").addEventListener("change", showExport);
$("#policy").addEventListener("change", showPolicy);
$("#add-message").addEventListener("click", () => {
  addMessage();
  showExport();
});
$("#stop").addEventListener("click", stop);
for (const kind of ["mouseover", "focusin"]) $("#steered-pane .answer").addEventListener(kind, onToken);
addMessage("user", "the model answers");
start().catch(showFailure);
