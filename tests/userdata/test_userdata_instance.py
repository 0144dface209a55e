"""The real rendered user data, run by bash against shims, a fake IMDSv2 and a fake API."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.userdata.userdata_harness import (
    EC2_TIME,
    SECRET,
    VOLUME_ID,
    Instance,
    Machine,
    machine,
    python_workload,
    wait_for,
)

# Records its argv and environment, then exits with 7.
RECORDER = """
import json, os, sys
out = os.path.join(os.environ["SPOTCTL_CHECKPOINT_DIR"], "..", "seen.json")
keys = ("SPOTCTL_JOB_ID", "SPOTCTL_ATTEMPT", "SPOTCTL_CHECKPOINT_DIR")
with open(out, "w") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}, f)
with open(os.path.join(os.environ["SPOTCTL_CHECKPOINT_DIR"], "model.bin"), "w") as f:
    f.write("weights")
sys.exit(7)
"""

# Runs until SIGTERM; then notes the time, writes a checkpoint the atomic way and exits.
TRAINER = """
import os, signal, sys, time
ckpt = os.environ["SPOTCTL_CHECKPOINT_DIR"]
def stop(signum, frame):
    with open(os.path.join(ckpt, "..", "sigterm-at"), "w") as f:
        f.write(repr(time.time()))
    with open(os.path.join(ckpt, "last.ckpt.tmp"), "w") as f:
        f.write("state at sigterm")
    os.replace(os.path.join(ckpt, "last.ckpt.tmp"), os.path.join(ckpt, "last.ckpt"))
    time.sleep(0.3)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(ckpt, "..", "running"), "w").close()
while True:
    time.sleep(0.05)
"""

HOSTILE = [
    '--name=it\'s "quoted"',
    "$(touch /tmp/spotctl-pwned)",
    "`touch /tmp/spotctl-pwned`",
    "a; rm -rf / ; b",
    "${HOME}",
    "line\nbreak",
    "*",
    "",
    "tab\there | cat > x &",
]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Machine]:
    yield from machine(tmp_path)


@pytest.fixture
def box(world: Machine) -> Instance:
    return world.instance()


def reports(box: Instance, kind: str) -> list[dict[str, Any]]:
    return [r for r in box.api.reports if r["body"]["kind"] == kind]


def s3_uploads(box: Instance) -> list[dict[str, Any]]:
    """The agent's ``aws s3 sync`` calls that upload (volume to S3), in order."""
    return [
        c
        for c in box.calls("aws")
        if c["argv"][:2] == ["s3", "sync"] and c["argv"][3].startswith("s3://")
    ]


def test_blank_volume_is_formatted_mounted_and_the_exit_code_reported(box: Instance) -> None:
    box.set("lsblk.out", "nvme0n1 vol0aaaaaaaaaaaaaaaa")  # the job's volume is not there yet
    command = python_workload(box, "recorder", RECORDER)
    proc = box.start(box.params([*command, *HOSTILE]))
    wait_for(lambda: len(box.calls("lsblk")) >= 3, what="volume polling")
    box.set("lsblk.out", f"nvme0n1 vol0aaaaaaaaaaaaaaaa\nnvme1n1 {VOLUME_ID.replace('-', '')}")
    proc.communicate(timeout=30)
    assert proc.returncode == 0, box.agent_log()

    # Found by serial, formatted once (blkid said blank), mounted, not grown.
    assert [c["argv"] for c in box.calls("blkid")] == [
        ["-p", "-o", "value", "-s", "TYPE", "/dev/nvme1n1"]
    ]
    assert [c["argv"][-1] for c in box.calls("mkfs.ext4")] == ["/dev/nvme1n1"]
    assert [c["argv"][-2:] for c in box.calls("mount")] == [["/dev/nvme1n1", str(box.mount)]]
    assert box.calls("resize2fs") == []

    # The command arrived byte for byte, with the job's environment.
    seen = json.loads((box.mount / "seen.json").read_text())
    assert seen["argv"] == HOSTILE
    assert seen["env"] == {
        "SPOTCTL_JOB_ID": "job-42",
        "SPOTCTL_ATTEMPT": "1",
        "SPOTCTL_CHECKPOINT_DIR": str(box.mount / "checkpoints"),
    }
    assert not Path("/tmp/spotctl-pwned").exists()

    # Final sync after the exit, then the exit code to the API, then shutdown.
    assert (box.s3 / "bucket/jobs/job-42/checkpoints/model.bin").read_text() == "weights"
    exited = reports(box, "exited")
    assert [r["body"]["exit_code"] for r in exited] == [7]
    assert exited[0]["path"] == "/api/jobs/job-42/reports"
    assert exited[0]["auth"] == f"Bearer {SECRET}"
    assert box.api.kinds() == ["started", "exited"]
    assert len(box.calls("shutdown")) == 1
    assert box.calls("shutdown")[0]["t"] > exited[0]["t"]


def test_every_metadata_call_carries_a_token_the_server_issued(box: Instance) -> None:
    command = python_workload(box, "sleeper", "import time; time.sleep(0.5)")
    assert box.run(box.params(command)) == 0
    gets = [r for r in box.imds.requests if r["method"] == "GET"]
    puts = [r for r in box.imds.requests if r["method"] == "PUT"]
    assert puts and all(r["hdr"] for r in puts)  # the TTL header
    assert len(gets) >= 4  # identity from bootstrap, then the watcher's polls
    assert all(r["hdr"] in box.imds.tokens for r in gets)
    paths = {r["path"] for r in gets}
    assert "/latest/meta-data/spot/instance-action" in paths
    assert "/latest/meta-data/events/recommendations/rebalance" in paths
    assert "/latest/meta-data/tags/instance/spotctl:leave" in paths


@pytest.mark.parametrize(
    ("fstype", "grow_cmd", "grow_arg"),
    [("ext4", "resize2fs", "/dev/nvme1n1"), ("xfs", "xfs_growfs", "MOUNT")],
)
def test_a_volume_with_a_filesystem_is_never_formatted_only_grown(
    box: Instance, fstype: str, grow_cmd: str, grow_arg: str
) -> None:
    box.set("blkid.rc", "0")
    box.set("blkid.out", fstype)
    command = python_workload(box, "ok", "pass")
    assert box.run(box.params(command)) == 0, box.agent_log()
    assert box.calls("mkfs.ext4") == [] and box.calls("mkfs.xfs") == []
    expected = str(box.mount) if grow_arg == "MOUNT" else grow_arg
    assert [c["argv"] for c in box.calls(grow_cmd)] == [[expected]]
    assert [r["body"]["exit_code"] for r in reports(box, "exited")] == [0]


@pytest.mark.parametrize(
    ("blkid_rc", "blkid_out", "told"),
    [
        ("4", "", "blkid could not probe /dev/nvme1n1 (exit 4)"),
        # A partition table: blkid knows a signature, but no filesystem TYPE.
        ("0", "", "/dev/nvme1n1 holds a signature that is not a filesystem"),
    ],
    ids=["blkid-error", "partition-table"],
)
def test_a_device_that_may_hold_data_is_left_alone_and_the_job_told(
    box: Instance, blkid_rc: str, blkid_out: str, told: str
) -> None:
    """A new instance would find the same volume: the job is told (and fails, or
    restarts as its spec allows) instead of being relaunched onto it without end."""
    box.set("blkid.rc", blkid_rc)
    box.set("blkid.out", blkid_out)
    command = python_workload(box, "never", "raise SystemExit('must not run')")
    box.run(box.params(command))
    assert box.calls("mkfs.ext4") == [] and box.calls("mount") == []
    assert told in box.agent_log()
    assert len(box.calls("blkid")) == (3 if blkid_rc == "4" else 1)  # an error, asked again
    assert len(box.calls("shutdown")) == 1
    (exited,) = reports(box, "exited")
    assert exited["body"]["exit_code"] == 125
    assert exited["body"]["detail"].startswith(f"bootstrap: {told}")


def test_a_device_that_answers_blkid_only_on_a_second_try_is_formatted_once(
    box: Instance,
) -> None:
    box.set("blkid.rc", "4")
    box.env["SPOTCTL_SETTLE_SECONDS"] = "1"  # time for the test to see the first probe

    def settle() -> None:  # the device answers after its first probe
        wait_for(lambda: box.calls("blkid"), what="first probe")
        box.set("blkid.rc", "2")

    threading.Thread(target=settle, daemon=True).start()
    assert box.run(box.params(python_workload(box, "ok", "pass"))) == 0, box.agent_log()
    assert len(box.calls("blkid")) >= 2
    assert len(box.calls("mkfs.ext4")) == 1
    assert [r["body"]["exit_code"] for r in reports(box, "exited")] == [0]


def test_a_volume_that_never_arrives_fails_clearly_within_the_bound(box: Instance) -> None:
    box.env["SPOTCTL_VOLUME_WAIT_SECONDS"] = "1"
    box.set("lsblk.out", "nvme0n1 vol0aaaaaaaaaaaaaaaa")
    started = time.monotonic()
    box.run(box.params(python_workload(box, "never", "pass")))
    assert time.monotonic() - started < 8
    log = box.agent_log()
    assert f"volume {VOLUME_ID} was not attached within 1s" in log
    assert "vol0123456789abcdef0" in log  # says what it looked for
    assert box.calls("mount") == [] and len(box.calls("shutdown")) == 1
    assert box.api.reports == []  # a new instance may get the volume: it is replaced


def test_on_xen_the_volume_is_the_attach_device(box: Instance) -> None:
    box.set("lsblk.out", "xvda\nxvdf")
    assert box.run(box.params(python_workload(box, "ok", "pass"))) == 0, box.agent_log()
    assert [c["argv"][-2] for c in box.calls("mount")] == ["/dev/xvdf"]


@pytest.mark.parametrize(
    ("told_by", "cause"),
    [
        # A spot interruption: the notice in instance metadata, two minutes ahead.
        ("notice", "terminate"),
        # An on-demand instance spotctl leaves for spot: the spotctl:leave tag, which the
        # instance sees in its metadata (tags/instance/spotctl:leave).
        ("leave tag", "asked to leave (2026-11-28T12:00:00Z)"),
        # The OS shuts down (a TerminateInstances, such as spotctl's when an instance it
        # asked to leave does not go): the agent gets SIGTERM; no metadata notice first.
        ("os", "agent got SIGTERM"),
    ],
)
def test_told_to_stop_sigterm_then_sync_then_interrupted_report(
    box: Instance, told_by: str, cause: str
) -> None:
    proc = box.start(box.params(python_workload(box, "trainer", TRAINER), grace_seconds=5))
    wait_for((box.mount / "running").exists, what="workload start")
    if told_by == "notice":
        told_at = box.imds.interrupt()
    elif told_by == "leave tag":
        told_at = box.imds.ask_to_leave()
    else:
        told_at = time.time()
        proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)

    sigterm_at = float((box.mount / "sigterm-at").read_text())
    assert sigterm_at - told_at < 10
    uploads = s3_uploads(box)
    assert uploads and uploads[0]["t"] > sigterm_at
    assert (box.s3 / "bucket/jobs/job-42/checkpoints/last.ckpt").read_text() == "state at sigterm"
    assert not (box.s3 / "bucket/jobs/job-42/checkpoints/last.ckpt.tmp").exists()
    interrupted = reports(box, "interrupted")
    assert len(interrupted) == 1 and interrupted[0]["t"] > uploads[0]["t"]
    assert "workload exit 143" in str(interrupted[0]["body"]["detail"])
    assert cause in str(interrupted[0]["body"]["detail"])
    assert reports(box, "exited") == []  # an interrupted workload has not finished the job
    assert len(box.calls("shutdown")) == 1


def test_a_workload_ignoring_sigterm_is_killed_after_the_grace_period(box: Instance) -> None:
    stubborn = python_workload(
        box,
        "stubborn",
        "import signal, time, os\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "open(os.environ['SPOTCTL_CHECKPOINT_DIR'] + '/../running', 'w').close()\n"
        "time.sleep(60)\n",
    )
    proc = box.start(box.params(stubborn, grace_seconds=1))
    wait_for((box.mount / "running").exists, what="workload start")
    noticed_at = box.imds.interrupt()
    proc.communicate(timeout=30)
    interrupted = reports(box, "interrupted")
    assert len(interrupted) == 1 and "workload exit 137" in str(interrupted[0]["body"]["detail"])
    assert interrupted[0]["t"] - noticed_at < 8


def test_a_workload_that_quits_on_the_notice_itself_counts_as_interrupted(box: Instance) -> None:
    box.imds.interrupt()
    box.run(box.params(python_workload(box, "quitter", "raise SystemExit(0)")))
    assert box.api.kinds() == ["started", "interrupted"]


def test_rebalance_recommendation_is_reported_once(box: Instance) -> None:
    command = python_workload(box, "sleeper", "import time; time.sleep(0.8)")
    box.imds.rebalance = {"noticeTime": "2026-11-28T11:58:00Z"}
    assert box.run(box.params(command)) == 0
    rebalance = reports(box, "rebalance")
    assert len(rebalance) == 1 and "2026-11-28T11:58:00Z" in str(rebalance[0]["body"]["detail"])
    assert box.api.kinds()[-1] == "exited"


def test_checkpoints_are_synced_periodically_while_the_workload_runs(box: Instance) -> None:
    writer = python_workload(
        box,
        "writer",
        "import os, time\nd = os.environ['SPOTCTL_CHECKPOINT_DIR']\n"
        "for i in range(4):\n"
        "    open(f'{d}/ckpt-{i}', 'w').write(str(i))\n"
        "    time.sleep(0.45)\n",
    )
    assert box.run(box.params(writer, sync_interval_seconds=1)) == 0
    uploads = [
        c for c in box.calls("aws") if c["argv"][3:4] == ["s3://bucket/jobs/job-42/checkpoints/"]
    ]
    assert len(uploads) >= 2  # at least one periodic sync and the final one
    assert all("--exclude" in c["argv"] for c in uploads)
    assert reports(box, "checkpoint_synced")
    assert sorted(p.name for p in (box.s3 / "bucket/jobs/job-42/checkpoints").iterdir()) == [
        "ckpt-0",
        "ckpt-1",
        "ckpt-2",
        "ckpt-3",
    ]


def test_the_exit_report_is_retried_on_429_and_5xx_until_accepted(box: Instance) -> None:
    box.api.statuses = [200, 503, 429, 502]  # "started" passes, "exited" needs four tries
    assert box.run(box.params(python_workload(box, "fail", "raise SystemExit(3)"))) == 0
    exits = reports(box, "exited")
    assert [r["status"] for r in exits] == [503, 429, 502, 200]
    assert all(r["body"]["exit_code"] == 3 for r in exits)


def test_a_4xx_answer_is_final(box: Instance) -> None:
    box.api.statuses = [200, 403]
    assert box.run(box.params(python_workload(box, "fail", "raise SystemExit(1)"))) == 0
    assert [r["status"] for r in reports(box, "exited")] == [403]
    assert len(box.calls("shutdown")) == 1


def test_a_command_that_cannot_start_is_reported_as_exit_127(box: Instance) -> None:
    assert box.run(box.params(["/nonexistent/train", "--fast"])) == 0
    exited = reports(box, "exited")
    assert [r["body"]["exit_code"] for r in exited] == [127]
    assert "cannot start" in str(exited[0]["body"]["detail"])


@pytest.mark.parametrize("gpus", ["GPU 0: Tesla V100-SXM2-16GB (UUID: GPU-1)", ""])
def test_an_image_runs_under_docker_with_the_job_environment(box: Instance, gpus: str) -> None:
    box.set("gpus", gpus)
    command = python_workload(box, "recorder", RECORDER)
    image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/train:1"
    assert box.run(box.params([*command, *HOSTILE], image=image)) == 0, box.agent_log()
    docker = [c["argv"] for c in box.calls("docker")]
    assert [
        "login",
        "--username",
        "AWS",
        "--password-stdin",
        image.split("/", maxsplit=1)[0],
    ] in docker
    assert ["pull", image] in docker
    run = next(a for a in docker if a[0] == "run")
    assert ("--gpus" in run) == bool(gpus)
    mount = str(box.mount)
    assert run[run.index("-v") + 1] == f"{mount}:{mount}"
    assert run[run.index(image) + 1 :] == [*command, *HOSTILE]
    for env in (
        "SPOTCTL_JOB_ID=job-42",
        "SPOTCTL_ATTEMPT=1",
        f"SPOTCTL_CHECKPOINT_DIR={mount}/checkpoints",
    ):
        assert env in run
    assert json.loads((box.mount / "seen.json").read_text())["argv"] == HOSTILE
    assert [r["body"]["exit_code"] for r in reports(box, "exited")] == [7]
    # docker's own copy of the output is capped; the agent keeps workload.log.
    options = [run[i + 1] for i, flag in enumerate(run[: run.index(image)]) if flag == "--log-opt"]
    assert options == ["max-size=64m", "max-file=2"]


CHATTY = """
import sys, time
for i in range(40):
    sys.stdout.write(f"line {i:02d} " + "x" * 10_000 + "\\n")
    sys.stdout.flush()
    time.sleep(0.05)
print("done")
"""


def test_a_chatty_workload_s_log_is_capped_and_its_end_kept(box: Instance) -> None:
    box.env["SPOTCTL_LOG_LIMIT_BYTES"] = "100000"
    assert box.run(box.params(python_workload(box, "chatty", CHATTY))) == 0, box.agent_log()
    log_dir = Path(box.env["SPOTCTL_LOG_DIR"])
    kept, before = log_dir / "workload.log", log_dir / "workload.log.1"
    assert before.exists(), box.agent_log()  # 400 KB written, cut past 100 KB
    # Over the limit by what came between two polls (a few lines; more on a busy host).
    assert kept.stat().st_size < 250_000 and before.stat().st_size < 250_000
    assert kept.read_text().rstrip().endswith("done")
    assert "\x00" not in kept.read_text()  # written at the new end, not past a hole


def test_an_interrupted_container_gets_the_signal_through_docker_kill(box: Instance) -> None:
    params = box.params(python_workload(box, "trainer", TRAINER), image="train:1")
    proc = box.start(params)
    wait_for((box.mount / "running").exists, what="container start")
    box.imds.interrupt()
    proc.communicate(timeout=30)
    kills = [c["argv"] for c in box.calls("docker") if c["argv"][0] == "kill"]
    assert kills == [["kill", "--signal", "TERM", "spotctl-job-42-1"]]
    assert (box.mount / "sigterm-at").exists()
    assert box.api.kinds() == ["started", "interrupted"]


def test_a_fresh_volume_is_restored_from_s3_before_the_workload_starts(box: Instance) -> None:
    saved = box.s3 / "bucket/jobs/job-42/checkpoints"
    saved.mkdir(parents=True)
    (saved / "ckpt-9").write_text("from the last attempt")
    lister = python_workload(
        box,
        "lister",
        "import os, json\nd = os.environ['SPOTCTL_CHECKPOINT_DIR']\n"
        "json.dump(sorted(os.listdir(d)), open(d + '/../listing.json', 'w'))\n",
    )
    assert box.run(box.params(lister)) == 0
    assert json.loads((box.mount / "listing.json").read_text()) == ["ckpt-9"]
    assert (box.mount / ".spotctl/volume-id").read_text().strip() == VOLUME_ID


def test_the_same_volume_coming_back_is_not_restored_again(box: Instance) -> None:
    (box.mount / ".spotctl").mkdir()
    (box.mount / ".spotctl/volume-id").write_text(VOLUME_ID + "\n")
    box.set("blkid.rc", "0")
    box.set("blkid.out", "ext4")
    assert box.run(box.params(python_workload(box, "ok", "pass"))) == 0
    downloads = [
        c for c in box.calls("aws") if c["argv"][2:3] == ["s3://bucket/jobs/job-42/checkpoints/"]
    ]
    assert downloads == []


def test_a_volume_copied_from_another_volumes_snapshot_is_restored(box: Instance) -> None:
    (box.mount / ".spotctl").mkdir()
    (box.mount / ".spotctl/volume-id").write_text("vol-0ffffffffffffffff\n")
    box.set("blkid.rc", "0")
    box.set("blkid.out", "ext4")
    assert box.run(box.params(python_workload(box, "ok", "pass"))) == 0
    downloads = [
        c for c in box.calls("aws") if c["argv"][2:3] == ["s3://bucket/jobs/job-42/checkpoints/"]
    ]
    assert len(downloads) == 1
    assert (box.mount / ".spotctl/volume-id").read_text().strip() == VOLUME_ID


# Writes the variables it was given (and whether docker's own leaked in), then exits 0.
ENV_RECORDER = """
import json, os
out = os.path.join(os.environ["SPOTCTL_CHECKPOINT_DIR"], "..", "env.json")
keys = ("NCCL_DEBUG", "ARGS", "EMPTY", "SPOTCTL_JOB_ID", "SHIM_DIR", "PATH", "DOCKER_HOST")
with open(out, "w") as f:
    json.dump({k: os.environ.get(k) for k in keys}, f)
"""
JOB_ENV = (("NCCL_DEBUG", "INFO"), ("ARGS", " --lr '$(id)' \"x\" `id` $HOME = "), ("EMPTY", ""))
# Meant for the container: they must not steer the docker client (which would not even
# be found on that PATH).
CONTAINER_ENV = (("PATH", "/opt/conda/bin"), ("DOCKER_HOST", "tcp://192.0.2.1:2375"))


@pytest.mark.parametrize("image", [None, "train:1"])
def test_the_job_environment_reaches_the_workload_byte_for_byte(
    box: Instance, image: str | None
) -> None:
    command = python_workload(box, "env-recorder", ENV_RECORDER)
    job_env = JOB_ENV if image is None else (*JOB_ENV, *CONTAINER_ENV)
    assert box.run(box.params(command, image=image, env=job_env)) == 0, box.agent_log()
    seen = json.loads((box.mount / "env.json").read_text())
    assert {k: seen[k] for k, _ in job_env} == dict(job_env)
    assert seen["SPOTCTL_JOB_ID"] == "job-42"
    if image is not None:
        assert seen["SHIM_DIR"] is None  # a container sees only what it is passed
        run = next(c["argv"] for c in box.calls("docker") if c["argv"][0] == "run")
        # In a file: the values stay out of docker's argv (and ps).
        assert "--env-file" in run
        for name, value in job_env:
            assert name not in run
            assert all(value not in arg for arg in run if value)


# Resumes from last.ckpt (a fixed name, written atomically), trains one step, saves.
RESUMER = """
import json, os
d = os.environ["SPOTCTL_CHECKPOINT_DIR"]
p = os.path.join(d, "last.ckpt")
step = json.load(open(p))["step"] if os.path.exists(p) else 0
open(os.path.join(d, "..", "resumed-from"), "w").write(str(step))
with open(p + ".tmp", "w") as f:
    json.dump({"step": step + 1}, f)
os.replace(p + ".tmp", p)
"""


def snapshot_copy(box: Instance, step: int) -> None:
    """The volume as a snapshot of the job's volume in another AZ left it."""
    (box.mount / ".spotctl").mkdir()
    (box.mount / ".spotctl/volume-id").write_text("vol-0ffffffffffffffff\n")
    (box.mount / "checkpoints").mkdir()
    (box.mount / "checkpoints/last.ckpt").write_text(json.dumps({"step": step}))
    an_hour_ago = time.time() - 3600
    os.utime(box.mount / "checkpoints/last.ckpt", (an_hour_ago, an_hour_ago))
    box.set("blkid.rc", "0")
    box.set("blkid.out", "ext4")


def test_a_restore_that_fails_starts_nothing_and_is_tried_again_next_time(
    world: Machine, box: Instance
) -> None:
    s3_ckpt = box.s3 / "bucket/jobs/job-42/checkpoints/last.ckpt"
    s3_ckpt.parent.mkdir(parents=True)
    s3_ckpt.write_text(json.dumps({"step": 900}))
    snapshot_copy(box, step=100)
    box.set("aws-s3.rc", "1")  # S3 unreadable for as long as the agent tries
    resumer = python_workload(box, "resumer", RESUMER)
    assert box.run(box.params(resumer, attempt=2)) == 0, box.agent_log()

    # Not run from the stale step 100, so S3's step 900 is intact; the API is told.
    assert not (box.mount / "resumed-from").exists()
    assert json.loads(s3_ckpt.read_text()) == {"step": 900}
    assert [c for c in s3_uploads(box) if "/checkpoints/" in c["argv"][3]] == []
    exited = reports(box, "exited")
    assert [r["body"]["exit_code"] for r in exited] == [125]
    assert "could not restore" in str(exited[0]["body"]["detail"])
    assert len(box.calls("shutdown")) == 1
    # Still marked as the old volume: the next attempt on it restores.
    assert (box.mount / ".spotctl/volume-id").read_text().strip() == "vol-0ffffffffffffffff"

    again = world.instance("i2")
    again.set("blkid.rc", "0")
    again.set("blkid.out", "ext4")
    shutil.copytree(box.mount, again.mount, dirs_exist_ok=True)  # keeps the times
    resumer = python_workload(again, "resumer", RESUMER)
    assert again.run(again.params(resumer, attempt=3)) == 0, again.agent_log()
    assert (again.mount / "resumed-from").read_text() == "900"
    assert json.loads(s3_ckpt.read_text()) == {"step": 901}
    assert (again.mount / ".spotctl/volume-id").read_text().strip() == VOLUME_ID


# On SIGTERM, takes a while to save (a big torch.save), then notes the time and exits.
SLOW_SAVER = """
import os, signal, sys, time
ckpt = os.environ["SPOTCTL_CHECKPOINT_DIR"]
def stop(signum, frame):
    time.sleep(1)
    with open(os.path.join(ckpt, "last.ckpt.tmp"), "w") as f:
        f.write("state at sigterm")
    os.replace(os.path.join(ckpt, "last.ckpt.tmp"), os.path.join(ckpt, "last.ckpt"))
    open(os.path.join(ckpt, "..", "saved-at"), "w").write(repr(time.time()))
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(ckpt, "..", "running"), "w").close()
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("script", ["{} ; echo done", "{} | tee train.log"])
def test_a_shell_wrapper_dying_on_sigterm_is_not_taken_for_the_workload_s_end(
    box: Instance, script: str
) -> None:
    python = " ".join(python_workload(box, "saver", SLOW_SAVER))
    proc = box.start(box.params(["bash", "-c", script.format(python)], grace_seconds=30))
    wait_for((box.mount / "running").exists, what="workload start")
    box.imds.interrupt()
    proc.communicate(timeout=30)
    # bash dies at once; the agent waits for python's save before the sync.
    saved_at = float((box.mount / "saved-at").read_text())
    assert s3_uploads(box)[0]["t"] > saved_at
    assert (box.s3 / "bucket/jobs/job-42/checkpoints/last.ckpt").read_text() == "state at sigterm"
    (told,) = reports(box, "interrupted")
    assert "sync ok" in str(told["body"]["detail"])
    assert told["body"]["synced"] is True  # what lets a cancel delete the volume
    assert box.calls("shutdown")[0]["t"] > saved_at


# Ignores SIGTERM and notes its pid; runs until killed.
IMMORTAL = """
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(os.environ["SPOTCTL_CHECKPOINT_DIR"] + "/../immortal.pid", "w").write(str(os.getpid()))
time.sleep(60)
"""


def running(pid: int) -> bool:
    """Whether the process lives (a zombie, waiting for init to reap it, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.parametrize(
    ("script", "told"),
    [
        ("{} ; echo done", "interrupted"),  # bash dies on SIGTERM, python ignores it
        ("{} & sleep 0.5", "exited"),  # a background process outlives the workload
    ],
)
def test_what_the_workload_leaves_behind_is_killed_after_the_grace(
    box: Instance, script: str, told: str
) -> None:
    python = " ".join(python_workload(box, "immortal", IMMORTAL))
    proc = box.start(box.params(["bash", "-c", script.format(python)], grace_seconds=1))
    pid_file = box.mount / "immortal.pid"
    wait_for(pid_file.exists, what="workload start")
    pid = int(pid_file.read_text())
    try:
        if told == "interrupted":
            box.imds.interrupt()
        proc.communicate(timeout=30)
        assert not running(pid)
        assert box.api.kinds() == ["started", told]
    finally:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


# TRAINER, noting its pid in "running".
PID_TRAINER = TRAINER.replace(
    'open(os.path.join(ckpt, "..", "running"), "w").close()',
    'open(os.path.join(ckpt, "..", "running"), "w").write(str(os.getpid()))',
)


def test_a_container_s_whole_process_group_gets_the_stop_signal(box: Instance) -> None:
    # tini (docker run --init) passes docker kill's signal to its child only, unless
    # told to signal the child's process group: here the child is bash, not python.
    python = " ".join(python_workload(box, "trainer", PID_TRAINER))
    proc = box.start(box.params(["bash", "-c", f"{python} ; echo done"], image="train:1"))
    wait_for(
        lambda: (box.mount / "running").exists() and (box.mount / "running").read_text(),
        what="container start",
    )
    pid = int((box.mount / "running").read_text())
    box.imds.interrupt()
    try:
        proc.communicate(timeout=30)
        assert (box.mount / "sigterm-at").exists()
        last = box.s3 / "bucket/jobs/job-42/checkpoints/last.ckpt"
        assert last.read_text() == "state at sigterm"
        run = next(c["argv"] for c in box.calls("docker") if c["argv"][0] == "run")
        init = run.index("--init")
        assert run[init + 1 : init + 3] == ["-e", "TINI_KILL_PROCESS_GROUP=1"]
    finally:  # the shim has no PID namespace whose end would kill what is left
        if running(pid):
            os.kill(pid, signal.SIGKILL)


def test_an_error_in_the_agent_is_reported_and_the_instance_still_shuts_down(
    box: Instance,
) -> None:
    (box.mount / "checkpoints").write_text("not a directory")  # the agent cannot go on
    assert box.run(box.params(python_workload(box, "ok", "pass"))) == 0
    assert "Traceback" in box.agent_log()
    exited = reports(box, "exited")
    assert [r["body"]["exit_code"] for r in exited] == [125]
    assert "agent failed: FileExistsError" in str(exited[0]["body"]["detail"])
    assert len(box.calls("shutdown")) == 1


def test_an_agent_error_while_the_workload_runs_stops_and_syncs_it_first(
    box: Instance,
) -> None:
    same_volume(box)
    proc = box.start(box.params(python_workload(box, "trainer", TRAINER), grace_seconds=5))
    wait_for((box.mount / "running").exists, what="workload start")
    # Metadata the agent cannot decode: an error it has no handling for.
    box.imds.raw["/latest/meta-data/events/recommendations/rebalance"] = b"\xff\xfe"
    proc.communicate(timeout=30)
    assert (box.mount / "sigterm-at").exists(), box.agent_log()  # stopped, not left behind
    synced = box.s3 / "bucket/jobs/job-42/checkpoints/last.ckpt"
    assert synced.read_text() == "state at sigterm"
    (exited,) = reports(box, "exited")
    assert exited["body"]["exit_code"] == 125
    assert "agent failed: UnicodeDecodeError" in exited["body"]["detail"]
    assert len(box.calls("shutdown")) == 1


# Loaded by every python on the instance (PYTHONPATH): once the file "fault" exists,
# the agent's next checkpoint upload raises what the agent has no handling for.
FAULT_HOOK = """
import os, sys
def hook(event, args):
    if event == "subprocess.Popen" and os.path.exists(os.environ["FAULT_FILE"]):
        argv = list(args[1])
        if argv[:3] == ["aws", "s3", "sync"] and "--exclude" in argv:
            os.remove(os.environ["FAULT_FILE"])
            raise MemoryError("cannot fork aws")
sys.addaudithook(hook)
"""


def test_an_agent_error_during_an_interruption_is_told_as_the_interruption(
    box: Instance, tmp_path: Path
) -> None:
    # The job is being relaunched anyway: an error of the agent's then must not fail it.
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(FAULT_HOOK)
    fault = tmp_path / "fault"
    box.env.update(PYTHONPATH=str(hooks), FAULT_FILE=str(fault))
    same_volume(box)
    proc = box.start(box.params(python_workload(box, "trainer", TRAINER), grace_seconds=5))
    wait_for((box.mount / "running").exists, what="workload start")
    fault.touch()
    box.imds.interrupt()
    proc.communicate(timeout=60)
    assert "MemoryError" in box.agent_log()
    assert not fault.exists()  # the fault struck the sync after the notice
    assert (box.mount / "sigterm-at").exists()
    synced = box.s3 / "bucket/jobs/job-42/checkpoints/last.ckpt"
    assert synced.read_text() == "state at sigterm"  # the sync tried again after it
    assert reports(box, "exited") == []
    (told,) = reports(box, "interrupted")
    assert told["body"]["synced"] is True
    assert "agent failed: MemoryError" in told["body"]["detail"]
    assert '"action": "terminate"' in told["body"]["detail"]
    assert len(box.calls("shutdown")) == 1


def same_volume(box: Instance) -> None:
    (box.mount / ".spotctl").mkdir()
    (box.mount / ".spotctl/volume-id").write_text(VOLUME_ID + "\n")
    box.set("blkid.rc", "0")
    box.set("blkid.out", "ext4")


def test_the_last_sync_is_retried_until_s3_takes_it(box: Instance) -> None:
    same_volume(box)
    box.set("aws-s3.rc", "1")

    def heal() -> None:  # S3 fails the first upload, then works again
        wait_for(lambda: s3_uploads(box), what="first upload")
        box.set("aws-s3.rc", "0")

    threading.Thread(target=heal, daemon=True).start()
    writer = python_workload(
        box,
        "writer",
        "import os\nd = os.environ['SPOTCTL_CHECKPOINT_DIR']\n"
        "open(d + '/final-model.pt', 'w').write('weights')\n",
    )
    assert box.run(box.params(writer)) == 0
    assert (box.s3 / "bucket/jobs/job-42/checkpoints/final-model.pt").read_text() == "weights"
    assert [r["body"] for r in reports(box, "exited")] == [
        {"attempt": 1, "kind": "exited", "exit_code": 0, "detail": "sync ok", "synced": True}
    ]


def test_the_exit_report_outlasts_an_api_outage(box: Instance) -> None:
    # "started" lands; then the API times out and is down for ten tries of "exited".
    box.api.statuses = [200, 408] + [503] * 9
    box.env["SPOTCTL_REPORT_BACKOFF_SECONDS"] = "0.001"
    assert box.run(box.params(python_workload(box, "done", "raise SystemExit(0)"))) == 0
    exited = reports(box, "exited")
    assert [r["status"] for r in exited] == [408] + [503] * 9 + [200]
    assert box.calls("shutdown")[0]["t"] > exited[-1]["t"]


def test_the_grace_ends_in_time_to_sync_before_the_notice_s_termination(box: Instance) -> None:
    stubborn = python_workload(box, "immortal", IMMORTAL)
    proc = box.start(box.params(stubborn, grace_seconds=20))
    wait_for((box.mount / "immortal.pid").exists, what="workload start")
    box.imds.interrupt(seconds_left=33)  # 3 s before the 30 s kept for the sync
    assert box.imds.instance_action is not None
    goes_at = datetime.strptime(box.imds.instance_action["time"], EC2_TIME).replace(tzinfo=UTC)
    proc.communicate(timeout=40)
    assert s3_uploads(box)[0]["t"] < goes_at.timestamp() - 25
    detail = str(reports(box, "interrupted")[0]["body"]["detail"])
    assert "workload exit 137" in detail and "sync ok" in detail


def test_a_restore_never_replaces_a_checkpoint_newer_than_s3_s(box: Instance) -> None:
    # The snapshot was taken after the last sync: the volume is ahead of S3.
    s3_ckpt = box.s3 / "bucket/jobs/job-42/checkpoints/last.ckpt"
    s3_ckpt.parent.mkdir(parents=True)
    s3_ckpt.write_text(json.dumps({"step": 900}))
    half_an_hour_ago = time.time() - 1800
    os.utime(s3_ckpt, (half_an_hour_ago, half_an_hour_ago))
    (box.s3 / "bucket/jobs/job-42/checkpoints/old.ckpt").write_text("only in S3")
    snapshot_copy(box, step=1000)
    os.utime(box.mount / "checkpoints/last.ckpt")  # written after that sync
    resumer = python_workload(box, "resumer", RESUMER)
    assert box.run(box.params(resumer, attempt=3)) == 0, box.agent_log()
    assert (box.mount / "resumed-from").read_text() == "1000"
    assert (box.mount / "checkpoints/old.ckpt").read_text() == "only in S3"
    assert not (box.mount / ".spotctl/restore").exists()


def test_a_restore_takes_s3_s_newer_checkpoint_of_the_same_size(box: Instance) -> None:
    # The snapshot is older than the last sync, and the checkpoint's size never changes
    # (weights of a fixed shape): only its time tells the copies apart.
    snapshot_copy(box, step=100)
    half_an_hour_ago = time.time() - 1800
    os.utime(box.mount / "checkpoints/last.ckpt", (half_an_hour_ago, half_an_hour_ago))
    s3_ckpt = box.s3 / "bucket/jobs/job-42/checkpoints/last.ckpt"
    s3_ckpt.parent.mkdir(parents=True)
    s3_ckpt.write_text(json.dumps({"step": 900}))
    assert s3_ckpt.stat().st_size == (box.mount / "checkpoints/last.ckpt").stat().st_size
    resumer = python_workload(box, "resumer", RESUMER)
    assert box.run(box.params(resumer, attempt=3)) == 0, box.agent_log()
    assert (box.mount / "resumed-from").read_text() == "900"


def test_without_an_s3_prefix_a_last_report_claims_no_sync(box: Instance) -> None:
    # Nothing is copied anywhere: "synced" would let a cancel delete the only copy.
    done = python_workload(box, "done", "raise SystemExit(0)")
    assert box.run(box.params(done, s3_prefix=None)) == 0
    (exited,) = reports(box, "exited")
    assert "synced" not in exited["body"]
    assert exited["body"]["exit_code"] == 0
