"""Interruption storm: N jobs in one pool (one AZ) warned within the same two minutes,
on the sandbox with EC2's request token buckets enforced on the sandbox clock.

Two ways to answer the warnings, both with the real control plane:

- ``per-job``: app.py's ``on_interruption_warning``, one Lambda invocation and one
  ``RunInstances`` per warning (EventBridge → Lambda);
- ``batched``: the warnings of each one-second window in one call of
  ``chalicelib.batch.BatchRecovery`` (EventBridge → SQS → Lambda with a batch), one
  ``RunInstances`` per pool and up to 100 instances.

In both, the volumes move with the usual loop (state-change events and the sweep).
Measured on the sandbox clock from the first warning: when the last replacement was
requested (its RunInstances succeeded) and when the last volume was attached to a
replacement; plus the RequestLimitExceeded answers, per action. Lambda invocations
run one at a time and botocore's backoff waits on the sandbox clock
(``bench.world.backoff_on_sandbox_clock``).

    .venv/bin/python -m bench.storm [--jobs 1000]

Writes bench/results/storm.json and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.world import World, backoff_on_sandbox_clock
from spotctl.sandbox.ec2 import Lifecycle, LifecycleEvent
from spotctl.sandbox.events import EventTarget
from spotctl.sandbox.throttle import EC2_LIMITS, MUTATING, RUN_INSTANCES, Ec2Throttle

RESULTS = Path(__file__).parent / "results"
NOTICE_SPREAD_SECONDS = 120.0
NOTICE_SECONDS = 120.0  # EC2's two-minute interruption notice
DETACH_SECONDS = 10.0
STEP_SECONDS = 1.0
MAX_BATCH = 100  # chalicelib.batch.MAX_BATCH, not imported: the per-job run never loads it


def storm(jobs: int, strategy: str, limit_seconds: float) -> dict[str, Any]:
    batched = strategy == "batched"

    def wanted(name: str) -> bool:
        return not (batched and name == "on_interruption_warning")

    started = time.perf_counter()
    with World(detach_seconds=DETACH_SECONDS, handlers=wanted) as world:
        job_instances = world.submit_running(jobs)
        old = set(job_instances.values())
        queue: list[str] = []
        if batched:
            # As deployed: EventBridge puts each warning on the SQS queue; the event source
            # mapping invokes app.py's on_interruption_warning_batch with up to
            # WARNINGS_BATCH_SIZE messages once the oldest has waited the batching window
            # (or the batch is full); the handler renders the real batch user data, and the
            # messages it reports failed come back. Held messages go back to the queue.
            from dataclasses import dataclass

            from app import WARNINGS_BATCH_SIZE, WARNINGS_BATCHING_WINDOW_SECONDS
            from spotctl.sandbox.events import LambdaContext

            handler = world.app.handler_map["on_interruption_warning_batch"]

            @dataclass
            class Delivered:
                retry: list[str]  # message bodies to deliver again (or not yet)

            class SqsDelivery:
                def __init__(self) -> None:
                    self.since: dict[str, float] = {}  # body -> when it was first queued

                def recover(self, bodies: list[str]) -> Delivered:
                    now = world.clock.now()
                    for body in bodies:
                        self.since.setdefault(body, now)
                    oldest = min(self.since[b] for b in bodies)
                    if (
                        len(bodies) < WARNINGS_BATCH_SIZE
                        and now - oldest < WARNINGS_BATCHING_WINDOW_SECONDS
                    ):
                        return Delivered(bodies)
                    again: list[str] = []
                    for start in range(0, len(bodies), WARNINGS_BATCH_SIZE):
                        chunk = bodies[start : start + WARNINGS_BATCH_SIZE]
                        records = [
                            {"messageId": f"m-{n}", "receiptHandle": f"m-{n}", "body": body}
                            for n, body in enumerate(chunk)
                        ]
                        answer = handler(
                            {"Records": records}, LambdaContext("on_interruption_warning_batch")
                        )
                        failed = {f["itemIdentifier"] for f in answer["batchItemFailures"]}
                        again += [b for n, b in enumerate(chunk) if f"m-{n}" in failed]
                    for body in bodies:
                        if body not in again:
                            del self.since[body]
                    return Delivered(again)

            recovery = SqsDelivery()
            world.add_target(
                EventTarget(
                    {
                        "source": ["aws.ec2"],
                        "detail-type": ["EC2 Spot Instance Interruption Warning"],
                    },
                    lambda event: queue.append(json.dumps(event, default=str)),
                    "to-sqs",
                )
            )

        attached: dict[str, float] = {}

        def observe(notice: LifecycleEvent) -> None:
            if notice.kind == Lifecycle.VOLUME_ATTACHED and notice.instance.instance_id not in old:
                attached.setdefault(notice.instance.instance_id, world.clock.now())

        world.cloud.add_observer(observe)
        throttle = Ec2Throttle(world.clock)
        world.cloud.ec2.throttle = throttle
        t0 = world.clock.now()
        due = sorted(
            (t0 + NOTICE_SPREAD_SECONDS * i / jobs, iid)
            for i, iid in enumerate(sorted(job_instances.values()))
        )
        batch_calls = 0
        with backoff_on_sandbox_clock(world.clock):
            while len(attached) < jobs and world.clock.now() - t0 < limit_seconds:
                now = world.clock.now()
                while due and due[0][0] <= now:
                    world.cloud.ec2.interrupt(due.pop(0)[1])
                world.cloud.tick()
                if batched and queue:
                    warned, queue[:] = list(queue), []
                    batch_calls += 1
                    outcome = recovery.recover(warned)
                    queue.extend(outcome.retry)
                world.clock.advance(STEP_SECONDS)
        end = world.clock.now()
        requested = _replacement_times(world, job_instances)
        invariants = _invariants(world, job_instances)
        real_seconds = time.perf_counter() - started
    launched = sorted(requested.values())
    return {
        "strategy": strategy,
        "jobs": jobs,
        "recovered_jobs": len(attached),
        "all_replacements_requested_s": round(launched[-1] - t0, 1) if launched else None,
        "replacements_requested": len(launched),
        "all_volumes_attached_s": round(max(attached.values()) - t0, 1)
        if len(attached) == jobs
        else None,
        "gave_up_after_s": None if len(attached) == jobs else round(end - t0, 1),
        "throttled": dict(sorted(throttle.throttled.items())),
        "throttled_total": sum(throttle.throttled.values()),
        "admitted": dict(sorted(throttle.admitted.items())),
        "batch_invocations": batch_calls if batched else None,
        **invariants,
        "real_seconds": round(real_seconds, 1),
    }


def _replacement_times(world: World, job_instances: dict[str, str]) -> dict[str, float]:
    """Job id -> when its replacement's RunInstances succeeded (its timeline says)."""
    times = {}
    for job_id in job_instances:
        job = world.plane.store.get(job_id)
        for event in job.timeline:
            if event.kind == "launched" and (event.attempt or 0) >= 2:
                times[job_id] = event.at
                break
    return times


def _invariants(world: World, job_instances: dict[str, str]) -> dict[str, int]:
    """No job with two live replacements, no launched instance left without a job."""
    owned: set[str] = set()
    doubled = 0
    for job_id in job_instances:
        job = world.plane.store.get(job_id)
        launched = [a.instance_id for a in job.attempts if a.instance_id]
        owned.update(i for i in launched if i is not None)
        doubled += len([a for a in job.attempts if a.instance_id and not a.ended]) > 1
    live = {
        info.instance_id
        for info in world.cloud.ec2.instances()
        if world.cloud.ec2.instance_state(info.instance_id) in ("pending", "running")
    }
    return {"jobs_with_two_live_attempts": doubled, "live_instances_of_no_job": len(live - owned)}


def floors(jobs: int, detach_seconds: float = DETACH_SECONDS) -> dict[str, float]:
    """What the token buckets (and the warnings' own timing) allow at best, from the
    first warning."""
    run = EC2_LIMITS[RUN_INSTANCES]
    mutating = EC2_LIMITS[MUTATING]
    last_warning = NOTICE_SPREAD_SECONDS * (jobs - 1) / jobs if jobs else 0.0
    # Batched: one RunInstances per MAX_BATCH warnings of a pool, far inside the bucket,
    # so the last warning's arrival is the bound.
    batch_calls = -(-jobs // MAX_BATCH)
    batched = max(last_warning, max(0.0, batch_calls - run.burst) / run.refill_per_second)
    return {
        "per_job_run_instances_s": round(max(0.0, jobs - run.burst) / run.refill_per_second, 1),
        "batched_run_instances_s": round(batched, 1),
        "attach_volumes_s": round(max(0.0, jobs - mutating.burst) / mutating.refill_per_second, 1),
        "warnings_spread_s": NOTICE_SPREAD_SECONDS,
        # The last warned instance stops two minutes after its warning; its volume is
        # free once the detach is done: no attach can come earlier.
        "last_volume_free_s": round(last_warning + NOTICE_SECONDS + detach_seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--limit", type=float, default=3600.0, help="sandbox seconds")
    parser.add_argument("--strategy", choices=["per-job", "batched", "both"], default="both")
    parser.add_argument("--out", default="storm.json", help="file name under bench/results")
    args = parser.parse_args(argv)
    strategies = ["per-job", "batched"] if args.strategy == "both" else [args.strategy]
    result: dict[str, Any] = {
        "jobs": args.jobs,
        "limits": {
            k: {"burst": v.burst, "per_second": v.refill_per_second} for k, v in EC2_LIMITS.items()
        },
        "floors": floors(args.jobs),
        "runs": [storm(args.jobs, s, args.limit) for s in strategies],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
