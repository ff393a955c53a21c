"""The HTTP app: `create_app(settings)` builds it; nothing is constructed at import time."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Annotated, TypeVar

import prometheus_client
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from prometheus_fastapi_instrumentator import Instrumentator
from pydantic import BaseModel, Field
from vllm.config import VllmConfig

from steering.config import Deployment, PolicyChanges, checkpoint_name, digest, load_deployment, read_deployment
from steering.engine import SteeringEngine, engine_config
from steering.errors import ConfigError, SteeringError, UnknownPolicy
from steering_server import tokens
from steering_server.errors import EngineNotReady, error_body, install_error_handlers
from steering_server.gate import GUARDED, Gate
from steering_server.metrics import ServerMetrics
from steering_server.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    ReloadResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from steering_server.service import ChatCompletions, Completions, GenerationService

logger = logging.getLogger("steer.server")
T = TypeVar("T")
LOADING_TICK_SECONDS = 10.0
ENGINE_CHECK_SECONDS = 1.0
ENGINE_DIED = "the engine died (vLLM's engine core process is gone)"


class ServerSettings(BaseModel):
    """How `steer serve` runs: the deployment file, the address, the optional API key."""

    config: Path | None = None  # the deployment YAML; unused when the app is handed an engine
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = Field(default=None, min_length=1)
    graceful_shutdown_seconds: float = 60.0
    watch_config_seconds: float | None = Field(
        default=None, gt=0, description="Re-read the config this often and reload when it changed (None: never).")
    max_body_bytes: int = Field(default=16 * 2**20, gt=0, description="A larger request body is refused (413).")

    @property
    def address(self) -> str:
        return f"http://{self.host}:{self.port}"


class ServiceState:
    """The deployment, its metrics, and the engine with its services once it is up."""

    def __init__(self, settings: ServerSettings, deployment: Deployment):
        self.settings = settings
        self._deployment = deployment  # until the engine is up; then the engine's (which reloads change)
        self.metrics = ServerMetrics(set(deployment.policies))
        self.metrics.loaded(digest(deployment), set(deployment.policies))
        started = int(time.time())
        self.created = dict.fromkeys(deployment.policies, started)  # a policy added by a reload: its time
        self.engine: SteeringEngine | None = None
        self.failure: BaseException | None = None
        self.chat: ChatCompletions | None = None
        self.completions: Completions | None = None
        # Tokenizing and chat rendering run here, off the event loop, one at a time: a long prompt
        # must not stall other requests or /health, and a Hugging Face tokenizer is not safe to
        # call from several threads at once.
        self.admission = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steer-admission")

    async def run_engine(self, vllm_config: VllmConfig, on_failure: Callable[[BaseException], None]) -> None:
        """Start the engine and serve with it. A server whose engine failed to start, or later died,
        answers nothing: `on_failure` stops it (exit 1), as `vllm serve` does, and its supervisor
        (Kubernetes, Docker's restart policy, systemd) starts a fresh one."""
        started = time.perf_counter()
        logger.info("starting the engine: base %s, expert pairs %s", self.deployment.base,
                    list(self.deployment.pair_names) or "none")
        loading = asyncio.ensure_future(asyncio.to_thread(SteeringEngine.start, self.deployment, vllm_config))
        try:
            while not (await asyncio.wait({loading}, timeout=LOADING_TICK_SECONDS))[0]:
                logger.info("engine loading… %.0f s", time.perf_counter() - started)
            engine = loading.result()
        except SteeringError as error:
            logger.error("the engine failed to start: %s", error)
            self.failure = error
            on_failure(error)
            return
        except Exception as error:
            logger.exception("the engine failed to start")
            self.failure = error
            on_failure(error)
            return
        self.serve(engine)
        logger.info("engine ready in %.1f s; serving policies %s (config %s) on %s", time.perf_counter() - started,
                    sorted(self.deployment.policies), digest(self.deployment), self.settings.address)
        while not engine.errored:
            await asyncio.sleep(ENGINE_CHECK_SECONDS)
        logger.error("%s; stopping the server", ENGINE_DIED)
        self.failure = EngineNotReady(f"{ENGINE_DIED}; the server is stopping")
        on_failure(self.failure)

    def serve(self, engine: SteeringEngine) -> None:
        """Route generation to `engine` from now on."""
        self.engine = engine
        self.chat = ChatCompletions(engine, self.metrics)
        self.completions = Completions(engine, self.metrics)
        self.metrics.watch_engine(lambda: engine.num_unfinished_requests)

    @property
    def deployment(self) -> Deployment:
        """The deployment whose policies are served now."""
        return self.engine.deployment if self.engine is not None else self._deployment

    async def admit(self, work: Callable[..., T], *args: object) -> T:
        """`work(*args)` on the admission thread: tokenizing, rendering, planning."""
        return await asyncio.get_running_loop().run_in_executor(self.admission, work, *args)

    async def reload(self, source: str) -> PolicyChanges:
        """Re-read the config file and serve its policies from the next admission on.

        The swap runs on the admission thread, between two admissions: a request is planned
        wholly on the old policies or wholly on the new. A refused reload changes nothing, and
        every outcome is logged with `source` (who asked).
        """
        started = time.perf_counter()
        if self.engine is None:  # the config it starts with is the file as it was read at start-up
            logger.warning("config reload by %s refused: the engine is still loading", source)
            raise EngineNotReady("the engine is still loading; reload once /health answers 200")
        try:
            if self.settings.config is None:
                raise ConfigError("config", "this server was handed a running engine, not a config file: "
                                            "there is no file to reload")
            engine, path = self.engine, self.settings.config
            changes = await self.admit(lambda: engine.reload(read_deployment(path)))
        except SteeringError as error:
            self.metrics.reloads.labels("refused").inc()
            self.metrics.reload_successful.set(0)
            logger.warning("config reload by %s refused; still serving config %s: %s", source,
                           digest(self.deployment), error)
            raise
        now = int(time.time())
        self.created = {name: self.created.get(name, now) for name in self.deployment.policies}
        self.metrics.loaded(changes.digest, set(self.deployment.policies))
        self.metrics.reloads.labels("unchanged" if changes.unchanged else "reloaded").inc()
        logger.info("config reload by %s: %s (%.0f ms)", source, changes.describe(),
                    1000 * (time.perf_counter() - started))
        return changes

    def model_cards(self, name: str | None = None) -> list[ModelCard]:
        """Every policy (or the one named) as `/v1/models` lists it, from one deployment even if a
        reload swaps it meanwhile: checkpoints by name, never by path."""
        d = self.deployment
        if name is not None and name not in d.policies:
            raise UnknownPolicy(name, d.policies)
        cards = []
        for policy_name, policy in d.policies.items():
            if name not in (None, policy_name):
                continue
            experts = {pair: {"tuned": checkpoint_name(d.experts[pair].tuned),
                              "untuned": checkpoint_name(d.experts[pair].untuned)} for pair in policy.alpha}
            cards.append(ModelCard(id=policy_name, created=self.created.get(policy_name, int(time.time())),
                                   description=policy.description, base=checkpoint_name(d.base), experts=experts,
                                   alpha=policy.alpha, max_alpha=policy.max_alpha))
        return cards

    def shutdown(self) -> None:
        self.admission.shutdown(wait=False)
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


def _state(request: Request) -> ServiceState:
    return request.app.state.service


def _ready(request: Request) -> ServiceState:
    state = _state(request)
    if state.engine is None:
        reason = f"the engine failed to start: {state.failure}" if state.failure else "the engine is still loading"
        raise EngineNotReady(reason)
    if state.engine.errored:
        raise EngineNotReady(f"{ENGINE_DIED}; the server is stopping")
    return state


Ready = Annotated[ServiceState, Depends(_ready)]
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client left; nobody reads it
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}


def streamed(chunk: type[BaseModel]) -> dict:
    """The OpenAPI 200 of a generation endpoint: JSON, or with `stream: true` server-sent events
    (before OpenAPI 3.2, a stream's `schema` describes one event)."""
    data = (f"One {chunk.__name__} as JSON; an ErrorResponse if generation fails midway; `[DONE]` to end.")
    event = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string", "description": data}, "event": {"type": "string"}}}
    return {200: {"description": "The answer; with `stream: true`, server-sent events.",
                  "content": {"text/event-stream": {"schema": event}}}}


def openapi_schema(app: FastAPI, settings: ServerSettings) -> dict:
    """FastAPI's schema, made to say what the server does: invalid input is our 400, never
    FastAPI's 422; with an API key, every guarded path takes it as a bearer token."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                operation["responses"].pop("422", None)
                if settings.api_key and path.startswith(GUARDED):
                    operation["security"] = [{"apiKey": []}]
        components = schema.setdefault("components", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(unused, None)
        if settings.api_key:
            components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = schema
    return app.openapi_schema


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`; if the client leaves first, cancel it (aborting its engine requests): None."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None


async def _sse(service: GenerationService, policy: str, chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Server-sent events: one `data:` line per chunk, an error event if generation fails, `[DONE]`.

    The HTTP status (200) is sent with the first event, so the metrics count the stream's own
    outcome when it ends: 200, the status its error event carries, or an abort.
    """
    metrics = service.metrics
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json()}\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        metrics.aborted.labels(policy).inc()
        raise
    except Exception as error:
        status, body = error_body(error)
        if status == 500:
            logger.exception("stream failed")
        metrics.errors.labels(policy, body.code or body.type).inc()
        metrics.requests.labels(policy, service.endpoint, str(status)).inc()
        yield f"data: {ErrorResponse(error=body).model_dump_json()}\n\n"
    else:
        metrics.requests.labels(policy, service.endpoint, "200").inc()
    yield "data: [DONE]\n\n"


async def _generate(request: Request, service: GenerationService, body) -> Response:
    request.state.policy = body.model
    plan = await _state(request).admit(service.plan, body)
    metrics = service.metrics
    if body.stream:
        return StreamingResponse(_sse(service, plan.name, service.chunks(body, plan)), media_type="text/event-stream")
    answered = await until_disconnected(request, service.answer(plan))
    if answered is None:
        metrics.aborted.labels(plan.name).inc()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    metrics.requests.labels(plan.name, service.endpoint, "200").inc()
    return JSONResponse(service.response(body, plan, *answered).model_dump())


@contextmanager
def reload_on_sighup(state: ServiceState) -> Iterator[None]:
    """`kill -HUP <pid>` reloads the policies, as it reloads nginx's or Prometheus's config."""
    loop = asyncio.get_running_loop()

    running: set[asyncio.Task] = set()  # the loop holds tasks weakly

    def reload() -> None:
        async def logged() -> None:
            with suppress(SteeringError):  # `reload` has logged why
                await state.reload("SIGHUP")

        task = asyncio.ensure_future(logged())
        running.add(task)
        task.add_done_callback(running.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, reload)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError):  # not the main thread; no SIGHUP
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


async def watch_config(state: ServiceState, every: float) -> None:
    """Reload whenever what the config file reads as changes: the YAML, or a calibration file it
    names. For a file that changes under the server, as a mounted Kubernetes ConfigMap does when
    it is applied, so every replica takes the change without anyone reaching each pod.

    Each change is reloaded (or refused, and logged) once; a file that stays broken, or that
    changes what needs a restart, is not retried until it changes again.
    """
    path, seen = state.settings.config, None
    while True:
        await asyncio.sleep(every)
        if state.engine is None:
            continue
        if seen is None:  # the engine is up with the file as it was read at start-up
            seen = digest(state.deployment)
        try:
            current = digest(await asyncio.to_thread(read_deployment, path))
        except ConfigError as error:
            current = f"refused: {error}"
        if current != seen:
            seen = current
            with suppress(SteeringError):  # `reload` has logged why
                await state.reload(f"a change to {path}")


def create_app(
    settings: ServerSettings,
    *,
    engine: SteeringEngine | None = None,
    on_engine_failure: Callable[[BaseException], None] = lambda error: None,
) -> FastAPI:
    """The app over `engine` (the caller's: ready at once, never shut down here), or over the
    deployment in `settings.config`: loaded and checked now, so bad config fails here, and its
    engine started on startup."""
    if engine is not None:
        state = ServiceState(settings, engine.deployment)
        state.serve(engine)
        lifespan = None
    else:
        deployment = load_deployment(settings.config)
        state = ServiceState(settings, deployment)
        vllm_config = engine_config(deployment)

        @asynccontextmanager
        async def lifespan(app: FastAPI):
            running = asyncio.create_task(state.run_engine(vllm_config, on_engine_failure))
            every = settings.watch_config_seconds
            watching = asyncio.create_task(watch_config(state, every)) if every else None
            with reload_on_sighup(state):
                yield
            running.cancel()
            if watching:
                watching.cancel()
            state.shutdown()

    app = FastAPI(
        title="Steering service",
        description="OpenAI-compatible decode-time steering: policies are models; "
        "per-request overrides go in the top-level `steering` object.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = state
    install_error_handlers(app)
    app.add_middleware(Gate, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    # HTTP metrics as `vllm serve` has them (`http_requests_total`, `http_request_duration_seconds`,
    # …), in the app's own registry; added last, so it is outermost and counts the gate's refusals.
    Instrumentator(excluded_handlers=["/metrics", "/health"], registry=state.metrics.registry).instrument(app)

    app.openapi = lambda: openapi_schema(app, settings)  # type: ignore[method-assign]

    @app.get("/health", response_model=Health, responses={503: {"model": Health, "description": "Loading, or failed (the engine did not start, or died)."}})
    async def health() -> JSONResponse:
        if state.engine is not None and not state.engine.errored:
            return JSONResponse({"status": "ready"})
        status = "failed" if state.failure or state.engine is not None else "loading"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        body = state.metrics.render() + prometheus_client.generate_latest(prometheus_client.REGISTRY)
        return Response(body, media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def list_models() -> ModelList:
        return ModelList(data=state.model_cards())

    @app.get("/v1/models/{model}", response_model=ModelCard, responses=ERRORS)
    async def retrieve_model(request: Request, model: str) -> ModelCard:
        request.state.policy = model
        (card,) = state.model_cards(model)
        return card

    @app.post("/v1/admin/reload", response_model=ReloadResponse,
              responses={**ERRORS, 409: {"model": ErrorResponse, "description": "Needs a restart."}})
    async def reload(request: Request, ready: Ready) -> ReloadResponse:
        """Re-read the config file: policies added, removed or changed serve from the next request
        on; requests in flight finish on their old policy. A config that fails validation, or that
        changes the base, the experts or the engine (which need a restart), is refused and the
        running policies stay."""
        client = f"{request.client.host}:{request.client.port}" if request.client else "an unknown client"
        agent = request.headers.get("user-agent")
        changes = await ready.reload(f"POST /v1/admin/reload from {client}" + (f" ({agent})" if agent else ""))
        return ReloadResponse(status="unchanged" if changes.unchanged else "reloaded", digest=changes.digest,
                              previous_digest=changes.previous_digest, added=list(changes.added),
                              removed=list(changes.removed),
                              changed={name: list(fields) for name, fields in changes.changed.items()},
                              policies=list(ready.deployment.policies))

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest, ready: Ready) -> TokenizeResponse:
        return await ready.admit(tokens.tokenize, ready.engine, body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(body: DetokenizeRequest, ready: Ready) -> DetokenizeResponse:
        return await ready.admit(tokens.detokenize, ready.engine, body)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**ERRORS, **streamed(ChatCompletionChunk)},
              name="chat")
    async def chat_completions(request: Request, body: ChatCompletionRequest, ready: Ready) -> Response:
        return await _generate(request, ready.chat, body)

    @app.post("/v1/completions", response_model=Completion, responses={**ERRORS, **streamed(CompletionChunk)},
              name="completions")
    async def completions(request: Request, body: CompletionRequest, ready: Ready) -> Response:
        return await _generate(request, ready.completions, body)

    return app
