"""The Lambda places jobs with the same policy function the simulator scores."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from chalicelib import policy
from tests.functional.conftest import Env

HOUR = 3600.0


def deadline_in(env: Env, hours: float) -> str:
    return datetime.fromtimestamp(env.clock.now + hours * HOUR, UTC).isoformat()


def instance(env: Env, instance_id: str) -> dict[str, Any]:
    reservation = env.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
    found: dict[str, Any] = reservation["Instances"][0]
    return found


def test_the_lambda_path_calls_the_policy_the_simulator_scores(
    env: Env, policy_views: list[policy.PlacementView]
) -> None:
    seen = policy_views
    job = env.submit(expected_hours=20, deadline=deadline_in(env, 40))
    assert len(seen) == 1
    assert seen[0].total_work_hours == 20
    assert seen[0].deadline == pytest.approx(env.clock.now + 40 * HOUR)
    assert job["attempts"][0]["reason"].startswith("spot in ")


def test_a_deadline_with_no_room_for_a_restart_launches_on_demand(env: Env) -> None:
    job = env.submit(expected_hours=10, deadline=deadline_in(env, 10.15))
    attempt = job["attempts"][0]
    assert attempt["market"] == "on-demand"
    assert attempt["max_price"] is None
    assert "on-demand" in attempt["reason"]
    launched = instance(env, attempt["instance_id"])
    assert "InstanceLifecycle" not in launched  # not a spot instance


def test_ample_slack_runs_on_spot(env: Env) -> None:
    job = env.submit(expected_hours=10, deadline=deadline_in(env, 30))
    attempt = job["attempts"][0]
    assert attempt["market"] == "spot"
    assert instance(env, attempt["instance_id"])["InstanceLifecycle"] == "spot"


def test_spot_above_the_cap_and_on_demand_above_it_too_waits(env: Env) -> None:
    env.cloud.set_spot_prices(
        {("g4dn.xlarge", "us-east-1a"): 0.30, ("g5.xlarge", "us-east-1a"): 0.5}
    )
    job = env.submit(max_price_per_hour=0.2)
    assert job["state"] == "WAITING"
    assert job["wait_until"] is not None
    assert env.cloud.instances(job["job_id"]) == []
