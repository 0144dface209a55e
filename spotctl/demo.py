"""``make demo``: the mission end to end on one machine, in under three minutes.

Brings the sandbox up, submits examples/demo-job.yaml through the HTTP API, and lets a
real availability trace (us-west-2a, V100, recorded 2022-10-26 onwards, from the
"Can't Be Late" traces) interrupt the job: the spot market takes the instance back
whenever the trace says capacity is gone, with the two-minute warning, and the control
plane brings the job back on a new instance with the same EBS volume. The clock runs
60 times faster than real time (a ten-minute trace tick lasts ten seconds); the training
is a real process and runs in real time.

At the end: each interruption and how long the job was down, the steps lost, the final
weights compared with an uninterrupted run of the same script (run here, checked), and
the cost against on-demand. Nothing is left running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from spotctl.cli import call, interruptions
from spotctl.sandbox.clock import iso
from spotctl.sandbox.sandbox import EXAMPLE_TRAINER, REPO_ROOT, Sandbox

TRACE = REPO_ROOT / "traces" / "aws-10-26-2022" / "us-west-2a_v100_1.json"
# Tick 1436 of the trace (10 days in): available, gone, back, gone, back, gone, then
# three ticks of capacity: three interruptions inside a few sandbox hours.
TRACE_START_TICK = 1436
TRACE_GAP_SECONDS = 600
JOB_SPEC = REPO_ROOT / "examples" / "demo-job.yaml"
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
_STEP = re.compile(r"(?:checkpoint step=|stopped at step |resumed from step )(\d+)")


@dataclass
class AttemptLog:
    """What one attempt's workload.log says about training progress."""

    started_at_step: int | None = None
    last_step: int | None = None
    stopped_on_sigterm: bool = False
    weights_sha256: str | None = None
    lines: list[str] = field(default_factory=list)


def read_attempt_log(path: Path) -> AttemptLog:
    found = AttemptLog()
    if not path.exists():
        return found
    for line in path.read_text(errors="replace").splitlines():
        found.lines.append(line)
        if line.startswith("starting from scratch"):
            found.started_at_step = 0
        elif line.startswith("resumed from step"):
            found.started_at_step = int(line.split()[-1])
        elif line.startswith("SIGTERM: stopped"):
            found.stopped_on_sigterm = True
        elif line.startswith("weights_sha256="):
            found.weights_sha256 = line.partition("=")[2].strip()
        match = _STEP.search(line)
        if match:
            found.last_step = max(found.last_step or 0, int(match[1]))
    return found


def reference_run(argv: list[str], directory: Path) -> str:
    """Run the trainer once, uninterrupted and without delays; its weights' SHA-256."""
    args = [a for a in argv if not a.startswith("--step-delay")]
    subprocess.run(
        [sys.executable, str(EXAMPLE_TRAINER), *args, f"--checkpoint-dir={directory}"],
        check=True,
        capture_output=True,
    )
    result: dict[str, Any] = json.loads((directory / "final.json").read_text())
    return str(result["weights_sha256"])


def port_closed(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) != 0


class Demo:
    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.spec: dict[str, Any] = yaml.safe_load(JOB_SPEC.read_text())

    def run(self) -> int:
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="spotctl-demo-") as tmp:
            root = Path(tmp)
            reference = reference_run(self.spec["command"][1:], root / "reference")
            self.console.print(
                f"uninterrupted reference run: weights_sha256={reference[:16]}...",
                style="dim",
            )
            sandbox = Sandbox(
                root / "sandbox",
                speed=self.args.speed,
                trace_paths=[TRACE],
                trace_offset_seconds=self.args.start_tick * TRACE_GAP_SECONDS,
                seed=self.args.seed,
            )
            with sandbox:
                ports = sandbox.ports()
                self.console.print(
                    f"sandbox up: API {sandbox.api_url}, AWS {sandbox.endpoint_url}, clock "
                    f"x{self.args.speed:g}, trace {TRACE.relative_to(REPO_ROOT)} from tick "
                    f"{self.args.start_tick}"
                )
                job = call(sandbox.api_url, "POST", "/jobs", self.spec, token=sandbox.api_token)
                self.console.print(f"submitted {job['job_id']} through POST /jobs")
                job = self.watch(sandbox, job["job_id"], started)
                logs = self.attempt_logs(sandbox, job)
                final = self.final_result(sandbox, job)
            leftovers = sandbox.emulator.live_processes()
            open_ports = [port for port in ports if not port_closed(port)]
        ok = self.summary(job, logs, final, reference, leftovers, open_ports)
        self.console.print(f"demo took {time.monotonic() - started:.0f} s of real time")
        return 0 if ok else 1

    # -- live ------------------------------------------------------------------------------

    def watch(self, sandbox: Sandbox, job_id: str, started: float) -> dict[str, Any]:
        deadline = time.monotonic() + self.args.timeout
        job: dict[str, Any] = call(
            sandbox.api_url, "GET", f"/jobs/{job_id}", token=sandbox.api_token
        )
        with Live(self.progress(sandbox, job, started), console=self.console) as live:
            while job["state"] not in TERMINAL and time.monotonic() < deadline:
                time.sleep(0.5)
                job = call(sandbox.api_url, "GET", f"/jobs/{job_id}", token=sandbox.api_token)
                live.update(self.progress(sandbox, job, started))
        return job

    def progress(self, sandbox: Sandbox, job: dict[str, Any], started: float) -> Table:
        launched = [a for a in job["attempts"] if a["instance_id"]]
        current = launched[-1] if launched else None
        step = None
        for attempt in launched:
            log = read_attempt_log(self.workload_log(sandbox, attempt["instance_id"]))
            step = log.last_step if log.last_step is not None else step
        now = sandbox.clock.now()
        pool_free = sandbox.cloud.market.available("p3.2xlarge", "us-west-2a", now)
        table = Table(title="spotctl demo", show_header=False, min_width=60)
        table.add_column(style="bold")
        table.add_column()
        table.add_row("sandbox time", f"{iso(now)}  (real {time.monotonic() - started:.0f} s)")
        table.add_row("spot capacity", "[green]yes" if pool_free else "[red]none (trace)")
        table.add_row("job state", f"[cyan]{job['state']}")
        if current is not None:
            table.add_row("instance", f"{current['instance_id']} attempt {current['number']}")
        table.add_row("training step", f"{step if step is not None else '-'} / {self.steps}")
        table.add_row("interruptions", str(job["interruptions"]))
        table.add_row("relaunches", str(max(0, len(launched) - 1)))
        table.add_row(
            "cost so far",
            f"${job['cost_usd']:.4f} (on-demand ${job['on_demand_cost_usd']:.4f})",
        )
        return table

    @property
    def steps(self) -> int:
        for arg in self.spec["command"]:
            if arg.startswith("--steps="):
                return int(arg.partition("=")[2])
        return 0

    @staticmethod
    def workload_log(sandbox: Sandbox, instance_id: str) -> Path:
        return sandbox.emulator.instance_dir(instance_id) / "log" / "workload.log"

    def attempt_logs(self, sandbox: Sandbox, job: dict[str, Any]) -> dict[int, AttemptLog]:
        return {
            a["number"]: read_attempt_log(self.workload_log(sandbox, a["instance_id"]))
            for a in job["attempts"]
            if a["instance_id"]
        }

    @staticmethod
    def final_result(sandbox: Sandbox, job: dict[str, Any]) -> dict[str, Any] | None:
        """final.json as the job left it in S3 (what a user downloads)."""
        key = f"jobs/{job['job_id']}/checkpoints/final.json"
        with contextlib.suppress(Exception):
            body = sandbox.client("s3").get_object(Bucket="spotctl-sandbox", Key=key)["Body"]
            result: dict[str, Any] = json.loads(body.read())
            return result
        return None

    # -- the end -----------------------------------------------------------------------------

    def summary(
        self,
        job: dict[str, Any],
        logs: dict[int, AttemptLog],
        final: dict[str, Any] | None,
        reference: str,
        leftovers: list[int],
        open_ports: list[int],
    ) -> bool:
        out = self.console
        out.print()
        out.rule(f"job {job['job_id']}: {job['state']}")
        table = Table(title="interruptions")
        for column in ("#", "instance", "warned", "gone", "back", "down", "steps lost"):
            table.add_column(column)
        numbers = sorted(logs)
        found = interruptions(job)
        for index, item in enumerate(found, start=1):
            attempt = item["attempt"]
            later = [n for n in numbers if n > attempt]
            before = logs.get(attempt, AttemptLog())
            after = logs[later[0]] if later else None
            lost = "-"
            if after is not None and after.started_at_step is not None:
                if before.stopped_on_sigterm and before.last_step is not None:
                    lost = str(before.last_step - after.started_at_step)
                else:
                    every = self.checkpoint_every
                    lost = f"< {every} (no SIGTERM checkpoint; resumed at {after.started_at_step})"
            down = item["down_minutes"]
            table.add_row(
                str(index),
                item["instance_id"],
                _clock(item["warned_at"]),
                _clock(item["ended_at"]),
                _clock(item["resumed_at"]),
                f"{down:.0f} min" if down is not None else "-",
                lost,
            )
        out.print(table)
        got = (final or {}).get("weights_sha256")
        identical = got == reference
        out.print(
            f"final weights {'[green]IDENTICAL' if identical else '[red]DIFFERENT'}[/] to the "
            f"uninterrupted run: {got} vs {reference}"
        )
        if final is not None:
            out.print(f"test accuracy {final['test_accuracy']:.4f} after {final['steps']} steps")
        cost, on_demand = job["cost_usd"], job["on_demand_cost_usd"]
        share = 100 * (1 - cost / on_demand) if on_demand else 0.0
        out.print(
            f"cost ${cost:.4f} on spot vs ${on_demand:.4f} on-demand for the same "
            f"instance-hours: saved ${job['saved_usd']:.4f} ({share:.0f} %)"
        )
        clean = not leftovers and not open_ports
        out.print(
            "left running: nothing (no process, no port)"
            if clean
            else f"[red]left running: processes {leftovers}, ports {open_ports}"
        )
        enough = len(found) >= 3
        if not enough:
            out.print(f"[yellow]only {len(found)} interruption(s) this time")
        return job["state"] == "SUCCEEDED" and identical and clean

    @property
    def checkpoint_every(self) -> int:
        for arg in self.spec["command"]:
            if arg.startswith("--checkpoint-every="):
                return int(arg.partition("=")[2])
        return 100


def _clock(text: str | None) -> str:
    if not text:
        return "-"
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC).strftime("%H:%M")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="spotctl end to end in the local sandbox")
    parser.add_argument("--speed", type=float, default=60.0, help="sandbox seconds per second")
    parser.add_argument("--start-tick", type=int, default=TRACE_START_TICK)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=150.0, help="real seconds to wait")
    args = parser.parse_args(argv)
    return Demo(args, Console()).run()


if __name__ == "__main__":
    sys.exit(main())
