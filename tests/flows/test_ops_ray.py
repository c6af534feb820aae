"""A two-node Ray cluster on this host: ingest and maintain with RAY_ADDRESS set, work placed on both nodes.

`ray start --head` and `ray start --address` (the second node marked with the custom resource
`node2`) run with `--block` in their own sessions under a private temp dir, so the test stops
exactly the processes it started (never `ray stop`, which would stop every Ray on the machine).
The head has no CPU for tasks (as on a production cluster, where the head only coordinates) and the
second node has two: every stage task must cross from the driver on the head to the second node.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import free_port

from tests.conftest import SAMPLE

RAY = str(Path(sys.executable).with_name("ray"))


def start_node(args: list[str], log: Path, hide: Path | None = None) -> subprocess.Popen:
    """`ray start --block ARGS`; with `hide`, in a mount namespace of its own where `hide` is an empty
    read-only tmpfs: the node's processes cannot see (or create) anything under it."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}  # carries the cluster's private auth token
    env.pop("RAY_ADDRESS", None)
    out = open(log, "w")  # noqa: SIM115 - the node outlives this function; closed with the process
    command = [RAY, "start", "--block", "--disable-usage-stats", *args]
    if hide is not None:
        mount = f'mount -t tmpfs -o ro,size=1m memstage-hidden {shlex.quote(str(hide))} && exec "$@"'
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh", *command]
    return subprocess.Popen(
        command,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )


def ray_node_ip() -> str:
    """The address Ray gives this host's nodes (it rewrites 127.0.0.1 to it): both nodes and the
    driver must agree on it, or the driver finds no local raylet."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray
    from ray._private.authentication_test_utils import reset_auth_token_state

    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespaces here: cannot hide the data directory from the second node")
    if ray.is_initialized():  # another test's local Ray: this module needs its own cluster
        ray.shutdown()
    # Ray 2.60 authenticates with a token, by default the shared ~/.ray/auth_token that any other
    # `ray start --head` on this machine may regenerate: this cluster and its clients use their own.
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    reset_auth_token_state()  # this process read its auth settings when ray was imported
    logs = tmp_path_factory.mktemp("ray-logs")
    # The data directories of this module's tests: the head (and the driver) see them, the second
    # node does not (no shared disk). Needs mount namespaces (root or user namespaces).
    data_root = tmp_path_factory.mktemp("head-only")
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    nodes = [
        start_node(
            [
                "--head",
                "--port",
                str(port),
                "--num-cpus",
                "0",
                "--temp-dir",
                temp,
                "--include-dashboard",
                "true",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(free_port()),
                "--dashboard-agent-listen-port",
                str(free_port()),
                "--ray-client-server-port",
                str(free_port()),
                "--resources",
                json.dumps({"head": 1}),
            ],
            logs / "head.log",
        )
    ]
    address = f"{ray_node_ip()}:{port}"
    try:
        time.sleep(5)  # the head's GCS must listen before a node can join
        nodes.append(
            start_node(
                [
                    "--address",
                    address,
                    "--num-cpus",
                    "2",
                    "--temp-dir",
                    temp,
                    "--dashboard-agent-listen-port",
                    str(free_port()),
                    "--resources",
                    json.dumps({"node2": 1}),
                ],
                logs / "node2.log",
                hide=data_root,
            )
        )
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        deadline = time.monotonic() + 180
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            if time.monotonic() > deadline or any(p.poll() is not None for p in nodes):
                raise RuntimeError(
                    "two Ray nodes did not come up: " + (logs / "node2.log").read_text()[-2000:]
                )
            time.sleep(1)
        node_ids = {
            ("node2" if "node2" in n["Resources"] else "head"): n["NodeID"] for n in ray.nodes() if n["Alive"]
        }
        ray.shutdown()  # the flows join again through flows.runtime.ensure_ray, with their runtime_env
        yield {"address": address, "nodes": node_ids, "logs": logs, "data_root": data_root}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_auth_token_state()
        # --block: on SIGTERM `ray start` stops its node's processes, but drains for up to 30 s first;
        # the cluster's data is throwaway, so its session gets SIGKILL after a short grace period
        for proc in nodes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


# About 70 s on the loaded 2-core dev machine (setup 13 s, runs 47 s, teardown 5 s): default set.
def test_ingest_and_maintain_on_two_nodes(ray_cluster, tmp_path, monkeypatch):
    import ray
    from ray.util.state import list_actors, list_tasks

    from memstage.flows.ingest import run_ingest
    from memstage.flows.stages import run_maintain
    from memstage.runtime.backends import RuntimeConfig
    from memstage.stores.store import MemoryStore

    monkeypatch.setenv("RAY_ADDRESS", ray_cluster["address"])
    config = RuntimeConfig(home=ray_cluster["data_root"] / "two-nodes", runner="ray")
    ingested = run_ingest(SAMPLE, "auto", None, config, False)
    assert ingested["runner"] == "ray" and ingested["events_new"] == 19
    report = run_maintain(None, config)
    assert report["failed"] == [], report
    assert MemoryStore(config.home).counts()["memories"] >= 19

    # a task pinned by the second node's marker runs there: the node is a real, separate raylet
    where = ray.get(
        ray.remote(lambda: ray.get_runtime_context().get_node_id()).options(resources={"node2": 1}).remote()
    )
    assert where == ray_cluster["nodes"]["node2"]

    tasks = list_tasks(filters=[("state", "=", "FINISHED")], limit=10_000, raise_on_missing_output=False)
    prefect_tasks = {t.node_id for t in tasks if t.node_id and t.type == "NORMAL_TASK"}
    # the head has no CPU for tasks: every stage task had to run on the second node
    assert prefect_tasks == {ray_cluster["nodes"]["node2"]}, (
        f"tasks ran on {prefect_tasks}, nodes {ray_cluster['nodes']}"
    )
    by_node: dict[str, dict[str, int]] = {}
    for t in tasks:
        node = next((k for k, v in ray_cluster["nodes"].items() if v == t.node_id), str(t.node_id))
        by_node.setdefault(node, {})
        by_node[node][t.name] = by_node[node].get(t.name, 0) + 1
    print("finished Ray tasks per node:", json.dumps(by_node, indent=1, sort_keys=True))
    # on a CPU cluster each worker embeds and counts tokens with models of its own, kept between its
    # tasks (flows/fanout.py): no call goes through one services actor, which serialised them
    names = {t.name for t in tasks}
    assert not any("MemoryServices" in n for n in names), names
    assert not list_actors(filters=[("class_name", "=", "MemoryServices")], raise_on_missing_output=False)
    ray.shutdown()


def _store_state(home: Path) -> dict:
    """What a maintained store holds, without what differs between two runs of the same work
    (timestamps, flow run ids, op ids, float rounding of embeddings)."""
    from memstage.stores.store import MemoryStore

    store = MemoryStore(home)
    mem = store.query(
        "SELECT id, level, text, tokens, parent, event_ids, session, speaker, version, valid_to IS NULL AS cur, "
        "superseded_by, status, flag, embedding IS NULL AS unembedded FROM memories ORDER BY id"
    ).to_pylist()
    ops = store.query(
        "SELECT stage, action, memory_id, reason, count(*) AS n FROM ops GROUP BY ALL ORDER BY ALL"
    ).to_pylist()
    indexes = store.query(
        "SELECT namespace, level, kind, version, count, fingerprint FROM index_manifest WHERE current ORDER BY ALL"
    ).to_pylist()
    runs = store.query("SELECT stage, namespace, changed, count(*) AS n FROM runs GROUP BY ALL ORDER BY ALL")
    return {"memories": mem, "ops": ops, "indexes": indexes, "runs": runs.to_pylist()}


# About 2 min on the loaded 2-core dev machine: every stage twice (cluster, then one process).
def test_every_stage_on_two_nodes_no_shared_disk_matches_one_process(ray_cluster, tmp_path, monkeypatch):
    import ray
    from ray.util.state import list_tasks
    from stage_data import ALICE, write_jsonl

    from memstage.flows import stages
    from memstage.flows.ingest import run_ingest
    from memstage.flows.stages import run_stage
    from memstage.runtime.backends import RuntimeConfig
    from memstage.tasks.registry import STAGE_NAMES

    data = write_jsonl(tmp_path / "alice.jsonl", "alice", ALICE)
    homes = {"cluster": ray_cluster["data_root"] / "cluster", "single": tmp_path / "single"}
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster["address"])
    cluster = RuntimeConfig(home=homes["cluster"], runner="ray")
    for path in (SAMPLE, data):
        run_ingest(path, "auto", None, cluster, False)
    # the index stage as over many namespaces (batches on the workers, like the other stages), which
    # must leave the store the encoder pool's path leaves in the single-process run below
    monkeypatch.setattr(stages, "INDEX_FAN_OUT_FROM", 1)
    for stage in STAGE_NAMES:
        run_stage(stage, None, cluster)
    monkeypatch.undo()
    # the second node never saw the data directory: its view of the folder is still the empty,
    # read-only tmpfs (a task that tried to open the store there would have failed its stage)
    seen = ray.get(
        ray.remote(lambda root: (sorted(os.listdir(root)), os.access(root, os.W_OK)))
        .options(resources={"node2": 1})
        .remote(str(ray_cluster["data_root"]))
    )
    assert seen == ([], False)
    assert sorted(os.listdir(ray_cluster["data_root"])) != []  # while the head sees the stores
    tasks = list_tasks(filters=[("state", "=", "FINISHED")], limit=10_000, raise_on_missing_output=False)
    ran_on = {t.node_id for t in tasks if t.type == "NORMAL_TASK" and t.name.startswith("stage")}
    assert ran_on == {ray_cluster["nodes"]["node2"]}, "the stage tasks ran on the node without the data"
    ray.shutdown()

    single = RuntimeConfig(home=homes["single"], runner="local")
    for path in (SAMPLE, data):
        run_ingest(path, "auto", None, single, False)
    for stage in STAGE_NAMES:
        run_stage(stage, None, single)
    got, want = _store_state(homes["cluster"]), _store_state(homes["single"])
    assert got["memories"] and got["ops"] and got["indexes"]
    for part in ("memories", "ops", "indexes", "runs"):
        assert got[part] == want[part], part
