"""The Kubernetes manifests: valid against the Kubernetes schema, wired to each other (selectors,
ports, names), and to the server they run (its flags, /health, its drain, its metrics, its config)."""

from __future__ import annotations

import copy
import re
import shlex

import kubernetes_validate
import pytest
import yaml
from steering_cli.main import build_parser
from steering_server.metrics import ServerMetrics
from steering_server.settings import ServerSettings

from steering.config import read_deployment
from tests.deploy.conftest import DEPLOY, KUBERNETES, find, instructions, manifests

# The oldest Kubernetes these manifests are meant for, and the newest the schemas know.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# Custom resources have no schema in Kubernetes' own; their wiring is checked below instead.
CUSTOM = {"monitoring.coreos.com/v1": {"ServiceMonitor", "PrometheusRule"}}


def builtin(objects):
    return [(path, doc) for path, doc in objects if doc["apiVersion"] not in CUSTOM]


def test_every_object_is_valid_against_the_kubernetes_schema_of_each_version(objects):
    assert {doc["kind"] for _, doc in objects} >= {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
                                                 "PodDisruptionBudget", "HorizontalPodAutoscaler", "StatefulSet"}
    assert {doc["kind"] for _, doc in objects if doc["apiVersion"] in CUSTOM} == {"ServiceMonitor", "PrometheusRule"}
    for path, doc in builtin(objects):
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{path.relative_to(DEPLOY)} {doc['kind']}/{doc['metadata']['name']} on {version}: "
                            f"{error.message} at {'.'.join(map(str, error.path))}")


def test_the_validation_does_catch_a_misspelt_field_and_a_wrong_type():
    deployment = find("Deployment", "steering")
    misspelt = copy.deepcopy(deployment)
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(misspelt, VERSIONS[0], strict=True)
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, VERSIONS[0], strict=True)


def test_each_kustomization_lists_the_objects_of_its_folder_and_the_rest_are_applied_on_their_own():
    listed = set()
    for kustomization in KUBERNETES.rglob("kustomization.yaml"):
        resources = yaml.safe_load(kustomization.read_text())["resources"]
        for name in resources:
            assert (kustomization.parent / name).is_file(), f"{kustomization}: {name}"
        listed |= {kustomization.parent / name for name in resources}
        files = {path for path, _ in manifests(kustomization.parent) if path.parent == kustomization.parent}
        assert files == {kustomization.parent / name for name in resources}
    optional = {path.relative_to(KUBERNETES).parent.name for path, _ in manifests() if path not in listed}
    assert optional == {"monitoring", "autoscaling"}  # each needs an operator or adapter installed first


def pod_spec(kind: str, name: str) -> dict:
    return find(kind, name)["spec"]["template"]["spec"]


def container_of(kind: str, name: str) -> dict:
    (container,) = pod_spec(kind, name)["containers"]
    return container


def serve_args(container: dict):
    """`steer serve`'s arguments as the container runs them (its args, or the serve line of a script)."""
    if "command" not in container:
        return build_parser().parse_args(["serve", *container["args"]])
    (line,) = [line for line in container["args"][0].splitlines() if "steer serve" in line]
    words = shlex.split(line)
    return build_parser().parse_args(words[words.index("steer") + 1:])


SERVERS = [("Deployment", "steering", "steering-config"),
           ("StatefulSet", "steering-ray-head", "steering-multinode-config")]


@pytest.mark.parametrize("kind,name,config_map", SERVERS)
def test_the_server_container_runs_steer_serve_on_its_mounted_config_with_the_key_from_a_secret(kind, name, config_map):
    container = container_of(kind, name)
    args = serve_args(container)
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec(kind, name)["volumes"]}
    (config,) = [n for n, volume in volumes.items() if volume.get("configMap", {}).get("name") == config_map]
    assert args.config.parent.as_posix() == mounts[config]["mountPath"] and mounts[config]["readOnly"]
    assert args.config.name in find("ConfigMap", config_map)["data"]
    assert args.host == "0.0.0.0"
    assert args.watch_config, "a replica reloads when its ConfigMap changes"
    assert {"name": "http", "containerPort": args.port} in container["ports"]
    assert mounts["models"]["readOnly"] and volumes["models"]["persistentVolumeClaim"]["readOnly"]
    assert find("PersistentVolumeClaim", volumes["models"]["persistentVolumeClaim"]["claimName"])
    env = {item["name"]: item for item in container["env"]}
    assert env["STEER_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "steering-api-key", "key": "api-key"}
    assert args.api_key is None, "the key stays out of the pod spec"


@pytest.mark.parametrize("kind,name,config_map", SERVERS)
def test_probes_ask_health_and_startup_allows_for_loading(kind, name, config_map):
    container = container_of(kind, name)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60


@pytest.mark.parametrize("kind,name,config_map", SERVERS)
def test_the_pod_runs_as_the_images_user_and_gives_its_home_a_writable_volume(kind, name, config_map):
    steps = instructions(DEPLOY / "docker" / "Dockerfile.gpu")
    (user,) = [step.arguments for step in steps if step.keyword == "USER"]
    home = re.search(r"HOME=(\S+)", next(step.arguments for step in steps if step.keyword == "ENV")).group(1)
    security = pod_spec(kind, name)["securityContext"]
    assert security["runAsNonRoot"] and f"{security['runAsUser']}:{security['runAsGroup']}" == user
    mounts = {mount["mountPath"]: mount["name"] for mount in container_of(kind, name)["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec(kind, name)["volumes"]}
    for path in (home, "/tmp", "/dev/shm"):
        assert "emptyDir" in volumes[mounts[path]], path


def test_the_grace_period_outlasts_the_pre_stop_pause_and_the_servers_drain():
    spec = pod_spec("Deployment", "steering")
    pause = container_of("Deployment", "steering")["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    drain = ServerSettings().graceful_shutdown_seconds
    assert spec["terminationGracePeriodSeconds"] >= int(pause[1]) + drain + 15, "room for the engine to stop"
    assert container_of("Deployment", "steering")["securityContext"]["readOnlyRootFilesystem"]


def test_service_disruption_budget_and_autoscaler_select_the_deployments_pods():
    deployment = find("Deployment", "steering")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = find("Service", "steering")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in [p["name"] for p in container_of("Deployment", "steering")["ports"]]
    assert find("PodDisruptionBudget", "steering")["spec"]["selector"] == deployment["spec"]["selector"]
    target = find("HorizontalPodAutoscaler", "steering")["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "steering"}
    assert find("HorizontalPodAutoscaler", "steering")["spec"]["minReplicas"] >= 2, "the PDB keeps one of two"


def test_prometheus_scrapes_metrics_on_the_servers_port():
    annotations = find("Deployment", "steering")["spec"]["template"]["metadata"]["annotations"]
    port = serve_args(container_of("Deployment", "steering")).port
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                           "prometheus.io/path": "/metrics"}
    monitor = find("ServiceMonitor", "steering")
    service = find("Service", "steering")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_the_autoscaler_scales_on_a_gauge_the_server_exports_and_the_adapter_serves():
    (metric,) = find("HorizontalPodAutoscaler", "steering")["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    exported = ServerMetrics(set()).render().decode()
    assert f"# TYPE {name} gauge" in exported
    values = yaml.safe_load((KUBERNETES / "autoscaling" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["seriesQuery"].startswith(name + "{") and rule["name"]["as"] == name


@pytest.mark.parametrize("config_map", ["steering-config", "steering-multinode-config"])
def test_the_shipped_deployment_yaml_and_its_calibration_files_pass_the_servers_schema(config_map, tmp_path):
    # Written out as the kubelet mounts a ConfigMap: one file per key in one folder.
    for key, text in find("ConfigMap", config_map)["data"].items():
        (tmp_path / key).write_text(text)
    deployment = read_deployment(tmp_path / "deploy.yaml")
    named = {policy.calibration.policy for policy in deployment.policies.values() if policy.calibration}
    assert named == {name for name in deployment.policies if deployment.policies[name].calibration}
    assert set(find("ConfigMap", config_map)["data"]) == {"deploy.yaml"} | {
        f"{name}.calibration.json" for name in named}


def test_the_multi_node_layout_gives_vllms_ray_executor_every_gpu_of_head_and_workers(tmp_path):
    (tmp_path / "deploy.yaml").write_text(find("ConfigMap", "steering-multinode-config")["data"]["deploy.yaml"])
    engine = read_deployment(tmp_path / "deploy.yaml").engine
    assert engine.model_extra["distributed_executor_backend"] == "ray"
    head, workers = container_of("StatefulSet", "steering-ray-head"), container_of("StatefulSet", "steering-ray-worker")
    gpus = []
    for container in (head, workers):
        limit = container["resources"]["limits"]["nvidia.com/gpu"]
        assert f"--num-gpus={limit}" in container["args"][0], "Ray offers the GPUs the pod holds"
        gpus.append(limit)
    replicas = find("StatefulSet", "steering-ray-worker")["spec"]["replicas"]
    assert engine.tensor_parallel_size == gpus[0] + replicas * gpus[1]
    assert engine.pipeline_parallel_size == 1
    # Workers join the head's Ray at its stable name: pod 0 of the head set, under its headless Service.
    head_set = find("StatefulSet", "steering-ray-head")
    service = find("Service", head_set["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= head_set["spec"]["template"]["metadata"]["labels"].items()
    (gcs,) = service["spec"]["ports"]
    assert f"--address={head_set['metadata']['name']}-0.{service['metadata']['name']}:{gcs['port']}" in workers["args"][0]
    assert f"--port={gcs['port']}" in head["args"][0]
    # vLLM waits for the Ray placement group up to PG_WAIT_TIMEOUT, then loads: the head's startup
    # probe must outlast the wait with room for the load.
    from vllm.v1.executor.ray_utils import PG_WAIT_TIMEOUT

    startup = head["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= PG_WAIT_TIMEOUT + 10 * 60
    api = find("Service", "steering-multinode")
    assert api["spec"]["selector"] == head_set["spec"]["selector"]["matchLabels"]


def test_the_calibration_rule_reads_series_the_server_exports_and_alerts_on_its_own_record():
    (rule,) = [doc for _, doc in manifests() if doc["kind"] == "PrometheusRule"]
    (group,) = rule["spec"]["groups"]
    records = {r["record"]: r["expr"] for r in group["rules"] if "record" in r}
    (alert,) = [r for r in group["rules"] if "alert" in r]
    exported = ServerMetrics(set()).render().decode()
    used = set(re.findall(r"steer_[a-z_]+_total", " ".join(records.values()) + alert["expr"]))
    assert used == {"steer_feedback_total", "steer_feedback_correct_total", "steer_feedback_confidence_total",
                    "steer_feedback_brier_total"}
    assert all(f"# TYPE {name} counter" in exported for name in used)
    assert any(name in alert["expr"] for name in records), "the alert reads the recorded ECE"
    assert "by (policy, bin)" in records["policy:steer_feedback_ece:1h"], "per bin, then summed over bins"
    assert rule["metadata"]["labels"]["app.kubernetes.io/name"] == "steering"
