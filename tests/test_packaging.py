"""The distribution installs one importable name, `memstage`, with every room as its subpackage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_install_leaves_only_memstage_in_site_packages(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    top = {p.name for p in target.iterdir()} - {"bin"}  # bin/: the `memstage` console script
    assert {n for n in top if not n.endswith(".dist-info")} == {"memstage"}
    assert [n for n in top if n.endswith(".dist-info")][0].startswith("memstage-")
    rooms = {p.name for p in (target / "memstage").iterdir() if (p / "__init__.py").exists()}
    assert rooms == {"flows", "tasks", "stores", "gpu", "dashboards", "cli", "server", "runtime"}
    assert (target / "memstage" / "cli" / "samples" / "sample_conversation.jsonl").is_file()
    code = "import memstage.tasks.registry as r; print(','.join(r.STAGE_NAMES))"
    out = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(target)}, capture_output=True, text=True
    )
    assert out.stdout.strip() == "compress,consolidate,update,index,forget", out.stderr[-2000:]
