"""The flows that Prefect deployments run: plain JSON parameters, one writer per store, run names a person reads.

The working flows (`ingest_flow`, `maintain_flow`, the stage flows, `query_flow`) take a
`RuntimeConfig` and an explicit namespace list and get their task runner from the CLI. A deployment
run starts from nothing but its parameters, so each flow here resolves `home` (default
$MEMSTAGE_HOME), the namespaces (default: every namespace in the store, looked up when the run
starts, so a nightly schedule covers tenants added since) and the runner (default $MEMSTAGE_RUNNER),
then runs the working flow as a subflow on the right task runner. Flows that write hold the store's
Prefect global concurrency limit (one slot), so two maintenance runs never write one store at once,
whichever deployments or workers they come from; each subflow is tagged `namespace:NS`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, tags

from memstage.runtime import backends as runtime
from memstage.runtime.artifacts import figures_text, namespaces_label, publish, run_key
from memstage.settings import get_settings
from memstage.stores.store import MemoryStore

CHECKOUT = Path(__file__).resolve().parent.parent  # the repository (an editable install's source)
WRITER_WAIT_S = 6 * 3600  # a queued maintenance run waits this long for the store before giving up
QUERY_WAIT_S = 600  # a query for a namespace not stored yet waits this long for a running writer


def store_home(home: str | None) -> Path:
    """The data directory a deployment run works on: the parameter, else $MEMSTAGE_HOME, else ~/.memstage."""
    return Path(home).expanduser().resolve() if home else MemoryStore().home


def _config(home: str | None, runner: str | None) -> runtime.RuntimeConfig:
    return runtime.RuntimeConfig(home=store_home(home), runner=runner or get_settings().runner)


def store_limit_name(home: Path) -> str:
    """The global concurrency limit guarding one data directory (the same name on every worker)."""
    return f"memstage-store-{hashlib.sha1(str(home).encode()).hexdigest()[:10]}"


def ensure_store_limit(home: Path) -> str:
    """Create (or re-activate) the store's limit of one slot; returns its name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = store_limit_name(home)
    with get_client(sync_client=True) as client:
        try:
            found = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            # two runs may race to create it: the loser finds it there, which is all we need
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            return name
        if found.limit != 1 or not found.active:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1, active=True))
    return name


@contextlib.contextmanager
def store_slot(home: Path, timeout_s: float = WRITER_WAIT_S) -> Iterator[None]:
    """Hold the store's single writer slot for the enclosed work (queued runs wait their turn)."""
    from prefect.concurrency.sync import concurrency

    name = ensure_store_limit(home)
    logger = get_run_logger()
    logger.info("Waiting for the writer slot of %s (limit %s)", home, name)
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
        logger.info("Got the writer slot of %s", home)
        yield


def _run_name(what: str) -> Callable[[], str]:
    """'maintain alice 2026-11-23 02:00' (or 'ingest turns.jsonl ...'): what, on what, and when."""

    def name() -> str:
        from prefect.runtime import flow_run

        params = flow_run.parameters or {}
        label = params.get("stage") or what
        ns = params.get("namespace") or (
            Path(params["path"]).name if params.get("path") else "all namespaces"
        )
        if what == "query" and params.get("question") and get_settings().artifact_text:
            ns = f"{ns}: {str(params['question'])[:60]}"  # only with MEMSTAGE_ARTIFACT_TEXT=1: run names are text
        when = flow_run.scheduled_start_time
        return f"{label} {ns}" + (f" {when:%Y-%m-%d %H:%M}" if when else "")

    return name


def publish_report(home: Path) -> None:
    """Redraw HOME/report.html and link it from this run over HTTP: MEMSTAGE_REPORT_URL, else the
    GET /report of the `memstage serve` running for this data directory; never a file:// link (a
    browser will not open one from the UI, and the file is on the worker)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    from memstage.dashboards.report import write_report
    from memstage.server.local import find_service

    logger = get_run_logger()
    try:
        out = write_report(MemoryStore(home), home / "report.html")
    except Exception as exc:  # noqa: BLE001 - a plot failing must not fail the maintenance it reports on
        logger.warning("The report could not be drawn: %s", exc)
        return
    service = find_service(home)
    link = get_settings().report_url or (service["url"] + "/report" if service else None)
    if link:
        create_link_artifact(
            link=link,
            link_text="memstage report: plots over time",
            key="memstage-report",
            description="memories, queries, stage durations, compression, forgetting, recall, KV cache",
        )
        logger.info("Report redrawn: %s", link)
        return
    create_markdown_artifact(
        key="memstage-report",
        markdown=f"The report was redrawn on the worker ({out['plots']} plots). To open it in a browser, "
        f"serve it: `memstage serve --home {home}`, then http://127.0.0.1:8000/report "
        "(or set MEMSTAGE_REPORT_URL to where it is published, and this card links there).",
        description="memstage report: plots over time",
    )
    logger.info("Report redrawn at %s; serve it with `memstage serve` (GET /report)", out["out"])


def tag_this_run(namespaces: list[str]) -> None:
    """Add `namespace:NS` tags to the flow run we are in (a deployment's run is created by the server,
    before anyone knows which namespaces it covers: the UI's tag filter finds it from its start on)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not namespaces or not flow_run.id:
        return
    tags_now = list(flow_run.tags or [])
    wanted = sorted({*tags_now, *(f"namespace:{ns}" for ns in namespaces)})
    if set(wanted) != set(tags_now):
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, tags=wanted)


def input_path(path: str, what: str) -> Path:
    """An input file named by a deployment parameter: absolute, or relative to the checkout (the worker
    starts in the data directory, so a relative path must not be resolved there)."""
    source = Path(path).expanduser()
    if not source.is_absolute():
        source = CHECKOUT / source
    if not source.exists():
        raise FileNotFoundError(f"{what} input {path} does not exist on this worker (looked at {source})")
    return source


def _namespaces(config: runtime.RuntimeConfig, namespace: str | None) -> list[str]:
    store = MemoryStore(config.home)
    return [store.require_namespace(namespace)] if namespace else store.namespaces()


def _on_runner(working_flow: Any, config: runtime.RuntimeConfig, *, batch: bool) -> Any:
    """The working flow as a subflow on Ray (or in-process threads), reporting to this run's API."""
    return working_flow.with_options(task_runner=runtime.task_runner(config, batch=batch))


def _nothing_to_do(what: str, home: Path) -> list[Any]:
    """An empty store: say so in the log and as the run's artifact (a run that explains itself)."""
    text = f"The store at {home} holds no namespaces yet: nothing to {what}. Ingest something first."
    get_run_logger().info(text)
    publish(run_key(what, []), [], text)
    return []


@flow(name="memstage-ingest", flow_run_name=_run_name("ingest"))
def ingest(
    path: str,
    namespace: str | None = None,
    fmt: str = "auto",
    home: str | None = None,
    runner: str | None = None,
) -> dict[str, Any]:
    """Ingest a file (jsonl, LoCoMo json, parquet) into the store and index what is new."""
    from memstage.flows.ingest import ingest_flow

    config = _config(home, runner)
    source = input_path(path, "ingest")
    if namespace:
        tag_this_run([namespace])
    with store_slot(config.home), tags(*([f"namespace:{namespace}"] if namespace else [])):
        out = _on_runner(ingest_flow, config, batch=True)(source, fmt, namespace, config, False)
    tag_this_run(out["namespaces"])
    publish(
        run_key("ingest", out["namespaces"]),
        [{"namespace": ns, **figures} for ns, figures in out["indexed"].items()],
        f"Ingested **{source.name}** into {namespaces_label(out['namespaces'])}: {out['events_new']} new "
        f"events, {out['events_already_stored']} already stored, {out['quarantined']} quarantined, "
        f"in {out['duration_s']} s.",
    )
    return out


@flow(name="memstage-stage", flow_run_name=_run_name("stage"))
def stage(
    stage: str, namespace: str | None = None, home: str | None = None, runner: str | None = None
) -> list[dict[str, Any]]:
    """One maintenance stage (compress, consolidate, update, index or forget) over the namespaces."""
    from memstage.flows.stages import STAGE_FLOWS

    if stage not in STAGE_FLOWS:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGE_FLOWS)}")
    config = _config(home, runner)
    # The slot first, then the namespaces: a run queued behind an ingest sees what the ingest stored.
    with store_slot(config.home):
        namespaces = _namespaces(config, namespace)
        if not namespaces:
            return _nothing_to_do(stage, config.home)
        tag_this_run(namespaces)
        with tags(*[f"namespace:{ns}" for ns in namespaces]):
            rows = _on_runner(STAGE_FLOWS[stage], config, batch=True)(
                namespaces, config, config.use_ray(batch=True)
            )
    publish(
        run_key(stage, namespaces),
        rows,
        f"**{stage}** over {namespaces_label(namespaces)}: {sum(r.get('changed', 0) for r in rows)} rows "
        f"changed ({figures_text(rows, skip=('changed', 'duration_s')) or 'no figures'}).",
    )
    return rows


@flow(name="memstage-maintain", flow_run_name=_run_name("maintain"))
def maintain(
    namespace: str | None = None, home: str | None = None, runner: str | None = None
) -> dict[str, Any]:
    """compress -> consolidate -> update -> index -> forget; the run fails (after all stages) if one did."""
    from memstage.flows.stages import maintain_flow

    config = _config(home, runner)
    logger = get_run_logger()
    with store_slot(config.home):  # the slot first, then the namespaces (see `stage`)
        namespaces = _namespaces(config, namespace)
        if not namespaces:
            _nothing_to_do("maintain", config.home)
            return {"stage": "maintain", "namespaces": [], "stages": {}, "failed": []}
        tag_this_run(namespaces)
        with tags(*[f"namespace:{ns}" for ns in namespaces]):
            # maintain_flow's body in this run (its stage subflows, its `maintain-NS` artifact), not
            # one level down; each stage subflow gets its own task runner
            report = maintain_flow.fn(namespaces, config, config.use_ray(batch=True))
    publish_report(config.home)
    for name, r in report["stages"].items():
        if r["status"] == "ok":
            logger.info("%s changed %s rows in %.1f s", name, r["changed"], r["duration_s"])
    if report["failed"]:
        reasons = "; ".join(f"{s}: {report['stages'][s].get('error')}" for s in report["failed"])
        raise RuntimeError(f"maintenance of {', '.join(namespaces)} failed at stage(s) {reasons}")
    return report


def _require_namespace_after_writer(home: Path, namespace: str) -> None:
    """The namespace, waiting (up to QUERY_WAIT_S) for a writer that holds the store to finish first: a
    question triggered right after the ingest that brings its namespace waits for that ingest."""
    from memstage.stores.store import NamespaceError

    try:
        MemoryStore(home).require_namespace(namespace)
        return
    except NamespaceError:
        get_run_logger().info(
            "Namespace %s not in %s yet: waiting for a running writer to finish", namespace, home
        )
    try:
        with store_slot(home, timeout_s=QUERY_WAIT_S):
            pass  # only waited for the slot: a query writes nothing under it
    except TimeoutError:
        pass
    MemoryStore(home).require_namespace(namespace)


@flow(name="memstage-query", flow_run_name=_run_name("query"))
def query(
    question: str,
    namespace: str,
    budget: int | None = None,
    engine: str | None = None,
    answer: bool = True,
    home: str | None = None,
    runner: str | None = None,
) -> dict[str, Any]:
    """An ad-hoc question against one namespace: evidence within the budget, and an answer."""
    from memstage.defaults import DEFAULT_BUDGET
    from memstage.flows.query import answer_in_run

    config = _config(home, runner)
    _require_namespace_after_writer(config.home, namespace)
    tag_this_run([namespace])
    # The query's tasks and its `query-NS` artifact in this run. Reads only: no writer slot (the
    # query's record is skipped when a maintenance run holds the store).
    return answer_in_run(question, namespace, budget or DEFAULT_BUDGET, config, engine, answer, "deployment")


@flow(name="memstage-eval", flow_run_name=_run_name("eval"))
def evaluate(
    path: str, budgets: list[int] | None = None, baselines: bool = False, home: str | None = None
) -> dict[str, Any]:
    """LoCoMo evidence recall on a fresh store built from `path`; the recall is recorded in `home`'s
    `runs` table (stage 'eval') so the report can plot it over time."""
    from memstage.cli.eval_commands import evaluate_locomo
    from memstage.tasks.contract import StageResult, record_run, timed
    from memstage.tasks.evaluate import DEFAULT_BUDGETS

    source = input_path(path, "eval")
    result = StageResult("eval", f"locomo:{source.stem}")
    with timed(result):
        report = evaluate_locomo(
            source, budgets=tuple(budgets or DEFAULT_BUDGETS), baselines=baselines, home=None
        )
    result.figures = {
        "benchmark": "locomo",
        "questions": report.get("questions"),
        "recall": report.get("recall"),
        "by_category": report.get("by_category"),
        "baselines": {m: r.get("recall") for m, r in report.get("baselines", {}).items()},
    }
    record_run(MemoryStore(store_home(home)), result, flow_run_id=runtime.flow_run_id())
    recall = report.get("recall", {})
    publish(
        f"eval-{source.stem}",
        [{"budget": b, "recall": r} for b, r in recall.items()],
        f"LoCoMo evidence recall over {report.get('questions')} questions: "
        + ", ".join(f"{r:.3f} at {b} tokens" for b, r in recall.items()),
    )
    return report
