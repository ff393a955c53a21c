"""The rooms' doors: the server stands on the serving core only, the core on nothing of ours above it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


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
    

def test_the_cli_loads_what_a_command_runs_only_when_it_runs():
    loaded = loaded_by("steering_cli.main")
    assert [m for m in loaded if m.startswith(("steering_server", "steering_tools"))] == []


def test_a_wheel_holds_the_four_packages_by_their_own_names_and_no_fixture_in_the_core(tmp_path):
    """The folders are server/, tools/ and cli/; the import names are not (no top-level `server`)."""
    root, source = Path(__file__).resolve().parents[2], tmp_path / "source"
    shutil.copytree(root, source, ignore=lambda folder, names: [  # a copy: building writes build/ beside it
        name for name in names if folder == str(root) and name not in {"pyproject.toml", "README.md", "steering",
                                                                        "server", "tools", "cli"}])
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("steering_service-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert packages == {"steering", "steering_server", "steering_tools", "steering_cli"}
    assert not [name for name in names if name.startswith("steering/") and "fixture" in name]
    assert "steering_tools/fixtures.py" in names and "steering_server/chat/api_router.py" in names
    assert {f"steering_server/playground/static/{name}" for name in ("index.html", "app.js", "app.css")} <= set(names)
