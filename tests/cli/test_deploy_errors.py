"""`memstage deploy` says in one line what is missing before it touches anything."""

from __future__ import annotations

from conftest import free_port

from memstage.cli.main import main


def test_deploy_without_a_server_answers_in_one_line(tmp_path, capfd, monkeypatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["deploy", "--home", str(tmp_path)]) == 2
    assert "PREFECT_API_URL is not set" in capfd.readouterr().err

    api = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    monkeypatch.setenv("PREFECT_API_URL", api)
    assert main(["deploy", "--home", str(tmp_path)]) == 2
    err = capfd.readouterr().err
    assert f"no Prefect server answers at {api}" in err and "Traceback" not in err
