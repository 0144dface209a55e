"""Who may do what: users with the API's credentials, agents with their own job's
secret only, EC2 events only for our instances; no secret in a log or an answer."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from chalicelib import runtime
from chalicelib.agent_auth import derive_secret, hash_secret
from chalicelib.openapi import document
from spotctl import cli
from tests.functional.conftest import SIGNING_KEY, TABLE, Env

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "sandbox-token-0123456789abcdef0123456789"
SPEC: dict[str, Any] = {
    "name": "resnet",
    "command": ["python", "train.py"],
    "instance_types": ["g4dn.xlarge"],
    "volume_gib": 20,
}
JSON = {"content-type": "application/json"}
BEARER = {**JSON, "authorization": f"Bearer {TOKEN}"}


class Calls:
    """Every AWS operation the control plane's own clients make, by name."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, model: Any, **_: Any) -> None:
        self.names.append(model.name)

    def writes(self) -> list[str]:
        reads = ("Get", "Describe", "Query", "Scan", "BatchGet")
        return [name for name in self.names if not name.startswith(reads)]


@pytest.fixture
def calls(env: Env) -> Iterator[Calls]:
    plane = runtime.control_plane()
    recorder = Calls()
    clients = [plane.store._client, plane.reconciler.ec2._client]
    for client in clients:
        client.meta.events.register("before-call.*.*", recorder)
    yield recorder
    for client in clients:
        client.meta.events.unregister("before-call.*.*", recorder)


def use_auth(mode: str, token: str = TOKEN) -> None:
    plane = runtime.control_plane()
    plane.config = dataclasses.replace(plane.config, auth=mode, api_token=token)  # type: ignore[arg-type]


@pytest.fixture
def token_env(env: Env) -> Env:
    use_auth("token")
    return env


def world(env: Env) -> tuple[Any, ...]:
    """Everything a call could have written: the table, the instances, the volumes."""
    dynamodb = boto3.client("dynamodb", region_name="us-east-1")  # moto, by AWS_ENDPOINT_URL
    items = dynamodb.scan(TableName=TABLE)["Items"]
    instances = env.ec2.describe_instances()["Reservations"]
    return (sorted(json.dumps(i, sort_keys=True) for i in items), instances, env.cloud.volumes())


def submit(env: Env, headers: dict[str, str] = BEARER) -> Any:
    return env.client.http.post("/jobs", headers=headers, body=json.dumps(SPEC))


# -- users ---------------------------------------------------------------------------------


USER_CALLS = [
    ("POST", "/jobs"),
    ("GET", "/jobs"),
    ("GET", "/jobs/{job_id}"),
    ("DELETE", "/jobs/{job_id}"),
]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        TOKEN.upper(),
        TOKEN,  # no scheme
        f"Basic {TOKEN}",
        f"Bearer{TOKEN}",
    ],
)
def test_user_routes_without_the_token_are_401_and_write_nothing(
    token_env: Env, authorization: str | None
) -> None:
    job_id = json.loads(submit(token_env).body)["job_id"]
    before = world(token_env)
    headers = dict(JSON)
    if authorization is not None:
        headers["authorization"] = authorization
    for method, path in USER_CALLS:
        body = json.dumps(SPEC).encode() if method == "POST" else b""
        response = token_env.client.http.request(
            method, path.format(job_id=job_id), headers=headers, body=body
        )
        assert response.status_code == 401, (method, path, response.body)
    assert world(token_env) == before


def test_user_routes_with_the_token_work(token_env: Env) -> None:
    response = submit(token_env)
    assert response.status_code == 201
    job_id = json.loads(response.body)["job_id"]
    assert token_env.client.http.get(f"/jobs/{job_id}", headers=BEARER).status_code == 200
    for scheme in ("bearer", "BEARER"):  # the scheme is case-insensitive (RFC 7235)
        headers = {"authorization": f"{scheme}  {TOKEN}"}
        assert token_env.client.http.get(f"/jobs/{job_id}", headers=headers).status_code == 200
    assert token_env.client.http.get("/jobs", headers=BEARER).status_code == 200
    assert token_env.client.http.delete(f"/jobs/{job_id}", headers=BEARER).status_code == 200


def test_token_mode_without_a_configured_token_refuses_everyone(env: Env) -> None:
    use_auth("token", token="")
    for authorization in ("Bearer ", "Bearer x", f"Bearer {TOKEN}"):
        response = submit(env, {**JSON, "authorization": authorization})
        assert response.status_code == 401
    assert env.cloud.volumes() == []


def test_iam_mode_leaves_the_check_to_api_gateway(env: Env) -> None:
    use_auth("iam", token="")
    assert submit(env, JSON).status_code == 201


def test_iam_setting_puts_iam_authorizers_on_user_routes_only() -> None:
    script = (
        "import os; os.environ['SPOTCTL_AUTH'] = 'iam'\n"
        "from app import app\n"
        "print({f'{m} {p}': type(e.authorizer).__name__ for p, ms in app.routes.items()"
        " for m, e in ms.items()})\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().replace("'", '"')) == {
        "POST /jobs": "IAMAuthorizer",
        "GET /jobs": "IAMAuthorizer",
        "GET /jobs/{job_id}": "IAMAuthorizer",
        "DELETE /jobs/{job_id}": "IAMAuthorizer",
        "POST /jobs/{job_id}/reports": "NoneType",
        "GET /openapi.json": "NoneType",
    }


def test_the_openapi_document_needs_no_credentials(token_env: Env) -> None:
    response = token_env.client.http.get("/openapi.json")
    assert response.status_code == 200
    assert json.loads(response.body) == json.loads(json.dumps(document()))


# -- agents --------------------------------------------------------------------------------


def test_a_jobs_secret_does_not_authorise_any_user_route(token_env: Env) -> None:
    mine = json.loads(submit(token_env).body)["job_id"]
    theirs = json.loads(submit(token_env).body)["job_id"]
    before = world(token_env)
    for job_id in (mine, theirs):
        secret = derive_secret(SIGNING_KEY, mine)
        headers = {**JSON, "authorization": f"Bearer {secret}"}
        for method, path in USER_CALLS:
            body = json.dumps(SPEC).encode() if method == "POST" else b""
            response = token_env.client.http.request(
                method, path.format(job_id=job_id), headers=headers, body=body
            )
            assert response.status_code == 401, (method, path)
    assert world(token_env) == before


@pytest.mark.parametrize(
    "report",
    [
        {"attempt": 1, "kind": "exited", "exit_code": 0},  # complete it
        {"attempt": 1, "kind": "exited", "exit_code": 1},  # fail it
        {"attempt": 1, "kind": "started"},
        {"attempt": 1, "kind": "checkpoint_synced"},
        {"attempt": 1, "kind": "interrupted"},
        {"attempt": 1, "kind": "rebalance"},
    ],
)
def test_one_jobs_instance_cannot_report_for_another_job(
    token_env: Env, report: dict[str, Any]
) -> None:
    mine = json.loads(submit(token_env).body)["job_id"]
    theirs = json.loads(submit(token_env).body)["job_id"]
    before = world(token_env)
    refused = token_env.report(theirs, report, derive_secret(SIGNING_KEY, mine))
    assert refused.status_code == 403
    assert "secret" in json.loads(refused.body)["Message"]
    assert world(token_env) == before
    assert token_env.report(mine, report).status_code == 200  # its own job: fine


def test_the_users_token_cannot_post_reports(token_env: Env) -> None:
    job_id = json.loads(submit(token_env).body)["job_id"]
    before = world(token_env)
    response = token_env.report(job_id, {"attempt": 1, "kind": "exited", "exit_code": 0}, TOKEN)
    assert response.status_code == 403
    assert world(token_env) == before


def test_a_report_for_an_unknown_job_looks_like_a_wrong_secret(env: Env) -> None:
    job_id = "j-00000000000000aa"
    response = env.report(job_id, {"attempt": 1, "kind": "started"})
    assert response.status_code == 403


@pytest.mark.parametrize("method", ["GET", "DELETE", "POST"])
@pytest.mark.parametrize("job_id", ["j-123", "J-0123456789ABCDEF", "j-0123456789abcdef0", "x%00y"])
def test_a_malformed_job_id_is_400_before_any_table_read(
    env: Env, calls: Calls, method: str, job_id: str
) -> None:
    path = f"/jobs/{job_id}" + ("/reports" if method == "POST" else "")
    body = json.dumps({"attempt": 1, "kind": "started"}).encode() if method == "POST" else b""
    headers = {**JSON, "authorization": "Bearer x"}
    response = env.client.http.request(method, path, headers=headers, body=body)
    assert response.status_code == 400
    assert "job_id" in json.loads(response.body)["Message"]
    assert calls.names == []


# -- secrets stay secret ---------------------------------------------------------------------


def test_no_secret_hash_or_token_in_any_log_line_or_answer(
    env: Env, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """A job's whole life through the API and EC2 events, every logger at DEBUG."""
    use_auth("token")
    caplog.set_level(logging.DEBUG)
    logging.getLogger("spotctl").setLevel(logging.DEBUG)
    answers: list[str] = []

    def keep(response: Any) -> Any:
        answers.append(response.body.decode() if isinstance(response.body, bytes) else "")
        return response

    job = json.loads(keep(submit(env)).body)
    job_id = job["job_id"]
    other = json.loads(keep(submit(env)).body)["job_id"]
    secret = derive_secret(SIGNING_KEY, job_id)
    instance_id = job["attempts"][0]["instance_id"]
    env.cloud.state_change(instance_id, "running")
    keep(env.report(job_id, {"attempt": 1, "kind": "started"}))
    keep(env.report(job_id, {"attempt": 1, "kind": "checkpoint_synced", "detail": "epoch 3"}))
    keep(env.report(other, {"attempt": 1, "kind": "started"}, secret))  # refused
    keep(env.report(job_id, {"attempt": 1, "kind": "started"}, secret[:-1] + "0"))  # refused
    env.cloud.deliver("spot-interruption-warning", instance_id)
    env.cloud.sweep()
    keep(env.report(job_id, {"attempt": 1, "kind": "exited", "exit_code": 0}))
    keep(env.client.http.get(f"/jobs/{job_id}", headers=BEARER))
    keep(env.client.http.get("/jobs", headers=BEARER))
    keep(env.client.http.delete(f"/jobs/{other}", headers=BEARER))
    keep(env.client.http.get(f"/jobs/{job_id}", headers={"authorization": f"Bearer {secret}"}))

    captured = capfd.readouterr()
    logged = "\n".join([caplog.text, captured.out, captured.err])
    assert job_id in logged, "the capture saw the control plane's log lines"
    for value in (secret, hash_secret(secret), TOKEN, SIGNING_KEY):
        assert value not in logged
        for answer in answers:
            assert value not in answer
    assert json.loads(answers[-2])["state"] in ("CANCELLING", "CANCELLED")


# -- EC2 events ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        "spot-interruption-warning",
        "rebalance-recommendation",
        "state-change-running",
        "state-change-stopped",
        "state-change-terminated",
    ],
)
def test_an_event_for_an_instance_that_is_not_ours_writes_nothing(
    env: Env, calls: Calls, event: str
) -> None:
    ours = env.submit()["job_id"]
    image = env.ec2.describe_images(Owners=["self"])["Images"][0]["ImageId"]
    foreign = env.ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1)["Instances"][0]
    before = world(env)
    calls.names.clear()
    env.cloud.deliver(event, foreign["InstanceId"])
    env.cloud.deliver(event, "i-0123456789abcdef0")  # no such instance at all
    assert calls.writes() == []
    assert calls.names == ["GetItem", "GetItem"]  # the instance index, nothing more
    assert world(env) == before
    assert env.job(ours)["state"] == "PROVISIONING"


# -- the CLI sends what the API wants --------------------------------------------------------


class Sent:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}

    def __call__(self, request: Any, timeout: float) -> Any:
        self.headers = {k.lower(): v for k, v in request.header_items()}
        return _Answer()


class _Answer:
    def __enter__(self) -> _Answer:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def read(self) -> bytes:
        return b"{}"


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Sent:
    recorder = Sent()
    monkeypatch.setattr(urllib.request, "urlopen", recorder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPOTCTL_API_TOKEN", raising=False)
    return recorder


def test_cli_sends_the_token_from_the_environment(
    sent: Sent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPOTCTL_API_TOKEN", TOKEN)
    cli.call("http://127.0.0.1:1", "GET", "/jobs")
    assert sent.headers["authorization"] == f"Bearer {TOKEN}"


def test_cli_sends_the_sandbox_token_only_to_that_sandbox(sent: Sent, tmp_path: Path) -> None:
    (tmp_path / ".sandbox").mkdir()
    state = {"api_url": "http://127.0.0.1:5555", "api_token": TOKEN}
    (tmp_path / ".sandbox" / "state.json").write_text(json.dumps(state))
    cli.call("http://127.0.0.1:5555", "GET", "/jobs")
    assert sent.headers["authorization"] == f"Bearer {TOKEN}"
    cli.call("http://127.0.0.1:6666", "GET", "/jobs")
    assert "authorization" not in sent.headers


def test_cli_signs_with_sigv4_for_a_deployed_stage(
    sent: Sent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    url = "https://abcdefghij.execute-api.eu-west-1.amazonaws.com/api"
    cli.call(url, "POST", "/jobs", SPEC)
    authorization = sent.headers["authorization"]
    assert authorization.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/eu-west-1/execute-api/aws4_request" in authorization
    assert "x-amz-date" in sent.headers
