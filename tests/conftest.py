"""Session fixtures: a tiny GLuCoSE-layout model, a real S3 server on loopback, a local Ray."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

# Before anything imports huggingface_hub: a hub lookup would retry for about 70 s.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test credentials for the loopback S3 server only; botocore reads them from the environment
# like any real deployment would, and Ray workers inherit them from this process.
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-never-logged",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
)
os.environ.pop("AWS_PROFILE", None)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "corpus"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A moto S3 server on 127.0.0.1, reached through AWS_ENDPOINT_URL as a real store would be."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A fresh bucket per test: ``s3://<name>``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{name}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight LukeModel with GLuCoSE's exact file layout (hidden 64, 2 layers)."""
    from jobs.make_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-glucose")


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str):
    """A local Ray with more logical CPUs than the 2 real ones, so actor pools cannot starve
    the read tasks. Started after the S3 endpoint is in the environment, which workers inherit."""
    import ray

    # "local": a bare ray.init() would join whatever cluster `ray start` last recorded in /tmp/ray.
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()
