"""OpenMP thread binding for vLLM's CPU workers, set before they start.

vLLM binds each CPU worker's threads to a NUMA node of its own (`VLLM_CPU_OMP_THREADS_BIND=auto`)
and refuses to start more workers than the machine has nodes — so tensor parallelism on a
one-node machine fails unless someone binds by hand. Where the operator has not, the engine
splits the cores it may use into one contiguous set per worker (`"0|1"`, `"0-7|8-15"`).
vLLM reads the binding from the environment of the processes it spawns, so it is set there for
the duration of the spawn.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from steering.errors import ConfigError

logger = logging.getLogger("steer.threads")
BIND_VARIABLE = "VLLM_CPU_OMP_THREADS_BIND"


def split_cores(cores: Sequence[int], num_workers: int) -> str:
    """`num_workers` contiguous, equal sets of `cores` in vLLM's syntax; leftovers go to the last set."""
    cores = sorted(cores)
    if len(cores) < num_workers:
        raise ConfigError("engine.tensor_parallel_size",
                          f"{num_workers} CPU workers need at least {num_workers} cores; this process may use "
                          f"{len(cores)} ({_ranges(cores)})")
    size = len(cores) // num_workers
    sets = [cores[i * size:(i + 1) * size] for i in range(num_workers - 1)] + [cores[(num_workers - 1) * size:]]
    return "|".join(_ranges(s) for s in sets)


@contextmanager
def cpu_worker_binding(num_workers: int, num_numa_nodes: int) -> Iterator[None]:
    """While vLLM spawns its processes, bind `num_workers` CPU workers one core set each, unless
    vLLM can bind them itself (a NUMA node per worker) or the operator chose a binding."""
    if num_workers <= 1 or num_numa_nodes >= num_workers or os.environ.get(BIND_VARIABLE, "auto") != "auto":
        yield
        return
    before = os.environ.get(BIND_VARIABLE)
    os.environ[BIND_VARIABLE] = split_cores(os.sched_getaffinity(0), num_workers)
    logger.info("%s=%s: %d CPU workers on %d NUMA node(s), one core set each", BIND_VARIABLE,
                os.environ[BIND_VARIABLE], num_workers, num_numa_nodes)
    try:
        yield
    finally:  # spawned processes keep their copy; the next engine of this process decides anew
        if before is None:
            os.environ.pop(BIND_VARIABLE, None)
        else:
            os.environ[BIND_VARIABLE] = before


def _ranges(cores: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs: list[list[int]] = []
    for core in cores:
        if runs and core == runs[-1][-1] + 1:
            runs[-1].append(core)
        else:
            runs.append([core])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
