"""The HTTP API: validation that names the field and writes nothing, listing, reports."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from openapi_spec_validator import validate

from chalicelib import runtime
from chalicelib.agent_auth import derive_secret
from chalicelib.config import DEFAULT_AMI_PARAMETER
from chalicelib.openapi import document
from tests.functional.conftest import SIGNING_KEY, TABLE, Env

VALID: dict[str, Any] = {
    "name": "resnet",
    "command": ["python", "train.py"],
    "instance_types": ["g4dn.xlarge"],
    "volume_gib": 20,
}

BAD_SPECS = [
    ("name", {"name": "has space"}),
    ("name", {"name": ""}),
    ("command", {"command": []}),
    ("command", {"command": "python train.py"}),
    ("command", {"command": ["x" * 5000]}),
    ("instance_types", {"instance_types": []}),
    ("instance_types", {"instance_types": ["P3 2XL"]}),
    ("instance_types", {"instance_types": ["g4dn.xlarge", "g4dn.xlarge"]}),
    ("instance_types", {"instance_types": ["x9.huge"]}),
    ("instance_types", {"instance_types": ["g4dn.xlarge\n"]}),
    ("instance_types", {"instance_types": ["g4dn.2xlargex"]}),
    ("instance_types", {"instance_types": [f"t{i}.large" for i in range(21)]}),
    ("name", {"name": "resnet\n"}),
    ("name", {"name": "r" * 64}),
    ("command", {"command": ["python", "a\u0000b"]}),
    ("command", {"command": ["x"] * 257}),
    ("availability_zones", {"availability_zones": ["mars-1a"]}),
    ("volume_gib", {"volume_gib": 0}),
    ("volume_gib", {"volume_gib": 20000}),
    ("volume_id", {"volume_gib": None, "volume_id": "vol-xyz"}),
    ("snapshot_id", {"volume_gib": None, "snapshot_id": "snapshot-1"}),
    ("results_s3_uri", {"results_s3_uri": "https://bucket/x"}),
    ("results_s3_uri", {"results_s3_uri": "s3://B_ad/x"}),
    ("results_s3_uri", {"results_s3_uri": "s3://192.168.1.1/x"}),
    ("results_s3_uri", {"results_s3_uri": "s3://my--ol-s3/x"}),
    ("results_s3_uri", {"results_s3_uri": "s3://bucket/a\nb"}),
    ("results_s3_uri", {"results_s3_uri": "s3://bucket/../x"}),
    ("results_s3_uri", {"results_s3_uri": "s3://bucket/" + "k" * 1025}),
    ("deadline", {"deadline": "2020-01-01T00:00:00Z"}),
    ("deadline", {"deadline": "2030-01-01T00:00:00"}),
    # Strings pydantic reads as a time but that are not ISO 8601 date-times.
    ("deadline", {"deadline": "2000000000"}),
    ("deadline", {"deadline": "-5"}),
    ("deadline", {"deadline": "2030-01-01_00:00:00Z"}),
    ("deadline", {"deadline": "2030-01-01"}),
    ("max_price_per_hour", {"max_price_per_hour": -1}),
    ("max_restarts_on_errors", {"max_restarts_on_errors": -1}),
    ("max_restarts_on_errors", {"max_restarts_on_errors": 11}),
    ("max_restarts_on_errors", {"max_restarts_on_errors": 1.5}),
    ("recover_on_exit_codes", {"recover_on_exit_codes": [0]}),
    ("recover_on_exit_codes", {"recover_on_exit_codes": [256]}),
    ("recover_on_exit_codes", {"recover_on_exit_codes": [-1]}),
    ("recover_on_exit_codes", {"recover_on_exit_codes": [29, 29]}),
    ("recover_on_exit_codes", {"recover_on_exit_codes": True}),
    ("recover_on_exit_codes", {"recover_on_exit_codes": 0}),
    ("recover_on_exit_codes", {"recover_on_exit_codes": ["29"]}),
    ("recover_on_exit_codes", {"recover_on_exit_codes": [1.5]}),
    ("recover_on_exit_codes", {"recover_on_exit_codes": list(range(1, 34))}),
    ("env", {"env": {"1X": "a"}}),
    ("env", {"env": {"A-B": "a"}}),
    ("env", {"env": {"": "a"}}),
    ("env", {"env": {"SPOTCTL_JOB_ID": "x"}}),
    ("env", {"env": {"spotctl_attempt": "x"}}),
    ("env", {"env": {"A": "a\u0000b"}}),
    ("env", {"env": {"A": "two\nlines"}}),
    ("env", {"env": {"A": "cr\rhere"}}),
    ("env", {"env": {"A": 1}}),
    ("env", {"env": {"A": None}}),
    ("env", {"env": {"A": "v" * 4097}}),
    ("env", {"env": {f"V{i}": "x" for i in range(65)}}),
    ("env", {"env": ["A=1"]}),
    ("env", {"env": "A=1"}),
    ("image", {"image": "bad image name"}),
    ("checkpoint.grace_seconds", {"checkpoint": {"grace_seconds": 600}}),
    ("checkpoint.directory", {"checkpoint": {"directory": "../etc"}}),
    ("checkpoint.directory", {"checkpoint": {"directory": "./"}}),
    ("checkpoint.directory", {"checkpoint": {"directory": "."}}),
    ("checkpoint.directory", {"checkpoint": {"directory": ".spotctl/ckpt"}}),
    # A JSON number where the schema says number: pydantic would take "100" or true.
    ("volume_gib", {"volume_gib": True}),
    ("volume_gib", {"volume_gib": "100"}),
    ("volume_gib", {"volume_gib": 20.0}),
    ("expected_hours", {"expected_hours": "3"}),
    ("max_price_per_hour", {"max_price_per_hour": True}),
    ("max_restarts_on_errors", {"max_restarts_on_errors": True}),
    ("checkpoint.grace_seconds", {"checkpoint": {"grace_seconds": "30"}}),
    ("checkpoint.sync_interval_seconds", {"checkpoint": {"sync_interval_seconds": "600"}}),
    ("deadline", {"deadline": 1790007200000}),
    ("unexpected", {"unexpected": 1}),
    ("volume_gib, volume_id or snapshot_id", {"volume_gib": None}),
]


JSON = "application/json"
NESTED_TOKEN = base64.urlsafe_b64encode(b"[" * 1500).decode()  # deeper than json can parse


def post_raw(env: Env, body: str) -> Any:
    return env.client.http.post("/jobs", headers={"content-type": "application/json"}, body=body)


@pytest.mark.parametrize(
    ("field", "change"), BAD_SPECS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_SPECS)]
)
def test_invalid_spec_is_rejected_naming_the_field_and_writes_nothing(
    env: Env, field: str, change: dict[str, Any]
) -> None:
    body = {**VALID, **change}
    body = {k: v for k, v in body.items() if v is not None}
    response = post_raw(env, json.dumps(body))
    assert response.status_code == 400
    message = json.loads(response.body)["Message"]
    assert field in message
    assert json.loads(env.client.http.get("/jobs").body)["jobs"] == []
    assert env.ec2.describe_volumes()["Volumes"] == []
    assert env.ec2.describe_instances()["Reservations"] == []


@pytest.mark.parametrize("body", ["not json", "[1, 2]", "null", '"text"'])
def test_body_that_is_not_a_json_object_is_rejected(env: Env, body: str) -> None:
    response = post_raw(env, body)
    assert response.status_code == 400
    assert "body" in json.loads(response.body)["Message"]


def spec_text(**replace: str) -> str:
    """VALID as JSON text, with some values replaced by raw JSON text."""
    fields = {key: json.dumps(value) for key, value in VALID.items()}
    fields.update(replace)
    return "{" + ", ".join(f'"{key}": {value}' for key, value in fields.items()) + "}"


HOSTILE_BODIES = [
    ("NaN", spec_text(max_price_per_hour="NaN")),
    ("Infinity", spec_text(expected_hours="Infinity")),
    ("-Infinity", spec_text(volume_gib="-Infinity")),
    ("repeats a key", spec_text()[:-1] + ', "name": "other"}'),
    ("surrogate", spec_text(name='"\\ud800"')),
    ("surrogate", spec_text(command='["python", "\\udfff"]')),
    ("NUL", spec_text(command='["python", "a\\u0000"]')),
    ("NUL", spec_text(checkpoint='{"directory\\u0000": "x"}')),
    ("nested", spec_text(extra="[" * 20 + "]" * 20)),
    ("nested", "[" * 100_000 + "]" * 100_000),
]


@pytest.mark.parametrize(("problem", "body"), HOSTILE_BODIES, ids=[p for p, _ in HOSTILE_BODIES])
def test_hostile_json_is_400_naming_the_problem_and_writes_nothing(
    env: Env, problem: str, body: str
) -> None:
    response = post_raw(env, body)
    assert response.status_code in (400, 413), response.body
    message = json.loads(response.body)["Message"]
    if response.status_code == 400 and problem not in ("surrogate",):
        assert problem in message or "nested" in message, message
    assert env.ec2.describe_volumes()["Volumes"] == []
    assert json.loads(env.client.http.get("/jobs").body)["jobs"] == []


def test_body_that_is_not_utf8_is_400(env: Env) -> None:
    body = spec_text(name='"r\xe9sum\xe9"').encode("latin-1")
    response = env.client.http.post(
        "/jobs", headers={"content-type": "application/json"}, body=body
    )
    assert response.status_code == 400
    assert "UTF-8" in json.loads(response.body)["Message"]


def test_body_over_64_kib_is_413_and_writes_nothing(env: Env) -> None:
    body = spec_text(image=json.dumps("x" * (64 * 1024)))
    response = post_raw(env, body)
    assert response.status_code == 413
    assert env.ec2.describe_volumes()["Volumes"] == []


def test_headers_over_8_kib_are_431(env: Env) -> None:
    headers = {"content-type": "application/json", "x-padding": "p" * 9000}
    response = env.client.http.post("/jobs", headers=headers, body=json.dumps(VALID))
    assert response.status_code == 431
    assert env.ec2.describe_volumes()["Volumes"] == []


def test_the_committed_openapi_document_is_current() -> None:
    """Writes docs/openapi.json when it is stale, and fails so the change is seen."""
    validate(document())
    path = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
    current = json.dumps(document(), indent=2, sort_keys=True) + "\n"
    committed = path.read_text() if path.exists() else ""
    if committed != current:
        path.write_text(current)
        pytest.fail("docs/openapi.json was stale; rewritten, commit it")


def test_submit_returns_201_with_id_and_state(env: Env) -> None:
    job = env.submit()
    assert job["job_id"].startswith("j-")
    assert job["state"] == "PROVISIONING"
    assert "secret" not in json.dumps(job).lower()


def test_get_unknown_job_is_404(env: Env) -> None:
    assert env.client.http.get("/jobs/j-0000000000000000").status_code == 404


def test_list_filters_by_state_and_paginates(env: Env) -> None:
    ids = [env.submit(name=f"job{i}")["job_id"] for i in range(5)]
    env.client.http.delete(f"/jobs/{ids[0]}")
    seen: list[str] = []
    token = None
    while True:
        url = "/jobs?limit=2" + (f"&next_token={token}" if token else "")
        page = json.loads(env.client.http.get(url).body)
        assert len(page["jobs"]) <= 2
        seen += [j["job_id"] for j in page["jobs"]]
        token = page["next_token"]
        if not token:
            break
    assert sorted(seen) == sorted(ids)
    provisioning = json.loads(env.client.http.get("/jobs?state=PROVISIONING").body)["jobs"]
    assert sorted(j["job_id"] for j in provisioning) == sorted(ids[1:])


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("state=BOGUS", "state"),
        ("limit=0", "limit"),
        ("limit=x", "limit"),
        ("next_token=%%%", "next_token"),
        ("next_token=eyJhIjogeyJYIjogMX19", "next_token"),
        (
            "next_token=W1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tbW1tb",
            "next_token",
        ),  # JSON nested past the parser's depth
        ("limit=%C2%B2", "limit"),
        ("limit=%D9%A3", "limit"),
        ("state=RUNNING%00", "state"),
        ("colour=red", "colour"),
    ],
)
def test_bad_list_query_is_400_naming_it(env: Env, query: str, field: str) -> None:
    response = env.client.http.get(f"/jobs?{query}")
    assert response.status_code == 400
    assert field in json.loads(response.body)["Message"]


def test_report_with_another_jobs_secret_is_refused_and_writes_nothing(env: Env) -> None:
    mine = env.submit(name="mine")["job_id"]
    theirs = env.submit(name="theirs")["job_id"]
    before = env.job(theirs)
    response = env.report(
        theirs, {"attempt": 1, "kind": "exited", "exit_code": 0}, derive_secret(SIGNING_KEY, mine)
    )
    assert response.status_code == 403
    assert env.job(theirs) == before


def test_report_without_a_secret_is_refused(env: Env) -> None:
    job_id = env.submit()["job_id"]
    response = env.report(job_id, {"attempt": 1, "kind": "started"}, secret="")
    assert response.status_code == 403


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"attempt": 1, "kind": "exited"}, "exit_code"),
        ({"attempt": 1, "kind": "started", "exit_code": 0}, "exit_code"),
        ({"attempt": 0, "kind": "started"}, "attempt"),
        ({"attempt": 9, "kind": "started"}, "attempt"),
        ({"attempt": 1, "kind": "dancing"}, "kind"),
        ({"attempt": 1, "kind": "started", "synced": True}, "synced"),
        ({"attempt": 1, "kind": "interrupted", "synced": "yes"}, "synced"),
        ({"attempt": 1, "kind": "exited", "exit_code": 0, "synced": 1}, "synced"),
    ],
)
def test_bad_report_is_400_and_writes_nothing(env: Env, body: dict[str, Any], field: str) -> None:
    job_id = env.submit()["job_id"]
    before = env.job(job_id)
    response = env.report(job_id, body)
    assert response.status_code == 400
    assert field in json.loads(response.body)["Message"]
    assert env.job(job_id) == before


def test_cancel_of_an_ended_job_is_409(env: Env) -> None:
    job_id = env.submit()["job_id"]
    env.report(job_id, {"attempt": 1, "kind": "exited", "exit_code": 0})
    response = env.client.http.delete(f"/jobs/{job_id}")
    assert response.status_code == 409
    assert json.loads(response.body)["Message"] == f"job {job_id} already ended: SUCCEEDED"


def test_a_cancel_sent_again_after_the_job_was_cancelled_answers_with_it(env: Env) -> None:
    job_id = env.submit()["job_id"]
    assert env.client.http.delete(f"/jobs/{job_id}").status_code == 200
    env.cloud.sweep()
    cancelled = env.job(job_id)
    assert cancelled["state"] == "CANCELLED"
    again = env.client.http.delete(f"/jobs/{job_id}")
    assert again.status_code == 200, again.body
    assert json.loads(again.body)["state"] == "CANCELLED"
    # Asking now for what the first cancel did not ask: said, not silently ignored.
    late = env.client.http.delete(f"/jobs/{job_id}?delete_volume=true")
    assert late.status_code == 409
    assert "was cancelled already, keeping its volume" in json.loads(late.body)["Message"]
    assert env.job(job_id) == cancelled  # nothing written


def test_cancel_with_a_bad_flag_is_400_and_changes_nothing(env: Env) -> None:
    job_id = env.submit()["job_id"]
    before = env.job(job_id)
    response = env.client.http.delete(f"/jobs/{job_id}?delete_volume=maybe")
    assert response.status_code == 400
    assert env.job(job_id) == before


def test_a_command_that_would_not_fit_in_the_user_data_is_rejected_and_writes_nothing(
    env: Env,
) -> None:
    # Within the spec's own limit (4 KB), but the instance's user data is 16 KB in all
    # and the agent's files take most of it.
    long = [
        "python",
        "-c",
        "import sys; print(sys.argv)",
        *[f"--flag{i}=" + "v" * 40 for i in range(70)],
    ]
    response = post_raw(env, json.dumps({**VALID, "command": long}))
    assert response.status_code == 400, response.body
    message = json.loads(response.body)["Message"]
    assert "command" in message and "16384" in message
    assert json.loads(env.client.http.get("/jobs").body)["jobs"] == []
    assert env.ec2.describe_volumes()["Volumes"] == []
    assert env.ec2.describe_instances()["Reservations"] == []


def test_zones_outside_the_deployment_region_are_rejected_and_write_nothing(env: Env) -> None:
    response = post_raw(
        env, json.dumps({**VALID, "availability_zones": ["us-east-1a", "us-west-2a"]})
    )
    assert response.status_code == 400
    message = json.loads(response.body)["Message"]
    assert message == ("availability_zones: us-west-2a not in this deployment's region, us-east-1")
    assert json.loads(env.client.http.get("/jobs").body)["jobs"] == []
    assert env.ec2.describe_volumes()["Volumes"] == []


def test_a_deadline_not_even_on_demand_could_meet_is_rejected_and_writes_nothing(env: Env) -> None:
    soon = datetime.fromtimestamp(env.clock.now + 3 * 3600, UTC).isoformat()
    response = post_raw(env, json.dumps({**VALID, "deadline": soon, "expected_hours": 3}))
    assert response.status_code == 400
    message = json.loads(response.body)["Message"]
    assert message.startswith("deadline: 3.00 h away, and expected_hours is 3")
    assert json.loads(env.client.http.get("/jobs").body)["jobs"] == []
    assert env.ec2.describe_volumes()["Volumes"] == []
    # An hour more to spare: accepted.
    response = post_raw(env, json.dumps({**VALID, "deadline": soon, "expected_hours": 2}))
    assert response.status_code == 201


def test_a_deadline_must_be_an_iso_8601_date_and_time_with_a_time_zone(env: Env) -> None:
    # Unix time in a string: pydantic alone would take it as 2033-05-18T03:33:20Z.
    response = post_raw(env, json.dumps({**VALID, "deadline": "2000000000"}))
    assert response.status_code == 400, response.body
    assert json.loads(response.body)["Message"] == (
        "deadline: must be an ISO 8601 date and time like '2026-12-01T00:00:00Z'"
    )
    assert json.loads(env.client.http.get("/jobs").body)["jobs"] == []
    # ISO 8601 with a time zone, in the forms it allows: accepted, and shown with seconds.
    for written, shown in (
        ("2099-12-01T00:00:00Z", "2099-12-01T00:00:00Z"),
        ("2099-12-01T02:00:00+02:00", "2099-12-01T02:00:00+02:00"),
        ("2099-12-01T00:00Z", "2099-12-01T00:00:00Z"),
        ("2099-12-01T00:00:00.5Z", "2099-12-01T00:00:00.500000Z"),
    ):
        response = post_raw(env, json.dumps({**VALID, "deadline": written}))
        assert response.status_code == 201, (written, response.body)
        assert json.loads(response.body)["spec"]["deadline"] == shown


def test_the_job_environment_is_shown_and_shipped_to_its_instance(env: Env) -> None:
    variables = {"NCCL_DEBUG": "INFO", "ARGS": "--lr 3e-4 '$(id)'"}
    response = post_raw(env, json.dumps({**VALID, "env": variables}))
    assert response.status_code == 201
    job = json.loads(response.body)
    assert job["spec"]["env"] == variables
    found = env.ec2.describe_instance_attribute(
        InstanceId=job["attempts"][0]["instance_id"], Attribute="userData"
    )
    text = base64.b64decode(found["UserData"]["Value"]).decode()
    match = re.search(r"^SPOTCTL_PARAMS_B64='([^']+)'$", text, re.MULTILINE)
    assert match is not None
    assert json.loads(base64.b64decode(match[1]))["env"] == variables


def test_an_environment_too_big_for_the_user_data_is_rejected_and_writes_nothing(
    env: Env,
) -> None:
    variables = {f"V{i}": "x" * 100 for i in range(30)}  # 3 KB: each within its limit
    response = post_raw(env, json.dumps({**VALID, "env": variables}))
    assert response.status_code == 400
    assert "16384" in json.loads(response.body)["Message"]
    assert json.loads(env.client.http.get("/jobs").body)["jobs"] == []


def test_a_volume_or_snapshot_ec2_does_not_know_is_rejected_and_writes_nothing(
    env: Env,
) -> None:
    elsewhere = env.ec2.create_volume(AvailabilityZone="us-east-1b", Size=20)["VolumeId"]
    cases = [
        ({"volume_id": "vol-0123456789abcdef0"}, "volume_id: vol-0123456789abcdef0 does not exist"),
        (
            {"volume_id": elsewhere, "availability_zones": ["us-east-1a"]},
            f"volume_id: {elsewhere} is in us-east-1b, outside availability_zones",
        ),
        (
            {"snapshot_id": "snap-0123456789abcdef0"},
            "snapshot_id: snap-0123456789abcdef0 does not exist "
            "(or is not shared with this account)",
        ),
    ]
    for change, message in cases:
        body = {k: v for k, v in {**VALID, "volume_gib": None, **change}.items() if v is not None}
        response = post_raw(env, json.dumps(body))
        assert response.status_code == 400, response.body
        assert json.loads(response.body)["Message"] == message
    assert json.loads(env.client.http.get("/jobs").body)["jobs"] == []
    assert [v["VolumeId"] for v in env.ec2.describe_volumes()["Volumes"]] == [elsewhere]
    # A volume made from a snapshot is at least the snapshot's size (EC2 refuses less).
    snapshot = env.ec2.create_snapshot(VolumeId=elsewhere)["SnapshotId"]
    body = {**VALID, "volume_gib": 19, "snapshot_id": snapshot}
    response = post_raw(env, json.dumps(body))
    assert response.status_code == 400, response.body
    assert json.loads(response.body)["Message"] == (
        f"volume_gib: 19 is smaller than snapshot {snapshot} (20 GiB); give at least 20, "
        "or leave volume_gib out for a volume of the snapshot's size"
    )
    assert json.loads(env.client.http.get("/jobs").body)["jobs"] == []
    # The same sources, known to EC2 (and a snapshot grown into a larger volume): accepted.
    for change in (
        {"volume_id": elsewhere},
        {"snapshot_id": snapshot},
        {"snapshot_id": snapshot, "volume_gib": 20},
    ):
        body = {k: v for k, v in {**VALID, "volume_gib": None, **change}.items() if v is not None}
        assert post_raw(env, json.dumps(body)).status_code == 201


def volume_spec(volume_id: str) -> str:
    return json.dumps(
        {**{k: v for k, v in VALID.items() if k != "volume_gib"}, "volume_id": volume_id}
    )


def test_a_volume_a_live_job_holds_is_refused_until_that_job_ends(env: Env) -> None:
    volume = env.ec2.create_volume(AvailabilityZone="us-east-1a", Size=20)["VolumeId"]
    first = json.loads(post_raw(env, volume_spec(volume)).body)["job_id"]

    response = post_raw(env, volume_spec(volume))
    assert response.status_code == 409, response.body
    assert json.loads(response.body)["Message"] == (
        f"volume_id: {volume} is the data volume of job {first} "
        f"({env.job(first)['state']}); cancel it or wait for it to end"
    )
    assert [j["job_id"] for j in json.loads(env.client.http.get("/jobs").body)["jobs"]] == [first]

    env.client.http.delete(f"/jobs/{first}")
    env.cloud.sweep()
    assert env.job(first)["state"] == "CANCELLED"
    assert post_raw(env, volume_spec(volume)).status_code == 201  # the volume is free again


def test_the_volume_spotctl_made_for_a_live_job_is_refused(env: Env) -> None:
    first = env.submit(availability_zones=["us-east-1a"])
    volume = first["volume"]["volume_id"]
    response = post_raw(env, volume_spec(volume))
    assert response.status_code == 409, response.body
    assert f"is the data volume of job {first['job_id']}" in json.loads(response.body)["Message"]
    assert len(json.loads(env.client.http.get("/jobs").body)["jobs"]) == 1


def test_an_unknown_job_is_404_saying_so(env: Env) -> None:
    response = env.client.http.get("/jobs/j-0000000000000000")
    assert response.status_code == 404
    assert json.loads(response.body)["Message"] == "no job j-0000000000000000"


def test_a_deployment_without_its_api_url_refuses_submissions_as_its_own_fault(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the first `chalice deploy` and the second (docs/deploy.md) the agent has
    nowhere to report: a 503 that says so, not a 400 blaming the user's command."""
    monkeypatch.setenv("SPOTCTL_API_URL", "")  # as .chalice/config.json has it at first
    runtime.reset()
    response = post_raw(env, json.dumps(VALID))
    assert response.status_code == 503, response.body
    message = json.loads(response.body)["Message"]
    assert message.startswith("this deployment cannot launch instances yet: api_url")
    assert json.loads(response.body)["Code"] == "NotConfiguredError"  # clients: do not retry
    table = boto3.client("dynamodb", region_name="us-east-1").scan(TableName=TABLE)
    assert table["Items"] == []
    assert env.cloud.volumes() == []


def test_a_type_whose_gpu_the_stage_s_ami_cannot_drive_is_refused(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default AMI's driver has no V100 (p3): such an instance would bill, GPU-less."""
    plane = runtime.control_plane()
    stage = dataclasses.replace(plane.config, ami_id="", ami_parameter=DEFAULT_AMI_PARAMETER)
    unsupported = stage.families_without_gpu_driver
    monkeypatch.setattr(plane.service, "families_without_gpu_driver", unsupported)
    body = {**VALID, "instance_types": ["g5.xlarge", "p3.2xlarge"]}
    response = post_raw(env, json.dumps(body))
    assert response.status_code == 400, response.body
    message = json.loads(response.body)["Message"]
    assert message.startswith("instance_types: p3.2xlarge: this stage's AMI")
    assert json.loads(env.client.http.get("/jobs").body)["jobs"] == []
    assert post_raw(env, json.dumps({**VALID, "instance_types": ["g5.xlarge"]})).status_code == 201


class LambdaContext:
    """What the Lambda runtime passes a handler, as far as the app reads it."""

    function_name = "spotctl-dev"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:spotctl-dev"
    aws_request_id = "0b2f7a4e-0000-4000-8000-000000000000"

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


def test_an_api_handler_without_its_url_learns_it_from_api_gateway(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CloudFormation stage cannot give the API handler its own URL (the API refers
    to the function): API Gateway's request context names the domain and stage."""
    from app import app

    plane = runtime.control_plane()
    monkeypatch.setattr(plane, "config", dataclasses.replace(plane.config, api_url=""))
    domain = "a1b2c3d4e5.execute-api.us-east-1.amazonaws.com"
    event: dict[str, Any] = {  # API Gateway's REST proxy event (payload 1.0), as Lambda gets it
        "resource": "/jobs",
        "path": "/jobs",
        "httpMethod": "POST",
        "headers": {"content-type": "application/json", "Host": domain},
        "multiValueHeaders": {},
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "pathParameters": None,
        "stageVariables": None,
        "requestContext": {
            "resourcePath": "/jobs",
            "httpMethod": "POST",
            "path": "/api/jobs",
            "stage": "api",
            "apiId": "a1b2c3d4e5",
            "domainName": domain,
            "identity": {"sourceIp": "203.0.113.7"},
        },
        "body": json.dumps(VALID),
        "isBase64Encoded": False,
    }
    answer = app(event, LambdaContext())
    assert answer["statusCode"] == 201, answer["body"]
    assert runtime.control_plane().config.api_url == f"https://{domain}/api"
    instance = json.loads(answer["body"])["attempts"][0]["instance_id"]
    found = env.ec2.describe_instance_attribute(InstanceId=instance, Attribute="userData")
    text = base64.b64decode(found["UserData"]["Value"]).decode()
    match = re.search(r"^SPOTCTL_PARAMS_B64='([^']+)'$", text, re.MULTILINE)
    assert match
    assert json.loads(base64.b64decode(match[1]))["api_url"] == f"https://{domain}/api"
    # A Host a client sends is no API Gateway domain: nothing is learnt from it.
    monkeypatch.setattr(plane, "config", dataclasses.replace(plane.config, api_url=""))
    event["requestContext"]["domainName"] = "evil.example.com"
    answer = app(event, LambdaContext())
    assert answer["statusCode"] == 503
    assert runtime.control_plane().config.api_url == ""


def test_a_submission_sent_again_with_its_client_token_makes_one_job(env: Env) -> None:
    body = json.dumps({**VALID, "client_token": "run-7f3a"})
    first = post_raw(env, body)
    again = post_raw(env, body)
    assert (first.status_code, again.status_code) == (201, 201)
    job_id = json.loads(first.body)["job_id"]
    assert json.loads(again.body)["job_id"] == job_id
    assert [j["job_id"] for j in json.loads(env.client.http.get("/jobs").body)["jobs"]] == [job_id]
    assert len(env.cloud.live_instances(job_id)) == 1
    made = env.ec2.describe_volumes(Filters=[{"Name": "tag-key", "Values": ["spotctl:job-id"]}])
    assert len(made["Volumes"]) == 1

    other = post_raw(env, json.dumps({**VALID, "name": "other", "client_token": "run-7f3a"}))
    assert other.status_code == 409, other.body
    assert json.loads(other.body)["Message"] == (
        f"client_token: job {job_id} was submitted with it, with another spec"
    )
    assert len(json.loads(env.client.http.get("/jobs").body)["jobs"]) == 1
