"""Where and how to run a job next: spot in a pool, on-demand in a pool, or wait.

One pure entry point, :func:`decide_placement`, is called by the reconcile Lambda at
every launch and relaunch and by ``spotctl simulate`` at every tick, so the code the
simulator scores is the code that runs in production. Standard library only: it is
imported by the Lambda on every cold start.

The deadline rules rest on *slack*: time to the deadline minus the work left. Every
restart spends some of it (restart overhead, plus the volume move for another AZ),
every hour spent waiting spends an hour of it, running spends none. The policy

- never lets slack fall below what an on-demand instance needs to finish in time, so a
  deadline that on-demand can still meet is never missed (a spot start must leave room
  for one more restart on on-demand; a wait must leave room for one more recheck);
- keeps a reserve of slack proportional to the time left, at most the share Uniform
  Progress keeps (Wu et al., NSDI '24): smaller when the pool's recent availability
  says spot will carry more of the work, and smaller when the interruptions expected
  in the time left (estimated online from the pool's recorded history and a prior)
  will cost few restarts, since restarts and waiting are all slack is spent on; never
  below a floor of Uniform Progress's share; plus a fixed cushion before it waits
  instead of buying on-demand during an outage. A reserve sized like this lets the
  job wait out more outages than Uniform Progress when restarts are cheap, and keeps
  its caution when they are dear;
- takes spot whenever a pool has it and the start is safe; rides it until preempted;
  leaves on-demand for spot as soon as it is back above the reserve and spot will
  have lasted two restarts' worth of time by the next check (short-lived capacity
  costs two restarts for no progress); behind the reserve, it leaves on-demand too
  when the pool's spell record expects spot to last twice the two restarts the trip
  risks, plus the deficit already owed, since riding spot earns the deficit back as
  fast as on-demand does;
- ranks spot pools by expected cost per hour of progress, counting the restarts that
  the recorded interruptions predict and the volume move (snapshot + restore) another
  AZ needs; how long a pool's capacity will last comes from its spell record (how
  long each recorded spell of capacity lasted): the median remainder of the spells
  that outlived the current one's age, so a young spell in a pool of short spells
  counts for little and one that has lasted long counts for more;
- moves the volume to another AZ only when the spot time it is expected to buy there
  pays for the move: its startup costs its hours at the on-demand price (billed
  without progress, and slack a later outage buys back on on-demand), a move out of
  the home AZ (or, with no zone's share of spot known, any move for want of spot at
  home) pays for the way back too and counts only the spot it buys until home has
  spot again (by the home's outage record, in which spot that comes and goes too
  fast to leave on-demand for is part of the outage: such spot at home is no spot
  yet), a move while home has spot saves only the difference in spot prices, and
  slack taken from below the reserve costs the on-demand hours needed to earn it
  back at the reserve's rate, in the share of them that home has no spot (when it
  has, behind the reserve or not, the job is on spot or can be);
- starts the job in its home: the AZ spot has been in most by the recent record,
  even when it has no spot this minute if the slack can pay for waiting for it;
  when it cannot, in the AZ with spot that it has been in most (the first start
  creates the volume where it runs, so spot anywhere is free of a move then); before
  paying for a move it waits, ski-rental style, as long as the move would cost for
  spot to come back where the volume is.

Max price follows AWS's advice (no low bids): the on-demand price, or the job's cap if
lower; after an interruption caused by price it is raised, up to the cap.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, replace
from enum import StrEnum

SECONDS_PER_HOUR = 3600.0

# Moving the data volume to another AZ: snapshot it, then create a volume from the
# snapshot there. A fixed part (API calls, attach, filesystem check) plus a part that
# grows with the data copied. Restoring the latest checkpoint from S3 is the
# alternative when the checkpoint is smaller than the volume.
MIGRATION_FIXED_HOURS = 0.05
SNAPSHOT_GIB_PER_HOUR = 400.0
S3_RESTORE_GIB_PER_HOUR = 600.0


class Market(StrEnum):
    """How an instance is bought."""

    SPOT = "spot"  # interruptible, billed at the spot price
    ON_DEMAND = "on-demand"  # never interrupted by EC2, billed at the list price


class InterruptionCause(StrEnum):
    """Why EC2 took a spot instance back."""

    CAPACITY = "capacity"  # EC2 needed the capacity: move pools, raising the bid is useless
    PRICE = "price"  # the spot price rose above our max price: raise it, up to the cap


@dataclass(frozen=True, slots=True)
class Pool:
    """Where an instance can run: one instance type in one Availability Zone."""

    instance_type: str
    az: str


@dataclass(frozen=True, slots=True)
class Interruption:
    """One spot interruption we recorded in a pool (ours or another job's)."""

    at: float  # epoch seconds
    cause: InterruptionCause
    max_price: float | None = None  # the max price the interrupted instance had


@dataclass(frozen=True, slots=True)
class PoolQuote:
    """What we know about a pool right now."""

    pool: Pool
    on_demand_price: float  # $/h
    spot_price: float | None  # $/h; None when spot capacity is known to be unavailable
    interruptions: tuple[Interruption, ...] = ()  # oldest first
    spot_available: bool = True  # believed available (no recent capacity failure)
    capacity_changed_at: float | None = None  # epoch s spot last came or went here
    # Share of the recent past (Tuning.history_window_hours) with spot capacity here,
    # from our capacity observations; None when we have none.
    recent_availability: float | None = None
    # How long (h) each spell of spot capacity we recorded here lasted before it was
    # interrupted: the pool's survival record, from which a move is judged.
    spell_hours: tuple[float, ...] = ()
    # How long (h) each outage of spot capacity we recorded here lasted.
    outage_hours: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class CurrentRun:
    """The instance the job has now, if any."""

    pool: Pool
    market: Market
    started_at: float  # epoch seconds
    startup_hours: float  # restart (+ migration) overhead this instance pays before progress
    max_price: float | None = None  # spot only


@dataclass(frozen=True, slots=True)
class PlacementView:
    """Everything the policy may look at. Built by the Lambda and by the simulator."""

    work_done_hours: float
    total_work_hours: float | None  # None: no estimate, decide by price alone
    deadline: float | None  # epoch seconds; None: no deadline
    restart_overhead_hours: float
    migration_overhead_hours: float  # see migration_overhead_hours()
    price_cap: float | None  # $/h the user will pay at most for spot
    current: CurrentRun | None
    volume_az: str | None  # None before the first launch: no volume to move yet
    pools: tuple[PoolQuote, ...]
    recheck_hours: float = 1.0 / 60.0  # the longest time until decide_placement runs again
    history_since: float | None = None  # epoch s from which interruptions were recorded
    job_started_at: float | None = None  # epoch s the deadline's window opened (submission)


@dataclass(frozen=True, slots=True)
class Tuning:
    """The policy's constants, in one place so tests and the simulator can name them."""

    # Prior on a pool's interruption rate, blended with the recorded history.
    prior_interruptions_per_hour: float = 0.25
    prior_hours: float = 8.0
    history_window_hours: float = 72.0
    # Slack kept in reserve, as a multiple of Uniform Progress's (slack0 / window).
    reserve_factor: float = 1.0
    # Excess slack (in restarts) needed to leave on-demand for spot.
    leave_on_demand_restarts: float = 0.0
    # How long (in restarts) spot must be expected to have lasted, counting the check
    # interval about to start, before on-demand is left for it: a spell shorter than
    # a restart pays two restarts for no progress.
    leave_on_demand_min_age_restarts: float = 2.0
    # Behind the reserve, on-demand is left for spot anyway when the pool's spell
    # record expects spot to last this multiple of the two restarts the trip puts
    # at risk (there, and back after the preemption), plus the reserve's deficit
    # already owed. Negative: never.
    leave_behind_spell_factor: float = 2.0
    # How much of the recent availability we count on, and how much of Uniform
    # Progress's schedule we keep in the blend.
    availability_trust: float = 1.0
    # Waiting for spot in the volume's AZ before moving, in migration overheads.
    home_wait_moves: float = 1.0
    # Slack kept on top of the reserve before waiting (hours).
    cushion_hours: float = 0.75
    uniform_weight: float = 0.0
    # Restart-scaled reserve: slack for the restarts expected in the time left
    # (interruptions per hour x restart overhead x this factor; a move prices its own
    # slack), never below reserve_floor x Uniform Progress's share, never above it. A
    # negative factor keeps Uniform Progress's share.
    restart_reserve_factor: float = 2.0
    reserve_floor: float = 0.3
    # Expected spot lifetime in a pool at least this multiple of how long its
    # capacity has already lasted (spells are heavy-tailed); 0 ignores the age.
    lindy_factor: float = 1.0
    # The first start (no volume yet) picks the pool with the highest recent
    # availability: the job's home, where it will wait out outages.
    home_by_availability: bool = True
    # Weight (in recorded spells) of the prior in a pool's expected spell remainder,
    # and the quantile of the remainders counted on (the median: as likely shorter).
    spell_prior_weight: float = 1.0
    spell_quantile: float = 0.5
    # Moves out of the home AZ (the one spot has been in most) are trips out and
    # back: each must pay for this many moves.
    excursion_trips: float = 2.0


DEFAULT_TUNING = Tuning()


@dataclass(frozen=True, slots=True)
class Spot:
    """Run on spot in ``pool`` with ``max_price``; try ``fallbacks`` on no capacity."""

    pool: Pool
    max_price: float
    reason: str
    fallbacks: tuple[Pool, ...] = ()


@dataclass(frozen=True, slots=True)
class OnDemand:
    """Run on-demand in ``pool``; try ``fallbacks`` on no capacity."""

    pool: Pool
    reason: str
    fallbacks: tuple[Pool, ...] = ()


@dataclass(frozen=True, slots=True)
class Wait:
    """Run nothing; decide again at ``until`` (epoch seconds) at the latest."""

    until: float
    reason: str


Placement = Spot | OnDemand | Wait


def migration_overhead_hours(volume_gib: float, checkpoint_gib: float | None = None) -> float:
    """Hours lost moving a job's data to another AZ: snapshot+restore, or S3 restore."""
    by_snapshot = MIGRATION_FIXED_HOURS + volume_gib / SNAPSHOT_GIB_PER_HOUR
    if checkpoint_gib is None:
        return by_snapshot
    return min(by_snapshot, MIGRATION_FIXED_HOURS + checkpoint_gib / S3_RESTORE_GIB_PER_HOUR)


def max_price_for(quote: PoolQuote, price_cap: float | None) -> float:
    """The max price to bid: on-demand (or the cap), raised after price interruptions."""
    base = quote.on_demand_price if price_cap is None else min(price_cap, quote.on_demand_price)
    raised = [
        i.max_price * 1.2
        for i in quote.interruptions
        if i.cause is InterruptionCause.PRICE and i.max_price is not None
    ]
    bid = max([base, *raised])
    return bid if price_cap is None else min(bid, price_cap)


def _at(interruption: Interruption) -> float:
    return interruption.at


def interruption_rate(
    quote: PoolQuote, now: float, since: float | None, tuning: Tuning = DEFAULT_TUNING
) -> float:
    """Interruptions per hour expected in a pool: recorded history blended with a prior."""
    window_start = now - tuning.history_window_hours * SECONDS_PER_HOUR
    if since is not None:
        window_start = max(window_start, since)
    observed_hours = max(0.0, (now - window_start) / SECONDS_PER_HOUR)
    found = quote.interruptions
    count = bisect_right(found, now, key=_at) - bisect_left(found, window_start, key=_at)
    prior = tuning.prior_interruptions_per_hour * tuning.prior_hours
    return (count + prior) / (observed_hours + tuning.prior_hours)


def expected_spot_hours(
    quote: PoolQuote,
    now: float,
    since: float | None,
    tuning: Tuning = DEFAULT_TUNING,
    rate: float | None = None,
) -> float:
    """Hours spot capacity in a pool can be counted on from now.

    The recorded spells that outlived the current one's age (a spell that has lasted
    long is judged against the long ones only), with a prior of one interruption-rate
    lifetime, at least the age (spells are heavy-tailed). Their remainders are
    heavy-tailed too, and a move is lost if the spell ends early, so the quantile
    ``tuning.spell_quantile`` of the remainders is what we count on, not their mean.
    ``rate`` is the pool's :func:`interruption_rate`, when the caller has it.
    """
    # A pool is interrupted only while it has capacity: hours of capacity per interruption.
    up_share = 1.0 if quote.recent_availability is None else quote.recent_availability
    if rate is None:
        rate = interruption_rate(quote, now, since, tuning)
    return _remainder(quote.spell_hours, _age(quote, now), up_share / rate, tuning)


def expected_outage_hours(
    quote: PoolQuote,
    now: float,
    since: float | None,
    tuning: Tuning = DEFAULT_TUNING,
    useful_spell_hours: float = 0.0,
) -> float:
    """Hours an outage of spot capacity in a pool is expected to go on, as above.

    Spells shorter than ``useful_spell_hours`` are counted as part of the outage
    around them, in the record and in the current outage's age: capacity that comes
    and goes before a job could use it does not end an outage for the job.
    """
    down_share = 0.0 if quote.recent_availability is None else 1.0 - quote.recent_availability
    mean = down_share / interruption_rate(quote, now, since, tuning)
    age, record = _outages_through_short_spells(quote, now, useful_spell_hours)
    return _remainder(record, age, mean, tuning)


def _outages_through_short_spells(
    quote: PoolQuote, now: float, useful_spell_hours: float
) -> tuple[float, tuple[float, ...]]:
    """The current outage's age and the outage record, short spells merged into outages.

    The record alternates: the current state (for ``_age(quote, now)`` hours), and
    before it, newest first, a spell then an outage if spot is out now, or an outage
    then a spell if it is up. A spell shorter than ``useful_spell_hours`` joins the
    outages on either side; so does the current spell while it is that young. Where
    one record runs out before the other, the older outages are kept unmerged.
    """
    age = _age(quote, now)
    if useful_spell_hours <= 0.0 or quote.capacity_changed_at is None:
        return age, quote.outage_hours
    spells, outages = quote.spell_hours, quote.outage_hours
    up_now = quote.spot_available and quote.spot_price is not None
    newest_first: list[tuple[bool, float]] = [(up_now, age)]
    s, o = len(spells), len(outages)
    spell_next = not up_now
    while (s if spell_next else o) > 0:
        if spell_next:
            s -= 1
            newest_first.append((True, spells[s]))
        else:
            o -= 1
            newest_first.append((False, outages[o]))
        spell_next = not spell_next
    # Outages older than the spell record reaches are kept as they are.
    merged: list[float] = list(outages[:o])
    outage: float | None = None
    for is_spell, hours in reversed(newest_first):
        if is_spell and hours >= useful_spell_hours:
            if outage is not None:
                merged.append(outage)
            outage = None
        else:
            outage = (outage or 0.0) + hours
    if outage is None:  # a useful spell is running: no outage now
        return 0.0, tuple(merged)
    return outage, tuple(merged)


def _age(quote: PoolQuote, now: float) -> float:
    """Hours since spot capacity in the pool last came or went (0 when unknown)."""
    if quote.capacity_changed_at is None:
        return 0.0
    return max(0.0, (now - quote.capacity_changed_at) / SECONDS_PER_HOUR)


def _remainder(record: tuple[float, ...], age: float, mean: float, tuning: Tuning) -> float:
    """The ``spell_quantile`` of what is left of the recorded durations past ``age``."""
    prior = max(mean, tuning.lindy_factor * age)
    weighted = [(h - age, 1.0) for h in record if h > age]
    weighted.append((prior, tuning.spell_prior_weight))
    weighted.sort()
    target = tuning.spell_quantile * sum(w for _, w in weighted)
    seen = 0.0
    for hours, w in weighted:
        seen += w
        if seen >= target:
            return hours
    return weighted[-1][0]


def _usable_spot(quote: PoolQuote, price_cap: float | None) -> bool:
    if not quote.spot_available or quote.spot_price is None:
        return False
    floor = quote.on_demand_price if price_cap is None else min(price_cap, quote.on_demand_price)
    # The max price is never below that floor: only a dearer spot price needs the record.
    return quote.spot_price <= floor or quote.spot_price <= max_price_for(quote, price_cap)


@dataclass(frozen=True, slots=True)
class _Ranked:
    quote: PoolQuote
    cost_per_progress_hour: float
    startup_hours: float
    rate: float
    moves: bool  # starting here moves the volume to another AZ
    spot_hours: float  # expected_spot_hours of the pool


def _rank_spot_pools(
    view: PlacementView,
    now: float,
    remaining_hours: float | None,
    tuning: Tuning,
    no_volume: bool = False,
) -> list[_Ranked]:
    """Usable spot pools, cheapest expected cost per hour of progress first."""
    ranked: list[_Ranked] = []
    current = view.current
    for quote in view.pools:
        if not _usable_spot(quote, view.price_cap):
            continue
        price = quote.spot_price if quote.spot_price is not None else quote.on_demand_price
        rate = interruption_rate(quote, now, view.history_since, tuning)
        moving = view.volume_az is not None and quote.pool.az != view.volume_az
        if current is not None and current.market is Market.SPOT and current.pool == quote.pool:
            startup = max(0.0, current.startup_hours - (now - current.started_at) / 3600.0)
            moving = False
        else:
            # Before the first start there is no volume to move yet: it is created
            # where the job first runs, even away from its home.
            startup = view.restart_overhead_hours + (
                view.migration_overhead_hours if moving and not no_volume else 0.0
            )
        # Each expected interruption costs a restart; the first start is paid once,
        # spread over the shorter of the work left and how long the capacity is
        # expected to last by the pool's spell record.
        spot_hours = expected_spot_hours(quote, now, view.history_since, tuning, rate)
        stay = max(view.recheck_hours, spot_hours)
        if remaining_hours is not None:
            stay = min(stay, max(remaining_hours, view.recheck_hours))
        waste = rate * view.restart_overhead_hours + startup / stay
        useful = max(1e-6, 1.0 - min(0.999, waste))
        ranked.append(_Ranked(quote, price / useful, startup, rate, moving, spot_hours))
    ranked.sort(key=lambda r: (r.cost_per_progress_hour, r.quote.pool.az))
    if tuning.home_by_availability and view.volume_az is None:
        # The first start picks the job's home AZ, where it will wait out outages:
        # the pool spot has been in most, by the recent record, when we have one.
        ranked.sort(key=lambda r: -(r.quote.recent_availability or 0.0))
    return ranked


def _on_demand_quote(view: PlacementView) -> PoolQuote:
    """The on-demand pool: in the volume's AZ (no move), the cheapest type there."""
    local = [q for q in view.pools if view.volume_az is None or q.pool.az == view.volume_az]
    candidates = local or list(view.pools)
    if view.current is not None and view.current.market is Market.ON_DEMAND:
        for q in candidates:
            if q.pool == view.current.pool:
                return q
    return min(candidates, key=lambda q: (q.on_demand_price, q.pool.az, q.pool.instance_type))


def _fallbacks(pools: list[PoolQuote], chosen: Pool) -> tuple[Pool, ...]:
    return tuple(q.pool for q in pools if q.pool != chosen)


def decide_placement(view: PlacementView, now: float, tuning: Tuning = DEFAULT_TUNING) -> Placement:
    """Choose spot in a pool (with a max price), on-demand in a pool, or waiting."""
    if not view.pools:
        return Wait(now + view.recheck_hours * SECONDS_PER_HOUR, "no pool to run in")
    remaining: float | None = None
    if view.total_work_hours is not None:
        remaining = max(0.0, view.total_work_hours - view.work_done_hours)
    current = view.current
    if (
        current is not None
        and current.market is Market.SPOT
        and remaining is not None
        and view.deadline is not None
        and len(view.pools) == 1
        and view.pools[0].pool == current.pool
        and _usable_spot(view.pools[0], view.price_cap)
    ):
        # The one pool there is, still with capacity: nothing to compare (the full
        # ranking below would keep it too; this is the common case, kept cheap).
        return Spot(
            current.pool,
            max_price_for(view.pools[0], view.price_cap),
            "keep the running spot instance",
        )
    no_volume = view.volume_az is None
    if view.volume_az is None:
        home = _first_home(view, now, tuning)
        if home is not None:
            # The first start creates the volume at home, as if it were already there.
            view = replace(view, volume_az=home)
    ranked = _rank_spot_pools(view, now, remaining, tuning, no_volume)
    on_demand = _on_demand_quote(view)
    od_fallbacks = _fallbacks(sorted(view.pools, key=lambda q: q.on_demand_price), on_demand.pool)

    if remaining is None or view.deadline is None:
        ranked = [r for r in ranked if not r.moves or _move_pays(view, r, None, now, tuning)]
        return _price_only(view, now, ranked, on_demand, od_fallbacks)

    d = view.restart_overhead_hours
    left = (view.deadline - now) / SECONDS_PER_HOUR
    on_od_now = current is not None and current.market is Market.ON_DEMAND
    on_spot_now = current is not None and current.market is Market.SPOT
    if on_od_now and not ranked:
        return OnDemand(on_demand.pool, "keep on-demand until spot pays again", od_fallbacks)
    # Raw slack: time left minus work left. Starting on-demand costs d of it.
    slack = left - remaining
    if on_od_now and current is not None:
        od_startup = max(0.0, current.startup_hours - (now - current.started_at) / 3600.0)
    else:
        od_startup = d
    home_quote = _home_quote(view, ranked)
    home_rate = next((r.rate for r in ranked if r.quote is home_quote), None)
    share = _reserve_share(view, home_quote, now, tuning, home_rate)
    reserve = share * left
    excess = slack - reserve
    ranked = [
        r
        for r in ranked
        if not r.moves or _move_pays(view, r, remaining, now, tuning, excess, share)
    ]
    spot_fallbacks = [r.quote for r in ranked]

    # Riding a spot instance that still has capacity costs no slack: keep it, unless
    # another pool is so much cheaper that moving pays (price-driven moves only).
    if on_spot_now and current is not None:
        mine = next((r for r in ranked if r.quote.pool == current.pool), None)
        if mine is not None:
            best = ranked[0]
            if best is mine or best.cost_per_progress_hour >= 0.8 * mine.cost_per_progress_hour:
                return Spot(
                    current.pool,
                    max_price_for(mine.quote, view.price_cap),
                    "keep the running spot instance",
                    _fallbacks(spot_fallbacks, current.pool),
                )

    if ranked:
        best = ranked[0]
        # After this start, a preemption must still leave time to finish on-demand.
        safe = slack - best.startup_hours - d >= 0.0
        if safe and not on_od_now and _wait_for_home(view, best, excess, now, tuning):
            return Wait(
                now + view.recheck_hours * SECONDS_PER_HOUR,
                "spot only in another AZ: wait a move's worth of time for it here",
            )
        if safe and not on_od_now:
            return Spot(
                best.quote.pool,
                max_price_for(best.quote, view.price_cap),
                "spot has capacity and the deadline can absorb a restart",
                _fallbacks(spot_fallbacks, best.quote.pool),
            )
        if safe and on_od_now and _leave_on_demand(view, best, excess, now, tuning):
            return Spot(
                best.quote.pool,
                max_price_for(best.quote, view.price_cap),
                "ahead of schedule: leave on-demand for spot",
                _fallbacks(spot_fallbacks, best.quote.pool),
            )

    if on_od_now:
        return OnDemand(on_demand.pool, "keep on-demand until spot pays again", od_fallbacks)

    # Idle (or just preempted): wait while ahead of the reserve and one more recheck
    # still leaves time to start on-demand and finish.
    can_wait = slack - view.recheck_hours - od_startup >= 0.0
    if excess >= tuning.cushion_hours and can_wait:
        wait_hours = min(max(excess, 0.0), slack - od_startup - view.recheck_hours)
        until = now + max(view.recheck_hours, wait_hours) * SECONDS_PER_HOUR
        return Wait(until, "no spot now; slack allows waiting for it")
    return OnDemand(on_demand.pool, "no spot now and the deadline needs progress", od_fallbacks)


def _reserve_share(
    view: PlacementView,
    quote: PoolQuote | None,
    now: float,
    tuning: Tuning,
    rate: float | None = None,
) -> float:
    """Share of the time left to keep as slack.

    Uniform Progress keeps slack0 / window: it expects spot for W / window of the time
    left. We keep less when the pool's recent availability says spot will carry more
    of the work, and less again when few restarts are to be paid for: slack is spent
    on restarts (a restart's worth per interruption; a move prices its own slack)
    and on waiting; the reserve is what the interruptions expected in the time left
    will cost, times ``restart_reserve_factor``, but never below ``reserve_floor`` of
    Uniform Progress's share (waiting out outages is what slack buys) nor above it.
    """
    uniform = 0.0
    if view.job_started_at is not None and view.deadline is not None:
        window = (view.deadline - view.job_started_at) / SECONDS_PER_HOUR
        if window > 0.0 and view.total_work_hours is not None:
            uniform = max(0.0, 1.0 - view.total_work_hours / window)
    if quote is None:
        return tuning.reserve_factor * uniform
    if rate is None:
        rate = interruption_rate(quote, now, view.history_since, tuning)
    share = uniform
    if quote.recent_availability is not None:
        expected = quote.recent_availability * (1.0 - rate * view.restart_overhead_hours)
        expected = min(1.0, max(0.0, expected * tuning.availability_trust))
        # Spot rarer than the uniform schedule needs: that schedule is still the one to
        # keep (a stricter one could not be caught up with); richer: wait for it more.
        share = tuning.uniform_weight * uniform + (1.0 - tuning.uniform_weight) * min(
            uniform, 1.0 - expected
        )
    if tuning.restart_reserve_factor >= 0.0:
        restarts = tuning.restart_reserve_factor * rate * view.restart_overhead_hours
        share = min(share, max(tuning.reserve_floor * uniform, restarts))
    return tuning.reserve_factor * share


def _move_pays(
    view: PlacementView,
    ranked: _Ranked,
    remaining: float | None,
    now: float,
    tuning: Tuning,
    excess: float = math.inf,
    share: float = 0.0,
) -> bool:
    """Whether the spot time a move is expected to buy pays for the move.

    Gain: each hour of spot saves the on-demand price less the spot price; how many
    hours, the target pool's spell record says (:func:`expected_spot_hours`), never
    more than the work left; when home has spot too, each hour saves only the
    difference in spot prices. A move out of a home with more capacity, or, when
    neither zone's share of time with spot is known, a move for want of spot at
    home, is an excursion: it buys spot only until home has it again (the home's
    outage record, :func:`expected_outage_hours`), and pays ``excursion_trips`` moves
    (out and back). Cost: the move's startup (restart plus volume move) is billed without
    progress and spends as much slack, which a later outage buys back on on-demand,
    so it costs its hours at the on-demand price. Slack the move takes from below
    the reserve is dearer: behind the reserve, the policy earns slack back at
    ``share`` hours per hour, on on-demand where it would have waited or ridden
    short spells of spot, so each such hour costs 1 / share hours at the on-demand
    premium; but only in home's outages (the share of the recent past home had no
    spot, when known): while home has spot the job rides it or could, behind the
    reserve as ahead of it.
    """
    quote = ranked.quote
    spot = quote.spot_price if quote.spot_price is not None else quote.on_demand_price
    premium = quote.on_demand_price - spot
    hours = ranked.spot_hours
    if remaining is not None:
        hours = min(hours, remaining)
    trips = 1.0
    home = next((q for q in view.pools if q.pool.az == view.volume_az), None)
    # Spot at home younger than on-demand would be left for is no spot yet: it is as
    # likely as not to flicker out, and a home that flickers is a home in an outage.
    useful = tuning.leave_on_demand_min_age_restarts * view.restart_overhead_hours
    home_has_spot = (
        home is not None
        and _usable_spot(home, view.price_cap)
        and (home.capacity_changed_at is None or _age(home, now) >= useful)
    )
    if home is not None and (
        (
            home.recent_availability is not None
            and (quote.recent_availability or 0.0) < home.recent_availability
        )
        # Nobody knows how often either zone has spot: leaving home for want of spot
        # is a trip out and back too, or any zone not yet seen failing looks better.
        or (
            home.recent_availability is None
            and quote.recent_availability is None
            and not home_has_spot
        )
    ):
        trips = tuning.excursion_trips
        if not home_has_spot:
            # An excursion buys spot only until home has it again.
            # Only a shared record (one with a share of time with spot) is the
            # capacity timeline; a lone job's own spells start when it did and its
            # outages run until it next tried, so its short spells are no flickers.
            shared = home.recent_availability is not None
            outage = expected_outage_hours(
                home, now, view.history_since, tuning, useful if shared else 0.0
            )
            hours = min(hours, outage)
    if home_has_spot and home is not None and home.spot_price is not None:
        # Home has spot too: the move saves only the difference in spot prices.
        premium = min(premium, home.spot_price - spot)
    # The trip out costs its startup; each further trip (the way back) a move.
    move = view.restart_overhead_hours + view.migration_overhead_hours
    cost = quote.on_demand_price * (ranked.startup_hours + (trips - 1.0) * move)
    if share > 0.0:
        extra = ranked.startup_hours - view.restart_overhead_hours
        extra += (trips - 1.0) * view.migration_overhead_hours
        outage_share = 1.0
        if home is not None and home.recent_availability is not None:
            outage_share = 1.0 - home.recent_availability
        cost += outage_share * max(0.0, extra - max(0.0, excess)) / share * premium
    return premium * hours >= cost


def _wait_for_home(
    view: PlacementView, best: _Ranked, excess: float, now: float, tuning: Tuning
) -> bool:
    """Ski rental: before paying a move, wait as long as the move costs for home spot."""
    if view.volume_az is None or best.quote.pool.az == view.volume_az:
        return False
    if excess < tuning.cushion_hours:
        return False
    left = (view.deadline - now) / SECONDS_PER_HOUR if view.deadline is not None else math.inf
    remaining = (view.total_work_hours or 0.0) - view.work_done_hours
    if left - remaining - view.recheck_hours - view.restart_overhead_hours < 0.0:
        return False
    for q in view.pools:
        if q.pool.az != view.volume_az or q.capacity_changed_at is None:
            continue
        outage = (now - q.capacity_changed_at) / SECONDS_PER_HOUR
        if outage < tuning.home_wait_moves * view.migration_overhead_hours:
            return True
    return False


def _leave_on_demand(
    view: PlacementView, best: _Ranked, excess: float, now: float, tuning: Tuning
) -> bool:
    """Leave a safe on-demand instance for spot only when the trip is likely to pay."""
    d = view.restart_overhead_hours
    need = tuning.leave_on_demand_restarts * d + best.startup_hours - d
    if excess < need and not _spell_pays_behind(view, best, need - excess, tuning):
        return False
    since = best.quote.capacity_changed_at
    if since is None:
        # No record of when spot came back (the job's own record saw the outage
        # begin, not end): its age is unknown, not zero, or on-demand would be
        # held to the end whenever nobody watched the pool.
        return True
    age = (now - since) / SECONDS_PER_HOUR
    # The tick about to start counts: spot seen now is spot for at least that long.
    return age + view.recheck_hours + 1e-9 >= tuning.leave_on_demand_min_age_restarts * d


def _spell_pays_behind(view: PlacementView, best: _Ranked, deficit: float, tuning: Tuning) -> bool:
    """Behind the reserve by ``deficit`` hours, leave on-demand only for a long spell.

    On on-demand the reserve's deficit is earned back only slowly (at the reserve's
    share of each hour), and riding spot earns it back just as fast, so holding
    on-demand through a long spell of spot pays the on-demand premium for nothing.
    What the trip risks is slack: two restarts (the start, and the way back to
    on-demand after the preemption), lost if the spell ends early, on top of the
    deficit already owed. The trip is taken when the pool's spell record
    (:func:`expected_spot_hours`, counting the spell's age) expects spot to last
    ``leave_behind_spell_factor`` times the restarts (the median spell is as likely
    shorter: the margin is for what the trip can lose), plus the deficit once (owed
    whether or not the trip is taken, so it needs no margin; a spell shorter than
    it leaves the job deeper behind than the deficit it started with). Never a
    move: moves price their own slack.
    """
    factor = tuning.leave_behind_spell_factor
    if factor < 0.0 or best.moves:
        return False
    restarts = 2.0 * view.restart_overhead_hours
    return best.spot_hours >= factor * restarts + max(0.0, deficit)


def _first_home(view: PlacementView, now: float, tuning: Tuning) -> str | None:
    """Where the job's volume goes: the AZ spot has been in most by the recent record.

    When that AZ has no spot this minute and the slack cannot pay for waiting for it
    (not ahead of the reserve by the cushion), the AZ with spot that it has been in
    most: the first start creates the volume where it runs, so spot in any AZ is
    free of a move then, while the home without spot would be waited for on
    on-demand.
    """
    known = [q for q in view.pools if q.recent_availability is not None]
    if len({q.pool.az for q in view.pools}) < 2 or not known:
        return None
    home = max(known, key=lambda q: (q.recent_availability or 0.0, q.spot_available))
    with_spot = [q for q in known if _usable_spot(q, view.price_cap)]
    if _usable_spot(home, view.price_cap) or not with_spot:
        return home.pool.az
    if view.total_work_hours is not None and view.deadline is not None:
        left = (view.deadline - now) / SECONDS_PER_HOUR
        slack = left - max(0.0, view.total_work_hours - view.work_done_hours)
        excess = slack - _reserve_share(view, home, now, tuning) * left
        if excess >= tuning.cushion_hours:
            return home.pool.az
    return max(with_spot, key=lambda q: q.recent_availability or 0.0).pool.az


def _home_quote(view: PlacementView, ranked: list[_Ranked]) -> PoolQuote | None:
    """The pool whose history predicts our future: the volume's (or the best) pool."""
    for q in view.pools:
        if view.volume_az is not None and q.pool.az == view.volume_az:
            return q
    return ranked[0].quote if ranked else (view.pools[0] if view.pools else None)


def _price_only(
    view: PlacementView,
    now: float,
    ranked: list[_Ranked],
    on_demand: PoolQuote,
    od_fallbacks: tuple[Pool, ...],
) -> Placement:
    """No work estimate or no deadline: cheapest expected spot, else wait a bounded time."""
    if ranked:
        best = ranked[0]
        return Spot(
            best.quote.pool,
            max_price_for(best.quote, view.price_cap),
            "cheapest expected cost per hour of progress",
            _fallbacks([r.quote for r in ranked], best.quote.pool),
        )
    return OnDemand(
        on_demand.pool,
        "no spot capacity and no schedule to wait on: never wait unbounded",
        od_fallbacks,
    )
