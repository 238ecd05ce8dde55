"""Manifest values a field's type cannot check: protocols, secrets in URLs, NULs, size."""

from __future__ import annotations

import re
from typing import Any


def check_protocols(url: str) -> str:
    """`url` unchanged if fsspec knows each of its protocols (`s3://`, `simplecache::s3://`)."""
    import fsspec

    known = fsspec.available_protocols()
    for part in url.split("::"):
        proto, _ = fsspec.core.split_protocol(part)
        if proto and proto.lower() not in known:
            raise ValueError(
                f"unknown storage protocol {proto + '://'!r}; use a local path or one of "
                "fsspec's (file, s3, gs, az, hf, http, memory, ...)"
            )
    return url


# Query parameters that carry a secret: signed URLs of S3, GCS and Azure, and API tokens.
_SECRET_PARAMS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "awsaccesskeyid",
        "signature",
        "x-goog-signature",
        "x-goog-credential",
        "googleaccessid",
        "sig",
        "access_token",
        "token",
        "api_key",
        "apikey",
        "password",
        "secret",
        "client_secret",
    }
)
CREDENTIALS_HELP = (
    "dgaug saves the manifest in OUTPUT/_dgaug/manifest.yaml and writes paths into markers and "
    "logs, so give credentials through the environment instead, where fsspec finds them "
    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or AWS_PROFILE for s3://, "
    "GOOGLE_APPLICATION_CREDENTIALS for gs://, AZURE_STORAGE_CONNECTION_STRING for az://)"
)


_USER_PASSWORD = re.compile(r"://[^/?#@\s]*:[^/?#@\s]*@")
_QUERY_NAME = re.compile(r"[?&;]\s*([^=&;#?]+?)\s*=")


def url_secret(value: str) -> str | None:
    """What secret a URL carries ('a password', 'a X-Amz-Signature query parameter'), or None.

    Read with patterns rather than a URL parser, so that a malformed URL is read too.
    """
    if "://" not in value:
        return None
    if _USER_PASSWORD.search(value):
        return "a password (user:password@)"
    for name in _QUERY_NAME.findall(value):
        if name.lower() in _SECRET_PARAMS:
            return f"a {name} query parameter"
    return None


def value_problems(data: Any, path: tuple[Any, ...] = ()) -> list[str]:
    """Problems of single values that the schema cannot see: NUL characters and lone surrogates
    (no path or name can hold them) and credentials written into a URL, in any field."""
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in value_problems(v, (*path, k))]
    if isinstance(data, list):
        return [p for i, v in enumerate(data) for p in value_problems(v, (*path, i))]
    if not isinstance(data, str):
        return []
    where = join_loc(path)
    if "\x00" in data:
        return [f"{where}: must not contain a NUL character"]
    try:
        data.encode("utf-8")
    except UnicodeEncodeError:
        return [f"{where}: is not valid text (it holds a lone surrogate)"]
    secret = url_secret(data)
    if secret:
        return [f"{where}: holds credentials ({secret}): {CREDENTIALS_HELP}"]
    return []


# A manifest is a few hundred values. The bounds keep a hostile file (YAML aliases reused a
# billion times, thousands of nested brackets) from hanging validation, which walks every use.
MAX_VALUES = 100_000
MAX_DEPTH = 64


def size_problem(data: Any) -> str | None:
    """A problem line if `data` holds more than MAX_VALUES values (an alias counts at each use)
    or nests deeper than MAX_DEPTH; stops walking as soon as either bound is passed."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            return f"(manifest): too large: more than {MAX_VALUES} values (YAML aliases count at each use)"
        if depth > MAX_DEPTH:
            return f"(manifest): nested deeper than {MAX_DEPTH} levels"
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            stack.extend((k, depth + 1) for k in node)
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)
    return None


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


def join_loc(parts: Any) -> str:
    """A field path for messages: `stages.download.threads`; odd keys quoted (`custom.'a:b'`)."""
    shown = [str(p) if _PLAIN_KEY.fullmatch(str(p)) else repr(p) for p in parts]
    return ".".join(shown) if shown else "(manifest)"
