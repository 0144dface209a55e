"""Where to launch: the job's view for the policy, and its answer as candidate pools.

The choice itself is :func:`chalicelib.policy.decide_placement`, the same function
``spotctl simulate`` scores on real availability traces. This module only translates:
the job record and the observed spot prices into a ``PlacementView``, and the
policy's ``Spot`` / ``OnDemand`` / ``Wait`` into the ordered candidates of an attempt
(each with its ClientToken) or a time to wait until.

Once the job has a volume, only pools in the volume's zone are offered: moving the
volume to another zone (snapshot and restore) is not something the executor does yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from chalicelib import policy
from chalicelib.models import (
    ENDED_INTERRUPTED,
    ENDED_RECLAIMED,
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


def _interruptions(job: Job, pool: Pool) -> tuple[policy.Interruption, ...]:
    """The job's interruptions in ``pool``, oldest first (as the policy expects)."""
    found = (
        policy.Interruption(
            at=a.warned_at or a.ended_at or a.requested_at,
            cause=policy.InterruptionCause.CAPACITY,
            max_price=a.max_price,
        )
        for a in job.attempts
        if a.pool == pool and a.end_reason in (ENDED_INTERRUPTED, ENDED_RECLAIMED)
    )
    return tuple(sorted(found, key=lambda i: i.at))


def _recently_refused(job: Job, pool: Pool, now: float) -> bool:
    return any(
        event.kind == "launch-refused"
        and event.detail.startswith(f"{pool}:")
        and now - event.at < CAPACITY_MEMORY_SECONDS
        for event in job.timeline
    )


def placement_view(job: Job, prices: Mapping[Pool, float], now: float) -> policy.PlacementView:
    spec = job.spec
    zone = job.volume.az if job.volume is not None else None
    zones = {zone} if zone is not None else set(spec.availability_zones or ())
    offered = {pool.az for pool in prices if pool.instance_type in spec.instance_types}
    if not zones:
        zones = offered
    quotes = tuple(
        policy.PoolQuote(
            pool=policy.Pool(instance_type, az),
            on_demand_price=on_demand_price_of(job, instance_type),
            spot_price=prices.get(Pool(instance_type=instance_type, az=az)),
            interruptions=_interruptions(job, Pool(instance_type=instance_type, az=az)),
            spot_available=not _recently_refused(
                job, Pool(instance_type=instance_type, az=az), now
            ),
        )
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


def plan(job: Job, prices: Mapping[Pool, float], now: float, attempt: int) -> Plan:
    """The candidates of attempt number ``attempt``, or when to look again."""
    view = placement_view(job, prices, now)
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
