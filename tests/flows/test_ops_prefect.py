"""Deployments against a real Prefect server: `memstage deploy`, schedules read back, a worker runs ingest.

One `prefect server start` on a free loopback port (its own PREFECT_HOME, so its database is the
test's) serves the module; it is stopped (its process group killed) when the module ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

from memstage.tasks.registry import STAGE_NAMES
from tests.conftest import SAMPLE

REPO = Path(__file__).resolve().parents[2]
POOL = "memstage-test"


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout_s} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started and everything it spawned (its own session), by id."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    """Environment of a process that talks to the test's server (the server itself is started here)."""
    tmp = tmp_path_factory.mktemp("prefect")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    env.update(
        PREFECT_HOME=str(tmp / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_BLOCKS_REGISTER_ON_START="false",
        PREFECT_SERVER_UI_ENABLED="false",  # the API is what is tested; the UI costs start-up time
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="3",  # default 60: upcoming runs appear sooner
    )
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - closed below, after the server stops
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(url, server)
        env["PREFECT_API_URL"] = url
        env["MEMSTAGE_HOME"] = str(tmp / "home")
        env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
        yield env
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)  # logs of in-process runs go out before their server stops
        stop(server)
        log.close()


def client_settings(env: dict[str, str]):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]})


@pytest.fixture(scope="module")
def deployed(prefect_env) -> dict:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "memstage.cli.main",
            "deploy",
            "--json",
            "--pool",
            POOL,
            "--runner",
            "local",
            "--namespace",
            "demo",
            "--maintain-cron",
            "15 3 * * *",
            "--forget-every",
            "1800",
        ],
        env=prefect_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


# fastapi 0.151+ made the server answer 422 to the client's null limit/offset/sort (pyproject pins
# fastapi<0.151); the reads below pass them explicitly so the test says what it reads either way.


def test_deploy_registers_schedules_pool_and_store_limit(prefect_env, deployed):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    names = {d["name"] for d in deployed["deployments"]}
    assert {
        "memstage-maintain/maintain",
        "memstage-stage/forget",
        "memstage-ingest/ingest",
        "memstage-query/query",
        "memstage-eval/eval",
        "memstage-maintain/maintain-demo",
    } <= names
    with client_settings(prefect_env), get_client(sync_client=True) as client:
        deps = {
            d["name"].split("/")[1]: client.read_deployment_by_name(d["name"])
            for d in deployed["deployments"]
        }
        for stage in STAGE_NAMES:
            assert deps[stage].parameters["stage"] == stage
        maintain = deps["maintain"]
        assert [s.schedule.cron for s in maintain.schedules] == ["15 3 * * *"]
        assert all(s.active for s in maintain.schedules)
        assert maintain.global_concurrency_limit.limit == 1
        assert maintain.concurrency_options.collision_strategy == "ENQUEUE"
        assert maintain.work_pool_name == POOL
        forget = deps["forget"]
        assert forget.schedules[0].schedule.interval.total_seconds() == 1800
        assert "namespace:demo" in deps["maintain-demo"].tags
        assert deps["maintain-demo"].parameters["namespace"] == "demo"
        assert client.read_work_pool(POOL).type == "process"
        limit = client.read_global_concurrency_limit_by_name(deployed["store_limit"])
        assert limit.limit == 1 and limit.active
        # the scheduler fills in upcoming runs of the nightly and hourly deployments
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(limit=200, sort=FlowRunSort.START_TIME_DESC)
            if any(r.deployment_id == forget.id for r in runs):
                break
            time.sleep(2)
        assert any(r.deployment_id == forget.id and r.state.is_scheduled() for r in runs)


def test_worker_runs_ingest_deployment_with_artifacts(prefect_env, deployed, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort
    from prefect.deployments import run_deployment

    with client_settings(prefect_env):
        run = run_deployment("memstage-ingest/ingest", parameters={"path": str(SAMPLE)}, timeout=0)
    worker = subprocess.run(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--run-once"],
        env=prefect_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=420,
    )
    with client_settings(prefect_env), get_client(sync_client=True) as client:
        deadline = time.monotonic() + 120  # --run-once may return while the run finishes reporting
        while not (fr := client.read_flow_run(run.id)).state.is_final() and time.monotonic() < deadline:
            time.sleep(1)
        assert fr.state.is_completed(), f"{fr.state}\n{worker.stdout[-3000:]}\n{worker.stderr[-3000:]}"
        assert fr.name.startswith(f"ingest {SAMPLE.name} ")
        children = [
            r
            for r in client.read_flow_runs(limit=200, sort=FlowRunSort.START_TIME_DESC)
            if r.name == f"ingest {SAMPLE.name}"
        ]
        assert children, "the working ingest flow ran as a subflow"
        artifacts = client.read_artifacts(  # on the run the user triggered, not one level down
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id])),
            limit=100,
            offset=0,
            sort=ArtifactSort.CREATED_DESC,
        )
        assert {(a.key, a.type) for a in artifacts} >= {
            ("ingest-demo", "table"),
            ("ingest-demo-summary", "markdown"),
        }
        summary = next(a for a in artifacts if a.type == "markdown")
        assert "new events" in summary.data
        assert "namespace:demo" in fr.tags
        result = client.read_flow_run(run.id)
    assert result.state.is_completed()
    from memstage.stores.store import MemoryStore

    assert MemoryStore(prefect_env["MEMSTAGE_HOME"]).namespaces() == ["demo"]


def test_maintain_flow_takes_the_store_slot_and_links_the_report(prefect_env, deployed):
    """The maintain deployment's flow, called here against the same server, on the store the worker filled."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from memstage.flows.deployments import maintain

    home = Path(prefect_env["MEMSTAGE_HOME"])
    with client_settings(prefect_env):
        state = maintain(home=str(home), runner="local", return_state=True)
        assert state.is_completed(), state.message
        report = state.result()
        with get_client(sync_client=True) as client:
            links = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["memstage-report"])),
                limit=10,
                offset=0,
                sort=ArtifactSort.CREATED_DESC,
            )
            slot = client.read_global_concurrency_limit_by_name(deployed["store_limit"])
    assert report["failed"] == [] and set(report["stages"]) == {
        "compress",
        "consolidate",
        "update",
        "index",
        "forget",
    }
    assert links and "file://" not in links[0].data and "/report" in links[0].data  # served over HTTP
    assert (home / "report.html").read_text().count("<svg") == 7
    assert slot.active_slots == 0  # released after the run
    with client_settings(prefect_env), get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        mine = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])),
            limit=50,
            offset=0,
            sort=ArtifactSort.CREATED_DESC,
        )
    assert "namespace:demo" in run.tags
    table = next(a for a in mine if a.key == "maintain-demo")  # the stage summary on the triggered run
    assert {row["stage"] for row in json.loads(table.data)} == set(STAGE_NAMES)


def test_query_deployment_flow_answers_with_its_artifact_and_record(prefect_env, deployed):
    """The query deployment's flow with its deployed defaults (namespace demo), retrieval only here."""
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.client.schemas.sorting import ArtifactSort

    from memstage.cli.ops_commands import PREFECT_FILE
    from memstage.flows.deployments import query
    from memstage.stores import queries
    from memstage.stores.store import MemoryStore

    defaults = next(
        d for d in yaml.safe_load(PREFECT_FILE.read_text())["deployments"] if d["name"] == "query"
    )
    params = {**defaults["parameters"], "answer": False}
    home = Path(prefect_env["MEMSTAGE_HOME"])
    with client_settings(prefect_env):
        state = query(**params, home=str(home), runner="local", return_state=True)
        assert state.is_completed(), state.message
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(state.state_details.flow_run_id)
            mine = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])),
                limit=50,
                offset=0,
                sort=ArtifactSort.CREATED_DESC,
            )
    # the question is a parameter the user typed into Prefect, but memstage repeats no text there
    # (run name, artifacts) unless MEMSTAGE_ARTIFACT_TEXT=1 (docs/stages.md, hard forget)
    assert run.name.startswith("query demo") and "Maya" not in run.name and "namespace:demo" in run.tags
    assert {a.key for a in mine} >= {"query-demo", "query-demo-summary"}
    assert not any("Maya" in json.dumps([a.data, a.description], default=str) for a in mine)
    [row] = [r for r in queries.runs(MemoryStore(home), "demo") if r["stage"] == "query"]
    assert row["flow_run_id"] == str(run.id) and row["figures"]["served_by"] == "deployment"


def test_prefect_yaml_covers_every_flow_with_importable_entrypoints():
    """No server: the file's deployments, their entrypoints and `memstage deploy`'s overrides."""
    import importlib

    import yaml
    from prefect import Flow

    from memstage.cli.ops_commands import PREFECT_FILE, deployment_specs, module_entrypoint

    raw = yaml.safe_load(PREFECT_FILE.read_text())
    names = {d["name"] for d in raw["deployments"]}
    assert {"ingest", "maintain", "forget", "query", "eval"} <= names  # the scheduled and ad-hoc flows
    for d in raw["deployments"]:
        assert (REPO / d["entrypoint"].split(":")[0]).is_file()
        module, func = module_entrypoint(d["entrypoint"]).rsplit(".", 1)
        assert isinstance(getattr(importlib.import_module(module), func), Flow)
    spec = deployment_specs(
        raw,
        pool="p",
        maintain_cron="0 4 * * *",
        forget_every=600,
        timezone="Europe/Berlin",
        paused=True,
        namespaces=["alice"],
        env={"MEMSTAGE_HOME": "/data"},
    )
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(STAGE_NAMES) <= set(by_name)  # every registered stage gets a deployment, listed or not
    assert all(by_name[s]["parameters"]["stage"] == s for s in STAGE_NAMES)
    assert by_name["maintain"]["schedules"] == [
        {"cron": "0 4 * * *", "timezone": "Europe/Berlin", "active": False}
    ]
    assert by_name["forget"]["schedules"][0]["interval"] == 600
    assert by_name["forget-alice"]["parameters"] == {"stage": "forget", "namespace": "alice"}
    assert "namespace:alice" in by_name["maintain-alice"]["tags"]
    assert all(
        d["work_pool"]["job_variables"]["env"] == {"MEMSTAGE_HOME": "/data"} for d in spec["deployments"]
    )


def test_served_query_answers_first_then_shows_as_a_query_flow_run(
    prefect_env, indexed_sample, encoder, token_counter, monkeypatch
):
    """`memstage serve`'s query route with a Prefect server: the answer comes back without waiting for
    Prefect, then the query is a `query` flow run (tags, artifact) and its `runs` row names that run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.client.schemas.sorting import ArtifactSort

    from memstage.runtime import services as services_mod
    from memstage.runtime.backends import RuntimeConfig
    from memstage.server.local_routes import QueryRequest, recorder, run_served_query
    from memstage.stores import access_log, queries
    from memstage.stores.store import MemoryStore

    monkeypatch.setenv("PREFECT_API_URL", prefect_env["PREFECT_API_URL"])
    home = indexed_sample.home
    svc = services_mod.services(RuntimeConfig(home=home, runner="local"), use_ray=False)
    svc._encoder, svc._counter = encoder, token_counter  # the session's models: no second load
    body = QueryRequest(question="What is the name of Sam's dog?", namespace="demo", budget=400, answer=False)
    result = run_served_query(svc, body)
    assert result["served"]["flow_run_id"] is None and result["served"]["flow_run"]  # answered first
    assert any("Pepper" in m["text"] for m in result["memories"])
    recorder(home).close(timeout_s=120)  # the background thread records the run
    access_log.flush_now(home)
    [row] = [r for r in queries.runs(MemoryStore(home), "demo") if r["stage"] == "query"]
    assert row["flow_run_id"] and row["figures"]["served_by"] == "serve"
    with client_settings(prefect_env), get_client(sync_client=True) as client:
        run = client.read_flow_run(row["flow_run_id"])
        mine = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])),
            limit=50,
            offset=0,
            sort=ArtifactSort.CREATED_DESC,
        )
    assert run.state.is_completed() and run.name.startswith("query demo")
    assert {"namespace:demo", "served"} <= set(run.tags) and "query-demo" in {a.key for a in mine}
    assert "Sam's dog" not in json.dumps(run.parameters)  # the question never reaches Prefect's record
    services_mod._local.pop(str(home), None)
