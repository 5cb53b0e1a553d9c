"""Credentials written into URLs, taken out before a text leaves the process.

A job may name a file by a URL that carries its own credentials: a user and password
(`https://user:pass@host/data.jsonl`, `s3://KEY:SECRET@bucket/...`) or a presigned query
(`?X-Amz-Credential=...&X-Amz-Signature=...`, `?AWSAccessKeyId=...&Signature=...`, a `token=` or
Azure `sig=`). kdflow reads through such URLs as given, but every text it writes somewhere
others can read goes through `redact` first: manifests, console messages and errors, MLflow
params, the compiled pipeline. The host, path and the other query parameters stay, so the URL
still says which file it was:

    redact("https://user:pw@host/f.jsonl?X-Amz-Signature=abc&v=2")
        == "https://***@host/f.jsonl?X-Amz-Signature=***&v=2"

Secrets typed as such in the config (`SecretStr` fields) never get this far: `config.public_dict`
drops them and a config error masks their value.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/?#:@'\"]*:[^\s?#'\"]*|[^\s/?#:@'\"]+)@")
"""scheme://userinfo@: a user alone (a token), or user:password, where the password runs to the
last @ before a space, query or fragment: an AWS secret key may hold a / and a password an @."""

SIGNED_QUERY_PARAMETERS = (
    "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token",  # AWS Signature V4 presigned URLs
    "Signature", "AWSAccessKeyId", "x-amz-security-token",  # AWS Signature V2
    "X-Goog-Signature", "X-Goog-Credential", "GoogleAccessId",  # Google Cloud Storage
    "sig",  # Azure shared access signatures
    "token", "access_token", "api_key", "apikey", "key", "password", "secret",
)
"""Query parameters whose value is a credential (compared without regard to case)."""

_QUERY_SECRET = re.compile(
    r"(?P<name>[?&](?:" + "|".join(re.escape(name) for name in SIGNED_QUERY_PARAMETERS) + r")=)(?P<value>[^&#\s'\"]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with the userinfo of every URL and every credential query parameter masked."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda match: f"{match['scheme']}{MASK}@", text)
    return _QUERY_SECRET.sub(lambda match: f"{match['name']}{MASK}", text)


def redact_data(value: Any) -> Any:
    """`redact` applied to every string in nested dicts, lists and tuples (keys included)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_data(key): redact_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_data(item) for item in value)
    return value
