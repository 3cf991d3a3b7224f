"""S3, GCS and AZURE without `runtime_secret_name` read Truss's default name, hf_access_token, which Baseten's
examples declare for an HF token: a value there that is no storage credential means "no storage secret" (a public
bucket reads anonymously), and errors about a secret found under the default say that the name was the default."""

import logging

import pytest

from engine_builder.build.checkpoints import CheckpointAuthError, Secrets
from engine_builder.build.checkpoints.registry import source_class
from engine_builder.build.config import CheckpointRepository

HF_TOKEN = "hf_NOTaSTORAGEsecret0123456789"
REPOS = {"S3": "s3://bucket/model", "GCS": "gs://bucket/model", "AZURE": "https://acct.blob.core.windows.net/c/model"}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # GCS: an anonymous client, no metadata lookup


@pytest.mark.parametrize("source", sorted(REPOS))
def test_an_hf_token_under_the_default_name_is_no_storage_secret(
    source: str, caplog: pytest.LogCaptureFixture
) -> None:
    repository = CheckpointRepository(source=source, repo=REPOS[source])
    with caplog.at_level(logging.WARNING):
        source_class(source)(repository, Secrets({"hf_access_token": HF_TOKEN}), None)
    assert "runtime_secret_name is unset" in caplog.text and HF_TOKEN not in caplog.text


@pytest.mark.parametrize("source", sorted(REPOS))
def test_a_named_secret_that_is_not_json_is_still_refused(source: str) -> None:
    repository = CheckpointRepository(source=source, repo=REPOS[source], runtime_secret_name="hf_access_token")
    with pytest.raises(CheckpointAuthError, match="secret 'hf_access_token' is not a JSON object") as error:
        source_class(source)(repository, Secrets({"hf_access_token": HF_TOKEN}), None)
    assert "unset" not in str(error.value)


@pytest.mark.parametrize("source", sorted(REPOS))
def test_a_bad_storage_secret_under_the_default_name_says_the_name_was_the_default(source: str) -> None:
    repository = CheckpointRepository(source=source, repo=REPOS[source])
    with pytest.raises(CheckpointAuthError, match="hf_access_token.*runtime_secret_name is unset"):
        source_class(source)(repository, Secrets({"hf_access_token": '{"region": "us-east-1"}'}), None)
