"""Where runs report and where tasks run: one Prefect API for the driver and every Ray worker, and Ray itself.

Without PREFECT_API_URL, memstage starts one temporary Prefect server per process (Prefect's
ephemeral mode) and hands its URL to the Ray workers, so they report to it instead of each starting
their own (the 0.2 s-per-task cost measured in ENVIRONMENT.md). With PREFECT_API_URL, runs go to that
server and show in its UI. Ray is local and in-process by default, or the cluster at RAY_ADDRESS.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memstage.settings import RUNNERS, apply_process_defaults, get_settings

log = logging.getLogger("memstage")


@dataclass(frozen=True)
class RuntimeConfig:
    """How a flow runs: the data directory, and whether its tasks go to Ray or stay in-process."""

    home: Path
    runner: str = "auto"  # auto: Ray for batch flows; for one ad-hoc query Ray only if RAY_ADDRESS is set

    def use_ray(self, *, batch: bool) -> bool:
        if self.runner not in RUNNERS:
            raise ValueError(f"unknown runner {self.runner!r}; choose one of {RUNNERS}")
        if self.runner == "auto":
            return batch or bool(os.environ.get("RAY_ADDRESS"))
        return self.runner == "ray"


_server: Any = None
_server_thread: threading.Thread | None = None


def prefect_api_url(*, wait: bool = True) -> str:
    """The API every run of this process (and its Ray workers) reports to; starts a temporary one if none.

    With wait=False the server is started in a background thread and its URL returned at once, so
    Ray can start at the same time (each takes seconds on a small machine)."""
    global _server, _server_thread  # one temporary server per process, like Prefect's own ephemeral mode
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    apply_process_defaults()
    if _server is None:
        from prefect.server.api.server import SubprocessASGIServer

        _server = SubprocessASGIServer()
        if _server.port is None:
            _server.port = _server.find_available_port()
        _server_thread = threading.Thread(
            target=_start_server, args=(_server,), name="prefect-server", daemon=True
        )
        _server_thread.start()
    if wait and _server_thread is not None:
        _server_thread.join()
    return _server.api_url


# Services a server that lives for one process has no work for: automations (triggers), schedules
# and late runs of deployments, work-pool workers (foreman), paused runs. Evaluating triggers on every
# event cost the server a third of its CPU per task run (64 ms against 43); the loops of the others
# wake every few seconds on a machine whose cores the encoders need. Set one in the environment to
# keep it.
IDLE_SERVICES = ("TRIGGERS", "SCHEDULER", "LATE_RUNS", "FOREMAN", "PAUSE_EXPIRATIONS")


def _start_server(server: Any) -> None:
    import prefect.settings
    from prefect.settings import temporary_settings

    updates = {
        getattr(prefect.settings, name): False
        for name in (f"PREFECT_SERVER_SERVICES_{service}_ENABLED" for service in IDLE_SERVICES)
        if name not in os.environ
    }
    with temporary_settings(updates=updates):  # the server's environment is built from these settings
        server.start()


@contextlib.contextmanager
def prefect_settings(config: RuntimeConfig | None = None, *, use_ray: bool = False) -> Iterator[str]:
    """Run the enclosed flows against `prefect_api_url()`; Ray workers inherit it through the task context.

    Starts the temporary Prefect server and (with use_ray) Ray side by side."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    own_server = not os.environ.get("PREFECT_API_URL")
    url = prefect_api_url(wait=False)
    if use_ray and config is not None:
        ensure_ray(config)
    url = prefect_api_url(wait=True)
    updates: dict[Any, Any] = {PREFECT_API_URL: url}
    if own_server and "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" not in os.environ:
        # Flow-run heartbeats exist for a server's automations to spot crashed runs; a temporary
        # server has none. And Prefect's heartbeat thread sleeps in 1 s steps and is joined when the
        # run ends: every flow run ended up to 1 s late (a trivial flow: 1.15 s with, 0.22 s without).
        updates[PREFECT_FLOWS_HEARTBEAT_FREQUENCY] = None
    # Building the settings (pydantic, every field) took 65 ms of every flow run's start, while the
    # encoders waited for work: build them once per base settings and URL, then only enter them.
    import prefect.context

    base = prefect.context.get_settings_context()
    key = (url, tuple(sorted(map(str, updates))))
    cached = _run_settings.get(key)
    if cached is None or cached[0] is not base.settings:
        cached = _run_settings[key] = (base.settings, base.settings.copy_with_update(updates=updates))
    with prefect.context.SettingsContext(profile=base.profile, settings=cached[1]):
        yield url


_run_settings: dict[tuple[str, tuple[str, ...]], tuple[Any, Any]] = {}  # see prefect_settings


def ensure_ray(config: RuntimeConfig) -> None:
    """Start (or join, with RAY_ADDRESS) Ray once per process, telling workers which Prefect API to use."""
    import ray

    if ray.is_initialized():
        return
    apply_process_defaults()
    env_vars = {
        "PREFECT_API_URL": prefect_api_url(wait=False),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **get_settings().worker_env(),
        "MEMSTAGE_HOME": str(config.home),
    }
    if "PREFECT_LOGGING_LEVEL" in os.environ:
        env_vars["PREFECT_LOGGING_LEVEL"] = os.environ["PREFECT_LOGGING_LEVEL"]
    address = os.environ.get("RAY_ADDRESS") or None
    # Ray starts its workers at nice 15. On a small machine that hands the cores to the driver and the
    # Prefect server whenever they wake, and the encoder actor's OpenMP threads stall on each other:
    # measured 0.80 of the bare encoder's rate at nice 15, 1.0 at nice 0. Read by the raylet that
    # ray.init starts here; a cluster keeps its own setting.
    os.environ.setdefault("RAY_worker_niceness", "0")
    log.info("starting Ray %s", f"client of {address}" if address else "locally")
    # A Ray started here has no dashboard to read its metrics: collecting them cost every Ray process
    # CPU the encoders need (0.6 core-s per 36 s idle on 2 cores). A cluster keeps its own setting.
    system_config = None if address else {"enable_metrics_collection": False, "event_stats": False}
    ray.init(
        address=address,
        namespace="memstage",
        runtime_env={"env_vars": env_vars},
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _system_config=system_config,
    )
    if not address:
        _stop_unread_ray_processes()


def _stop_unread_ray_processes() -> None:
    """Stop the helper processes of the Ray started here that nothing reads, each waking several
    times a second on cores the encoders need: the log monitor tails every worker's log files to
    publish them to drivers (and log_to_driver=False: none reads them; 0.5 core-s per 36 s on 2
    cores); the dashboard head serves a dashboard we did not include and the job and state APIs,
    and the autoscaler monitor scales a one-machine cluster (0.3 core-s per 36 s together). Ray has
    no public switch for them; if its internals change, they run on."""
    import ray._private.worker as ray_worker

    node = ray_worker._global_node
    for stop in ("kill_log_monitor", "kill_dashboard", "kill_monitor"):
        try:
            getattr(node, stop)(check_alive=False)
        except Exception as exc:  # noqa: BLE001 - an optimisation only
            log.debug("Ray's %s left running: %s", stop.removeprefix("kill_"), exc)


def task_runner(config: RuntimeConfig, *, batch: bool) -> Any:
    """RayTaskRunner on the Ray that `ensure_ray` started, or Prefect's in-process thread pool."""
    if config.use_ray(batch=batch):
        from prefect_ray import RayTaskRunner

        ensure_ray(config)
        return RayTaskRunner(address=os.environ.get("RAY_ADDRESS") or None)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=max(2, os.cpu_count() or 2))


def stage_task(**options: Any) -> Any:
    """Prefect's @task with memstage's defaults: no input hashing (inputs are Arrow tables; stages are
    idempotent by design, so Prefect's result cache would only cost time)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    options.setdefault("cache_policy", NO_CACHE)
    return task(**options)


def flow_run_id() -> str | None:
    """The id of the flow run we are inside, for `ops` rows; None outside Prefect."""
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # noqa: BLE001 - no run context (plain function call)
        return None
