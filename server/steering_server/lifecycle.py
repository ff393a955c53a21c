"""The engine behind the server: loading, serving, failed or dead; started and stopped with the app.

A server whose engine failed to start, or later died, answers nothing: `on_failure` stops it
(exit 1), as `vllm serve` does, and its supervisor (Kubernetes, Docker's restart policy,
systemd) starts a fresh one. Requests in flight when the server stops drain first (uvicorn's
graceful shutdown); then the engine shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TypeVar

from vllm.config import VllmConfig

from steering.admission import Admission
from steering.config import Deployment, digest
from steering.engine import SteeringEngine, engine_config
from steering.errors import SteeringError
from steering_server.errors import EngineNotReady
from steering_server.metrics import ServerMetrics

logger = logging.getLogger("steer.server")
T = TypeVar("T")
LOADING_TICK_SECONDS = 10.0
ENGINE_CHECK_SECONDS = 1.0
ENGINE_DIED = "the engine died (vLLM's engine core process is gone)"


class Lifecycle:
    """The engine's state, the admission it serves through, and the thread admissions run on."""

    def __init__(self, deployment: Deployment, metrics: ServerMetrics, *, address: str,
                 engine: SteeringEngine | None = None, on_failure: Callable[[BaseException], None] = lambda error: None):
        self.address = address  # where the server listens, for the log
        self._deployment = deployment  # until the engine is up; then the admission's (which reloads change)
        self.metrics = metrics
        self.on_failure = on_failure
        # Checked now, so bad config fails before the app starts; an engine handed over needs none.
        self.vllm_config: VllmConfig | None = engine_config(deployment) if engine is None else None
        self.admission: Admission | None = None
        self.failure: BaseException | None = None
        # Tokenizing, chat rendering and reloads run here, off the event loop, one at a time: a
        # long prompt must not stall other requests or /health, and a Hugging Face tokenizer is
        # not safe to call from several threads at once.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steer-admission")
        if engine is not None:
            self.serve(engine)

    @property
    def deployment(self) -> Deployment:
        """The deployment whose policies are served now."""
        return self.admission.deployment if self.admission is not None else self._deployment

    @property
    def status(self) -> str:
        """`ready`, `loading`, or `failed` (the engine did not start, or died)."""
        if self.admission is not None and not self.admission.engine.errored:
            return "ready"
        return "failed" if self.failure or self.admission is not None else "loading"

    def serve(self, engine: SteeringEngine) -> Admission:
        """Admit requests to `engine` from now on."""
        self.admission = Admission(engine, self._deployment)
        self.metrics.watch_engine(lambda: engine.num_unfinished_requests)
        return self.admission

    def ready(self) -> Admission:
        """The admission, or `EngineNotReady` saying why there is none."""
        if self.admission is None:
            reason = f"the engine failed to start: {self.failure}" if self.failure else "the engine is still loading"
            raise EngineNotReady(reason)
        if self.admission.engine.errored:
            raise EngineNotReady(f"{ENGINE_DIED}; the server is stopping")
        return self.admission

    async def on_admission_thread(self, work: Callable[..., T], *args: object) -> T:
        """`work(*args)` on the admission thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, work, *args)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The engine starts as the app does, and shuts down after the app has drained."""
        task = asyncio.create_task(self._run())
        try:
            yield
        finally:
            task.cancel()
            self.shutdown()

    async def _run(self) -> None:
        """Start the engine and serve with it; stop the server if it fails to start or dies."""
        started, deployment = time.perf_counter(), self._deployment
        logger.info("starting the engine: base %s, expert pairs %s", deployment.base,
                    list(deployment.pair_names) or "none")
        loading = asyncio.ensure_future(asyncio.to_thread(SteeringEngine.start, deployment, self.vllm_config))
        try:
            while not (await asyncio.wait({loading}, timeout=LOADING_TICK_SECONDS))[0]:
                logger.info("engine loading… %.0f s", time.perf_counter() - started)
            engine = loading.result()
            self.serve(engine)
        except Exception as error:
            if isinstance(error, SteeringError):
                logger.error("the engine failed to start: %s", error)
            else:
                logger.exception("the engine failed to start")
            self.failure = error
            self.on_failure(error)
            return
        logger.info("engine ready in %.1f s; serving policies %s (config %s) on %s", time.perf_counter() - started,
                    sorted(self.deployment.policies), digest(self.deployment), self.address)
        while not engine.errored:
            await asyncio.sleep(ENGINE_CHECK_SECONDS)
        logger.error("%s; stopping the server", ENGINE_DIED)
        self.failure = EngineNotReady(f"{ENGINE_DIED}; the server is stopping")
        self.on_failure(self.failure)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False)
        if self.admission is not None:
            self.admission.engine.shutdown()
            self.admission = None
