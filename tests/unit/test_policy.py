"""decide_placement, one row per situation."""

from dataclasses import dataclass, replace

import pytest

from chalicelib.policy import (
    DEFAULT_TUNING,
    CurrentRun,
    Interruption,
    InterruptionCause,
    Market,
    OnDemand,
    PlacementView,
    Pool,
    PoolQuote,
    Spot,
    Wait,
    decide_placement,
    expected_outage_hours,
    expected_spot_hours,
    interruption_rate,
    max_price_for,
    migration_overhead_hours,
)

NOW = 1_000_000_000.0
H = 3600.0
A = Pool("p3.2xlarge", "us-east-1a")
B = Pool("p3.2xlarge", "us-east-1b")
C = Pool("p3.2xlarge", "us-east-1c")
OD_PRICE = 3.06


def quote(pool: Pool = A, spot: float | None = 0.97, **kw) -> PoolQuote:
    return PoolQuote(pool, OD_PRICE, spot, spot_available=spot is not None, **kw)


def view(
    *,
    done: float = 0.0,
    work: float | None = 48.0,
    left: float | None = 52.0,
    window: float = 52.0,
    overhead: float = 0.2,
    pools: tuple[PoolQuote, ...] = (quote(),),
    current: CurrentRun | None = None,
    volume_az: str | None = "us-east-1a",
    cap: float | None = None,
) -> PlacementView:
    """A job with ``left`` hours to its deadline, opened ``window`` hours before it."""
    deadline = None if left is None else NOW + left * H
    return PlacementView(
        work_done_hours=done,
        total_work_hours=work,
        deadline=deadline,
        restart_overhead_hours=overhead,
        migration_overhead_hours=0.25,
        price_cap=cap,
        current=current,
        volume_az=volume_az,
        pools=pools,
        recheck_hours=1 / 6,
        history_since=NOW - 24 * H,
        job_started_at=None if deadline is None else deadline - window * H,
    )


def on(pool: Pool, market: Market, hours_ago: float = 1.0) -> CurrentRun:
    return CurrentRun(pool, market, NOW - hours_ago * H, 0.2)


def interrupted(times: int) -> tuple[Interruption, ...]:
    """``times`` capacity interruptions spread over the last day."""
    return tuple(
        Interruption(NOW - (k + 0.5) * 24 * H / times, InterruptionCause.CAPACITY)
        for k in reversed(range(times))
    )


# Spell records (hours of capacity before each interruption) of two kinds of pool.
LONG_SPELLS = (3.0, 5.0, 8.0, 12.0, 20.0)
SHORT_SPELLS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4)


def on_demand_spot_back(
    left: float, spot_age: float = 2.0, spells: tuple[float, ...] = ()
) -> PlacementView:
    """10 h done, ``left`` h to the deadline, on on-demand; spot back ``spot_age`` h ago
    in a pool interrupted 36 times a day, with the spell record ``spells``."""
    return view(
        done=10.0,
        left=left,
        current=on(A, Market.ON_DEMAND),
        pools=(
            quote(
                capacity_changed_at=NOW - spot_age * H,
                interruptions=interrupted(36),
                spell_hours=spells,
            ),
        ),
    )


def first_start_home_out(left: float) -> PlacementView:
    """No volume yet, ``left`` h to a deadline opened 52 h before it; A has had spot 90 %
    of the time but has none now, B 30 % and has a young spell in a record of short ones."""
    return view(
        volume_az=None,
        left=left,
        pools=(
            quote(A, None, recent_availability=0.9),
            quote(
                B,
                capacity_changed_at=NOW - 0.05 * H,
                spell_hours=SHORT_SPELLS,
                recent_availability=0.3,
            ),
        ),
    )


@dataclass(frozen=True)
class Row:
    situation: str
    view: PlacementView
    expected: type
    pool: Pool | None = None


ROWS = [
    Row("fresh job, spot available: spot", view(volume_az=None), Spot, A),
    Row(
        "no spot, ahead of schedule: wait",
        view(done=10.0, left=47.0, pools=(quote(spot=None),)),
        Wait,
    ),
    Row(
        "fresh job, no spot, many restarts expected, no slack to spare yet: on-demand",
        view(pools=(quote(spot=None, interruptions=interrupted(36)),)),
        OnDemand,
        A,
    ),
    Row(
        "no spot and behind schedule: on-demand",
        view(done=10.0, left=40.0, pools=(quote(spot=None, interruptions=interrupted(36)),)),
        OnDemand,
        A,
    ),
    Row(
        "no spot and no slack left: on-demand",
        view(done=0.0, left=48.3, pools=(quote(spot=None),)),
        OnDemand,
        A,
    ),
    Row(
        "spot available but a failed start could not fall back in time: on-demand",
        view(left=48.3),
        OnDemand,
        A,
    ),
    Row(
        "running spot with capacity: keep it, whatever the slack",
        view(left=48.05, current=on(A, Market.SPOT)),
        Spot,
        A,
    ),
    Row(
        "on-demand, spot back long enough, ahead of schedule: back to spot",
        view(
            done=30.0,
            left=30.0,
            current=on(A, Market.ON_DEMAND),
            pools=(quote(capacity_changed_at=NOW - 2 * H),),
        ),
        Spot,
        A,
    ),
    Row(
        "on-demand, spot back but behind schedule: stay on-demand",
        on_demand_spot_back(39.6),
        OnDemand,
        A,
    ),
    Row(
        "on-demand, a little behind the reserve, spot's spell record long: back to spot",
        on_demand_spot_back(40.8, spells=LONG_SPELLS),
        Spot,
        A,
    ),
    Row(
        "on-demand, a little behind the reserve, spot young and its spells short: stay",
        on_demand_spot_back(40.8, spot_age=0.5, spells=SHORT_SPELLS),
        OnDemand,
        A,
    ),
    Row(
        # The same deficit as "spot back but behind schedule", but a record of long
        # spells: spot is expected to last twice the trip's two restarts plus the
        # deficit owed, so the trip pays.
        "on-demand, behind the reserve, spot's spell record long: back to spot",
        on_demand_spot_back(39.6, spells=LONG_SPELLS),
        Spot,
        A,
    ),
    Row(
        "on-demand, far behind the reserve, spot's spell record long: stay on-demand",
        on_demand_spot_back(38.6, spells=LONG_SPELLS),
        OnDemand,
        A,
    ),
    Row(
        "on-demand, ahead of schedule, when spot came back unknown: back to spot",
        view(done=30.0, left=30.0, current=on(A, Market.ON_DEMAND), pools=(quote(),)),
        Spot,
        A,
    ),
    Row(
        "on-demand, spot back only this instant: stay on-demand",
        view(
            done=30.0,
            left=30.0,
            current=on(A, Market.ON_DEMAND),
            pools=(quote(capacity_changed_at=NOW),),
        ),
        OnDemand,
        A,
    ),
    Row(
        "on-demand, spot back this instant, restarts cheap next to a check: back to spot",
        view(
            done=30.0,
            left=30.0,
            overhead=0.05,
            current=on(A, Market.ON_DEMAND),
            pools=(quote(capacity_changed_at=NOW),),
        ),
        Spot,
        A,
    ),
    Row(
        "no spot, behind Uniform Progress's line but few restarts expected: wait",
        view(done=21.0, left=35.0, window=70.0, pools=(quote(spot=None),)),
        Wait,
    ),
    Row(
        "no spot, behind Uniform Progress's line and many restarts expected: on-demand",
        view(
            done=21.0,
            left=35.0,
            window=70.0,
            pools=(quote(spot=None, interruptions=interrupted(36)),),
        ),
        OnDemand,
        A,
    ),
    Row(
        "spot only in another AZ, home outage just began: wait a move's worth",
        view(
            done=10.0,
            left=47.0,
            pools=(quote(A, None, capacity_changed_at=NOW - 0.1 * H), quote(B)),
        ),
        Wait,
    ),
    Row(
        "spot only in another AZ, home outage long: move",
        view(
            done=10.0,
            left=47.0,
            pools=(quote(A, None, capacity_changed_at=NOW - 3 * H), quote(B)),
        ),
        Spot,
        B,
    ),
    Row(
        "spot at home with a poor record, none elsewhere yet: no move for the same price",
        view(done=10.0, left=47.0, pools=(quote(A, interruptions=interrupted(36)), quote(B))),
        Spot,
        A,
    ),
    Row(
        "home outage young, no zone's share of spot known: wait, not a move",
        view(
            done=10.0,
            left=47.0,
            pools=(quote(A, None, capacity_changed_at=NOW - 0.5 * H), quote(B)),
        ),
        Wait,
    ),
    Row(
        "home outage long, a move's worth of spot in another AZ by its spell record: move",
        view(
            done=10.0,
            left=47.0,
            pools=(
                quote(A, None, capacity_changed_at=NOW - 3 * H),
                quote(B, capacity_changed_at=NOW - 2 * H, spell_hours=LONG_SPELLS),
            ),
        ),
        Spot,
        B,
    ),
    Row(
        "home outage long, other AZ's spell young and its spells short: no move",
        view(
            done=10.0,
            left=47.0,
            pools=(
                quote(A, None, capacity_changed_at=NOW - 3 * H),
                quote(B, capacity_changed_at=NOW - 0.05 * H, spell_hours=SHORT_SPELLS),
            ),
        ),
        Wait,
    ),
    Row(
        "on-demand at home, other AZ's spell long: leave on-demand with a move",
        view(
            done=30.0,
            left=30.0,
            current=on(A, Market.ON_DEMAND),
            pools=(
                quote(A, None, capacity_changed_at=NOW - 3 * H),
                quote(B, capacity_changed_at=NOW - 2 * H, spell_hours=LONG_SPELLS),
            ),
        ),
        Spot,
        B,
    ),
    Row(
        "on-demand at home, other AZ's spell young and its spells short: stay on-demand",
        view(
            done=30.0,
            left=30.0,
            current=on(A, Market.ON_DEMAND),
            pools=(
                quote(A, None, capacity_changed_at=NOW - 3 * H),
                quote(B, capacity_changed_at=NOW - 0.05 * H, spell_hours=SHORT_SPELLS),
            ),
        ),
        OnDemand,
        A,
    ),
    Row(
        "behind the reserve, a move would take slack only on-demand earns back: no move",
        view(
            done=10.0,
            left=40.5,
            pools=(
                quote(A, None, capacity_changed_at=NOW - 3 * H, interruptions=interrupted(36)),
                quote(
                    B,
                    capacity_changed_at=NOW - 0.5 * H,
                    spell_hours=SHORT_SPELLS,
                    interruptions=interrupted(36),
                ),
            ),
        ),
        OnDemand,
        A,
    ),
    Row(
        "move would pay but a preemption after it could not finish on-demand: on-demand",
        view(
            done=10.0,
            left=38.5,
            pools=(
                quote(A, None, capacity_changed_at=NOW - 3 * H),
                quote(B, capacity_changed_at=NOW - 20 * H, spell_hours=LONG_SPELLS),
            ),
        ),
        OnDemand,
        A,
    ),
    Row(
        "excursion from a home with more capacity must pay the way back: no move",
        view(
            done=10.0,
            left=47.0,
            pools=(
                quote(A, None, capacity_changed_at=NOW - 3 * H, recent_availability=0.9),
                quote(
                    B,
                    capacity_changed_at=NOW - 0.3 * H,
                    spell_hours=(0.3, 0.5, 0.7, 0.9, 1.1),
                    recent_availability=0.4,
                ),
            ),
        ),
        Wait,
    ),
    Row(
        "first start, home (most capacity) has no spot, other AZ's spell young: wait for home",
        first_start_home_out(left=52.0),
        Wait,
    ),
    Row(
        "first start, home has no spot and the slack cannot wait for it: spot elsewhere, "
        "where the volume is created",
        first_start_home_out(left=49.5),
        Spot,
        B,
    ),
    Row(
        "excursion from home, home's outages by its record end soon: wait for home",
        view(
            done=10.0,
            left=47.0,
            pools=(
                quote(
                    A,
                    None,
                    capacity_changed_at=NOW - 0.3 * H,
                    recent_availability=0.9,
                    outage_hours=(0.4, 0.5, 0.5, 0.6, 0.6),
                ),
                quote(
                    B,
                    capacity_changed_at=NOW - 2 * H,
                    spell_hours=LONG_SPELLS,
                    recent_availability=0.5,
                ),
            ),
        ),
        Wait,
    ),
    Row(
        "excursion from home, home's outages by its record last hours: move",
        view(
            done=10.0,
            left=47.0,
            pools=(
                quote(
                    A,
                    None,
                    capacity_changed_at=NOW - 0.3 * H,
                    recent_availability=0.9,
                    outage_hours=(4.0, 6.0, 8.0, 10.0, 12.0),
                ),
                quote(
                    B,
                    capacity_changed_at=NOW - 2 * H,
                    spell_hours=LONG_SPELLS,
                    recent_availability=0.5,
                ),
            ),
        ),
        Spot,
        B,
    ),
    Row(
        "two AZs with spot: the one with fewer recorded interruptions",
        view(
            volume_az=None,
            pools=(
                quote(
                    A,
                    interruptions=tuple(
                        Interruption(NOW - k * H, InterruptionCause.CAPACITY)
                        for k in range(8, 0, -1)
                    ),
                ),
                quote(B),
            ),
        ),
        Spot,
        B,
    ),
    Row(
        "two AZs, same interruption history: the one whose capacity has lasted longer",
        view(
            volume_az=None,
            pools=(
                quote(B, interruptions=interrupted(8), capacity_changed_at=NOW - 0.1 * H),
                quote(C, interruptions=interrupted(8), capacity_changed_at=NOW - 6 * H),
            ),
        ),
        Spot,
        C,
    ),
    Row(
        "first start, two AZs with spot: home is the one spot was in most recently",
        view(
            volume_az=None,
            pools=(quote(A, recent_availability=0.5), quote(B, recent_availability=0.9)),
        ),
        Spot,
        B,
    ),
    Row(
        "spot price above the cap: not a spot pool",
        view(pools=(quote(spot=2.0),), cap=1.5, done=10.0, left=38.3),
        OnDemand,
        A,
    ),
    Row("no work estimate: cheapest spot", view(work=None), Spot, A),
    Row(
        "no work estimate, no spot: on-demand, never an open-ended wait",
        view(work=None, pools=(quote(spot=None),)),
        OnDemand,
        A,
    ),
    Row("no deadline: cheapest spot", view(left=None), Spot, A),
    Row(
        "deadline already out of reach: on-demand, the best effort",
        view(left=10.0, pools=(quote(),)),
        OnDemand,
        A,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.situation for r in ROWS])
def test_decide_placement(row: Row) -> None:
    placement = decide_placement(row.view, NOW)
    assert isinstance(placement, row.expected), placement
    if row.pool is not None:
        assert isinstance(placement, Spot | OnDemand)
        assert placement.pool == row.pool
    assert placement.reason


def test_a_wait_never_outlasts_the_last_safe_on_demand_start() -> None:
    v = view(done=10.0, left=47.0, pools=(quote(spot=None),))
    placement = decide_placement(v, NOW)
    assert isinstance(placement, Wait)
    assert v.deadline is not None
    latest_start = v.deadline - (38.0 + v.restart_overhead_hours) * H
    assert NOW < placement.until <= latest_start


def test_spot_max_price_defaults_to_on_demand_and_rises_after_price_interruptions() -> None:
    plain = quote()
    assert max_price_for(plain, None) == OD_PRICE
    assert max_price_for(plain, 2.0) == 2.0  # a cap below on-demand is the bid
    outbid = replace(
        plain,
        interruptions=(Interruption(NOW - H, InterruptionCause.PRICE, max_price=3.06),),
    )
    assert max_price_for(outbid, 4.0) == pytest.approx(3.06 * 1.2)
    assert max_price_for(outbid, 3.2) == 3.2  # never above the cap
    capacity_only = replace(
        plain, interruptions=(Interruption(NOW - H, InterruptionCause.CAPACITY, 3.06),)
    )
    assert max_price_for(capacity_only, 4.0) == OD_PRICE  # a higher bid cannot buy capacity


def test_chosen_spot_carries_its_max_price_and_fallback_pools() -> None:
    placement = decide_placement(view(volume_az=None, pools=(quote(A), quote(B))), NOW)
    assert isinstance(placement, Spot)
    assert placement.max_price == OD_PRICE
    assert set(placement.fallbacks) == {A, B} - {placement.pool}


def test_on_demand_runs_in_the_volumes_az() -> None:
    v = view(done=10.0, left=39.0, volume_az="us-east-1b", pools=(quote(A, None), quote(B, None)))
    placement = decide_placement(v, NOW)
    assert isinstance(placement, OnDemand)
    assert placement.pool == B
    assert placement.fallbacks == (A,)


def test_recorded_interruptions_raise_the_expected_rate() -> None:
    calm = quote()
    busy = replace(
        calm,
        interruptions=tuple(
            Interruption(NOW - k * H, InterruptionCause.CAPACITY) for k in range(6, 0, -1)
        ),
    )
    since = NOW - 24 * H
    assert interruption_rate(busy, NOW, since) > interruption_rate(calm, NOW, since)
    assert interruption_rate(calm, NOW, since) == pytest.approx(
        DEFAULT_TUNING.prior_interruptions_per_hour
        * DEFAULT_TUNING.prior_hours
        / (24 + DEFAULT_TUNING.prior_hours)
    )


def test_migration_time_grows_with_the_volume_and_s3_restore_can_be_faster() -> None:
    assert migration_overhead_hours(80) == pytest.approx(0.25)
    assert migration_overhead_hours(800) > migration_overhead_hours(80)
    assert migration_overhead_hours(800, checkpoint_gib=30) < migration_overhead_hours(800)


@pytest.mark.parametrize(
    ("situation", "spells", "age", "low", "high"),
    [
        ("no record: one interruption-rate lifetime", (), 0.0, 15.9, 16.1),
        ("young spell, short record: the short remainders", SHORT_SPELLS, 0.05, 0.1, 0.3),
        ("spell older than every recorded one: at least its age", SHORT_SPELLS, 2.0, 2.0, 16.1),
        (
            "long record, spell of 4 h: the median of the longer ones' remainders",
            LONG_SPELLS,
            4,
            4,
            8,
        ),
    ],
)
def test_expected_spot_hours_reads_the_spell_record(
    situation: str, spells: tuple[float, ...], age: float, low: float, high: float
) -> None:
    q = quote(capacity_changed_at=NOW - age * H, spell_hours=spells)
    assert low <= expected_spot_hours(q, NOW, NOW - 24 * H) <= high, situation


def test_a_move_behind_the_reserve_pays_for_the_slack_on_demand_earns_back() -> None:
    # Both zones known to have spot as often: not a trip out and back.
    home = quote(
        A,
        None,
        capacity_changed_at=NOW - 3 * H,
        interruptions=interrupted(36),
        recent_availability=0.8,
    )
    other = quote(
        B,
        recent_availability=0.8,
        capacity_changed_at=NOW - 0.5 * H,
        spell_hours=SHORT_SPELLS,
        interruptions=interrupted(36),
    )
    behind = view(done=10.0, left=40.5, pools=(home, other))
    ahead = view(done=10.0, left=47.0, pools=(home, other))
    assert isinstance(decide_placement(behind, NOW), OnDemand)
    placement = decide_placement(ahead, NOW)
    assert isinstance(placement, Spot)
    assert placement.pool == B


def flickering_home(spot_age_hours: float) -> PoolQuote:
    """Home, spot back ``spot_age_hours`` ago after a 4 h outage broken by flickers.

    Oldest first: a 12 h spell, a 4 h outage, then three 0.15 h spells with 0.3 h
    outages between them, then the current spell.
    """
    return quote(
        A,
        capacity_changed_at=NOW - spot_age_hours * H,
        recent_availability=0.9,
        spell_hours=(12.0, 0.15, 0.15, 0.15),
        outage_hours=(4.0, 0.3, 0.3, 0.3),
    )


def test_spells_too_short_to_use_count_as_outage() -> None:
    # Out for 0.1 h after three 0.15 h spells between 0.3 h outages, which followed a
    # 4 h outage after a 12 h spell.
    home = quote(
        A,
        None,
        capacity_changed_at=NOW - 0.1 * H,
        recent_availability=0.9,
        spell_hours=(12.0, 0.15, 0.15, 0.15),
        outage_hours=(4.0, 0.3, 0.3),
    )
    since = NOW - 24 * H
    # Raw, this is a young outage in a record of 0.3 h ones: it ends soon.
    assert expected_outage_hours(home, NOW, since) < 0.5
    # Through the flickers, the outage has gone on since the 12 h spell ended and is
    # judged by that age.
    merged_age = 4.0 + 2 * 0.3 + 3 * 0.15 + 0.1
    assert expected_outage_hours(home, NOW, since, useful_spell_hours=0.4) == pytest.approx(
        merged_age
    )
    # Spells of a useful length end outages: the record is the raw one.
    settled = replace(home, spell_hours=(12.0, 0.5, 0.5, 0.5))
    assert expected_outage_hours(settled, NOW, since, useful_spell_hours=0.4) == (
        expected_outage_hours(settled, NOW, since)
    )
    # Outages the spell record does not reach are kept as they are.
    unpaired = replace(home, spell_hours=())
    assert expected_outage_hours(unpaired, NOW, since, useful_spell_hours=0.4) == (
        expected_outage_hours(unpaired, NOW, since)
    )


@pytest.mark.parametrize(
    ("home_spot_age", "expected_pool"),
    [
        # Home's spot is younger than on-demand would be left for, and home has only
        # flickered for hours: home is in an outage, the move to B's long spell pays.
        (0.1, B),
        # Home's spot has lasted two restarts: home has spot, stay.
        (0.5, A),
    ],
)
def test_a_home_that_flickers_is_a_home_in_an_outage(
    home_spot_age: float, expected_pool: Pool
) -> None:
    other = quote(
        B,
        capacity_changed_at=NOW - 2 * H,
        spell_hours=LONG_SPELLS,
        recent_availability=0.5,
    )
    v = view(
        done=10.0,
        left=47.0,
        current=on(A, Market.ON_DEMAND, hours_ago=5.0),
        pools=(flickering_home(home_spot_age), other),
    )
    placement = decide_placement(v, NOW)
    assert isinstance(placement, Spot), placement
    assert placement.pool == expected_pool


def test_a_lone_jobs_own_short_spells_are_not_taken_for_flickers() -> None:
    # The same record as the job's own (no share of time with spot: not a fleet's
    # capacity timeline): its short spells began when the job started them, so the
    # outage is judged by the raw record, which says it ends soon: no move.
    home = replace(flickering_home(0.1), recent_availability=None)
    other = quote(B, capacity_changed_at=NOW - 2 * H, spell_hours=LONG_SPELLS)
    v = view(
        done=10.0,
        left=47.0,
        current=on(A, Market.ON_DEMAND, hours_ago=5.0),
        pools=(home, other),
    )
    placement = decide_placement(v, NOW)
    assert isinstance(placement, OnDemand), placement
    assert placement.pool == A


@pytest.mark.parametrize(
    ("availability", "expected"),
    [
        # Home has spot 90 % of the time: behind the reserve, the job would mostly be
        # riding spot there, so the slack the move takes is cheap: move.
        (0.9, Spot),
        # Home has spot 10 % of the time: the slack taken would be earned back on
        # on-demand: no move.
        (0.1, OnDemand),
    ],
)
def test_behind_the_reserve_a_moves_slack_costs_on_demand_only_in_homes_outages(
    availability: float, expected: type
) -> None:
    # Both zones have spot as often (no trip out and back); B's spell is long.
    home = quote(
        A,
        None,
        capacity_changed_at=NOW - 3 * H,
        interruptions=interrupted(36),
        recent_availability=availability,
    )
    other = quote(
        B,
        capacity_changed_at=NOW - 2 * H,
        spell_hours=LONG_SPELLS,
        interruptions=interrupted(36),
        recent_availability=availability,
    )
    placement = decide_placement(view(done=10.0, left=39.5, pools=(home, other)), NOW)
    assert isinstance(placement, expected), placement
    assert placement.pool == (B if expected is Spot else A)  # type: ignore[union-attr]
