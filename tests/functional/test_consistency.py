"""EC2 is eventually consistent: right after RunInstances or CreateVolume a describe may
not show what was made ("does not mean the instance has been terminated", the EC2 API
reference says of that NotFound). A pass in that window must not take the new
instance or volume for gone: that ended the attempt, launched a second instance and
left the first running, untracked; or made a second volume and forgot the first."""

from __future__ import annotations

from typing import Any

from chalicelib import runtime
from chalicelib.reconcile import NOT_VISIBLE_GRACE_SECONDS
from tests.functional.conftest import Env
from tests.functional.test_faults import kinds


def hidden_from_describes(hidden: set[str]) -> None:
    """The control plane's DescribeInstances / DescribeVolumes leave out ``hidden``."""

    def instances(parsed: dict[str, Any], **_: Any) -> None:
        for reservation in parsed.get("Reservations", []):
            reservation["Instances"] = [
                i for i in reservation["Instances"] if i["InstanceId"] not in hidden
            ]
        parsed["Reservations"] = [r for r in parsed.get("Reservations", []) if r["Instances"]]

    def volumes(parsed: dict[str, Any], **_: Any) -> None:
        parsed["Volumes"] = [v for v in parsed.get("Volumes", []) if v["VolumeId"] not in hidden]

    events = runtime.control_plane().reconciler.ec2._client.meta.events
    events.register("after-call.ec2.DescribeInstances", instances)
    events.register("after-call.ec2.DescribeVolumes", volumes)


def test_an_instance_ec2_does_not_show_yet_is_not_taken_for_gone(env: Env) -> None:
    job = env.submit()
    job_id, first = job["job_id"], job["attempts"][0]["instance_id"]
    hidden = {first}
    hidden_from_describes(hidden)
    env.clock.advance(30)
    env.cloud.sweep()  # a pass inside EC2's consistency window
    job = env.job(job_id)
    assert [a["end_reason"] for a in job["attempts"]] == [None], kinds(job)
    hidden.clear()  # EC2 shows it now
    env.cloud.state_change(first, "running")
    job = env.job(job_id)
    assert job["state"] == "RUNNING"
    assert [i["InstanceId"] for i in env.cloud.live_instances(job_id)] == [first]
    assert "instance-reclaimed" not in kinds(job)


def test_an_instance_ec2_never_shows_is_gone_after_the_grace(env: Env) -> None:
    job = env.submit()
    job_id, first = job["job_id"], job["attempts"][0]["instance_id"]
    hidden_from_describes({first})
    env.clock.advance(NOT_VISIBLE_GRACE_SECONDS + 1)
    env.cloud.sweep()
    job = env.job(job_id)
    assert job["attempts"][0]["end_reason"] == "reclaimed"
    assert len(job["attempts"]) == 2  # relaunched: the job does not wait forever


def test_a_volume_ec2_does_not_show_yet_is_not_taken_for_lost(env: Env) -> None:
    job = env.submit()
    job_id, volume_id = job["job_id"], job["volume"]["volume_id"]
    hidden = {volume_id}
    hidden_from_describes(hidden)
    env.clock.advance(30)
    env.cloud.sweep()
    job = env.job(job_id)
    assert "volume-lost" not in kinds(job)
    assert job["volume"]["volume_id"] == volume_id
    hidden.clear()
    env.cloud.state_change(job["attempts"][0]["instance_id"], "running")
    job = env.job(job_id)
    assert job["state"] == "RUNNING"
    tagged = [{"Name": "tag:spotctl:job-id", "Values": [job_id]}]
    assert [v["VolumeId"] for v in env.ec2.describe_volumes(Filters=tagged)["Volumes"]] == [
        volume_id
    ]


def instance_initiated_shutdowns() -> set[str]:
    """The instances added to the set answer DescribeInstances as EC2 answers for an
    instance its own OS shut down (the agent's `shutdown -h now`): StateReason
    Client.InstanceInitiatedShutdown, unlike a reclaim (Server.SpotInstanceTermination)."""
    shut: set[str] = set()

    def reason(parsed: dict[str, Any], **_: Any) -> None:
        for reservation in parsed.get("Reservations", []):
            for instance in reservation["Instances"]:
                if instance["InstanceId"] in shut:
                    instance["StateReason"] = {
                        "Code": "Client.InstanceInitiatedShutdown",
                        "Message": "Client.InstanceInitiatedShutdown: Instance initiated shutdown",
                    }

    events = runtime.control_plane().reconciler.ec2._client.meta.events
    events.register("after-call.ec2.DescribeInstances", reason)
    return shut


def shut_down(env: Env, instance_id: str, shut: set[str]) -> None:
    env.ec2.terminate_instances(InstanceIds=[instance_id])
    shut.add(instance_id)
    env.cloud.state_change(instance_id, "terminated")


def test_instances_that_shut_down_without_a_word_stop_the_relaunching(env: Env) -> None:
    """No report reaches the API (no route to it, say): each instance runs, its agent
    gives up reporting and shuts it down. Not capacity taken back, and not forever."""
    shut = instance_initiated_shutdowns()
    job_id = env.submit()["job_id"]
    for number in (1, 2, 3):
        job = env.job(job_id)
        assert job["state"] != "FAILED", kinds(job)
        instance = job["attempts"][-1]["instance_id"]
        assert job["attempts"][-1]["number"] == number
        env.cloud.state_change(instance, "running")
        env.clock.advance(600)
        shut_down(env, instance, shut)
        env.clock.advance(60)
        env.cloud.sweep()
    job = env.job(job_id)
    assert [a["end_reason"] for a in job["attempts"]] == ["shut-down"] * 3
    assert job["interruptions"] == 0  # no pool's record counts them as reclaims
    assert job["state"] == "FAILED"
    assert job["failure"].startswith("its last 3 instances shut themselves down")
    assert env.cloud.live_instances(job_id) == []


def test_an_instance_whose_agent_told_of_a_notice_was_interrupted(env: Env) -> None:
    # The warning event was lost, but the agent saw the notice, reported and went.
    shut = instance_initiated_shutdowns()
    job = env.submit()
    job_id, first = job["job_id"], job["attempts"][0]["instance_id"]
    env.cloud.state_change(first, "running")
    told = {"attempt": 1, "kind": "interrupted", "detail": "notice; sync ok", "synced": True}
    assert env.report(job_id, told).status_code == 200
    shut_down(env, first, shut)
    job = env.job(job_id)
    assert job["attempts"][0]["end_reason"] == "interrupted"
    assert len(job["attempts"]) == 2


def test_instances_the_volume_never_reached_are_not_counted(env: Env) -> None:
    # Bootstrap gives up on a volume that never comes (a detach that hangs), untold, so
    # that a new instance may get it: no sign the API is out of reach.
    shut = instance_initiated_shutdowns()
    job_id = env.submit()["job_id"]
    for _ in range(3):
        instance = env.job(job_id)["attempts"][-1]["instance_id"]
        env.clock.advance(600)
        shut_down(env, instance, shut)  # before its volume was ever attached
        env.clock.advance(60)
        env.cloud.sweep()
    job = env.job(job_id)
    assert job["state"] != "FAILED", job["failure"]
    assert len(job["attempts"]) == 4


def test_a_record_from_before_results_uri_gets_the_stage_bucket_s(env: Env) -> None:
    job_id = env.submit()["job_id"]
    store = runtime.control_plane().store
    old = store.get(job_id)
    store.save(old.model_copy(update={"results_uri": None}))  # as stored before
    env.clock.advance(60)
    env.cloud.sweep()
    assert env.job(job_id)["results_uri"] == f"s3://spotctl-results/jobs/{job_id}"
