"""`engine-builder -v`: the storage SDKs' debug lines (request headers with credentials) stay out of stderr, the Azure
SDK's header dumps stay out of every build, and a credential-looking header that still reaches a log is masked."""

import io
import logging
import sys
from collections.abc import Iterator

import pytest

from engine_builder import cli

TOKEN = "FwoGZXIvYXdzSESSIONTOKENsuperSECRET0123456789"
KEY_ID = "AKIAEXAMPLEEXAMPLE00"
BOTOCORE_LINE = (
    "Sending http request: <AWSPreparedRequest method=GET, headers={'User-Agent': b'Boto3', "
    f"'X-Amz-Security-Token': b'{TOKEN}', 'Authorization': b'AWS4-HMAC-SHA256 Credential={KEY_ID}/20240101/"
    "us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0123abcd'}>"
)


@pytest.fixture()
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """What `engine-builder -v` writes to stderr."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in cli._QUIET_LOGGERS}
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    cli._setup_logging(True)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, kept in levels.items():
        logging.getLogger(name).setLevel(kept)


def test_storage_sdk_debug_lines_stay_out_of_verbose_logs(stderr: io.StringIO) -> None:
    logging.getLogger("botocore.endpoint").debug(BOTOCORE_LINE)
    logging.getLogger("s3transfer.tasks").debug("task with %s", TOKEN)
    logging.getLogger("azure.core.pipeline.policies.http_logging_policy").info("Request headers: 'x-ms-date': ...")
    logging.getLogger("google.auth.transport.requests").debug("Making request: POST token")
    logging.getLogger("engine_builder.build").debug("still shown")
    err = stderr.getvalue()
    assert TOKEN not in err and KEY_ID not in err and "x-ms-date" not in err and "Making request" not in err
    assert "debug: still shown" in err


def test_a_credential_header_that_reaches_a_log_is_masked(stderr: io.StringIO) -> None:
    logging.getLogger("some.other.sdk").debug(BOTOCORE_LINE)
    logging.getLogger("some.other.sdk").debug("GET https://h/x?X-Amz-Credential=%s&X-Amz-Signature=feed", KEY_ID)
    logging.getLogger("some.other.sdk").debug("Authorization: Bearer hf_abcdefghijklmnop")
    err = stderr.getvalue()
    assert TOKEN not in err and KEY_ID not in err and "hf_abcdefghijklmnop" not in err and "0123abcd" not in err
    assert "'User-Agent': b'Boto3'" in err and "X-Amz-Signature=***" in err
