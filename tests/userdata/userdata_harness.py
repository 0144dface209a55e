"""A fake instance for the real user data: PATH shims, a fake IMDSv2 and a fake API.

Everything listens on loopback only. The user data under test is exactly what
chalicelib.userdata.render_user_data returns, run with bash as cloud-init would.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from chalicelib.userdata import AgentParams, render_batch_user_data, render_user_data

REPO = Path(__file__).resolve().parents[2]
SHIM = Path(__file__).resolve().parent / "userdata_shim.py"
SHIMMED = [
    "lsblk",
    "blkid",
    "mkfs.ext4",
    "mkfs.xfs",
    "mount",
    "resize2fs",
    "xfs_growfs",
    "aws",
    "docker",
    "nvidia-smi",
    "shutdown",
]
VOLUME_ID = "vol-0123456789abcdef0"
SECRET = "s3cr3t-token-for-job"
EC2_TIME = "%Y-%m-%dT%H:%M:%SZ"  # the time in spot/instance-action


class _Quiet(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class FakeIMDS:
    """IMDSv2 on loopback: GETs without a token this server issued get 401."""

    def __init__(self) -> None:
        self.instance_action: dict[str, str] | None = None
        self.rebalance: dict[str, str] | None = None
        # The instance's tags, as IMDS shows them when its launch enabled InstanceMetadataTags.
        self.tags: dict[str, str] = {}
        self.launch_index = "0"  # which instance of its RunInstances request this is
        self.raw: dict[str, bytes] = {}  # path -> a body as it is, even one no agent expects
        self.tokens: set[str] = set()
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        imds = self

        class Handler(_Quiet):
            def do_PUT(self) -> None:
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                imds.note("PUT", self.path, ttl)
                if self.path != "/latest/api/token" or not ttl:
                    self.answer(400, "")
                    return
                with imds.lock:
                    token = f"token-{len(imds.tokens)}"
                    imds.tokens.add(token)
                self.answer(200, token)

            def do_GET(self) -> None:
                token = self.headers.get("X-aws-ec2-metadata-token")
                imds.note("GET", self.path, token)
                if token not in imds.tokens:
                    self.answer(401, "")
                    return
                documents = {
                    "/latest/meta-data/instance-id": "i-0fake0instance0",
                    "/latest/meta-data/instance-type": "p3.2xlarge",
                    "/latest/meta-data/ami-launch-index": imds.launch_index,
                }
                if imds.instance_action is not None:
                    documents["/latest/meta-data/spot/instance-action"] = json.dumps(
                        imds.instance_action
                    )
                if imds.rebalance is not None:
                    documents["/latest/meta-data/events/recommendations/rebalance"] = json.dumps(
                        imds.rebalance
                    )
                if imds.tags:
                    documents["/latest/meta-data/tags/instance"] = "\n".join(imds.tags)
                for key, value in imds.tags.items():
                    documents[f"/latest/meta-data/tags/instance/{key}"] = value
                body = imds.raw.get(self.path, documents.get(self.path))
                self.answer(404 if body is None else 200, "Not Found" if body is None else body)

            def answer(self, status: int, body: str | bytes) -> None:
                data = body if isinstance(body, bytes) else body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def note(self, method: str, path: str, token: str | None) -> None:
        with self.lock:
            self.requests.append({"t": time.time(), "method": method, "path": path, "hdr": token})

    def interrupt(self, seconds_left: int = 120) -> float:
        """The spot interruption notice: EC2 takes the instance ``seconds_left`` from now
        (to the second, as EC2 writes it). Returns when the notice appeared."""
        now = time.time()
        goes_at = datetime.fromtimestamp(math.ceil(now) + seconds_left, UTC)
        self.instance_action = {"action": "terminate", "time": goes_at.strftime(EC2_TIME)}
        return now

    def ask_to_leave(self) -> float:
        """What spotctl's CreateTags does to an on-demand instance it moves to spot."""
        self.tags = {**self.tags, "spotctl:leave": "2026-11-28T12:00:00Z"}
        return time.time()


class FakeAPI:
    """The spotctl API's report endpoint: records reports, answers from a script."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []
        self.statuses: list[int] = []  # answers to give first, then 200
        self.lock = threading.Lock()
        api = self

        class Handler(_Quiet):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                with api.lock:
                    status = api.statuses.pop(0) if api.statuses else 200
                    api.reports.append(
                        {
                            "t": time.time(),
                            "path": self.path,
                            "auth": self.headers.get("Authorization"),
                            "body": body,
                            "status": status,
                        }
                    )
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api"

    def kinds(self) -> list[str]:
        return [r["body"]["kind"] for r in self.reports if r["status"] < 300]


@dataclass
class Instance:
    """One fake instance: a tmp tree standing for the machine, its volume and S3."""

    root: Path
    imds: FakeIMDS
    api: FakeAPI
    env: dict[str, str] = field(default_factory=dict)

    @property
    def mount(self) -> Path:
        return Path(self.env["SPOTCTL_MOUNT_POINT"])

    @property
    def s3(self) -> Path:
        return Path(self.env["SHIM_S3_ROOT"])

    @property
    def shim_dir(self) -> Path:
        return Path(self.env["SHIM_DIR"])

    def set(self, name: str, value: str) -> None:
        """Steer a shim (see userdata_shim.py), e.g. set("blkid.rc", "0")."""
        (self.shim_dir / name).write_text(value)

    def params(self, command: list[str], **overrides: Any) -> AgentParams:
        fields: dict[str, Any] = {
            "job_id": "job-42",
            "attempt": 1,
            "api_url": self.api.url,
            "secret": SECRET,
            "volume_id": VOLUME_ID,
            "command": tuple(command),
            "s3_prefix": "s3://bucket/jobs/job-42",
            "grace_seconds": 5,
            "sync_interval_seconds": 3600,
        }
        fields.update(overrides)
        return AgentParams(**fields)

    def start(self, params: AgentParams | list[AgentParams]) -> subprocess.Popen[str]:
        """Run the user data of one job, or of a batch (a list: the member table)."""
        script = self.root / "user-data"
        if isinstance(params, list):
            script.write_text(render_batch_user_data(params))
        else:
            script.write_text(render_user_data(params))
        return subprocess.Popen(
            ["bash", str(script)],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, params: AgentParams | list[AgentParams], timeout: float = 30) -> int:
        proc = self.start(params)
        try:
            proc.communicate(timeout=timeout)
        finally:
            proc.kill()
        return proc.returncode

    def calls(self, cmd: str | None = None) -> list[dict[str, Any]]:
        log = Path(self.env["SHIM_LOG"])
        if not log.exists():
            return []
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        return [c for c in entries if cmd is None or c["cmd"] == cmd]

    def agent_log(self) -> str:
        path = Path(self.env["SPOTCTL_LOG_DIR"]) / "agent.log"
        return path.read_text() if path.exists() else ""


@dataclass
class Machine:
    """What lives across instances: the fake IMDS/API servers and the fake S3."""

    root: Path
    imds: FakeIMDS
    api: FakeAPI

    def instance(self, name: str = "i1") -> Instance:
        base = self.root / name
        shims = base / "bin"
        shims.mkdir(parents=True)
        for cmd in SHIMMED:
            wrapper = shims / cmd
            wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{SHIM}" {cmd} "$@"\n')
            wrapper.chmod(0o755)
        (base / "mnt").mkdir()
        env = {
            "PATH": f"{shims}:{os.environ['PATH']}",
            "HOME": str(base),
            "LANG": "C.UTF-8",
            "SHIM_DIR": str(shims),
            "SHIM_LOG": str(base / "calls.jsonl"),
            "SHIM_S3_ROOT": str(self.root / "s3"),
            "SPOTCTL_IMDS_URL": self.imds.url,
            "SPOTCTL_MOUNT_POINT": str(base / "mnt"),
            "SPOTCTL_LOG_DIR": str(base / "log"),
            "SPOTCTL_STATE_DIR": str(base / "state"),
            "SPOTCTL_PYTHON": sys.executable,
            "SPOTCTL_POLL_SECONDS": "0.2",
            "SPOTCTL_VOLUME_POLL_SECONDS": "0.1",
            "SPOTCTL_VOLUME_WAIT_SECONDS": "10",
            "SPOTCTL_REPORT_BACKOFF_SECONDS": "0.05",
            "SPOTCTL_SYNC_BACKOFF_SECONDS": "0.05",
            "SPOTCTL_RESTORE_SECONDS": "1",
            "SPOTCTL_SETTLE_SECONDS": "0.1",
        }
        instance = Instance(base, self.imds, self.api, env)
        instance.set(
            "lsblk.out", f"nvme0n1 vol0aaaaaaaaaaaaaaaa\nnvme1n1 {VOLUME_ID.replace('-', '')}"
        )
        return instance


def machine(tmp_path: Path) -> Iterator[Machine]:
    """Generator for a pytest fixture: servers up for the test, shut down after."""
    imds, api = FakeIMDS(), FakeAPI()
    threads = [
        threading.Thread(target=s.serve_forever, daemon=True) for s in (imds.server, api.server)
    ]
    for t in threads:
        t.start()
    try:
        yield Machine(tmp_path, imds, api)
    finally:
        for s in (imds.server, api.server):
            s.shutdown()
            s.server_close()


def python_workload(instance: Instance, name: str, source: str) -> list[str]:
    """A workload command: this interpreter running a script written for the test."""
    path = instance.root / f"{name}.py"
    path.write_text(source)
    return [sys.executable, str(path)]


def wait_for(predicate: Any, timeout: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
