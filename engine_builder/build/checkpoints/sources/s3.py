"""S3: `s3://bucket/prefix` through boto3. Credentials come from the JSON secret
`{access_key_id, secret_access_key, region}`, else boto3's own chain, else anonymous (public buckets).
`AWS_ENDPOINT_URL` (honoured by botocore) points it at an S3-compatible store or an emulator."""

import logging
from typing import Any

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from engine_builder.build.checkpoints.errors import (
    CheckpointAuthError,
    CheckpointChangedError,
    CheckpointDownloadError,
    CheckpointError,
    CheckpointNotFoundError,
)
from engine_builder.build.checkpoints.http_range import CHUNK_BYTES
from engine_builder.build.checkpoints.secrets import S3Credentials
from engine_builder.build.checkpoints.source import ByteSink, CheckpointSourceBase, Listing, RemoteFile
from engine_builder.build.checkpoints.sources.object_store import (
    CONNECT_TIMEOUT_S,
    READ_TIMEOUT_S,
    parse_bucket_url,
    read_storage_secret,
    relative_key,
    secret_label,
)

logger = logging.getLogger(__name__)

AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "403",
        "401",
    }
)
NOT_FOUND_CODES = frozenset({"NoSuchBucket", "NoSuchKey", "404", "NotFound"})


class S3Source(CheckpointSourceBase):
    name = "S3"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bucket, self.prefix = parse_bucket_url(self.repository.repo, "s3", self.name)
        self._client = self._make_client()

    def _make_client(self) -> Any:
        credentials = read_storage_secret(self, S3Credentials.from_secret)
        # Pools sized for the parallel downloads. Retries are the download engine's job: the SDK's own (3 tries of
        # botocore's 60 s read timeout) inside the engine's 5 took a stalled endpoint ~15 minutes to fail (probe BB #8).
        config = Config(
            max_pool_connections=32, retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
        )
        if credentials is not None:
            session = boto3.session.Session(
                aws_access_key_id=credentials.access_key_id,
                aws_secret_access_key=credentials.secret_access_key,
                aws_session_token=credentials.session_token,
                region_name=credentials.region,
            )
        else:
            session = boto3.session.Session()
            if session.get_credentials() is None:
                logger.info(
                    "S3: no secret %r and no AWS credentials; reading anonymously", self.repository.runtime_secret_name
                )
                config = config.merge(Config(signature_version=UNSIGNED))
        region = session.region_name or "us-east-1"
        return session.client("s3", region_name=region, config=config)

    def list_files(self) -> Listing:
        files: list[RemoteFile] = []
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for item in page.get("Contents", []):
                    path = relative_key(item["Key"], self.prefix)
                    if path:
                        etag = str(item.get("ETag", "")).strip('"')
                        files.append(RemoteFile(path, int(item["Size"]), f"etag:{etag}", locator=item["Key"]))
        except (ClientError, BotoCoreError) as error:
            raise self._translate(error, f"s3://{self.bucket}/{self.prefix}") from None
        if not files:
            raise CheckpointNotFoundError(
                f"S3 {self.repository.repo}: no objects under prefix {self.prefix!r} in bucket {self.bucket}"
            )
        return Listing(files=tuple(files))

    def read_into(self, file: RemoteFile, start: int, sink: ByteSink) -> None:
        etag = file.fingerprint.removeprefix("etag:")
        request: dict[str, Any] = {"Bucket": self.bucket, "Key": file.locator}
        if etag:
            request["IfMatch"] = f'"{etag}"'  # the object changed since listing: fail, do not mix versions
        if start > 0:
            request["Range"] = f"bytes={start}-"
        try:
            response = self._client.get_object(**request)
            for chunk in response["Body"].iter_chunks(CHUNK_BYTES):
                sink.write(chunk)
        except (ClientError, BotoCoreError) as error:
            raise self._translate(error, f"s3://{self.bucket}/{file.locator}") from None

    def _translate(self, error: Exception, what: str) -> CheckpointError:
        message = self.secrets.redact(str(error))
        if isinstance(error, NoCredentialsError):
            return CheckpointAuthError(f"S3 {what}: no credentials; {self._auth_hint()}")
        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in AUTH_CODES:
                return CheckpointAuthError(f"S3 {what}: {code}: {message}; {self._auth_hint()}")
            if code in NOT_FOUND_CODES:
                return CheckpointNotFoundError(f"S3 {what}: {code}; check the bucket and prefix in repo")
            if code == "PreconditionFailed":  # IfMatch: no retry of this listing can succeed (probe BB #5)
                return CheckpointChangedError(
                    f"S3 {what}: the object changed since the build listed it; run the build again to fetch the "
                    "new version"
                )
        return CheckpointDownloadError(f"S3 {what}: {message}")

    def _auth_hint(self) -> str:
        name = self.repository.runtime_secret_name
        return (
            f"put {S3Credentials.EXPECTED} in secret {secret_label(self.repository)} ({self.secrets.where(name)}) "
            "and set checkpoint_repository.runtime_secret_name to it"
        )
