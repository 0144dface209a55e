"""EC2 refusing a call: a job fails clearly, waits with its reason, or carries on; it
never errors on every pass, and no instance it ended is left running.

Through the API and EC2 events against moto; the refusals are EC2's documented error
codes, injected on the control plane's own client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse, HTTPHeaders

from chalicelib import runtime
from tests.functional.conftest import Env


class Refusal:
    """EC2 answering ``operation`` with ``code`` while on (for the calls ``when`` picks)."""

    def __init__(
        self,
        operation: str,
        code: str,
        message: str = "refused",
        when: Callable[[dict[str, Any]], bool] = lambda body: True,
    ) -> None:
        self.on = True
        self.count = 0
        self.code, self.message, self.when = code, message, when
        client = runtime.control_plane().reconciler.ec2._client  # type: ignore[attr-defined]
        client.meta.events.register(f"before-call.ec2.{operation}", self._answer)

    def _answer(self, params: dict[str, Any], **_: Any) -> Any:
        if not self.on or not self.when(params["body"]):
            return None
        self.count += 1
        body = {"Error": {"Code": self.code, "Message": self.message}}
        return AWSResponse("http://moto", 400, HTTPHeaders(), None), body


def sweeps(env: Env, n: int, step: float = 400.0) -> None:
    for _ in range(n):
        env.clock.advance(step)
        env.cloud.sweep()


def state_of(env: Env, instance_id: str) -> str:
    found = env.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    state: str = found[0]["Instances"][0]["State"]["Name"]
    return state


def running(env: Env, **spec: Any) -> tuple[str, str, str]:
    job = env.submit(**spec)
    first = job["attempts"][0]["instance_id"]
    env.clock.advance(60)
    env.cloud.state_change(first, "running")
    assert env.job(job["job_id"])["state"] == "RUNNING"
    return job["job_id"], first, job["volume"]["volume_id"]


@pytest.mark.parametrize("operation", ["TerminateInstances", "RunInstances"])
def test_a_throttled_call_never_leaves_a_stopped_instance_behind(env: Env, operation: str) -> None:
    job_id, first, volume_id = running(env)
    env.ec2.stop_instances(InstanceIds=[first])
    refusal = Refusal(operation, "RequestLimitExceeded", "Request limit exceeded.")
    env.clock.advance(60)
    env.cloud.sweep()  # ends the stopped attempt and launches its replacement: refused
    assert refusal.count == 1
    refusal.on = False
    sweeps(env, 2)
    replacement = env.job(job_id)["attempts"][-1]["instance_id"]
    env.cloud.state_change(replacement, "running")
    sweeps(env, 2)
    assert state_of(env, first) == "terminated"
    job = env.job(job_id)
    assert job["state"] == "RUNNING"
    volume = env.ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
    assert [a["InstanceId"] for a in volume["Attachments"]] == [replacement]
    env.cloud.assert_invariants(job_id)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("InvalidSnapshot.NotFound", "The snapshot 'snap-0123456789abcdef0' does not exist."),
        ("InvalidParameterValue", "Volume of 8GiB is smaller than snapshot, 100GiB"),
        ("UnauthorizedOperation", "You are not authorized to perform kms:CreateGrant."),
    ],
)
def test_a_volume_ec2_will_not_create_fails_the_job_clearly(
    env: Env, code: str, message: str
) -> None:
    refusal = Refusal("CreateVolume", code, message)
    job_id = env.submit(snapshot_id="snap-0123456789abcdef0", volume_gib=8)["job_id"]
    job = env.job(job_id)
    assert job["state"] == "FAILED"
    assert job["failure"] == f"its volume could not be created: {code}: {message}"
    assert [a["end_reason"] for a in job["attempts"]] == ["launch-failed"]
    assert env.cloud.instances(job_id) == []
    sweeps(env, 2)
    assert refusal.count == 1  # and no pass tries again


def test_a_throttled_create_volume_is_tried_again(env: Env) -> None:
    refusal = Refusal("CreateVolume", "RequestLimitExceeded", "Request limit exceeded.")
    job_id = env.submit()["job_id"]
    refusal.on = False
    sweeps(env, 1)
    job = env.job(job_id)
    assert job["state"] == "PROVISIONING"
    assert job["volume"] is not None and len(env.cloud.live_instances(job_id)) == 1


def test_a_volume_ec2_will_not_delete_on_cancel_is_kept_and_the_job_cancelled(
    env: Env,
) -> None:
    job_id, _, volume_id = running(env)
    env.report(job_id, {"attempt": 1, "kind": "checkpoint_synced"})
    refusal = Refusal("DeleteVolume", "UnauthorizedOperation", "not authorized: ec2:DeleteVolume")
    env.client.http.delete(f"/jobs/{job_id}?delete_volume=true")
    env.cloud.sweep()
    job = env.job(job_id)
    assert job["state"] == "CANCELLED"
    kinds = [(e["kind"], e["detail"]) for e in job["events"]]
    assert (
        "volume-kept",
        "DeleteVolume: UnauthorizedOperation: not authorized: ec2:DeleteVolume",
    ) in kinds
    assert "volume-deleted" not in [k for k, _ in kinds]
    assert env.ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"]
    sweeps(env, 2)
    assert refusal.count == 1


def test_volumes_that_keep_failing_fail_the_job_after_three(env: Env) -> None:
    def all_in_error(parsed: Any, **_: Any) -> None:
        for volume in parsed.get("Volumes", []):
            volume["State"], volume["Attachments"] = "error", []

    client = runtime.control_plane().reconciler.ec2._client  # type: ignore[attr-defined]
    client.meta.events.register("after-call.ec2.DescribeVolumes", all_in_error)
    job_id = env.submit(results_s3_uri="s3://spotctl-results/x/")["job_id"]
    for _ in range(10):
        sweeps(env, 1, step=120.0)
        for attempt in env.job(job_id)["attempts"]:
            if attempt["instance_id"] and not attempt["end_reason"]:
                env.cloud.state_change(attempt["instance_id"], "running")
    job = env.job(job_id)
    assert job["state"] == "FAILED"
    assert job["failure"].startswith("3 volumes lost, the last vol-")
    assert job["failure"].endswith("(error): not making another")
    assert [e["kind"] for e in job["events"]].count("volume-lost") == 2
    assert env.cloud.live_instances(job_id) == []
