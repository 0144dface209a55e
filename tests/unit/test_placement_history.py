"""The Lambda's pool history: what the job record says, in the simulator's terms."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest

from chalicelib import placement, policy
from chalicelib.models import (
    ENDED_COMPLETED,
    ENDED_INTERRUPTED,
    ENDED_LAUNCH_FAILED,
    ENDED_RECLAIMED,
    Attempt,
    Candidate,
    Job,
    JobSpec,
    JobState,
    Market,
    Pool,
    TimelineEvent,
    Volume,
)

H = 3600.0
NOW = 1_800_000_000.0
AZ = "us-east-1a"
A = Pool(instance_type="g4dn.xlarge", az=AZ)
B = Pool(instance_type="g5.xlarge", az=AZ)
PRICES = {A: 0.20, B: 0.45}
VOLUME = Volume(volume_id="vol-0123456789abcdef0", az=AZ, created_by_spotctl=True)
CAPACITY = "InsufficientInstanceCapacity: no capacity"


def spot(
    number: int,
    start: float,
    end: float | None = None,
    reason: str | None = ENDED_INTERRUPTED,
    pool: Pool = A,
    **overrides: Any,
) -> Attempt:
    """A spot attempt that ran in ``pool`` from ``start`` (seen running) to ``end``."""
    fields: dict[str, Any] = {
        "number": number,
        "reason": "test",
        "candidates": (candidate(pool, number),),
        "requested_at": start - 60,
        "instance_id": f"i-{number}",
        "pool": pool,
        "market": "spot",
        "max_price": 0.526,
        "price": PRICES[pool],
        "running_at": start,
        "ended_at": end,
        "end_reason": reason if end is not None else None,
        **overrides,
    }
    if end is not None and reason == ENDED_INTERRUPTED and "warned_at" not in overrides:
        fields["warned_at"] = end
    return Attempt(**fields)


def candidate(pool: Pool, number: int, market: Market = "spot") -> Candidate:
    return Candidate(
        pool=pool,
        market=market,
        max_price=0.526 if market == "spot" else None,
        expected_price=PRICES[pool],
        client_token=f"t-{number}-{pool}",
    )


def refused(number: int, at: float, pools: tuple[Pool, ...] = (A,)) -> Attempt:
    """An attempt no candidate would start (its refusals are in the timeline)."""
    return Attempt(
        number=number,
        reason="test",
        candidates=tuple(candidate(p, number) for p in pools),
        requested_at=at,
        ended_at=at,
        end_reason=ENDED_LAUNCH_FAILED,
    )


def refusal(number: int, at: float, pool: Pool = A, error: str = CAPACITY) -> TimelineEvent:
    return TimelineEvent(at=at, kind="launch-refused", detail=f"{pool}: {error}", attempt=number)


def job(
    attempts: tuple[Attempt, ...],
    timeline: tuple[TimelineEvent, ...] = (),
    **spec: Any,
) -> Job:
    fields: dict[str, Any] = {
        "name": "train",
        "command": ["python", "train.py"],
        "instance_types": ["g4dn.xlarge", "g5.xlarge"],
        "volume_gib": 50,
        **spec,
    }
    return Job(
        job_id="j-0000000000000001",
        spec=JobSpec.model_validate(fields),
        state=JobState.RECOVERING,
        created_at=NOW - 30 * H,
        updated_at=NOW,
        secret_hash="x",
        volume=VOLUME,
        attempts=attempts,
        timeline=timeline,
    )


@dataclass
class Row:
    name: str
    job: Job
    spells: tuple[float, ...] = ()
    outages: tuple[float, ...] = ()
    interruptions: tuple[float, ...] = ()  # hours before NOW
    age: float | None = None  # hours: NOW - capacity_changed_at; None when unknown
    other: dict[str, Any] = field(default_factory=dict)


ROWS = [
    Row(
        "two interrupted spot attempts in A: two spells of their run, oldest first",
        job((spot(1, NOW - 10 * H, NOW - 8 * H), spot(2, NOW - 6 * H, NOW - 3 * H))),
        spells=(2.0, 3.0),
        outages=(2.0,),
        interruptions=(8.0, 3.0),
    ),
    Row(
        "a reclaimed attempt (no warning) ends its spell when it was found gone",
        job((spot(1, NOW - 5 * H, NOW - 4 * H, ENDED_RECLAIMED),)),
        spells=(1.0,),
        interruptions=(4.0,),
    ),
    Row(
        "a live spot attempt is the current spell: its age is the time since it ran",
        job((spot(1, NOW - 2.5 * H),)),
        age=2.5,
    ),
    Row(
        "never seen running: the spell starts at the request, as billed_hours does",
        job((spot(1, NOW - 4 * H, NOW - 3 * H, running_at=None, requested_at=NOW - 4.5 * H),)),
        spells=(1.5,),
        interruptions=(3.0,),
    ),
    Row(
        "outage: from the interruption until spot next ran there; then its age",
        job((spot(1, NOW - 9 * H, NOW - 7 * H), spot(2, NOW - 3 * H))),
        spells=(2.0,),
        outages=(4.0,),
        interruptions=(7.0,),
        age=3.0,
    ),
    Row(
        "outage from the first capacity refusal since spot last ran, later ones ignored",
        job(
            (refused(1, NOW - 6 * H), refused(2, NOW - 5 * H), spot(3, NOW - 2 * H)),
            (refusal(1, NOW - 6 * H), refusal(2, NOW - 5 * H)),
        ),
        outages=(4.0,),
        age=2.0,
    ),
    Row(
        "a refusal after an interruption does not restart the outage",
        job(
            (spot(1, NOW - 8 * H, NOW - 7 * H), refused(2, NOW - 6 * H), spot(3, NOW - 1 * H)),
            (refusal(2, NOW - 6 * H),),
        ),
        spells=(1.0,),
        outages=(6.0,),
        interruptions=(7.0,),
        age=1.0,
    ),
    Row(
        "a warned attempt still in its notice is interrupted at the warning",
        job((spot(1, NOW - 3 * H, None, warned_at=NOW - 0.5 * H),)),
        spells=(2.5,),
        interruptions=(0.5,),
    ),
    Row(
        "a spot attempt we ended (completed) is no spell and leaves the state unknown",
        job((spot(1, NOW - 3 * H, NOW - 1 * H, ENDED_COMPLETED),)),
    ),
    Row(
        "on-demand attempts say nothing about spot",
        job(
            (
                spot(
                    1,
                    NOW - 3 * H,
                    NOW - 1 * H,
                    ENDED_RECLAIMED,
                    market="on-demand",
                    candidates=(candidate(A, 1, "on-demand"),),
                ),
            )
        ),
    ),
    Row(
        "price refusals and on-demand refusals are not outages",
        job(
            (
                refused(1, NOW - 6 * H),
                Attempt(
                    number=2,
                    reason="test",
                    candidates=(candidate(A, 2, "on-demand"),),
                    requested_at=NOW - 5 * H,
                    ended_at=NOW - 5 * H,
                    end_reason=ENDED_LAUNCH_FAILED,
                ),
                spot(3, NOW - 2 * H),
            ),
            (refusal(1, NOW - 6 * H, error="bid too low"), refusal(2, NOW - 5 * H)),
        ),
        age=2.0,
    ),
]


def quotes(j: Job, prices: dict[Pool, float] = PRICES) -> dict[Pool, policy.PoolQuote]:
    view = placement.placement_view(j, prices, NOW)
    return {Pool(instance_type=q.pool.instance_type, az=q.pool.az): q for q in view.pools}


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_pool_history(row: Row) -> None:
    found = quotes(row.job)
    a = found[A]
    assert a.spell_hours == pytest.approx(row.spells)
    assert a.outage_hours == pytest.approx(row.outages)
    assert [(NOW - i.at) / H for i in a.interruptions] == pytest.approx(row.interruptions)
    if row.age is None:
        assert a.capacity_changed_at is None
    else:
        assert a.capacity_changed_at is not None
        assert (NOW - a.capacity_changed_at) / H == pytest.approx(row.age)
    # Not derivable from the record: it sees a pool only while the job uses it.
    assert a.recent_availability is None
    # B was never used: an empty record.
    b = found[B]
    assert (b.spell_hours, b.outage_hours, b.interruptions) == ((), (), ())
    assert b.capacity_changed_at is None


def test_record_is_oldest_first_whatever_the_attempt_order() -> None:
    # Attempt numbers say nothing about time here: the record is sorted by time.
    late = spot(1, NOW - 4 * H, NOW - 3.5 * H)
    early = spot(2, NOW - 10 * H, NOW - 7 * H)
    a = quotes(job((late, early)))[A]
    assert a.spell_hours == pytest.approx((3.0, 0.5))
    assert [i.at for i in a.interruptions] == sorted(i.at for i in a.interruptions)


def test_an_outage_age_is_given_only_while_the_pool_is_believed_down() -> None:
    interrupted = (spot(1, NOW - 3 * H, NOW - 2 * H),)
    # Spot believed back (no recent refusal, a price): when it came back is unknown.
    assert quotes(job(interrupted))[A].capacity_changed_at is None
    # A refusal a minute ago: the outage that began at the interruption goes on.
    down = job((*interrupted, refused(2, NOW - 60)), (refusal(2, NOW - 60),))
    a = quotes(down)[A]
    assert not a.spot_available
    assert a.capacity_changed_at == pytest.approx(NOW - 2 * H)


def test_the_simulator_records_the_same_kind_of_facts() -> None:
    # One pool, hourly ticks: down 1 h, up 2 h, down 3 h, up 1 h, down 2 h, then up (1 h
    # so far).
    # The simulator's spells and outages, between transitions it saw, against the
    # same story told as job attempts (each spot run from a transition to the next).
    from spotctl import simulate as sim
    from spotctl.simulation_types import Kind, TickState

    flags = [1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 0]  # 1 = unavailable (the trace's convention)
    trace = sim.Trace("us-east-1a_x", AZ, H, tuple(bool(f) for f in flags))
    chooser = sim.SpotctlPolicy([trace], sim.JobSpec(), history_hours=10.0)
    chooser.reset(len(flags) - 1)  # the job starts at the last tick: 10 h of history
    state = TickState(
        tick=0,
        elapsed_hours=0.0,
        gap_hours=1.0,
        job_hours=48.0,
        remaining_hours=48.0,
        deadline_hours=52.0,
        restart_overhead_hours=0.2,
        migration_overhead_hours=0.25,
        pending_overhead_hours=0.0,
        kind=Kind.NONE,
        az=0,
        volume_az=None,
        available=(True,),
        run_started_hours=0.0,
        run_startup_hours=0.0,
    )
    simulated = chooser.view(state).pools[0]
    t0 = sim.EPOCH0 - 10 * H  # the history's first tick
    start = NOW - (sim.EPOCH0 - t0)

    # The history opens with spot going away (the trace wraps from an available tick):
    # for the job, a capacity refusal then.
    lambda_job = job(
        (
            refused(1, start),
            spot(2, start + 1 * H, start + 3 * H),
            spot(3, start + 6 * H, start + 7 * H),
            spot(4, start + 9 * H),
        ),
        (refusal(1, start),),
    )
    lam = quotes(lambda_job)[A]
    assert simulated.spell_hours == pytest.approx((2.0, 1.0))
    assert lam.spell_hours == pytest.approx(simulated.spell_hours)
    assert simulated.outage_hours == pytest.approx((1.0, 3.0, 2.0))
    assert lam.outage_hours == pytest.approx(simulated.outage_hours)
    assert [i.at - start for i in lam.interruptions] == pytest.approx(
        [i.at - t0 for i in simulated.interruptions[1:]]  # the first: the refusal's outage
    )
    assert simulated.capacity_changed_at is not None
    assert lam.capacity_changed_at is not None
    assert sim.EPOCH0 - simulated.capacity_changed_at == pytest.approx(
        NOW - lam.capacity_changed_at
    )


def test_the_lambda_passes_the_history_to_the_policy() -> None:
    # A has had short spells, one after another: its history should count against it.
    prices = {A: 0.35, B: 0.45}
    history = (
        spot(1, NOW - 12 * H, NOW - 11.8 * H),
        spot(2, NOW - 11 * H, NOW - 10.9 * H),
        spot(3, NOW - 10 * H, NOW - 9.8 * H, ENDED_RECLAIMED),
        spot(4, NOW - 9 * H, NOW - 8.9 * H),
    )
    deadline = datetime.fromtimestamp(NOW + 30 * H, UTC)
    j = job(history, expected_hours=20.0, deadline=deadline)
    view = placement.placement_view(j, prices, NOW)

    # The same facts, written by hand in the policy's own terms.
    def facts(pool: Pool) -> policy.PoolQuote:
        used = pool == A
        ends = (11.8, 10.9, 9.8, 8.9) if used else ()
        return policy.PoolQuote(
            pool=policy.Pool(pool.instance_type, pool.az),
            on_demand_price=placement.on_demand_price_of(j, pool.instance_type),
            spot_price=prices[pool],
            interruptions=tuple(
                policy.Interruption(NOW - h * H, policy.InterruptionCause.CAPACITY, 0.526)
                for h in ends
            ),
            spell_hours=(0.2, 0.1, 0.2, 0.1) if used else (),
            outage_hours=(0.8, 0.9, 0.8) if used else (),
        )

    by_hand = replace(view, pools=(facts(A), facts(B)))
    assert view.pools[0].spell_hours == pytest.approx(by_hand.pools[0].spell_hours)
    assert view.pools[0].outage_hours == pytest.approx(by_hand.pools[0].outage_hours)
    expected = policy.decide_placement(by_hand, NOW)
    assert policy.decide_placement(view, NOW) == expected
    chosen = placement.plan(j, prices, NOW, len(history) + 1)
    assert isinstance(expected, policy.Spot)
    assert expected.pool == policy.Pool(B.instance_type, B.az)
    assert chosen.candidates[0].pool == B
    # ... and the history matters: without it the policy would choose otherwise.
    bare = replace(
        view, pools=tuple(replace(q, spell_hours=(), outage_hours=()) for q in view.pools)
    )
    assert policy.decide_placement(bare, NOW) != expected


@pytest.mark.parametrize(
    ("spot_price", "cause", "bid"),
    [
        # Today's price is above what the interrupted instance bid: EC2 took it back for
        # price, so the next bid is raised (x 1.2, up to the cap) and spot is usable.
        (0.60, policy.InterruptionCause.PRICE, 0.526 * 1.2),
        # Below it: capacity, and the bid stays the on-demand price.
        (0.50, policy.InterruptionCause.CAPACITY, 0.526),
    ],
)
def test_an_interruption_bid_below_todays_price_raises_the_next_bid(
    spot_price: float, cause: policy.InterruptionCause, bid: float
) -> None:
    j = job(
        (spot(1, NOW - 2 * H, NOW - 0.1 * H),),
        instance_types=["g4dn.xlarge"],
        max_price_per_hour=1.0,
    )
    prices = {A: spot_price}

    (quote,) = placement.placement_view(j, prices, NOW).pools
    assert [i.cause for i in quote.interruptions] == [cause]

    chosen = placement.plan(j, prices, NOW, 2)
    (first, *_) = chosen.candidates
    assert (first.pool, first.market) == (A, "spot")
    assert first.max_price == pytest.approx(bid)


def test_a_raised_bid_never_passes_the_cap() -> None:
    j = job(
        (spot(1, NOW - 2 * H, NOW - 0.1 * H),),
        instance_types=["g4dn.xlarge"],
        max_price_per_hour=0.55,
    )
    chosen = placement.plan(j, {A: 0.54}, NOW, 2)
    assert chosen.candidates[0].max_price == pytest.approx(0.55)
    # Above the cap, spot is not bid for at all.
    over = placement.plan(j, {A: 0.60}, NOW, 2)
    assert all(c.market != "spot" for c in over.candidates)
