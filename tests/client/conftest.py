"""Client-test fixtures; the running server itself comes from the root conftest."""

from __future__ import annotations

import pytest

from tests.client.stub import Answer, Stub


@pytest.fixture
def stub():
    """`stub(*answers)` starts a scripted server; all are stopped after the test."""
    started: list[Stub] = []

    def start(*answers: Answer) -> Stub:
        started.append(Stub(list(answers)))
        return started[-1]

    yield start
    for running in started:
        running.close()
