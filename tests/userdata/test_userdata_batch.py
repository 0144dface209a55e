"""A batch's user data, run by bash like any instance's: each instance of the request
keeps the member table's entry at its ami-launch-index, and nothing else."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from chalicelib.userdata import AgentParams
from tests.userdata.userdata_harness import Instance, Machine, machine, python_workload

# Records which job it runs as, then exits 0.
RECORDER = """
import json, os
out = os.path.join(os.environ["SPOTCTL_CHECKPOINT_DIR"], "..", "seen.json")
with open(out, "w") as f:
    json.dump({k: os.environ.get(k) for k in ("SPOTCTL_JOB_ID", "SPOTCTL_ATTEMPT")}, f)
"""


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Machine]:
    yield from machine(tmp_path)


def members(box: Instance, command: list[str], count: int = 3) -> list[AgentParams]:
    """``count`` jobs, each with its own id, attempt, secret, volume and prefix."""
    return [
        box.params(
            command,
            job_id=f"job-{n}",
            attempt=n + 2,
            secret=f"secret-of-job-{n}-" + "x" * 40,
            volume_id=f"vol-0{n}{n}{n}{n}aaaabbbbcccc{n}",
            s3_prefix=f"s3://bucket/jobs/job-{n}",
        )
        for n in range(count)
    ]


def attach(box: Instance, volume_id: str) -> None:
    box.set("lsblk.out", f"nvme0n1 vol0rootrootroot00\nnvme1n1 {volume_id.replace('-', '')}")


def test_instance_with_launch_index_1_runs_member_1s_job_secret_and_volume(
    world: Machine,
) -> None:
    box = world.instance()
    batch = members(box, python_workload(box, "recorder", RECORDER))
    world.imds.launch_index = "1"
    attach(box, batch[1].volume_id)

    proc = box.start(batch)
    console, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, box.agent_log()

    seen = json.loads((box.mount / "seen.json").read_text())
    assert seen == {"SPOTCTL_JOB_ID": "job-1", "SPOTCTL_ATTEMPT": "3"}
    (mounted,) = [c["argv"][-2:] for c in box.calls("mount")]
    assert mounted == ["/dev/nvme1n1", str(box.mount)]
    assert box.api.kinds() == ["started", "exited"]
    for report in box.api.reports:
        assert report["path"] == "/api/jobs/job-1/reports"
        assert report["auth"] == f"Bearer {batch[1].secret}"
        assert report["body"]["attempt"] == 3
    # The volume marker and the checkpoints are member 1's.
    assert (box.mount / ".spotctl/volume-id").read_text().strip() == batch[1].volume_id

    # Only our entry stays on the instance; no secret reaches a log or the console.
    state = Path(box.env["SPOTCTL_STATE_DIR"])
    assert not (state / "members.json").exists()
    assert json.loads((state / "params.json").read_text())["job_id"] == "job-1"
    assert (state / "params.json").stat().st_mode & 0o077 == 0
    logs = box.agent_log() + console
    assert "batch member 1 of 3: job job-1" in logs
    for member in batch:
        assert member.secret not in logs


def test_each_launch_index_picks_its_own_member(world: Machine) -> None:
    for index in (0, 2):
        box = world.instance(f"i{index}")
        batch = members(box, python_workload(box, "recorder", RECORDER))
        world.imds.launch_index = str(index)
        attach(box, batch[index].volume_id)
        assert box.run(batch) == 0, box.agent_log()
        seen = json.loads((box.mount / "seen.json").read_text())
        assert seen["SPOTCTL_JOB_ID"] == f"job-{index}"
        assert {r["auth"] for r in box.api.reports[-2:]} == {f"Bearer {batch[index].secret}"}


def test_a_launch_index_past_the_table_stops_the_instance_without_running_a_job(
    world: Machine,
) -> None:
    box = world.instance()
    batch = members(box, python_workload(box, "recorder", RECORDER), count=2)
    world.imds.launch_index = "2"

    assert box.run(batch) != 0
    assert "no member 2 in the batch" in box.agent_log()
    assert len(box.calls("shutdown")) == 1
    assert box.calls("mount") == [] and box.api.reports == []
    for member in batch:
        assert member.secret not in box.agent_log()


def test_a_batch_instance_without_a_launch_index_stops(world: Machine) -> None:
    box = world.instance()
    batch = members(box, python_workload(box, "recorder", RECORDER), count=2)
    world.imds.launch_index = "not-a-number"

    assert box.run(batch) != 0
    assert "is not a launch index" in box.agent_log()
    assert len(box.calls("shutdown")) == 1
    assert box.api.reports == []
