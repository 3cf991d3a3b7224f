"""deploy/k8s parsed as YAML and checked field by field (kubectl and schemas are not available here).

Cross-checks against the code: probe paths are routes the server has, the autoscaling metric is one the
server exports, the config in the ConfigMap validates, and the GPU count matches its tensor parallelism.
"""

from pathlib import Path
from typing import Any

import pytest
import yaml

from engine_builder.build.config import parse_config
from engine_builder.common.types import EngineStats
from engine_builder.serve.server.main import longest_shutdown_s
from engine_builder.serve.server.metrics import ServerMetrics
from engine_builder.serve.server.state import ServerSettings

K8S_DIR = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
METRIC = "engine_builder:num_requests_inflight"


def _load(name: str) -> dict[str, Any]:
    documents = [doc for doc in yaml.safe_load_all((K8S_DIR / name).read_text()) if doc]
    assert len(documents) == 1, name
    return documents[0]


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return _load("deployment.yaml")


@pytest.fixture(scope="module")
def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def _config() -> Any:
    return parse_config((K8S_DIR / "config.yaml").read_text())


def test_kustomization_lists_existing_manifests() -> None:
    kustomization = _load("kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert set(resources) == {"deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"}
    assert all((K8S_DIR / name).is_file() for name in resources)


def test_the_config_map_is_generated_so_that_an_edit_rolls_the_pods(deployment: dict[str, Any]) -> None:
    """Probe CH: a fixed-name ConfigMap edited and applied changed no pod template, so running pods kept the old
    config while restarted and added ones built the new one. kustomize's generator names it after its content and
    rewrites the Deployment's reference, so every edit is a rollout."""
    (generated,) = _load("kustomization.yaml")["configMapGenerator"]
    assert generated["files"] == ["config.yaml"] and (K8S_DIR / "config.yaml").is_file()
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == generated["name"]
    assert not list(K8S_DIR.glob("configmap*.yaml"))


def test_the_autoscaler_alone_sets_the_replica_count(deployment: dict[str, Any]) -> None:
    """Probe CH: `replicas: 1` beside the HPA reset a scaled-out fleet to one pod on every `kubectl apply`."""
    assert "replicas" not in deployment["spec"]


def test_every_manifest_has_api_version_kind_and_name() -> None:
    for path in sorted(K8S_DIR.rglob("*.yaml")):
        document = yaml.safe_load(path.read_text())
        if path.name in ("kustomization.yaml", "prometheus-adapter-rules.yaml", "config.yaml"):
            continue
        assert document["apiVersion"] and document["kind"], path
        assert document["metadata"]["name"] == "engine-builder" or document["kind"] == "ConfigMap", path


def test_probes_use_the_server_routes(deployment: dict[str, Any], container: dict[str, Any]) -> None:
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600, "an engine build takes long"
    from engine_builder.serve.server.routes_health import router

    paths = {route.path for route in router.routes}  # type: ignore[attr-defined]
    assert {"/ready", "/health"} <= paths


def test_container_serves_the_mounted_config_on_the_named_port(container: dict[str, Any]) -> None:
    args = container["args"]
    assert args[:2] == ["run", "/config/config.yaml"]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    port = int(args[args.index("--port") + 1])
    assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts["config"] == "/config" and mounts["secrets"] == "/secrets"
    api_keys = {env["name"]: env for env in container["env"]}["ENGINE_BUILDER_API_KEYS"]
    assert api_keys["valueFrom"]["secretKeyRef"]["key"] == "api-keys", "0.0.0.0 needs an API key"


def test_gpu_resources_match_the_config_tensor_parallelism(container: dict[str, Any]) -> None:
    config = _config()
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == int(container["resources"]["requests"]["nvidia.com/gpu"])
    assert gpus == config.trt_llm.build.tensor_parallel_count
    assert config.truss.engine_builder.backend == "trtllm"


def test_pods_run_as_non_root_and_drain_within_the_grace_period(
    deployment: dict[str, Any], container: dict[str, Any]
) -> None:
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # the kubelet's grace covers the preStop pause and the whole shutdown, or it kills the pod mid-drain
    drain = ServerSettings(served_model_name="x").drain_timeout_s
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pause + longest_shutdown_s(drain)
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_service_selects_the_pods_and_targets_the_http_port(deployment: dict[str, Any]) -> None:
    service = _load("service.yaml")
    assert service["spec"]["selector"].items() <= _pod_labels(deployment).items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_pdb_selects_the_pods(deployment: dict[str, Any]) -> None:
    pdb = _load("pdb.yaml")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= _pod_labels(deployment).items()
    # probe CH: maxUnavailable 1 let a node drain evict the only replica, whose engine (on an emptyDir) then had
    # to be downloaded and built again: an outage
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]


def test_the_autoscaling_metric_is_exported_by_the_server() -> None:
    stats = EngineStats(
        num_running=0, num_waiting=0, kv_cache_usage=0.0, num_kv_blocks=0, num_free_kv_blocks=0
    )
    metrics = ServerMetrics("m", lambda: stats, lambda: 3)
    from prometheus_client import generate_latest

    assert f'{METRIC}{{model_name="m"}} 3.0' in generate_latest(metrics.registry).decode()


def test_hpa_scales_the_deployment_on_concurrency() -> None:
    hpa = _load("hpa.yaml")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "engine-builder",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    adapter_rules = yaml.safe_load((K8S_DIR / "autoscaling" / "prometheus-adapter-rules.yaml").read_text())
    (rule,) = adapter_rules["rules"]["custom"]
    assert rule["seriesQuery"].startswith(METRIC + "{")
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    config = _config()
    target = int(metric["pods"]["target"]["averageValue"])
    assert 0 < target <= config.trt_llm.build.max_batch_size
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]


def test_keda_alternative_queries_the_same_metric() -> None:
    scaled = yaml.safe_load((K8S_DIR / "autoscaling" / "keda-scaledobject.yaml").read_text())
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "engine-builder"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and METRIC in trigger["metadata"]["query"]
    assert "namespace" not in trigger["metadata"]["query"]  # probe CH: "default" alone never scaled elsewhere
