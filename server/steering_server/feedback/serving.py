"""Feedback: ids issued on the responses of decision and abstention policies, and their outcomes
verified, kept (written before they are acknowledged) and counted."""

from __future__ import annotations

import asyncio
import os

from steering.config import FeedbackConfig
from steering.errors import ConfigError
from steering.feedback import FeedbackStore, FeedbackTokens, judge, payload
from steering.kinds import Plan
from steering_server.feedback.protocol import FeedbackRequest, FeedbackResponse
from steering_server.metrics import ServerMetrics

SECRET_VARIABLE = "STEER_FEEDBACK_SECRET"


class FeedbackServing:
    def __init__(self, config: FeedbackConfig, metrics: ServerMetrics):
        secret = config.secret.get_secret_value() if config.secret else os.environ.get(SECRET_VARIABLE)
        if not secret:
            raise ConfigError("feedback.secret", f"required with feedback on: set it, or ${SECRET_VARIABLE} (every "
                              "replica the same), so that any replica can verify the ids another issued")
        self.tokens = FeedbackTokens(secret, ttl_seconds=config.ttl_days * 86400)
        self.store = FeedbackStore(config.store)
        self.metrics = metrics

    def issue(self, plan: Plan) -> str | None:
        """The response's feedback id; None where nothing was decided (a plain policy, a calibration's)."""
        bound = payload(plan.outcome, plan.digest) if plan.collect is None else None
        return self.tokens.issue(bound) if bound is not None else None

    async def record(self, body: FeedbackRequest) -> FeedbackResponse:
        bound = self.tokens.verify(body.id)
        judged = judge(bound, body.outcome)
        new = await asyncio.to_thread(self.store.record, body.id, bound, body.outcome)
        if new:
            self.metrics.fed_back(bound["policy"], judged)
        return FeedbackResponse(status="recorded" if new else "already recorded", policy=bound["policy"],
                                digest=bound["digest"])
