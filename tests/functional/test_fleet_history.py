"""Pool history shared across jobs: what one job saw in a pool, the next job plans on.

Through the API and EC2 events, against moto: the reconciler records each pass's new
capacity observations in the pool's fleet record (``POOL#...`` in the jobs table) and
reads the offered pools' records before it plans.
"""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from chalicelib import fleet, placement, policy, runtime
from chalicelib.models import Pool
from tests.functional.conftest import TABLE, Env
from tests.functional.test_batch import recovery, running_jobs

HOUR = 3600.0
P = Pool(instance_type="g4dn.xlarge", az="us-east-1a")
ONE_POOL = {"instance_types": [P.instance_type], "availability_zones": [P.az]}


@pytest.fixture
def views(env: Env, policy_views: list[policy.PlacementView]) -> list[policy.PlacementView]:
    """Every view the policy is asked to decide on, in order, with P's spot priced."""
    env.cloud.set_spot_prices({(P.instance_type, P.az): 0.2})
    return policy_views


def running_job(env: Env) -> tuple[str, str]:
    job = env.submit(**ONE_POOL)
    instance_id = job["attempts"][0]["instance_id"]
    env.clock.advance(60)
    env.cloud.state_change(instance_id, "running")
    assert env.job(job["job_id"])["state"] == "RUNNING"
    return job["job_id"], instance_id


def quote_of_p(view: policy.PlacementView) -> policy.PoolQuote:
    (quote,) = view.pools
    assert quote.pool == policy.Pool(P.instance_type, P.az)
    return quote


def pool_record() -> tuple[placement.CapacityObservation, ...]:
    client = runtime.control_plane().reconciler.fleet
    assert client is not None
    return client.read([P]).get(P, ())


def test_a_job_planned_after_another_was_interrupted_sees_the_interruption(
    env: Env, views: list[policy.PlacementView]
) -> None:
    job_id, first = running_job(env)
    env.clock.advance(HOUR)
    warned_at = env.clock.now
    env.cloud.deliver("spot-interruption-warning", first)
    replacement = env.job(job_id)["attempts"][1]["instance_id"]
    env.clock.advance(60)
    back_at = env.clock.now
    env.cloud.state_change(replacement, "running")

    env.clock.advance(60)
    views.clear()
    env.submit(**ONE_POOL, name="second")
    (view,) = views
    p = quote_of_p(view)
    assert [i.at for i in p.interruptions] == [warned_at]
    assert p.spell_hours == pytest.approx((1.0,))  # seen running, to the warning
    assert p.outage_hours == pytest.approx((60 / HOUR,))  # to the replacement running
    assert p.capacity_changed_at == back_at
    assert p.recent_availability == pytest.approx((HOUR + 60) / (HOUR + 120))


def test_two_jobs_interrupted_in_one_reclaim_count_as_one_interruption(
    env: Env, views: list[policy.PlacementView]
) -> None:
    _, one = running_job(env)
    _, two = running_job(env)
    env.clock.advance(HOUR)
    env.cloud.deliver("spot-interruption-warning", one)
    env.clock.advance(45)
    env.cloud.deliver("spot-interruption-warning", two)
    # Each job's replacement is planned with the other's interruption in view, and
    # the second job's own warning is the same reclaim: still one interruption.
    assert len(quote_of_p(views[-1]).interruptions) == 1

    views.clear()
    env.submit(**ONE_POOL, name="third")
    assert len(quote_of_p(views[-1]).interruptions) == 1
    interrupted = [o for o in pool_record() if o.seen is placement.Seen.INTERRUPTED]
    assert sorted(o.instance_id for o in interrupted if o.instance_id) == sorted([one, two])


def test_a_steady_running_job_writes_no_pool_record(env: Env, views: Any) -> None:
    running_job(env)
    before = pool_record()
    env.clock.advance(60)
    env.cloud.sweep()
    env.cloud.sweep()
    assert pool_record() == before
    assert runtime.control_plane().reconciler.calls.count("dynamodb:WritePool") == 0


def test_a_failed_pool_record_write_does_not_fail_the_pass(
    env: Env, views: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, first = running_job(env)
    records = runtime.control_plane().reconciler.fleet
    assert records is not None

    def throttled(*_: Any, **__: Any) -> None:
        error = {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow"}}
        raise ClientError(error, "PutItem")  # type: ignore[arg-type]

    monkeypatch.setattr(records, "record", throttled)
    monkeypatch.setattr(records, "read", throttled)
    env.clock.advance(HOUR)
    env.cloud.deliver("spot-interruption-warning", first)
    job = env.job(job_id)
    assert job["state"] == "RECOVERING"
    assert len(job["attempts"]) == 2 and job["attempts"][1]["instance_id"]


def test_a_write_that_loses_the_race_merges_with_the_winner(env: Env) -> None:
    client = boto3.client("dynamodb", region_name="us-east-1")
    records = fleet.FleetRecords(client, TABLE)
    now = env.clock.now
    ours = placement.CapacityObservation(placement.Seen.STARTED, now, "j-1", "i-ours")
    theirs = placement.CapacityObservation(placement.Seen.STARTED, now, "j-2", "i-theirs")
    real_put = client.put_item
    raced = False

    def put_after_a_rival(**kwargs: Any) -> Any:
        nonlocal raced
        if not raced:
            raced = True
            fleet.FleetRecords(client, TABLE).record({P: [theirs]}, now)
        return real_put(**kwargs)

    client.put_item = put_after_a_rival  # type: ignore[method-assign]
    records.record({P: [ours]}, now)
    client.put_item = real_put  # type: ignore[method-assign]
    records.record({P: [ours]}, now)  # again: recorded already, nothing changes
    item = client.get_item(TableName=TABLE, Key=fleet.pool_key(P))["Item"]
    assert {o.instance_id for o in fleet.decode(item["doc"]["S"])} == {"i-ours", "i-theirs"}
    assert item["version"]["N"] == "2"


def test_the_pool_record_stays_bounded(env: Env) -> None:
    client = boto3.client("dynamodb", region_name="us-east-1")
    records = fleet.FleetRecords(client, TABLE)
    now = env.clock.now
    for start in range(0, 3 * fleet.MAX_OBSERVATIONS, 250):
        batch = [
            placement.CapacityObservation(
                placement.Seen.INTERRUPTED,
                now - 3 * HOUR + k,
                f"j-{k}",
                f"i-{k:017x}",
                started_at=now - 20 * HOUR,
                max_price=0.526,
            )
            for k in range(start, start + 250)
        ]
        records.record({P: batch}, now)
    item = client.get_item(TableName=TABLE, Key=fleet.pool_key(P))["Item"]
    assert len(fleet.decode(item["doc"]["S"])) == fleet.MAX_OBSERVATIONS
    assert len(item["doc"]["S"].encode()) < 400_000 / 4
    # A day later the window has moved on: the record keeps only what is recent.
    records.record(
        {
            P: [
                placement.CapacityObservation(
                    placement.Seen.REFUSED, now + 72 * HOUR, "j-x", attempt=1
                )
            ]
        },
        now + 72 * HOUR,
    )
    assert len(records.read([P])[P]) == 1


def test_a_batched_recovery_shares_the_reclaim_with_one_write_for_the_pool(
    env: Env, views: list[policy.PlacementView], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = running_jobs(env, 4)
    records = runtime.control_plane().reconciler.fleet
    assert records is not None
    writes: list[int] = []
    real_record = records.record

    def counted(found: Any, now: float) -> None:
        writes.append(len(found))
        real_record(found, now)

    monkeypatch.setattr(records, "record", counted)
    env.clock.advance(30)
    outcome = recovery().recover(list(jobs.values()))
    assert set(outcome.launched) == set(jobs)
    assert writes == [1]  # one pool, one write, for the four warnings
    interrupted = {o.instance_id for o in pool_record() if o.seen is placement.Seen.INTERRUPTED}
    assert interrupted == set(jobs.values())

    views.clear()
    env.submit(**ONE_POOL, name="after")
    assert len(quote_of_p(views[-1]).interruptions) == 1


def vanished_then_explained(env: Env, exit_code: int, **spec: Any) -> str:
    """A job whose instance went unwarned (its agent shut it down) and was relaunched
    before the workload's exit report, sent the agent's way: late."""
    job = env.submit(**ONE_POOL, **spec)
    job_id, first = job["job_id"], job["attempts"][0]["instance_id"]
    env.clock.advance(60)
    env.cloud.state_change(first, "running")
    env.clock.advance(HOUR)
    env.ec2.terminate_instances(InstanceIds=[first])
    env.cloud.state_change(first, "terminated")
    second = env.job(job_id)["attempts"][1]["instance_id"]
    env.clock.advance(60)
    env.cloud.state_change(second, "running")
    # Until the report comes, the vanished instance is a reclaim, for every job.
    assert [o.instance_id for o in pool_record() if o.seen is placement.Seen.INTERRUPTED] == [first]
    env.clock.advance(30)
    env.report(job_id, {"attempt": 1, "kind": "exited", "exit_code": exit_code})
    return str(job_id)


@pytest.mark.parametrize(
    ("exit_code", "spec", "state", "end_reason"),
    [
        (3, {"max_restarts_on_errors": 1}, "RUNNING", "failed"),  # that was the restart
        (0, {}, "SUCCEEDED", "completed"),
        (3, {}, "FAILED", "completed"),
    ],
)
def test_an_exit_reported_after_the_instance_went_is_no_interruption(
    env: Env,
    views: list[policy.PlacementView],
    exit_code: int,
    spec: dict[str, Any],
    state: str,
    end_reason: str,
) -> None:
    job_id = vanished_then_explained(env, exit_code, **spec)
    job = env.job(job_id)
    assert job["state"] == state
    assert job["interruptions"] == 0
    assert job["attempts"][0]["end_reason"] == end_reason

    views.clear()
    env.submit(**ONE_POOL, name="second")
    p = quote_of_p(views[-1])
    assert p.interruptions == ()  # the fleet's record told the exit too
    assert p.spell_hours == ()  # a spell we ended tells nothing of how long spot lasts
