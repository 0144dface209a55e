"""A cancel that deletes the volume, through the sandbox and the real agent: the control
plane tags the running instance ``spotctl:leave`` instead of terminating it; the agent
reads the tag in the emulated IMDS, stops the trainer (which checkpoints), syncs to S3,
reports ``interrupted`` with ``synced`` and shuts the instance down; once the volume is
detached it is deleted, and the step the trainer stopped at is safe in S3."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from spotctl.cli import call
from spotctl.sandbox.sandbox import Sandbox
from tests.e2e.test_sandbox_e2e import SPEED, assert_nothing_left, submit
from tests.sandbox.conftest import write_trace


def events_of(job: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e for e in job["events"] if e["kind"] == kind]


def wait_until(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_cancel_that_deletes_the_volume_drains_the_instance_first(tmp_path: Path) -> None:
    trace = write_trace(tmp_path, "us-west-2a_v100_1.json", 600, [0] * 24)  # spot for good
    sandbox = Sandbox(tmp_path / "sandbox", speed=SPEED, trace_paths=[trace], seed=5)
    with sandbox:
        ports = sandbox.ports()
        job_id = submit(sandbox, "cancelled", "--step-delay=0.05")["job_id"]

        def get() -> Any:
            return call(sandbox.api_url, "GET", f"/jobs/{job_id}", token=sandbox.api_token)

        wait_until("the trainer's first checkpoint", lambda: events_of(get(), "agent-started"))
        time.sleep(2.0)  # a few dozen steps
        volume_id = get()["volume"]["volume_id"]
        path = f"/jobs/{job_id}?delete_volume=true"
        answer = call(sandbox.api_url, "DELETE", path, token=sandbox.api_token)
        assert answer["delete_volume_on_cancel"] is True
        job = wait_until("the cancel", lambda: (j := get())["state"] == "CANCELLED" and j)
        ec2 = sandbox.client("ec2")
        states = [
            i["State"]["Name"]
            for r in ec2.describe_instances()["Reservations"]
            for i in r["Instances"]
        ]
        volumes = ec2.describe_volumes(Filters=[{"Name": "volume-id", "Values": [volume_id]}])
        listed = sandbox.client("s3").list_objects_v2(
            Bucket="spotctl-sandbox", Prefix=f"jobs/{job_id}/checkpoints/"
        )

    timeline = json.dumps(job["events"], indent=1)
    [cancelling] = events_of(job, "cancelling")
    assert cancelling["detail"].startswith("asking to drain"), timeline
    [told] = events_of(job, "agent-interrupted")
    assert told["detail"].startswith("asked to leave ("), timeline
    assert "sync ok" in told["detail"]
    assert [e["detail"] for e in events_of(job, "volume-deleted")] == [volume_id], timeline
    assert events_of(job, "volume-kept") == []
    assert [a["end_reason"] for a in job["attempts"] if a["instance_id"]] == ["cancelled"]
    assert volumes["Volumes"] == []
    # What the trainer saved when the agent stopped it is in S3: the volume held no more.
    instance = job["attempts"][-1]["instance_id"]
    log = (sandbox.emulator.instance_dir(instance) / "log" / "workload.log").read_text()
    stopped = re.search(r"SIGTERM: stopped at step (\d+)", log)
    assert stopped is not None, log
    saved = [o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", [])]
    assert f"ckpt-{int(stopped[1]):08d}.npz" in saved, saved
    assert_nothing_left(sandbox, ports, states)


@pytest.fixture(autouse=True)
def _no_stray_aws_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("SPOTCTL_API_URL", raising=False)
