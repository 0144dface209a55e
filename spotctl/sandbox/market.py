"""The spot market: capacity per pool from a recorded trace, and a moving price per pool.

Price model: a mean-reverting random walk (a discrete Ornstein-Uhlenbeck process) per
pool, one step per ``price_step_seconds`` (default one sandbox hour)::

    p[k+1] = p[k] + theta * (mu - p[k]) + sigma * mu * N(0, 1),   clamped to [floor, cap]

with ``mu = base_fraction * on_demand`` (default 0.317: $0.97 / $3.06, the p3.2xlarge
spot/on-demand ratio of the "Can't Be Late" setting), ``theta = 0.1``, ``sigma = 0.02``,
``floor = 0.1 * on_demand`` and ``cap = on_demand``. Why this shape: since the 2017
pricing change, AWS spot prices move slowly and smoothly around a long-run level set by
supply and demand, rarely jump, and never exceed the on-demand price; capacity (the trace),
not price, causes most interruptions. Mean reversion keeps a long run near the level the
policy was tuned for; the small step keeps price-driven interruptions rare but possible,
and bounds keep a wild seed from producing absurd prices. Each pool draws from its own
RNG seeded by (seed, instance type, AZ), so adding a pool changes no other pool's prices.
The walk starts ``history_seconds`` before the market start so there is history to show.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spotctl.sandbox.traces import AvailabilityTrace, load_trace, parse_trace_name

DEFAULT_ON_DEMAND_USD_PER_HOUR: dict[str, float] = {
    "p3.2xlarge": 3.06,
    "p3.8xlarge": 12.24,
    "p3.16xlarge": 24.48,
    "p2.xlarge": 0.90,
    "p2.8xlarge": 7.20,
    "p2.16xlarge": 14.40,
    "g4dn.xlarge": 0.526,
    "m5.large": 0.096,
    "t3.micro": 0.0104,
}
UNKNOWN_ON_DEMAND_USD_PER_HOUR = 1.0
SPOT_BASE_FRACTION = 0.97 / 3.06
PRICE_THETA = 0.1
PRICE_SIGMA = 0.02
PRICE_FLOOR_FRACTION = 0.1


@dataclass(frozen=True)
class PoolKey:
    """A spot pool: one instance type in one Availability Zone."""

    instance_type: str
    az: str

    @property
    def region(self) -> str:
        return self.az[:-1]


@dataclass(frozen=True)
class SpotPool:
    """A pool's configuration; ``trace=None`` means capacity is always there."""

    instance_type: str
    az: str
    trace: AvailabilityTrace | None = None
    on_demand_price: float | None = None
    base_fraction: float = SPOT_BASE_FRACTION
    trace_offset_seconds: float = 0.0

    @property
    def key(self) -> PoolKey:
        return PoolKey(self.instance_type, self.az)


@dataclass(frozen=True)
class PricePoint:
    """One entry of a pool's spot price history."""

    instance_type: str
    az: str
    time: float
    price: float


def pools_from_traces(paths: Iterable[str | Path], **pool_args: float) -> list[SpotPool]:
    """One pool per trace file named ``<az>_<gpu>_<count>.json``."""
    pools = []
    for path in paths:
        instance_type, az = parse_trace_name(path)
        pools.append(SpotPool(instance_type, az, load_trace(path), **pool_args))
    return pools


@dataclass
class _PriceWalk:
    rng: random.Random
    mean: float
    floor: float
    cap: float
    prices: list[float] = field(default_factory=list)

    def at_step(self, step: int) -> float:
        if not self.prices:
            self.prices.append(self.mean)
        while len(self.prices) <= step:
            last = self.prices[-1]
            moved = last + PRICE_THETA * (self.mean - last)
            moved += PRICE_SIGMA * self.mean * self.rng.gauss(0.0, 1.0)
            self.prices.append(round(min(max(moved, self.floor), self.cap), 4))
        return self.prices[step]


class SpotMarket:
    """Answers "is there spot capacity in this pool now?" and "what does it cost now?"."""

    def __init__(
        self,
        pools: Sequence[SpotPool],
        start: float,
        *,
        seed: int = 0,
        price_step_seconds: float = 3600.0,
        history_seconds: float = 7 * 86400.0,
        on_demand_prices: Mapping[str, float] | None = None,
        unlisted_pools_available: bool = True,
    ) -> None:
        self.start = start
        self.seed = seed
        self.price_step_seconds = price_step_seconds
        self.walk_start = start - history_seconds
        self.on_demand_prices = dict(on_demand_prices or DEFAULT_ON_DEMAND_USD_PER_HOUR)
        self.unlisted_pools_available = unlisted_pools_available
        self._pools: dict[PoolKey, SpotPool] = {p.key: p for p in pools}
        self._walks: dict[PoolKey, _PriceWalk] = {}
        self._overrides: dict[PoolKey, list[tuple[float, float]]] = {}
        self._lock = threading.Lock()

    def rebase(self, start: float) -> None:
        """Start the traces (and the price walk's present) at ``start``."""
        with self._lock:
            self.walk_start += start - self.start
            self.start = start
            self._walks.clear()

    def pools(self) -> list[SpotPool]:
        return list(self._pools.values())

    def pool(self, instance_type: str, az: str) -> SpotPool | None:
        return self._pools.get(PoolKey(instance_type, az))

    def on_demand_price(self, instance_type: str) -> float:
        pool_prices = [
            p.on_demand_price
            for p in self._pools.values()
            if p.instance_type == instance_type and p.on_demand_price is not None
        ]
        if pool_prices:
            return pool_prices[0]
        return self.on_demand_prices.get(instance_type, UNKNOWN_ON_DEMAND_USD_PER_HOUR)

    def available(self, instance_type: str, az: str, at: float) -> bool:
        pool = self.pool(instance_type, az)
        if pool is None:
            return self.unlisted_pools_available
        if pool.trace is None:
            return True
        return pool.trace.available(at - self.start + pool.trace_offset_seconds)

    def next_capacity_change(self, after: float) -> float:
        """The next trace tick boundary of any pool after ``after`` (inf with no traces)."""
        boundaries = [math.inf]
        for pool in self._pools.values():
            if pool.trace is not None:
                gap = pool.trace.gap_seconds
                elapsed = after - self.start + pool.trace_offset_seconds
                boundaries.append(after + gap - (elapsed % gap))
        return min(boundaries)

    def next_price_change(self, after: float) -> float:
        """The next step of the price walk after ``after``."""
        steps = (after - self.walk_start) // self.price_step_seconds + 1
        return self.walk_start + steps * self.price_step_seconds

    def price(self, instance_type: str, az: str, at: float) -> float:
        key = PoolKey(instance_type, az)
        with self._lock:
            for since, price in reversed(self._overrides.get(key, [])):
                if at >= since:
                    return price
            step = max(0, int((at - self.walk_start) // self.price_step_seconds))
            return self._walk(key).at_step(step)

    def set_price(self, instance_type: str, az: str, price: float, at: float) -> None:
        """Fix a pool's price from ``at`` on (tests and demos of price interruptions)."""
        with self._lock:
            self._overrides.setdefault(PoolKey(instance_type, az), []).append((at, price))

    def history(
        self,
        instance_types: Iterable[str] | None,
        azs: Iterable[str],
        start: float | None,
        end: float,
    ) -> list[PricePoint]:
        """Price changes in ``[start, end]``, plus the price in effect at ``start``; newest first.

        Pools listed: the configured ones (of the given types) in the given AZs, plus any
        explicitly named type in those AZs, since AWS quotes a price for every pool.
        """
        az_list = list(azs)
        wanted = set(instance_types) if instance_types is not None else None
        keys = {p.key for p in self._pools.values() if p.az in az_list}
        if wanted is not None:
            keys = {k for k in keys if k.instance_type in wanted}
            keys |= {PoolKey(t, az) for t in wanted for az in az_list}
        first = self.walk_start if start is None else max(start, self.walk_start)
        points: list[PricePoint] = []
        for key in sorted(keys, key=lambda k: (k.instance_type, k.az)):
            points.extend(self._pool_history(key, first, end))
        points.sort(key=lambda p: (-p.time, p.instance_type, p.az))
        return points

    def _pool_history(self, key: PoolKey, start: float, end: float) -> list[PricePoint]:
        changes = {self.walk_start + k * self.price_step_seconds for k in self._steps(start, end)}
        changes |= {since for since, _ in self._overrides.get(key, []) if since <= end}
        points: list[PricePoint] = []
        last: float | None = None
        for when in sorted(changes):
            price = self.price(key.instance_type, key.az, when)
            if price != last:
                points.append(PricePoint(key.instance_type, key.az, when, price))
                last = price
        # Keep the changes inside the window and the one in effect when it opens.
        inside = [p for p in points if p.time > start]
        before = [p for p in points if p.time <= start]
        return before[-1:] + inside

    def _steps(self, start: float, end: float) -> range:
        first = max(0, int((start - self.walk_start) // self.price_step_seconds))
        last = max(0, int((end - self.walk_start) // self.price_step_seconds))
        return range(first, last + 1)

    def _walk(self, key: PoolKey) -> _PriceWalk:
        walk = self._walks.get(key)
        if walk is None:
            pool = self._pools.get(key)
            on_demand = self.on_demand_price(key.instance_type)
            if pool is not None and pool.on_demand_price is not None:
                on_demand = pool.on_demand_price
            fraction = pool.base_fraction if pool is not None else SPOT_BASE_FRACTION
            rng = random.Random(f"{self.seed}:{key.instance_type}:{key.az}")
            walk = _PriceWalk(
                rng, round(fraction * on_demand, 4), PRICE_FLOOR_FRACTION * on_demand, on_demand
            )
            self._walks[key] = walk
        return walk
