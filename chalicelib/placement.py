"""Where to launch: the candidate pools of an attempt, in the order to try them.

Cheapest current spot price first among the job's instance types (in the volume's
zone once the job has a volume), with the max price at the job's cap or, by default,
the type's on-demand price (AWS advises against low max prices: they cause more
interruptions without lowering what you pay). Pools whose spot price is above the
max price are left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from chalicelib.models import Candidate, Job, Pool
from chalicelib.pricing import ON_DEMAND_USD_PER_HOUR


@dataclass(frozen=True)
class Plan:
    candidates: tuple[Candidate, ...]
    reason: str


def on_demand_price_of(job: Job, instance_type: str) -> float:
    price = ON_DEMAND_USD_PER_HOUR.get(instance_type)
    return price if price is not None else float(job.spec.max_price_per_hour or 0.0)


def max_price_for(job: Job, instance_type: str) -> float:
    cap = job.spec.max_price_per_hour
    return cap if cap is not None else on_demand_price_of(job, instance_type)


def plan(job: Job, prices: Mapping[Pool, float], zone: str | None, attempt: int) -> Plan:
    spec = job.spec
    zones = (zone,) if zone is not None else spec.availability_zones
    offers = [
        (price, pool)
        for pool, price in prices.items()
        if pool.instance_type in spec.instance_types and (zones is None or pool.az in zones)
    ]
    affordable = sorted(
        (
            (price, pool)
            for price, pool in offers
            if price <= max_price_for(job, pool.instance_type)
        ),
        key=lambda offer: (offer[0], offer[1].instance_type, offer[1].az),
    )
    if not affordable:
        where = f"in {zone}" if zone else "in the job's zones"
        if offers:
            return Plan((), f"every spot price {where} is above the max price")
        return Plan((), f"no spot offer for {', '.join(spec.instance_types)} {where}")
    if job.volume is None:
        # The volume is created with the first launch, in the cheapest pool's zone.
        best_zone = affordable[0][1].az
        affordable = [(price, pool) for price, pool in affordable if pool.az == best_zone]
    candidates = tuple(
        Candidate(
            pool=pool,
            market="spot",
            max_price=max_price_for(job, pool.instance_type),
            expected_price=price,
            client_token=f"{job.job_id}-{attempt}-{index}",
        )
        for index, (price, pool) in enumerate(affordable)
    )
    best_price, best = affordable[0]
    return Plan(candidates, f"cheapest spot pool {best} at ${best_price:.4f}/h")
