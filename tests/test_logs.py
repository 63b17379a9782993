"""One logging configuration point, and secrets kept out of logs, reports and failure lines."""

from __future__ import annotations

import io
import logging

import pytest

from embedding.config import JobConfig
from embedding.logs import REDACTED, configure_logging, is_secret_name, redact, redact_text

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def test_env_credentials_url_passwords_and_signatures_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    text = (
        f"boto said {SECRET}; minio at http://admin:hunter22@minio:9000/b; "
        "get https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA123&X-Amz-Signature=abcdef0123&x=1"
    )
    clean = redact_text(text)
    assert SECRET not in clean and "hunter22" not in clean and "abcdef0123" not in clean and "AKIA123" not in clean
    assert "http://admin:***@minio:9000/b" in clean and "&x=1" in clean


def test_setting_names_that_hold_secrets_are_masked_and_others_kept() -> None:
    for name in ("auth_token", "aws_secret_access_key", "password", "api_key", "RAY_AUTH_TOKEN", "hf-token"):
        assert is_secret_name(name), name
    for name in ("batch_tokens", "tokenizer_cpus", "tokenizer_actors", "keep_columns", "id_column"):
        assert not is_secret_name(name), name
    assert redact({"hf_token": "hf_abcdefgh", "batch_tokens": 4096, "inputs": ["s3://u:pw12345@h/x"]}) == {
        "hf_token": REDACTED,
        "batch_tokens": 4096,
        "inputs": ["s3://u:***@h/x"],
    }


def test_report_settings_are_redacted() -> None:
    config = JobConfig(inputs=("http://reader:s3cr3t-pass@host/corpus/",), output="/tmp/out", batch_tokens=8192)
    settings = config.to_dict()
    assert settings["inputs"] == ["http://reader:***@host/corpus/"]
    assert settings["batch_tokens"] == 8192 and settings["tokenizer_cpus"] == 0.5


def test_configure_logging_is_one_handler_that_redacts_every_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FQoGZXIvYXdzEXAMPLESESSIONTOKEN")
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        stream = io.StringIO()
        configure_logging("INFO", stream=stream)
        configure_logging("INFO", stream=stream)  # idempotent: still one handler of ours
        assert sum(getattr(h, "_embedding_job", False) for h in root.handlers) == 1
        logging.getLogger("some.library").warning("token is %s", "FQoGZXIvYXdzEXAMPLESESSIONTOKEN")
        try:
            raise RuntimeError("failed with FQoGZXIvYXdzEXAMPLESESSIONTOKEN")
        except RuntimeError:
            logging.getLogger("embedding.x").exception("boom")
        logging.getLogger("embedding.x").debug("not shown at INFO")
        out = stream.getvalue()
        assert "FQoGZXIvYXdzEXAMPLESESSIONTOKEN" not in out
        assert out.count(REDACTED) == 3 and "boom" in out and "not shown" not in out
        assert "WARNING some.library: token is ***" in out
    finally:
        for h in list(root.handlers):
            if getattr(h, "_embedding_job", False):
                root.removeHandler(h)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
