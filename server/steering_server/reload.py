"""Reloading the policies while the engine runs: one reloader, three triggers.

- `kill -HUP <pid>`, as nginx and Prometheus reload their config;
- a change to the file (`steer serve --watch-config SECONDS`), as a mounted Kubernetes ConfigMap
  changes when it is applied, so every replica takes it without anyone reaching each pod;
- `POST /v1/admin/reload` (`steer reload`), behind the API key.

Policies added, removed or changed serve from the next admission on; requests in flight finish
on their old policy. A config that fails validation, or that changes the base, the experts or
the engine (which need a restart), is refused, logged with who asked, and the running policies stay.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from steering.config import PolicyChanges, digest, read_deployment
from steering.errors import ConfigError, SteeringError
from steering_server.errors import EngineNotReady
from steering_server.lifecycle import Lifecycle
from steering_server.metrics import ServerMetrics

logger = logging.getLogger("steer.server")


class Reloader:
    """Re-reads the config file and swaps its policies in, between two admissions."""

    def __init__(self, path: Path | None, lifecycle: Lifecycle, metrics: ServerMetrics):
        self.path = path  # None: the server was handed a running engine, and has no file
        self.lifecycle = lifecycle
        self.metrics = metrics
        started = int(time.time())
        # When each policy was first served: `created` in /v1/models.
        self.created = dict.fromkeys(lifecycle.deployment.policies, started)
        self._running: set[asyncio.Task] = set()  # SIGHUP reloads in flight (the loop holds tasks weakly)

    async def reload(self, source: str) -> PolicyChanges:
        """Serve the file's policies from the next admission on, or raise and change nothing.

        The swap runs on the admission thread: a request is admitted wholly on the old policies
        or wholly on the new. Every outcome is logged with `source` (who asked).
        """
        started = time.perf_counter()
        if self.lifecycle.admission is None:  # the config it starts with is the file as read at start-up
            logger.warning("config reload by %s refused: the engine is still loading", source)
            raise EngineNotReady("the engine is still loading; reload once /health answers 200")
        try:
            if self.path is None:
                raise ConfigError("config", "this server was handed a running engine, not a config file: "
                                            "there is no file to reload")
            admission, path = self.lifecycle.admission, self.path
            changes = await self.lifecycle.on_admission_thread(lambda: admission.reload(read_deployment(path)))
        except SteeringError as error:
            self.metrics.reloads.labels("refused").inc()
            self.metrics.reload_successful.set(0)
            logger.warning("config reload by %s refused; still serving config %s: %s", source,
                           digest(self.lifecycle.deployment), error)
            raise
        now = int(time.time())
        self.created = {name: self.created.get(name, now) for name in self.lifecycle.deployment.policies}
        self.metrics.loaded(changes.digest, set(self.lifecycle.deployment.policies))
        self.metrics.reloads.labels("unchanged" if changes.unchanged else "reloaded").inc()
        logger.info("config reload by %s: %s (%.0f ms)", source, changes.describe(),
                    1000 * (time.perf_counter() - started))
        return changes

    @asynccontextmanager
    async def listening(self, watch_seconds: float | None) -> AsyncIterator[None]:
        """SIGHUP reloads while the app runs; with `watch_seconds`, so does a change to the file."""
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            handles_sighup = True
        except (NotImplementedError, RuntimeError, ValueError, AttributeError):  # not the main thread; no SIGHUP
            handles_sighup = False
        watching = asyncio.create_task(self.watch(watch_seconds)) if watch_seconds else None
        try:
            yield
        finally:
            if watching:
                watching.cancel()
            if handles_sighup:
                loop.remove_signal_handler(signal.SIGHUP)

    def _on_sighup(self) -> None:
        task = asyncio.ensure_future(self._logged("SIGHUP"))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def watch(self, every: float) -> None:
        """Reload whenever what the file reads as changes: the YAML, or a calibration file it
        names. Each change is reloaded (or refused, and logged) once; a file that stays broken,
        or that changes what needs a restart, is not retried until it changes again."""
        seen = None
        while True:
            await asyncio.sleep(every)
            if self.lifecycle.admission is None:
                continue
            if seen is None:  # the engine is up with the file as it was read at start-up
                seen = digest(self.lifecycle.deployment)
            try:
                current = digest(await asyncio.to_thread(read_deployment, self.path))
            except ConfigError as error:
                current = f"refused: {error}"
            if current != seen:
                seen = current
                await self._logged(f"a change to {self.path}")

    async def _logged(self, source: str) -> None:
        with suppress(SteeringError):  # `reload` has logged why
            await self.reload(source)
