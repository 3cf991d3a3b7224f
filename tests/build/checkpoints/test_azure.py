"""AZURE against Azurite (installed from npm by tests/emulators/install.sh). The repo is the public-cloud URL;
AZURE_STORAGE_CONNECTION_STRING redirects the endpoint to the emulator, as it would to a sovereign cloud."""

import hashlib
import json
import logging
from pathlib import Path

import pytest

from engine_builder.build.checkpoints import (
    CheckpointAuthError,
    CheckpointDownloadError,
    CheckpointNotFoundError,
    Secrets,
    fetch_checkpoint,
)
from engine_builder.build.checkpoints.errors import CheckpointChangedError
from engine_builder.build.checkpoints.sources.azure import AzureSource, parse_azure_url, split_sas
from engine_builder.build.config import BaseModelKind, CheckpointRepository
from tests.build.checkpoints.conftest import (
    MINILM_PREFIX,
    StalledEndpoint,
    assert_secret_absent,
    snapshot_dirs,
)
from tests.build.checkpoints.factory import make_checkpoint, replace_after_listing, tear_weights_partial
from tests.emulators.processes import AZURITE_ACCOUNT, AZURITE_KEY, Emulator

pytestmark = pytest.mark.emulator
ENDPOINT_ONLY = (
    "DefaultEndpointsProtocol=http;AccountName={account};BlobEndpoint=http://127.0.0.1:{port}/{account};"
)


@pytest.fixture
def azure(azurite: Emulator, monkeypatch: pytest.MonkeyPatch) -> Emulator:
    # Endpoint only: the key must come from the secret.
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", ENDPOINT_ONLY.format(account=AZURITE_ACCOUNT, port=azurite.port)
    )
    return azurite


def repository(prefix: str, container: str = "checkpoints") -> CheckpointRepository:
    url = f"https://{AZURITE_ACCOUNT}.blob.core.windows.net/{container}/{prefix}"
    return CheckpointRepository(source="AZURE", repo=url, runtime_secret_name="azure_secret")


def test_url_spellings() -> None:
    expected = ("acct", "models", "llama/8b/")
    assert parse_azure_url("https://acct.blob.core.windows.net/models/llama/8b") == expected
    assert parse_azure_url("azure://acct/models/llama/8b/") == expected
    with pytest.raises(CheckpointNotFoundError, match="ACCOUNT.blob.core.windows.net"):
        parse_azure_url("https://example.com/models/llama")


def test_a_percent_encoded_https_url_is_decoded() -> None:
    """Probe HG #3: the portal's `my%20model` was listed as `my%20model/`, which the SDK then encoded again."""
    base = "https://acct.blob.core.windows.net/ckpts"
    assert parse_azure_url(f"{base}/my%20model/r%C3%A9v") == ("acct", "ckpts", "my model/rév/")
    assert parse_azure_url(f"{base}/my model") == ("acct", "ckpts", "my model/")
    assert parse_azure_url(f"{base}/a+b/100%25") == ("acct", "ckpts", "a+b/100%/")


def test_hash_and_question_mark_are_part_of_an_azure_blob_name() -> None:
    """Probe HG #2: `azure://acct/ckpts/exp#2/smol` listed `exp/`. Only a `?` that starts a SAS (sig=) is a query."""
    assert parse_azure_url("azure://acct/ckpts/exp#2/smol") == ("acct", "ckpts", "exp#2/smol/")
    assert parse_azure_url("azure://acct/ckpts/exp?v=2/smol") == ("acct", "ckpts", "exp?v=2/smol/")
    assert parse_azure_url("azure://acct/ckpts/exp#2/smol?sv=2022&sp=rl&sig=abc%3D") == ("acct", "ckpts", "exp#2/smol/")
    assert split_sas("azure://acct/ckpts/run?v=2/m?sp=rl&sig=x") == ("azure://acct/ckpts/run?v=2/m", "sp=rl&sig=x")
    assert split_sas("azure://acct/ckpts/run?v=2/m") == ("azure://acct/ckpts/run?v=2/m", "")
    assert split_sas("https://acct.blob.core.windows.net/c/m?sp=rl&sig=x") == (
        "https://acct.blob.core.windows.net/c/m", "sp=rl&sig=x"
    )


def test_minilm_with_account_key(azure: Emulator, minilm_dir: Path, cache_dir: Path) -> None:
    secrets = Secrets({"azure_secret": json.dumps({"account_key": AZURITE_KEY})})
    fetched = fetch_checkpoint(repository(MINILM_PREFIX), cache_dir=cache_dir, secrets=secrets, progress=False,
                               base_model=BaseModelKind.ENCODER_BERT)  # fmt: skip
    expected = hashlib.sha256((minilm_dir / "model.safetensors").read_bytes()).hexdigest()
    assert fetched.files["model.safetensors"] == expected
    assert (fetched.path / "modules.json").read_bytes() == (minilm_dir / "modules.json").read_bytes()


def test_wrong_key_is_an_auth_error_and_never_leaks(
    azure: Emulator, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong_key = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXk="
    caplog.set_level(logging.DEBUG)
    with pytest.raises(CheckpointAuthError, match=r"access refused.*azure_secret") as raised:
        fetch_checkpoint(repository(MINILM_PREFIX), cache_dir=cache_dir,
                         secrets=Secrets({"azure_secret": json.dumps({"account_key": wrong_key})}), progress=False)  # fmt: skip
    assert_secret_absent(wrong_key, str(raised.value), caplog.text)
    assert snapshot_dirs(cache_dir) == []


def test_missing_container_or_prefix(azure: Emulator, cache_dir: Path) -> None:
    secrets = Secrets({"azure_secret": json.dumps({"account_key": AZURITE_KEY})})
    for target in (repository("no/such/model"), repository("model", container="absent")):
        with pytest.raises(CheckpointNotFoundError):
            fetch_checkpoint(target, cache_dir=cache_dir, secrets=secrets, progress=False)


def test_connection_string_secret(azurite: Emulator, minilm_dir: Path) -> None:
    """A full connection string in the secret carries both the endpoint and the key."""
    source = AzureSource(
        repository(MINILM_PREFIX), Secrets({"azure_secret": azurite.extra["connection_string"]}), None
    )
    listed = {file.path: file.size for file in source.list_files().files}
    assert listed["model.safetensors"] == (minilm_dir / "model.safetensors").stat().st_size

    received = bytearray()

    class Collect:
        def write(self, chunk: bytes) -> None:
            received.extend(chunk)

        def restart(self) -> None:
            raise AssertionError("Azure honours ranges")

    vocab = next(file for file in source.list_files().files if file.path == "vocab.txt")
    source.read_into(vocab, 777, Collect())
    assert bytes(received) == (minilm_dir / "vocab.txt").read_bytes()[777:]


def test_a_blob_replaced_after_the_listing_fails_at_once_asking_for_a_rerun(
    azure: Emulator, azurite: Emulator, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Azure answers 412 to the listed etag: every retry failed the same way, and the error blamed the network
    (probe BB #5)."""
    from azure.storage.blob import BlobServiceClient

    monkeypatch.setenv("ENGINE_BUILDER_DOWNLOAD_ATTEMPTS", "5")
    container = BlobServiceClient.from_connection_string(azurite.extra["connection_string"]).get_container_client(
        "checkpoints"
    )
    folder = make_checkpoint(tmp_path / "m", "embedding")
    for file in folder.rglob("*"):
        if file.is_file():
            container.upload_blob(f"swap/m/{file.relative_to(folder).as_posix()}", file.read_bytes(), overwrite=True)
    reads = replace_after_listing(
        monkeypatch,
        AzureSource,
        lambda: container.upload_blob("swap/m/model.safetensors", b"new version" * 100, overwrite=True),
    )
    secrets = Secrets({"azure_secret": json.dumps({"account_key": AZURITE_KEY})})
    with pytest.raises(CheckpointChangedError, match="changed since the build listed it; run the build again"):
        fetch_checkpoint(repository("swap/m"), cache_dir=cache_dir, secrets=secrets, progress=False)
    assert reads.count("model.safetensors") == 1


def _sas_repository(expiry_hours: float) -> CheckpointRepository:
    from datetime import UTC, datetime, timedelta

    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    sas = generate_container_sas(
        AZURITE_ACCOUNT, "checkpoints", account_key=AZURITE_KEY,
        permission=ContainerSasPermissions(read=True, list=True),
        expiry=datetime.now(UTC) + timedelta(hours=expiry_hours),
    )  # fmt: skip
    return CheckpointRepository(source="AZURE", repo=f"{repository(MINILM_PREFIX).repo}?{sas}")


def test_a_sas_url_as_repo_is_the_credential(
    azure: Emulator, minilm_dir: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The portal's SAS URL as repo: its query was dropped and the read went out anonymous, refused with advice to
    set an account_key (probe BB #6). The signature stays out of logs and messages."""
    caplog.set_level(logging.DEBUG)
    sas_repository = _sas_repository(1)
    signature = sas_repository.repo.split("sig=")[1].split("&")[0]
    fetched = fetch_checkpoint(sas_repository, cache_dir=cache_dir, secrets=Secrets(), progress=False,
                               base_model=BaseModelKind.ENCODER_BERT)  # fmt: skip
    expected = hashlib.sha256((minilm_dir / "model.safetensors").read_bytes()).hexdigest()
    assert fetched.files["model.safetensors"] == expected
    assert_secret_absent(signature, caplog.text)
    expired = _sas_repository(-1)
    with pytest.raises(CheckpointAuthError, match="the SAS in repo has expired") as raised:
        fetch_checkpoint(expired, cache_dir=cache_dir, secrets=Secrets(), progress=False)
    assert_secret_absent(expired.repo.split("sig=")[1].split("&")[0], str(raised.value))


def test_a_new_sas_in_an_azure_scheme_repo_keeps_the_cache(
    azure: Emulator, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Probe HG #4: the SAS of `azure://ACCOUNT/CONTAINER/path?<SAS>` was part of the cache key, so the new token
    that replaces an expired one downloaded everything again (and orphaned the partial downloads)."""
    spelled = f"azure://{AZURITE_ACCOUNT}/checkpoints/{MINILM_PREFIX}"
    first, second = (
        CheckpointRepository(source="AZURE", repo=f"{spelled}?{_sas_repository(hours).repo.split('?', 1)[1]}")
        for hours in (1, 2)
    )
    assert first.repo != second.repo
    fetch_checkpoint(first, cache_dir=cache_dir, secrets=Secrets(), progress=False)
    caplog.set_level(logging.INFO)
    fetch_checkpoint(second, cache_dir=cache_dir, secrets=Secrets(), progress=False)
    assert "reusing cached snapshot" in caplog.text
    assert len([path for path in snapshot_dirs(cache_dir) if path.is_dir()]) == 1


def test_a_sas_secret_that_is_refused_gets_sas_advice_and_a_bare_one_is_accepted(
    azure: Emulator, cache_dir: Path
) -> None:
    """Probe HG #6: an expired SAS in the secret was told to put an account_key there; a bare SAS was refused."""
    valid = _sas_repository(1).repo.split("?", 1)[1]
    fetched = fetch_checkpoint(repository(MINILM_PREFIX), cache_dir=cache_dir, secrets=Secrets({"azure_secret": valid}),
                               progress=False)  # fmt: skip
    assert "model.safetensors" in fetched.files
    expired = _sas_repository(-1).repo.split("?", 1)[1]
    for secret in (expired, json.dumps({"sas_token": expired})):
        with pytest.raises(CheckpointAuthError, match=r"the SAS in secret 'azure_secret'.*has expired") as raised:
            fetch_checkpoint(repository("models/other"), cache_dir=cache_dir,
                             secrets=Secrets({"azure_secret": secret}), progress=False)  # fmt: skip
        assert str(raised.value).index("generate a new one") < str(raised.value).index("account_key")


def test_a_query_that_is_no_sas_is_refused_up_front(azure: Emulator, cache_dir: Path) -> None:
    query_repository = CheckpointRepository(source="AZURE", repo=f"{repository(MINILM_PREFIX).repo}?comp=list")
    with pytest.raises(CheckpointAuthError, match=r"not a SAS \(no sig=\)"):
        fetch_checkpoint(query_repository, cache_dir=cache_dir, secrets=Secrets(), progress=False)


def test_a_stalled_endpoint_fails_after_one_read_timeout_per_attempt(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, stalled_endpoint: StalledEndpoint
) -> None:
    """A store that accepts and never answers: the SDK's 300 s timeouts and 10 retries sat inside each of the
    download engine's attempts. Now each attempt is one request of READ_TIMEOUT_S."""
    from engine_builder.build.checkpoints.sources import azure as azure_module

    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", f"DefaultEndpointsProtocol=http;BlobEndpoint={stalled_endpoint.url}/acct;"
    )
    monkeypatch.setenv("ENGINE_BUILDER_DOWNLOAD_ATTEMPTS", "1")
    monkeypatch.setattr(azure_module, "READ_TIMEOUT_S", 1.0)
    secrets = Secrets({"azure_secret": json.dumps({"account_key": AZURITE_KEY})})
    error, seconds = stalled_endpoint.fetch_error(
        lambda: fetch_checkpoint(repository("m"), cache_dir=cache_dir, secrets=secrets, progress=False)
    )
    assert seconds < 10 and len(stalled_endpoint.accepted) == 1
    assert isinstance(error, CheckpointDownloadError) and "timed out" in str(error).lower()


def test_a_torn_partial_file_is_caught_by_the_content_md5_and_downloaded_again(
    azure: Emulator, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe HG #1: a resumed download was committed on its size alone, so a partial file with a zero-filled stretch
    (a crash before the final fsync) became the cached weights. A single-put blob's Content-MD5 now covers it."""
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(azure.extra["connection_string"])
    container = service.get_container_client("checkpoints")
    folder = make_checkpoint(tmp_path / "m", "embedding")
    for file in (path for path in folder.rglob("*") if path.is_file()):
        container.upload_blob(f"torn/m/{file.relative_to(folder)}", file.read_bytes())
    weights = (folder / "model.safetensors").read_bytes()
    secrets = Secrets({"azure_secret": json.dumps({"account_key": AZURITE_KEY})})
    listed = {file.path: file for file in AzureSource(repository("torn/m"), secrets, None).list_files().files}
    assert listed["model.safetensors"].md5 == hashlib.md5(weights).hexdigest()

    def fetch() -> object:
        return fetch_checkpoint(repository("torn/m"), cache_dir=cache_dir, progress=False, secrets=secrets)

    tear_weights_partial(monkeypatch, AzureSource, fetch, cache_dir)
    fetched = fetch_checkpoint(repository("torn/m"), cache_dir=cache_dir, progress=False, secrets=secrets)
    assert fetched.files["model.safetensors"] == hashlib.sha256(weights).hexdigest()
    assert (fetched.path / "model.safetensors").read_bytes() == weights


def test_a_folder_with_a_space_builds_from_its_portal_url(azure: Emulator, cache_dir: Path, tmp_path: Path) -> None:
    from azure.storage.blob import BlobServiceClient

    container = BlobServiceClient.from_connection_string(azure.extra["connection_string"]).get_container_client(
        "checkpoints"
    )
    folder = make_checkpoint(tmp_path / "m", "embedding")
    for file in (path for path in folder.rglob("*") if path.is_file()):
        container.upload_blob(f"my model/{file.relative_to(folder)}", file.read_bytes())
    secrets = Secrets({"azure_secret": json.dumps({"account_key": AZURITE_KEY})})
    fetched = fetch_checkpoint(repository("my%20model"), cache_dir=cache_dir, progress=False, secrets=secrets)
    weights = (folder / "model.safetensors").read_bytes()
    assert fetched.files["model.safetensors"] == hashlib.sha256(weights).hexdigest()
