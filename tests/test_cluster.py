"""Running on a cluster: cluster.yaml against Ray's own schema and loader, the KubeRay
manifest, the scheduled configs, and ``ray job submit`` against a real local head with token
authentication (slow)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import jsonschema
import pytest
import yaml

from embedding.config import JobConfig
from tests.conftest import REPO, SAMPLES

CLUSTER_YAML = REPO / "cluster.yaml"
RAYJOB_YAML = REPO / "deploy" / "rayjob.yaml"
CONFIGS = REPO / "jobs" / "configs"
CREDENTIAL_PATTERNS = re.compile(r"aws_access_key_id|aws_secret_access_key|AKIA[0-9A-Z]{12}|secretKey", re.I)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# -- cluster.yaml -------------------------------------------------------------------------------


def test_cluster_yaml_validates_against_rays_schema_and_config_loader() -> None:
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(CLUSTER_YAML)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written
    prepared = prepare_config(config)  # merged with Ray's AWS defaults, as `ray up` does
    validate_config(prepared)
    assert prepared["head_node_type"] == "head" and prepared["available_node_types"]["head"]["max_workers"] == 0

    # The check can fail: a misspelt key is refused by the same loader.
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config({**config, "max_worker": 3}))


def test_cluster_yaml_has_a_cpu_head_spot_gpu_workers_iam_profiles_and_a_local_dashboard() -> None:
    config = load(CLUSTER_YAML)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must not take encoder (or any) work"
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    assert all(t["min_workers"] == 0 < t["max_workers"] <= config["max_workers"] for t in workers.values())
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in workers.values())
    for name, t in types.items():
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    assert config["provider"]["cache_stopped_nodes"] is False  # spot nodes cannot be stopped

    text = CLUSTER_YAML.read_text(encoding="utf-8")
    assert not CREDENTIAL_PATTERNS.search(text), "no keys in the cluster config: instance profiles only"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token ray start" in " ".join(commands)
    assert config["file_mounts"]["~/embedding-job"] == "."
    assert any("pip install" in c and "~/embedding-job" in c for c in config["setup_commands"])


def test_kuberay_rayjob_runs_the_nightly_config_with_token_auth_and_no_keys() -> None:
    job = load(RAYJOB_YAML)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "jobs.embed_corpus"]
    assert (REPO / entry[entry.index("--config") + 1]).is_file()
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    assert not CREDENTIAL_PATTERNS.search(RAYJOB_YAML.read_text(encoding="utf-8"))
    assert "runtimeEnvYAML" not in spec, "credentials never travel in runtime_env"


# -- scheduled configs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "overwrite", "prune"),
    [("nightly.yaml", False, False), ("backfill.yaml", True, True)],
)
def test_scheduled_configs_load_with_every_key_known(name: str, overwrite: bool, prune: bool) -> None:
    config = JobConfig.from_sources(CONFIGS / name)  # unknown keys or bad values would raise
    assert (config.overwrite, config.prune) == (overwrite, prune)
    assert config.progress == "log" and config.gpu_hour_price is not None
    assert all(uri.startswith("s3://") for uri in config.inputs) and config.output.startswith("s3://")


# -- ray job submit against a real head ---------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_pids(sid: int) -> list[int]:
    """Live processes of the session that ``ray start`` was started in: this test's head only."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if os.getsid(int(entry)) == sid and state != "Z":
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _http(url: str, token: str | None) -> int:
    """HTTP status of a GET (0 where nothing listens yet)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


class RayHead:
    """``ray start --head --block`` bound to 127.0.0.1 (dashboard and job server), free ports,
    its own temp dir and token; stopped by signalling only the processes of its own session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = uuid.uuid4().hex
        token_path = root / "auth_token"
        token_path.write_text(self.token)
        gcs, dash, agent, agent_grpc, metrics, rt_env, node_mgr, obj_mgr, client = _free_ports(9)
        self.url = f"http://127.0.0.1:{dash}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env |= {
            "RAY_AUTH_MODE": "token",  # what `ray start` does where a token exists
            "RAY_AUTH_TOKEN_PATH": str(token_path),  # this head's token, not ~/.ray/auth_token
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "HF_HUB_OFFLINE": "1",
        }
        ray = str(Path(sys.executable).parent / "ray")
        cmd = [
            ray, "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
            "--port", str(gcs), "--dashboard-port", str(dash),
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rt_env),
            "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
            "--ray-client-server-port", str(client),
            "--num-cpus", "8", "--num-gpus", "0", "--temp-dir", str(root / "ray"),
        ]  # fmt: skip
        self.log = (root / "head.log").open("w")
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 120
        # The job server answers once the head is up; a refused connection means not yet.
        while _http(f"{self.url}/api/version", self.token) != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray head did not start:\n{(root / 'head.log').read_text()[-3000:]}")
            time.sleep(1)

    def ray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = [str(Path(sys.executable).parent / "ray"), *args]
        return subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        sid = self.proc.pid
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for pid in _session_pids(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.log.close()


@pytest.fixture
def ray_head():
    root = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))  # short: Ray's socket paths
    head = RayHead(root)
    try:
        yield head
    finally:
        head.stop()
        assert not _session_pids(head.proc.pid), "processes of the test head survived"
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_runs_the_nightly_config_twice_with_token_auth(
    ray_head: RayHead, tiny_model: Path, tmp_path: Path
) -> None:
    # Token auth is on: no token and a wrong token are turned away by the job server.
    assert _http(f"{ray_head.url}/api/jobs/", None) == 401
    assert _http(f"{ray_head.url}/api/jobs/", uuid.uuid4().hex) == 403
    assert _http(f"{ray_head.url}/api/jobs/", ray_head.token) == 200

    corpus = tmp_path / "corpus"
    shutil.copytree(SAMPLES, corpus)
    out = tmp_path / "out"
    submit = [
        "job", "submit", "--address", ray_head.url, "--working-dir", ".", "--",
        "python", "-m", "jobs.embed_corpus", "--config", "jobs/configs/nightly.yaml",
        "--input", str(corpus), "--output", str(out), "--model", str(tiny_model),
        "--keep-columns", "source", "--dtype", "float32",
        "--progress-interval", "2", "--gpu-hour-price", "3.0",
    ]  # fmt: skip

    first = ray_head.ray(*submit)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    logs = first.stdout + first.stderr
    assert re.search(r"Job 'raysubmit_\w+' succeeded", logs), logs[-4000:]
    # Without a terminal the driver logs progress lines with rates, fraction and ETA.
    progress = re.findall(
        r"progress: [\d,]+ rows staged \([\d,]+ rows/s, [\d,]+ tokens/s\), \d+/5 shards done, .* ETA .*", logs
    )
    assert progress, logs[-4000:]
    assert "progress: 357 rows staged" in progress[-1] and "5/5 shards done, 100.0% done, ETA 0:00:00" in progress[-1]
    assert "357 rows embedded, 0 rejected" in logs and "GPU-hours (est. cost 0.00)" in logs
    assert "testing-secret-never-logged" not in logs  # the AWS secret the head inherited

    # Nothing travelled in runtime_env but the working dir.
    submission = re.search(r"Job '(raysubmit_\w+)' succeeded", logs).group(1)
    request = urllib.request.Request(
        f"{ray_head.url}/api/jobs/{submission}", headers={"Authorization": f"Bearer {ray_head.token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        info = json.load(response)
    assert set(info["runtime_env"]) <= {"working_dir", "_ray_commit"}, info["runtime_env"]

    # The second night: the same config skips every committed shard and embeds nothing.
    second = ray_head.ray(*submit)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    reports = sorted((out / "_runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    assert len(reports) == 2
    r1, r2 = (json.loads(p.read_text()) for p in reports)
    assert r1["status"] == r2["status"] == "succeeded"
    assert r1["shards_embedded"] == 5 and r1["rows_embedded"] == 357
    assert r2["shards_skipped"] == 5 and r2["shards_embedded"] == 0 and r2["rows_embedded"] == 0
    assert r1["gpu_hours"] == 0.0 and r1["estimated_cost"] == 0.0 and r1["gpu_hour_price"] == 3.0
    assert r1["settings"]["progress"] == "log" and r1["settings"]["inputs"] == [str(corpus)]
    assert "testing-secret-never-logged" not in reports[0].read_text()
    for key in ("faq/part-000", "news/part-000", "news/part-001", "news/part-002", "reviews/part-000"):
        assert (out / f"{key}.parquet").is_file(), key

    # A refused run: `ray job submit` says 1, `ray job status` keeps the job's own code, 2.
    refused = [*submit[: submit.index("--")], "--submission-id", "refused-1", *submit[submit.index("--") :]]
    refused[refused.index(str(corpus))] = str(tmp_path / "no-such-corpus")
    proc = ray_head.ray(*refused)
    assert proc.returncode == 1 and "embed_corpus: refused: input" in proc.stdout + proc.stderr
    status = ray_head.ray("job", "status", "--address", ray_head.url, "refused-1")
    assert "failed with exit code 2" in status.stdout + status.stderr, status.stdout + status.stderr
