"""The operator's commands: `memstage deploy` (deployments, schedules, pool, store limit) and `memstage report`."""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path
from typing import Any

from memstage.cli.main import UserError, add_common, config_from
from memstage.settings import get_settings
from memstage.tasks.registry import STAGES

PREFECT_FILE = Path(__file__).resolve().parent.parent / "deploy" / "prefect.yaml"
# entrypoint function in flows/deployments.py -> its Prefect flow name ("flow/deployment" names a deployment)
FLOW_NAMES = {
    "ingest": "memstage-ingest",
    "stage": "memstage-stage",
    "maintain": "memstage-maintain",
    "query": "memstage-query",
    "evaluate": "memstage-eval",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deploy",
        help="register memstage's deployments (deploy/prefect.yaml) with the Prefect server at PREFECT_API_URL",
    )
    p.add_argument(
        "--pool", default="memstage", help="process work pool to create and use (default memstage)"
    )
    p.add_argument(
        "--maintain-cron", default="0 2 * * *", help="maintain schedule, cron (default nightly 02:00)"
    )
    p.add_argument("--forget-every", type=int, default=3600, help="forget schedule, seconds (default hourly)")
    p.add_argument("--timezone", default="UTC", help="timezone of the schedules (default UTC)")
    p.add_argument("--paused", action="store_true", help="register the schedules switched off")
    p.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="also a maintain-NS and forget-NS deployment for this namespace, tagged namespace:NS (repeatable)",
    )
    p.add_argument("--prefect-file", type=Path, default=PREFECT_FILE, help="the deployments file")
    add_common(p)
    p.set_defaults(run=cmd_deploy, render=render_deploy)

    p = sub.add_parser("report", help="write one self-contained HTML page of plots about the store")
    p.add_argument("--namespace", default=None, help="one namespace (default: all)")
    p.add_argument(
        "--out", type=Path, default=Path("report.html"), help="the HTML file (default report.html)"
    )
    add_common(p)
    p.set_defaults(run=cmd_report, render=lambda r: f"report: {r['out']} ({r['plots']} plots)")


def deployment_specs(
    spec: dict[str, Any],
    *,
    pool: str,
    maintain_cron: str,
    forget_every: int,
    timezone: str,
    paused: bool,
    namespaces: list[str],
    env: dict[str, str],
) -> dict[str, Any]:
    """The prefect.yaml content with this command's choices applied (pure: tested without a server)."""
    spec = copy.deepcopy(spec)
    listed = {d["name"] for d in spec["deployments"]}
    template = next(d for d in spec["deployments"] if d["name"] == "forget")  # a `stage` deployment
    for stage in STAGES:  # every registered stage gets a deployment the file does not already name
        if stage.name not in listed:
            spec["deployments"].append(
                {
                    **{k: v for k, v in template.items() if k not in ("schedules", "concurrency_limit")},
                    "name": stage.name,
                    "description": f"The {stage.name} stage: {stage.summary}.",
                    "parameters": {"stage": stage.name, "namespace": None},
                    "tags": ["memstage", "writer"],
                }
            )
    extra = []
    for dep in spec["deployments"]:
        dep["work_pool"] = {"name": pool, "work_queue_name": "default", "job_variables": {"env": dict(env)}}
        if dep["name"] == "maintain":
            dep["schedules"] = [{"cron": maintain_cron, "timezone": timezone, "active": not paused}]
        elif dep["name"] == "forget":
            dep["schedules"] = [{"interval": forget_every, "timezone": timezone, "active": not paused}]
        for s in dep.get("schedules", []):
            s["active"] = s.get("active", True) and not paused
    for ns in namespaces:
        for dep in [d for d in spec["deployments"] if d["name"] in ("maintain", "forget")]:
            mine = copy.deepcopy(dep)
            mine["name"] = f"{dep['name']}-{ns}"
            mine["parameters"] = {**dep.get("parameters", {}), "namespace": ns}
            mine["tags"] = [*dep.get("tags", []), f"namespace:{ns}"]
            extra.append(mine)
    spec["deployments"].extend(extra)
    spec.pop("definitions", None)  # anchors are resolved by now; the copy need not repeat them
    return spec


def module_entrypoint(entrypoint: str) -> str:
    """'flows/deployments.py:maintain' -> 'memstage.flows.deployments.maintain': workers import the installed
    package, so they need no checkout, no pull step and no copy of the code."""
    path, func = entrypoint.rsplit(":", 1)
    return "memstage." + path.removesuffix(".py").replace("/", ".") + "." + func


def _schedule(s: dict[str, Any]) -> Any:
    from prefect.schedules import Cron, Interval

    if "cron" in s:
        return Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
    return Interval(int(s["interval"]), timezone=s.get("timezone"), active=s.get("active", True))


def apply_deployments(spec: dict[str, Any], workdir: Path) -> list[str]:
    """Register every deployment of `spec` through the Prefect client; returns their ids.

    Not `prefect deploy`: entrypoints become module paths of the installed package (a worker needs
    memstage installed, not this checkout), and the pull step is ours (see below). With fastapi 0.151+
    `prefect deploy` also failed after the first deployment (a 422 on its null `limit`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.deployments.runner import RunnerDeployment

    ids = []
    for d in spec["deployments"]:
        pool = d["work_pool"]
        limit = d.get("concurrency_limit")
        if isinstance(limit, dict):
            from prefect.client.schemas.objects import ConcurrencyLimitConfig

            limit = ConcurrencyLimitConfig(
                limit=limit["limit"], collision_strategy=limit["collision_strategy"]
            )
        deployment = RunnerDeployment.from_entrypoint(
            entrypoint=module_entrypoint(d["entrypoint"]),
            name=d["name"],
            description=d.get("description"),
            parameters=d.get("parameters") or {},
            tags=d.get("tags") or [],
            schedules=[_schedule(s) for s in d.get("schedules", [])],
            concurrency_limit=limit,
            work_pool_name=pool["name"],
            work_queue_name=pool.get("work_queue_name"),
            job_variables=pool.get("job_variables") or {},
        )
        deployment_id = deployment.apply()
        # A pull step that only changes directory: without one, a process worker copies the deployment's
        # path (the whole checkout, .venv included) into a temporary workspace before every run.
        with get_client(sync_client=True) as client:
            client.update_deployment(
                deployment_id,
                DeploymentUpdate(
                    pull_steps=[
                        {"prefect.deployments.steps.set_working_directory": {"directory": str(workdir)}}
                    ]
                ),
            )
        ids.append(str(deployment_id))
    return ids


def ensure_pool(pool: str) -> None:
    """Create the process work pool unless it exists, with the process worker's default job template."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))


def check_server(api: str) -> None:
    """One line the user can act on when no Prefect server answers at `api`."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise UserError(f"no Prefect server answers at {api} ({error}); is `prefect server start` running?")


def cmd_deploy(args: argparse.Namespace) -> dict[str, Any]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = os.environ.get("PREFECT_API_URL")
    if not api:
        raise UserError(
            "PREFECT_API_URL is not set: start `prefect server start` and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` first (see deploy/README.md)"
        )
    # Every client call below talks to the server the environment names now, not to whatever API
    # this process's Prefect settings were loaded with (a temporary server, in tests and notebooks).
    with temporary_settings(updates={PREFECT_API_URL: api}):
        return _deploy(args, api)


def _deploy(args: argparse.Namespace, api: str) -> dict[str, Any]:
    import yaml

    check_server(api)
    config = config_from(args)
    env = {**get_settings().worker_env(), "MEMSTAGE_HOME": str(config.home), "MEMSTAGE_RUNNER": config.runner}
    if os.environ.get("RAY_ADDRESS"):
        env["RAY_ADDRESS"] = os.environ["RAY_ADDRESS"]
    spec = deployment_specs(
        yaml.safe_load(args.prefect_file.read_text()),
        pool=args.pool,
        maintain_cron=args.maintain_cron,
        forget_every=args.forget_every,
        timezone=args.timezone,
        paused=args.paused,
        namespaces=args.namespace,
        env=env,
    )
    ensure_pool(args.pool)
    from memstage.flows.deployments import ensure_store_limit

    limit = ensure_store_limit(config.home)
    config.home.mkdir(parents=True, exist_ok=True)  # runs start in it: a missing one crashes every run
    apply_deployments(spec, workdir=config.home)
    return {
        "api": api,
        "pool": args.pool,
        "store_limit": limit,
        "home": str(config.home),
        "deployments": [
            {
                "name": f"{FLOW_NAMES[d['entrypoint'].rsplit(':', 1)[1]]}/{d['name']}",
                "schedules": [s.get("cron") or f"every {s['interval']} s" for s in d.get("schedules", [])],
                "tags": d.get("tags", []),
            }
            for d in spec["deployments"]
        ],
    }


def render_deploy(r: dict[str, Any]) -> str:
    lines = [
        f"Deployed to {r['api']} (work pool {r['pool']}, store limit {r['store_limit']}, home {r['home']}):"
    ]
    for d in r["deployments"]:
        when = ", ".join(d["schedules"]) or "on demand"
        lines.append(f"  {d['name']:28s} {when}")
    lines.append(f"Start a worker: prefect worker start --pool {r['pool']}")
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from memstage.dashboards.report import write_report
    from memstage.stores.store import MemoryStore

    config = config_from(args)
    store = MemoryStore(config.home)
    if args.namespace:
        store.require_namespace(args.namespace)
    return write_report(store, args.out, namespace=args.namespace)
