"""A job forced onto on-demand goes back to spot once spot capacity returns.

Through the API, EC2 events and the schedule sweep, against moto: spot capacity in the
one pool is refused (another job's refusal, shared through the pool's fleet record,
starts ours on-demand), then returns; the sweep, ahead of schedule, asks the
on-demand instance to go (the ``spotctl:leave`` tag its agent reads in the instance
metadata), its agent reports and shuts it down, and the job moves its volume onto a
spot instance. An instance whose agent does not go is terminated after the drain time.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse, HTTPHeaders

from chalicelib import runtime
from chalicelib.reconcile import LEAVE_DRAIN_SECONDS
from tests.functional.conftest import Env
from tests.functional.test_faults import LambdaCrash
from tests.functional.test_recovery_loop import attachment_of

HOUR = 3600.0
TYPE, ZONE = "g4dn.xlarge", "us-east-1a"
ONE_POOL = {"instance_types": [TYPE], "availability_zones": [ZONE]}


def refuse_spot(capacity: dict[str, bool]) -> None:
    """EC2 refuses spot launches while ``capacity["spot"]`` is False (on-demand runs)."""

    def handler(params: dict[str, Any], **_: Any) -> Any:
        spot = params["body"].get("InstanceMarketOptions.MarketType") == "spot"
        if not spot or capacity["spot"]:
            return None
        body = {"Error": {"Code": "InsufficientInstanceCapacity", "Message": "no spot capacity"}}
        return AWSResponse("http://moto", 500, HTTPHeaders(), None), body

    client = runtime.control_plane().reconciler.ec2._client
    client.meta.events.register("before-call.ec2.RunInstances", handler)


def events_of(job: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e for e in job["events"] if e["kind"] == kind]


def instance_of(env: Env, instance_id: str) -> dict[str, Any]:
    reservation = env.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
    instance: dict[str, Any] = reservation["Instances"][0]
    return instance


def state_of(env: Env, instance_id: str) -> str:
    state: str = instance_of(env, instance_id)["State"]["Name"]
    return state


def leave_tag_of(env: Env, instance_id: str) -> str | None:
    tags = {t["Key"]: t["Value"] for t in instance_of(env, instance_id).get("Tags", [])}
    return tags.get("spotctl:leave")


def on_demand_job_ahead_of_schedule(env: Env) -> tuple[str, str]:
    """A deadline job started on-demand for want of spot (another job's refusal in the
    pool's record), running; spot then returns, so the next sweep leaves on-demand.
    Returns the job's and the instance's ids."""
    env.cloud.set_spot_prices({(TYPE, ZONE): 0.2})
    capacity = {"spot": False}
    refuse_spot(capacity)
    assert env.submit(**ONE_POOL, name="other")["state"] == "WAITING"  # shares the refusal
    env.clock.advance(60)
    deadline = datetime.fromtimestamp(env.clock.now + 11 * HOUR, UTC).isoformat()
    job = env.submit(**ONE_POOL, expected_hours=10, deadline=deadline)
    od_instance = job["attempts"][0]["instance_id"]
    assert job["attempts"][0]["market"] == "on-demand"
    env.clock.advance(60)
    env.cloud.state_change(od_instance, "running")
    capacity["spot"] = True
    env.clock.advance(300)
    return job["job_id"], od_instance


def test_a_sweep_killed_before_asking_the_instance_to_leave_is_followed_by_one_that_asks(
    env: Env,
) -> None:
    job_id, od_instance = on_demand_job_ahead_of_schedule(env)
    crashed: list[str] = []

    def crash(event_name: str, **_: Any) -> None:
        if not crashed:
            crashed.append(event_name)
            raise LambdaCrash(event_name)

    ec2 = runtime.control_plane().reconciler.ec2._client
    ec2.meta.events.register("before-call.ec2.CreateTags", crash)
    with pytest.raises(LambdaCrash):
        env.cloud.sweep()
    assert crashed
    # The leave was written ahead; the instance was never asked.
    job = env.job(job_id)
    assert job["attempts"][0]["left_at"] is not None
    assert leave_tag_of(env, od_instance) is None

    env.clock.advance(60)
    env.cloud.sweep()
    assert leave_tag_of(env, od_instance) is not None
    assert state_of(env, od_instance) == "running"  # asked, not terminated
    assert len(events_of(env.job(job_id), "leaving-on-demand")) == 1


def test_an_instance_whose_agent_does_not_go_is_terminated_after_the_drain_time(
    env: Env,
) -> None:
    job_id, od_instance = on_demand_job_ahead_of_schedule(env)
    env.cloud.sweep()
    asked_at = env.clock.now
    assert leave_tag_of(env, od_instance) is not None
    grace = env.job(job_id)["spec"]["checkpoint"]["grace_seconds"]

    # Its agent never goes: the sweeps wait out its grace and the drain time ...
    env.clock.advance(grace + LEAVE_DRAIN_SECONDS - 30)
    env.cloud.sweep()
    assert state_of(env, od_instance) == "running"
    assert len(env.job(job_id)["attempts"]) == 1

    # ... then end it, and the job goes on on spot.
    env.clock.advance(60)
    assert env.clock.now - asked_at > grace + LEAVE_DRAIN_SECONDS
    env.cloud.sweep()
    assert state_of(env, od_instance) in ("shutting-down", "terminated")
    env.cloud.state_change(od_instance, "terminated")
    job = env.job(job_id)
    assert [a["end_reason"] for a in job["attempts"]] == ["left-on-demand", None]
    assert job["attempts"][1]["market"] == "spot"
    env.cloud.assert_invariants(job_id)


def test_a_job_forced_onto_on_demand_goes_back_to_spot_when_capacity_returns(env: Env) -> None:
    env.cloud.set_spot_prices({(TYPE, ZONE): 0.2})
    capacity = {"spot": False}
    refuse_spot(capacity)

    # Another job (no deadline) finds no spot capacity: it waits, and its refusal goes
    # into the pool's fleet record.
    other = env.submit(**ONE_POOL, name="other")
    assert other["state"] == "WAITING"
    env.clock.advance(60)

    # Ours has a deadline with little slack: with no spot now it starts on-demand.
    deadline = datetime.fromtimestamp(env.clock.now + 11 * HOUR, UTC).isoformat()
    job = env.submit(**ONE_POOL, expected_hours=10, deadline=deadline)
    job_id = job["job_id"]
    on_demand = job["attempts"][0]
    assert on_demand["market"] == "on-demand", job["events"]
    od_instance = on_demand["instance_id"]
    env.clock.advance(60)
    od_running_at = env.clock.now
    env.cloud.state_change(od_instance, "running")
    volume_id = env.job(job_id)["volume"]["volume_id"]
    assert env.job(job_id)["state"] == "RUNNING"

    # No spot yet: the sweep keeps on-demand.
    env.cloud.sweep()
    assert events_of(env.job(job_id), "leaving-on-demand") == []

    # Spot returns. Once the refusal is older than the policy's memory of it, the
    # sweep (ahead of schedule) leaves on-demand; the other job's retry runs on spot.
    capacity["spot"] = True
    env.clock.advance(240)
    env.cloud.sweep()
    job = env.job(job_id)
    (leaving,) = events_of(job, "leaving-on-demand")
    assert leaving["detail"] == f"{od_instance}: ahead of schedule: leave on-demand for spot"
    assert job["state"] == "INTERRUPTED"
    assert job["attempts"][0]["left_at"] == leaving["at"]
    assert env.job(other["job_id"])["attempts"][-1]["market"] == "spot"
    # Not terminated: asked to go, by a tag its agent can read in the instance metadata.
    assert state_of(env, od_instance) == "running"
    assert leave_tag_of(env, od_instance) == leaving["at"]
    assert instance_of(env, od_instance)["MetadataOptions"]["InstanceMetadataTags"] == "enabled"
    env.clock.advance(30)
    env.cloud.sweep()  # the agent is draining: nothing is asked or ended twice
    assert len(env.job(job_id)["attempts"]) == 1
    assert state_of(env, od_instance) == "running"

    # The agent stops the workload, syncs, reports and shuts the instance down (its
    # shutdown behaviour is terminate); the terminated event relaunches once, on spot,
    # in the same pool.
    response = env.report(
        job_id, {"attempt": 1, "kind": "interrupted", "detail": "asked to leave on-demand"}
    )
    assert response.status_code == 200, response.body
    env.clock.advance(30)
    od_ended_at = env.clock.now
    env.cloud.reclaim(od_instance)
    env.cloud.state_change(od_instance, "terminated")
    env.cloud.sweep()
    job = env.job(job_id)
    assert len(job["attempts"]) == 2
    spot = job["attempts"][1]
    assert spot["market"] == "spot"
    assert spot["pool"] == f"{TYPE}@{ZONE}"
    assert spot["reason"].startswith(f"spot in {TYPE}@{ZONE}: ")
    assert len(env.cloud.instances(job_id)) == 2
    env.clock.advance(60)
    env.cloud.state_change(spot["instance_id"], "running")
    env.cloud.sweep()

    job = env.job(job_id)
    assert job["state"] == "RUNNING", job["events"]
    assert attachment_of(env, volume_id) == spot["instance_id"]
    assert [i["InstanceId"] for i in env.cloud.live_instances(job_id)] == [spot["instance_id"]]
    assert state_of(env, od_instance) == "terminated"
    assert [a["end_reason"] for a in job["attempts"]] == ["left-on-demand", None]
    assert job["interruptions"] == 0
    assert job["state"] != "FAILED" and job["failure"] is None
    env.cloud.assert_invariants(job_id)

    # The cost record has both attempts: on-demand at list price until EC2 showed it
    # going, then spot from first sight running (moto's instances run at once: the
    # sweep right after the launch saw it).
    env.clock.advance(HOUR)
    job = env.job(job_id)
    first, second = job["attempts"]
    assert (first["price"], second["price"]) == (0.526, 0.2)
    od_hours = (od_ended_at - od_running_at) / HOUR
    assert first["cost_usd"] == pytest.approx(0.526 * od_hours, abs=1e-4)
    spot_hours = (env.clock.now - od_ended_at) / HOUR
    assert second["cost_usd"] == pytest.approx(0.2 * spot_hours, abs=1e-4)
    assert job["cost_usd"] == pytest.approx(0.526 * od_hours + 0.2 * spot_hours, abs=1e-3)
