"""The instance emulator: fake IMDSv2, the PATH shims, volumes as directories, cleanup."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spotctl.sandbox import LocalCloud
from spotctl.sandbox.emulator import InstanceEmulator, marked_pids
from tests.sandbox.conftest import launch, volume_in

SLEEPER = "#!/bin/bash\nsleep 300 &\nwait\n"  # user data that just stays up


@pytest.fixture
def emulator(cloud: LocalCloud, tmp_path: Path) -> Iterator[InstanceEmulator]:
    emulator = InstanceEmulator(cloud, tmp_path / "sandbox")
    emulator.start()
    yield emulator
    emulator.stop()
    assert emulator.live_processes() == []


def boot(ec2: Any, cloud: LocalCloud, emulator: InstanceEmulator, **extra: Any) -> str:
    instance_id = launch(ec2, UserData=SLEEPER, **extra)
    cloud.pump()  # delivers "running" to the emulator
    assert instance_id in emulator.instances
    return instance_id


def imds(
    emulator: InstanceEmulator,
    instance_id: str,
    path: str,
    token: str | None = None,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    url = emulator.instances[instance_id].imds.url + path
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["X-aws-ec2-metadata-token"] = token
    request = urllib.request.Request(url, method=method, headers=all_headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def token_for(emulator: InstanceEmulator, instance_id: str) -> str:
    headers = {"X-aws-ec2-metadata-token-ttl-seconds": "300"}
    status, token = imds(emulator, instance_id, "/latest/api/token", method="PUT", headers=headers)
    assert status == 200
    return token


def shim(
    emulator: InstanceEmulator, instance_id: str, *argv: str
) -> subprocess.CompletedProcess[str]:
    """Run a command as the instance's user data would: by name, through its PATH."""
    env = emulator.environment(emulator.instances[instance_id])
    return subprocess.run(list(argv), env=env, capture_output=True, text=True, check=False)


def test_imds_answers_only_with_a_token_it_issued(
    ec2: Any, cloud: LocalCloud, emulator: InstanceEmulator
) -> None:
    instance_id = boot(ec2, cloud, emulator)
    assert imds(emulator, instance_id, "/latest/meta-data/instance-id")[0] == 401
    assert imds(emulator, instance_id, "/latest/meta-data/instance-id", token="forged")[0] == 401
    no_ttl = imds(emulator, instance_id, "/latest/api/token", method="PUT")
    assert no_ttl[0] == 400

    token = token_for(emulator, instance_id)
    assert imds(emulator, instance_id, "/latest/meta-data/instance-id", token) == (
        200,
        instance_id,
    )
    zone = imds(emulator, instance_id, "/latest/meta-data/placement/availability-zone", token)
    assert zone == (200, "us-east-1a")
    assert imds(emulator, instance_id, "/latest/meta-data/instance-type", token) == (
        200,
        "p3.2xlarge",
    )
    assert imds(emulator, instance_id, "/latest/meta-data/spot/instance-action", token)[0] == 404
    assert imds(emulator, instance_id, "/latest/meta-data/no-such-thing", token)[0] == 404


def test_interruption_notice_appears_in_imds_and_termination_kills_every_process(
    ec2: Any, cloud: LocalCloud, emulator: InstanceEmulator
) -> None:
    instance_id = boot(ec2, cloud, emulator)
    marker = emulator.instances[instance_id].marker
    assert marked_pids(marker), "the user data runs"

    cloud.advance(600)  # the trace takes the pool's capacity away
    token = token_for(emulator, instance_id)
    status, body = imds(emulator, instance_id, "/latest/meta-data/spot/instance-action", token)
    assert status == 200
    notice = json.loads(body)
    assert notice["action"] == "terminate"
    assert notice == cloud.instance_action(instance_id)

    cloud.advance(130)  # the two minutes are over
    assert cloud.ec2.instance_state(instance_id) == "terminated"
    assert marked_pids(marker) == []
    assert emulator.instances[instance_id].ended


def test_imds_serves_tags_added_after_launch_only_when_the_launch_enabled_tags(
    ec2: Any, cloud: LocalCloud, emulator: InstanceEmulator
) -> None:
    tagged = boot(
        ec2,
        cloud,
        emulator,
        spot=False,
        MetadataOptions={"HttpTokens": "required", "InstanceMetadataTags": "enabled"},
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": "spotctl:job-id", "Value": "job-1"}]}
        ],
    )
    untagged = boot(ec2, cloud, emulator, spot=False)
    described = ec2.describe_instances(InstanceIds=[tagged])["Reservations"][0]["Instances"][0]
    assert described["MetadataOptions"]["InstanceMetadataTags"] == "enabled"  # moto kept it
    leave = "/latest/meta-data/tags/instance/spotctl:leave"
    token = token_for(emulator, tagged)
    assert imds(emulator, tagged, "/latest/meta-data/tags/instance", token) == (
        200,
        "spotctl:job-id",
    )
    assert imds(emulator, tagged, leave, token)[0] == 404

    for instance_id in (tagged, untagged):
        ec2.create_tags(
            Resources=[instance_id],
            Tags=[{"Key": "spotctl:leave", "Value": "2026-11-28T12:00:00Z"}],
        )
    assert imds(emulator, tagged, leave, token) == (200, "2026-11-28T12:00:00Z")
    keys = imds(emulator, tagged, "/latest/meta-data/tags/instance", token)[1]
    assert sorted(keys.split("\n")) == ["spotctl:job-id", "spotctl:leave"]

    # Launched without InstanceMetadataTags: the category is not there at all.
    token = token_for(emulator, untagged)
    assert imds(emulator, untagged, leave, token)[0] == 404
    assert imds(emulator, untagged, "/latest/meta-data/tags/instance", token)[0] == 404


def test_volume_is_a_device_only_while_attached_and_its_data_follows_it(
    ec2: Any, cloud: LocalCloud, emulator: InstanceEmulator
) -> None:
    first = boot(ec2, cloud, emulator)
    volume_id = volume_in(ec2)
    serial = volume_id.replace("-", "")
    assert serial not in shim(emulator, first, "lsblk", "-d", "-n", "-o", "NAME,SERIAL").stdout

    ec2.attach_volume(VolumeId=volume_id, InstanceId=first, Device="/dev/sdf")
    listed = shim(emulator, first, "lsblk", "-d", "-n", "-o", "NAME,SERIAL").stdout.splitlines()
    assert f"nvme1n1 {serial}" in listed
    blank = shim(emulator, first, "blkid", "-p", "-o", "value", "-s", "TYPE", "/dev/nvme1n1")
    assert blank.returncode == 2 and blank.stdout == ""
    missing = shim(emulator, first, "blkid", "-p", "-o", "value", "-s", "TYPE", "/dev/nvme9n1")
    assert missing.returncode not in (0, 2), "an absent device is never 'blank'"

    assert shim(emulator, first, "mkfs.ext4", "-q", "-L", "data", "/dev/nvme1n1").returncode == 0
    probed = shim(emulator, first, "blkid", "-p", "-o", "value", "-s", "TYPE", "/dev/nvme1n1")
    assert (probed.returncode, probed.stdout.strip()) == (0, "ext4")
    mount_point = emulator.instance_dir(first) / "mnt" / "data"
    mount_point.mkdir(parents=True)
    assert (
        shim(emulator, first, "mount", "-o", "noatime", "/dev/nvme1n1", str(mount_point)).returncode
        == 0
    )
    (mount_point / "checkpoint.bin").write_bytes(b"step 42")

    ec2.terminate_instances(InstanceIds=[first])
    cloud.advance(60)  # the detach completes
    second = boot(ec2, cloud, emulator)
    ec2.attach_volume(VolumeId=volume_id, InstanceId=second, Device="/dev/sdf")
    again = shim(emulator, second, "blkid", "-p", "-o", "value", "-s", "TYPE", "/dev/nvme1n1")
    assert again.stdout.strip() == "ext4", "the filesystem came with the volume"
    mount_point = emulator.instance_dir(second) / "mnt" / "data"
    mount_point.mkdir(parents=True)
    assert shim(emulator, second, "mount", "/dev/nvme1n1", str(mount_point)).returncode == 0
    assert (mount_point / "checkpoint.bin").read_bytes() == b"step 42"


def test_aws_s3_sync_uploads_changes_only_and_restores_elsewhere(
    ec2: Any, cloud: LocalCloud, emulator: InstanceEmulator, tmp_path: Path
) -> None:
    instance_id = boot(ec2, cloud, emulator)
    cloud.client("s3").create_bucket(Bucket="results")
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "ckpt-1.npz").write_bytes(b"one")
    (source / "ckpt-2.npz.tmp").write_bytes(b"half written")
    (source / "sub").mkdir()
    (source / "sub" / "final.json").write_text("{}")

    argv = ["aws", "s3", "sync", str(source), "s3://results/job/ckpt/", "--no-progress"]
    first = shim(emulator, instance_id, *argv, "--exclude", "*.tmp")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("upload:") == 2
    again = shim(emulator, instance_id, *argv, "--exclude", "*.tmp")
    assert again.returncode == 0 and "upload:" not in again.stdout

    target = tmp_path / "restored"
    down = shim(emulator, instance_id, "aws", "s3", "sync", "s3://results/job/ckpt/", str(target))
    assert down.returncode == 0, down.stderr
    assert down.stdout.count("download:") == 2
    assert (target / "ckpt-1.npz").read_bytes() == b"one"
    assert (target / "sub" / "final.json").read_text() == "{}"
    assert not (target / "ckpt-2.npz.tmp").exists()
    listing = shim(emulator, instance_id, "aws", "s3", "ls", "s3://results/job/ckpt/")
    assert "ckpt-1.npz" in listing.stdout and "PRE sub/" in listing.stdout


def test_shutdown_terminates_the_instance_and_no_gpu_or_docker_is_there(
    ec2: Any, cloud: LocalCloud, emulator: InstanceEmulator
) -> None:
    instance_id = boot(ec2, cloud, emulator)
    assert shim(emulator, instance_id, "nvidia-smi", "-L").returncode != 0
    assert shim(emulator, instance_id, "docker", "pull", "busybox").returncode == 127

    assert shim(emulator, instance_id, "shutdown", "-h", "now").returncode == 0
    for thread in emulator._shutdowns:
        thread.join(timeout=10)
    cloud.pump()
    assert cloud.ec2.instance_state(instance_id) == "terminated"
    assert emulator.instances[instance_id].ended
    assert marked_pids(emulator.instances[instance_id].marker) == []


@pytest.mark.parametrize(("behavior", "ends"), [(None, "stopped"), ("terminate", "terminated")])
def test_an_on_demand_instance_s_shutdown_does_what_its_launch_asked(
    ec2: Any, cloud: LocalCloud, emulator: InstanceEmulator, behavior: str | None, ends: str
) -> None:
    # EC2's default for a shutdown from inside is stop: spotctl asks for terminate.
    extra = {"InstanceInitiatedShutdownBehavior": behavior} if behavior else {}
    instance_id = boot(ec2, cloud, emulator, spot=False, **extra)
    assert shim(emulator, instance_id, "shutdown", "-h", "now").returncode == 0
    for thread in emulator._shutdowns:
        thread.join(timeout=10)
    cloud.pump()
    assert cloud.ec2.instance_state(instance_id) == ends
