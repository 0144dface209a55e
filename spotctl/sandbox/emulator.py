"""The instance emulator: each running instance of a ``LocalCloud`` runs its real user data.

For every instance that comes up, the emulator starts the user data EC2 was given (the
bash script ``chalicelib.userdata`` rendered) as a local process group, with:

- a fake IMDSv2 server of its own on loopback: ``PUT /latest/api/token``, token-checked
  GETs of ``instance-id``, ``instance-type``, ``placement/availability-zone``,
  ``spot/instance-action`` and ``events/recommendations/rebalance`` (asked of
  ``LocalCloud`` at each request, so the notice appears when the market interrupts),
  ``tags/instance`` and ``tags/instance/<key>`` (the instance's tags now, if it was
  launched with ``InstanceMetadataTags`` enabled), 404 for the rest;
- one directory per EBS volume, keyed by volume id, so the data follows the volume from
  instance to instance;
- the programs the sandbox's "AMI" carries (``image_programs``: name -> argv), such as
  the example trainer, since jobs run without a container image here;
- PATH shims (``instance_shims.py``) for ``lsblk``, ``blkid``, ``mkfs.*``, ``mount``,
  ``resize2fs``, ``xfs_growfs``, ``nvidia-smi`` (no GPU), ``docker`` (absent), ``aws``
  (``s3 sync|cp|ls`` against the sandbox's S3) and ``shutdown`` (terminates the instance
  through the sandbox's EC2 API).

When EC2 shows the instance terminated (or stopped), every process it started is
killed: the agent has had its two minutes. Each instance's processes carry a marker in
their environment, so even a workload that left the process group (the agent starts it
in a session of its own) or was orphaned is found and ended. Linux only (``/proc``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from spotctl.sandbox.cloud import LocalCloud
from spotctl.sandbox.ec2 import InstanceInfo, Lifecycle, LifecycleEvent

logger = logging.getLogger(__name__)

SHIM_SCRIPT = Path(__file__).with_name("instance_shims.py")
SHIMMED_COMMANDS = (
    "lsblk",
    "blkid",
    "mkfs.ext4",
    "mkfs.xfs",
    "mount",
    "resize2fs",
    "xfs_growfs",
    "shutdown",
    "nvidia-smi",
    "docker",
    "aws",
)
MARKER_VARIABLE = "SPOTCTL_SANDBOX_MARKER"
TOKEN_TTL_MAX_SECONDS = 21600


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The instance's processes are killed mid-request at termination: no error.
        logger.debug("IMDS request from %s ended early", client_address, exc_info=True)


class FakeImds:
    """IMDSv2 for one instance, on loopback; ``/_sandbox/`` paths serve its shims."""

    def __init__(self, emulator: InstanceEmulator, instance_id: str) -> None:
        self.emulator = emulator
        self.instance_id = instance_id
        self.tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"imds-{instance_id}",
            daemon=True,
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def issue_token(self, ttl: int) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self.tokens[token] = time.monotonic() + ttl
        return token

    def token_valid(self, token: str | None) -> bool:
        with self._lock:
            expiry = self.tokens.get(token or "")
        return expiry is not None and time.monotonic() < expiry

    def metadata(self, path: str) -> str | None:
        """The text IMDS answers for ``/latest/meta-data/<path>``, or None (404)."""
        cloud = self.emulator.cloud
        info = cloud.instance(self.instance_id)
        if info is None:
            return None
        if path == "spot/instance-action":
            action = cloud.instance_action(self.instance_id)
            return json.dumps(action) if action is not None else None
        if path == "events/recommendations/rebalance":
            notice = cloud.rebalance_notice(self.instance_id)
            return json.dumps(notice) if notice is not None else None
        if path == "tags/instance" or path.startswith("tags/instance/"):
            tags = cloud.metadata_tags(self.instance_id)
            if tags is None:
                return None
            key = path.removeprefix("tags/instance").strip("/")
            return tags.get(key) if key else "\n".join(tags)
        static = {
            "instance-id": info.instance_id,
            "instance-type": info.instance_type,
            "placement/availability-zone": info.az,
            "placement/region": info.region,
            "instance-life-cycle": "spot" if info.market == "spot" else "on-demand",
        }
        return static.get(path)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        imds = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def answer(self, status: int, body: str, kind: str = "text/plain") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
                if self.path != "/latest/api/token":
                    self.answer(404, "Not Found")
                elif not ttl.isdigit() or not 1 <= int(ttl) <= TOKEN_TTL_MAX_SECONDS:
                    self.answer(400, "Bad Request")
                else:
                    self.answer(200, imds.issue_token(int(ttl)))

            def do_GET(self) -> None:
                if self.path == "/_sandbox/devices":
                    body = json.dumps({"devices": imds.emulator.devices(imds.instance_id)})
                    self.answer(200, body, "application/json")
                    return
                if not imds.token_valid(self.headers.get("X-aws-ec2-metadata-token")):
                    self.answer(401, "Unauthorized")
                    return
                text = None
                if self.path.startswith("/latest/meta-data/"):
                    text = imds.metadata(self.path.removeprefix("/latest/meta-data/"))
                elif self.path == "/latest/user-data":
                    info = imds.emulator.cloud.instance(imds.instance_id)
                    text = info.user_data if info is not None else None
                self.answer(404, "Not Found") if text is None else self.answer(200, text)

            def do_POST(self) -> None:
                if self.path != "/_sandbox/shutdown":
                    self.answer(404, "Not Found")
                    return
                imds.emulator.shutdown_soon(imds.instance_id)
                self.answer(200, "{}", "application/json")

        return Handler


@dataclass
class EmulatedInstance:
    """One instance's local stand-ins: its directory, IMDS server and user-data process."""

    info: InstanceInfo
    directory: Path
    marker: str
    imds: FakeImds
    process: subprocess.Popen[bytes] | None = None
    devices: dict[str, str] = field(default_factory=dict)  # volume id -> nvme name
    ended: bool = False

    @property
    def log_dir(self) -> Path:
        return self.directory / "log"


class InstanceEmulator:
    """Runs the real user data of every instance ``cloud`` starts; see the module doc."""

    def __init__(
        self,
        cloud: LocalCloud,
        root: str | Path,
        *,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        image_programs: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.cloud = cloud
        self.root = Path(root).resolve()
        self.python = python
        self.extra_env = dict(env or {})
        # What the sandbox's AMI has installed beyond the OS: name -> argv it runs.
        self.image_programs = {k: list(v) for k, v in (image_programs or {}).items()}
        self.instances: dict[str, EmulatedInstance] = {}
        self._lock = threading.RLock()
        self._stopped = False
        self._shutdowns: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self.volumes_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "instances").mkdir(parents=True, exist_ok=True)
        self.cloud.add_observer(self.on_lifecycle)

    def stop(self) -> None:
        """End every instance's processes and IMDS server."""
        with self._lock:
            self._stopped = True
            instances = list(self.instances.values())
        for thread in list(self._shutdowns):
            thread.join(timeout=10)
        for instance in instances:
            self._end(instance)

    def on_lifecycle(self, event: LifecycleEvent) -> None:
        if event.kind == Lifecycle.RUNNING:
            self.boot(event.instance)
        elif event.kind in (Lifecycle.TERMINATED, Lifecycle.STOPPED):
            with self._lock:
                instance = self.instances.get(event.instance.instance_id)
            if instance is not None:
                self._end(instance)

    # -- where things are --------------------------------------------------------------

    @property
    def volumes_dir(self) -> Path:
        return self.root / "volumes"

    def volume_dir(self, volume_id: str) -> Path:
        return self.volumes_dir / volume_id

    def instance_dir(self, instance_id: str) -> Path:
        return self.root / "instances" / instance_id

    def devices(self, instance_id: str) -> list[dict[str, str]]:
        """Block devices the instance sees: its volumes EC2 shows attached to it now."""
        if self.cloud.ec2.instance_state(instance_id) != "running":
            return []
        info = self.cloud.instance(instance_id)
        with self._lock:
            instance = self.instances.get(instance_id)
            if info is None or instance is None:
                return []
            found = []
            for volume_id in sorted(info.volumes):
                # Nitro numbers NVMe devices in attach order; the serial names the volume.
                name = instance.devices.setdefault(volume_id, f"nvme{len(instance.devices) + 1}n1")
                found.append(
                    {"name": name, "serial": volume_id.replace("-", ""), "volume_id": volume_id}
                )
        for volume in found:
            self.volume_dir(volume["volume_id"]).mkdir(parents=True, exist_ok=True)
        return found

    # -- booting -------------------------------------------------------------------------

    def boot(self, info: InstanceInfo) -> None:
        """Start the instance's user data, once per instance (as cloud-init runs it)."""
        with self._lock:
            if self._stopped or info.instance_id in self.instances:
                return
            directory = self.instance_dir(info.instance_id)
            imds = FakeImds(self, info.instance_id)
            instance = EmulatedInstance(info, directory, secrets.token_hex(8), imds)
            self.instances[info.instance_id] = instance
        imds.start()
        bin_dir = directory / "bin"
        for sub in ("bin", "log", "run", "home", "mnt"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        self._write_shims(bin_dir)
        script = directory / "user-data"
        script.write_text(info.user_data)
        console = (directory / "console.log").open("ab")
        try:
            instance.process = subprocess.Popen(
                ["bash", str(script)],
                cwd=directory,
                env=self.environment(instance),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            console.close()
        logger.info("booted %s (%s in %s)", info.instance_id, info.instance_type, info.az)

    def _write_shims(self, bin_dir: Path) -> None:
        programs = {name: [self.python, str(SHIM_SCRIPT), name] for name in SHIMMED_COMMANDS}
        programs.update(self.image_programs)
        for name, argv in programs.items():
            path = bin_dir / name
            path.write_text(f'#!/bin/sh\nexec {shlex.join(argv)} "$@"\n')
            path.chmod(0o755)

    def environment(self, instance: EmulatedInstance) -> dict[str, str]:
        """The environment the instance's user data (and every shim) runs with."""
        directory = instance.directory
        python_bin = str(Path(self.python).parent)
        path = os.pathsep.join([str(directory / "bin"), python_bin, os.environ.get("PATH", "")])
        env = {
            "PATH": path,
            "HOME": str(directory / "home"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            **self.cloud.env(),  # the instance profile's view of AWS: the sandbox
            MARKER_VARIABLE: instance.marker,
            "SPOTCTL_SANDBOX_IMDS": instance.imds.url,
            "SPOTCTL_SANDBOX_VOLUMES": str(self.volumes_dir),
            "SPOTCTL_IMDS_URL": instance.imds.url,
            "SPOTCTL_MOUNT_POINT": str(directory / "mnt" / "data"),
            "SPOTCTL_LOG_DIR": str(instance.log_dir),
            "SPOTCTL_STATE_DIR": str(directory / "run"),
            "SPOTCTL_PYTHON": self.python,
            "SPOTCTL_VOLUME_POLL_SECONDS": "0.2",
            "SPOTCTL_POLL_SECONDS": "0.25",
            "SPOTCTL_REPORT_BACKOFF_SECONDS": "0.2",
            "PYTHONUNBUFFERED": "1",
        }
        env.update(self.extra_env)
        return env

    # -- shutting down -----------------------------------------------------------------

    def shutdown_soon(self, instance_id: str) -> None:
        """``shutdown -h now``, after the shim returns: the instance's
        ``InstanceInitiatedShutdownBehavior`` decides, as on EC2 (its default is stop;
        a spot instance here is always terminated)."""

        def terminate() -> None:
            try:
                ec2 = self.cloud.client("ec2")
                info = self.cloud.ec2.instance(instance_id)
                if info is not None and info.market != "spot":
                    behavior = ec2.describe_instance_attribute(
                        InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior"
                    )["InstanceInitiatedShutdownBehavior"]["Value"]
                    if behavior == "stop":
                        ec2.stop_instances(InstanceIds=[instance_id])
                        return
                self.cloud.ec2.note_shutdown_from_inside(instance_id)
                ec2.terminate_instances(InstanceIds=[instance_id])
            except Exception:
                logger.exception("shutdown of %s failed", instance_id)

        thread = threading.Thread(target=terminate, name=f"shutdown-{instance_id}", daemon=True)
        with self._lock:
            self._shutdowns = [t for t in self._shutdowns if t.is_alive()]
            self._shutdowns.append(thread)
        thread.start()

    def _end(self, instance: EmulatedInstance) -> None:
        with self._lock:
            if instance.ended:
                return
            instance.ended = True
        kill_marked(instance.marker, instance.process)
        instance.imds.stop()
        logger.info("ended %s", instance.info.instance_id)

    def live_processes(self) -> list[int]:
        """Pids of processes any emulated instance started that are still alive."""
        with self._lock:
            markers = [i.marker for i in self.instances.values()]
        return [pid for marker in markers for pid in marked_pids(marker)]


def marked_pids(marker: str) -> list[int]:
    """Live processes whose environment carries ``SPOTCTL_SANDBOX_MARKER=<marker>``."""
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            status = (entry / "stat").read_text()
        except OSError:
            continue
        state = status.rpartition(")")[2].split()[0] if ")" in status else ""
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def kill_marked(marker: str, root: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGKILL every process carrying ``marker`` (and ``root``'s group) until none is left."""
    if root is not None and root.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(root.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    quiet_scans = 0
    while time.monotonic() < deadline:
        pids = marked_pids(marker)
        # A process in the middle of exec may hide its environment for an instant:
        # only several empty scans in a row mean that nothing is left.
        quiet_scans = 0 if pids else quiet_scans + 1
        if quiet_scans >= 3:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    else:
        logger.warning("processes of marker %s survived SIGKILL: %s", marker, marked_pids(marker))
    if root is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            root.wait(timeout=max(0.1, deadline - time.monotonic()))
