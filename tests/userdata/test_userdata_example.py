"""The example workload resumes bit-identically, alone and under the real agent."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.userdata.userdata_harness import REPO, Machine, machine, wait_for

TRAIN = REPO / "examples" / "train" / "train.py"
STEPS = ["--steps", "200", "--checkpoint-every", "25"]


def train(checkpoints: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(TRAIN), *STEPS, "--checkpoint-dir", str(checkpoints), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def final_hash(checkpoints: Path) -> str:
    return str(json.loads((checkpoints / "final.json").read_text())["weights_sha256"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> str:
    checkpoints = tmp_path_factory.mktemp("uninterrupted")
    out, _ = train(checkpoints).communicate(timeout=60)
    assert "weights_sha256=" in out
    return final_hash(checkpoints)


def started_steps(checkpoints: Path) -> bool:
    return any(checkpoints.glob("ckpt-*.npz"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_run_stopped_mid_way_and_resumed_ends_with_identical_weights(
    tmp_path: Path, uninterrupted: str, signum: int
) -> None:
    first = train(tmp_path, "--step-delay", "0.01")
    wait_for(lambda: started_steps(tmp_path), timeout=30, what="first checkpoint")
    time.sleep(0.12)  # land between checkpoints
    first.send_signal(signum)
    out, _ = first.communicate(timeout=30)
    if signum == signal.SIGTERM:
        assert first.returncode == 143
        assert "SIGTERM: stopped at step" in out
    assert not (tmp_path / "final.json").exists()
    assert not list(tmp_path.glob("*.tmp"))

    out, _ = train(tmp_path).communicate(timeout=60)
    assert "resumed from step" in out
    assert final_hash(tmp_path) == uninterrupted


def test_a_run_that_crashes_once_resumes_from_its_checkpoint_with_identical_weights(
    tmp_path: Path, uninterrupted: str
) -> None:
    crash = ["--crash-once-at-step", "60"]
    out, _ = (first := train(tmp_path, *crash)).communicate(timeout=60)
    assert first.returncode == 1
    assert "crashing at step 60" in out
    assert not (tmp_path / "final.json").exists()
    out, _ = (second := train(tmp_path, *crash)).communicate(timeout=60)
    assert second.returncode == 0
    assert "resumed from step 50" in out  # the newest checkpoint before the crash
    assert final_hash(tmp_path) == uninterrupted


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Machine]:
    yield from machine(tmp_path)


def test_interrupted_on_one_instance_and_finished_on_a_fresh_volume_elsewhere(
    world: Machine, uninterrupted: str
) -> None:
    """The whole path: notice, SIGTERM, sync to S3; a new volume restores and finishes."""
    command = [sys.executable, str(TRAIN), *STEPS, "--step-delay", "0.01"]
    first = world.instance("first")
    proc = first.start(first.params(command, grace_seconds=20))
    wait_for(lambda: started_steps(first.mount / "checkpoints"), timeout=30, what="training")
    world.imds.interrupt()
    proc.communicate(timeout=60)
    assert world.api.kinds()[-1] == "interrupted"
    in_s3 = world.root / "s3/bucket/jobs/job-42/checkpoints"
    assert any(in_s3.glob("ckpt-*.npz"))

    world.imds.instance_action = None
    second = world.instance("second")  # a new, blank volume: restore comes from S3
    second.set("lsblk.out", "nvme1n1 vol0bbbbbbbbbbbbbbbb")
    assert second.run(second.params(command, attempt=2, volume_id="vol-0bbbbbbbbbbbbbbbb")) == 0
    assert "resumed from step" in (second.root / "log" / "workload.log").read_text()
    exited = [r["body"] for r in world.api.reports if r["body"]["kind"] == "exited"]
    assert exited == [
        {"attempt": 2, "kind": "exited", "exit_code": 0, "detail": "sync ok", "synced": True}
    ]
    assert final_hash(second.mount / "checkpoints") == uninterrupted
    assert final_hash(in_s3) == uninterrupted
