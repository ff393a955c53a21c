"""Prometheus metrics, labelled by policy, in a registry of the app's own."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

if TYPE_CHECKING:
    from steering.feedback import Judged
    from steering.kinds import Plan
    from steering_server.protocol import ErrorBody

UNKNOWN_POLICY = "<unknown>"
FEEDBACK_BINS = 10
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class FeedbackMetrics:
    """Outcomes fed back (POST /v1/feedback), so reliability can be charted across replicas: per
    bin of calibrated confidence, the outcomes, the right ones and the confidence summed give ECE
    in PromQL; the Brier sum, its score; and the two ways a rule fails."""

    def __init__(self, registry: CollectorRegistry):
        bins = ["policy", "bin"]
        self.outcomes = Counter("steer_feedback", "Outcomes fed back, by policy and calibrated-confidence bin "
                                "(its lower edge).", bins, registry=registry)
        self.correct = Counter("steer_feedback_correct", "Outcomes fed back that were right.", bins,
                               registry=registry)
        self.confidence = Counter("steer_feedback_confidence", "Calibrated confidence of the outcomes fed "
                                  "back, summed.", bins, registry=registry)
        self.brier = Counter("steer_feedback_brier", "(confidence - right)^2 of the outcomes fed back, "
                             "summed.", ["policy"], registry=registry)
        self.over_answering = Counter("steer_feedback_over_answering", "Outcomes fed back of answers given, and "
                                      "wrong.", ["policy"], registry=registry)
        self.over_abstaining = Counter("steer_feedback_over_abstaining", "Outcomes fed back of answers withheld "
                                       "(or the abstain action), though right.", ["policy"], registry=registry)

    def record(self, label: str, judged: Judged) -> None:
        bin_ = f"{min(int(judged.confidence * FEEDBACK_BINS), FEEDBACK_BINS - 1) / FEEDBACK_BINS:.1f}"
        self.outcomes.labels(label, bin_).inc()
        self.correct.labels(label, bin_).inc(judged.correct)
        self.confidence.labels(label, bin_).inc(judged.confidence)
        self.brier.labels(label).inc((judged.confidence - judged.correct) ** 2)
        self.over_answering.labels(label).inc(judged.over_answered)
        self.over_abstaining.labels(label).inc(judged.over_abstained)


class ServerMetrics:
    """Requests, tokens, latencies and errors per policy; the engine's unfinished requests."""

    def __init__(self, policies: set[str]):
        self.policies = policies
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "steer_requests", "Requests answered, by policy, endpoint and HTTP status.",
            ["policy", "endpoint", "status"], registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "steer_prompt_tokens", "Prompt tokens processed.", ["policy"], registry=self.registry
        )
        self.generation_tokens = Counter(
            "steer_generation_tokens", "Tokens generated.", ["policy"], registry=self.registry
        )
        self.latency = Histogram(
            "steer_request_latency_seconds", "Time from request to last token.", ["policy", "endpoint"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.first_token = Histogram(
            "steer_time_to_first_token_seconds", "Time from request to first streamed token.", ["policy"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.errors = Counter(
            "steer_errors", "Requests refused or failed, by policy and error type.", ["policy", "type"],
            registry=self.registry,
        )
        self.aborted = Counter(
            "steer_aborted_requests", "Requests whose client went away before the end.", ["policy"],
            registry=self.registry,
        )
        self.abstentions = Counter(
            "steer_abstentions", "Answers replaced by the policy's abstention message.", ["policy"],
            registry=self.registry,
        )
        self.decisions = Counter(
            "steer_decisions", "Decisions made, by policy and chosen action.", ["policy", "action"],
            registry=self.registry,
        )
        # Reloads, named as Prometheus names its own (`prometheus_config_last_reload_successful`, …).
        self.reloads = Counter(
            "steer_config_reloads", "Config reloads, by result: reloaded, unchanged or refused.", ["result"],
            registry=self.registry,
        )
        self.reload_successful = Gauge(
            "steer_config_last_reload_successful", "1 if the last reload succeeded (or none was tried), else 0.",
            registry=self.registry,
        )
        self.reload_success_time = Gauge(
            "steer_config_last_reload_success_timestamp_seconds", "When the active config was loaded (Unix time).",
            registry=self.registry,
        )
        self.config = Info("steer_config", "The active deployment config's digest.", registry=self.registry)
        self.unfinished = Gauge(
            "steer_engine_unfinished_requests", "Requests inside the engine, running or waiting.",
            registry=self.registry,
        )
        self.feedback = FeedbackMetrics(self.registry)

    def loaded(self, digest: str, policies: set[str]) -> None:
        """A config is active from now on (at start-up, or after a reload)."""
        self.policies = policies
        self.config.info({"digest": digest})
        self.reload_successful.set(1)
        self.reload_success_time.set_to_current_time()

    def policy_label(self, name: object) -> str:
        """A request's policy as a label; unknown names (and a `model` that is no string) collapse to one."""
        return name if isinstance(name, str) and name in self.policies else UNKNOWN_POLICY

    def answered(self, plan: Plan, endpoint: str) -> None:
        """A request answered whole (200): what its policy decided, and how long it took."""
        name, outcome = plan.name, plan.outcome
        self.requests.labels(name, endpoint, "200").inc()
        self.latency.labels(name, endpoint).observe(time.perf_counter() - plan.started)
        if outcome.decision is not None:
            self.decisions.labels(name, outcome.decision.action).inc()
        elif outcome.abstained:
            self.abstentions.labels(name).inc()

    def refused(self, policy: object, endpoint: str, status: int, error: ErrorBody) -> None:
        """A request refused, or failed midway (its status, and the error's code)."""
        label = self.policy_label(policy)
        self.errors.labels(label, error.code or error.type).inc()
        self.requests.labels(label, endpoint, str(status)).inc()

    def computed(self, plan: Plan) -> None:
        """The tokens an admitted request read and generated: answered, failed or abandoned."""
        self.prompt_tokens.labels(plan.name).inc(plan.prompt_tokens)
        self.generation_tokens.labels(plan.name).inc(plan.outcome.completion_tokens)

    def fed_back(self, policy: str, judged: Judged) -> None:
        """An outcome against its response: its bin's counts, the Brier sum, and either error."""
        self.feedback.record(self.policy_label(policy), judged)

    def watch_engine(self, num_unfinished: Callable[[], int]) -> None:
        self.unfinished.set_function(num_unfinished)

    def render(self) -> bytes:
        return generate_latest(self.registry)
