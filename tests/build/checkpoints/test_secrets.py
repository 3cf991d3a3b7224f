"""Secrets: lookup order, Truss's secret files, the credential shapes, and redaction."""

import json
from pathlib import Path

import pytest

from engine_builder.build.checkpoints import CheckpointAuthError, Secrets
from engine_builder.build.checkpoints.secrets import (
    AzureCredentials,
    S3Credentials,
    parse_gcs_service_account,
)
from tests.build.checkpoints.conftest import SECRET_MARKER


def test_truss_order_secret_file_then_truss_secret_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Truss's order, the one the served model.py's secrets follow: the build read the environment first and never
    TRUSS_SECRET_<name> (probe BB #7)."""
    monkeypatch.setenv("ENGINE_BUILDER_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv("hf_access_token", f"{SECRET_MARKER}-env")
    monkeypatch.setenv("TRUSS_SECRET_hf_access_token", f"{SECRET_MARKER}-truss-env")
    (tmp_path / "hf_access_token").write_text(f"  {SECRET_MARKER}-file\n")
    secrets = Secrets.from_env()
    assert secrets.get("hf_access_token") == f"{SECRET_MARKER}-file"
    (tmp_path / "hf_access_token").unlink()
    assert secrets.get("hf_access_token") == f"{SECRET_MARKER}-truss-env"
    monkeypatch.delenv("TRUSS_SECRET_hf_access_token")
    assert secrets.get("hf_access_token") == f"{SECRET_MARKER}-env"
    assert secrets.get("absent") is None
    assert secrets.get("../etc/passwd") is None  # names never reach outside the secrets folder
    assert secrets.where("x") == f"file {tmp_path / 'x'}, environment variable TRUSS_SECRET_x or x"


@pytest.mark.parametrize("places", [("file", "truss", "env"), ("truss", "env"), ("file", "env"), ("env",)])
def test_the_build_and_the_served_model_read_one_secret_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, places: tuple[str, ...]
) -> None:
    from engine_builder.serve.server.user_model_loader import UserSecrets

    monkeypatch.setenv("ENGINE_BUILDER_SECRETS_DIR", str(tmp_path))
    if "file" in places:
        (tmp_path / "aws_secret_json").write_text("from-file")
    if "truss" in places:
        monkeypatch.setenv("TRUSS_SECRET_aws_secret_json", "from-truss-env")
    monkeypatch.setenv("aws_secret_json", "from-env")
    assert Secrets.from_env().get("aws_secret_json") == UserSecrets({"aws_secret_json": None})["aws_secret_json"]


def test_empty_secret_counts_as_unset(tmp_path: Path) -> None:
    (tmp_path / "blank").write_text("\n")
    assert Secrets(secrets_dir=tmp_path).get("blank") is None


def test_redact_scrubs_values_and_json_fields(tmp_path: Path) -> None:
    value = json.dumps(
        {"access_key_id": "AKIAEXAMPLE0001", "secret_access_key": SECRET_MARKER, "region": "us-east-1"}
    )
    secrets = Secrets({"aws": value})
    assert secrets.get("aws") == value
    text = f"failed with key {SECRET_MARKER} for AKIAEXAMPLE0001 in us-east-1; raw={value!r}"
    redacted = secrets.redact(text)
    assert SECRET_MARKER not in redacted and "AKIAEXAMPLE0001" not in redacted
    assert "us-east-1" in redacted  # short, non-secret fields stay readable
    assert SECRET_MARKER not in repr(secrets)


def test_redact_catches_escaped_private_keys() -> None:
    key = f"-----BEGIN PRIVATE KEY-----\n{SECRET_MARKER}\nMIIEv\n-----END PRIVATE KEY-----\n"
    secrets = Secrets(
        {"gcs": json.dumps({"private_key": key, "client_email": "a@b.iam.gserviceaccount.com"})}
    )
    secrets.get("gcs")
    assert SECRET_MARKER not in secrets.redact(repr(key)) and SECRET_MARKER not in secrets.redact(
        json.dumps(key)
    )


def test_s3_credentials_accept_aws_spellings() -> None:
    value = json.dumps(
        {"aws_access_key_id": "AKIA1", "aws_secret_access_key": SECRET_MARKER, "aws_region": "eu-west-1"}
    )
    credentials = S3Credentials.from_secret("aws", value)
    assert (credentials.access_key_id, credentials.region) == ("AKIA1", "eu-west-1")
    assert SECRET_MARKER not in repr(credentials)


@pytest.mark.parametrize("value", [SECRET_MARKER, json.dumps({"access_key_id": "x"}), "[1, 2]"])
def test_bad_s3_secret_names_the_shape_not_the_value(value: str) -> None:
    with pytest.raises(CheckpointAuthError, match="access_key_id") as raised:
        S3Credentials.from_secret("aws_secret_json", value)
    assert SECRET_MARKER not in str(raised.value)
    assert "aws_secret_json" in str(raised.value)


def test_azure_secret_shapes() -> None:
    assert (
        AzureCredentials.from_secret("az", json.dumps({"account_key": SECRET_MARKER})).account_key
        == SECRET_MARKER
    )
    connection = f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={SECRET_MARKER};"
    assert AzureCredentials.from_secret("az", connection).connection_string == connection
    with pytest.raises(CheckpointAuthError, match="account_key"):
        AzureCredentials.from_secret("az", json.dumps({"key": SECRET_MARKER}))


def test_a_bare_sas_token_is_an_azure_secret() -> None:
    """Probe HG #6: what `az storage container generate-sas` prints was refused as "not a JSON object"."""
    sas = "se=2030-01-01&sp=rl&sv=2022-11-02&sr=c&sig=abc%2Bdef%3D"
    assert AzureCredentials.from_secret("az", sas).sas_token == sas
    assert AzureCredentials.from_secret("az", f"?{sas}\n").sas_token == sas
    # review GW: the portal's whole "Blob SAS URL" pasted as the secret was sent as the token
    url = f"https://acct.blob.core.windows.net/ckpts/model?{sas}"
    assert AzureCredentials.from_secret("az", url).sas_token == sas
    with pytest.raises(CheckpointAuthError, match=r"not a JSON object.*sas_token"):
        AzureCredentials.from_secret("az", "hf_notasas")


def test_gcs_service_account_needs_key_and_email() -> None:
    with pytest.raises(CheckpointAuthError, match="private_key"):
        parse_gcs_service_account("gcs", json.dumps({"client_email": "a@b", "private_key_id": SECRET_MARKER}))
    parsed = parse_gcs_service_account(
        "gcs", json.dumps({"client_email": "a@b", "private_key": SECRET_MARKER})
    )
    assert parsed["token_uri"].startswith("https://")
