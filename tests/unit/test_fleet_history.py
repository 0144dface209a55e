"""Pool history shared across jobs: the fleet record merged with the job's own record.

Rows state what other jobs saw in pool A (their observations, as the fleet record
holds them) and what the planning job's own record says; the quote the policy gets
for A must tell the pool's story once, whoever saw it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from chalicelib import fleet, placement, policy
from chalicelib.models import ENDED_COMPLETED, ENDED_INTERRUPTED, Job, Pool
from chalicelib.placement import CapacityObservation, Seen
from tests.unit.test_placement_history import AZ, NOW, PRICES, A, H, job, refusal, refused, spot

OTHER = "j-00000000000000ff"


def started(iid: str, at: float, job_id: str = OTHER) -> CapacityObservation:
    return CapacityObservation(Seen.STARTED, at, job_id, iid)


def interrupted(
    iid: str, began: float, at: float, max_price: float | None = 0.526, job_id: str = OTHER
) -> CapacityObservation:
    return CapacityObservation(
        Seen.INTERRUPTED, at, job_id, iid, started_at=began, max_price=max_price
    )


def left(iid: str, began: float, at: float, job_id: str = OTHER) -> CapacityObservation:
    return CapacityObservation(Seen.LEFT, at, job_id, iid, started_at=began)


def refusal_seen(at: float, job_id: str = OTHER, attempt: int = 1) -> CapacityObservation:
    return CapacityObservation(Seen.REFUSED, at, job_id, attempt=attempt)


def ran(iid: str, began: float, until: float) -> tuple[CapacityObservation, ...]:
    """Another job's instance, launched at ``began``, interrupted at ``until``."""
    return started(iid, began), interrupted(iid, began, until)


NO_HISTORY = job(())
# An outage no later observation closes is known only while it is believed.
MEMORY = placement.CAPACITY_MEMORY_SECONDS
UP_2H_THEN_DOWN = 2 * H / (2 * H + MEMORY)


@dataclass
class Row:
    name: str
    seen: tuple[CapacityObservation, ...]  # the fleet record of A
    own: Job = NO_HISTORY
    spells: tuple[float, ...] = ()
    outages: tuple[float, ...] = ()
    interruptions: tuple[float, ...] = ()  # hours before NOW
    age: float | None = None  # hours: NOW - capacity_changed_at
    availability: float | None = None
    available: bool = True
    other: dict[str, Any] = field(default_factory=dict)


ROWS = [
    Row(
        "another job's interruption is the planning job's history too",
        ran("i-x", NOW - 10 * H, NOW - 8 * H),
        spells=(2.0,),
        interruptions=(8.0,),
        availability=UP_2H_THEN_DOWN,
    ),
    Row(
        "the job's own interruption, also in the fleet record, counts once",
        ran("i-1", NOW - 10 * H, NOW - 8 * H),
        own=job((spot(1, NOW - 10 * H, NOW - 8 * H),)),
        spells=(2.0,),
        interruptions=(8.0,),
        # Nothing but what the job saw itself: no share of recent time, as without it.
    ),
    Row(
        "for its own instance the job's record wins over what the fleet first recorded",
        # The fleet has its launch only (the interruption's write failed).
        (started("i-1", NOW - 10 * H, job_id=NO_HISTORY.job_id),),
        own=job((spot(1, NOW - 10 * H, NOW - 8 * H),)),
        spells=(2.0,),
        interruptions=(8.0,),
        # Nothing but what the job saw itself: no share of recent time, as without it.
    ),
    Row(
        "two instances reclaimed within the two-minute notice: one capacity loss",
        (*ran("i-x", NOW - 10 * H, NOW - 5 * H), *ran("i-y", NOW - 8 * H, NOW - 5 * H + 90)),
        spells=(5.0,),  # the union of the two runs
        interruptions=(5.0,),
        availability=5 * H / (5 * H + MEMORY),
    ),
    Row(
        "the job's own instance and another job's, reclaimed together: one loss",
        ran("i-x", NOW - 9 * H, NOW - 5 * H + 30),
        own=job((spot(1, NOW - 10 * H, NOW - 5 * H),)),
        spells=(5.0,),
        interruptions=(5.0,),
        availability=5 * H / (5 * H + MEMORY),
    ),
    Row(
        "interruptions more than the notice apart are two losses",
        (*ran("i-x", NOW - 10 * H, NOW - 5 * H), *ran("i-y", NOW - 8 * H, NOW - 5 * H + 121)),
        spells=(5.0, 121 / H),
        interruptions=(5.0, 5.0 - 121 / H),
        # The second instance kept capacity known up through the first reclaim.
        availability=(5 * H + 121) / (5 * H + 121 + MEMORY),
    ),
    Row(
        "a reclaim that spares a running instance: capacity stays up, a new spell begins",
        (*ran("i-x", NOW - 10 * H, NOW - 6 * H), started("i-y", NOW - 8 * H)),
        spells=(4.0,),
        interruptions=(6.0,),
        age=6.0,
        availability=1.0,
    ),
    Row(
        "an outage lasts from the interruption until any job's instance starts there",
        (*ran("i-x", NOW - 10 * H, NOW - 6 * H), started("i-z", NOW - 2 * H, job_id="j-2")),
        spells=(4.0,),
        outages=(4.0,),
        interruptions=(6.0,),
        age=2.0,
        availability=6.0 / 10.0,
    ),
    Row(
        "the job's own interruption, then another job's start, ends the outage",
        (started("i-z", NOW - 2 * H),),
        own=job((spot(1, NOW - 9 * H, NOW - 7 * H),)),
        spells=(2.0,),
        outages=(5.0,),
        interruptions=(7.0,),
        age=2.0,
        availability=4.0 / 9.0,
    ),
    Row(
        "another job's capacity refusal a minute ago: spot believed missing",
        (*ran("i-x", NOW - 10 * H, NOW - 3 * H), refusal_seen(NOW - 60)),
        spells=(7.0,),
        interruptions=(3.0,),
        age=3.0,  # the outage goes on: the refusal confirms it
        availability=7.0 / 10.0,  # known down since: the refusal is believed until now
        available=False,
    ),
    Row(
        "a refusal followed by another job's launch: capacity was there after all",
        (refusal_seen(NOW - 120), started("i-z", NOW - 60)),
        outages=(1 / 60,),
        age=1 / 60,
    ),
    Row(
        "another job's completed instance: its run says nothing of an interruption",
        (started("i-x", NOW - 5 * H), left("i-x", NOW - 5 * H, NOW - 3 * H)),
        availability=1.0,
    ),
    Row(
        "an instance found gone, then its workload's exit reported: no interruption",
        (*ran("i-x", NOW - 5 * H, NOW - 3 * H), left("i-x", NOW - 5 * H, NOW - 3 * H)),
        availability=1.0,
    ),
    Row(
        "warned before its job ended it: the interruption stands",
        (*ran("i-x", NOW - 5 * H, NOW - 3 * H - 60), left("i-x", NOW - 5 * H, NOW - 3 * H)),
        spells=(2.0 - 60 / H,),
        interruptions=(3.0 + 60 / H,),
        availability=(2 * H - 60) / (2 * H - 60 + MEMORY),
    ),
    Row(
        "less than an hour of known state in the window: no availability",
        ran("i-x", NOW - 40 * 60, NOW - 20 * 60),
        spells=(1 / 3,),
        interruptions=(1 / 3,),
    ),
    Row(
        "only the last 72 h count toward availability",
        (
            *ran("i-x", NOW - 100 * H, NOW - 74 * H),
            started("i-y", NOW - 73 * H),
            interrupted("i-y", NOW - 73 * H, NOW - 72 * H),
            started("i-z", NOW - 71 * H),
            interrupted("i-z", NOW - 71 * H, NOW - 70 * H),
        ),
        spells=(26.0, 1.0, 1.0),
        outages=(1.0, 1.0),
        interruptions=(74.0, 72.0, 70.0),
        # In the window: down 72 -> 71 h, up 71 -> 70 h, then 4 min known down.
        availability=1.0 / (2.0 + 4 / 60),
    ),
]


def quote_of_a(row: Row) -> policy.PoolQuote:
    view = placement.placement_view(row.own, PRICES, NOW, fleet={A: row.seen})
    (quote,) = [q for q in view.pools if q.pool == policy.Pool(A.instance_type, A.az)]
    return quote


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_fleet_history(row: Row) -> None:
    a = quote_of_a(row)
    assert a.spell_hours == pytest.approx(row.spells)
    assert a.outage_hours == pytest.approx(row.outages)
    assert [(NOW - i.at) / H for i in a.interruptions] == pytest.approx(row.interruptions)
    assert a.spot_available is row.available
    if row.age is None:
        assert a.capacity_changed_at is None
    else:
        assert a.capacity_changed_at is not None
        assert (NOW - a.capacity_changed_at) / H == pytest.approx(row.age)
    if row.availability is None:
        assert a.recent_availability is None
    else:
        assert a.recent_availability == pytest.approx(row.availability, abs=1e-3)


def test_the_highest_bid_a_reclaim_took_says_whether_it_was_about_price() -> None:
    # One reclaim took a $0.30 bid and a $0.90 bid; the price is now $0.50: the
    # higher bid was taken too, so it was capacity, not price.
    seen = (
        *ran("i-x", NOW - 5 * H, NOW - 1 * H),
        interrupted("i-y", NOW - 5 * H, NOW - 1 * H + 30, max_price=0.30),
    )
    seen = (seen[0], interrupted("i-x", NOW - 5 * H, NOW - 1 * H, max_price=0.90), seen[2])
    view = placement.placement_view(NO_HISTORY, {**PRICES, A: 0.50}, NOW, fleet={A: seen})
    (a,) = [q for q in view.pools if q.pool.instance_type == A.instance_type]
    assert [(i.cause, i.max_price) for i in a.interruptions] == [
        (policy.InterruptionCause.CAPACITY, 0.90)
    ]


def test_the_job_record_alone_gives_no_availability_another_jobs_facts_do() -> None:
    own = job((spot(1, NOW - 10 * H, NOW - 8 * H),))
    alone = placement.placement_view(own, PRICES, NOW).pools[0]
    empty = placement.placement_view(own, PRICES, NOW, fleet={}).pools[0]
    shared = placement.placement_view(
        own, PRICES, NOW, fleet={A: (started("i-x", NOW - 30 * 60),)}
    ).pools[0]
    # The job's own record sees the pool only while it used it: its luck there.
    assert alone.recent_availability is None
    assert empty.recent_availability is None
    assert (alone.spell_hours, alone.interruptions) == (empty.spell_hours, empty.interruptions)
    # Up 2 h, an outage of 7.5 h, up again for the last half hour (another job's).
    assert shared.recent_availability == pytest.approx(2.5 / 10)
    assert shared.outage_hours == pytest.approx((7.5,))


def test_the_fleet_history_changes_the_choice() -> None:
    # A is cheaper; other jobs have lost it four times in the last hours.
    seen = tuple(
        o for k in range(4) for o in ran(f"i-{k}", NOW - (12 - 2 * k) * H, NOW - (11.8 - 2 * k) * H)
    )
    prices = {A: 0.35, **{p: v for p, v in PRICES.items() if p != A}}
    alone = placement.plan(NO_HISTORY, prices, NOW, 1)
    shared = placement.plan(NO_HISTORY, prices, NOW, 1, fleet={A: seen})
    assert alone.candidates[0].pool == A
    assert shared.candidates[0].pool != A


# -- what a pass shares: the difference between the record it read and wrote -------


def test_a_pass_that_changes_nothing_about_capacity_shares_nothing() -> None:
    read = job((spot(1, NOW - 3 * H),))
    saved = read.with_event(NOW, "running", "vol on i-1")
    assert placement.new_observations(read, saved) == {}


def test_a_warning_is_shared_once_and_its_end_adds_nothing() -> None:
    running = job((spot(1, NOW - 3 * H),))
    warned = job((spot(1, NOW - 3 * H, None, warned_at=NOW - 60),))
    ended = job((spot(1, NOW - 3 * H, NOW, ENDED_INTERRUPTED, warned_at=NOW - 60),))
    (found,) = placement.new_observations(running, warned)[A]
    assert (found.seen, found.at, found.instance_id) == (Seen.INTERRUPTED, NOW - 60, "i-1")
    assert found.started_at == NOW - 3 * H
    assert placement.new_observations(warned, ended) == {}


def test_a_launch_a_refusal_and_a_completion_are_shared() -> None:
    before = job((refused(1, NOW - H),))
    after = job((refused(1, NOW - H), spot(2, NOW - 0.5 * H)), (refusal(1, NOW - H),))
    kinds = {o.seen for o in placement.new_observations(before, after)[A]}
    assert kinds == {Seen.STARTED, Seen.REFUSED}
    done = job((spot(1, NOW - 3 * H, NOW, ENDED_COMPLETED),))
    (found,) = placement.new_observations(job((spot(1, NOW - 3 * H),)), done)[A]
    assert found.seen is Seen.LEFT


# -- the stored record: idempotent, bounded ---------------------------------------------


def test_recording_an_observation_twice_changes_nothing() -> None:
    once = fleet.kept((), ran("i-x", NOW - 2 * H, NOW - H), NOW)
    assert fleet.kept(once, ran("i-x", NOW - 2 * H, NOW - H), NOW) == once
    # The first recorded of a key is kept, whatever a later copy says.
    later = (started("i-x", NOW - 1.5 * H),)
    assert fleet.kept(once, later, NOW) == once


def test_old_observations_leave_the_record_but_a_spell_still_on_stays() -> None:
    old = (
        *ran("i-old", NOW - 80 * H, NOW - 75 * H),
        started("i-long", NOW - 90 * H),
        started("i-forgotten", NOW - fleet.OPEN_SPELL_SECONDS - 1),
    )
    record = fleet.kept(old, (refusal_seen(NOW),), NOW)
    assert {o.key for o in record} == {"started#i-long", refusal_seen(NOW).key}


def test_the_record_keeps_the_newest_observations_up_to_its_cap() -> None:
    many = [refusal_seen(NOW - k, attempt=k) for k in range(fleet.MAX_OBSERVATIONS + 50)]
    record = fleet.kept((), many, NOW)
    assert len(record) == fleet.MAX_OBSERVATIONS
    assert min(o.at for o in record) == NOW - (fleet.MAX_OBSERVATIONS - 1)
    assert [o.at for o in record] == sorted(o.at for o in record)


def test_a_full_record_stays_far_under_the_item_limit() -> None:
    record = tuple(
        o
        for k in range(fleet.MAX_OBSERVATIONS // 2)
        for o in ran(f"i-{k:017x}", NOW - 60 * H + k, NOW - 10 * H + k)
    )
    doc = fleet.encode(fleet.kept((), record, NOW))
    assert len(doc.encode()) < 400_000 / 4
    assert fleet.decode(doc) == fleet.kept((), record, NOW)
    assert all(set(row) >= {"seen", "at", "job_id"} for row in json.loads(doc))


def test_the_pool_key_names_type_and_zone() -> None:
    assert fleet.pool_key(Pool(instance_type="g5.xlarge", az=AZ)) == {
        "pk": {"S": f"POOL#g5.xlarge#{AZ}"}
    }


def test_a_launch_is_shared_once_the_instance_is_seen_running() -> None:
    launched = job((spot(1, NOW - H, running_at=None, requested_at=NOW - H),))
    seen_running = job((spot(1, NOW - H + 60),))
    assert placement.new_observations(job(()), launched) == {}
    (found,) = placement.new_observations(launched, seen_running)[A]
    assert (found.seen, found.at) == (Seen.STARTED, NOW - H + 60)
    # The job's own record still counts its launch as the current spell.
    assert quote_of_a(Row("launched", (), own=launched)).capacity_changed_at == NOW - H
