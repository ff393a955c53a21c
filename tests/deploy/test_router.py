"""vLLM's router in deploy/: its image pinned to the version the tests run, its flags those the
tests run it with (and parsed by the router's own parser), wired to the steering replicas."""

from __future__ import annotations

import argparse
import subprocess

import pytest
from steering_tools.router import ROUTER_OPTIONS
from vllm_router.router_args import RouterArgs

from tests.deploy.conftest import KUBERNETES, ROUTER_DOCKERFILE, find, instructions
from tests.deploy.test_images import HADOLINT, PYPROJECT


def router_args(args: list[str]) -> RouterArgs:
    parser = argparse.ArgumentParser()
    RouterArgs.add_cli_args(parser)
    parsed = RouterArgs.from_cli_args(parser.parse_args(args))
    parsed._validate_router_args()
    return parsed


def pairs(args: list[str]) -> list[str]:
    """`--flag=value` as `--flag value`, the way ROUTER_OPTIONS spells it."""
    return [part for arg in args for part in (arg.split("=", 1) if arg.startswith("--") else [arg])]


def test_the_image_is_hadolint_clean_non_root_and_pinned_to_the_tested_version():
    result = subprocess.run([str(HADOLINT), "--no-color", "--failure-threshold", "warning", str(ROUTER_DOCKERFILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = instructions(ROUTER_DOCKERFILE)
    (tested,) = [pin for pin in PYPROJECT["project"]["optional-dependencies"]["test"] if pin.startswith("vllm-router")]
    assert any(step.keyword == "RUN" and f"pip install {tested}" in step.arguments for step in steps)
    (user,) = [step.arguments for step in steps if step.keyword == "USER"]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) > 0
    kustomization = (KUBERNETES / "router" / "kustomization.yaml").read_text()
    assert f"newTag: {tested.split('==')[1]}" in kustomization


def test_the_deployment_runs_the_tested_flags_and_finds_the_replicas_by_their_label():
    router = find("Deployment", "steering-router")
    (container,) = router["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    flags = pairs(args)
    assert " ".join(ROUTER_OPTIONS) in " ".join(flags), "the flags the tests run the router with"
    parsed = router_args(args)
    replicas = find("Deployment", "steering")
    labels = replicas["spec"]["template"]["metadata"]["labels"]
    assert parsed.service_discovery and parsed.selector.items() <= labels.items()
    (steering,) = replicas["spec"]["template"]["spec"]["containers"]
    assert parsed.service_discovery_port == steering["ports"][0]["containerPort"]
    assert parsed.health_check_endpoint == "/health"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert (parsed.port, parsed.prometheus_port) == (ports["http"], ports["metrics"])
    assert router["spec"]["template"]["spec"]["serviceAccountName"] == "steering-router"
    # The replicas' key, from their Secret: the router sends it on the routes it does not know (feedback).
    assert parsed.api_key == "$(STEER_API_KEY)"
    key = {env["name"]: env.get("valueFrom") for env in container["env"]}["STEER_API_KEY"]
    assert key == {env["name"]: env.get("valueFrom") for env in steering["env"]}["STEER_API_KEY"]


def test_the_router_may_watch_pods_and_its_metrics_are_scraped():
    role = find("Role", "steering-router")
    (rule,) = role["rules"]
    assert rule["resources"] == ["pods"] and {"get", "list", "watch"} <= set(rule["verbs"])
    binding = find("RoleBinding", "steering-router")
    assert binding["roleRef"]["name"] == "steering-router"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "steering-router"}]
    service = find("Service", "steering-router")
    assert service["spec"]["selector"] == find("Deployment", "steering-router")["spec"]["selector"]["matchLabels"]
    monitor = find("ServiceMonitor", "steering-router")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"] == service["metadata"]["labels"]


def test_a_router_flag_misspelt_is_caught_by_the_routers_parser():
    with pytest.raises(SystemExit):
        router_args(["--health-check-intervall-secs=1"])
