"""Comparisons that can resolve a few percent on a shared, noisy machine: the systems run
interleaved, round after round, the order reversed every other round (so neither drift nor
warm-up favours one), and each ratio is reported as its median and spread over the rounds."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
ROUNDS_TO_RESOLVE = 5  # fewer cannot tell a few percent from this machine's noise


def interleaved(measure: Mapping[K, Callable[[], T]], rounds: int) -> dict[K, list[T]]:
    """Each system's measurement in each round; round r runs the systems in order, or reversed."""
    names = list(measure)
    results: dict[K, list[T]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].append(measure[name]())
    return results


def spread(values: Sequence[float]) -> dict:
    """A ratio over the rounds: its median, quartiles and range, and each round's value."""
    values = [float(v) for v in values]
    low, median, high = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "iqr": [float(low), float(high)], "min": min(values), "max": max(values),
            "rounds": values}


def describe(ratio: dict) -> str:
    if len(ratio["rounds"]) == 1:
        return f"{ratio['median']:.3f} (1 round: no spread)"
    return (f"{ratio['median']:.3f} (IQR {ratio['iqr'][0]:.3f}-{ratio['iqr'][1]:.3f}, range "
            f"{ratio['min']:.3f}-{ratio['max']:.3f}, {len(ratio['rounds'])} rounds)")


def caveat(rounds: int) -> str:
    """What a report over `rounds` rounds cannot say, to print beside it ('' from ROUNDS_TO_RESOLVE on)."""
    if rounds >= ROUNDS_TO_RESOLVE:
        return ""
    return f"; {rounds} round(s) cannot resolve a few percent (a smoke run: {ROUNDS_TO_RESOLVE} or more to compare)"
