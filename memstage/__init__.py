"""memstage: long-term memory for LLM agents, kept by batch stages (Prefect flows whose tasks run on Ray
over one DuckDB/Arrow store per data directory).

The repository's top-level folders install as this package's subpackages (see pyproject.toml):
`memstage.flows` (Prefect flows), `memstage.tasks` (one module per memory operation),
`memstage.stores` (DuckDB + Arrow, all SQL), `memstage.gpu` (encoder, indexes, generator, KV cache),
`memstage.cli`, `memstage.server`, `memstage.runtime` and `memstage.dashboards`.
`memstage.settings` reads every MEMSTAGE_* environment variable, once.
"""

__version__ = "0.2.0"
