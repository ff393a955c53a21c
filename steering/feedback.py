"""Outcomes of decisions and abstentions, fed back to keep their calibration honest.

Every decision or abstention response carries a feedback id: a stateless token that any replica
holding the same secret can verify. It binds what the response was made of, so an outcome can be
scored and refitted on without shared state: the policy, the config digest, the time, the raw
score (with a fitted score's features) or the label logprobs, and what was decided. It is signed
(HMAC-SHA256), not encrypted: it holds nothing the response did not show.

Outcomes go to an embedded SQLite store (WAL; each outcome one transaction, written before it is
acknowledged; one outcome per id), which `steer calibrate --from-feedback` reads back, merging
the stores of several replicas.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from steering.errors import InvalidRequest, RequestError
from steering.kinds.run import Outcome
from steering.rules.abstention import FITTED_SCORES, familiarity_profile

CORRECT, INCORRECT = "correct", "incorrect"


class InvalidFeedback(InvalidRequest):
    """A feedback id that is forged, expired or malformed, or an outcome it cannot take."""


class FeedbackConflict(RequestError):
    """The response already has an outcome, and a different one was sent."""


def payload(outcome: Outcome, digest: str, *, now: float | None = None) -> dict | None:
    """What a response's feedback id binds; None for a response nothing was decided on (a plain policy)."""
    common = {"policy": outcome.policy, "digest": digest, "time": round(now if now is not None else time.time(), 3)}
    if outcome.decision is not None:
        decision = outcome.decision
        return common | {"kind": "decision", "labels": list(decision.labels),
                         "label_logprobs": outcome.evidence.label_logprobs,
                         "calibrated": list(decision.calibrated), "action": decision.action}
    if outcome.abstention is not None:
        judged = outcome.abstention
        features = None
        if judged.score in FITTED_SCORES and outcome.evidence.first_step is not None:
            features = familiarity_profile(outcome.evidence.first_step.prompt).tolist()
        return common | {"kind": "abstention", "score": judged.score, "raw": judged.raw,
                         "confidence": judged.confidence, "abstained": judged.abstained, "features": features}
    return None


@dataclass(frozen=True)
class Judged:
    """An outcome against what was decided: the reliability of the confidence, and the two errors."""

    confidence: float  # the calibrated probability the response was right (of its top label)
    correct: bool  # the answer given (or withheld; for a decision, its top label) was right
    answered: bool  # not withheld, not the abstain action

    @property
    def over_answered(self) -> bool:
        return self.answered and not self.correct

    @property
    def over_abstained(self) -> bool:
        return not self.answered and self.correct


def judge(bound: dict, outcome: str) -> Judged:
    """An outcome as sent against the response it is for. An abstention takes `correct` or
    `incorrect` (was the answer, given or withheld, right); a decision takes its true label."""
    if bound["kind"] == "abstention":
        if outcome not in (CORRECT, INCORRECT):
            raise InvalidFeedback(f"an abstention's outcome is {CORRECT!r} or {INCORRECT!r}, not {outcome!r}",
                                  param="outcome")
        return Judged(bound["confidence"], outcome == CORRECT, not bound["abstained"])
    labels, calibrated = bound["labels"], bound["calibrated"]
    if outcome not in labels:
        raise InvalidFeedback(f"a decision's outcome is its true label, one of {labels}; not {outcome!r}",
                              param="outcome")
    top = max(range(len(labels)), key=calibrated.__getitem__)
    return Judged(calibrated[top], labels[top] == outcome, bound["action"] in labels)


class FeedbackTokens:
    """Issues and verifies feedback ids under one secret (every replica of a deployment shares it)."""

    def __init__(self, secret: str, *, ttl_seconds: float):
        self._key = secret.encode()
        self.ttl_seconds = ttl_seconds

    def issue(self, bound: dict) -> str:
        body = _b64(json.dumps(bound, separators=(",", ":"), sort_keys=True).encode())
        return f"{body}.{_b64(self._sign(body))}"

    def verify(self, token: str, *, now: float | None = None) -> dict:
        """What the id binds, or `InvalidFeedback` for an id this secret did not sign, or too old."""
        body, dot, signature = token.partition(".")
        try:
            given = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
        except ValueError:
            given = b""
        if not dot or not hmac.compare_digest(given, self._sign(body)):
            raise InvalidFeedback("not a feedback id this deployment issued: malformed, or its signature does not "
                                  "match", param="id")
        bound = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        age = (now if now is not None else time.time()) - bound["time"]
        if age > self.ttl_seconds:
            raise InvalidFeedback(f"this feedback id expired: it is {age / 86400:.1f} days old, and ids take "
                                  f"outcomes for {self.ttl_seconds / 86400:g} days", param="id")
        return bound

    def _sign(self, body: str) -> bytes:
        return hmac.new(self._key, body.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Recorded:
    """One outcome as a store keeps it."""

    key: str  # of its feedback id: one outcome per id
    policy: str
    digest: str
    bound: dict
    outcome: str
    recorded: float


class FeedbackStore:
    """Outcomes in an SQLite file: one row per feedback id, written in one transaction each."""

    SCHEMA = """CREATE TABLE IF NOT EXISTS outcomes (
        id TEXT PRIMARY KEY, policy TEXT NOT NULL, digest TEXT NOT NULL, bound TEXT NOT NULL,
        outcome TEXT NOT NULL, recorded REAL NOT NULL)"""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged outcome survives a crash of the host too
        self._db.execute(self.SCHEMA)
        self._lock = threading.Lock()

    def record(self, token: str, bound: dict, outcome: str) -> bool:
        """Keep the outcome; False if the same outcome was kept before (idempotent), and
        `FeedbackConflict` if another was."""
        key = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            try:
                self._db.execute("INSERT INTO outcomes VALUES (?, ?, ?, ?, ?, ?)",
                                 (key, bound["policy"], bound["digest"], json.dumps(bound), outcome, time.time()))
                return True
            except sqlite3.IntegrityError:
                (kept,) = self._db.execute("SELECT outcome FROM outcomes WHERE id = ?", (key,)).fetchone()
        if kept != outcome:
            raise FeedbackConflict(f"this response already has the outcome {kept!r}; each takes one",
                                   param="outcome")
        return False

    def outcomes(self, policy: str | None = None) -> Iterator[Recorded]:
        query = "SELECT id, policy, digest, bound, outcome, recorded FROM outcomes"
        rows = self._db.execute(query + (" WHERE policy = ?" if policy else "") + " ORDER BY recorded",
                                (policy,) if policy else ())
        for key, policy_, digest, bound, outcome, recorded in rows:
            yield Recorded(key, policy_, digest, json.loads(bound), outcome, recorded)

    def close(self) -> None:
        self._db.close()


def merged(paths: Sequence[str | Path], policy: str) -> tuple[list[Recorded], int]:
    """The policy's outcomes from several stores (replicas'), oldest first, one per response: an
    outcome sent to two replicas that keep separate stores is kept once (the first recorded).
    Also how many were left out so."""
    found = []
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"no feedback store at {path}")
        store = FeedbackStore(path)
        found += list(store.outcomes(policy))
        store.close()
    first: dict[str, Recorded] = {}
    for recorded in sorted(found, key=lambda r: r.recorded):
        first.setdefault(recorded.key, recorded)
    return list(first.values()), len(found) - len(first)
