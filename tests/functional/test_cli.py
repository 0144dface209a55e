"""The ``spotctl`` CLI as a user runs it: against the app served over HTTP (Chalice's
local server on moto), and against answers no spotctl API gives. A mistake in the spec
file or an odd answer is one ``spotctl:`` line and exit 1, never a traceback."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
import yaml

from spotctl import cli
from tests.functional.conftest import TOKEN, Env
from tests.functional.test_cli_wait import FakeTime, ScriptedApi, view

SPEC = "name: resnet\ncommand: [python, train.py]\ninstance_types: [g4dn.xlarge]\nvolume_gib: 20\n"


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTCTL_API_TOKEN", TOKEN)
    monkeypatch.delenv("SPOTCTL_API_URL", raising=False)


def spotctl(url: str, *argv: str) -> int:
    return cli.main(["--api-url", url, *argv])


def test_a_yaml_deadline_reaches_the_api_as_written(
    api_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC + "deadline: 2099-12-01T00:00:00Z\nexpected_hours: 10\n")
    assert spotctl(api_url, "submit", str(spec), "--json") == 0
    job = json.loads(capsys.readouterr().out)
    assert job["spec"]["deadline"] == "2099-12-01T00:00:00Z"


@pytest.mark.parametrize(
    ("name", "text", "told"),
    [
        ("missing.yaml", None, "cannot read it: [Errno 2] No such file or directory"),
        (
            "bad.yaml",
            SPEC + "command: [python\n",
            "not valid yaml: line 6, column 1: expected ',' or ']', but got '<stream end>'",
        ),
        ("bad.json", "{not json", "not valid json: Expecting property name enclosed in"),
        ("latin1.json", b"\xff\xfe{}", "cannot read it: 'utf-8' codec can't decode"),
    ],
)
def test_a_spec_file_spotctl_cannot_read_is_one_line_and_sends_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    text: str | bytes | None,
    told: str,
) -> None:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    with ScriptedApi([(200, {})]) as api:
        assert spotctl(api.url, "submit", str(path)) == 1
    assert api.requests == []
    err = capsys.readouterr().err
    assert err.startswith(f"spotctl: {path}: {told}")
    assert len(err.splitlines()) == 1


def test_answers_no_spotctl_api_gives_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with ScriptedApi([(200, b"<html>sign in to the guest wifi</html>")]) as api:
        assert spotctl(api.url, "status", "j-00000000000000aa") == 1
    assert "the answer is not JSON (is http://127.0.0.1:" in capsys.readouterr().err

    with ScriptedApi([(200, [])]) as api:
        assert spotctl(api.url, "jobs") == 1
    assert "the API's answer is not what spotctl expects" in capsys.readouterr().err

    assert spotctl("http://[::1", "jobs") == 1
    assert capsys.readouterr().err.startswith("spotctl: not a URL: http://[::1")

    with socket.socket() as listener:  # something that is not HTTP on the port
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def babble() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(4096)
                connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

        threading.Thread(target=babble, daemon=True).start()
        assert spotctl(f"http://127.0.0.1:{port}", "jobs") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"spotctl: cannot reach the spotctl API at http://127.0.0.1:{port}")
    assert "Traceback" not in err


def test_jobs_lists_every_page_newest_first(
    api_url: str,
    env: Env,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli, "PAGE", 2)  # five jobs make three pages
    spec = tmp_path / "job.yaml"
    for i in range(5):
        spec.write_text(SPEC.replace("resnet", f"run{i}"))
        env.clock.advance(1)
        assert spotctl(api_url, "submit", str(spec)) == 0
    capsys.readouterr()

    assert spotctl(api_url, "jobs") == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[1] for row in rows] == ["run4", "run3", "run2", "run1", "run0"]

    assert spotctl(api_url, "jobs", "--limit", "3", "--json") == 0
    listed = json.loads(capsys.readouterr().out)["jobs"]
    assert [j["name"] for j in listed] == ["run4", "run3", "run2"]

    with pytest.raises(SystemExit):
        spotctl(api_url, "jobs", "--limit", "0")
    assert "not a positive whole number: 0" in capsys.readouterr().err


def test_submit_sends_a_client_token_and_the_same_submission_again_when_unanswered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "WAIT_CLOCK", FakeTime())
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC)
    posts = [(504, {"message": "Endpoint request timed out"}), (201, view("SUBMITTED"))]
    with ScriptedApi([(200, {})], posts) as api:
        assert spotctl(api.url, "submit", str(spec)) == 0
    bodies = [json.loads(r.split(" ", 2)[2]) for r in api.requests]
    assert len(bodies) == 2
    assert bodies[0] == bodies[1]
    assert len(bodies[0]["client_token"]) == 32
    assert "HTTP 504" in capsys.readouterr().err

    with ScriptedApi([(200, {})], [(201, view("SUBMITTED"))]) as api:
        assert spotctl(api.url, "submit", str(spec)) == 0
    assert json.loads(api.requests[0].split(" ", 2)[2])["client_token"] != bodies[0]["client_token"]


def test_submit_does_not_resend_to_a_deployment_that_lacks_a_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 503 that waiting will not cure (the API's NotConfiguredError): one try, said.
    monkeypatch.setattr(cli, "WAIT_CLOCK", FakeTime())
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC)
    message = "this deployment cannot launch instances yet: api_url is not set"
    posts = [(503, {"Code": "NotConfiguredError", "Message": message})]
    with ScriptedApi([(200, {})], posts) as api:
        assert spotctl(api.url, "submit", str(spec)) == 1
    assert len(api.requests) == 1
    err = capsys.readouterr().err
    assert err == f"spotctl: POST /jobs: HTTP 503: {message}\n"
    # A 503 of another kind (busy) is sent again, as before.
    busy = [(503, {"Code": "ServiceUnavailableError", "Message": "busy"}), (201, view("SUBMITTED"))]
    with ScriptedApi([(200, {})], busy) as api:
        assert spotctl(api.url, "submit", str(spec)) == 0
    assert len(api.requests) == 2


def test_a_resent_submission_reaches_the_job_the_first_made(
    api_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({**yaml.safe_load(SPEC), "client_token": "mine-1"}))
    assert spotctl(api_url, "submit", str(spec)) == 0
    assert spotctl(api_url, "submit", str(spec)) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first.split()[0] == second.split()[0]
    assert spotctl(api_url, "jobs", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)["jobs"]) == 1
