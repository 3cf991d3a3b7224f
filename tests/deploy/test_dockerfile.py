"""The Dockerfile read as text: TensorRT-LLM base, non-root user, health check, the port the manifests use."""

import re
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()


def _instructions(name: str) -> list[str]:
    joined = DOCKERFILE.replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(name + " ")]


def test_base_image_is_nvidia_tensorrt_llm_release() -> None:
    (default,) = [arg for arg in _instructions("ARG") if arg.startswith("TRTLLM_IMAGE=")]
    assert default.startswith("TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:")
    assert _instructions("FROM") == ["${TRTLLM_IMAGE}"]


def test_runs_as_a_non_root_user_matching_the_pod_security_context() -> None:
    (user,) = _instructions("USER")
    assert user not in ("root", "0")
    uid = re.search(r"APP_UID=(\d+)", DOCKERFILE)
    assert uid is not None
    deployment = yaml.safe_load((REPO_ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid.group(1))


def test_healthcheck_probes_health_and_the_port_is_the_manifests_port() -> None:
    (healthcheck,) = _instructions("HEALTHCHECK")
    assert "http://127.0.0.1:8000/health" in healthcheck
    assert _instructions("EXPOSE") == ["8000"]
    deployment = yaml.safe_load((REPO_ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == 8000


def test_entrypoint_builds_and_serves_the_mounted_config() -> None:
    # tini first: a PID 1 ignores a signal it has no handler for (probe KF #1)
    assert _instructions("ENTRYPOINT") == ['["tini", "--", "engine-builder"]']
    assert "apt-get install -y --no-install-recommends tini" in DOCKERFILE
    (cmd,) = _instructions("CMD")
    assert cmd.startswith('["run", "/config/config.yaml"') and '"0.0.0.0"' in cmd


def test_the_command_sets_no_engine_option_the_mounted_config_would_lose() -> None:
    """Flags beat the config's `engine_builder:` section: the CMD's `--backend auto` overrode a config that chose
    `backend: torch` (say, for LoRA), so the documented `docker run` ignored it (probe AU)."""
    import json

    from engine_builder.common.options import EngineOptions

    (cmd,) = _instructions("CMD")
    flags = {word for word in json.loads(cmd) if word.startswith("--")}
    option_flags = {f"--{name.replace('_', '-')}" for name in EngineOptions.model_fields}
    assert flags and not flags & option_flags
