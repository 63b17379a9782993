"""Driver for test_faults.test_worker_node_lost_mid_run, in its own process (one Ray per
process): a head and two worker nodes on 127.0.0.1; a worker node is removed as soon as the
first shard is committed; the run must still complete. Writes the result as JSON to the
path given last (stdout carries the nodes' logs)."""

from __future__ import annotations

import json
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from embedding import ledger, pipeline
from embedding.config import JobConfig


def main(inputs: str, output: str, model: str, result_path: str) -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    # Most of the work lands on the two workers (the head has one CPU for the driver's tasks).
    # Every node runs on this machine; Ray 2.60 resolves 127.0.0.1 to the node's own address.
    workers = [cluster.add_node(num_cpus=3) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    removed: list[str] = []

    def remove_when_first_commit() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if ledger.read_markers(output):
                cluster.remove_node(workers[0], allow_graceful=False)
                removed.append(workers[0].node_id)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=remove_when_first_commit, daemon=True)
    killer.start()
    report = pipeline.run(
        JobConfig(
            inputs=(inputs,),
            output=output,
            model=model,
            cpus_per_actor=1,
            min_actors=2,
            max_actors=2,
            window_rows=16,
            read_chunk_rows=16,
            dtype="float32",
        )
    )
    killer.join(timeout=1)
    with open(result_path, "w") as f:
        json.dump({"removed_node": bool(removed), "rows_embedded": report.rows_embedded}, f)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
