"""`memstage query`/`retrieve` through a warm `memstage serve` (HOME/serve.json), the cold path without
Prefect, the query's `runs` row, and GET /report: real store, models, uvicorn and HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest
from conftest import REPO, serve_in_thread

QUESTION = "What is the name of Sam's dog?"


@pytest.fixture
def warm_service(indexed_sample, encoder, token_counter, monkeypatch):
    """`memstage serve`'s app over the sample store, announced in HOME/serve.json like cmd_serve does."""
    from memstage.runtime import services as services_mod
    from memstage.runtime.backends import RuntimeConfig
    from memstage.server.app import create_app
    from memstage.server.local import write_service_file

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    home = indexed_sample.home
    svc = services_mod.services(RuntimeConfig(home=home, runner="local"), use_ray=False)
    svc._encoder, svc._counter = encoder, token_counter  # the session's models: no second load
    from memstage.stores.keys import KeyRing

    token = "local-token-of-this-test"  # cmd_serve makes a random one per process
    url, server = serve_in_thread(create_app(svc, keys=KeyRing(home), local_token=token))
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    write_service_file(home, "127.0.0.1", port, token=token)
    yield home, url.removesuffix("/v1")
    server.should_exit = True
    services_mod._local.pop(str(home), None)


def test_retrieve_goes_to_the_warm_service_and_is_recorded(warm_service, capfd):
    from memstage.cli.main import main
    from memstage.stores import access_log, queries
    from memstage.stores.store import MemoryStore

    home, _ = warm_service
    assert main(["retrieve", QUESTION, "--namespace", "demo", "--home", str(home), "--json"]) == 0
    out, err = capfd.readouterr()
    result = json.loads(out)
    assert "answered by the warm service" in err and "cold" not in err
    assert result["served"]["pid"] == os.getpid() and result["served"]["flow_run_id"] is None
    assert any("Pepper" in m["text"] for m in result["memories"])
    access_log.flush_now(home)  # the server's flusher merges the journal within a second; not wait for it
    [run] = [r for r in queries.runs(MemoryStore(home), "demo") if r["stage"] == "query"]
    assert run["figures"]["served_by"] == "serve" and run["figures"]["memories"] == len(result["memories"])
    assert "answered" not in run["figures"]  # retrieval only: no answer to judge
    assert QUESTION not in json.dumps(run["figures"])  # numbers only, never the question's text


def test_unknown_namespace_through_the_service_is_a_user_error(warm_service, capfd):
    from memstage.cli.main import main

    home, _ = warm_service
    assert main(["retrieve", QUESTION, "--namespace", "nobody", "--home", str(home)]) == 2
    assert "not found" in capfd.readouterr().err


def test_report_is_served_over_http(warm_service):
    home, base = warm_service
    with pytest.raises(urllib.error.HTTPError) as err:  # the report reads every namespace: a key is needed
        urllib.request.urlopen(base + "/report?namespace=demo", timeout=30)
    assert err.value.code == 401
    token = json.loads((home / "serve.json").read_text())["token"]
    opener = urllib.request.build_opener()
    opener.addheaders = [("Authorization", f"Bearer {token}")]
    urllib.request.install_opener(opener)
    with urllib.request.urlopen(base + "/report?namespace=demo", timeout=60) as r:
        page = r.read().decode()
        assert r.headers["content-type"].startswith("text/html")
    assert page.count("<svg") == 7 and "memstage · demo" in page
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/report?namespace=nobody", timeout=30)
    assert err.value.code == 404
    urllib.request.install_opener(urllib.request.build_opener())


def test_stale_service_file_is_ignored(tmp_path):
    from memstage.server.local import SERVICE_FILE, find_service, remove_service_file, write_service_file

    write_service_file(tmp_path, "0.0.0.0", 8123)
    info = find_service(tmp_path)
    assert info["url"] == "http://127.0.0.1:8123" and info["pid"] == os.getpid()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    (tmp_path / SERVICE_FILE).write_text(json.dumps({**info, "pid": int(dead.stdout)}))
    assert find_service(tmp_path) is None  # its process is gone: the query goes cold
    (tmp_path / SERVICE_FILE).write_text("{not json")
    assert find_service(tmp_path) is None
    write_service_file(tmp_path, "127.0.0.1", 8123)
    remove_service_file(tmp_path)
    assert not (tmp_path / SERVICE_FILE).exists()


def test_cold_retrieve_imports_neither_prefect_nor_sentence_transformers(indexed_sample):
    """No service, no PREFECT_API_URL: the steps run in-process without Prefect, and are recorded."""
    from memstage.stores import queries

    code = (
        "import sys, json; from memstage.cli.main import main; "
        f"rc = main(['retrieve', {QUESTION!r}, '--namespace', 'demo', '--home', {str(indexed_sample.home)!r},"
        " '--json']); print(json.dumps({'rc': rc, 'prefect': 'prefect' in sys.modules,"
        " 'sentence_transformers': 'sentence_transformers' in sys.modules}), file=sys.stderr)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO.parent, timeout=300
    )
    status = json.loads(proc.stderr.strip().splitlines()[-1])
    # nor sentence-transformers (seconds of imports): the query encoder loads with transformers alone
    assert status == {"rc": 0, "prefect": False, "sentence_transformers": False}, proc.stderr[-2000:]
    assert "cold query" in proc.stderr and "no PREFECT_API_URL" in proc.stderr
    assert json.loads(proc.stdout)["memories"]
    runs = [r for r in queries.runs(indexed_sample, "demo") if r["stage"] == "query"]
    assert [r["figures"]["served_by"] for r in runs] == ["cli"]


def test_query_figures_say_whether_it_answered():
    from memstage.flows.query_steps import answered, query_figures

    assert answered("Pepper.") and not answered("") and not answered("I don't know.")
    assert not answered("  There is no information about that.")
    figures = query_figures(
        {"memories": [{}], "tokens": 40, "budget": 400, "latency_ms": 12.0, "total_ms": 900.0,
         "answer": "Pepper", "usage": {"prompt_tokens": 200, "cached_tokens": 150, "completion_tokens": 3}},
        answer=True, served_by="serve",
    )  # fmt: skip
    assert figures["hit_token_share"] == 0.75 and figures["answered"] is True
    assert figures["prompt_tokens"] == 200 and figures["completion_tokens"] == 3


def test_query_command_line_imports_nothing_heavy_before_it_knows_where_to_ask():
    """The warm path's start-up: parsing `memstage query` loads no model, store, Prefect or web stack."""
    code = (
        "import sys; from memstage.cli.main import build_parser, LIGHT_COMMANDS; "
        "build_parser([LIGHT_COMMANDS['query']]).parse_args(['query', 'q', '--namespace', 'demo']); "
        "import memstage.server.local, memstage.cli.commands; "
        "print(sorted(m for m in ('numpy', 'duckdb', 'pyarrow', 'prefect', 'torch', 'fastapi') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
