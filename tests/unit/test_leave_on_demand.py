"""Leaving on-demand for spot, as ``decide`` rows: the sweep asks the policy about a job
running on on-demand; ahead of schedule with spot usable it asks the instance to drain
and go (its agent checkpoints, syncs and shuts it down), and the relaunch path takes
over once EC2 shows it going."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from chalicelib import metrics
from chalicelib.models import Attempt, Candidate, Job, JobState, iso
from chalicelib.placement import CapacityObservation, Seen
from chalicelib.reconcile import (
    LEAVE_DRAIN_SECONDS,
    AttachVolume,
    Launch,
    LeaveOnDemand,
    Observed,
    Terminate,
    apply_leave_asked,
    decide,
)
from chalicelib.service import job_view
from tests.unit.test_decide import HOME_PRICES, NOW, POOL, attempt, instances, job, spec, volume

HOUR = 3600.0
ON_DEMAND = Candidate(
    pool=POOL, market="on-demand", max_price=None, expected_price=0.526, client_token="t-1"
)
# Another job's spot instance has run in the pool for half an hour: the fleet record
# tells how long spot capacity has lasted there.
SPOT_FOR_HALF_AN_HOUR = {POOL: [CapacityObservation(Seen.STARTED, NOW - 1800, "j-other", "i-o")]}
SPOT_FOR_FIVE_MINUTES = {POOL: [CapacityObservation(Seen.STARTED, NOW - 300, "j-other", "i-o")]}


def deadline_in(hours: float) -> datetime:
    return datetime.fromtimestamp(NOW + hours * HOUR, UTC)


def on_demand(**overrides: Any) -> Attempt:
    fields: dict[str, Any] = {
        "candidates": (ON_DEMAND,),
        "market": "on-demand",
        "price": 0.526,
        "running_at": NOW - 3000,
        **overrides,
    }
    return attempt(1, "i-1", **fields)


def on_demand_job(
    hours_left: float | None = 11.0,
    expected_hours: float | None = 10.0,
    state: JobState = JobState.RUNNING,
    current: Attempt | None = None,
) -> Job:
    """Running on-demand for 50 min: 0.73 h of the work done. With 11 h to the
    deadline the job is ahead of schedule; with 9.4 h it has no room for a restart."""
    deadline = deadline_in(hours_left) if hours_left is not None else None
    one_pool = spec(
        instance_types=["g4dn.xlarge"], expected_hours=expected_hours, deadline=deadline
    )
    return job(state, (current or on_demand(),), spec=one_pool)


RUNNING = instances(**{"i-1": "running"})


def refused_at(*times: float, spot_ran_at: float | None = None) -> Job:
    """On-demand (attempt 3) after spot refusals in the pool at ``times``; with
    ``spot_ran_at``, a spot run there (attempt 2) began then, after all of them."""
    earlier = attempt(1, "i-0", market="spot", running_at=NOW - 10 * HOUR)
    spot_run = attempt(2, "i-2", market="spot", running_at=spot_ran_at or NOW - 10 * HOUR)
    ended = {"ended_at": NOW - 3000, "end_reason": "interrupted"}
    current = on_demand().model_copy(update={"number": 3})
    job = on_demand_job(current=current)
    job = job.model_copy(
        update={
            "attempts": (
                earlier.model_copy(update=ended),
                spot_run.model_copy(update=ended),
                current,
            )
        }
    )
    for at in times:
        job = job.with_event(at, "launch-refused", f"{POOL}: InsufficientInstanceCapacity", 3)
    return job


@dataclass
class Row:
    name: str
    job: Job
    observed: Observed
    actions: list[type] = field(default_factory=list)
    state: JobState = JobState.RUNNING
    needs_prices: bool = False
    sweeping: bool = True


ROWS = [
    Row(
        "ahead of schedule with spot lasting in the pool leaves on-demand",
        on_demand_job(),
        Observed(RUNNING, volume(), HOME_PRICES, SPOT_FOR_HALF_AN_HOUR),
        [LeaveOnDemand],
        JobState.INTERRUPTED,
    ),
    Row(
        "a sweep without prices asks for them",
        on_demand_job(),
        Observed(RUNNING, volume()),
        needs_prices=True,
    ),
    Row(
        "an event pass does not ask",
        on_demand_job(),
        Observed(RUNNING, volume()),
        sweeping=False,
    ),
    Row(
        "behind schedule keeps on-demand",
        on_demand_job(hours_left=9.4),
        Observed(RUNNING, volume(), HOME_PRICES, SPOT_FOR_HALF_AN_HOUR),
    ),
    Row(
        "no spot price in the volume's zone keeps on-demand",
        on_demand_job(),
        Observed(RUNNING, volume(), {}, SPOT_FOR_HALF_AN_HOUR),
    ),
    Row(
        "spot refused in the pool a minute ago keeps on-demand",
        on_demand_job().with_event(
            NOW - 60, "launch-refused", f"{POOL}: InsufficientInstanceCapacity: none", 1
        ),
        Observed(RUNNING, volume(), HOME_PRICES),
    ),
    Row(
        "one refusal in the pool, five minutes ago, no longer holds the job",
        refused_at(NOW - 300),
        Observed(RUNNING, volume(), HOME_PRICES),
        [LeaveOnDemand],
        JobState.INTERRUPTED,
    ),
    Row(
        # Left twice into refused spot: the third refusal bars the pool for 16 min.
        "a third refusal since spot last ran in the pool keeps on-demand for 16 min",
        refused_at(NOW - 3 * HOUR, NOW - 2 * HOUR, NOW - 15 * 60),
        Observed(RUNNING, volume(), HOME_PRICES),
    ),
    Row(
        "a third refusal 17 min ago no longer holds the job",
        refused_at(NOW - 3 * HOUR, NOW - 2 * HOUR, NOW - 17 * 60),
        Observed(RUNNING, volume(), HOME_PRICES),
        [LeaveOnDemand],
        JobState.INTERRUPTED,
    ),
    Row(
        "the bar is at most an hour",
        refused_at(*(NOW - (9 - k) * HOUR for k in range(8)), NOW - 61 * 60),
        Observed(RUNNING, volume(), HOME_PRICES),
        [LeaveOnDemand],
        JobState.INTERRUPTED,
    ),
    Row(
        "refusals from before the job last ran spot in the pool do not count",
        refused_at(
            NOW - 3 * HOUR,
            NOW - 2 * HOUR,
            NOW - 15 * 60,
            spot_ran_at=NOW - 10 * 60,
        ),
        Observed(RUNNING, volume(), HOME_PRICES),
        [LeaveOnDemand],
        JobState.INTERRUPTED,
    ),
    Row(
        "spot back for five minutes only keeps on-demand",
        on_demand_job(),
        Observed(RUNNING, volume(), HOME_PRICES, SPOT_FOR_FIVE_MINUTES),
    ),
    Row(
        # Nobody watched the pool: spot's age is unknown, which does not hold the job.
        "spot with no record of when it came back leaves on-demand",
        on_demand_job(),
        Observed(RUNNING, volume(), HOME_PRICES),
        [LeaveOnDemand],
        JobState.INTERRUPTED,
    ),
    Row(
        "no deadline does not ask",
        on_demand_job(hours_left=None),
        Observed(RUNNING, volume(), HOME_PRICES, SPOT_FOR_HALF_AN_HOUR),
    ),
    Row(
        "no work estimate does not ask",
        on_demand_job(expected_hours=None),
        Observed(RUNNING, volume(), HOME_PRICES, SPOT_FOR_HALF_AN_HOUR),
    ),
    Row(
        "a spot instance is not asked about",
        on_demand_job(current=attempt(1, "i-1", running_at=NOW - 3000)),
        Observed(RUNNING, volume(), HOME_PRICES, SPOT_FOR_HALF_AN_HOUR),
    ),
    Row(
        "the volume not yet attached does not ask",
        on_demand_job(state=JobState.PROVISIONING),
        Observed(RUNNING, volume("available", None), HOME_PRICES, SPOT_FOR_HALF_AN_HOUR),
        [AttachVolume],
        JobState.PROVISIONING,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_leave_on_demand(row: Row) -> None:
    decision = decide(row.job, row.observed, NOW, sweeping=row.sweeping)
    assert decision.needs_prices == row.needs_prices
    assert not decision.needs_observation
    if row.needs_prices:
        return
    assert [type(a) for a in decision.actions] == row.actions
    assert decision.job.state == row.state
    if LeaveOnDemand in row.actions:
        (leave,) = decision.actions
        left = decision.job.current
        assert left is not None and left.number == len(row.job.attempts)
        assert leave == LeaveOnDemand("i-1", left.number)
        assert left.left_at == NOW and not left.ended
        assert decision.job.attempts[:-1] == row.job.attempts[:-1]
        event = decision.job.timeline[-1]
        assert event.kind == "leaving-on-demand"
        assert event.detail == "i-1: ahead of schedule: leave on-demand for spot"
    else:
        assert decision.job == row.job


def left_job() -> Job:
    leave = decide(
        on_demand_job(),
        Observed(RUNNING, volume(), HOME_PRICES, SPOT_FOR_HALF_AN_HOUR),
        NOW,
        sweeping=True,
    )
    return leave.job


def asked_job() -> Job:
    """The leave written ahead, and the instance tagged to go."""
    job = left_job()
    (leave,) = decide(job, Observed(RUNNING, volume(), HOME_PRICES), NOW).actions
    assert isinstance(leave, LeaveOnDemand)
    return apply_leave_asked(job, leave, NOW)


def test_the_next_sweep_while_the_instance_shuts_down_ends_the_attempt_and_plans_spot() -> None:
    later = NOW + 60
    observed = Observed(
        instances(**{"i-1": "shutting-down"}), volume(), HOME_PRICES, SPOT_FOR_HALF_AN_HOUR
    )
    decision = decide(asked_job(), observed, later, sweeping=True)
    first, second = decision.job.attempts
    assert first.end_reason == "left-on-demand"
    assert first.ended_at == later
    assert [type(a) for a in decision.actions] == [Launch]  # no second terminate
    assert second.candidates[0].market == "spot"
    assert second.candidates[0].pool == POOL
    assert second.reason.startswith(f"spot in {POOL}: ")
    assert decision.job.state == JobState.RECOVERING
    # Written ahead with its tokens: a replay of the pass launches the same instance.
    replay = decide(decision.job, replace_instances(observed, {"i-1": "terminated"}), later + 1)
    assert [type(a) for a in replay.actions] == [Launch]
    assert replay.job.attempts == decision.job.attempts


def replace_instances(observed: Observed, states: dict[str, str]) -> Observed:
    return Observed(instances(**states), observed.volume, observed.prices, observed.fleet)


def test_an_instance_asked_to_leave_is_given_its_grace_and_the_drain_time() -> None:
    job = asked_job()
    assert job.attempts[0].leave_asked_at == NOW
    observed = Observed(RUNNING, volume(), HOME_PRICES, SPOT_FOR_HALF_AN_HOUR)
    drained_by = NOW + job.spec.checkpoint.grace_seconds + LEAVE_DRAIN_SECONDS
    for now in (NOW + 30, drained_by - 1):
        decision = decide(job, observed, now, sweeping=True)
        assert decision.actions == ()  # not asked twice, not terminated
        assert decision.job == job


def test_a_leave_whose_pass_died_before_asking_asks_on_the_next_pass() -> None:
    job = left_job()  # written ahead; the CreateTags never ran
    observed = Observed(RUNNING, volume(), HOME_PRICES, SPOT_FOR_HALF_AN_HOUR)
    decision = decide(job, observed, NOW + 60, sweeping=True)
    assert decision.actions == (LeaveOnDemand("i-1", 1),)
    assert decision.job == job  # nothing new to write ahead
    asked = apply_leave_asked(job, LeaveOnDemand("i-1", 1), NOW + 60)
    assert asked.attempts[0].leave_asked_at == NOW + 60
    assert apply_leave_asked(asked, LeaveOnDemand("i-1", 1), NOW + 120) == asked


def test_an_instance_still_running_after_the_drain_time_is_terminated() -> None:
    # Its agent did not go (not listening, or its sync overran): end it; the OS's
    # shutdown still gives the agent its SIGTERM.
    job = asked_job()
    observed = Observed(RUNNING, volume(), HOME_PRICES, SPOT_FOR_HALF_AN_HOUR)
    later = NOW + job.spec.checkpoint.grace_seconds + LEAVE_DRAIN_SECONDS + 1
    decision = decide(job, observed, later, sweeping=True)
    assert decision.actions == (Terminate(("i-1",)),)
    assert len(decision.job.attempts) == 1


def test_leaving_on_demand_is_not_counted_as_an_interruption() -> None:
    job = asked_job()
    gone = Observed(instances(**{"i-1": "terminated"}), volume("available", None), HOME_PRICES)
    after = decide(job, gone, NOW + 60).job
    assert after.attempts[0].end_reason == "left-on-demand"
    view = job_view(after, NOW + 60)
    assert view["interruptions"] == 0
    assert view["attempts"][0]["left_at"] == iso(NOW)
    names = [f.name for f in metrics.pass_metrics(job, after, NOW + 60)]
    assert "Interruptions" not in names
    assert "OnDemandHours" in names
