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
from tests.functional.test_faults import running
from tests.functional.test_recovery_loop import drained


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
        client = runtime.control_plane().reconciler.ec2._client
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


def attached_elsewhere(env: Env) -> tuple[str, str]:
    """A volume of the user's, attached to an instance of theirs (not spotctl's)."""
    volume_id = env.ec2.create_volume(AvailabilityZone="us-east-1b", Size=50)["VolumeId"]
    image = env.ec2.describe_images(Owners=["self"])["Images"][0]["ImageId"]
    theirs = env.ec2.run_instances(
        ImageId=image,
        MinCount=1,
        MaxCount=1,
        InstanceType="t3.micro",
        Placement={"AvailabilityZone": "us-east-1b"},
    )["Instances"][0]["InstanceId"]
    env.ec2.attach_volume(VolumeId=volume_id, InstanceId=theirs, Device="/dev/sdg")
    return volume_id, theirs


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
    source = env.ec2.create_volume(AvailabilityZone="us-east-1a", Size=8)["VolumeId"]
    snapshot = env.ec2.create_snapshot(VolumeId=source)["SnapshotId"]
    # (Deleted, or its key revoked, after the submission checked that it exists.)
    refusal = Refusal("CreateVolume", code, message)
    job_id = env.submit(snapshot_id=snapshot, volume_gib=8)["job_id"]
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
    job_id, first, volume_id = running(env)
    env.report(job_id, {"attempt": 1, "kind": "checkpoint_synced"})
    refusal = Refusal("DeleteVolume", "UnauthorizedOperation", "not authorized: ec2:DeleteVolume")
    env.client.http.delete(f"/jobs/{job_id}?delete_volume=true")
    drained(env, job_id, first, {"synced": True})
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

    client = runtime.control_plane().reconciler.ec2._client
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


def test_a_volume_attached_to_another_instance_is_waited_for_then_the_job_fails(
    env: Env,
) -> None:
    volume_id, theirs = attached_elsewhere(env)
    job_id = env.submit(volume_id=volume_id, volume_gib=None)["job_id"]
    job = env.job(job_id)
    assert job["state"] == "WAITING" and job["attempts"] == []
    busy = [e["detail"] for e in job["events"] if e["kind"] == "volume-busy"]
    assert busy == [
        f"{volume_id} is attached to {theirs}, not this job's: waiting for it to be free"
    ]
    sweeps(env, 4, step=400.0)  # 27 min: still waiting, nothing launched
    assert env.job(job_id)["state"] == "WAITING"
    assert env.cloud.instances(job_id) == []
    sweeps(env, 1, step=400.0)
    job = env.job(job_id)
    assert job["state"] == "FAILED"
    assert job["failure"] == (
        f"volume {volume_id} is attached to {theirs}, not this job's, still after 30 min"
    )
    assert env.cloud.instances(job_id) == []


def test_a_volume_freed_while_waited_for_is_adopted(env: Env) -> None:
    volume_id, theirs = attached_elsewhere(env)
    job_id = env.submit(volume_id=volume_id, volume_gib=None)["job_id"]
    env.ec2.detach_volume(VolumeId=volume_id, InstanceId=theirs)
    sweeps(env, 1, step=120.0)
    job = env.job(job_id)
    assert job["state"] == "PROVISIONING"
    assert job["volume"]["volume_id"] == volume_id
    assert len(env.cloud.live_instances(job_id)) == 1


ARCH = (
    "InvalidParameterValue",
    "The architecture 'arm64' of the specified instance type does not match the "
    "architecture 'x86_64' of the specified AMI.",
)


def test_a_pool_ec2_will_not_launch_in_is_passed_over_for_the_next(env: Env) -> None:
    code, message = ARCH
    Refusal("RunInstances", code, message, when=lambda b: b.get("InstanceType") == "g5.xlarge")
    env.cloud.set_spot_prices(
        {("g5.xlarge", "us-east-1a"): 0.1, ("g4dn.xlarge", "us-east-1a"): 0.2}
    )
    job = env.submit(availability_zones=["us-east-1a"])
    assert job["state"] == "PROVISIONING"
    assert job["attempts"][0]["pool"] == "g4dn.xlarge@us-east-1a"
    refused = [e["detail"] for e in job["events"] if e["kind"] == "launch-refused"]
    assert refused == [f"g5.xlarge@us-east-1a: {code}: {message}"]


def test_no_pool_ec2_will_launch_in_waits_saying_why(env: Env) -> None:
    refusal = Refusal("RunInstances", "UnauthorizedOperation", "not authorized: ec2:RunInstances")
    job = env.submit(availability_zones=["us-east-1a"])
    assert job["state"] == "WAITING"
    assert (
        "UnauthorizedOperation"
        in [e for e in job["events"] if e["kind"] == "waiting"][-1]["detail"]
    )
    refusal.on = False  # the operator fixes the role
    sweeps(env, 1)
    assert len(env.cloud.live_instances(job["job_id"])) == 1


def test_a_volume_ec2_will_not_attach_fails_the_job_and_ends_its_instance(env: Env) -> None:
    message = "Invalid value '/dev/sdf' for unixDevice. Attachment point /dev/sdf is already in use"
    refusal = Refusal("AttachVolume", "InvalidParameterValue", message)
    job = env.submit()
    first = job["attempts"][0]["instance_id"]
    env.clock.advance(60)
    env.cloud.state_change(first, "running")
    job = env.job(job["job_id"])
    assert job["state"] == "FAILED"
    assert job["failure"] == (
        f"its volume could not be attached to {first}: InvalidParameterValue: {message}"
    )
    assert [a["end_reason"] for a in job["attempts"]] == ["launch-failed"]
    assert state_of(env, first) in ("shutting-down", "terminated")
    assert env.ec2.describe_volumes(VolumeIds=[job["volume"]["volume_id"]])["Volumes"]
    sweeps(env, 2)
    assert refusal.count == 1
