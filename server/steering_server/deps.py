"""What a route reaches, as FastAPI dependencies: the server's parts, and whether its engine is ready."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from steering_server.lifecycle import Lifecycle
from steering_server.metrics import ServerMetrics
from steering_server.reload import Reloader
from steering_server.settings import ServerSettings

if TYPE_CHECKING:
    from steering_server.chat.serving import ChatServing
    from steering_server.completions.serving import CompletionServing
    from steering_server.feedback.serving import FeedbackServing


@dataclass(frozen=True)
class Server:
    """The app's parts, on `app.state.server`."""

    settings: ServerSettings
    metrics: ServerMetrics
    lifecycle: Lifecycle
    reloader: Reloader
    chat: ChatServing
    completions: CompletionServing
    feedback: FeedbackServing | None  # None: the config takes no feedback


def _server(request: Request) -> Server:
    return request.app.state.server


def _ready(request: Request) -> Server:
    server = _server(request)
    server.lifecycle.ready()
    return server


AnyState = Annotated[Server, Depends(_server)]
Ready = Annotated[Server, Depends(_ready)]  # a route that needs the engine: 503 until it is up
