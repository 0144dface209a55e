"""The recovery loop end to end: HTTP API and EC2 events through chalice.test.Client,
the control plane's calls going to moto in server mode over HTTP.

AWS's part (taking instances back, sending events) is played by the test with the
documented event shapes; after every step the test checks what real AWS would
enforce and moto does not (one attachment per volume, same zone).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse, HTTPHeaders

from chalicelib import runtime
from chalicelib.reconcile import CANCEL_VOLUME_WAIT_SECONDS, LEAVE_DRAIN_SECONDS
from tests.functional.conftest import Env

HOUR = 3600.0


def sweeps(env: Env, n: int) -> None:
    """``n`` one-minute sweeps."""
    for _ in range(n):
        env.clock.advance(60)
        env.cloud.sweep()


def running_job(env: Env, **spec: Any) -> tuple[str, str, str]:
    """Submit, let the first instance come up, return (job id, instance id, volume id)."""
    job = env.submit(**spec)
    assert job["state"] == "PROVISIONING"
    job_id = job["job_id"]
    first = job["attempts"][0]["instance_id"]
    env.clock.advance(60)
    env.cloud.state_change(first, "running")
    job = env.job(job_id)
    assert job["state"] == "RUNNING"
    env.cloud.assert_invariants(job_id)
    return job_id, first, job["volume"]["volume_id"]


def attachment_of(env: Env, volume_id: str) -> str | None:
    volume = env.ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
    attached = [a["InstanceId"] for a in volume["Attachments"] if a["State"] != "detached"]
    return attached[0] if attached else None


def zone_of(env: Env, instance_id: str) -> str:
    reservations = env.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    zone: str = reservations[0]["Instances"][0]["Placement"]["AvailabilityZone"]
    return zone


def assert_recovered(env: Env, job_id: str, volume_id: str, old: str) -> str:
    """Exactly one live instance, holding the volume, in the volume's zone."""
    job = env.job(job_id)
    assert job["state"] == "RUNNING", job["events"]
    live = env.cloud.live_instances(job_id)
    assert len(live) == 1
    new: str = live[0]["InstanceId"]
    assert new != old
    assert attachment_of(env, volume_id) == new
    volume = env.ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
    assert zone_of(env, new) == volume["AvailabilityZone"]
    assert [a["instance_id"] for a in job["attempts"]] == [old, new]
    env.cloud.assert_invariants(job_id)
    return new


def test_submit_interrupt_recover_complete_records_two_attempts_and_costs(env: Env) -> None:
    env.cloud.set_spot_prices(
        {
            ("g4dn.xlarge", "us-east-1a"): 0.21,
            ("g4dn.xlarge", "us-east-1b"): 0.16,
            ("g5.xlarge", "us-east-1b"): 0.40,
            ("g5.xlarge", "us-east-1c"): 0.12,
        }
    )
    volumes_before = len(env.cloud.volumes())
    job_id, first, volume_id = running_job(env)
    # The cheapest pool of all is g5.xlarge in us-east-1c.
    assert env.job(job_id)["attempts"][0]["pool"] == "g5.xlarge@us-east-1c"
    volume = env.ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
    assert volume["Size"] == 100
    assert {"Key": "spotctl:job-id", "Value": job_id} in volume["Tags"]
    instance = env.ec2.describe_instances(InstanceIds=[first])["Reservations"][0]["Instances"][0]
    assert instance["InstanceLifecycle"] == "spot"

    env.clock.advance(HOUR)
    env.cloud.deliver("spot-interruption-warning", first)
    job = env.job(job_id)
    assert job["state"] == "RECOVERING"
    second = job["attempts"][1]["instance_id"]
    # Launched during the notice, in the volume's zone, while the old one still runs.
    assert zone_of(env, second) == volume["AvailabilityZone"]
    assert attachment_of(env, volume_id) == first
    env.cloud.assert_invariants(job_id)

    env.clock.advance(120)
    env.cloud.reclaim(first)
    env.cloud.state_change(first, "terminated")
    assert assert_recovered(env, job_id, volume_id, first) == second

    env.clock.advance(2 * HOUR)
    response = env.report(job_id, {"attempt": 2, "kind": "exited", "exit_code": 0})
    assert response.status_code == 200, response.body
    job = env.job(job_id)
    assert job["state"] == "SUCCEEDED"
    assert [a["end_reason"] for a in job["attempts"]] == ["interrupted", "completed"]
    assert env.cloud.live_instances(job_id) == []
    assert len(env.cloud.volumes()) == volumes_before + 1  # kept: it holds the results
    first_attempt, second_attempt = job["attempts"]
    # Billed from first sight running: 1 h 2 min, then 2 h, at $0.12/h spot.
    assert first_attempt["price"] == 0.12
    assert first_attempt["cost_usd"] == pytest.approx(0.12 * (HOUR + 120) / HOUR, abs=1e-4)
    assert second_attempt["cost_usd"] == pytest.approx(0.12 * 2, abs=1e-4)
    # g5.xlarge lists at $1.006/h on demand.
    assert job["on_demand_cost_usd"] == pytest.approx(1.006 * (3 * HOUR + 120) / HOUR, abs=1e-4)
    assert job["saved_usd"] == pytest.approx(job["on_demand_cost_usd"] - job["cost_usd"])


def test_warning_delivered_three_times_launches_one_replacement(env: Env) -> None:
    job_id, first, volume_id = running_job(env)
    for _ in range(3):
        env.cloud.deliver("spot-interruption-warning", first)
        env.cloud.assert_invariants(job_id)
    assert len(env.cloud.instances(job_id)) == 2
    env.cloud.reclaim(first)
    env.cloud.state_change(first, "terminated")
    env.cloud.deliver("spot-interruption-warning", first)  # late duplicate
    assert_recovered(env, job_id, volume_id, first)
    assert len(env.cloud.instances(job_id)) == 2


def test_terminated_arriving_before_the_warning(env: Env) -> None:
    job_id, first, volume_id = running_job(env)
    env.cloud.reclaim(first)
    env.cloud.state_change(first, "terminated")
    job = env.job(job_id)
    assert job["state"] == "RECOVERING"
    second = job["attempts"][1]["instance_id"]
    env.cloud.deliver("spot-interruption-warning", first)
    env.cloud.state_change(second, "running")
    assert_recovered(env, job_id, volume_id, first)
    assert env.job(job_id)["attempts"][0]["end_reason"] == "reclaimed"


def test_warning_never_arriving_only_terminated(env: Env) -> None:
    job_id, first, volume_id = running_job(env)
    env.cloud.reclaim(first)
    env.cloud.state_change(first, "shutting-down")
    env.cloud.state_change(first, "terminated")
    second = env.job(job_id)["attempts"][1]["instance_id"]
    env.cloud.state_change(second, "running")
    assert_recovered(env, job_id, volume_id, first)


def test_sweep_alone_finds_a_vanished_instance(env: Env) -> None:
    job_id, first, volume_id = running_job(env)
    env.cloud.reclaim(first)  # no event at all
    env.clock.advance(60)
    env.cloud.sweep()
    assert env.job(job_id)["state"] == "RECOVERING"
    env.clock.advance(60)
    env.cloud.sweep()
    assert_recovered(env, job_id, volume_id, first)


def test_sweeping_a_running_job_changes_nothing(env: Env) -> None:
    job_id, _, _ = running_job(env)
    before = env.job(job_id)
    env.cloud.sweep()
    env.cloud.sweep()
    assert env.job(job_id) == before


def test_stopped_instance_is_terminated_and_replaced(env: Env) -> None:
    job_id, first, volume_id = running_job(env)
    env.ec2.stop_instances(InstanceIds=[first])
    env.cloud.state_change(first, "stopped")
    state = env.ec2.describe_instances(InstanceIds=[first])["Reservations"][0]["Instances"][0]
    assert state["State"]["Name"] in ("shutting-down", "terminated")
    second = env.job(job_id)["attempts"][1]["instance_id"]
    env.cloud.state_change(second, "running")
    assert_recovered(env, job_id, volume_id, first)


def test_replacement_is_not_attached_while_the_old_instance_holds_the_volume(env: Env) -> None:
    job_id, first, volume_id = running_job(env)
    env.cloud.deliver("spot-interruption-warning", first)
    second = env.job(job_id)["attempts"][1]["instance_id"]
    env.cloud.state_change(second, "running")
    assert attachment_of(env, volume_id) == first
    assert env.job(job_id)["state"] == "RECOVERING"


def test_event_for_an_instance_that_is_not_ours_is_ignored(env: Env) -> None:
    job_id, _, _ = running_job(env)
    before = env.job(job_id)
    env.cloud.deliver("spot-interruption-warning", "i-0123456789abcdef0")
    env.cloud.state_change("i-0123456789abcdef0", "terminated")
    assert env.job(job_id) == before


def test_nonzero_exit_fails_the_job_and_keeps_the_volume(env: Env) -> None:
    job_id, _, volume_id = running_job(env)
    response = env.report(job_id, {"attempt": 1, "kind": "exited", "exit_code": 3})
    assert response.status_code == 200
    job = env.job(job_id)
    assert job["state"] == "FAILED"
    assert job["exit_code"] == 3
    assert "code 3" in job["failure"]
    assert env.cloud.live_instances(job_id) == []
    assert env.ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"]


def test_what_the_agent_says_with_an_exit_is_in_the_failure(env: Env) -> None:
    """A bootstrap (or agent) that could not run the workload says why with exit 125."""
    job_id, _, _ = running_job(env)
    why = "bootstrap: /dev/nvme1n1 holds a signature that is not a filesystem"
    report = {"attempt": 1, "kind": "exited", "exit_code": 125, "detail": why}
    assert env.report(job_id, report).status_code == 200
    job = env.job(job_id)
    assert job["state"] == "FAILED"
    assert job["failure"] == f"the workload exited with code 125 ({why})"
    assert f"exit code 125: {why}" in [e["detail"] for e in job["events"]]


def test_a_failed_workload_is_restarted_on_a_new_instance_with_its_volume(env: Env) -> None:
    job_id, first, volume_id = running_job(env, max_restarts_on_errors=1)

    env.report(job_id, {"attempt": 1, "kind": "exited", "exit_code": 3})
    assert env.cloud.live_instances(job_id) == []  # terminated: the volume is freed
    env.cloud.state_change(first, "terminated")
    second = env.job(job_id)["attempts"][1]["instance_id"]
    env.cloud.state_change(second, "running")
    new = assert_recovered(env, job_id, volume_id, first)
    job = env.job(job_id)
    assert (job["error_restarts"], job["exit_code"]) == (1, None)
    assert job["attempts"][0]["end_reason"] == "failed"
    assert job["interruptions"] == 0

    # The first attempt's report again (a retried delivery) changes nothing.
    env.report(job_id, {"attempt": 1, "kind": "exited", "exit_code": 3})
    assert env.job(job_id)["state"] == "RUNNING"
    assert env.cloud.live_instances(job_id)[0]["InstanceId"] == new

    env.report(job_id, {"attempt": 2, "kind": "exited", "exit_code": 3})
    job = env.job(job_id)
    assert job["state"] == "FAILED"
    assert job["failure"] == "the workload exited with code 3, after 1 restart(s) on errors"
    assert env.cloud.live_instances(job_id) == []
    assert env.ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"]
    env.cloud.assert_invariants(job_id)


def test_a_listed_exit_code_restarts_without_using_up_the_restarts_on_errors(env: Env) -> None:
    job_id, first, volume_id = running_job(env, recover_on_exit_codes=29)
    assert env.job(job_id)["spec"]["recover_on_exit_codes"] == [29]

    env.report(job_id, {"attempt": 1, "kind": "exited", "exit_code": 29})
    env.cloud.state_change(first, "terminated")
    second = env.job(job_id)["attempts"][1]["instance_id"]
    env.cloud.state_change(second, "running")
    assert_recovered(env, job_id, volume_id, first)
    job = env.job(job_id)
    assert (job["error_restarts"], job["exit_code_restarts"], job["exit_code"]) == (0, 1, None)
    assert job["attempts"][0]["end_reason"] == "failed"

    # Its exit reported after its instance went and the job relaunched: still a restart.
    env.ec2.terminate_instances(InstanceIds=[second])
    env.cloud.state_change(second, "terminated")
    third = env.job(job_id)["attempts"][2]["instance_id"]
    env.cloud.state_change(third, "running")
    env.report(job_id, {"attempt": 2, "kind": "exited", "exit_code": 29})
    job = env.job(job_id)
    assert (job["state"], job["exit_code_restarts"], job["interruptions"]) == ("RUNNING", 2, 0)

    # Any other non-zero code is an error, and this job allows no restart on errors.
    env.report(job_id, {"attempt": 3, "kind": "exited", "exit_code": 1})
    job = env.job(job_id)
    assert job["state"] == "FAILED"
    assert job["failure"] == (
        "the workload exited with code 1, after 2 restart(s) on listed exit codes"
    )
    assert env.cloud.live_instances(job_id) == []
    assert env.ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"]


def test_a_failure_reported_after_its_relaunch_counts_as_the_restart(env: Env) -> None:
    job_id, first, volume_id = running_job(env, max_restarts_on_errors=1)
    env.ec2.terminate_instances(InstanceIds=[first])  # the agent's shutdown came first
    env.cloud.state_change(first, "terminated")
    second = env.job(job_id)["attempts"][1]["instance_id"]
    env.cloud.state_change(second, "running")
    assert_recovered(env, job_id, volume_id, first)

    for _ in range(2):  # the agent's retried report, twice
        env.report(job_id, {"attempt": 1, "kind": "exited", "exit_code": 3})
        job = env.job(job_id)
        assert job["state"] == "RUNNING"
        assert (job["error_restarts"], job["exit_code"], job["interruptions"]) == (1, None, 0)
        assert [a["end_reason"] for a in job["attempts"]] == ["failed", None]
        assert [i["InstanceId"] for i in env.cloud.live_instances(job_id)] == [second]


def test_cancel_while_running_leaves_no_instance(env: Env) -> None:
    job_id, first, volume_id = running_job(env)
    response = env.client.http.delete(f"/jobs/{job_id}")
    assert response.status_code == 200
    assert json.loads(response.body)["state"] == "CANCELLING"
    assert env.cloud.live_instances(job_id) == []
    env.cloud.state_change(first, "terminated")
    job = env.job(job_id)
    assert job["state"] == "CANCELLED"
    assert [a["end_reason"] for a in job["attempts"]] == ["cancelled"]
    assert job["interruptions"] == 0
    assert env.ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"]  # kept


def test_cancel_while_recovering_leaves_no_instance(env: Env) -> None:
    job_id, first, _ = running_job(env)
    env.cloud.deliver("spot-interruption-warning", first)
    assert env.job(job_id)["state"] == "RECOVERING"
    env.client.http.delete(f"/jobs/{job_id}")
    assert env.cloud.live_instances(job_id) == []
    env.cloud.sweep()
    assert env.job(job_id)["state"] == "CANCELLED"
    assert all(a["end_reason"] for a in env.job(job_id)["attempts"])


def drained(env: Env, job_id: str, instance_id: str, report: dict[str, Any] | None) -> None:
    """A cancel that deletes the volume asks the instance to leave (the tag its agent
    watches) instead of terminating it: the agent stops the workload, syncs, sends
    ``report`` (None: it never answers) and shuts the instance down."""
    tags = env.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [instance_id]}])
    assert "spotctl:leave" in {t["Key"] for t in tags["Tags"]}
    reservations = env.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    assert reservations[0]["Instances"][0]["State"]["Name"] == "running"  # not terminated
    if report is None:
        return
    told = {"attempt": 1, "kind": "interrupted", "detail": "asked to leave", **report}
    assert env.report(job_id, told).status_code == 200
    env.ec2.terminate_instances(InstanceIds=[instance_id])  # its shutdown
    env.cloud.state_change(instance_id, "terminated")


def test_cancel_with_delete_volume_keeps_the_volume_of_an_agent_that_never_answers(
    env: Env,
) -> None:
    job_id, first, volume_id = running_job(env, results_s3_uri="s3://bucket/run")
    env.client.http.delete(f"/jobs/{job_id}?delete_volume=true")
    drained(env, job_id, first, None)
    env.clock.advance(90 + LEAVE_DRAIN_SECONDS + 1)  # the job's grace and the drain's time
    env.cloud.sweep()
    assert env.cloud.live_instances(job_id) == []  # terminated after all
    env.cloud.state_change(first, "terminated")
    job = env.job(job_id)
    assert job["state"] == "CANCELLING"  # a late final report may still come
    assert job["events"][-1]["kind"] == "volume-wait"
    env.clock.advance(CANCEL_VOLUME_WAIT_SECONDS)
    env.cloud.sweep()
    job = env.job(job_id)
    assert job["state"] == "CANCELLED"
    assert env.ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"]
    kept = [e["detail"] for e in job["events"] if e["kind"] == "volume-kept"]
    assert kept == ["attempt 1 did not report a final sync to S3 that worked"]


def test_cancel_with_delete_volume_deletes_a_volume_whose_final_sync_worked(env: Env) -> None:
    job_id, first, volume_id = running_job(env)
    env.report(job_id, {"attempt": 1, "kind": "checkpoint_synced"})
    env.client.http.delete(f"/jobs/{job_id}?delete_volume=true")
    drained(env, job_id, first, {"synced": True})
    env.cloud.sweep()
    job = env.job(job_id)
    assert job["state"] == "CANCELLED"
    assert [a["end_reason"] for a in job["attempts"]] == ["cancelled"]
    remaining = env.ec2.describe_volumes(Filters=[{"Name": "volume-id", "Values": [volume_id]}])
    assert remaining["Volumes"] == []


def test_cancel_keeps_a_volume_written_after_its_last_sync(env: Env) -> None:
    """A periodic sync, then hours of training, then the instance gone unwarned (no
    final sync): the volume holds what S3 does not. A cancel must not delete it."""
    job_id, first, volume_id = running_job(env)
    env.report(job_id, {"attempt": 1, "kind": "checkpoint_synced"})
    env.clock.advance(3 * 3600)
    env.cloud.reclaim(first)
    env.cloud.state_change(first, "terminated")
    env.client.http.delete(f"/jobs/{job_id}?delete_volume=true")
    sweeps(env, 2)  # the relaunched instance is asked to drain; it does not answer
    env.clock.advance(CANCEL_VOLUME_WAIT_SECONDS)
    sweeps(env, 2)  # terminated after the drain's time; then the volume is decided on
    job = env.job(job_id)
    assert job["state"] == "CANCELLED"
    assert env.ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"]
    assert "volume-deleted" not in [e["kind"] for e in job["events"]]
    # Said as it is: a final sync that failed is no better.
    job_id, second, volume_id = running_job(env)
    env.client.http.delete(f"/jobs/{job_id}?delete_volume=true")
    drained(env, job_id, second, {"synced": False})
    env.clock.advance(CANCEL_VOLUME_WAIT_SECONDS)
    sweeps(env, 1)
    assert env.job(job_id)["state"] == "CANCELLED"
    assert env.ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"]


def test_cancel_deletes_the_volume_once_it_is_detached(env: Env) -> None:
    """On EC2 the volume is still attached (then detaching) for a while after the
    instance is gone; the cancel waits for it instead of leaving it to bill forever."""
    job_id, first, volume_id = running_job(env)
    detached = {"yet": False}

    def still_in_use(parsed: dict[str, Any], **_: Any) -> None:
        for volume in parsed.get("Volumes", []):
            if volume["VolumeId"] == volume_id and not detached["yet"]:
                volume["State"] = "in-use"

    ec2 = runtime.control_plane().reconciler.ec2._client
    ec2.meta.events.register("after-call.ec2.DescribeVolumes", still_in_use)
    env.client.http.delete(f"/jobs/{job_id}?delete_volume=true")
    drained(env, job_id, first, {"synced": True})
    sweeps(env, 2)
    job = env.job(job_id)
    assert job["state"] == "CANCELLING"
    assert (
        job["events"][-1]["detail"]
        == f"{volume_id}: waiting for it to be detached before deleting it"
    )
    detached["yet"] = True
    sweeps(env, 1)
    job = env.job(job_id)
    assert job["state"] == "CANCELLED"
    assert job["events"][-1] == {**job["events"][-1], "kind": "volume-deleted", "detail": volume_id}
    remaining = env.ec2.describe_volumes(Filters=[{"Name": "volume-id", "Values": [volume_id]}])
    assert remaining["Volumes"] == []


def refuse_capacity(types: set[str]) -> None:
    """Make EC2 answer InsufficientInstanceCapacity for these types (edit the set later)."""

    def handler(params: dict[str, Any], **_: Any) -> Any:
        if params["body"].get("InstanceType") not in types:
            return None
        body = {"Error": {"Code": "InsufficientInstanceCapacity", "Message": "no capacity"}}
        return AWSResponse("http://moto", 500, HTTPHeaders(), None), body

    client = runtime.control_plane().reconciler.ec2._client
    client.meta.events.register("before-call.ec2.RunInstances", handler)


def test_no_capacity_for_the_first_type_tries_the_next_type_in_the_same_zone(env: Env) -> None:
    refuse_capacity({"g4dn.xlarge"})
    job = env.submit()
    attempt = job["attempts"][0]
    assert attempt["pool"].startswith("g5.xlarge@")
    assert any(e["kind"] == "launch-refused" for e in job["events"])
    volume = env.ec2.describe_volumes(VolumeIds=[job["volume"]["volume_id"]])["Volumes"][0]
    assert attempt["pool"].endswith(volume["AvailabilityZone"])


def test_no_capacity_anywhere_waits_and_the_sweep_retries_later(env: Env) -> None:
    refused = {"g4dn.xlarge", "g5.xlarge"}
    refuse_capacity(refused)
    job = env.submit()
    job_id = job["job_id"]
    assert job["state"] == "WAITING"
    assert env.cloud.instances(job_id) == []
    refused.clear()
    env.cloud.sweep()  # too early: still waiting
    assert env.job(job_id)["state"] == "WAITING"
    env.clock.advance(301)
    env.cloud.sweep()
    job = env.job(job_id)
    assert job["state"] == "PROVISIONING"
    assert [a["end_reason"] for a in job["attempts"]] == ["launch-failed", None]
    assert len(env.cloud.live_instances(job_id)) == 1


def test_a_stored_job_whose_user_data_cannot_be_made_fails_clearly(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = {"g4dn.xlarge", "g5.xlarge"}
    refuse_capacity(refused)
    job_id = env.submit()["job_id"]
    assert env.job(job_id)["state"] == "WAITING"
    refused.clear()

    # The agent's files grew past what this job's command leaves room for (a deploy
    # since it was submitted): its launch can never be made.
    def too_big(job: Any, attempt: Any) -> str:
        raise ValueError("user data is 17000 bytes, over EC2's 16384")

    monkeypatch.setattr(runtime.control_plane().reconciler, "render_user_data", too_big)
    env.clock.advance(301)
    env.cloud.sweep()
    job = env.job(job_id)
    assert job["state"] == "FAILED"
    assert "user data" in job["failure"] and "16384" in job["failure"]
    assert [a["end_reason"] for a in job["attempts"]] == ["launch-failed", "launch-failed"]
    assert env.cloud.instances(job_id) == []
    assert env.ec2.describe_volumes(VolumeIds=[job["volume"]["volume_id"]])["Volumes"]
    env.cloud.sweep()  # and the next pass leaves it be
    assert env.job(job_id)["state"] == "FAILED"
