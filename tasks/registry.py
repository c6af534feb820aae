"""The one list of maintenance stages: what each is called, what it does, and the function that runs it.

Everything that names the stages reads this list: the stage flows and the maintain chain
(`flows/stages.py`), the CLI (`memstage run STAGE`, `memstage maintain`), the deployments file's
generator (`cli/ops_commands.py`), the report's colours (`dashboards/report.py`) and the tests.
Adding a stage means one module in `tasks/` with a function `(store, namespace, tools) ->
StageResult` that keeps the stage contract (`tasks/contract.py`), plus one `Stage(...)` line below.
`STAGES` is also the order `memstage maintain` runs them in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from memstage.stores.store import MemoryStore
from memstage.tasks import compress, consolidate, forget, index, update
from memstage.tasks.contract import CountTokens, Embed, StageResult


@dataclass(frozen=True)
class StageTools:
    """What a stage may use besides the store: the encoder, the token counter, the flow run's id."""

    embed: Embed
    count_tokens: CountTokens
    flow_run_id: str | None = None


RunStage = Callable[[MemoryStore, str, StageTools], StageResult]


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str  # one line: CLI help, the deployments' descriptions, the docs
    run: RunStage
    # The index stage's embeddings go through the flow's encoder pool (flows/index_pipeline.py), every
    # core encoding at once; `run` is its in-process equivalent (library calls and unit tests).
    uses_encoder_pool: bool = False


def _compress(store: MemoryStore, namespace: str, tools: StageTools) -> StageResult:
    # Level-0 memories of events not materialised yet (the index stage does this too; both no-ops when done).
    made = index.materialise_level0(
        store, namespace, count_tokens=tools.count_tokens, flow_run_id=tools.flow_run_id
    )
    result = compress.run_compress(
        store, namespace, count_tokens=tools.count_tokens, flow_run_id=tools.flow_run_id, embed=tools.embed
    )
    result.changed += made.changed
    result.figures["level0_created"] = made.changed
    return result


def _consolidate(store: MemoryStore, namespace: str, tools: StageTools) -> StageResult:
    return consolidate.run_consolidate(
        store, namespace, embed=tools.embed, count_tokens=tools.count_tokens, flow_run_id=tools.flow_run_id
    )


def _update(store: MemoryStore, namespace: str, tools: StageTools) -> StageResult:
    return update.run_update(store, namespace, embed=tools.embed, flow_run_id=tools.flow_run_id)


def _index(store: MemoryStore, namespace: str, tools: StageTools) -> StageResult:
    return index.run_index(
        store, namespace, embed=tools.embed, count_tokens=tools.count_tokens, flow_run_id=tools.flow_run_id
    )


def _forget(store: MemoryStore, namespace: str, tools: StageTools) -> StageResult:
    result = forget.run_forget(store, namespace, embed=tools.embed, flow_run_id=tools.flow_run_id)
    if result.figures.get("archived"):  # archived memories leave the indexes now, not at the next index run
        index.build_indexes(store, namespace, flow_run_id=tools.flow_run_id)
    return result


STAGES: tuple[Stage, ...] = (
    Stage("compress", "shorter text for the same facts, with the ratio recorded", _compress),
    Stage("consolidate", "related memories grouped into session and topic nodes", _consolidate),
    Stage("update", "a newer fact supersedes an older one; history kept", _update),
    Stage("index", "embeddings, vector and lexical indexes for every level", _index, uses_encoder_pool=True),
    Stage("forget", "the namespace's retention policy: TTL, decay, capacity", _forget),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
STAGE_NAMES: tuple[str, ...] = tuple(BY_NAME)


def get_stage(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGE_NAMES)}") from None
