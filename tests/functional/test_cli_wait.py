"""``spotctl wait`` / ``submit --wait`` / ``logs --follow`` against an HTTP API that
answers from a script: every event printed once, the exit code of the state the job
ended in, an unreachable or failing API tried again with backoff (for a while), and
any other API error ending the wait at once."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from spotctl import cli

JOB_ID = "j-00000000000000aa"


def event(minute: int, kind: str, attempt: int | None = None, detail: str = "") -> dict[str, Any]:
    at = f"2026-11-29T10:{minute:02d}:00Z"
    return {"at": at, "kind": kind, "attempt": attempt, "detail": detail}


def view(state: str, *events: dict[str, Any], failure: str | None = None) -> dict[str, Any]:
    return {"job_id": JOB_ID, "state": state, "events": list(events), "failure": failure}


SUBMITTED = event(0, "submitted", detail="resnet")
LAUNCHED = event(1, "launched", 1, "p3.2xlarge in us-east-1a (spot)")
WARNED = event(9, "interruption-warning", 1)
ENDED = event(30, "exited", 2, "exit code 0")


class ScriptedApi:
    """Answers GET /jobs/<id> with the next (status, body) of its script, the last
    one for good; POST /jobs likewise from ``posts``."""

    def __init__(
        self, script: list[tuple[int, Any]], posts: list[tuple[int, Any]] | None = None
    ) -> None:
        self.script = script
        self.posts = posts or [(201, view("SUBMITTED", SUBMITTED))]
        self.requests: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.requests.append(f"GET {self.path}")
                self._answer(*(api.script.pop(0) if len(api.script) > 1 else api.script[0]))

            def do_POST(self) -> None:
                length = int(self.headers["content-length"])
                api.requests.append(f"POST {self.path} {self.rfile.read(length).decode()}")
                self._answer(*(api.posts.pop(0) if len(api.posts) > 1 else api.posts[0]))

            def _answer(self, status: int, body: Any) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> ScriptedApi:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(cli, "WAIT_CLOCK", fake)
    monkeypatch.delenv("SPOTCTL_API_TOKEN", raising=False)
    monkeypatch.delenv("SPOTCTL_API_URL", raising=False)
    return fake


def run(api: ScriptedApi, *argv: str) -> int:
    return cli.main(["--api-url", api.url, *argv])


@pytest.mark.parametrize(
    ("state", "code", "failure"),
    [("SUCCEEDED", 0, None), ("FAILED", 3, "exit code 2"), ("CANCELLED", 4, None)],
)
def test_wait_prints_each_event_once_and_exits_with_the_jobs_end(
    fake_time: FakeTime,
    capsys: pytest.CaptureFixture[str],
    state: str,
    code: int,
    failure: str | None,
) -> None:
    script = [
        (200, view("PROVISIONING", SUBMITTED, LAUNCHED)),
        (200, view("RUNNING", SUBMITTED, LAUNCHED)),
        (200, view("INTERRUPTED", SUBMITTED, LAUNCHED, WARNED)),
        # The timeline keeps its newest events only: the first has dropped out.
        (200, view(state, LAUNCHED, WARNED, ENDED, failure=failure)),
    ]
    with ScriptedApi(script) as api:
        assert run(api, "wait", JOB_ID, "--interval", "2") == code
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in out[:-1]] == [
        "submitted",
        "launched",
        "interruption-warning",
        "exited",
    ]
    assert out[-1] == f"{JOB_ID} {state}" + (f": {failure}" if failure else "")
    assert fake_time.slept == [2.0, 2.0, 2.0]
    assert api.requests == [f"GET /jobs/{JOB_ID}"] * 4


def test_an_unreachable_api_is_tried_again_with_backoff(
    fake_time: FakeTime, capsys: pytest.CaptureFixture[str]
) -> None:
    script = [
        (503, {"Message": "Service Unavailable"}),
        (429, {"Message": "Too Many Requests"}),
        (502, {"Message": "Bad Gateway"}),
        (200, view("RUNNING", SUBMITTED)),
        (200, view("SUCCEEDED", SUBMITTED, ENDED)),
    ]
    with ScriptedApi(script) as api:
        assert run(api, "wait", JOB_ID, "--interval", "5") == 0
    assert fake_time.slept == [10.0, 20.0, 40.0, 5.0]  # doubled, then back to the interval
    err = capsys.readouterr().err
    assert "HTTP 503: Service Unavailable; trying again" in err
    assert "HTTP 429" in err


def test_an_api_down_for_too_long_ends_the_wait(
    fake_time: FakeTime, capsys: pytest.CaptureFixture[str]
) -> None:
    with ScriptedApi([(503, {"Message": "down"})]) as api:
        assert run(api, "wait", JOB_ID) == 1
    assert fake_time.now > cli.FOLLOW_OUTAGE_SECONDS
    assert max(fake_time.slept) == cli.FOLLOW_BACKOFF_MAX_SECONDS
    assert "gave up after 1800 s" in capsys.readouterr().err


def test_a_closed_port_counts_as_unreachable(
    fake_time: FakeTime, capsys: pytest.CaptureFixture[str]
) -> None:
    with ScriptedApi([(200, view("RUNNING"))]) as api:
        url = api.url
    assert cli.main(["--api-url", url, "wait", JOB_ID, "--timeout", "100"]) == cli.EXIT_TIMEOUT
    err = capsys.readouterr().err
    assert f"cannot reach the spotctl API at {url}" in err
    assert "still unknown after 100 s" in err


def test_an_error_that_asking_again_cannot_fix_ends_the_wait_at_once(
    fake_time: FakeTime, capsys: pytest.CaptureFixture[str]
) -> None:
    with ScriptedApi([(404, {"Message": f"no job {JOB_ID}"})]) as api:
        assert run(api, "wait", JOB_ID) == 1
    assert fake_time.slept == []
    assert capsys.readouterr().err == f"spotctl: GET /jobs/{JOB_ID}: HTTP 404: no job {JOB_ID}\n"


def test_wait_gives_up_at_its_timeout_with_exit_5(
    fake_time: FakeTime, capsys: pytest.CaptureFixture[str]
) -> None:
    with ScriptedApi([(200, view("RUNNING", SUBMITTED))]) as api:
        assert run(api, "wait", JOB_ID, "--interval", "10", "--timeout", "35") == 5
    captured = capsys.readouterr()
    assert captured.out.count("submitted") == 1
    assert "still RUNNING after 35 s" in captured.err
    assert fake_time.slept == [10.0, 10.0, 10.0, 5.0]  # not past the timeout


def test_submit_wait_and_logs_follow_follow_the_job(
    fake_time: FakeTime, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: resnet\ncommand: [python, train.py]\n")
    ended = [(200, view("FAILED", SUBMITTED, ENDED, failure="exit code 2"))]
    with ScriptedApi(list(ended)) as api:
        assert run(api, "submit", str(spec), "--wait") == 3
    assert api.requests[0].startswith("POST /jobs ")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{JOB_ID} SUBMITTED"
    assert out[-1] == f"{JOB_ID} FAILED: exit code 2"
    with ScriptedApi(list(ended)) as api:
        assert run(api, "logs", JOB_ID, "--follow") == 3
    assert "exited" in capsys.readouterr().out


def test_waiting_options_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit) as exited:
            cli.main(["wait", JOB_ID, "--interval", bad])
        assert exited.value.code == 2
        assert "not a positive number of seconds" in capsys.readouterr().err
