"""`--as-of` on `memstage retrieve`/`query` and `--variants` on `memstage eval locomo`: a date or a
variant the command cannot read is a user error (exit 2, one line) before any model or store opens."""

from __future__ import annotations

import subprocess
import sys

import pytest

CLI = [sys.executable, "-c", "import sys; from memstage.cli.main import main; sys.exit(main())"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["retrieve", "what did I do last month?", "--namespace", "demo", "--as-of", "last tuesday"],
            "--as-of",
        ),
        (["query", "what changed?", "--namespace", "demo", "--as-of", "2023-02-30"], "--as-of"),
        (["eval", "locomo", "{data}", "--variants", "shouting"], "unknown variant"),
    ],
)
def test_unreadable_as_of_or_variant_is_a_one_line_user_error(tmp_path, argv, says):
    data = tmp_path / "x.json"
    data.write_text("[]")
    argv = [a.replace("{data}", str(data)) for a in argv]
    proc = subprocess.run(
        [*CLI, *argv, "--home", str(tmp_path / "home")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "home" / "memstage.duckdb").exists()
