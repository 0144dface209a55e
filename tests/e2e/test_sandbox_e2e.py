"""The mission through the sandbox: HTTP API, real user data and agent, a trace-driven
spot interruption, EventBridge delivering duplicated and reordered events, and the job
ending SUCCEEDED with the weights of an uninterrupted run; nothing left behind.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spotctl import cli
from spotctl.cli import call, interruptions, render_status
from spotctl.sandbox.sandbox import EXAMPLE_TRAINER, Sandbox
from tests.sandbox.conftest import write_trace

TRAIN_ARGS = ["--steps=200", "--checkpoint-every=20"]
SPEED = 60.0  # a ten-minute trace tick lasts ten real seconds


def reference_weights(tmp_path: Path) -> str:
    directory = tmp_path / "reference"
    subprocess.run(
        [sys.executable, str(EXAMPLE_TRAINER), *TRAIN_ARGS, f"--checkpoint-dir={directory}"],
        check=True,
        capture_output=True,
    )
    return str(json.loads((directory / "final.json").read_text())["weights_sha256"])


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def submit(sandbox: Sandbox, name: str, *train_args: str, **fields: Any) -> Any:
    """POST the example trainer as a job in us-west-2a; ``fields`` add to the spec."""
    spec = {
        "name": name,
        "command": ["spotctl-example-train", *TRAIN_ARGS, *train_args],
        "instance_types": ["p3.2xlarge"],
        "availability_zones": ["us-west-2a"],
        "volume_gib": 10,
        "checkpoint": {"grace_seconds": 10},
        **fields,
    }
    return call(sandbox.api_url, "POST", "/jobs", spec, token=sandbox.api_token)


def run_to_the_end(sandbox: Sandbox, job_id: str) -> tuple[Any, Any, list[str]]:
    """Wait for the job to end as a user would, with ``spotctl wait``: its view, its
    ``final.json`` in S3, and the state of every instance EC2 knows."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SPOTCTL_API_TOKEN", sandbox.api_token)
        argv = ["--api-url", sandbox.api_url, "wait", job_id, "--interval", "0.5"]
        code = cli.main([*argv, "--timeout", "75"])
    job = call(sandbox.api_url, "GET", f"/jobs/{job_id}", token=sandbox.api_token)
    assert code == cli.EXIT_CODES.get(job["state"], cli.EXIT_TIMEOUT)
    key = f"jobs/{job_id}/checkpoints/final.json"
    s3 = sandbox.client("s3")
    final = json.loads(s3.get_object(Bucket="spotctl-sandbox", Key=key)["Body"].read())
    reservations = sandbox.client("ec2").describe_instances()["Reservations"]
    states = [i["State"]["Name"] for r in reservations for i in r["Instances"]]
    return job, final, states


def assert_nothing_left(sandbox: Sandbox, ports: list[int], states: list[str]) -> None:
    assert set(states) <= {"terminated", "shutting-down"}, states
    assert sandbox.emulator.live_processes() == []
    assert not any(port_open(port) for port in ports)


def test_interrupted_job_succeeds_with_identical_weights_despite_duplicate_reordered_events(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = reference_weights(tmp_path)
    # Capacity for one tick, none for the next, then back for good.
    trace = write_trace(tmp_path, "us-west-2a_v100_1.json", 600, [0, 1, 0, 0, 0, 0])
    sandbox = Sandbox(
        tmp_path / "sandbox",
        speed=SPEED,
        trace_paths=[trace],
        duplicate_probability=0.5,
        reorder_window=4,
        seed=3,
    )
    with sandbox:
        ports = sandbox.ports()
        job = submit(sandbox, "e2e", "--step-delay=0.06")
        job, final, states = run_to_the_end(sandbox, job["job_id"])
        delivered_twice = len(sandbox.bus.delivered) - len(
            {(name, event["id"]) for name, event in sandbox.bus.delivered}
        )
    assert job["state"] == "SUCCEEDED", json.dumps(job["events"], indent=1)
    assert job["exit_code"] == 0
    assert len(interruptions(job)) >= 1, "the trace took the first instance away"
    followed = capsys.readouterr().out.splitlines()  # what `spotctl wait` printed
    assert [line.split()[2] for line in followed[:-1]] == [e["kind"] for e in job["events"]]
    assert followed[-1] == f"{job['job_id']} SUCCEEDED"
    assert final["weights_sha256"] == expected
    assert delivered_twice > 0, "the bus duplicated some events"
    assert_nothing_left(sandbox, ports, states)


@pytest.mark.parametrize(
    ("allowance", "counted", "told"),
    [
        ({"max_restarts_on_errors": 1}, (1, 0), "  restarts on errors: 1 of 1"),
        ({"recover_on_exit_codes": [1]}, (0, 1), "  restarts on exit codes 1: 1"),
    ],
    ids=["max_restarts_on_errors", "recover_on_exit_codes"],
)
def test_a_workload_that_fails_once_is_restarted_and_ends_with_identical_weights(
    tmp_path: Path, allowance: dict[str, Any], counted: tuple[int, int], told: str
) -> None:
    expected = reference_weights(tmp_path)
    trace = write_trace(tmp_path, "us-west-2a_v100_1.json", 600, [0] * 6)  # never interrupted
    sandbox = Sandbox(tmp_path / "sandbox", speed=SPEED, trace_paths=[trace], seed=5)
    with sandbox:
        ports = sandbox.ports()
        crash = ("--step-delay=0.03", "--crash-once-at-step=70")
        job = submit(sandbox, "e2e-restart", *crash, **allowance)
        job, final, states = run_to_the_end(sandbox, job["job_id"])
        logs = [
            (sandbox.emulator.instance_dir(a["instance_id"]) / "log" / "workload.log").read_text()
            for a in job["attempts"]
        ]
    assert job["state"] == "SUCCEEDED", json.dumps(job["events"], indent=1)
    assert "crashing at step 70" in logs[0], logs[0]
    assert "resumed from step 60" in logs[1], logs[1]  # the volume's checkpoint
    assert (job["exit_code"], job["error_restarts"], job["exit_code_restarts"]) == (0, *counted)
    assert [a["end_reason"] for a in job["attempts"]] == ["failed", "completed"]
    assert told in render_status(job).splitlines()
    assert interruptions(job) == []
    assert final["weights_sha256"] == expected
    assert_nothing_left(sandbox, ports, states)


@pytest.fixture(autouse=True)
def _no_stray_aws_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("SPOTCTL_API_URL", raising=False)
