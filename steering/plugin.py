"""vLLM general plugin, run in every process vLLM starts for an engine: it registers the composite
model, and ties the process's life to the process that started it."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def register() -> None:
    from vllm import ModelRegistry

    from steering.spec import ARCHITECTURE

    die_with_parent()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"steering.composite:{ARCHITECTURE}")


def die_with_parent() -> None:
    """In a process multiprocessing started (vLLM's engine core, its workers): be killed when the
    parent dies, however it dies. vLLM shuts its engine down when its server exits, but a server
    killed with SIGKILL (the OOM killer, a hard kill) runs no shutdown, and the engine, holding its
    weights and KV cache, lived on as an orphan. Linux only; elsewhere nothing changes."""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent.pid:  # the parent died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)
