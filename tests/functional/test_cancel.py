"""A cancel is on record before anything acts on it: whatever fails after the 200 (EC2
throttling the terminate, the job's own write, the Lambda dying), the sweep finishes
the cancel; it never replaces the instance the cancel ended."""

from __future__ import annotations

import json
from typing import Any

from botocore.awsrequest import AWSResponse, HTTPHeaders

from chalicelib import runtime
from tests.functional.conftest import Env
from tests.functional.test_ec2_errors import Refusal, state_of, sweeps
from tests.functional.test_faults import kinds, running

# What the agent reports when the cancel's terminate reaches it (SIGTERM): the workload
# stopped, and the sync after it worked.
FINAL_SYNC_OK = {
    "attempt": 1,
    "kind": "interrupted",
    "detail": "agent got SIGTERM (instance shutting down); workload exit 143; sync ok",
    "synced": True,
}


def test_a_cancel_whose_terminate_is_throttled_is_finished_by_the_sweep(env: Env) -> None:
    job_id, first, _ = running(env)
    refusal = Refusal("TerminateInstances", "RequestLimitExceeded", "Request limit exceeded.")
    response = env.client.http.delete(f"/jobs/{job_id}")
    assert refusal.count >= 1
    assert response.status_code == 200, response.body
    answered = json.loads(response.body)
    assert answered["cancel_requested_at"] is not None
    assert state_of(env, first) == "running"  # EC2 refused; the request is on record

    refusal.on = False
    sweeps(env, 1)
    assert state_of(env, first) in ("shutting-down", "terminated")
    sweeps(env, 1)
    job = env.job(job_id)
    assert job["state"] == "CANCELLED"
    assert env.cloud.live_instances(job_id) == []
    assert kinds(job).count("launched") == 1


def test_a_cancel_whose_job_write_fails_after_the_terminate_is_not_a_reclaim(
    env: Env,
) -> None:
    """The pass terminates the instance, then its write fails: the instance is gone and
    the job record still says RUNNING. The cancel, written first, says why."""
    job_id, first, _ = running(env)
    writes = {"n": 0}

    def refuse_after_the_first(**_: Any) -> Any:
        writes["n"] += 1
        if writes["n"] == 1:
            return None  # the cancel request itself
        # Not one botocore retries (a 500 would be, six times): the write fails at once.
        body = {"Error": {"Code": "ValidationException", "Message": "refused"}}
        return AWSResponse("http://moto", 400, HTTPHeaders(), None), body

    dynamodb = runtime.control_plane().store._client
    for operation in ("PutItem", "TransactWriteItems"):
        dynamodb.meta.events.register(f"before-call.dynamodb.{operation}", refuse_after_the_first)
    response = env.client.http.delete(f"/jobs/{job_id}")
    for operation in ("PutItem", "TransactWriteItems"):
        dynamodb.meta.events.unregister(f"before-call.dynamodb.{operation}", refuse_after_the_first)
    assert response.status_code == 200, response.body
    assert writes["n"] > 1, "the pass after the request tried to write"
    assert state_of(env, first) in ("shutting-down", "terminated")

    env.cloud.state_change(first, "terminated")
    sweeps(env, 2)
    job = env.job(job_id)
    assert job["state"] == "CANCELLED", kinds(job)
    assert env.cloud.live_instances(job_id) == []
    assert "instance-reclaimed" not in kinds(job)
    assert kinds(job).count("launched") == 1


def test_a_second_cancel_may_add_delete_volume(env: Env) -> None:
    job_id, first, volume_id = running(env, results_s3_uri="s3://bucket/run")
    assert env.report(job_id, {"attempt": 1, "kind": "checkpoint_synced"}).status_code == 200
    assert env.client.http.delete(f"/jobs/{job_id}").status_code == 200
    again = env.client.http.delete(f"/jobs/{job_id}?delete_volume=true")
    assert again.status_code == 200
    assert json.loads(again.body)["delete_volume_on_cancel"] is True

    env.cloud.state_change(first, "terminated")
    assert env.report(job_id, FINAL_SYNC_OK).status_code == 200  # the agent, at SIGTERM
    sweeps(env, 2)
    job = env.job(job_id)
    assert job["state"] == "CANCELLED"
    requests = [e["detail"] for e in job["events"] if e["kind"] == "cancel-requested"]
    assert requests == ["", "delete its volume once safe in S3"]
    left = env.ec2.describe_volumes(Filters=[{"Name": "volume-id", "Values": [volume_id]}])
    assert left["Volumes"] == []
