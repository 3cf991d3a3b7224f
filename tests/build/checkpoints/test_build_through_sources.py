"""`engine-builder build` (the CLI, in a subprocess) fetches the same MiniLM through S3, GCS, Azure and REMOTE_URL.

Credentials reach the build only as secrets (an environment variable named by `runtime_secret_name`);
the emulators are the ones the source tests start. The engine's weights must be byte-identical to MiniLM's.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.build.checkpoints.conftest import MINILM_PREFIX
from tests.build.checkpoints.factory import tar_folder
from tests.conftest import REPO_ROOT
from tests.emulators.processes import AZURITE_ACCOUNT, AZURITE_KEY

pytestmark = pytest.mark.emulator


def _build(tmp_path: Path, repository: dict[str, Any], env: dict[str, str], secret: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model_name": "minilm", "trt_llm": {"build": {"base_model": "encoder_bert", "checkpoint_repository": repository}}}
        )
    )
    engine = tmp_path / "engine"
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "AZURE_", "STORAGE_EMULATOR"))
    }
    environment.update(
        ENGINE_BUILDER_CACHE=str(tmp_path / "cache"), ENGINE_BUILDER_SECRETS_DIR=str(tmp_path / "no-secrets"),
        AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), **env,
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "engine_builder.cli", "build", str(config), "-o", str(engine)],
        capture_output=True, text=True, cwd=REPO_ROOT, env=environment, timeout=300,
    )  # fmt: skip
    assert secret not in result.stdout + result.stderr
    return result, engine


def _assert_minilm(engine: Path, minilm_dir: Path, source: str) -> None:
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["source"]["source"] == source and manifest["architecture"] == "BertModel"
    expected = hashlib.sha256((minilm_dir / "model.safetensors").read_bytes()).hexdigest()
    assert hashlib.sha256((engine / "model" / "model.safetensors").read_bytes()).hexdigest() == expected
    assert manifest["source"]["files"]["model.safetensors"] == expected
    assert (engine / "model" / "1_Pooling" / "config.json").is_file()


def test_build_from_s3(moto_s3: dict[str, Any], minilm_dir: Path, tmp_path: Path) -> None:
    repository = {"source": "S3", "repo": f"s3://checkpoints/{MINILM_PREFIX}", "runtime_secret_name": "aws_json"}
    result, engine = _build(tmp_path, repository, {"AWS_ENDPOINT_URL": moto_s3["endpoint"], "aws_json": moto_s3["secret"]}, moto_s3["secret_access_key"])
    assert result.returncode == 0, result.stderr
    _assert_minilm(engine, minilm_dir, "S3")
    wrong = json.loads(moto_s3["secret"]) | {"secret_access_key": "not-the-key-at-all"}
    failed, _ = _build(tmp_path / "wrong", repository, {"AWS_ENDPOINT_URL": moto_s3["endpoint"], "aws_json": json.dumps(wrong)}, "not-the-key-at-all")
    assert failed.returncode != 0 and "error:" in failed.stderr
    assert not (tmp_path / "wrong" / "engine").exists()


def test_build_from_gcs(gcs_emulator: Any, minilm_dir: Path, tmp_path: Path) -> None:
    repository = {"source": "GCS", "repo": f"gs://checkpoints/{MINILM_PREFIX}", "runtime_secret_name": "gcs_json"}
    # The emulator takes anonymous access; an empty service-account secret means "no credentials".
    result, engine = _build(tmp_path, repository, {"STORAGE_EMULATOR_HOST": gcs_emulator.url}, "unused-secret-value")
    assert result.returncode == 0, result.stderr
    _assert_minilm(engine, minilm_dir, "GCS")


def test_build_from_azure(azurite: Any, minilm_dir: Path, tmp_path: Path) -> None:
    account = AZURITE_ACCOUNT
    endpoint_only = f"DefaultEndpointsProtocol=http;AccountName={account};BlobEndpoint=http://127.0.0.1:{azurite.port}/{account};"
    repository = {
        "source": "AZURE", "repo": f"https://{account}.blob.core.windows.net/checkpoints/{MINILM_PREFIX}",
        "runtime_secret_name": "azure_json",
    }  # fmt: skip
    env = {"AZURE_STORAGE_CONNECTION_STRING": endpoint_only, "azure_json": json.dumps({"account_key": AZURITE_KEY})}
    result, engine = _build(tmp_path, repository, env, AZURITE_KEY)
    assert result.returncode == 0, result.stderr
    _assert_minilm(engine, minilm_dir, "AZURE")


def test_build_from_remote_url(http_server: Any, minilm_dir: Path, tmp_path: Path) -> None:
    http_server.add_file("/build/minilm.tar.gz", tar_folder(minilm_dir, top="all-MiniLM-L6-v2"))
    repository = {"source": "REMOTE_URL", "repo": f"{http_server.url}/build/minilm.tar.gz?X-Amz-Signature=presigned-secret-123"}
    result, engine = _build(tmp_path, repository, {}, "presigned-secret-123")
    assert result.returncode == 0, result.stderr
    _assert_minilm(engine, minilm_dir, "REMOTE_URL")
    assert "presigned-secret-123" not in (engine / "manifest.json").read_text()
    assert "presigned-secret-123" not in (engine / "config.yaml").read_text()
