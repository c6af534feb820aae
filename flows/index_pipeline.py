"""Level-0 memories, embeddings and indexes of namespaces, pipelined around the encoder pool.

Used by the ingest flow (after its events are stored) and by the `index` stage flow. The encoders
(flows/encoder_pool.py) are the real cost, so they must never wait on the flow's process:
  1. `plan_indexing` (inside the caller's store hold) reads what lacks an embedding: the level-0
     memories that new events need, and stored memories a stage changed. All of their texts go to
     the encoders at once, largest namespace first; namespaces with nothing to embed get their
     indexes checked then.
  2. `index_namespaces` makes the level-0 rows (token counts, `ops` rows) in memory while the
     encoders start, then stores finished chunks as they come back (a new level-0 memory is
     inserted with its embedding; a changed one has its embedding updated), and builds the indexes
     of every namespace whose last chunk came back, in batches: each commit opens the store.
Rows and their embeddings land together, so a crashed run leaves no level-0 memory half made; a
rerun makes what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from prefect.utilities.annotations import quote

from memstage.runtime.backends import RuntimeConfig, flow_run_id, stage_task
from memstage.runtime.encoder_pool import WAIT_S, EncoderPool
from memstage.runtime.phases import Phases
from memstage.runtime.progress import Progress
from memstage.runtime.services import services
from memstage.stores import queries
from memstage.stores.store import MemoryStore, models_dir, now_utc
from memstage.tasks import build_batch, index, level0, workers
from memstage.tasks.contract import StageResult, record_runs, timed

# A commit opens the store (tens of ms), so finished chunks gather until BUILD_GROUP namespaces are
# complete, COMMIT_ROWS embeddings wait, or nothing else is outstanding; an index build costs a task
# run (tens of ms of Prefect, in the flow and in the server) and a read, so complete namespaces wait
# for one another up to the worker pool's size (`_Commits`).
BUILD_GROUP = 2
COMMIT_ROWS = 2048
# Once every embedding is back, namespaces are stored as their level-0 rows are made on the pool, in
# fewer, bigger commits: each is a store open and a checkpoint at its close
TAIL_COMMIT_ROWS = 8192

Texts = tuple[list[str], list[str]]  # (memory ids, texts to embed)


@dataclass
class IndexPlan:
    """What one run embeds, per namespace: events that need a level-0 memory (with its text), and
    stored memories waiting for an embedding. `built`: indexes of namespaces with nothing to embed."""

    level0: dict[str, tuple[pa.Table, list[str]]]
    stale: dict[str, Texts]
    built: dict[str, StageResult] = field(default_factory=dict)


@stage_task(name="embedding-plan", task_run_name="what to embed in {label}")
def read_plan(home: Path, namespaces: list[str], label: str) -> IndexPlan:
    store = MemoryStore(home)  # one query each for all the namespaces
    return IndexPlan(
        level0=index.new_level0_many(store, namespaces), stale=index.pending_many(store, namespaces)
    )


@stage_task(name="level0-memories", task_run_name="level-0 memories of {label}")
def make_level0(config: RuntimeConfig, plan: IndexPlan, label: str) -> dict[str, level0.PendingTables]:
    """namespace -> (rows, ops rows) of the new level-0 memories, not stored yet (they are stored
    with their embeddings), being made: on the process pool when they are many (tasks.level0), while
    the embedding loop stores the namespaces whose rows are made."""
    return level0.start_many_tables(
        plan.level0,
        lambda t: services(config, use_ray=False).count_tokens(t),
        models_dir(config.home),
        flow_run_id=flow_run_id(),
        at=now_utc(),
    )


@stage_task(name="build-indexes", task_run_name="indexes of {label}")
def build_indexes(home: Path, namespaces: list[str], label: str) -> list[StageResult]:
    store = MemoryStore(home)
    return build_batch.build_many(store, namespaces, flow_run_id=flow_run_id(), parallel=True)


def build_all(home: Path, namespaces: list[str]) -> dict[str, StageResult]:
    """One task run for the namespaces a step completed (a task run costs the server and the flow)."""
    if not namespaces:
        return {}
    return dict(zip(namespaces, build_indexes(home, namespaces, span(namespaces)), strict=True))


def span(namespaces: list[str]) -> str:
    """How a task run names the namespaces it covers, in the Prefect UI."""
    if not namespaces:
        return "no namespace"
    return namespaces[0] if len(namespaces) == 1 else f"{namespaces[0]} .. {namespaces[-1]}"


def plan_indexing(
    config: RuntimeConfig,
    namespaces: list[str],
    pool: EncoderPool,
    plan: IndexPlan | None = None,
    phases: Phases | None = None,
) -> IndexPlan:
    """Read what to embed, hand all of it to the encoders, and check the indexes of the namespaces
    with nothing to embed. Call inside a store hold (three steps, one store open). `plan`: from
    `early_plan`, its texts with the encoders already."""
    if plan is None:
        plan = read_plan(config.home, namespaces, span(namespaces))
        submit_plan(plan, namespaces, pool)
    pending = pool.pending_namespaces()
    with (phases or Phases()).timed("index_builds"):
        plan.built = build_all(config.home, [ns for ns in namespaces if ns not in pending])
    return plan


def early_plan(config: RuntimeConfig, events: pa.Table, pool: EncoderPool) -> IndexPlan | None:
    """When no event or memory of the input's namespaces is stored yet (a first ingest), what to
    embed is every parsed event: their texts go to the encoders now, before the events are
    committed and with no plan read. None otherwise (then `plan_indexing` reads the plan)."""
    namespaces = sorted(set(events.column("namespace").to_pylist()))
    if not namespaces or queries.any_stored(MemoryStore(config.home), namespaces):
        return None
    plan = IndexPlan(
        level0=index.level0_of_events(events, namespaces), stale={ns: ([], []) for ns in namespaces}
    )
    submit_plan(plan, namespaces, pool)
    return plan


def submit_plan(plan: IndexPlan, namespaces: list[str], pool: EncoderPool) -> None:
    """All of the plan's texts to the encoders, largest namespace first: namespaces finish in this
    order, and the last one's commit and index build are the flow's tail, with the encoders done;
    the smallest makes it shortest (LoCoMo dev: 0.2 s)."""

    def texts_of(ns: str) -> int:
        return len(plan.level0[ns][1]) + len(plan.stale[ns][1])

    parts = []
    for ns in sorted(namespaces, key=texts_of, reverse=True):
        new, texts = plan.level0[ns]
        parts.append((ns, [index.level0_id(i) for i in new.column("id").to_pylist()], texts))
        parts.append((ns, *plan.stale[ns]))
    pool.submit_many(parts)


def index_namespaces(
    config: RuntimeConfig,
    namespaces: list[str],
    pool: EncoderPool,
    *,
    show_progress: bool,
    plan: IndexPlan | None = None,
    phases: Phases | None = None,
) -> list[StageResult]:
    """Level-0 memories, embeddings and indexes for each namespace; each namespace's index run is
    recorded in the `runs` table. `plan`: from `plan_indexing` by the caller, else made here.
    `phases`: where the time went (runtime/phases.py), the encoders' reports with it."""
    phases = phases or Phases()
    with pool:  # closed on any error too, so the encoders stop instead of waiting for work
        if plan is None:
            with MemoryStore(config.home).hold(), phases.timed("plan"):
                plan = plan_indexing(config, namespaces, pool, phases=phases)
        return _embed_and_index(config, namespaces, pool, plan, phases, show_progress=show_progress)


@dataclass
class _Commits:
    """The embedding loop's stores: finished chunks wait in `ready` until a commit stores them (new
    level-0 rows with their embeddings, one insert per table for every namespace); namespaces whose
    rows are all stored wait in `unbuilt` until `group` of them (the worker pool's size: one read for
    all, their files written side by side) or the last commit. Their builds then run on the process
    pool while the loop goes on collecting and storing (`building`); a finished group's manifests are
    committed, in one transaction, at a later commit or by `finish_builds`."""

    home: Path
    store: MemoryStore
    fresh: dict[str, level0.PendingTables]  # namespace -> level-0 rows and ops rows being made, not stored
    built: dict[str, StageResult]
    created: dict[str, int]
    embedded: dict[str, int]
    group: int
    phases: Phases
    ready: dict[str, list[pa.Table]] = field(default_factory=dict)
    unbuilt: list[str] = field(default_factory=list)
    building: list[build_batch.PendingBuilds] = field(default_factory=list)

    def storable(self, *, last: bool = False) -> list[str]:
        """Namespaces with ready chunks whose level-0 rows are made (all of them when `last`: waits)."""
        return [ns for ns in self.ready if last or ns not in self.fresh or self.fresh[ns].done()]

    def waiting(self) -> bool:
        """Whether some ready chunks wait for their namespace's level-0 rows."""
        return len(self.storable()) < len(self.ready)

    def wait_some(self) -> None:
        """Wait until the first namespace whose ready chunks wait for its level-0 rows has them."""
        for ns in self.ready:
            if ns in self.fresh and not self.fresh[ns].done():
                self.fresh[ns].tables()
                return

    def rows_ready(self) -> int:
        return sum(t.num_rows for ns in self.storable() for t in self.ready[ns])

    def commit(self, complete: list[str], *, last: bool = False) -> None:
        """Store the ready chunks, then start the builds of the complete namespaces once `group` of
        them wait (or `last`), and commit the manifests of builds that have finished. Call in a hold."""
        if last:
            with self.phases.timed("level0_wait"):  # the level-0 rows still being made
                for ns in self.ready:
                    if ns in self.fresh:
                        self.fresh[ns].tables()
        with self.phases.timed("commit_embeddings"):
            self._store_ready(self.storable(last=last))
        complete = [ns for ns in complete if ns not in self.ready]  # stored: their rows are all in
        self.unbuilt += [ns for ns in complete if ns not in self.unbuilt and ns not in self.built]
        started = {ns for pending in self.building for ns in pending.namespaces}
        self.unbuilt = [ns for ns in self.unbuilt if ns not in started]
        if self.unbuilt and (last or len(self.unbuilt) >= self.group):
            with self.phases.timed("index_builds"):  # the rows' read here; the files on the pool
                self.building.append(
                    build_batch.start_builds(self.store, self.unbuilt, parallel=True, background=True)
                )
            self.unbuilt = []
        self.finish_builds(wait=False)

    def finish_builds(self, *, wait: bool) -> None:
        """Commit the manifests of the started builds that have finished (all of them, waiting, when
        `wait`), one transaction per group. Call in a hold."""
        with self.phases.timed("index_builds_wait" if wait else "index_builds"):
            for pending in [p for p in self.building if wait or p.done()]:
                for result in build_batch.finish_builds(self.store, pending):
                    self.built[result.namespace] = result
                self.building.remove(pending)

    def _store_ready(self, namespaces: list[str]) -> None:
        """The ready chunks' rows of `namespaces`: new level-0 memories inserted, stored ones'
        embeddings updated."""
        rows, ops = [], []
        for ns in namespaces:
            table = pa.concat_tables(self.ready.pop(ns))
            is_new = pa.array([False] * table.num_rows, pa.bool_())
            if ns in self.fresh:
                ns_rows, ns_ops = self.fresh[ns].tables()
                where = pc.index_in(table.column("id"), value_set=ns_rows.column("id"))
                is_new = pc.is_valid(where)
                take = pc.drop_null(where)
                emb = table.filter(is_new).column("embedding").cast(ns_rows.schema.field("embedding").type)
                picked = ns_rows.take(take)
                rows.append(picked.set_column(picked.schema.get_field_index("embedding"), "embedding", emb))
                ops.append(ns_ops.take(take))
            index.commit_embeddings(self.store, ns, table.filter(pc.invert(is_new)))
            self.embedded[ns] += table.num_rows
        if rows:
            for ns, n in level0.insert_level0(
                self.store, pa.concat_tables(rows), pa.concat_tables(ops)
            ).items():
                self.created[ns] += n


def _embed_and_index(
    config: RuntimeConfig,
    namespaces: list[str],
    pool: EncoderPool,
    plan: IndexPlan,
    phases: Phases,
    *,
    show_progress: bool,
) -> list[StageResult]:
    store = MemoryStore(config.home)
    with Progress("embedding", pool.outstanding_rows(), enabled=show_progress) as bar:
        making = StageResult("index.level0", "")
        with timed(making), phases.timed("level0_rows"):
            # quote: Prefect would otherwise walk every event of the plan looking for futures (2 s on LoCoMo).
            fresh = make_level0(config, quote(plan), span(namespaces))
        group = max(BUILD_GROUP, workers.pool_size())
        zeros = dict.fromkeys(namespaces, 0)
        commits = _Commits(
            config.home, store, fresh, dict(plan.built), dict(zeros), dict(zeros), group, phases
        )
        while pool.outstanding or commits.waiting():
            if pool.outstanding:
                with phases.timed("encoder_wait"):
                    done = pool.collect(timeout=WAIT_S)
                for ns, table in done:
                    commits.ready.setdefault(ns, []).append(table)
                    bar.advance(table.num_rows)
                if not pool.outstanding:
                    pool.close()  # the encoders end their task runs while the last chunks are stored
            else:  # every embedding is back: store namespaces as their level-0 rows are made
                with phases.timed("level0_wait"):
                    commits.wait_some()
            pending = pool.pending_namespaces()
            complete = [ns for ns in commits.storable() if ns not in pending]
            enough = COMMIT_ROWS if pool.outstanding else TAIL_COMMIT_ROWS
            if (pool.outstanding or commits.waiting()) and (
                len(complete) >= BUILD_GROUP or commits.rows_ready() >= enough
            ):
                with phases.timed("store_holds"), store.hold():
                    commits.commit(complete)
        pool.close()
        # the last step records every namespace's run with it: one store open
        with phases.timed("store_holds"), store.hold():
            commits.commit([ns for ns in namespaces if ns not in commits.built], last=True)
            commits.finish_builds(wait=True)
            with phases.timed("record_runs"):
                results = _index_results(namespaces, commits, making.duration_s / max(1, len(namespaces)))
                record_runs(store, results, flow_run_id=flow_run_id())
        with phases.timed("encoder_stop"):
            pool.stop()
        phases.encoders = pool.reports
    return results


def _index_results(namespaces: list[str], commits: _Commits, making_s: float) -> list[StageResult]:
    """Each namespace's `index` run: what it created, embedded and rebuilt."""
    results = []
    for ns in namespaces:
        built = commits.built[ns]
        r = StageResult("index", ns)
        r.changed = commits.created[ns] + commits.embedded[ns] + built.changed
        r.duration_s = built.duration_s + making_s
        r.figures = {
            "level0_created": commits.created[ns],
            "embedded": commits.embedded[ns],
            "indexes_rebuilt": built.changed,
            "memories_indexed": built.figures.get("memories_indexed", 0),
        }
        results.append(r)
    return results
