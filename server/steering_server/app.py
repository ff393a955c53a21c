"""The HTTP app: `create_app(settings)` wires it; nothing is constructed at import time."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_fastapi_instrumentator import Instrumentator

from steering.config import digest, load_deployment
from steering.engine import SteeringEngine
from steering_server.admin.api_router import router as admin
from steering_server.chat.api_router import router as chat
from steering_server.chat.serving import ChatServing
from steering_server.completions.api_router import router as completions
from steering_server.completions.serving import CompletionServing
from steering_server.deps import Server
from steering_server.errors import install_error_handlers
from steering_server.feedback.api_router import router as feedback_router
from steering_server.feedback.serving import FeedbackServing
from steering_server.gate import Gate
from steering_server.health.api_router import router as health
from steering_server.lifecycle import Lifecycle
from steering_server.metrics import ServerMetrics
from steering_server.models.api_router import router as models
from steering_server.openapi import openapi_schema
from steering_server.playground.api_router import router as playground
from steering_server.reload import Reloader
from steering_server.settings import ServerSettings
from steering_server.tokenize.api_router import router as tokenize


def create_app(settings: ServerSettings, *, engine: SteeringEngine | None = None,
               on_engine_failure: Callable[[BaseException], None] = lambda error: None) -> FastAPI:
    """The app over `engine` (the caller's: ready at once, never shut down here), or over the
    deployment in `settings.config`: loaded and checked now, so bad config fails here, and its
    engine started with the app."""
    deployment = engine.deployment if engine is not None else load_deployment(settings.config)
    metrics = ServerMetrics(set(deployment.policies))
    metrics.loaded(digest(deployment), set(deployment.policies))
    lifecycle = Lifecycle(deployment, metrics, address=settings.address, engine=engine, on_failure=on_engine_failure)
    reloader = Reloader(settings.config, lifecycle, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with lifecycle.running(), reloader.listening(settings.watch_config_seconds):
            yield

    app = FastAPI(title="Steering service", version="0.1.0", lifespan=lifespan if engine is None else None,
                  description="OpenAI-compatible decode-time steering: policies are models; "
                  "per-request overrides go in the top-level `steering` object.")
    feedback = FeedbackServing(deployment.feedback, metrics) if deployment.feedback else None
    shared = {"keyed": settings.api_key is not None, "feedback": feedback}
    app.state.server = Server(settings, metrics, lifecycle, reloader, ChatServing(lifecycle, metrics, **shared),
                              CompletionServing(lifecycle, metrics, **shared), feedback)
    for router in (health, models, admin, tokenize, chat, completions, feedback_router, playground):
        app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(Gate, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    # HTTP metrics as `vllm serve` has them (`http_requests_total`, …), in the app's own registry;
    # added last, so it is outermost and counts the gate's refusals.
    Instrumentator(excluded_handlers=["/metrics", "/health"], registry=metrics.registry).instrument(app)
    app.openapi = lambda: openapi_schema(app, settings)  # type: ignore[method-assign]
    return app
