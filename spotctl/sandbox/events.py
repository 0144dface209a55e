"""EC2 events in their documented shapes, and a bus that routes them like EventBridge.

The bus keeps EventBridge's contract, not a friendlier one: each event reaches every
target whose registered pattern matches it, at least once (optionally twice), and
optionally out of order within a window. Handlers run from ``deliver_pending()``, never
inside the API call that caused the event, so a handler may call the sandbox's API.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from chalice.app import CloudWatchEventConfig, ScheduledEventConfig

from spotctl.sandbox.clock import iso
from spotctl.sandbox.patterns import matches, validate_pattern

logger = logging.getLogger(__name__)

INTERRUPTION_WARNING = "EC2 Spot Instance Interruption Warning"
REBALANCE_RECOMMENDATION = "EC2 Instance Rebalance Recommendation"
STATE_CHANGE = "EC2 Instance State-change Notification"
SCHEDULED_EVENT = "Scheduled Event"
INSTANCE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down", "terminated")

Event = dict[str, Any]
EventHandler = Callable[[Event], None]


def instance_arn(region: str, account: str, instance_id: str) -> str:
    return f"arn:aws:ec2:{region}:{account}:instance/{instance_id}"


def ec2_event(
    detail_type: str,
    instance_id: str,
    detail: Mapping[str, Any],
    *,
    region: str,
    account: str,
    when: float,
    event_id: str,
) -> Event:
    """The EventBridge envelope EC2 uses (see shared/aws-events/)."""
    return {
        "version": "0",
        "id": event_id,
        "detail-type": detail_type,
        "source": "aws.ec2",
        "account": account,
        "time": iso(when),
        "region": region,
        "resources": [instance_arn(region, account, instance_id)],
        "detail": {"instance-id": instance_id, **detail},
    }


def scheduled_event(
    rule_name: str, *, region: str, account: str, when: float, event_id: str
) -> Event:
    """What a ``@app.schedule`` handler receives from an EventBridge schedule rule."""
    return {
        "version": "0",
        "id": event_id,
        "detail-type": SCHEDULED_EVENT,
        "source": "aws.events",
        "account": account,
        "time": iso(when),
        "region": region,
        "resources": [f"arn:aws:events:{region}:{account}:rule/{rule_name}"],
        "detail": {},
    }


def event_id(rng: random.Random) -> str:
    """A uuid4 drawn from a seeded RNG, so a seeded run names its events the same."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@dataclass(frozen=True)
class EventTarget:
    """A rule's pattern and the callable it invokes."""

    pattern: Mapping[str, Any]
    handler: EventHandler
    name: str = ""


@dataclass(frozen=True)
class ScheduleTarget:
    """A schedule rule: call ``handler`` every ``every_seconds`` sandbox seconds."""

    name: str
    every_seconds: float
    handler: EventHandler


@dataclass
class Delivery:
    """One event on its way to one target (``target=None``: route by pattern)."""

    event: Event
    target: EventTarget | None = None
    attempt: int = 1
    duplicate: bool = False


@dataclass
class DeliveryFailure:
    target: str
    event: Event
    error: str


@dataclass
class EventBus:
    """Routes events to targets by pattern; at least once, optionally duplicated/reordered."""

    targets: list[EventTarget] = field(default_factory=list)
    seed: int = 0
    duplicate_probability: float = 0.0
    reorder_window: int = 1
    max_attempts: int = 3
    max_deliveries_per_drain: int = 10_000

    def __post_init__(self) -> None:
        for target in self.targets:
            validate_pattern(target.pattern)
        self.rng = random.Random(self.seed)
        self._queue: deque[Delivery] = deque()
        self._queue_lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self.delivered: list[tuple[str, Event]] = []
        self.failures: list[DeliveryFailure] = []

    @classmethod
    def of(
        cls, targets: Iterable[tuple[Mapping[str, Any], EventHandler] | EventTarget], **options: Any
    ) -> EventBus:
        """A bus from ``(pattern, handler)`` pairs or ``EventTarget``s."""
        resolved = [t if isinstance(t, EventTarget) else EventTarget(t[0], t[1]) for t in targets]
        return cls(targets=resolved, **options)

    def add_target(self, pattern: Mapping[str, Any], handler: EventHandler, name: str = "") -> None:
        validate_pattern(pattern)
        self.targets.append(EventTarget(pattern, handler, name))

    def put(self, event: Event) -> None:
        """Accept an event (PutEvents); it is delivered on the next ``deliver_pending``."""
        with self._queue_lock:
            self._queue.append(Delivery(event))

    def send(self, target: EventTarget, event: Event) -> None:
        """Queue an event for one target regardless of patterns (schedule rules)."""
        with self._queue_lock:
            self._queue.append(Delivery(event, target))

    def pending(self) -> int:
        with self._queue_lock:
            return len(self._queue)

    def deliver_pending(self) -> int:
        """Deliver all queued events, and those handlers queue meanwhile; returns calls."""
        calls = 0
        with self._drain_lock:
            while calls < self.max_deliveries_per_drain:
                batch = self._take_batch()
                if not batch:
                    break
                for delivery in batch:
                    for target in self._route(delivery):
                        self._invoke(target, delivery)
                        calls += 1
        return calls

    def _take_batch(self) -> list[Delivery]:
        with self._queue_lock:
            size = min(max(self.reorder_window, 1), len(self._queue))
            batch = [self._queue.popleft() for _ in range(size)]
        if len(batch) > 1:
            self.rng.shuffle(batch)
        return batch

    def _route(self, delivery: Delivery) -> list[EventTarget]:
        if delivery.target is not None:
            return [delivery.target]
        return [t for t in self.targets if matches(t.pattern, delivery.event)]

    def _invoke(self, target: EventTarget, delivery: Delivery) -> None:
        name = target.name or getattr(target.handler, "__name__", "handler")
        try:
            target.handler(delivery.event)
        except Exception as exc:
            logger.warning("event %s to %s failed: %s", delivery.event.get("id"), name, exc)
            if delivery.attempt < self.max_attempts:
                with self._queue_lock:
                    self._queue.append(Delivery(delivery.event, target, delivery.attempt + 1))
            else:
                self.failures.append(DeliveryFailure(name, delivery.event, repr(exc)))
            return
        self.delivered.append((name, delivery.event))
        if not delivery.duplicate and self.rng.random() < self.duplicate_probability:
            with self._queue_lock:
                self._queue.append(Delivery(delivery.event, target, duplicate=True))


class LambdaContext:
    """The few attributes of a Lambda context object handlers commonly read."""

    def __init__(
        self, function_name: str, region: str = "us-east-1", account: str = "123456789012"
    ) -> None:
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = 128
        self.invoked_function_arn = f"arn:aws:lambda:{region}:{account}:function:{function_name}"
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = "sandbox"

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


def _lambda_invoker(name: str, handler: Callable[[Event, Any], Any]) -> EventHandler:
    def invoke(event: Event) -> None:
        handler(event, LambdaContext(name))

    invoke.__name__ = name
    return invoke


def targets_from_chalice_app(app: Any) -> list[EventTarget]:
    """One target per ``@app.on_cw_event`` handler of a ``chalice.Chalice`` app."""
    return [
        EventTarget(
            source.event_pattern,
            _lambda_invoker(source.name, app.handler_map[source.name]),
            source.name,
        )
        for source in app.event_sources
        if isinstance(source, CloudWatchEventConfig)
    ]


_RATE = re.compile(r"^rate\((\d+)\s+(minute|minutes|hour|hours|day|days)\)$")
_UNIT_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}


def rate_seconds(expression: str) -> float | None:
    """``rate(5 minutes)`` → 300.0; ``None`` for a cron expression."""
    match = _RATE.match(expression.strip())
    if match is None:
        return None
    return int(match[1]) * _UNIT_SECONDS[match[2].rstrip("s")]


def schedules_from_chalice_app(
    app: Any, every_seconds: float | None = None
) -> list[ScheduleTarget]:
    """One schedule per ``@app.schedule`` handler, firing at its rate (or ``every_seconds``).

    Cron expressions are not evaluated: they fire every ``every_seconds`` (default 60).
    """
    schedules = []
    for source in app.event_sources:
        if not isinstance(source, ScheduledEventConfig):
            continue
        expression = source.schedule_expression
        text = expression if isinstance(expression, str) else expression.to_string()
        period = every_seconds or rate_seconds(text) or 60.0
        handler = _lambda_invoker(source.name, app.handler_map[source.name])
        schedules.append(ScheduleTarget(source.name, period, handler))
    return schedules
