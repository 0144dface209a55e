"""Chaos: many jobs on recorded spot traces while the cloud and the Lambdas misbehave.

    .venv/bin/python -m bench.chaos [--jobs 200] [--seed 1]

The control plane runs exactly as deployed (app.py's handlers on the sandbox's event
bus, its sweep on the sandbox clock) against ``LocalCloud`` (moto behind the EC2
fidelity proxy, a spot market replaying the us-west-2 traces of 2022-10-26). What goes
wrong, all at once:

- every EC2 event is delivered 1-3 times and shuffled within a window of 8;
- 10 % of spot interruption warnings never reach EventBridge, and the agent misses
  IMDS's notice on 10 % of instances (they vanish unannounced);
- a handler invocation (event, sweep, API) dies at a random AWS call with some
  probability (``LambdaCrash``, raised from a botocore before-call hook); EventBridge
  retries it (3 attempts, like Lambda's async invocations), the sweep does the rest;
- 10 % of the control plane's EC2 HTTP requests are answered ``RequestLimitExceeded``
  before botocore's retry logic sees them (a before-send hook), so its standard retry
  mode must absorb them; backoff delays are recorded at full length and slept at 1/1000;
- capacity comes and goes with the traces (InsufficientInstanceCapacity at launch,
  interruptions of whole pools), and detaching volumes stay ``detaching`` for minutes.

Instances do not run the real agent (200 agents would not fit on 2 cores): an *agent
double* per instance works one step per sandbox minute while the job's volume is
attached, checkpoints to the volume every 30 steps and syncs to S3, checkpoints at once
when IMDS shows a notice, checkpoints and shuts its instance down when IMDS shows the
``spotctl:leave`` tag (the control plane leaving on-demand), reports ``exited`` through
the API when the work is done and shuts its instance down. A share of the workloads
(``error_fraction``) crashes once half-way: reports exit 1, without a checkpoint, and
shuts down; every job allows one restart on errors. An agent that misses a
notice misses the tag too, and is terminated after the drain time. tests/e2e runs the
real agent.

Invariants are checked from EC2's side (lifecycle observers and a describe poll every
sandbox minute), never from the control plane's records. Writes
bench/results/chaos.json and prints the figures; exits 1 if an invariant broke.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.awsrequest import AWSResponse, HTTPHeaders
from botocore.retries import standard

from chalicelib.ec2 import LEAVE_TAG
from spotctl.sandbox.clock import FakeClock
from spotctl.sandbox.cloud import FAKE_CREDENTIALS, LocalCloud
from spotctl.sandbox.ec2 import Lifecycle, LifecycleEvent
from spotctl.sandbox.events import (
    Delivery,
    EventBus,
    EventTarget,
    ScheduleTarget,
    schedules_from_chalice_app,
    targets_from_chalice_app,
)
from spotctl.sandbox.market import pools_from_traces

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
TRACES = REPO / "traces" / "aws-10-26-2022"
TRACE_FILES = ("us-west-2a_v100_1", "us-west-2b_v100_1", "us-west-2a_k80_1", "us-west-2b_k80_1")
# The 2.5 hours from tick 1796 (2022-11-07 11:20 UTC) hold the densest capacity changes
# of these four pools that start with all four available: 14 in 15 ticks.
TRACE_OFFSET_TICK = 1796
TRACE_GAP_SECONDS = 600.0
REGION = "us-west-2"
TABLE = "spotctl-chaos"
SIGNING_KEY = "chaos-signing-key"
START = 1_790_000_000.0
STEP_SECONDS = 60.0  # one agent step per sandbox minute
EVENT_ATTEMPTS = 3  # Lambda retries a failed async invocation twice


class LambdaCrash(BaseException):
    """The Lambda died mid-handler (timeout, out of memory, host lost).

    A ``BaseException`` so no ``except Exception`` in the handler can survive it.
    """


@dataclass(frozen=True)
class ChaosConfig:
    jobs: int = 200
    seed: int = 1
    work_hours: float = 3.0  # agent steps each job needs, in sandbox hours of RUNNING
    arrival_hours: float = 1.0  # jobs are submitted evenly over this span
    horizon_hours: float = 10.0  # chaos lasts this long; then the run drains
    drain_hours: float = 4.0
    checkpoint_steps: int = 30  # one step per sandbox minute: a checkpoint each 30 min
    crash_probability: float = 0.1  # per handler invocation
    throttle_probability: float = 0.1  # per EC2 HTTP request of the control plane
    warning_drop_probability: float = 0.1
    max_deliveries: int = 3
    reorder_window: int = 8
    detach_seconds: float = 240.0
    sweep_seconds: float = 60.0
    audit_every: int = 5  # poll EC2's instances and volumes every N sandbox minutes
    cancel_fraction: float = 0.05
    # This share of the workloads exits 1 once, half-way through its work, without a
    # checkpoint; every job is submitted with one restart on errors.
    error_fraction: float = 0.1
    # This share of the jobs has a deadline (``deadline_factor`` x its work from its
    # submission) and ``expected_hours``: the policy may start them on on-demand when
    # spot is refused, and the sweep moves them back to spot once they are ahead.
    deadline_fraction: float = 0.5
    deadline_factor: float = 3.0
    trace_offset_tick: int = TRACE_OFFSET_TICK
    # p2.xlarge listed at $4/h in the sandbox market so its spot price (~$1.27) sorts
    # after p3.2xlarge's (~$0.97) and jobs run on the V100 pools, which the traces take
    # away most often. NB: the control plane's own price list says $0.90 for p2.xlarge,
    # so the policy caps its bid there and leaves K80 out: jobs are V100-only, and the
    # second-candidate crash case is covered by tests/functional/test_faults.py instead.
    on_demand_prices: tuple[tuple[str, float], ...] = (("p2.xlarge", 4.0),)
    max_price_per_hour: float = 5.0


# -- fault injection -----------------------------------------------------------------


_THROTTLE_BODY = (
    b"<?xml version='1.0' encoding='UTF-8'?><Response><Errors><Error>"
    b"<Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message>"
    b"</Error></Errors><RequestID>chaos</RequestID></Response>"
)


class _Raw:
    """What AWSResponse reads a body from."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


@dataclass
class Injector:
    """Crashes handler invocations and throttles EC2 requests, on the control plane's clients."""

    rng: random.Random
    crash_probability: float
    throttle_probability: float
    counts: Counter[str] = field(default_factory=Counter)
    backoff_seconds: float = 0.0
    _crash_at: int | None = None
    _calls: int = 0
    _handler: str = ""

    def attach(self, ec2_client: Any, dynamodb_client: Any) -> None:
        for client in (ec2_client, dynamodb_client):
            client.meta.events.register("before-call", self._before_call)
        ec2_client.meta.events.register("before-send", self._before_send)

    @contextmanager
    def invocation(self, handler: str, max_calls: int = 12, first: int = 1) -> Iterator[None]:
        """One Lambda invocation: it may die before its k-th AWS call (k >= ``first``)."""
        self._calls = 0
        self._handler = handler
        self._crash_at = None
        if self.rng.random() < self.crash_probability:
            self._crash_at = self.rng.randint(first, max(first, max_calls))
        self.counts[f"invocations:{handler}"] += 1
        try:
            yield
        except LambdaCrash:
            self.counts[f"crashes:{handler}"] += 1
            raise
        finally:
            self._crash_at = None
            self._handler = ""

    def _before_call(self, event_name: str, **_: Any) -> None:
        if not self._handler:
            return
        self._calls += 1
        if self._crash_at is not None and self._calls == self._crash_at:
            self._crash_at = None
            raise LambdaCrash(f"{self._handler} died before {event_name.split('.', 1)[1]}")

    def _before_send(self, **_: Any) -> AWSResponse | None:
        if self.rng.random() >= self.throttle_probability:
            return None
        self.counts["throttled-requests"] += 1
        return AWSResponse("https://ec2.chaos", 503, HTTPHeaders(), _Raw(_THROTTLE_BODY))


@contextmanager
def recorded_backoff(injector: Injector, scale: float = 0.001) -> Iterator[None]:
    """botocore's standard-mode backoff, recorded at full length and slept scaled down."""
    original = standard.ExponentialBackoff.delay_amount

    def delay_amount(self: Any, context: Any) -> float:
        delay = float(original(self, context))
        injector.backoff_seconds += delay
        injector.counts["retries"] += 1
        return delay * scale

    standard.ExponentialBackoff.delay_amount = delay_amount  # type: ignore[method-assign]
    try:
        yield
    finally:
        standard.ExponentialBackoff.delay_amount = original  # type: ignore[method-assign]


class ChaosBus(EventBus):
    """EventBridge at its worst: each event 1-N times, shuffled, warnings sometimes lost;
    a crashed invocation is retried like Lambda's async invocations."""

    injector: Injector | None = None
    max_copies: int = 3
    warning_drop_probability: float = 0.0
    dropped_warnings: int = 0

    def put(self, event: dict[str, Any]) -> None:
        warning = event.get("detail-type") == "EC2 Spot Instance Interruption Warning"
        if warning and self.rng.random() < self.warning_drop_probability:
            self.dropped_warnings += 1
            return
        for _ in range(self.rng.randint(1, self.max_copies)):
            super().put(event)

    def _invoke(self, target: EventTarget, delivery: Delivery) -> None:
        assert self.injector is not None
        is_sweep = delivery.target is not None
        max_calls = 1000 if is_sweep else 12
        try:
            with self.injector.invocation(target.name, max_calls):
                super()._invoke(target, delivery)
        except LambdaCrash:
            if delivery.attempt < EVENT_ATTEMPTS:
                with self._queue_lock:
                    self._queue.append(Delivery(delivery.event, target, delivery.attempt + 1))


# -- the world: agent doubles and what EC2 shows ------------------------------------------


@dataclass
class _Agent:
    job_id: str
    instance_id: str
    volume_id: str
    started_at: float
    resume_step: int
    stopped: bool = False  # noticed an interruption, or lost its volume
    exited: bool = False  # reported the exit, shutting down


@dataclass
class Violations:
    double_live: dict[str, str] = field(default_factory=dict)  # job -> instances
    double_attach: list[str] = field(default_factory=list)
    cross_zone: list[str] = field(default_factory=list)
    unsafe_deletes: list[str] = field(default_factory=list)
    lost_steps: dict[str, int] = field(default_factory=dict)  # job -> steps lost beyond ckpt
    leftover_instances: list[str] = field(default_factory=list)
    lost_jobs: list[str] = field(default_factory=list)
    false_success: list[str] = field(default_factory=list)
    # Jobs (not cancelled) whose restarts on errors differ from the crashes they had.
    wrong_restarts: list[str] = field(default_factory=list)


class World:
    """Instances as the workload sees them, and EC2's truth as an auditor sees it."""

    def __init__(self, cloud: LocalCloud, config: ChaosConfig, report: Callable[..., Any]):
        self.cloud = cloud
        self.config = config
        self.report = report  # (job_id, attempt, body) -> None; raises LambdaCrash
        self.ec2 = cloud.client("ec2")  # the world's own client: no chaos on it
        self.total_steps = int(config.work_hours * 3600 / STEP_SECONDS)
        self.agents: dict[str, _Agent] = {}
        self.job_of: dict[str, tuple[str, int]] = {}  # instance -> (job, attempt)
        self.volume_step: dict[str, int] = {}
        self.s3_step: dict[str, int] = {}
        self.max_step: dict[str, int] = defaultdict(int)
        self.finished: set[str] = set()
        self.attached: dict[str, set[str]] = defaultdict(set)
        self.volume_az: dict[str, str] = {}
        self.known_volumes: dict[str, str] = {}  # volume -> job
        self.pending_reports: list[tuple[str, int, dict[str, Any]]] = []
        self.violations = Violations()
        self.max_loss: dict[str, int] = defaultdict(int)
        self.rng = random.Random(config.seed + 1)
        self.deaf: set[str] = set()  # instances whose notice the agent never saw
        self.crash_rng = random.Random(config.seed + 2)
        self.will_crash: dict[str, bool] = {}  # job -> its workload crashes once
        self.crashed: set[str] = set()

    # lifecycle observer ------------------------------------------------------------

    def observe(self, notice: LifecycleEvent) -> None:
        info = notice.instance
        now = self.cloud.clock.now()
        if notice.kind == Lifecycle.TERMINATED:
            agent = self.agents.pop(info.instance_id, None)
            if agent is not None and not agent.stopped:
                progress = self._progress(agent, now)
                self.max_step[agent.job_id] = max(self.max_step[agent.job_id], progress)
                if notice.reason == "terminated-by-user" and not agent.exited:
                    # TerminateInstances (a cancel, say) shuts the OS down: the agent's
                    # SIGTERM path checkpoints, syncs and tells it, as at a notice.
                    self._checkpoint(agent, progress)
                    self._tell_interrupted(agent)
            return
        if notice.kind == Lifecycle.VOLUME_DETACHED and notice.volume_id:
            self.attached[notice.volume_id].discard(info.instance_id)
            agent = self.agents.get(info.instance_id)
            if agent is not None and agent.volume_id == notice.volume_id:
                agent.stopped = True
            return
        if notice.kind != Lifecycle.VOLUME_ATTACHED or not notice.volume_id:
            return
        volume_id = notice.volume_id
        holders = self.attached[volume_id]
        holders.add(info.instance_id)
        if len(holders) > 1:
            self.violations.double_attach.append(f"{volume_id} on {sorted(holders)}")
        zone = self._volume_zone(volume_id)
        if zone and zone != info.az:
            self.violations.cross_zone.append(
                f"{volume_id} ({zone}) on {info.instance_id} ({info.az})"
            )
        job_id, _ = self._job_of(info.instance_id)
        if not job_id:
            return
        self.known_volumes[volume_id] = job_id
        if job_id not in self.will_crash:
            self.will_crash[job_id] = self.crash_rng.random() < self.config.error_fraction
        # An empty volume restores the job's last S3 sync (what the agent does).
        step = self.volume_step.setdefault(volume_id, self.s3_step.get(job_id, 0))
        loss = self.max_step[job_id] - step
        self.max_loss[job_id] = max(self.max_loss[job_id], loss)
        if loss > self.config.checkpoint_steps:
            self.violations.lost_steps[job_id] = loss
        noticed = self.cloud.instance_action(info.instance_id) is not None
        if self.rng.random() < self.config.warning_drop_probability:
            # As often as EventBridge loses a warning, the agent misses IMDS's notice
            # too: the instance vanishes mid-interval, losing up to one interval.
            self.deaf.add(info.instance_id)
        self.agents[info.instance_id] = _Agent(
            job_id, info.instance_id, volume_id, now, step, stopped=noticed
        )

    def _volume_zone(self, volume_id: str) -> str:
        if volume_id not in self.volume_az:
            volumes = self.ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"]
            self.volume_az[volume_id] = volumes[0]["AvailabilityZone"] if volumes else ""
        return self.volume_az[volume_id]

    def _job_of(self, instance_id: str) -> tuple[str, int]:
        if instance_id not in self.job_of:
            reservations = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
            tags = {t["Key"]: t["Value"] for t in reservations[0]["Instances"][0].get("Tags", [])}
            self.job_of[instance_id] = (
                tags.get("spotctl:job-id", ""),
                int(tags.get("spotctl:attempt", "0")),
            )
        return self.job_of[instance_id]

    # the workload --------------------------------------------------------------------

    def _progress(self, agent: _Agent, now: float) -> int:
        return min(
            self.total_steps, agent.resume_step + int((now - agent.started_at) / STEP_SECONDS)
        )

    def _checkpoint(self, agent: _Agent, step: int) -> None:
        if step > self.volume_step.get(agent.volume_id, 0):
            self.volume_step[agent.volume_id] = step
            self.s3_step[agent.job_id] = max(self.s3_step.get(agent.job_id, 0), step)

    def step_agents(self, now: float) -> None:
        for agent in list(self.agents.values()):
            if agent.stopped or agent.exited:
                continue
            progress = self._progress(agent, now)
            self.max_step[agent.job_id] = max(self.max_step[agent.job_id], progress)
            notice = self.cloud.instance_action(agent.instance_id)
            deaf = agent.instance_id in self.deaf
            if notice is not None and not deaf:
                self._checkpoint(agent, progress)  # the SIGTERM checkpoint within the notice
                agent.stopped = True
                self._tell_interrupted(agent)
            elif self._crashes(agent, progress):
                self.crashed.add(agent.job_id)
                self._exit(agent, 1)  # no checkpoint: what it had saved is what is left
            elif progress >= self.total_steps:
                self._checkpoint(agent, progress)
                self.finished.add(agent.job_id)
                self._exit(agent, 0)
            elif not deaf and LEAVE_TAG in (self.cloud.metadata_tags(agent.instance_id) or {}):
                self._checkpoint(agent, progress)  # asked to leave: stop, checkpoint, go
                agent.stopped = True
                self._tell_interrupted(agent)
                self.ec2.terminate_instances(InstanceIds=[agent.instance_id])  # shutdown
            else:
                done = progress - agent.resume_step
                saved = agent.resume_step + done - done % self.config.checkpoint_steps
                self._checkpoint(agent, saved)
        reports, self.pending_reports = self.pending_reports, []
        for job_id, attempt, body in reports:
            try:
                self.report(job_id, attempt, body)
            except LambdaCrash:
                self.pending_reports.append((job_id, attempt, body))  # the agent retries

    def _crashes(self, agent: _Agent, progress: int) -> bool:
        return (
            self.will_crash.get(agent.job_id, False)
            and agent.job_id not in self.crashed
            and progress >= self.total_steps // 2
        )

    def _exit(self, agent: _Agent, code: int) -> None:
        """Report the workload's exit through the API, and shut the instance down."""
        agent.exited = True
        _, attempt = self._job_of(agent.instance_id)
        # What it saved is in S3 as on the volume (a checkpoint here is both): synced.
        body = {"attempt": attempt, "kind": "exited", "exit_code": code, "synced": True}
        self.pending_reports.append((agent.job_id, attempt, body))
        self.ec2.terminate_instances(InstanceIds=[agent.instance_id])  # shutdown

    def _tell_interrupted(self, agent: _Agent) -> None:
        """The agent's last report after its stop: its final sync worked."""
        _, attempt = self._job_of(agent.instance_id)
        body = {"attempt": attempt, "kind": "interrupted", "detail": "sync ok", "synced": True}
        self.pending_reports.append((agent.job_id, attempt, body))

    # the auditor ------------------------------------------------------------------------

    def audit(self, terminal: Callable[[str], bool]) -> list[str]:
        """Check EC2 as it is now; returns live instances of jobs that have ended."""
        pages = self.ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}]
        )
        healthy: dict[str, list[str]] = defaultdict(list)
        after_end = []
        for page in pages:
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    iid = instance["InstanceId"]
                    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                    job_id = tags.get("spotctl:job-id")
                    if job_id is None:
                        continue
                    self.job_of.setdefault(iid, (job_id, int(tags.get("spotctl:attempt", "0"))))
                    if terminal(job_id):
                        after_end.append(iid)
                    # An instance under an interruption notice may overlap its replacement.
                    if self.cloud.ec2.interruption(iid) is None:
                        healthy[job_id].append(iid)
        for job_id, ids in healthy.items():
            if len(ids) > 1:
                self.violations.double_live.setdefault(job_id, ", ".join(sorted(ids)))
        volumes = {v["VolumeId"] for v in self.ec2.describe_volumes()["Volumes"]}
        for volume_id, job_id in list(self.known_volumes.items()):
            if volume_id not in volumes:
                del self.known_volumes[volume_id]
                if self.volume_step.get(volume_id, 0) > self.s3_step.get(job_id, 0):
                    self.violations.unsafe_deletes.append(f"{volume_id} of {job_id}")
        return after_end


# -- the run -----------------------------------------------------------------------------


@dataclass
class ChaosReport:
    config: dict[str, Any]
    wall_seconds: float
    jobs: int
    states: dict[str, int]
    faults: dict[str, int]
    backoff_seconds_requested: float
    interruptions: int
    attempts_launched: int
    on_demand_attempts: int
    left_on_demand: int  # on-demand instances ended by the sweep to go back to spot
    workload_crashes: int  # workloads that exited 1 half-way (the agent double's crash)
    restarts_on_errors: int  # restarts the control plane made for them
    max_steps_lost: int
    violations: dict[str, int]
    examples: dict[str, list[str]]
    agent_model: str = (
        "agent double (not the real user-data agent): one step per sandbox minute while "
        "its volume is attached, checkpoint + S3 sync every checkpoint_steps, checkpoint on "
        "IMDS notice (misses it as often as a warning is dropped), checkpoints and shuts "
        "down on the IMDS leave tag (unless it missed notices), reports exited via the "
        "API and shuts down; after a notice or a TerminateInstances, reports interrupted "
        "with its sync done; error_fraction of them exit 1 once half-way, unsaved"
    )

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())


def _set_env(values: dict[str, str]) -> dict[str, str | None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    return saved


def _restore_env(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def run(config: ChaosConfig, log: Callable[[str], None] = lambda _: None) -> ChaosReport:
    started = time.perf_counter()
    rng = random.Random(config.seed)
    clock = FakeClock(START)
    bus = ChaosBus(seed=config.seed, reorder_window=config.reorder_window)
    bus.max_copies = config.max_deliveries
    bus.warning_drop_probability = config.warning_drop_probability
    paths = [TRACES / f"{name}.json" for name in TRACE_FILES]
    cloud = LocalCloud(
        clock=clock,
        pools=pools_from_traces(
            paths, trace_offset_seconds=config.trace_offset_tick * TRACE_GAP_SECONDS
        ),
        bus=bus,
        region=REGION,
        seed=config.seed,
        detach_seconds=config.detach_seconds,
        on_demand_prices=dict(config.on_demand_prices),
        unlisted_pools_available=False,
        background=False,
    )
    saved = _set_env(
        {
            **FAKE_CREDENTIALS,
            "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "POWERTOOLS_METRICS_DISABLED": "true",
        }
    )
    logging.getLogger("spotctl").setLevel(logging.CRITICAL)
    logging.getLogger("spotctl.sandbox").setLevel(logging.CRITICAL)
    cloud.start()
    try:
        return _run(config, rng, clock, bus, cloud, started, log)
    finally:
        cloud.stop()
        from chalicelib import runtime

        runtime.reset()
        _restore_env(saved)


def _run(
    config: ChaosConfig,
    rng: random.Random,
    clock: FakeClock,
    bus: ChaosBus,
    cloud: LocalCloud,
    started: float,
    log: Callable[[str], None],
) -> ChaosReport:
    from chalicelib import runtime
    from chalicelib.agent_auth import derive_secret
    from chalicelib.store import create_table
    from spotctl.sandbox.sandbox import load_app

    ami = cloud.client("ec2").register_image(Name="spotctl-chaos")["ImageId"]
    saved = _set_env(
        {
            **cloud.env(),
            "SPOTCTL_TABLE": TABLE,
            "SPOTCTL_SIGNING_KEY": SIGNING_KEY,
            "SPOTCTL_API_URL": "http://127.0.0.1:9",
            "SPOTCTL_BUCKET": "spotctl-chaos",
            "SPOTCTL_AMI_ID": ami,
        }
    )
    try:
        app = load_app()
        create_table(cloud.client("dynamodb"), TABLE)
        runtime.reset()
        plane = runtime.control_plane()
        plane.reconciler.clock = clock.now
        plane.service.clock = clock.now
        logging.getLogger("spotctl").setLevel(logging.CRITICAL)
        injector = Injector(rng, config.crash_probability, config.throttle_probability)
        injector.attach(plane.reconciler.ec2._client, plane.store._client)
        bus.injector = injector
        for target in targets_from_chalice_app(app):
            cloud.add_target(target.pattern, target.handler, target.name)
        for schedule in schedules_from_chalice_app(app, every_seconds=config.sweep_seconds):
            cloud.add_schedule(
                ScheduleTarget(schedule.name, schedule.every_seconds, schedule.handler)
            )

        def report(job_id: str, attempt: int, body: dict[str, Any]) -> None:
            secret = derive_secret(SIGNING_KEY, job_id)
            with injector.invocation("agent_report"):
                try:
                    plane.service.report(job_id, f"Bearer {secret}", body)
                except Exception:  # an API error: the agent tries again on its next beat
                    injector.counts["report-errors"] += 1
                    raise LambdaCrash("report failed") from None

        world = World(cloud, config, report)
        cloud.add_observer(world.observe)
        with recorded_backoff(injector):
            return _drive(config, rng, clock, cloud, plane, injector, world, bus, started, log)
    finally:
        _restore_env(saved)


def _drive(
    config: ChaosConfig,
    rng: random.Random,
    clock: FakeClock,
    cloud: LocalCloud,
    plane: Any,
    injector: Injector,
    world: World,
    bus: ChaosBus,
    started: float,
    log: Callable[[str], None],
) -> ChaosReport:
    from chalicelib.models import JobState

    spec = {
        "name": "chaos",
        "command": ["python", "train.py"],
        "instance_types": ["p3.2xlarge", "p2.xlarge"],
        "max_price_per_hour": config.max_price_per_hour,
        "availability_zones": ["us-west-2a", "us-west-2b"],
        "volume_gib": 50,
        "results_s3_uri": "s3://spotctl-chaos/results",
        "max_restarts_on_errors": 1,
    }
    arrivals = sorted(
        START + rng.uniform(0, config.arrival_hours * 3600) for _ in range(config.jobs)
    )
    cancel_at: dict[str, float] = {}
    job_ids: list[str] = []
    terminal_states: dict[str, str] = {}
    ended_at: dict[str, float] = {}
    pending_cancels: list[str] = []

    def is_terminal(job_id: str) -> bool:
        return job_id in terminal_states

    end_of_chaos = START + config.horizon_hours * 3600
    end = end_of_chaos + config.drain_hours * 3600
    last_log = time.perf_counter()
    leftovers: set[str] = set()
    ticks = 0
    while clock.now() < end:
        now = clock.now()
        while arrivals and arrivals[0] <= now:
            arrivals.pop(0)
            wanted = dict(spec)
            if rng.random() < config.deadline_fraction:
                hours = config.work_hours * config.deadline_factor
                wanted["expected_hours"] = config.work_hours
                wanted["deadline"] = datetime.fromtimestamp(now + hours * 3600, UTC).isoformat()
            try:
                with injector.invocation("submit_job", first=2):  # call 1 stores the job
                    job = plane.service.submit(wanted)
                    job_ids.append(job.job_id)
            except LambdaCrash:
                # The job was stored before the crash; the sweep takes it from there.
                job_ids = [j for j in _all_job_ids(plane) if j]
            if job_ids and rng.random() < config.cancel_fraction:
                cancel_at[job_ids[-1]] = now + rng.uniform(600, config.work_hours * 3600)
        for job_id, when in list(cancel_at.items()):
            if when <= now:
                del cancel_at[job_id]
                pending_cancels.append(job_id)
        for job_id in list(pending_cancels):
            try:
                with injector.invocation("cancel_job"):
                    if not plane.store.get(job_id).state.is_terminal():
                        plane.service.cancel(job_id, {"delete_volume": "true"})
                pending_cancels.remove(job_id)
            except LambdaCrash:
                pass  # the user tries again
            except Exception:
                pending_cancels.remove(job_id)  # already ended: a 409 the user accepts
        if now >= end_of_chaos:
            injector.crash_probability = 0.0
            injector.throttle_probability = 0.0
            bus.warning_drop_probability = 0.0
        cloud.advance(STEP_SECONDS)
        world.step_agents(clock.now())
        ticks += 1
        if ticks % config.audit_every == 0:
            live = set(plane.store.live_job_ids())
            for job_id in job_ids:
                if job_id not in live and job_id not in terminal_states:
                    terminal_states[job_id] = "ended"
                    ended_at[job_id] = clock.now()
        for iid in world.audit(is_terminal) if ticks % config.audit_every == 0 else ():
            job_id = world.job_of[iid][0]
            # Ended jobs get their instances ended by the next pass or two.
            if clock.now() - ended_at.get(job_id, clock.now()) > 600:
                leftovers.add(iid)
        if len(terminal_states) == config.jobs and not arrivals:
            break
        if time.perf_counter() - last_log > 10:
            last_log = time.perf_counter()
            hours = (clock.now() - START) / 3600
            broken = {k: len(v) for k, v in asdict(world.violations).items() if v}
            log(f"  t={hours:5.2f} h  ended {len(terminal_states)}/{config.jobs}  {broken}")

    states = Counter(plane.store.get(j).state.value for j in job_ids)
    violations = world.violations
    violations.leftover_instances = sorted(leftovers)
    for job_id in job_ids:
        stored = plane.store.get(job_id)
        if not stored.state.is_terminal():
            violations.lost_jobs.append(f"{job_id} {stored.state.value}")
        elif stored.state == JobState.SUCCEEDED and job_id not in world.finished:
            violations.false_success.append(job_id)
        crashes = 1 if job_id in world.crashed else 0
        if stored.state != JobState.CANCELLED and stored.error_restarts != crashes:
            violations.wrong_restarts.append(
                f"{job_id}: crashed {crashes}, restarted {stored.error_restarts}"
            )
    interruptions = sum(
        1
        for j in job_ids
        for a in plane.store.get(j).attempts
        if a.end_reason in ("interrupted", "reclaimed")
    )
    launched = sum(1 for _ in world.job_of)
    attempts = [a for j in job_ids for a in plane.store.get(j).attempts if a.instance_id]
    on_demand = sum(1 for a in attempts if a.market == "on-demand")
    left = sum(1 for a in attempts if a.end_reason == "left-on-demand")
    adopted = sum(
        1 for j in job_ids for e in plane.store.get(j).timeline if e.kind == "launch-adopted"
    )
    faults = dict(injector.counts)
    faults["dropped-warnings"] = bus.dropped_warnings
    faults["launches-adopted-after-a-crash"] = adopted  # from the records, for information
    faults["event-deliveries"] = len(bus.delivered)
    faults["event-delivery-failures"] = len(bus.failures)
    as_lists = asdict(violations)
    counts = {name: len(value) for name, value in as_lists.items()}
    examples = {
        name: (list(value.items()) if isinstance(value, dict) else list(value))[:5]
        for name, value in as_lists.items()
        if value
    }
    return ChaosReport(
        config=asdict(config),
        wall_seconds=round(time.perf_counter() - started, 1),
        jobs=len(job_ids),
        states=dict(states),
        faults=faults,
        backoff_seconds_requested=round(injector.backoff_seconds, 1),
        interruptions=interruptions,
        attempts_launched=launched,
        on_demand_attempts=on_demand,
        left_on_demand=left,
        workload_crashes=len(world.crashed),
        restarts_on_errors=sum(plane.store.get(j).error_restarts for j in job_ids),
        max_steps_lost=max(world.max_loss.values(), default=0),
        violations=counts,
        examples={k: [str(x) for x in v] for k, v in examples.items()},
    )


def _all_job_ids(plane: Any) -> list[str]:
    from chalicelib.models import JobState

    ids: list[str] = []
    for state in JobState:
        token = None
        while True:
            jobs, token = plane.store.page(state, 100, token)
            ids += [job.job_id for job in jobs]
            if token is None:
                break
    return sorted(set(ids), key=ids.index)


def render(report: ChaosReport) -> str:
    lines = [
        f"chaos: {report.jobs} jobs, seed {report.config['seed']}, "
        f"{report.wall_seconds:.0f} s wall",
        f"  instances: {report.agent_model}",
        f"  end states: {report.states}",
        f"  interruptions recorded: {report.interruptions}; instances launched: "
        f"{report.attempts_launched}; on-demand: {report.on_demand_attempts}, of which "
        f"{report.left_on_demand} left for spot by the sweep",
        f"  workload crashes: {report.workload_crashes}; restarts on errors: "
        f"{report.restarts_on_errors}",
        "  faults injected: " + ", ".join(f"{k}={v}" for k, v in sorted(report.faults.items())),
        f"  botocore backoff requested: {report.backoff_seconds_requested} s (slept at 1/1000)",
        f"  most checkpoint steps lost by one job: {report.max_steps_lost} "
        f"(allowed: {report.config['checkpoint_steps']})",
        "  invariants (all must be 0):",
    ]
    labels = {
        "lost_jobs": "jobs lost (not terminal at the end)",
        "double_live": "jobs that ever had two live un-noticed instances",
        "double_attach": "volumes attached to two instances",
        "cross_zone": "volumes attached across AZs",
        "unsafe_deletes": "volumes deleted with unsynced data",
        "leftover_instances": "instances running > 10 min after their job ended",
        "lost_steps": "jobs that lost steps beyond the checkpoint interval",
        "false_success": "jobs SUCCEEDED whose work never finished",
        "wrong_restarts": "jobs restarted on errors other than the once they crashed",
    }
    for name, label in labels.items():
        lines.append(f"    {label}: {report.violations[name]}")
        for example in report.examples.get(name, []):
            lines.append(f"      e.g. {example}")
    lines.append("  OK" if report.ok else "  FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work-hours", type=float, default=0.75)
    parser.add_argument("--checkpoint-steps", type=int, default=10)
    parser.add_argument("--arrival-hours", type=float, default=0.1)
    parser.add_argument("--horizon-hours", type=float, default=1.25)
    parser.add_argument("--drain-hours", type=float, default=1.25)
    parser.add_argument("--sweep-seconds", type=float, default=300.0)
    args = parser.parse_args(argv)
    config = ChaosConfig(
        jobs=args.jobs,
        seed=args.seed,
        work_hours=args.work_hours,
        checkpoint_steps=args.checkpoint_steps,
        arrival_hours=args.arrival_hours,
        horizon_hours=args.horizon_hours,
        drain_hours=args.drain_hours,
        sweep_seconds=args.sweep_seconds,
    )
    report = run(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(render(report))
    RESULTS.mkdir(exist_ok=True)
    document = {**asdict(report), "ok": report.ok}
    (RESULTS / "chaos.json").write_text(json.dumps(document, indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
