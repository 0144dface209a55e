"""Moving a job's volume to another zone, against moto in server mode.

The job's zone loses spot capacity and gets dear while another zone is cheap: with
no instance of the job alive, the control plane snapshots the volume, restores it
in the other zone, and launches there. The old volume and the snapshot stay.
"""

from __future__ import annotations

from typing import Any

import pytest
from botocore.awsrequest import AWSResponse, HTTPHeaders

from chalicelib import runtime
from tests.functional.conftest import Env
from tests.functional.test_faults import LambdaCrash, ec2_client, refuse
from tests.functional.test_recovery_loop import attachment_of, zone_of

HOME = "us-east-1a"
ELSEWHERE = "us-east-1b"
TYPE = "g4dn.xlarge"


def refuse_capacity_in(zones: set[str]) -> None:
    """EC2 answers InsufficientInstanceCapacity in these zones (edit the set later)."""

    def handler(params: dict[str, Any], **_: Any) -> Any:
        if params["body"].get("Placement.AvailabilityZone") not in zones:
            return None
        body = {"Error": {"Code": "InsufficientInstanceCapacity", "Message": "no capacity"}}
        return AWSResponse("http://moto", 500, HTTPHeaders(), None), body

    client = runtime.control_plane().reconciler.ec2._client
    client.meta.events.register("before-call.ec2.RunInstances", handler)


def test_a_zone_without_capacity_moves_the_volume_to_the_cheaper_zone(env: Env) -> None:
    prices = {(TYPE, HOME): 0.15, (TYPE, ELSEWHERE): 0.40}
    env.cloud.set_spot_prices(prices)
    refused: set[str] = set()
    refuse_capacity_in(refused)
    job = env.submit(instance_types=[TYPE], availability_zones=[HOME, ELSEWHERE])
    job_id = job["job_id"]
    first = job["attempts"][0]["instance_id"]
    assert zone_of(env, first) == HOME
    env.clock.advance(60)
    env.cloud.state_change(first, "running")
    job = env.job(job_id)
    assert job["state"] == "RUNNING"
    old_volume = job["volume"]["volume_id"]

    # The home zone loses its capacity and its price; the other zone is cheap.
    refused.add(HOME)
    prices.update({(TYPE, HOME): 0.50, (TYPE, ELSEWHERE): 0.12})
    env.clock.advance(3600)
    env.cloud.reclaim(first)
    env.cloud.state_change(first, "terminated")
    env.cloud.assert_invariants(job_id)
    for _ in range(4):  # each sweep takes the move one step further
        env.clock.advance(60)
        env.cloud.sweep()
        env.cloud.assert_invariants(job_id)
        job = env.job(job_id)
        if len(job["attempts"]) > 1 and job["attempts"][-1]["instance_id"]:
            break
    kinds = [e["kind"] for e in job["events"]]
    assert "moving-volume" in kinds, job["events"]
    assert "volume-moved" in kinds, job["events"]
    second = job["attempts"][-1]
    assert second["reason"].startswith(f"move from zone {HOME} to zone {ELSEWHERE}: ")
    assert zone_of(env, second["instance_id"]) == ELSEWHERE

    new_volume = job["volume"]["volume_id"]
    assert new_volume != old_volume
    assert job["volume"]["az"] == ELSEWHERE
    volumes = {v["VolumeId"]: v for v in env.cloud.volumes()}
    snapshot = volumes[new_volume]["SnapshotId"]
    assert job["kept_after_moves"] == [old_volume, snapshot]
    described = env.ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0]
    assert described["VolumeId"] == old_volume
    assert volumes[new_volume]["AvailabilityZone"] == ELSEWHERE
    assert volumes[new_volume]["Size"] == volumes[old_volume]["Size"]
    assert old_volume in volumes, "the old volume is never deleted"

    env.clock.advance(60)
    env.cloud.state_change(second["instance_id"], "running")
    job = env.job(job_id)
    assert job["state"] == "RUNNING", job["events"]
    live = env.cloud.live_instances(job_id)
    assert [i["InstanceId"] for i in live] == [second["instance_id"]]
    assert attachment_of(env, new_volume) == second["instance_id"]
    assert attachment_of(env, old_volume) is None
    ours = env.ec2.describe_snapshots(
        OwnerIds=["self"], Filters=[{"Name": "tag:spotctl:job-id", "Values": [job_id]}]
    )
    assert [s["SnapshotId"] for s in ours["Snapshots"]] == [snapshot]
    env.cloud.assert_invariants(job_id)


def reclaimed_at_home(env: Env) -> tuple[str, str]:
    """A job running at home whose instance EC2 takes back while the other zone got
    cheap; no event reaches the control plane. Returns (job id, old volume id)."""
    prices = {(TYPE, HOME): 0.15, (TYPE, ELSEWHERE): 0.40}
    env.cloud.set_spot_prices(prices)
    job = env.submit(instance_types=[TYPE], availability_zones=[HOME, ELSEWHERE])
    first = job["attempts"][0]["instance_id"]
    env.clock.advance(60)
    env.cloud.state_change(first, "running")
    prices.update({(TYPE, HOME): 0.50, (TYPE, ELSEWHERE): 0.12})
    env.clock.advance(3600)
    env.cloud.reclaim(first)
    return job["job_id"], job["volume"]["volume_id"]


def our_snapshots(env: Env, job_id: str) -> list[str]:
    found = env.ec2.describe_snapshots(
        OwnerIds=["self"], Filters=[{"Name": "tag:spotctl:job-id", "Values": [job_id]}]
    )
    return [s["SnapshotId"] for s in found["Snapshots"]]


def test_a_pending_snapshot_is_waited_for_by_the_sweep(env: Env) -> None:
    pending = [True]

    def still_pending(params: dict[str, Any], **_: Any) -> Any:
        body = params["body"]
        if not pending[0] or body.get("Filter.1.Name") != "snapshot-id":
            return None
        snapshot = {"SnapshotId": body["Filter.1.Value.1"], "State": "pending"}
        return AWSResponse("http://moto", 200, HTTPHeaders(), None), {"Snapshots": [snapshot]}

    ec2_client().meta.events.register("before-call.ec2.DescribeSnapshots", still_pending)
    job_id, old_volume = reclaimed_at_home(env)
    for _ in range(3):
        env.clock.advance(60)
        env.cloud.sweep()
        job = env.job(job_id)
        assert job["state"] == "RECOVERING", job["events"]
        assert job["volume"]["volume_id"] == old_volume
        assert job["volume_move"]["snapshot_id"] is not None
        assert job["volume_move"]["volume_id"] is None
        assert len(job["attempts"]) == 1
    assert len(our_snapshots(env, job_id)) == 1
    pending[0] = False
    env.clock.advance(60)
    env.cloud.sweep()  # the snapshot is done: restore it
    env.clock.advance(60)
    env.cloud.sweep()  # the restored volume is there: launch
    job = env.job(job_id)
    assert job["volume"]["az"] == ELSEWHERE
    assert zone_of(env, job["attempts"][-1]["instance_id"]) == ELSEWHERE
    assert len(env.cloud.live_instances(job_id)) == 1
    env.cloud.assert_invariants(job_id)


def test_killed_after_the_snapshot_the_next_pass_adopts_it(env: Env) -> None:
    job_id, old_volume = reclaimed_at_home(env)
    snapshotted: list[str] = []
    crashed: list[str] = []

    def note(**_: Any) -> None:
        snapshotted.append("yes")

    def crash(event_name: str, **_: Any) -> None:
        if snapshotted and not crashed:
            crashed.append(event_name)
            raise LambdaCrash(event_name)

    ec2_client().meta.events.register("after-call.ec2.CreateSnapshot", note)
    runtime.control_plane().store._client.meta.events.register("before-call.dynamodb", crash)
    with pytest.raises(LambdaCrash):
        runtime.control_plane().reconciler.reconcile(job_id)
    assert crashed
    job = env.job(job_id)
    assert job["volume_move"]["snapshot_requested"] is True
    assert job["volume_move"]["snapshot_id"] is None  # the record never learnt it

    for _ in range(3):
        env.clock.advance(60)
        env.cloud.sweep()
    job = env.job(job_id)
    assert "snapshot-adopted" in [e["kind"] for e in job["events"]]
    assert len(our_snapshots(env, job_id)) == 1
    assert job["kept_after_moves"] == [old_volume, *our_snapshots(env, job_id)]
    assert zone_of(env, job["attempts"][-1]["instance_id"]) == ELSEWHERE
    assert len(env.cloud.live_instances(job_id)) == 1
    env.cloud.assert_invariants(job_id)


def test_a_refused_snapshot_falls_back_to_the_volume_zone(env: Env) -> None:
    refuse("CreateSnapshot", "SnapshotCreationPerVolumeRateExceeded")
    job_id, old_volume = reclaimed_at_home(env)
    env.clock.advance(60)
    env.cloud.sweep()
    job = env.job(job_id)
    assert "move-failed" in [e["kind"] for e in job["events"]], job["events"]
    assert job["volume_move"] is None
    assert job["volume"]["volume_id"] == old_volume
    env.clock.advance(60)
    env.cloud.sweep()  # the next pass plans again, in the volume's zone
    job = env.job(job_id)
    assert len(job["attempts"]) == 2
    second = job["attempts"][-1]["instance_id"]
    assert zone_of(env, second) == HOME
    assert our_snapshots(env, job_id) == []
    env.cloud.state_change(second, "running")
    job = env.job(job_id)
    assert job["state"] == "RUNNING", " | ".join(e["kind"] for e in job["events"])
    assert attachment_of(env, old_volume) == second
    env.cloud.assert_invariants(job_id)
