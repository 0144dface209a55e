"""Stand-in for the external commands the instance side runs (tests only).

Invoked as `python userdata_shim.py NAME ARGS...` by a one-line wrapper named NAME on
PATH. Every call is appended to $SHIM_LOG as JSON; behaviour is steered by files in
$SHIM_DIR (written by the test) so a test can change the world while the agent runs.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

SHIM_DIR = Path(os.environ["SHIM_DIR"])


def setting(name: str, default: str) -> str:
    path = SHIM_DIR / name
    return path.read_text().strip() if path.exists() else default


def record(name: str, argv: list[str]) -> None:
    line = json.dumps({"t": time.time(), "cmd": name, "argv": argv}) + "\n"
    with open(os.environ["SHIM_LOG"], "a") as f:
        f.write(line)


def s3_path(location: str) -> Path | None:
    if location.startswith("s3://"):
        return Path(os.environ["SHIM_S3_ROOT"]) / location.removeprefix("s3://")
    return None


def aws(argv: list[str]) -> int:
    if argv[:2] == ["ecr", "get-login-password"]:
        print("ecr-password")
        return 0
    if argv[:2] != ["s3", "sync"]:
        return 2
    if int(setting("aws-s3.rc", "0")):
        print("fatal error: simulated S3 outage", file=sys.stderr)
        return int(setting("aws-s3.rc", "0"))
    src, dst = argv[2], argv[3]
    excludes = [argv[i + 1] for i, a in enumerate(argv) if a == "--exclude"]
    src_dir, dst_dir = s3_path(src) or Path(src), s3_path(dst) or Path(dst)
    verb = "upload" if dst.startswith("s3://") else "download"
    if not src_dir.is_dir():
        return 0
    for path in sorted(src_dir.rglob("*")):
        rel = path.relative_to(src_dir).as_posix()
        if path.is_dir() or any(fnmatch.fnmatch(rel, p) for p in excludes):
            continue
        target = dst_dir / rel
        if target.exists() and target.stat().st_size == path.stat().st_size:
            # awscli's rule for a same-sized file, either way: copied only when the
            # local one is newer; with --exact-timestamps (downloads), unless the
            # times are equal.
            local, remote = (path, target) if verb == "upload" else (target, path)
            local_time, remote_time = local.stat().st_mtime, remote.stat().st_mtime
            if "--exact-timestamps" in argv and verb == "download":
                if local_time == remote_time:
                    continue
            elif not local_time > remote_time:
                continue
        target.parent.mkdir(parents=True, exist_ok=True)
        # As awscli does: into a temporary file, renamed over the target; a download
        # gets the object's time, an object its upload's.
        shutil.copy2(path, target.with_name(target.name + ".shim-part"))
        os.replace(target.with_name(target.name + ".shim-part"), target)
        if verb == "upload":
            os.utime(target)
        print(f"{verb}: {src.rstrip('/')}/{rel} to {dst.rstrip('/')}/{rel}")
    return 0


def docker(argv: list[str]) -> int:
    containers = SHIM_DIR / "containers"
    containers.mkdir(exist_ok=True)
    if argv[0] == "pull":
        return int(setting("docker-pull.rc", "0"))
    if argv[0] == "login":
        sys.stdin.read()
        return 0
    if argv[0] == "kill":
        signame = argv[2] if argv[1] == "--signal" else "KILL"
        pid = int((containers / argv[-1]).read_text())
        signum = getattr(signal, "SIG" + signame)
        try:
            # As tini (--init) does: to its child only, unless TINI_KILL_PROCESS_GROUP=1.
            if (containers / f"{argv[-1]}.group").exists():
                os.killpg(os.getpgid(pid), signum)
            else:
                os.kill(pid, signum)
        except ProcessLookupError:
            print(f"Error response from daemon: {argv[-1]} is not running", file=sys.stderr)
            return 1
        return 0
    if argv[0] != "run":
        return 1
    # A container sees none of docker's environment but what -e passes (and the
    # image's PATH, here the host's).
    env = {"PATH": os.environ["PATH"]}
    i, name = 1, "unnamed"
    while argv[i].startswith("-"):
        flag = argv[i]
        if flag in ("--name", "-v", "-e", "--gpus", "--env-file", "--log-opt"):
            value = argv[i + 1]
            if flag == "--name":
                name = value
            if flag == "--env-file":  # NAME=VALUE lines, as docker reads them
                for raw in Path(value).read_text(encoding="utf-8").splitlines():
                    line = raw.lstrip()
                    if line and not line.startswith("#"):
                        key, _, val = line.partition("=")
                        env[key] = val
            if flag == "-e":  # NAME=VALUE, or NAME: the value of docker's own environment
                key, equals, val = value.partition("=")
                if equals:
                    env[key] = val
                elif key in os.environ:
                    env[key] = os.environ[key]
            i += 2
        else:
            i += 1
    command = argv[i + 1 :]  # argv[i] is the image
    (containers / name).write_text(str(os.getpid()))
    if "--init" in argv[:i] and env.get("TINI_KILL_PROCESS_GROUP") == "1":
        (containers / f"{name}.group").touch()
    os.execvpe(command[0], command, env)  # noqa: S606 - a container runs argv as given
    return 127  # not reached


def main() -> int:
    name, argv = sys.argv[1], sys.argv[2:]
    record(name, argv)
    if name == "lsblk":
        print(setting("lsblk.out", "nvme0n1 vol0000000000000000a"))
        return 0
    if name == "blkid":
        out = setting("blkid.out", "")
        if out:
            print(out)
        return int(setting("blkid.rc", "2"))
    if name == "nvidia-smi":
        gpus = setting("gpus", "")
        if not gpus:
            print("NVIDIA-SMI has failed", file=sys.stderr)
            return 9
        print(gpus)
        return 0
    if name == "aws":
        return aws(argv)
    if name == "docker":
        return docker(argv)
    return 0  # mount, mkfs.*, resize2fs, xfs_growfs, shutdown: recorded only


if __name__ == "__main__":
    sys.exit(main())
