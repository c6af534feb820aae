"""Every MEMSTAGE_* environment variable, read in one place into one typed, frozen object.

Nothing else in memstage reads these variables: code asks `get_settings()` (read once per process,
cached) and passes values down through constructors. This module is a leaf: it imports nothing of
the project, so every room (flows, tasks, stores, gpu, cli, server, runtime) may read it without an
arrow pointing back up. Nothing here changes the environment when imported; `apply_process_defaults`
does that, called explicitly by the entry points (the CLI, `memstage serve`, Ray workers) before
Prefect, Ray or transformers are imported.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

RUNNERS = ("auto", "ray", "local")
GENERATORS = ("transformers", "vllm", "openai")
DEVICES = ("auto", "cpu", "cuda")
DEVICE_SCORING = ("auto", "off", "cpu")
VECTOR_BACKENDS = ("auto", "faiss", "torch", "numpy")
DTYPES = ("auto", "float32", "bfloat16")
# Tokens of memories the generator reads (the best-scored of the evidence), apart from the retrieval
# budget (which stays large, for recall). Chosen on LoCoMo dev by answer F1 and latency together:
# bench/results/answer_f1_cpu.json and query_latency_cpu.json.
DEFAULT_ANSWER_BUDGET = 100
# Packed memories whole by default: excerpts of 40 words gained loose credit but lost strict and
# answer credit on the dev split and every variant (1000 tokens: dev 0.861 -> 0.846 strict, long 0.769
# -> 0.762); 60 words (chosen on dev by LOCO) changed no figure by more than 0.007 either way
# (bench/results/excerpt_packing_cpu.md).
DEFAULT_EXCERPT_WORDS = 0


@dataclass(frozen=True)
class Settings:
    """memstage's configuration; each field names its variable and its default."""

    home: Path  # MEMSTAGE_HOME: the data directory (default ~/.memstage)
    runner: str  # MEMSTAGE_RUNNER: auto | ray | local
    models: Path | None  # MEMSTAGE_MODELS: converted model files shared between data directories
    threads: int | None  # MEMSTAGE_THREADS: torch threads of the services actor (default: all CPUs)
    encoders: int  # MEMSTAGE_ENCODERS: at most this many encoder workers on CPU-only Ray (default 16)
    device: str  # MEMSTAGE_DEVICE: auto | cpu | cuda[:N] for the encoder and the generator
    vector_backend: str  # MEMSTAGE_VECTOR_BACKEND: auto | faiss | torch | numpy
    encoder_fast: bool  # MEMSTAGE_ENCODER_FAST: batched CUDA encoder (default on; 0 = sentence-transformers)
    generator: str  # MEMSTAGE_GENERATOR: transformers | vllm | openai
    openai_base_url: str | None  # MEMSTAGE_OPENAI_BASE_URL (else OPENAI_BASE_URL): the openai engine's server
    openai_model: str | None  # MEMSTAGE_OPENAI_MODEL: the openai engine's model (default: the server's first)
    report_url: str | None  # MEMSTAGE_REPORT_URL: where `memstage report` output is published, if anywhere
    api_key: str | None  # MEMSTAGE_API_KEY: the key `memstage query` sends to a running `memstage serve`
    # MEMSTAGE_ARTIFACT_TEXT: 1 = Prefect artifacts, run names and logs may carry memory text, questions
    # and answers (default 0: ids, counts and scores only, so a hard forget has nothing to chase there)
    artifact_text: bool = False
    # MEMSTAGE_SCAN_WORKERS: processes that compute injection flags and token counts of a big ingest
    # and writes index files (tasks/workers.py; default all CPUs but two; 1 = in the flow's process)
    scan_workers: int | None = None
    # MEMSTAGE_ANSWER_BUDGET: tokens of the best-scored retrieved memories put in the generator's prompt
    answer_budget: int = DEFAULT_ANSWER_BUDGET
    # MEMSTAGE_GENERATOR_DTYPE: auto (bfloat16 on CUDA and on CPUs with bfloat16 instructions, where it
    # prefilled 3-5x faster than float32 here; else float32) | float32 | bfloat16
    generator_dtype: str = "auto"
    # MEMSTAGE_ENCODER_DTYPE: auto (float16 on CUDA; on CPUs with bfloat16 instructions bfloat16, which
    # embedded 32 questions 3.1x faster than float32 here, cosine to float32's vectors >= 0.9999; else
    # float32) | float32 | bfloat16
    encoder_dtype: str = "auto"
    # MEMSTAGE_DUCKDB_MEMORY: DuckDB's memory_limit for the store's connections, e.g. "2GB" (default:
    # DuckDB's own, 80% of RAM): a stage committing a million rows otherwise holds gigabytes of buffers
    duckdb_memory: str | None = None
    # MEMSTAGE_ENCODER_CHUNK: texts per chunk a batch flow sends an encoder (default by where it runs:
    # runtime/encoder_pool.CHUNK; a GPU encoder ran 52k texts/s in calls of 32,768, 32k in 4,096)
    encoder_chunk: int | None = None
    # MEMSTAGE_ENCODER_PRETOKENISE: on a GPU host the flow's worker pool tokenises the encoder's chunks
    # and sends token ids (gpu/encoder.tokenise), so the encoder's process only pads and runs the
    # model (default 1; 0 = the encoder tokenises the texts itself)
    encoder_pretokenise: bool = True
    # MEMSTAGE_DEVICE_SCORING: auto (where the namespace's vectors go to a CUDA card, every level-0 row
    # is scored there: tasks/scoring_device.py) | off (candidates from the indexes, scored on the host)
    # | cpu (the device path with torch on the CPU: O(n) a question, for checking it without a card)
    device_scoring: str = "auto"
    # MEMSTAGE_SESSION_SPREAD: z units a ranked memory's score drops for every better-ranked memory of
    # its own session before packing (tasks/diversity.py; default there, SESSION_SPREAD; 0 = packing
    # in the scorer's order)
    session_spread: float | None = None
    # MEMSTAGE_ENCODER_MODEL: a sentence-transformers folder (mean pooling) to embed with instead of the
    # packaged all-MiniLM-L6-v2 (gpu/encoder.model_info); a namespace indexed with one model is not
    # searched with another (tasks/retrieve.py says so)
    encoder_model: Path | None = None
    # MEMSTAGE_EXCERPT_WORDS: a packed level-0 memory of more than this many words is cut, at retrieval,
    # to its run of sentences nearest the question, within this many words (tasks/excerpt.py; 0 = off,
    # every memory packed whole). Measured in bench/results/excerpt_packing_cpu.md.
    excerpt_words: int = DEFAULT_EXCERPT_WORDS
    # MEMSTAGE_DROP_REPEATS: a sentence already packed for a question is not packed again
    # (tasks/repeats.py; 0 = off: only exact copies of a packed memory are skipped). Measured in
    # bench/results/repeats_cpu.md.
    drop_repeats: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        runner = env.get("MEMSTAGE_RUNNER") or "auto"
        generator = env.get("MEMSTAGE_GENERATOR") or "transformers"
        backend = env.get("MEMSTAGE_VECTOR_BACKEND") or "auto"
        device = env.get("MEMSTAGE_DEVICE") or "auto"
        dtype = env.get("MEMSTAGE_GENERATOR_DTYPE") or "auto"
        encoder_dtype = env.get("MEMSTAGE_ENCODER_DTYPE") or "auto"
        _check("MEMSTAGE_RUNNER", runner, RUNNERS)
        _check("MEMSTAGE_GENERATOR", generator, GENERATORS)
        _check("MEMSTAGE_VECTOR_BACKEND", backend, VECTOR_BACKENDS)
        _check("MEMSTAGE_DEVICE", device.split(":")[0], DEVICES)
        _check("MEMSTAGE_GENERATOR_DTYPE", dtype, DTYPES)
        _check("MEMSTAGE_ENCODER_DTYPE", encoder_dtype, DTYPES)
        device_scoring = env.get("MEMSTAGE_DEVICE_SCORING") or "auto"
        _check("MEMSTAGE_DEVICE_SCORING", device_scoring, DEVICE_SCORING)
        return cls(
            home=Path(env.get("MEMSTAGE_HOME") or "~/.memstage").expanduser(),
            runner=runner,
            models=Path(env["MEMSTAGE_MODELS"]).expanduser() if env.get("MEMSTAGE_MODELS") else None,
            threads=_int(env, "MEMSTAGE_THREADS", None),
            encoders=_int(env, "MEMSTAGE_ENCODERS", 16) or 16,
            device=device,
            vector_backend=backend,
            encoder_fast=env.get("MEMSTAGE_ENCODER_FAST", "1") != "0",
            generator=generator,
            openai_base_url=env.get("MEMSTAGE_OPENAI_BASE_URL") or env.get("OPENAI_BASE_URL") or None,
            openai_model=env.get("MEMSTAGE_OPENAI_MODEL") or None,
            report_url=env.get("MEMSTAGE_REPORT_URL") or None,
            api_key=env.get("MEMSTAGE_API_KEY") or None,
            artifact_text=env.get("MEMSTAGE_ARTIFACT_TEXT", "0") not in ("", "0", "false", "no"),
            scan_workers=_int(env, "MEMSTAGE_SCAN_WORKERS", None),
            answer_budget=_positive(env, "MEMSTAGE_ANSWER_BUDGET", DEFAULT_ANSWER_BUDGET),
            generator_dtype=dtype,
            encoder_dtype=encoder_dtype,
            duckdb_memory=_memory(env, "MEMSTAGE_DUCKDB_MEMORY"),
            encoder_chunk=_positive(env, "MEMSTAGE_ENCODER_CHUNK", 1)
            if env.get("MEMSTAGE_ENCODER_CHUNK")
            else None,
            encoder_pretokenise=env.get("MEMSTAGE_ENCODER_PRETOKENISE", "1") not in ("0", "false", "no"),
            device_scoring=device_scoring,
            session_spread=_non_negative(env, "MEMSTAGE_SESSION_SPREAD"),
            encoder_model=Path(env["MEMSTAGE_ENCODER_MODEL"]).expanduser()
            if env.get("MEMSTAGE_ENCODER_MODEL")
            else None,
            excerpt_words=_non_negative_int(env, "MEMSTAGE_EXCERPT_WORDS", DEFAULT_EXCERPT_WORDS),
            drop_repeats=_switch(env, "MEMSTAGE_DROP_REPEATS", True),
        )

    def worker_env(self) -> dict[str, str]:
        """The variables a Ray worker or a deployment run needs to see the same settings."""
        names = {f.name: f"MEMSTAGE_{f.name.upper()}" for f in fields(self)}
        out = {}
        for name, var in names.items():
            value = getattr(self, name)
            if value is None or name in ("openai_base_url", "api_key"):  # a secret stays in this process
                continue
            out[var] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        if self.openai_base_url:
            out["MEMSTAGE_OPENAI_BASE_URL"] = self.openai_base_url
        return out


def _memory(env: Mapping[str, str], var: str) -> str | None:
    import re

    value = (env.get(var) or "").strip()
    if value and not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?)?B", value):
        raise ValueError(f"{var}={value!r} is not an amount of memory such as 2GB or 512MiB")
    return value or None


def _check(var: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{var}={value!r} is not one of {', '.join(allowed)}")


def _int(env: Mapping[str, str], var: str, default: int | None) -> int | None:
    raw = env.get(var)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not an integer") from None


def _positive(env: Mapping[str, str], var: str, default: int) -> int:
    value = _int(env, var, default)
    if value is None or value < 1:
        raise ValueError(f"{var}={env.get(var)!r} must be a positive integer")
    return value


def _non_negative(env: Mapping[str, str], var: str) -> float | None:
    raw = (env.get(var) or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise ValueError(f"{var}={raw!r} must be a finite number >= 0")
    return value


def _switch(env: Mapping[str, str], var: str, default: bool) -> bool:
    raw = (env.get(var) or "").strip().lower()
    if not raw:
        return default
    if raw not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ValueError(f"{var}={raw!r} is not one of 1, 0, true, false, yes, no, on, off")
    return raw in ("1", "true", "yes", "on")


def _non_negative_int(env: Mapping[str, str], var: str, default: int) -> int:
    value = _int(env, var, default)
    if value is None or value < 0:
        raise ValueError(f"{var}={env.get(var)!r} must be 0 or a positive integer")
    return value


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings.from_env()


def reload_settings() -> Settings:
    """Forget the cached settings (tests that change the environment call this)."""
    get_settings.cache_clear()
    return get_settings()


# Defaults every memstage process wants before Prefect, Ray or transformers are imported: no
# telemetry (no network on the machines this runs on), offline models, quiet tokenizers. Each is a
# default only: a variable already set wins.
PROCESS_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    # The temporary server takes 7-18 s to come up on a busy 2-core machine; Prefect's default is 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


# Defaults of the processes a person waits on (`memstage serve`, `query`, `retrieve`): torch's OpenMP
# threads sleep between operations instead of spinning. `memstage serve` answers on a pool of request
# threads, each with its own OpenMP team, and idle teams that spin starve the one computing: with the
# default 2 threads on the shared 2-core machine, a warm query's p50 was 19.2 s spinning, 1.09 s passive
# (bench/results/query_latency_cpu.json). Read when torch starts, so set before it is imported.
SERVING_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_process_defaults(*, serving: bool = False) -> None:
    """Set PROCESS_DEFAULTS (and with `serving`, SERVING_DEFAULTS) where unset. Called by entry points,
    never at import time."""
    for name, value in {**PROCESS_DEFAULTS, **(SERVING_DEFAULTS if serving else {})}.items():
        os.environ.setdefault(name, value)
