"""Leaving on-demand for spot, through the sandbox: a deadline job starts on-demand for
want of spot, spot returns, the sweep tags the instance ``spotctl:leave``, the real
agent reads the tag in the emulated IMDS, checkpoints the trainer, syncs and shuts the
instance down, and the job resumes on spot in the same zone on the same volume,
ending SUCCEEDED with the weights of an uninterrupted run; nothing left behind.

Why a second job: another job's refusal, shared through the pool's fleet record, makes
the first plan of ours on-demand straight away, with no refused spot attempt of its
own first; and the leave then hangs on that refusal being forgotten
(``CAPACITY_MEMORY_SECONDS``, 240 s), which the timing below places after spot is back.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from spotctl.cli import call
from spotctl.sandbox.sandbox import Sandbox
from tests.e2e.test_sandbox_e2e import (
    SPEED,
    TRAIN_ARGS,
    assert_nothing_left,
    reference_weights,
    run_to_the_end,
)
from tests.sandbox.conftest import write_trace

HOUR = 3600.0
POOL = {"instance_types": ["p3.2xlarge"], "availability_zones": ["us-west-2a"]}
# Work and deadline as the policy sees them (sandbox hours): 0.6 h of slack in a
# 1.6 h window. Uniform Progress's share is 0.375, the restart-scaled reserve keeps
# its floor, 0.3 of it (0.11 of the time left: 0.18 h now); so the excess (0.42 h)
# is below the 0.75 h cushion that waiting for spot needs: on-demand. On on-demand
# the slack stays 0.5 h (one restart's 0.1 h spent), above the 0.2 h a spot start
# needs (its restart and one more), and above the shrinking reserve: leave for spot
# as soon as spot is believed back.
EXPECTED_HOURS = 1.0
WINDOW_HOURS = 1.6
# No spot for the first twelve sandbox minutes (room for a slow start), then spot for
# good. The jobs are submitted at least SPOT_BACK_AFTER - REFUSAL_REMEMBERED into the
# outage, so that the refusal is forgotten (and the sweep leaves on-demand) only once
# spot is back.
OUTAGE_TICKS, TICK_SECONDS = 12, 60
SPOT_BACK_AFTER = OUTAGE_TICKS * TICK_SECONDS
REFUSAL_REMEMBERED = 200.0  # CAPACITY_MEMORY_SECONDS (240) less a margin


def events_of(job: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e for e in job["events"] if e["kind"] == kind]


def test_deadline_job_started_on_demand_for_want_of_spot_leaves_it_for_spot_when_spot_returns(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    expected = reference_weights(tmp_path)
    flags = [1] * OUTAGE_TICKS + [0] * 120
    trace = write_trace(tmp_path, "us-west-2a_v100_1.json", TICK_SECONDS, flags)
    sandbox = Sandbox(tmp_path / "sandbox", speed=SPEED, trace_paths=[trace], seed=3)
    train = ["spotctl-example-train", *TRAIN_ARGS, "--step-delay=0.06"]
    common = {**POOL, "command": train, "volume_gib": 10}
    with sandbox:
        ports = sandbox.ports()
        into_outage = sandbox.clock.now() - sandbox.cloud.market.start
        print(f"sandbox up {into_outage:.0f} sandbox seconds into the outage")
        time.sleep(max(0.0, SPOT_BACK_AFTER - REFUSAL_REMEMBERED - into_outage) / SPEED)
        # A job with no deadline tries spot, is refused, and shares the refusal.
        scout = call(
            sandbox.api_url, "POST", "/jobs", {**common, "name": "scout"}, token=sandbox.api_token
        )
        assert scout["state"] == "WAITING", json.dumps(scout["events"], indent=1)
        deadline = sandbox.clock.now() + WINDOW_HOURS * HOUR
        spec = {
            **common,
            "name": "leaver",
            "checkpoint": {"grace_seconds": 10},
            "expected_hours": EXPECTED_HOURS,
            "deadline": datetime.fromtimestamp(deadline, UTC).isoformat(),
        }
        job = call(sandbox.api_url, "POST", "/jobs", spec, token=sandbox.api_token)
        into_outage = sandbox.clock.now() - sandbox.cloud.market.start
        assert into_outage < SPOT_BACK_AFTER - 20, f"the sandbox took {into_outage:.0f} s to start"
        assert job["attempts"][0]["market"] == "on-demand", json.dumps(job["events"], indent=1)
        call(sandbox.api_url, "DELETE", f"/jobs/{scout['job_id']}", token=sandbox.api_token)

        job, final, states = run_to_the_end(sandbox, job["job_id"])
    elapsed = time.monotonic() - started
    print(f"wall time {elapsed:.1f} s")  # CI runs it on two cores: keep it well under 90 s

    timeline = json.dumps(job["events"], indent=1)
    assert job["state"] == "SUCCEEDED", timeline
    assert job["exit_code"] == 0
    first, second, *rest = [a for a in job["attempts"] if a["instance_id"]]
    assert rest == [], timeline
    assert first["market"] == "on-demand"
    assert first["end_reason"] == "left-on-demand", timeline
    assert first["left_at"] is not None
    assert second["market"] == "spot"
    assert second["pool"] == first["pool"], "spot in the same zone"
    [leaving] = events_of(job, "leaving-on-demand")
    assert leaving["detail"].startswith(first["instance_id"]), leaving
    assert leaving["attempt"] == first["number"]
    reports = [e for e in events_of(job, "agent-interrupted") if e["attempt"] == first["number"]]
    assert reports, timeline
    assert reports[0]["detail"].startswith("asked to leave ("), reports
    # The volume went with the job: created once, attached to both instances.
    volume_id = job["volume"]["volume_id"]
    assert [e["detail"] for e in events_of(job, "volume-created")] == [volume_id]
    attached = {e["detail"] for e in events_of(job, "running")}
    assert {f"{volume_id} attached to {a['instance_id']}" for a in (first, second)} <= attached
    assert job["interruptions"] == 0
    # The trainer checkpointed on the agent's signal and the spot run went on from there
    # (each instance's own disk, as the emulator keeps it).
    logs = [
        (sandbox.emulator.instance_dir(a["instance_id"]) / "log" / "workload.log").read_text()
        for a in (first, second)
    ]
    stopped = re.search(r"SIGTERM: stopped at step (\d+)", logs[0])
    assert stopped is not None and int(stopped[1]) > 0, logs[0]
    assert f"resumed from step {stopped[1]}" in logs[1], logs[1]
    assert events_of(job, "agent-started")[-1]["detail"].endswith("reused"), timeline
    assert final["weights_sha256"] == expected
    assert_nothing_left(sandbox, ports, states)


@pytest.fixture(autouse=True)
def _no_stray_aws_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("SPOTCTL_API_URL", raising=False)
