"""Credentials kept out of what the project writes for people to read: log lines, and the copy of the config an
engine folder keeps."""

import re

# A second guard for any line that still shows a credential-bearing header or query parameter.
_CREDENTIAL_HEADER = re.compile(
    r"(?i)(['\"]?\b(?:authorization|proxy-authorization|x-amz-security-token|x-api-key|api-key|x-ms-encryption-key)"
    r"['\"]?\s*[:=]\s*(?:b?['\"])?)[^'\"\r\n]+"
)
_CREDENTIAL_PARAMETER = re.compile(
    r"(?i)\b(x-amz-security-token|x-amz-credential|x-amz-signature|x-goog-credential|x-goog-signature|sig|signature"
    r"|credential|token|access_token|api_key|apikey|key|password)=[^&\s'\",]+"
)


# A URL's user info (`https://user:token@host`, as pip index URLs carry it)
_USER_INFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@")


def redact_credentials(text: str) -> str:
    """`text` with the values of credential-looking headers and query parameters replaced by ***, and URLs' user
    info by ***@."""
    text = _CREDENTIAL_HEADER.sub(r"\1***", text)
    text = _USER_INFO.sub(r"\1***@", text)
    return _CREDENTIAL_PARAMETER.sub(r"\1=***", text)
