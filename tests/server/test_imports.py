"""The rooms' doors: the server stands on the serving core only, the core on nothing of ours above it."""

from __future__ import annotations

import json
import subprocess
import sys


def loaded_by(*modules: str) -> list[str]:
    """Our modules a fresh interpreter has loaded after importing `modules`."""
    code = (f"import sys; import {', '.join(modules)}; import json; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0].startswith('steering'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def test_the_server_loads_no_demo_training_fixture_or_benchmark_module():
    loaded = loaded_by("steering_server.app")
    assert "steering_server.app" in loaded and "steering.engine" in loaded
    assert [m for m in loaded if m.startswith(("steering_tools", "steering_cli"))] == []


def test_the_serving_core_knows_nothing_of_http_or_tools():
    loaded = loaded_by("steering.engine", "steering.composite", "steering.processors", "steering.plugin")
    assert [m for m in loaded if not m.startswith("steering.") and m != "steering"] == []
    