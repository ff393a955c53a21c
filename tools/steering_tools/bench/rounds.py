"""Comparisons that can resolve a few percent on a shared, noisy machine: the systems run
interleaved, round after round, the order reversed every other round (so neither drift nor
warm-up favours one), and each ratio is reported as its median and spread over the rounds."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def interleaved(measure: Mapping[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Each system's measurement in each round; round r runs the systems in order, or reversed."""
    names = list(measure)
    results: dict[str, list[T]] = {name: [] for name in names}
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
    return (f"{ratio['median']:.3f} (IQR {ratio['iqr'][0]:.3f}-{ratio['iqr'][1]:.3f}, range "
            f"{ratio['min']:.3f}-{ratio['max']:.3f}, {len(ratio['rounds'])} rounds)")
