"""Downtime per interruption: from the moment the old instance stops to the workload's
first step on its replacement, on the sandbox (FakeClock) with the real control plane.

Two ways to react, same control plane code:

- ``at-warning`` (spotctl): every handler of app.py; the replacement is requested on
  the interruption warning, so its boot overlaps the two-minute notice;
- ``after-termination`` (a polling controller): app.py without its warning handler;
  the replacement is requested when the instance is seen gone (the ``terminated``
  state change, or the one-minute sweep).

The sandbox gives the control-plane times (sandbox clock): when the old instance
stopped, when the replacement's RunInstances succeeded, when the volume was attached
to it. What happens on real hardware after that is a latency model (``MODEL``; every
figure is an assumption, stated in docs/performance.md):

    the terminated event comes TERMINATED_EVENT_S after the stop, with the volume free;
    anything the sandbox did at or after the stop really happens that much later;
    instance running      = launch + PENDING_S        (spot fulfilment, pending → running)
    user data starts      = running + OS_BOOT_S       (GPU AMI boot, cloud-init)
    volume attachable     = max(attach call, running)
    device visible        = attachable + ATTACH_S
    first workload step   = max(user data starts, device visible) + AGENT_START_S
                            (find device by serial, mount, start container, load checkpoint)

    .venv/bin/python -m bench.downtime [--interruptions 50]

Writes bench/results/downtime.json and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from bench.latency import percentile
from bench.world import World
from spotctl.sandbox.ec2 import Lifecycle, LifecycleEvent

RESULTS = Path(__file__).parent / "results"
MODEL = {
    "TERMINATED_EVENT_S": 10.0,
    "PENDING_S": 30.0,
    "OS_BOOT_S": 45.0,
    "ATTACH_S": 5.0,
    "AGENT_START_S": 20.0,
}
SPREAD_SECONDS = 600.0  # interruptions at random moments, so the sweep's phase varies


def first_step(
    stop: float, launch: float, attach: float, model: dict[str, float] | None = None
) -> float:
    """When the workload's first step runs on the replacement (the latency model)."""
    m = MODEL if model is None else model
    late = m["TERMINATED_EVENT_S"]
    launch = launch + late if launch >= stop else launch
    attach = attach + late if attach >= stop else attach
    running = launch + m["PENDING_S"]
    user_data = running + m["OS_BOOT_S"]
    device = max(attach, running) + m["ATTACH_S"]
    return max(user_data, device) + m["AGENT_START_S"]


def sensitivity(runs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The median ratio under other boot and agent-start times, same sandbox timings."""
    rows = []
    for os_boot in (15.0, 30.0, 45.0, 90.0):
        for agent in (10.0, 20.0, 60.0):
            model = {**MODEL, "OS_BOOT_S": os_boot, "AGENT_START_S": agent}
            medians = [
                statistics.median(
                    first_step(0.0, s["launch_after_stop_s"], s["attach_after_stop_s"], model)
                    for s in run["samples"]
                )
                for run in runs
            ]
            rows.append(
                {
                    "OS_BOOT_S": os_boot,
                    "AGENT_START_S": agent,
                    "at_warning_p50_s": medians[0],
                    "after_termination_p50_s": medians[1],
                    "ratio": round(medians[0] / medians[1], 3),
                }
            )
    return rows


def run(strategy: str, interruptions: int, seed: int) -> dict[str, Any]:
    def wanted(name: str) -> bool:
        return strategy == "at-warning" or name != "on_interruption_warning"

    started = time.perf_counter()
    with World(detach_seconds=0.0, handlers=wanted) as world:
        job_instances = world.submit_running(interruptions)
        old_of = {iid: job for job, iid in job_instances.items()}
        stopped: dict[str, float] = {}
        attached: dict[str, float] = {}

        def observe(notice: LifecycleEvent) -> None:
            iid = notice.instance.instance_id
            if notice.kind == Lifecycle.TERMINATED and iid in old_of:
                stopped.setdefault(old_of[iid], world.clock.now())
            if notice.kind == Lifecycle.VOLUME_ATTACHED and iid not in old_of:
                attached.setdefault(iid, world.clock.now())

        world.cloud.add_observer(observe)
        rng = random.Random(seed)
        t0 = world.clock.now()
        due = sorted((t0 + rng.uniform(0, SPREAD_SECONDS), iid) for iid in old_of)
        while len(attached) < interruptions and world.clock.now() - t0 < SPREAD_SECONDS + 900:
            while due and due[0][0] <= world.clock.now():
                world.cloud.ec2.interrupt(due.pop(0)[1])
            world.cloud.tick()
            world.clock.advance(1.0)

        samples = []
        for job_id in job_instances:
            job = world.plane.store.get(job_id)
            replacement = job.attempt(2)
            if replacement is None or replacement.instance_id not in attached:
                continue
            launch = next(e.at for e in job.timeline if e.kind == "launched" and e.attempt == 2)
            stop = stopped[job_id]
            step = first_step(stop, launch, attached[replacement.instance_id])
            samples.append(
                {
                    "downtime_s": round(step - stop, 3),
                    "launch_after_stop_s": round(launch - stop, 3),
                    "attach_after_stop_s": round(attached[replacement.instance_id] - stop, 3),
                }
            )
    downtimes = [s["downtime_s"] for s in samples]
    return {
        "strategy": strategy,
        "interruptions": interruptions,
        "measured": len(samples),
        "downtime_s": {
            "p50": round(statistics.median(downtimes), 1),
            "p90": round(percentile(downtimes, 90), 1),
            "max": round(max(downtimes), 1),
            "mean": round(statistics.fmean(downtimes), 1),
        },
        "sandbox_launch_after_stop_s_p50": round(
            statistics.median(s["launch_after_stop_s"] for s in samples), 1
        ),
        "sandbox_attach_after_stop_s_p50": round(
            statistics.median(s["attach_after_stop_s"] for s in samples), 1
        ),
        "real_seconds": round(time.perf_counter() - started, 1),
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interruptions", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    runs = [run(s, args.interruptions, args.seed) for s in ("at-warning", "after-termination")]
    ratio = runs[0]["downtime_s"]["p50"] / runs[1]["downtime_s"]["p50"]
    grid = sensitivity(runs)
    for one in runs:
        del one["samples"]
    result = {
        "model_seconds": MODEL,
        "runs": runs,
        "median_ratio_at_warning_over_after_termination": round(ratio, 3),
        "target_ratio_at_most": round(1 / 3, 3),
        "sensitivity": grid,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "downtime.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
