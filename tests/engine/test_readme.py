"""The README's "From Python" example, run as written against a real engine."""

from __future__ import annotations

import asyncio
import contextlib
import io
import textwrap
from pathlib import Path

from steering_tools.fixtures import write_deployment

ROOT = Path(__file__).resolve().parents[2]


def from_python_example() -> str:
    section = (ROOT / "README.md").read_text().split("\n## From Python\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_from_python_example_answers_as_the_reference(llama_family, llama_reference, tokenizer, tmp_path,
                                                         monkeypatch):
    write_deployment(llama_family, tmp_path / "deploy.yaml", engine={"enforce_eager": True})
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    body = textwrap.indent(from_python_example(), " " * 8)
    exec("async def example():\n    try:\n" + body + "\n        return piece, outcome\n"
         "    finally:\n        if 'engine' in locals():\n            engine.shutdown()\n", namespace)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        piece, outcome = asyncio.run(namespace["example"]())
    want = llama_reference.generate([tokenizer.encode("the model answers")], [{"chat": 2.0}], max_tokens=16)[0]
    assert list(piece.token_ids) == want
    assert outcome.report()["alpha"] == {"chat": 2.0}
    # vLLM's own log lines may reach the captured stdout too (run alone, vLLM's logging is set up inside the capture).
    assert any(line.startswith(piece.text) for line in printed.getvalue().splitlines())
