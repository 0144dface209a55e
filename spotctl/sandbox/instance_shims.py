"""The commands an emulated instance runs, answered by the sandbox (standard library + boto3).

The instance emulator writes one wrapper per command into the instance's ``bin`` dir::

    exec <python> <this file> lsblk "$@"

so the real user data calls ``lsblk``, ``mount``, ``aws``... by name, as on EC2. Run as
a script (never imported by the emulator's process), so starting it costs a bare
interpreter; boto3 is imported only by ``aws``. What each command sees of the world
comes from the instance's fake IMDS server (private ``/_sandbox/`` paths), which asks
``LocalCloud`` live: a volume is a block device here only while EC2 shows it attached.

Environment (set by the emulator):
    SPOTCTL_SANDBOX_IMDS     the instance's IMDS base URL
    SPOTCTL_SANDBOX_VOLUMES  the directory holding one directory per EBS volume id
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from datetime import UTC
from pathlib import Path
from typing import Any

ROOT_DEVICE = ("nvme0n1", "vol00000000000000000")  # the root volume, never a data volume
FS_TYPE_FILE = "fstype"  # in a volume's directory: the filesystem mkfs made, if any
FS_DIR = "fs"  # in a volume's directory: the filesystem's contents


def _imds(path: str, method: str = "GET") -> Any:
    url = os.environ["SPOTCTL_SANDBOX_IMDS"].rstrip("/") + path
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)  # noqa: S310
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback IMDS
        return json.loads(response.read().decode() or "null")


def attached_devices() -> list[dict[str, str]]:
    """``[{"name": "nvme1n1", "serial": "vol0abc...", "volume_id": "vol-0abc..."}]``."""
    devices: list[dict[str, str]] = _imds("/_sandbox/devices")["devices"]
    return devices


def volume_of(device: str) -> str | None:
    name = device.removeprefix("/dev/")
    for found in attached_devices():
        if found["name"] == name:
            return found["volume_id"]
    return None


def volume_dir(volume_id: str) -> Path:
    return Path(os.environ["SPOTCTL_SANDBOX_VOLUMES"]) / volume_id


def _positional(argv: list[str], with_value: set[str]) -> list[str]:
    """Arguments that are not options (skipping the values of ``with_value`` options)."""
    found, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in with_value:
            skip = True
        elif not arg.startswith("-"):
            found.append(arg)
    return found


def _fail(message: str, code: int) -> int:
    print(message, file=sys.stderr)
    return code


# -- block devices and filesystems -------------------------------------------------------


def lsblk(argv: list[str]) -> int:
    columns = ["NAME"]
    if "-o" in argv:
        columns = argv[argv.index("-o") + 1].upper().split(",")
    rows = [{"NAME": ROOT_DEVICE[0], "SERIAL": ROOT_DEVICE[1], "TYPE": "disk"}]
    rows += [{"NAME": d["name"], "SERIAL": d["serial"], "TYPE": "disk"} for d in attached_devices()]
    if "-n" not in argv and "--noheadings" not in argv:
        print(" ".join(columns))
    for row in rows:
        print(" ".join(row.get(column, "") for column in columns))
    return 0


def blkid(argv: list[str]) -> int:
    devices = _positional(argv, {"-o", "-s", "-t", "-c", "-u", "-n"})
    if not devices:
        return _fail("blkid: no device given (the sandbox probes one device)", 4)
    volume_id = volume_of(devices[0])
    if volume_id is None:
        return _fail(f"blkid: error: {devices[0]}: No such file or directory", 4)
    fs_type = volume_dir(volume_id) / FS_TYPE_FILE
    if not fs_type.exists():
        return 2  # no signature at all: a blank device
    kind = fs_type.read_text().strip()
    if "-o" in argv and argv[argv.index("-o") + 1] == "value":
        print(kind)
    else:
        print(f'{devices[0]}: TYPE="{kind}"')
    return 0


def mkfs(kind: str, argv: list[str]) -> int:
    devices = _positional(argv, {"-L", "-t", "-b", "-m", "-E", "-O", "-d", "-i", "-l", "-n"})
    if not devices:
        return _fail(f"mkfs.{kind}: no device given", 1)
    volume_id = volume_of(devices[-1])
    if volume_id is None:
        return _fail(f"mkfs.{kind}: {devices[-1]}: No such file or directory", 1)
    directory = volume_dir(volume_id)
    shutil.rmtree(directory / FS_DIR, ignore_errors=True)  # a new filesystem is empty
    (directory / FS_DIR).mkdir(parents=True)
    (directory / FS_TYPE_FILE).write_text(kind + "\n")
    return 0


def mount(argv: list[str]) -> int:
    args = _positional(argv, {"-o", "-t"})
    if len(args) != 2:
        return _fail("mount: the sandbox mounts 'DEVICE MOUNTPOINT' only", 1)
    device, mount_point = args[0], Path(args[1])
    volume_id = volume_of(device)
    if volume_id is None:
        return _fail(f"mount: {mount_point}: special device {device} does not exist.", 32)
    directory = volume_dir(volume_id)
    if not (directory / FS_TYPE_FILE).exists():
        return _fail(f"mount: {mount_point}: wrong fs type, bad superblock on {device}.", 32)
    if mount_point.is_symlink():
        mount_point.unlink()
    elif mount_point.is_dir():
        if any(mount_point.iterdir()):
            return _fail(f"mount: {mount_point}: the sandbox mounts on empty dirs only", 32)
        mount_point.rmdir()
    elif mount_point.exists():
        return _fail(f"mount: {mount_point}: mount point is not a directory.", 32)
    mount_point.parent.mkdir(parents=True, exist_ok=True)
    mount_point.symlink_to((directory / FS_DIR).resolve(), target_is_directory=True)
    return 0


# -- the rest of the machine ---------------------------------------------------------------


def shutdown(argv: list[str]) -> int:
    # EC2 with InstanceInitiatedShutdownBehavior=terminate: shutting down ends the instance.
    _imds("/_sandbox/shutdown", method="POST")
    return 0


def nvidia_smi(argv: list[str]) -> int:
    return _fail("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", 9)


def docker(argv: list[str]) -> int:
    return _fail("docker: not available in the spotctl sandbox; run jobs without an image", 127)


# -- aws s3, against the sandbox's S3 --------------------------------------------------------


def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def _remote_objects(s3: Any, bucket: str, prefix: str) -> dict[str, tuple[int, float]]:
    """key (relative to prefix) -> (size, last modified)."""
    found: dict[str, tuple[int, float]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"][len(prefix) :]] = (item["Size"], item["LastModified"].timestamp())
    return found


def _excluded(relative: str, excludes: list[str]) -> bool:
    return any(fnmatch.fnmatch(relative, pattern) for pattern in excludes)


def _sync_up(s3: Any, source: str, destination: str, excludes: list[str]) -> int:
    local = Path(source)
    if not local.is_dir():
        return _fail(f"fatal error: The user-provided path {source} does not exist.", 255)
    bucket, key = _split_s3(destination)
    prefix = key if not key or key.endswith("/") else key + "/"
    remote = _remote_objects(s3, bucket, prefix)
    code = 0
    for path in sorted(p for p in local.rglob("*") if not p.is_dir()):
        relative = path.relative_to(local).as_posix()
        if _excluded(relative, excludes):
            continue
        try:
            stat = path.stat()
            known = remote.get(relative)
            # S3 keeps LastModified to the second; compare at that precision.
            if known and known[0] == stat.st_size and known[1] >= int(stat.st_mtime):
                continue
            s3.upload_file(str(path), bucket, prefix + relative)
        except FileNotFoundError:  # renamed or removed while we walked
            print(f"warning: Skipping file {path}. File does not exist.", file=sys.stderr)
            code = 2
            continue
        print(f"upload: {path} to s3://{bucket}/{prefix}{relative}")
    return code


def _sync_down(s3: Any, source: str, destination: str, excludes: list[str]) -> int:
    bucket, key = _split_s3(source)
    prefix = key if not key or key.endswith("/") else key + "/"
    local = Path(destination)
    for relative, (size, modified) in sorted(_remote_objects(s3, bucket, prefix).items()):
        if not relative or relative.endswith("/") or _excluded(relative, excludes):
            continue
        target = local / relative
        if target.exists():
            stat = target.stat()
            if stat.st_size == size and int(stat.st_mtime) >= int(modified):
                continue
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, prefix + relative, str(target))
        os.utime(target, (modified, modified))
        print(f"download: s3://{bucket}/{prefix}{relative} to {target}")
    return 0


def _copy(s3: Any, source: str, destination: str) -> int:
    if source.startswith("s3://") and not destination.startswith("s3://"):
        bucket, key = _split_s3(source)
        target = Path(destination)
        if destination.endswith("/") or target.is_dir():
            target = target / key.rsplit("/", 1)[-1]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(target))
        print(f"download: {source} to {target}")
        return 0
    if destination.startswith("s3://") and not source.startswith("s3://"):
        bucket, key = _split_s3(destination)
        if not key or key.endswith("/"):
            key += Path(source).name
        s3.upload_file(source, bucket, key)
        print(f"upload: {source} to s3://{bucket}/{key}")
        return 0
    return _fail("aws s3 cp: the sandbox copies between a local path and S3 only", 252)


def _list(s3: Any, location: str, recursive: bool) -> int:
    bucket, prefix = _split_s3(location)
    paginator = s3.get_paginator("list_objects_v2")
    options: dict[str, str] = {"Bucket": bucket, "Prefix": prefix}
    if not recursive:
        options["Delimiter"] = "/"
    for page in paginator.paginate(**options):
        for common in page.get("CommonPrefixes", []):
            print(f"{'PRE':>30} {common['Prefix'][len(prefix) :]}")
        for item in page.get("Contents", []):
            when = item["LastModified"].astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
            name = item["Key"] if recursive else item["Key"][len(prefix) :]
            print(f"{when} {item['Size']:>10} {name}")
    return 0


def aws(argv: list[str]) -> int:
    args = [a for a in argv if a not in ("--no-progress", "--quiet", "--only-show-errors")]
    if args[:1] != ["s3"] or len(args) < 2:
        return _fail("aws: the sandbox implements 'aws s3 sync|cp|ls' only", 252)
    excludes = [args[i + 1] for i, a in enumerate(args) if a == "--exclude"]
    positional = _positional(args[2:], {"--exclude", "--include", "--region"})
    # Imported here only: every other command starts without boto3's half second.
    import boto3  # noqa: PLC0415
    from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

    s3 = boto3.client("s3")
    try:
        if args[1] == "sync" and len(positional) == 2:
            source, destination = positional
            if destination.startswith("s3://") and not source.startswith("s3://"):
                return _sync_up(s3, source, destination, excludes)
            if source.startswith("s3://") and not destination.startswith("s3://"):
                return _sync_down(s3, source, destination, excludes)
        if args[1] == "cp" and len(positional) == 2:
            return _copy(s3, *positional)
        if args[1] == "ls" and len(positional) == 1:
            return _list(s3, positional[0], "--recursive" in args)
    except (BotoCoreError, ClientError, OSError) as exc:
        return _fail(f"fatal error: {exc}", 1)
    return _fail(f"aws s3 {' '.join(args[1:])}: not supported by the sandbox", 252)


COMMANDS = {
    "lsblk": lsblk,
    "blkid": blkid,
    "mkfs.ext4": lambda argv: mkfs("ext4", argv),
    "mkfs.xfs": lambda argv: mkfs("xfs", argv),
    "mount": mount,
    "resize2fs": lambda argv: 0,  # the volume directory has no size to grow into
    "xfs_growfs": lambda argv: 0,
    "shutdown": shutdown,
    "nvidia-smi": nvidia_smi,
    "docker": docker,
    "aws": aws,
}


def main(argv: list[str]) -> int:
    name, args = argv[1], argv[2:]
    try:
        return COMMANDS[name](args)
    except (urllib.error.URLError, OSError) as exc:
        return _fail(f"{name}: sandbox instance unreachable: {exc}", 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
