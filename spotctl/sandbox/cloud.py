"""``LocalCloud``: moto plus the fidelity proxy, a spot market, an event bus and a clock.

    with LocalCloud(clock=FakeClock(), pools=pools_from_traces(paths)) as cloud:
        ec2 = cloud.client("ec2")            # talks to the proxy, like real AWS
        ...
        cloud.advance(130)                   # sandbox time passes; events are delivered

With a ``FakeClock`` nothing happens until ``advance``/``tick``/``pump`` is called, so
tests are deterministic. With a ``ScaledClock`` (the demo), a background thread ticks
the market and delivers events every ``poll_interval`` real seconds.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from moto.server import ThreadedMotoServer

from spotctl.sandbox.clock import Clock, FakeClock, ScaledClock
from spotctl.sandbox.ec2 import (
    DEFAULT_ACCOUNT,
    INTERRUPTION_NOTICE_SECONDS,
    InstanceInfo,
    LifecycleEvent,
    SandboxEc2,
    SandboxEc2Options,
)
from spotctl.sandbox.events import EventBus, EventHandler, EventTarget, ScheduleTarget, event_id
from spotctl.sandbox.events import scheduled_event as make_scheduled_event
from spotctl.sandbox.market import SpotMarket, SpotPool, pools_from_traces
from spotctl.sandbox.moto_patch import add_gpu_instance_types, speed_up_moto
from spotctl.sandbox.proxy import FidelityProxy, Upstream, answer_in_process, sandbox_client

logger = logging.getLogger(__name__)

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
}

LifecycleObserver = Callable[[LifecycleEvent], None]


class LocalCloud:
    """A local AWS for spotctl: start it, point clients at ``endpoint_url``, stop it."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        pools: Sequence[SpotPool] = (),
        trace_paths: Iterable[str | Path] = (),
        bus: EventBus | None = None,
        region: str = "us-east-1",
        seed: int = 0,
        detach_seconds: float = 10.0,
        notice_seconds: float = INTERRUPTION_NOTICE_SECONDS,
        rebalance_probability: float = 0.5,
        warning_probability: float = 1.0,
        price_step_seconds: float = 3600.0,
        on_demand_prices: Mapping[str, float] | None = None,
        unlisted_pools_available: bool = True,
        schedules: Iterable[ScheduleTarget] = (),
        background: bool | None = None,
        poll_interval: float = 0.05,
        max_step_seconds: float = 60.0,
        verbose: bool = False,
    ) -> None:
        self.clock: Clock = clock if clock is not None else ScaledClock(60.0)
        self.region = region
        self.account = DEFAULT_ACCOUNT
        self.bus = bus if bus is not None else EventBus(seed=seed)
        self.market = SpotMarket(
            [*pools, *pools_from_traces(trace_paths)],
            start=self.clock.now(),
            seed=seed,
            price_step_seconds=price_step_seconds,
            on_demand_prices=on_demand_prices,
            unlisted_pools_available=unlisted_pools_available,
        )
        self.options = SandboxEc2Options(
            account=self.account,
            detach_seconds=detach_seconds,
            notice_seconds=notice_seconds,
            rebalance_probability=rebalance_probability,
            warning_probability=warning_probability,
            seed=seed,
        )
        self.background = (
            not isinstance(self.clock, FakeClock) if background is None else background
        )
        self.poll_interval = poll_interval
        self.max_step_seconds = max_step_seconds
        self.verbose = verbose
        self._schedules: list[tuple[ScheduleTarget, float]] = []
        for schedule in schedules:
            self.add_schedule(schedule)
        self._observers: list[LifecycleObserver] = []
        self._notices: list[LifecycleEvent] = []
        self._notices_lock = threading.Lock()
        self._tick_lock = threading.RLock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._moto: ThreadedMotoServer | None = None
        self._proxy: FidelityProxy | None = None
        self._ec2: SandboxEc2 | None = None
        self._werkzeug_level: int | None = None

    # -- start / stop ----------------------------------------------------------------------

    def __enter__(self) -> LocalCloud:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        add_gpu_instance_types()
        speed_up_moto()
        if not self.verbose:
            werkzeug = logging.getLogger("werkzeug")
            self._werkzeug_level = werkzeug.level
            werkzeug.setLevel(logging.ERROR)
        self._moto = ThreadedMotoServer("127.0.0.1", 0, verbose=self.verbose)
        self._moto.start()
        host, port = self._moto.get_host_and_port()
        # moto's backends are process-global: start from an empty account every time.
        reset = urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST")
        with urllib.request.urlopen(reset, timeout=30):  # noqa: S310 - loopback moto
            pass
        self.market.rebase(self.clock.now())  # the traces start when the cloud does
        server = self._moto._server
        # moto's own app, called in process by the proxy; its port stays open for
        # anything that talks to moto directly.
        upstream = Upstream(host, port, server.app if server is not None else None)
        self._ec2 = SandboxEc2(
            upstream, self.clock, self.market, self.bus.put, self._queue_notice, self.options
        )
        self._proxy = FidelityProxy(upstream, self._ec2.handle)
        self._proxy.start()
        if self.background:
            self._stop.clear()
            self._ticker = threading.Thread(target=self._run_ticker, name="sandbox-ticker")
            self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None
        if self._moto is not None:
            server = self._moto._server  # ThreadedMotoServer.stop() leaves its socket open
            self._moto.stop()
            if server is not None:
                server.server_close()
            self._moto = None
        if self._werkzeug_level is not None:
            logging.getLogger("werkzeug").setLevel(self._werkzeug_level)
            self._werkzeug_level = None

    # -- for clients -----------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        """What clients use as ``AWS_ENDPOINT_URL``: the fidelity proxy."""
        if self._proxy is None:
            raise RuntimeError("LocalCloud is not started")
        return self._proxy.url

    @property
    def moto_url(self) -> str:
        """moto itself, past the fidelity rules (for debugging only)."""
        if self._moto is None:
            raise RuntimeError("LocalCloud is not started")
        host, port = self._moto.get_host_and_port()
        return f"http://{host}:{port}"

    @property
    def ports(self) -> tuple[int, int]:
        """(proxy port, moto port)."""
        if self._proxy is None or self._moto is None:
            raise RuntimeError("LocalCloud is not started")
        return self._proxy.port, self._moto.get_host_and_port()[1]

    @property
    def ec2(self) -> SandboxEc2:
        if self._ec2 is None:
            raise RuntimeError("LocalCloud is not started")
        return self._ec2

    def env(self) -> dict[str, str]:
        """Environment variables that point an AWS SDK or the CLI at the sandbox."""
        return {
            **FAKE_CREDENTIALS,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def client(self, service: str, region: str | None = None, **kwargs: Any) -> Any:
        """A boto3 client for ``service`` that talks to the sandbox."""
        return sandbox_client(service, region or self.region, self.endpoint_url, **kwargs)

    def serve_in_process(self, client: Any) -> None:
        """Answer ``client``'s requests (made for ``endpoint_url``) in the calling thread.

        The proxy's rules, throttling and moto answer as over HTTP; a benchmark that
        makes tens of thousands of calls saves the loopback round trips.
        """
        if self._proxy is None:
            raise RuntimeError("LocalCloud is not started")
        answer_in_process(client, self._proxy.answer)

    # -- events, schedules and observers ---------------------------------------------------

    def add_target(self, pattern: Mapping[str, Any], handler: EventHandler, name: str = "") -> None:
        """Register an EventBridge rule (pattern) and its target."""
        self.bus.add_target(pattern, handler, name)

    def add_schedule(self, schedule: ScheduleTarget) -> None:
        """Fire ``schedule.handler`` every ``schedule.every_seconds`` sandbox seconds."""
        self._schedules.append((schedule, self.clock.now() + schedule.every_seconds))

    def add_observer(self, observer: LifecycleObserver) -> None:
        """Call ``observer`` on instance running/stopped/terminated and volume (de)attach."""
        self._observers.append(observer)

    def instance(self, instance_id: str) -> InstanceInfo | None:
        return self.ec2.instance(instance_id)

    def instance_action(self, instance_id: str) -> dict[str, str] | None:
        return self.ec2.instance_action(instance_id)

    def rebalance_notice(self, instance_id: str) -> dict[str, str] | None:
        return self.ec2.rebalance_notice(instance_id)

    def metadata_tags(self, instance_id: str) -> dict[str, str] | None:
        return self.ec2.metadata_tags(instance_id)

    def _queue_notice(self, notice: LifecycleEvent) -> None:
        with self._notices_lock:
            self._notices.append(notice)

    # -- time --------------------------------------------------------------------------------

    def tick(self) -> None:
        """Run the market and due timers at the current sandbox time, then deliver."""
        with self._tick_lock:
            self.ec2.tick()
            self._fire_schedules()
            self.pump()

    def pump(self) -> None:
        """Deliver queued lifecycle notices to observers and events to targets."""
        while True:
            with self._notices_lock:
                notices, self._notices = self._notices, []
            for notice in notices:
                for observer in self._observers:
                    try:
                        observer(notice)
                    except Exception:
                        logger.exception("lifecycle observer failed on %s", notice.kind)
            delivered = self.bus.deliver_pending()
            with self._notices_lock:
                if not self._notices and not delivered:
                    return

    def advance(self, seconds: float) -> None:
        """Move a ``FakeClock`` forward, stopping at every timer, tick and price step."""
        if not isinstance(self.clock, FakeClock):
            raise TypeError("advance() needs a FakeClock; a ScaledClock runs by itself")
        clock = self.clock
        target = clock.now() + seconds
        self.tick()
        while clock.now() < target:
            now = clock.now()
            step = min(
                target,
                now + self.max_step_seconds,
                self.ec2.next_due(),
                self.market.next_capacity_change(now),
                self.market.next_price_change(now),
                *(due for _, due in self._schedules),
            )
            clock.set(step if step > now else min(target, now + self.max_step_seconds))
            self.tick()

    def _fire_schedules(self) -> None:
        now = self.clock.now()
        for index, (schedule, due) in enumerate(self._schedules):
            if now < due:
                continue
            event = make_scheduled_event(
                schedule.name,
                region=self.region,
                account=self.account,
                when=now,
                event_id=event_id(self.bus.rng),
            )
            target = EventTarget({"source": ["aws.events"]}, schedule.handler, schedule.name)
            self.bus.send(target, event)
            next_due = due
            while next_due <= now:
                next_due += schedule.every_seconds
            self._schedules[index] = (schedule, next_due)

    def _run_ticker(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.tick()
            except Exception:
                logger.exception("sandbox tick failed")
