"""Where to launch: the job's view for the policy, and its answer as candidate pools.

The choice itself is :func:`chalicelib.policy.decide_placement`, the same function
``spotctl simulate`` scores on real availability traces. This module only translates:
the job record and the observed spot prices into a ``PlacementView``, and the
policy's ``Spot`` / ``OnDemand`` / ``Wait`` into the ordered candidates of an attempt
(each with its ClientToken) or a time to wait until. For a job running on on-demand
the policy is also asked, with its run described, whether to leave it for spot
(:func:`leave_on_demand`).

Each pool's quote carries the history of spot there (:class:`PoolHistory`), in the
terms the simulator records from its traces: the interruptions, the spells of spot
capacity (our spot instances' runs there until an interruption), the outages (from
an interruption or a capacity refusal until spot next ran there), when the current
spell or outage began, and the share of the last ``Tuning.history_window_hours``
that spot was known up (``recent_availability``). The history merges the job's own
record with the pool's fleet record (``chalicelib.fleet``: what every job saw there,
as :class:`CapacityObservation`), each fact once: an instance's facts by its id, and
the interruptions of one reclaim (within ``RECLAIM_WINDOW_SECONDS``) as one capacity
loss. Without the fleet record (not looked up, or unreadable), or when it holds only
what the job saw itself, the job's own record alone is used, which sees a pool only
while the job runs or asks for spot there, and ``recent_availability`` is left out.

Once the job has a volume, the pools of every zone are offered when the volume can
move (see :func:`zones_offered`), the policy pricing the move by
``policy.migration_overhead_hours``; a chosen pool in another zone makes the
reconciler move the volume there (snapshot and restore) before it launches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
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
# Leaving on-demand tries spot, which EC2 may refuse: each refusal of the job's in a
# pool since it last ran spot there doubles how long that pool's refusal bars another
# try (from CAPACITY_MEMORY_SECONDS), up to this. Without it a long outage would bounce
# the job between on-demand and refused spot every few minutes, two restarts a time.
LEAVE_BACKOFF_MAX_SECONDS = 3600.0
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


class Seen(StrEnum):
    """What a capacity observation says happened in a pool."""

    STARTED = "started"  # a spot instance of ours was seen running there
    LAUNCHED = "launched"  # ... launched, not yet seen running: the job's own, not shared
    INTERRUPTED = "interrupted"  # EC2 took one back (warned, or found gone unwarned)
    LEFT = "left"  # we ended one (stopped, completed, cancelled): its spell tells nothing
    REFUSED = "refused"  # a spot launch there was refused for want of capacity


@dataclass(frozen=True)
class CapacityObservation:
    """One fact about spot capacity in a pool, from one job's record.

    What :func:`pool_histories` replays, and what the fleet record of the pool
    (``chalicelib.fleet``) shares with every other job. ``key`` names the fact, not
    its details: recording it again (a retried pass, two Lambdas seeing one event)
    finds the key and changes nothing.
    """

    seen: Seen
    # STARTED, LAUNCHED: the run's start; INTERRUPTED: the warning (else the end); LEFT:
    # the end; REFUSED: the refusal.
    at: float
    job_id: str
    instance_id: str | None = None  # all but REFUSED
    started_at: float | None = None  # INTERRUPTED, LEFT: when the instance's run began
    max_price: float | None = None  # INTERRUPTED: the instance's
    attempt: int | None = None  # REFUSED: the attempt whose launch was refused

    @property
    def key(self) -> str:
        if self.seen is Seen.REFUSED:
            return f"{self.seen}#{self.job_id}#{self.attempt}#{self.at:.3f}"
        return f"{self.seen}#{self.instance_id}"


# Interruptions of several instances of a pool this close together are one reclaim
# (EC2 warns them all within the two-minute notice): one capacity loss, not N.
RECLAIM_WINDOW_SECONDS = 120.0
# recent_availability is given only when the record knows the pool's state this long
# within the window (Tuning.history_window_hours).
MIN_KNOWN_SECONDS = 3600.0


@dataclass(frozen=True)
class PoolHistory:
    """What the records say about spot capacity in one pool.

    The facts ``spotctl simulate`` records from its traces, in the same units (hours)
    and order (oldest first), from the job's own record and, when looked up, the
    pool's fleet record (what other jobs saw there):

    - a spell is a time spot capacity was known up in the pool (one of our spot
      instances ran there: their union) until an interruption. An instance's run
      starts at ``running_at``, or ``requested_at`` when never seen running (as
      ``Attempt.billed_hours``), and ends at its interruption (``warned_at``, else
      ``ended_at``: the instant recorded in ``interruptions``). An attempt warned but
      not yet ended is interrupted: the warning is the interruption the replacement is
      planned for. Interruptions within ``RECLAIM_WINDOW_SECONDS`` of the first of
      them are one reclaim: one interruption, one spell ended;
    - an outage runs from an interruption that left no instance of ours in the pool,
      or the first capacity refusal of a spot launch since spot last ran there, until
      a spot instance next starts there;
    - ``changed_at`` is when the pool's last known state (``up``) began: the start of
      the current spell (its age is ``now - changed_at``) or of an outage not yet over
      by the record.

    Spells are shorter than the capacity's (it was there before we launched) and
    outages longer (spot may have come back before we looked): the records see the
    pool only while a job uses or asks for it. When the last of our spot instances
    there ended otherwise (stopped, completed, cancelled), the records stop knowing:
    ``up`` is None.
    """

    interruptions: tuple[policy.Interruption, ...] = ()
    spell_hours: tuple[float, ...] = ()
    outage_hours: tuple[float, ...] = ()
    up: bool | None = None  # True: spot runs here now; False: in an outage; None: unknown
    changed_at: float | None = None  # epoch s ``up`` began
    refused_at: float | None = None  # the last capacity refusal since spot last started
    # Each change of ``up`` (epoch s, new state), oldest first: what the share of
    # recent time with capacity is measured on.
    states: tuple[tuple[float, bool | None], ...] = ()
    # Other jobs' observations are in it: it is not only what the job saw while it
    # used the pool (then the share of recent time would only be the job's own luck).
    shared: bool = False

    def capacity_changed_at(self, available: bool) -> float | None:
        """``changed_at`` when the record agrees with what is believed now, else None.

        Spot believed available after a recorded outage came back at a time the
        record does not know, so its age is unknown (0 to the policy), not the
        outage's.
        """
        return self.changed_at if self.up is available else None

    def recent_availability(self, now: float) -> float | None:
        """The share of the known time in the window with spot capacity up, or None
        when less than ``MIN_KNOWN_SECONDS`` of the window is known.

        A spell still on is known up until now. An outage still on is known down only
        while it is believed (``CAPACITY_MEMORY_SECONDS`` from the last time spot was
        found missing): a pool nobody has tried since is unknown, not down, or it
        would never be tried again.
        """
        window_start = now - policy.DEFAULT_TUNING.history_window_hours * _HOUR
        known = up = 0.0
        for index, (begin, state) in enumerate(self.states):
            last = index == len(self.states) - 1
            end = now if last else self.states[index + 1][0]
            if state is None:
                continue
            if state is False and last:
                last_seen = max(begin, self.refused_at or begin)
                end = min(end, last_seen + CAPACITY_MEMORY_SECONDS)
            span = max(0.0, min(end, now) - max(begin, window_start))
            known += span
            up += span if state else 0.0
        return up / known if known >= MIN_KNOWN_SECONDS else None


def _interrupted_at(attempt: Attempt) -> float | None:
    """When spot capacity was taken from ``attempt``, or None if it was not."""
    if attempt.end_reason in (ENDED_INTERRUPTED, ENDED_RECLAIMED):
        return attempt.warned_at or attempt.ended_at or attempt.requested_at
    if attempt.end_reason is None and attempt.warned_at is not None:
        return attempt.warned_at  # warned, still in its notice: the replacement's cause
    return None


def capacity_observations(job: Job) -> dict[Pool, list[CapacityObservation]]:
    """What the job's record says about spot capacity, by pool; pools the job never
    ran spot in nor asked for spot in are absent."""
    found: dict[Pool, list[CapacityObservation]] = {}
    for a in job.attempts:
        if a.market != "spot" or a.pool is None or a.instance_id is None:
            continue
        start = a.running_at if a.running_at is not None else a.requested_at
        went = _interrupted_at(a)
        seen = found.setdefault(a.pool, [])
        iid = a.instance_id
        if went is not None:
            start = min(start, went)
            seen.append(
                CapacityObservation(
                    Seen.INTERRUPTED, went, job.job_id, iid, started_at=start, max_price=a.max_price
                )
            )
        elif a.ended:
            end = max(start, a.ended_at or start)
            seen.append(CapacityObservation(Seen.LEFT, end, job.job_id, iid, started_at=start))
        if a.running_at is not None:
            seen.append(CapacityObservation(Seen.STARTED, start, job.job_id, iid))
        elif went is None and not a.ended:
            seen.append(CapacityObservation(Seen.LAUNCHED, start, job.job_id, iid))
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
            refusal = CapacityObservation(Seen.REFUSED, e.at, job.job_id, attempt=e.attempt)
            found.setdefault(pool, []).append(refusal)
    return found


def new_observations(read: Job, saved: Job) -> dict[Pool, list[CapacityObservation]]:
    """What ``saved`` says about spot capacity that ``read`` did not: what a pass that
    read ``read`` and wrote ``saved`` has to share (nothing, in the steady state)."""
    before = {o.key for found in capacity_observations(read).values() for o in found}
    fresh = {
        pool: [o for o in found if o.key not in before and o.seen is not Seen.LAUNCHED]
        for pool, found in capacity_observations(saved).items()
    }
    return {pool: found for pool, found in fresh.items() if found}


def merged_observations(
    own: Sequence[CapacityObservation], fleet: Sequence[CapacityObservation]
) -> list[CapacityObservation]:
    """The job's own observations of a pool and the fleet's, each fact once.

    The fleet record holds the job's own observations too, as first recorded: for its
    own instances the job's record (newer, or never shared when a write failed) is
    the one kept.
    """
    own_instances = {o.instance_id for o in own if o.instance_id is not None}
    merged: dict[str, CapacityObservation] = {}
    for o in own:
        merged.setdefault(o.key, o)
    for o in fleet:
        if o.instance_id is None or o.instance_id not in own_instances:
            merged.setdefault(o.key, o)
    return list(merged.values())


class _Run(NamedTuple):
    """One spot instance of ours in a pool, as its observations tell it."""

    start: float
    went: float | None  # interrupted at
    left: float | None  # ended otherwise at
    max_price: float | None


def _runs(observations: Sequence[CapacityObservation]) -> dict[str, _Run]:
    runs: dict[str, _Run] = {}
    for o in observations:
        if o.instance_id is None:
            continue
        start = o.at if o.seen in (Seen.STARTED, Seen.LAUNCHED) else o.started_at
        run = runs.get(o.instance_id, _Run(start if start is not None else o.at, None, None, None))
        if start is not None:
            run = run._replace(start=min(run.start, start))
        if o.seen is Seen.INTERRUPTED:
            run = run._replace(went=o.at, max_price=o.max_price)
        elif o.seen is Seen.LEFT:
            run = run._replace(left=o.at)
        runs[o.instance_id] = run
    # An instance found gone unwarned is recorded as reclaimed, at once and for every
    # job; when its workload's exit report comes later, its job records the end as
    # its own, at the same instant. That end explains the loss: no reclaim. (A
    # warning ahead of the end was EC2's: that one stays a reclaim.)
    return {
        iid: run._replace(went=None)
        if run.went is not None and run.left is not None and run.left <= run.went
        else run
        for iid, run in runs.items()
    }


class _Event(NamedTuple):
    at: float
    kind: int  # _WENT, _LEFT, _REFUSED or _CAME: the order of events at one instant
    instances: tuple[str, ...] = ()  # _CAME, _LEFT: the instance; _WENT: the reclaimed
    max_price: float | None = None  # _WENT: the highest of the reclaimed instances'


_WENT, _LEFT, _REFUSED, _CAME = 0, 1, 2, 3


def _when(event: _Event) -> tuple[float, int]:
    return event.at, event.kind


def _events(observations: Sequence[CapacityObservation]) -> list[_Event]:
    """One pool's observations as the events of its history, oldest first."""
    runs = _runs(observations)
    events: list[_Event] = []
    # Interruptions within RECLAIM_WINDOW_SECONDS of the first of them: one reclaim.
    reclaims: list[list[tuple[float, str]]] = []
    for went, iid in sorted((r.went, iid) for iid, r in runs.items() if r.went is not None):
        if reclaims and went - reclaims[-1][0][0] <= RECLAIM_WINDOW_SECONDS:
            reclaims[-1].append((went, iid))
        else:
            reclaims.append([(went, iid)])
    for reclaim in reclaims:
        at = reclaim[0][0]
        prices = [runs[iid].max_price for _, iid in reclaim]
        # A reclaim that took an instance bidding more is not about the lower bids.
        highest = None if None in prices else max(p for p in prices if p is not None)
        events.append(_Event(at, _WENT, tuple(iid for _, iid in reclaim), highest))
        for _, iid in reclaim:
            events.append(_Event(min(runs[iid].start, at), _CAME, (iid,)))
    for iid, run in runs.items():
        if run.went is not None:
            continue
        if run.left is not None:
            events.append(_Event(max(run.start, run.left), _LEFT, (iid,)))
        events.append(_Event(run.start, _CAME, (iid,)))
    events += [_Event(o.at, _REFUSED) for o in observations if o.seen is Seen.REFUSED]
    return sorted(events, key=_when)


def pool_histories(
    job: Job, fleet: Mapping[Pool, Sequence[CapacityObservation]] | None = None
) -> dict[Pool, PoolHistory]:
    """Each pool's :class:`PoolHistory` from the job's record and the pools' fleet
    records; pools no record has seen are absent (an empty record)."""
    own = capacity_observations(job)
    fleet = fleet or {}
    histories = {}
    for pool in {*own, *fleet}:
        merged = merged_observations(own.get(pool, []), fleet.get(pool, ()))
        history = _history(_events(merged))
        histories[pool] = replace(history, shared=any(o.job_id != job.job_id for o in merged))
    return histories


def history_of(observations: Sequence[CapacityObservation]) -> PoolHistory:
    """One pool's :class:`PoolHistory` from its observations alone (``spotctl
    simulate --history own`` replays a job's own record through it)."""
    return _history(_events(observations))


def _history(events: list[_Event]) -> PoolHistory:
    """Replay one pool's events, oldest first, as the simulator replays its trace."""
    interruptions: list[policy.Interruption] = []
    spells: list[float] = []
    outages: list[float] = []
    states: list[tuple[float, bool | None]] = []
    up: bool | None = None
    changed_at: float | None = None
    refused_at: float | None = None
    live: set[str] = set()  # our spot instances running there
    over: set[str] = set()  # ... and those that ended

    def become(state: bool | None, at: float) -> None:
        nonlocal up, changed_at
        if state is not up or not states:
            states.append((at, state))
        up, changed_at = state, (at if state is not None else None)

    for e in events:
        if e.kind == _CAME:
            (iid,) = e.instances
            if iid in over:
                continue  # started the instant it was reclaimed: never up
            if not live:
                if up is False and changed_at is not None:
                    outages.append((e.at - changed_at) / _HOUR)
                become(True, e.at)
            refused_at = None  # capacity was there after the refusal
            live.add(iid)
        elif e.kind == _WENT:
            cause = policy.InterruptionCause.CAPACITY
            interruptions.append(policy.Interruption(e.at, cause, e.max_price))
            began = changed_at if up is True and changed_at is not None else e.at
            spells.append((e.at - began) / _HOUR)
            live.difference_update(e.instances)
            over.update(e.instances)
            # Instances the reclaim spared still run: a new spell begins.
            become(bool(live), e.at)
        elif e.kind == _LEFT:
            (iid,) = e.instances
            live.discard(iid)
            over.add(iid)
            if not live and up is True:
                become(None, e.at)  # we ended it: the record stops knowing
        else:
            refused_at = e.at
            if up is None:
                # A refusal starts an outage, unless one is already on or our spot runs.
                become(False, e.at)
    return PoolHistory(
        tuple(interruptions),
        tuple(spells),
        tuple(outages),
        up,
        changed_at,
        refused_at,
        tuple(states),
    )


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
    # Another job's capacity refusal counts as the job's own, unless spot started
    # there since.
    refused_by_fleet = (
        history.refused_at is not None and now - history.refused_at < CAPACITY_MEMORY_SECONDS
    )
    available = not _recently_refused(job, pool, now) and not refused_by_fleet
    spot_price = prices.get(pool)
    return policy.PoolQuote(
        pool=policy.Pool(pool.instance_type, pool.az),
        on_demand_price=on_demand_price_of(job, pool.instance_type),
        spot_price=spot_price,
        interruptions=_with_causes(history.interruptions, spot_price),
        spot_available=available,
        capacity_changed_at=history.capacity_changed_at(available and spot_price is not None),
        # The job's record alone sees a pool only while the job runs or asks there.
        recent_availability=history.recent_availability(now) if history.shared else None,
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
    job: Job,
    prices: Mapping[Pool, float],
    now: float,
    movable: bool = False,
    fleet: Mapping[Pool, Sequence[CapacityObservation]] | None = None,
    current: policy.CurrentRun | None = None,
) -> policy.PlacementView:
    """The policy's view; ``fleet``: the offered pools' fleet records (None: not
    looked up, the job's own record alone); ``current``: the instance the job runs on
    when the policy is asked whether to keep it (None: none runs, plan a start)."""
    spec = job.spec
    zone = job.volume.az if job.volume is not None else None
    offered_zones = zones_offered(job, movable)
    zones = set(offered_zones or ())
    offered = {pool.az for pool in prices if pool.instance_type in spec.instance_types}
    if not zones:
        zones = offered
    histories = pool_histories(job, fleet)
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
        current=current,
        volume_az=zone,
        pools=quotes,
        recheck_hours=1.0 / 60.0,  # the sweep runs every minute
        history_since=job.created_at,
        job_started_at=job.created_at,
    )


def leave_on_demand(
    job: Job,
    prices: Mapping[Pool, float],
    now: float,
    fleet: Mapping[Pool, Sequence[CapacityObservation]] | None = None,
) -> str | None:
    """The policy's reason to end the job's running on-demand instance and go back
    to spot, or None to keep it.

    Asked only with a deadline and a work estimate (the policy judges "ahead of
    schedule" by both) and only once the job has a volume. Only the pools of the
    volume's zone are offered: the instance holds the volume, so no move. The
    instance is described as it runs (started when first seen running, its restart
    overhead counted from then), as the simulator describes its current run.
    """
    current = job.current
    spec = job.spec
    if (
        current is None
        or current.ended
        or current.market != "on-demand"
        or current.pool is None
        or job.volume is None
        or spec.deadline is None
        or spec.expected_hours is None
    ):
        return None
    run = policy.CurrentRun(
        pool=policy.Pool(current.pool.instance_type, current.pool.az),
        market=policy.Market.ON_DEMAND,
        started_at=current.running_at if current.running_at is not None else current.requested_at,
        startup_hours=RESTART_OVERHEAD_HOURS,
    )
    view = placement_view(job, prices, now, movable=False, fleet=fleet, current=run)
    choice = policy.decide_placement(view, now)
    if not isinstance(choice, policy.Spot):
        return None
    pool = Pool(instance_type=choice.pool.instance_type, az=choice.pool.az)
    if now < leave_backoff_until(job, pool):
        return None
    return choice.reason


def leave_backoff_until(job: Job, pool: Pool) -> float:
    """When the job may next leave on-demand for spot in ``pool``: its k-th refusal
    there since it last ran spot there bars the pool for CAPACITY_MEMORY_SECONDS x
    2^(k-1), at most LEAVE_BACKOFF_MAX_SECONDS (0: no bar)."""
    ran_spot = max(
        (
            a.running_at
            for a in job.attempts
            if a.market == "spot" and a.pool == pool and a.running_at is not None
        ),
        default=-math.inf,
    )
    refused = [
        e.at
        for e in job.timeline
        if e.kind == "launch-refused" and e.detail.startswith(f"{pool}:") and e.at > ran_spot
    ]
    if not refused:
        return 0.0
    bar = min(CAPACITY_MEMORY_SECONDS * 2.0 ** (len(refused) - 1), LEAVE_BACKOFF_MAX_SECONDS)
    return max(refused) + bar


def plan(
    job: Job,
    prices: Mapping[Pool, float],
    now: float,
    attempt: int,
    movable: bool = False,
    fleet: Mapping[Pool, Sequence[CapacityObservation]] | None = None,
) -> Plan:
    """The candidates of attempt number ``attempt``, or when to look again.

    With ``movable`` the candidates may be in another zone than the job's volume;
    ``fleet`` is as for :func:`placement_view`.
    """
    view = placement_view(job, prices, now, movable, fleet)
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
