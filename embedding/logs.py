"""Logging setup and secret redaction: the one place the job's log output is configured.

:func:`configure_logging` is called once, by the CLI, before anything logs. Every module logs
through ``logging.getLogger(__name__)``; a filter on the handler masks secrets in every record,
whatever module (ours, Ray's, botocore's) emitted it. :func:`redact` does the same for values
written to run reports.

What counts as a secret: the values of the credential environment variables in
:data:`SECRET_ENV_VARS`, the password in a URL's ``user:password@``, presigned-URL signatures,
and the value of any setting whose name says it is one (``token``, ``secret``, ``password``...).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

REDACTED = "***"

SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "RAY_AUTH_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
)
# Whole name components, so that `batch_tokens` or `tokenizer_cpus` are not taken for secrets.
_SECRET_WORDS = {"secret", "password", "passwd", "token", "credential", "credentials", "apikey"}
_SECRET_PAIRS = ("api_key", "access_key", "secret_key", "private_key", "session_key")
# scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@]+:)(?P<pw>[^/\s@]+)(?=@)", re.I)
# Presigned URLs and signed query strings.
_SIGNED_QUERY = re.compile(
    r"(?P<head>[?&](?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|sig|token)=)(?P<val>[^&\s]+)",
    re.I,
)

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _env_secrets() -> list[str]:
    # Short values would mask ordinary words; real credentials are long.
    return sorted({v for k in SECRET_ENV_VARS if len(v := os.environ.get(k, "")) >= 8}, key=len, reverse=True)


def redact_text(text: str) -> str:
    """``text`` with credential values, URL passwords and URL signatures masked."""
    for secret in _env_secrets():
        text = text.replace(secret, REDACTED)
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)
    return _SIGNED_QUERY.sub(lambda m: m.group("head") + REDACTED, text)


def is_secret_name(name: str) -> bool:
    """Whether a setting called ``name`` holds a secret (``auth_token``, ``aws_secret_access_key``)."""
    norm = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return bool(_SECRET_WORDS & set(norm.split("_"))) or any(pair in norm for pair in _SECRET_PAIRS)


def redact(value: Any, name: str = "") -> Any:
    """A copy of ``value`` (settings: dicts, lists, scalars) safe to write to a report or log.

    A mapping entry whose key names a secret is masked whole; strings anywhere are passed
    through :func:`redact_text`.
    """
    if name and is_secret_name(name) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's final message (arguments merged) and its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def error_line(e: BaseException, limit: int | None = None) -> str:
    """``Type: first line of the message``, cut at ``limit`` characters: an error in one line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:limit]


def configure_logging(level: str = "INFO", stream=None) -> logging.Handler:
    """Route every logger to one stderr handler with :class:`RedactingFilter`. Idempotent.

    Noisy third-party loggers are held at WARNING so that INFO shows the job's own progress.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_embedding_job", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RedactingFilter())
    handler._embedding_job = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "filelock", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return handler
