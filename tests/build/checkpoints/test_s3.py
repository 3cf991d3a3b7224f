"""S3 against moto's server (IAM auth on): the real MiniLM end to end, cache reuse, and the failures."""

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from engine_builder.build.checkpoints import (
    CheckpointAuthError,
    CheckpointDownloadError,
    CheckpointLayoutError,
    CheckpointNotFoundError,
    Secrets,
    fetch_checkpoint,
)
from engine_builder.build.checkpoints.errors import CheckpointChangedError
from engine_builder.build.checkpoints.sources.s3 import S3Source
from engine_builder.build.config import BaseModelKind, CheckpointRepository
from tests.build.checkpoints.conftest import (
    MINILM_PREFIX,
    StalledEndpoint,
    assert_secret_absent,
    snapshot_dirs,
)
from tests.build.checkpoints.factory import make_checkpoint, replace_after_listing

pytestmark = pytest.mark.emulator


@pytest.fixture
def s3(moto_s3: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3["endpoint"])
    return moto_s3


def repository(prefix: str, secret_name: str = "aws_secret_json") -> CheckpointRepository:
    return CheckpointRepository(
        source="S3", repo=f"s3://checkpoints/{prefix}", runtime_secret_name=secret_name
    )


def upload(s3: dict[str, Any], folder: Path, prefix: str) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            s3["client"].upload_file(
                str(file), "checkpoints", f"{prefix}/{file.relative_to(folder).as_posix()}"
            )


def test_minilm_end_to_end_then_reused(
    s3: dict[str, Any], minilm_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = Secrets({"aws_secret_json": s3["secret"]})
    fetched = fetch_checkpoint(
        repository(MINILM_PREFIX), cache_dir=cache_dir, secrets=secrets, progress=False,
        base_model=BaseModelKind.ENCODER_BERT,
    )  # fmt: skip
    weights = minilm_dir / "model.safetensors"
    assert fetched.files["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (fetched.path / "1_Pooling" / "config.json").read_bytes() == (
        minilm_dir / "1_Pooling" / "config.json"
    ).read_bytes()
    assert "README.md" in fetched.files  # the model card: the build reads Matryoshka training from it
    assert fetched.revision and fetched.revision.startswith("sha256:")

    def no_download(*args: object) -> None:
        raise AssertionError("a rebuild must reuse the cache, not download")

    monkeypatch.setattr(S3Source, "read_into", no_download)
    again = fetch_checkpoint(repository(MINILM_PREFIX), cache_dir=cache_dir, secrets=secrets, progress=False)
    assert again == fetched


def test_wrong_key_is_an_auth_error_and_never_leaks(
    s3: dict[str, Any], cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = json.loads(s3["secret"]) | {"secret_access_key": "wrong-but-secret-0123456789"}
    secrets = Secrets({"aws_secret_json": json.dumps(wrong)})
    caplog.set_level(logging.DEBUG)
    with pytest.raises(CheckpointAuthError, match=r"SignatureDoesNotMatch.*aws_secret_json") as raised:
        fetch_checkpoint(repository(MINILM_PREFIX), cache_dir=cache_dir, secrets=secrets, progress=False)
    assert_secret_absent("wrong-but-secret-0123456789", str(raised.value), caplog.text)
    assert snapshot_dirs(cache_dir) == []


def test_unknown_access_key_is_an_auth_error(s3: dict[str, Any], cache_dir: Path) -> None:
    unknown = json.dumps({"access_key_id": "AKIANOTAREALKEY00000", "secret_access_key": "x" * 40})
    with pytest.raises(CheckpointAuthError, match="InvalidAccessKeyId"):
        fetch_checkpoint(repository(MINILM_PREFIX), cache_dir=cache_dir, secrets=Secrets({"aws_secret_json": unknown}),
                         progress=False)  # fmt: skip


@pytest.mark.parametrize("repo", ["s3://checkpoints/no/such/model", "s3://no-such-bucket/model"])
def test_missing_prefix_or_bucket(s3: dict[str, Any], cache_dir: Path, repo: str) -> None:
    secrets = Secrets({"aws_secret_json": s3["secret"]})
    target = CheckpointRepository(source="S3", repo=repo, runtime_secret_name="aws_secret_json")
    with pytest.raises(CheckpointNotFoundError):
        fetch_checkpoint(target, cache_dir=cache_dir, secrets=secrets, progress=False)


def test_bad_layout_is_refused_before_the_weights(
    s3: dict[str, Any], tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_checkpoint(tmp_path / "decoder", chat_template=False)
    upload(s3, folder, "bad/no-template")
    downloaded: list[str] = []
    original = S3Source.read_into

    def spy(self: S3Source, file: Any, start: int, sink: Any) -> None:
        downloaded.append(file.path)
        original(self, file, start, sink)

    monkeypatch.setattr(S3Source, "read_into", spy)
    secrets = Secrets({"aws_secret_json": s3["secret"]})
    with pytest.raises(CheckpointLayoutError, match="chat template"):
        fetch_checkpoint(repository("bad/no-template"), cache_dir=cache_dir, secrets=secrets, progress=False,
                         base_model=BaseModelKind.DECODER)  # fmt: skip
    assert "model.safetensors" not in downloaded and "config.json" in downloaded
    assert snapshot_dirs(cache_dir) == []


def test_prefix_above_the_checkpoint_names_config_json(s3: dict[str, Any], cache_dir: Path) -> None:
    secrets = Secrets({"aws_secret_json": s3["secret"]})
    with pytest.raises(CheckpointLayoutError, match="config.json is missing at the root"):
        fetch_checkpoint(repository("models"), cache_dir=cache_dir, secrets=secrets, progress=False)


def test_ranged_read_resumes_mid_object(s3: dict[str, Any], minilm_dir: Path) -> None:
    source = S3Source(repository(MINILM_PREFIX), Secrets({"aws_secret_json": s3["secret"]}), None)
    tokenizer = next(file for file in source.list_files().files if file.path == "tokenizer.json")

    class Collect:
        data = bytearray()

        def write(self, chunk: bytes) -> None:
            self.data += chunk

        def restart(self) -> None:
            raise AssertionError("S3 honours ranges")

    sink = Collect()
    source.read_into(tokenizer, 1000, sink)
    assert bytes(sink.data) == (minilm_dir / "tokenizer.json").read_bytes()[1000:]


def test_interrupted_fetch_resumes_from_the_partial_file(
    s3: dict[str, Any], minilm_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENGINE_BUILDER_DOWNLOAD_ATTEMPTS", "1")
    secrets = Secrets({"aws_secret_json": s3["secret"]})
    original = S3Source.read_into
    cut = {"model.safetensors": 4 << 20}

    def dying(self: S3Source, file: Any, start: int, sink: Any) -> None:
        class Cut:
            written = 0

            def write(self, chunk: bytes) -> None:
                limit = cut.get(file.path)
                if limit is not None and self.written + len(chunk) > limit:
                    raise ConnectionResetError("connection reset by peer")
                self.written += len(chunk)
                sink.write(chunk)

            def restart(self) -> None:
                sink.restart()

        original(self, file, start, Cut())

    monkeypatch.setattr(S3Source, "read_into", dying)
    with pytest.raises(CheckpointDownloadError, match="connection reset"):
        fetch_checkpoint(repository(MINILM_PREFIX), cache_dir=cache_dir, secrets=secrets, progress=False)
    assert snapshot_dirs(cache_dir) == []
    partials = list((cache_dir / "checkpoints" / "partial").glob("*.part"))
    assert [part.stat().st_size for part in partials] == [4 << 20]

    starts: list[int] = []

    def recording(self: S3Source, file: Any, start: int, sink: Any) -> None:
        starts.append(start)
        original(self, file, start, sink)

    monkeypatch.setattr(S3Source, "read_into", recording)
    fetched = fetch_checkpoint(
        repository(MINILM_PREFIX), cache_dir=cache_dir, secrets=secrets, progress=False
    )
    assert starts == [4 << 20]  # only the weights were missing, and they resumed where they stopped
    expected = hashlib.sha256((minilm_dir / "model.safetensors").read_bytes()).hexdigest()
    assert fetched.files["model.safetensors"] == expected


def test_an_object_replaced_after_the_listing_fails_at_once_asking_for_a_rerun(
    s3: dict[str, Any], tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 answers 412 PreconditionFailed to the listed ETag: every retry failed the same way, and the error blamed
    the network (probe BB #5)."""
    monkeypatch.setenv("ENGINE_BUILDER_DOWNLOAD_ATTEMPTS", "5")
    upload(s3, make_checkpoint(tmp_path / "m", "embedding"), "swap/m")
    reads = replace_after_listing(
        monkeypatch,
        S3Source,
        lambda: s3["client"].put_object(Bucket="checkpoints", Key="swap/m/model.safetensors", Body=b"new version" * 100),
    )
    with pytest.raises(CheckpointChangedError, match="changed since the build listed it; run the build again"):
        fetch_checkpoint(repository("swap/m"), cache_dir=cache_dir, progress=False,
                         secrets=Secrets({"aws_secret_json": s3["secret"]}))  # fmt: skip
    assert reads.count("model.safetensors") == 1


def test_a_stalled_endpoint_fails_after_one_read_timeout_per_attempt(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, stalled_endpoint: StalledEndpoint
) -> None:
    """An endpoint that accepts and never answers: the SDK's own retries (3 tries of a 60 s read) inside the
    download engine's 5 attempts took ~15 minutes (probe BB #8). Now each attempt is one try of READ_TIMEOUT_S."""
    from engine_builder.build.checkpoints.sources import s3 as s3_module

    monkeypatch.setenv("AWS_ENDPOINT_URL", stalled_endpoint.url)
    monkeypatch.setenv("ENGINE_BUILDER_DOWNLOAD_ATTEMPTS", "1")
    monkeypatch.setattr(s3_module, "READ_TIMEOUT_S", 1.0)
    secret = json.dumps({"access_key_id": "AKIAEXAMPLE", "secret_access_key": "x" * 40, "region": "us-east-1"})
    error, seconds = stalled_endpoint.fetch_error(
        lambda: fetch_checkpoint(repository("m", "aws"), cache_dir=cache_dir, secrets=Secrets({"aws": secret}),
                                 progress=False)  # fmt: skip
    )
    assert seconds < 10 and len(stalled_endpoint.accepted) == 1
    assert isinstance(error, CheckpointDownloadError) and "timeout" in str(error).lower()
