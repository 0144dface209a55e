"""Where to launch: the job's view for the policy, and its answer as candidate pools.

The choice itself is :func:`chalicelib.policy.decide_placement`, the same function
``spotctl simulate`` scores on real availability traces. This module only translates:
the job record and the observed spot prices into a ``PlacementView``, and the
policy's ``Spot`` / ``OnDemand`` / ``Wait`` into the ordered candidates of an attempt
(each with its ClientToken) or a time to wait until.

Each pool's quote carries the history the job's own record holds about spot there
(:class:`PoolHistory`), in the terms the simulator records from its traces: the
interruptions, the spells of spot capacity (a spot attempt's run until its
interruption), the outages (from an interruption or a capacity refusal until spot
next ran there) and when the current spell or outage began. The record sees a pool
only while the job runs or asks for spot there, so the share of recent time spot was
available (``recent_availability``) is not known and is left out.

Once the job has a volume, the pools of every zone are offered when the volume can
move (see :func:`zones_offered`), the policy pricing the move by
``policy.migration_overhead_hours``; a chosen pool in another zone makes the
reconciler move the volume there (snapshot and restore) before it launches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple

from chalicelib import policy
from chalicelib.models import (
    ENDED_INTERRUPTED,
    ENDED_RECLAIMED,
    Attempt,
    Candidate,
    Job,
    Pool,
)
from chalicelib.pricing import ON_DEMAND_USD_PER_HOUR

# What an instance start costs before the workload makes progress again: boot, agent,
# volume attach, checkpoint load. An estimate (EC2 GPU instances boot in 1-3 min;
# the rest depends on the workload), used by the deadline arithmetic.
RESTART_OVERHEAD_HOURS = 0.1
# A pool that refused capacity this recently is believed to have none.
CAPACITY_MEMORY_SECONDS = 240.0
# After a failed move (snapshot or restore), stay in the volume's zone this long.
MOVE_RETRY_AFTER_SECONDS = 3600.0
_HOUR = 3600.0


@dataclass(frozen=True)
class Plan:
    candidates: tuple[Candidate, ...]  # empty: wait
    reason: str
    wait_until: float | None = None


def on_demand_price_of(job: Job, instance_type: str) -> float:
    price = ON_DEMAND_USD_PER_HOUR.get(instance_type)
    return price if price is not None else float(job.spec.max_price_per_hour or 0.0)


def work_done_hours(job: Job, now: float) -> float:
    """Progress estimate: hours billed on instances, less each start's overhead."""
    return sum(
        max(0.0, a.billed_hours(now) - RESTART_OVERHEAD_HOURS)
        for a in job.attempts
        if a.instance_id is not None
    )


# Refusals that say the pool had no spot capacity (an outage), as opposed to account
# limits, a type not offered in the zone, or a max price below the spot price.
_OUTAGE_CODES = frozenset(
    {"InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity"}
)


@dataclass(frozen=True)
class PoolHistory:
    """What the job's own record says about spot capacity in one pool.

    The facts ``spotctl simulate`` records from its traces, in the same units (hours)
    and order (oldest first), from what this job saw:

    - a spell is a spot attempt's run in the pool, from its start (``running_at``, or
      ``requested_at`` when never seen running, as ``Attempt.billed_hours``) to its
      interruption (``warned_at``, else ``ended_at``: the instant recorded in
      ``interruptions``). An attempt warned but not yet ended is interrupted: the
      warning is the interruption the replacement is planned for;
    - an outage runs from an interruption, or the first capacity refusal of a spot
      launch since spot last ran in the pool, until a spot instance next starts there;
    - ``changed_at`` is when the pool's last known state (``up``) began: the start of
      a live spot attempt (the current spell; its age is ``now - changed_at``) or the
      start of an outage not yet over by the record.

    Spells are shorter than the capacity's (it was there before we launched) and
    outages longer (spot may have come back before we looked): the record sees the
    pool only while the job uses or asks for it. A spot attempt that ended otherwise
    (stopped, completed, cancelled) ends what the record knows: ``up`` is None.
    """

    interruptions: tuple[policy.Interruption, ...] = ()
    spell_hours: tuple[float, ...] = ()
    outage_hours: tuple[float, ...] = ()
    up: bool | None = None  # True: spot runs here now; False: in an outage; None: unknown
    changed_at: float | None = None  # epoch s ``up`` began

    def capacity_changed_at(self, available: bool) -> float | None:
        """``changed_at`` when the record agrees with what is believed now, else None.

        Spot believed available after a recorded outage came back at a time the
        record does not know, so its age is unknown (0 to the policy), not the
        outage's.
        """
        return self.changed_at if self.up is available else None


def _interrupted_at(attempt: Attempt) -> float | None:
    """When spot capacity was taken from ``attempt``, or None if it was not."""
    if attempt.end_reason in (ENDED_INTERRUPTED, ENDED_RECLAIMED):
        return attempt.warned_at or attempt.ended_at or attempt.requested_at
    if attempt.end_reason is None and attempt.warned_at is not None:
        return attempt.warned_at  # warned, still in its notice: the replacement's cause
    return None


class _Event(NamedTuple):
    at: float
    kind: int  # _WENT, _LEFT, _REFUSED or _CAME: the order of events at one instant
    start: float = 0.0  # _WENT: when the interrupted spell began
    max_price: float | None = None  # _WENT: the interrupted instance's


_WENT, _LEFT, _REFUSED, _CAME = 0, 1, 2, 3


def _when(event: _Event) -> tuple[float, int]:
    return event.at, event.kind


def pool_histories(job: Job) -> dict[Pool, PoolHistory]:
    """Each pool's :class:`PoolHistory`; pools the job never ran spot in nor asked for
    spot in are absent (an empty record)."""
    events: dict[Pool, list[_Event]] = {}
    for a in job.attempts:
        if a.market != "spot" or a.pool is None or a.instance_id is None:
            continue
        start = a.running_at if a.running_at is not None else a.requested_at
        went = _interrupted_at(a)
        found = events.setdefault(a.pool, [])
        if went is not None:
            start = min(start, went)
            found.append(_Event(went, _WENT, start, a.max_price))
        elif a.ended:
            found.append(_Event(max(start, a.ended_at or start), _LEFT))
        found.append(_Event(start, _CAME))
    spot_asks = {
        (a.number, str(c.pool)): c.pool
        for a in job.attempts
        for c in a.candidates
        if c.market == "spot"
    }
    for e in job.timeline:
        if e.kind != "launch-refused" or e.attempt is None:
            continue
        name, _, error = e.detail.partition(": ")
        pool = spot_asks.get((e.attempt, name))
        if pool is not None and error.split(":", 1)[0] in _OUTAGE_CODES:
            events.setdefault(pool, []).append(_Event(e.at, _REFUSED))
    return {pool: _history(sorted(found, key=_when)) for pool, found in events.items()}


def _history(events: list[_Event]) -> PoolHistory:
    """Replay one pool's events, oldest first, as the simulator replays its trace."""
    interruptions: list[policy.Interruption] = []
    spells: list[float] = []
    outages: list[float] = []
    up: bool | None = None
    changed_at: float | None = None
    for e in events:
        if e.kind == _CAME:
            if up is False and changed_at is not None:
                outages.append((e.at - changed_at) / _HOUR)
            up, changed_at = True, e.at
        elif e.kind == _WENT:
            cause = policy.InterruptionCause.CAPACITY
            interruptions.append(policy.Interruption(e.at, cause, e.max_price))
            spells.append((e.at - e.start) / _HOUR)
            up, changed_at = False, e.at
        elif e.kind == _LEFT:
            up, changed_at = None, None  # we ended it: the record stops knowing
        elif up is None:
            # A refusal starts an outage, unless one is already on or our spot runs.
            up, changed_at = False, e.at
    return PoolHistory(tuple(interruptions), tuple(spells), tuple(outages), up, changed_at)


def _recently_refused(job: Job, pool: Pool, now: float) -> bool:
    return any(
        event.kind == "launch-refused"
        and event.detail.startswith(f"{pool}:")
        and now - event.at < CAPACITY_MEMORY_SECONDS
        for event in job.timeline
    )


def _with_causes(
    interruptions: tuple[policy.Interruption, ...], spot_price: float | None
) -> tuple[policy.Interruption, ...]:
    """The interruptions, those of instances bid below today's spot price marked as
    caused by price: the warning does not say why, but a spot price above an
    instance's max price is reason enough for EC2 to take it back, and the policy then
    bids higher (up to the job's cap) instead of waiting for capacity that is there."""
    if spot_price is None:
        return interruptions
    return tuple(
        replace(i, cause=policy.InterruptionCause.PRICE)
        if i.max_price is not None and spot_price > i.max_price
        else i
        for i in interruptions
    )


def _quote(
    job: Job,
    pool: Pool,
    prices: Mapping[Pool, float],
    histories: Mapping[Pool, PoolHistory],
    now: float,
) -> policy.PoolQuote:
    history = histories.get(pool, PoolHistory())
    available = not _recently_refused(job, pool, now)
    spot_price = prices.get(pool)
    return policy.PoolQuote(
        pool=policy.Pool(pool.instance_type, pool.az),
        on_demand_price=on_demand_price_of(job, pool.instance_type),
        spot_price=spot_price,
        interruptions=_with_causes(history.interruptions, spot_price),
        spot_available=available,
        capacity_changed_at=history.capacity_changed_at(available and spot_price is not None),
        # Not from the record: it sees a pool only while the job runs or asks there.
        recent_availability=None,
        spell_hours=history.spell_hours,
        outage_hours=history.outage_hours,
    )


def can_move(job: Job, now: float) -> bool:
    """Whether the job's volume may move to another zone now.

    Only a volume spotctl created (a user's own volume stays where the user put it),
    not while a move is under way, and not soon after a move failed.
    """
    volume = job.volume
    return (
        volume is not None
        and volume.created_by_spotctl
        and job.move is None
        and not any(
            e.kind == "move-failed" and now - e.at < MOVE_RETRY_AFTER_SECONDS for e in job.timeline
        )
    )


def zones_offered(job: Job, movable: bool) -> list[str] | None:
    """The zones whose pools the policy is offered (None: every zone EC2 offers)."""
    if job.volume is not None and not movable:
        return [job.volume.az]
    return list(job.spec.availability_zones) if job.spec.availability_zones else None


def placement_view(
    job: Job, prices: Mapping[Pool, float], now: float, movable: bool = False
) -> policy.PlacementView:
    spec = job.spec
    zone = job.volume.az if job.volume is not None else None
    offered_zones = zones_offered(job, movable)
    zones = set(offered_zones or ())
    offered = {pool.az for pool in prices if pool.instance_type in spec.instance_types}
    if not zones:
        zones = offered
    histories = pool_histories(job)
    quotes = tuple(
        _quote(job, Pool(instance_type=instance_type, az=az), prices, histories, now)
        for az in sorted(zones)
        for instance_type in spec.instance_types
    )
    return policy.PlacementView(
        work_done_hours=work_done_hours(job, now),
        total_work_hours=spec.expected_hours,
        deadline=spec.deadline.timestamp() if spec.deadline is not None else None,
        restart_overhead_hours=RESTART_OVERHEAD_HOURS,
        migration_overhead_hours=policy.migration_overhead_hours(spec.volume_gib or 0),
        price_cap=spec.max_price_per_hour,
        current=None,  # asked only when no instance runs for the job
        volume_az=zone,
        pools=quotes,
        recheck_hours=1.0 / 60.0,  # the sweep runs every minute
        history_since=job.created_at,
        job_started_at=job.created_at,
    )


def plan(
    job: Job, prices: Mapping[Pool, float], now: float, attempt: int, movable: bool = False
) -> Plan:
    """The candidates of attempt number ``attempt``, or when to look again.

    With ``movable`` the candidates may be in another zone than the job's volume.
    """
    view = placement_view(job, prices, now, movable)
    choice = policy.decide_placement(view, now)
    if isinstance(choice, policy.Wait):
        return Plan((), choice.reason, choice.until)
    chosen = choice.pool
    # The volume is created (or already lives) in the chosen pool's zone: every
    # fallback must be there too.
    same_zone = [p for p in (chosen, *choice.fallbacks) if p.az == chosen.az]
    quotes = {q.pool: q for q in view.pools}
    candidates: list[Candidate] = []
    for pool in same_zone:
        quote = quotes[pool]
        if isinstance(choice, policy.Spot):
            if quote.spot_price is None or not quote.spot_available:
                continue
            max_price = policy.max_price_for(quote, view.price_cap)
            if quote.spot_price > max_price:
                continue
            market, expected = "spot", quote.spot_price
        else:
            if view.price_cap is not None and quote.on_demand_price > view.price_cap:
                continue
            market, expected, max_price = "on-demand", quote.on_demand_price, None
        candidates.append(
            Candidate(
                pool=Pool(instance_type=pool.instance_type, az=pool.az),
                market=market,
                max_price=max_price,
                expected_price=expected,
                client_token=f"{job.job_id}-{attempt}-{len(candidates)}",
            )
        )
    if not candidates:
        return Plan((), f"{choice.reason}; but no pool fits the price cap", now + 300.0)
    first = candidates[0]
    return Plan(tuple(candidates), f"{first.market} in {first.pool}: {choice.reason}")
