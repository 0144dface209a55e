"""EC2's request rate limits, as token buckets on the sandbox clock (optional).

EC2 throttles API requests per account and Region with token buckets: each request
takes a token; the bucket refills at a fixed rate up to its capacity; an empty bucket
answers ``RequestLimitExceeded`` (HTTP 503). The sizes here are the ones the design
builds on (docs/performance.md): ``RunInstances`` 5 burst / 2 per second, other
mutating calls 50 / 5 per second, describe calls 100 / 20 per second. They refill on
the sandbox clock, so a benchmark on a ``FakeClock`` sees the same limits in zero
real time.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from spotctl.sandbox.clock import Clock
from spotctl.sandbox.proxy import Ec2Error

RUN_INSTANCES = "run-instances"
MUTATING = "mutating"
DESCRIBE = "describe"


@dataclass(frozen=True)
class BucketSize:
    burst: float  # the bucket's capacity: requests that may come at once
    refill_per_second: float


EC2_LIMITS: Mapping[str, BucketSize] = {
    RUN_INSTANCES: BucketSize(5, 2),
    MUTATING: BucketSize(50, 5),
    DESCRIBE: BucketSize(100, 20),
}


def category(action: str) -> str:
    """The bucket an EC2 Query-API action draws from."""
    if action == "RunInstances":
        return RUN_INSTANCES
    if action.startswith(("Describe", "Get")):
        return DESCRIBE
    return MUTATING


class TokenBucket:
    def __init__(self, size: BucketSize, now: float) -> None:
        self.size = size
        self.tokens = size.burst  # a bucket starts full
        self.updated = now

    def take(self, now: float) -> bool:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.size.burst, self.tokens + elapsed * self.size.refill_per_second)
        self.updated = max(self.updated, now)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class Ec2Throttle:
    """Admits or refuses EC2 calls; counts what it admitted and refused, per action."""

    def __init__(self, clock: Clock, limits: Mapping[str, BucketSize] = EC2_LIMITS) -> None:
        self.clock = clock
        now = clock.now()
        self._buckets = {name: TokenBucket(size, now) for name, size in limits.items()}
        self._lock = threading.Lock()
        self.admitted: Counter[str] = Counter()
        self.throttled: Counter[str] = Counter()

    def admit(self, action: str) -> None:
        """Take a token for ``action`` or raise ``RequestLimitExceeded``."""
        with self._lock:
            if self._buckets[category(action)].take(self.clock.now()):
                self.admitted[action] += 1
                return
            self.throttled[action] += 1
        raise Ec2Error("RequestLimitExceeded", "Request limit exceeded.", status=503)
