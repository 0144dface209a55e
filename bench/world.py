"""A sandbox world for the benchmarks: LocalCloud on a FakeClock with the real control plane.

The control plane is app.py's, as deployed: its EC2 event handlers registered on the
sandbox's event bus by their patterns, its sweep on the sandbox clock, its clients
talking to the fidelity proxy. No instance emulator: what happens on an instance is
modelled by the benchmark itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import botocore.endpoint

from spotctl.sandbox import FakeClock, LocalCloud, SpotPool
from spotctl.sandbox.cloud import FAKE_CREDENTIALS
from spotctl.sandbox.events import (
    EventTarget,
    schedules_from_chalice_app,
    targets_from_chalice_app,
)
from spotctl.sandbox.sandbox import load_app

REGION = "us-east-1"
ZONE = "us-east-1a"
GPU = "p3.2xlarge"
TABLE = "spotctl-bench-jobs"
SPEC: dict[str, Any] = {
    "name": "bench",
    "command": ["python", "train.py"],
    "instance_types": [GPU],
    "availability_zones": [ZONE],
    "volume_gib": 100,
}


class World:
    """Start with ``with World(...) as world``; ``world.plane`` is the control plane."""

    def __init__(self, *, detach_seconds: float, handlers: Callable[[str], bool]) -> None:
        self.clock = FakeClock()
        self.cloud = LocalCloud(
            clock=self.clock,
            pools=[SpotPool(GPU, ZONE)],
            region=REGION,
            detach_seconds=detach_seconds,
            rebalance_probability=0.0,
            background=False,
        )
        self._wanted = handlers  # which of app.py's handlers this world registers
        self._saved: dict[str, str | None] = {}
        self.plane: Any = None
        self.app: Any = None

    def __enter__(self) -> World:
        self._set_env(
            {
                **FAKE_CREDENTIALS,
                "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
                "AWS_DEFAULT_REGION": REGION,
                "POWERTOOLS_METRICS_DISABLED": "true",
                "POWERTOOLS_LOG_LEVEL": "WARNING",
            }
        )
        self.cloud.start()
        self.app = load_app()
        ami = self.cloud.client("ec2").register_image(Name="bench")["ImageId"]
        self._set_env(
            {
                **self.cloud.env(),
                "SPOTCTL_TABLE": TABLE,
                "SPOTCTL_SIGNING_KEY": "bench-key",
                "SPOTCTL_API_URL": "http://127.0.0.1:9/api",
                "SPOTCTL_AMI_ID": ami,
            }
        )
        from chalicelib import runtime
        from chalicelib.store import create_table

        create_table(self.cloud.client("dynamodb"), TABLE)
        runtime.reset()
        self.plane = runtime.control_plane()
        self.plane.reconciler.clock = self.clock.now
        # The control plane's calls reach the sandbox's proxy in this thread, not over
        # loopback HTTP: the same rules, buckets and answers, in less real time.
        self.cloud.serve_in_process(self.plane.reconciler.ec2._client)
        self.cloud.serve_in_process(self.plane.store._client)
        self.plane.service.clock = self.clock.now
        logging.getLogger("spotctl").setLevel(logging.WARNING)
        for target in targets_from_chalice_app(self.app):
            if self._wanted(target.name):
                self.cloud.add_target(target.pattern, target.handler, target.name)
        for schedule in schedules_from_chalice_app(self.app):
            if self._wanted(schedule.name):
                self.cloud.add_schedule(schedule)
        return self

    def __exit__(self, *exc: object) -> None:
        self.cloud.stop()
        from chalicelib import runtime

        runtime.reset()
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def _set_env(self, values: dict[str, str]) -> None:
        for name, value in values.items():
            self._saved.setdefault(name, os.environ.get(name))
            os.environ[name] = value

    def add_target(self, target: EventTarget) -> None:
        self.cloud.add_target(target.pattern, target.handler, target.name)

    def submit_running(self, count: int) -> dict[str, str]:
        """``count`` jobs, each running with its volume attached: job id -> instance id."""
        jobs = {}
        for n in range(count):
            job = self.plane.service.submit({**SPEC, "name": f"bench-{n}"})
            jobs[job.job_id] = job.attempts[0].instance_id
            if n % 50 == 49:
                self.cloud.tick()  # deliver the state changes: the volumes get attached
        self.cloud.tick()
        self.clock.advance(1.0)
        self.cloud.tick()
        return jobs


@contextlib.contextmanager
def backoff_on_sandbox_clock(clock: FakeClock) -> Iterator[None]:
    """botocore's retry backoff waits on the sandbox clock instead of sleeping.

    Lambda invocations run one at a time here; a throttled call's backoff moves
    sandbox time (and so refills EC2's token buckets) without costing real time.
    """
    endpoint: Any = botocore.endpoint  # its ``time`` import is not part of its typed API
    real = endpoint.time

    class SandboxTime:
        def sleep(self, seconds: float) -> None:
            clock.advance(seconds)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    endpoint.time = SandboxTime()
    try:
        yield
    finally:
        endpoint.time = real
