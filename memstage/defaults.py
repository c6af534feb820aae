"""Constants the command line needs before it imports anything heavy (a leaf: stdlib only).

`memstage query` against a warm `memstage serve` must parse its arguments and reach the service
without importing numpy, pyarrow, DuckDB, Prefect or torch; the tasks that own these values import
them from here.
"""

DEFAULT_BUDGET = 1000  # evidence tokens per question (tasks.retrieve)
FORMATS = ("auto", "jsonl", "locomo", "parquet")  # input formats of ingest (tasks.ingest)
