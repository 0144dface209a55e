#!/usr/bin/env python3
"""spotctl instance agent, exec'd by bootstrap.sh once the job's volume is mounted.

``agent.py pick-member TABLE INDEX PARAMS``: see pick_member.

Restores checkpoints onto a fresh volume, runs the workload, polls instance metadata
for the interruption notice and the rebalance recommendation, syncs checkpoints to S3,
reports to the spotctl API, and shuts the instance down. Standard library only, and
Python 3.9 (Amazon Linux 2023's python3). Overrides: see the top of bootstrap.sh.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

LOG = logging.getLogger("agent")
MARKER = ".spotctl/volume-id"  # the volume this filesystem was last mounted from
ECR_HOST = re.compile(r"\d{12}\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?")
LEAVE_TAG = "spotctl:leave"


@dataclass(frozen=True)
class Params:
    """The job as chalicelib/userdata.py rendered it (same fields as AgentParams)."""

    job_id: str
    attempt: int
    api_url: str
    secret: str
    volume_id: str
    command: tuple[str, ...]
    image: str | None
    s3_prefix: str | None
    checkpoint_dir: str
    grace_seconds: int
    stop_signal: str
    sync_interval_seconds: int
    env: dict[str, str]

    @classmethod
    def load(cls, path: str) -> Params:
        with open(path, encoding="utf-8") as f:
            doc: dict[str, Any] = json.load(f)
        doc["command"] = tuple(doc["command"])
        doc["env"] = dict(doc.get("env") or {})
        doc["s3_prefix"] = (doc.get("s3_prefix") or "").rstrip("/") or None
        return cls(**doc)


@dataclass(frozen=True)
class Settings:
    imds_url: str
    mount_point: str
    log_dir: str
    poll_seconds: float
    report_attempts: int
    report_backoff_seconds: float
    pull_attempts: int

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Settings:
        def get(name: str, default: str) -> str:
            return env.get("SPOTCTL_" + name, default)

        return cls(
            imds_url=get("IMDS_URL", "http://169.254.169.254").rstrip("/"),
            mount_point=get("MOUNT_POINT", "/mnt/data"),
            log_dir=get("LOG_DIR", "/var/log/spotctl"),
            poll_seconds=float(get("POLL_SECONDS", "5")),
            report_attempts=int(get("REPORT_ATTEMPTS", "8")),
            report_backoff_seconds=float(get("REPORT_BACKOFF_SECONDS", "1")),
            pull_attempts=int(get("PULL_ATTEMPTS", "3")),
        )


def run_command(argv: list[str], stdin_text: str | None = None) -> tuple[int, str]:
    """Run a short external command; its exit code and combined output."""
    try:
        done = subprocess.run(argv, input=stdin_text, capture_output=True, text=True, check=False)
    except OSError as exc:
        return 127, str(exc)
    return done.returncode, done.stdout + done.stderr


def http_open(
    url: str, method: str, headers: dict[str, str], timeout: float, data: bytes | None = None
) -> http.client.HTTPResponse:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url}")
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
    response: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310
    return response


NO_ANSWER = (OSError, http.client.HTTPException)  # refused, reset, timed out, garbled


class Metadata:
    """IMDSv2: a session token from PUT /latest/api/token goes with every GET."""

    def __init__(self, base_url: str) -> None:
        self._base = base_url
        self._token = ""
        self._expires = 0.0

    def _fresh_token(self) -> str:
        if not self._token or time.monotonic() > self._expires:
            ttl = {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}
            with http_open(self._base + "/latest/api/token", "PUT", ttl, 2) as response:
                self._token = response.read().decode()
            self._expires = time.monotonic() + 21000
        return self._token

    def get(self, path: str) -> str | None:
        """meta-data/<path>, or None when it is absent (404)."""
        for _ in range(2):
            token = {"X-aws-ec2-metadata-token": self._fresh_token()}
            try:
                with http_open(self._base + "/latest/meta-data/" + path, "GET", token, 2) as r:
                    return r.read().decode()
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                if exc.code != 401:
                    raise
                self._token = ""  # expired or revoked: one retry with a new token
        raise OSError(f"metadata {path}: token refused twice")

    def probe(self, path: str) -> str | None:
        """get(), with a metadata outage logged and read as "nothing there"."""
        try:
            return self.get(path)
        except NO_ANSWER as exc:
            LOG.warning("metadata %s unavailable: %s", path, exc)
            return None


class Reporter:
    """POST {api}/jobs/{id}/reports: 2xx done, other 4xx final, 429/5xx/no answer retried."""

    def __init__(self, params: Params, settings: Settings) -> None:
        self._params = params
        self._attempts = settings.report_attempts
        self._backoff = settings.report_backoff_seconds
        self._url = f"{params.api_url}/jobs/{urllib.parse.quote(params.job_id, safe='')}/reports"
        self._pending: list[threading.Thread] = []

    def report(self, kind: str, exit_code: int | None = None, detail: str = "") -> bool:
        body: dict[str, Any] = {"attempt": self._params.attempt, "kind": kind}
        if exit_code is not None:
            body["exit_code"] = exit_code
        if detail:
            body["detail"] = detail[:500]
        headers = {
            "Authorization": f"Bearer {self._params.secret}",
            "Content-Type": "application/json",
        }
        for attempt in range(1, self._attempts + 1):
            try:
                with http_open(self._url, "POST", headers, 10, json.dumps(body).encode()) as r:
                    LOG.info("reported %s (HTTP %s)", kind, r.status)
                    return True
            except urllib.error.HTTPError as exc:
                if exc.code != 429 and exc.code < 500:
                    LOG.error("report %s refused (HTTP %s); not retrying", kind, exc.code)
                    return False
                why = f"HTTP {exc.code}"
            except NO_ANSWER as exc:
                why = str(exc) or type(exc).__name__
            if attempt == self._attempts:
                LOG.error("report %s failed (%s); gave up after %d tries", kind, why, attempt)
                return False
            delay = min(self._backoff * 2 ** (attempt - 1), 60.0) * random.uniform(0.5, 1.0)
            LOG.warning("report %s failed (%s); retry in %.1fs", kind, why, delay)
            time.sleep(delay)
        return False

    def report_soon(self, kind: str, detail: str = "") -> None:
        """Report from a thread, so that watching never waits for the API."""
        thread = threading.Thread(target=self.report, args=(kind, None, detail), daemon=True)
        thread.start()
        self._pending.append(thread)

    def drain(self, timeout: float) -> None:
        """Let earlier reports land first, so that the API sees them in order."""
        deadline = time.monotonic() + timeout
        for thread in self._pending:
            thread.join(max(0.0, deadline - time.monotonic()))


class CheckpointStore:
    """The checkpoint directory on the volume, mirrored under the job's S3 prefix."""

    def __init__(self, params: Params, settings: Settings) -> None:
        self.local = os.path.join(settings.mount_point, params.checkpoint_dir)
        prefix = params.s3_prefix
        self.remote = f"{prefix}/{params.checkpoint_dir}/" if prefix else None
        self.logs_remote = f"{prefix}/logs/attempt-{params.attempt}/" if prefix else None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.on_synced: Callable[[int], None] = lambda uploaded: None

    def restore(self) -> None:
        """Copy S3's checkpoints onto the volume; never deletes anything."""
        for attempt in range(3):
            if self.remote is None:
                return
            rc, out = run_command(["aws", "s3", "sync", self.remote, self.local, "--no-progress"])
            if rc == 0:
                LOG.info("restored %d file(s) from %s", out.count("download:"), self.remote)
                return
            LOG.warning("restore from %s failed (exit %d): %s", self.remote, rc, out.strip())
            time.sleep(2**attempt)
        LOG.error("could not restore from %s; starting without it", self.remote)

    def push(self, periodic: bool = False) -> bool:
        """Upload new and changed checkpoints (no deletes); waits for a sync in flight."""
        if self.remote is None:
            return True
        with self._lock:
            os.sync()
            # A workload writes "<name>.tmp" and renames it: never upload a half file.
            argv = ["aws", "s3", "sync", self.local, self.remote, "--no-progress"]
            rc, out = run_command([*argv, "--exclude", "*.tmp"])
            uploaded = out.count("upload:")
            # Exit 2: some files were skipped (a .tmp renamed away mid-sync); the rest
            # went up and the next sync takes the renamed file.
            if rc not in (0, 2):
                LOG.error("sync to %s failed (exit %d): %s", self.remote, rc, out.strip())
                return False
            LOG.info("synced %d file(s) to %s", uploaded, self.remote)
            if uploaded and periodic:  # the last sync is told in exited/interrupted
                self.on_synced(uploaded)
            return True

    def push_soon(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self.push, args=(True,), daemon=True)
            self._thread.start()

    def push_logs(self, log_dir: str) -> None:
        if self.logs_remote is not None:
            run_command(["aws", "s3", "sync", log_dir, self.logs_remote, "--no-progress"])


class Workload:
    """The user's command: a child process, or a container when the job names an image."""

    def __init__(self, params: Params, settings: Settings, output: IO[str]) -> None:
        self.params = params
        self.settings = settings
        self.output = output
        self.proc: subprocess.Popen[str] | None = None
        self.pulls_left = settings.pull_attempts
        self.next_pull: float | None = None
        self.stopping = False  # once signalled, an ended pull is not retried
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", params.job_id)[:50]
        self.container = f"spotctl-{name}-{params.attempt}"
        self.phase = "pull" if params.image else "run"
        self.error = ""
        self.checkpoint_dir = os.path.join(settings.mount_point, params.checkpoint_dir)

    def launch(self, argv: list[str]) -> bool:
        env = dict(os.environ)
        if not self.params.image:  # a container gets them from run_argv's env file
            env.update(self.params.env)
        env.update(
            SPOTCTL_JOB_ID=self.params.job_id,
            SPOTCTL_ATTEMPT=str(self.params.attempt),
            SPOTCTL_CHECKPOINT_DIR=self.checkpoint_dir,
        )
        try:  # argv exactly as submitted: no shell ever sees it
            self.proc = subprocess.Popen(
                argv,
                cwd=self.settings.mount_point,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self.output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: a signal reaches all of it
                text=True,
            )
        except OSError as exc:
            self.error = f"cannot start {argv[0]!r}: {exc}"
            LOG.error("%s", self.error)
            return False
        return True

    def start(self) -> bool:
        if not self.params.image:
            return self.launch(list(self.params.command))
        host = self.params.image.split("/", 1)[0]
        ecr = ECR_HOST.fullmatch(host)
        if ecr and "/" in self.params.image:
            rc, password = run_command(["aws", "ecr", "get-login-password", "--region", ecr[1]])
            login = ["docker", "login", "--username", "AWS", "--password-stdin", host]
            if rc != 0 or run_command(login, password.strip())[0] != 0:
                LOG.warning("ECR login to %s failed; the pull may fail", host)
        return self.launch(["docker", "pull", self.params.image])

    def run_argv(self) -> list[str]:
        p, mount = self.params, self.settings.mount_point
        rc, gpus = run_command(["nvidia-smi", "-L"])
        argv = ["docker", "run", "--rm", "--init", "--ipc=host", "--name", self.container]
        argv += ["--gpus", "all"] if rc == 0 and "GPU" in gpus else []
        argv += ["-v", f"{mount}:{mount}", "-e", f"SPOTCTL_JOB_ID={p.job_id}"]
        argv += ["-e", f"SPOTCTL_ATTEMPT={p.attempt}"]
        argv += ["-e", f"SPOTCTL_CHECKPOINT_DIR={self.checkpoint_dir}"]
        if p.env:
            argv += ["--env-file", self.env_file()]
        return [*argv, str(p.image), *p.command]

    def env_file(self) -> str:
        """The job's variables for ``docker run --env-file`` (a file only root reads):
        out of docker's argv, and out of the docker client's own environment, where a
        PATH or DOCKER_HOST meant for the container would steer the client. One
        NAME=VALUE a line; the API accepts only single-line values."""
        fd, path = tempfile.mkstemp(prefix="spotctl-env-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(f"{name}={value}\n" for name, value in self.params.env.items())
        return path

    def poll(self) -> int | None:
        """None while the workload (or its image pull) goes on, else its exit code."""
        code = 127 if self.proc is None else self.proc.poll()
        if code is None or self.phase != "pull" or self.stopping:
            return None if code is None else shell_code(code)
        if code == 0:
            LOG.info("pulled %s; starting the container", self.params.image)
            self.phase = "run"
            return None if self.launch(self.run_argv()) else 125
        if self.next_pull is None:  # this failure is not counted yet
            self.pulls_left -= 1
            if self.pulls_left <= 0:
                self.error = f"docker pull {self.params.image} failed (exit {code})"
                return 125
            LOG.warning("docker pull failed (exit %d); again in 10s", code)
            self.next_pull = time.monotonic() + 10
        if time.monotonic() >= self.next_pull:
            self.next_pull = None
            self.launch(["docker", "pull", str(self.params.image)])
        return None

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return code

    def send(self, signame: str) -> None:
        self.stopping = True
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.phase == "run" and self.params.image:
            rc, out = run_command(["docker", "kill", "--signal", signame, self.container])
            if rc == 0:
                return
            LOG.warning("docker kill --signal %s failed: %s", signame, out.strip())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, getattr(signal, "SIG" + signame))


def shell_code(returncode: int) -> int:
    """Popen says -N for death by signal N; report it as a shell does, 128+N."""
    return 128 - returncode if returncode < 0 else returncode


class Agent:
    def __init__(self, params: Params, settings: Settings, env: dict[str, str]) -> None:
        self.params = params
        self.settings = settings
        self.env = env
        self.metadata = Metadata(settings.imds_url)
        self.reporter = Reporter(params, settings)
        self.store = CheckpointStore(params, settings)
        self.store.on_synced = lambda n: self.reporter.report_soon(
            "checkpoint_synced", f"{n} file(s) uploaded"
        )
        self.stop_reason = ""  # set when the agent itself gets SIGTERM

    def prepare_volume(self) -> None:
        """Restore from S3 unless this filesystem already was this job's volume.

        A new volume has no marker; one made from a snapshot in another AZ names the
        old volume. Either way S3 may hold checkpoints newer than what it carries.
        """
        os.makedirs(self.store.local, exist_ok=True)
        marker = os.path.join(self.settings.mount_point, MARKER)
        seen = ""
        with contextlib.suppress(FileNotFoundError), open(marker, encoding="utf-8") as f:
            seen = f.read().strip()
        if seen == self.params.volume_id:
            LOG.info("volume was already this job's; nothing to restore")
            return
        LOG.info("fresh volume (last held by %s); restoring checkpoints", seen or "nothing")
        self.store.restore()
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker + ".tmp", "w", encoding="utf-8") as f:
            f.write(self.params.volume_id + "\n")
        os.replace(marker + ".tmp", marker)

    def run(self) -> int:
        p, env = self.params, self.env
        LOG.info("job %s attempt %d", p.job_id, p.attempt)
        self.prepare_volume()
        os.makedirs(self.settings.log_dir, exist_ok=True)
        with open(os.path.join(self.settings.log_dir, "workload.log"), "a") as output:
            workload = Workload(p, self.settings, output)
            if not workload.start():
                return self.finish(workload, 127)
            fs = "new filesystem" if env.get("SPOTCTL_FS_CREATED") == "1" else "reused"
            self.reporter.report_soon(
                "started",
                f"instance {env.get('SPOTCTL_INSTANCE_ID')} ({env.get('SPOTCTL_INSTANCE_TYPE')})"
                f", volume on {env.get('SPOTCTL_VOLUME_DEVICE')}, {fs}",
            )
            return self.watch(workload)

    def watch(self, workload: Workload) -> int:
        rebalance_seen = None
        next_sync = time.monotonic() + self.params.sync_interval_seconds
        while True:
            code = workload.poll()
            # Asked even after the workload ended: a workload that quit on the notice by
            # itself was interrupted, not finished.
            notice = self.stop_reason or self.metadata.probe("spot/instance-action")
            if notice is not None:
                return self.interrupted(workload, notice)
            if code is not None:
                return self.finish(workload, code)
            leave = self.metadata.probe("tags/instance/" + LEAVE_TAG)
            if leave is not None:
                return self.interrupted(workload, f"asked to leave on-demand for spot ({leave})")
            rebalance = self.metadata.probe("events/recommendations/rebalance")
            if rebalance is not None and rebalance != rebalance_seen:
                LOG.warning("rebalance recommendation: %s", rebalance)
                rebalance_seen = rebalance
                self.reporter.report_soon("rebalance", rebalance)
            if time.monotonic() >= next_sync:
                next_sync = time.monotonic() + self.params.sync_interval_seconds
                self.store.push_soon()
            workload.wait(self.settings.poll_seconds)

    def interrupted(self, workload: Workload, notice: str) -> int:
        p = self.params
        LOG.warning("interruption: %s; SIG%s to the workload", notice, p.stop_signal)
        workload.send(p.stop_signal)
        code = workload.wait(p.grace_seconds)
        if code is None:
            LOG.warning("workload still running after %ds; killing it", p.grace_seconds)
            workload.send("KILL")
            code = workload.wait(10)
        synced = self.store.push()
        detail = f"{notice.strip()}; workload exit {code}; sync {'ok' if synced else 'FAILED'}"
        self.reporter.drain(5)
        self.reporter.report("interrupted", detail=detail)
        self.store.push_logs(self.settings.log_dir)
        # Going now frees the volume for the replacement.
        return self.shutdown()

    def finish(self, workload: Workload, code: int) -> int:
        LOG.info("workload exited with %d", code)
        synced = self.store.push()
        detail = workload.error or f"sync {'ok' if synced else 'FAILED'}"
        self.reporter.drain(10)
        self.reporter.report("exited", exit_code=code, detail=detail)
        self.store.push_logs(self.settings.log_dir)
        return self.shutdown()

    def shutdown(self) -> int:
        LOG.info("shutting down")
        rc, out = run_command(["shutdown", "-h", "now"])
        if rc != 0:
            LOG.error("shutdown failed (exit %d): %s", rc, out.strip())
        return 0


def pick_member(table_path: str, index: int, params_path: str) -> str:
    """On an instance of a batch (bootstrap.sh runs this first): keep member ``index`` (our
    ami-launch-index) of the table as params.json and delete the table, which holds
    every member's secret. Returns the line to log."""
    with open(table_path, encoding="utf-8") as f:
        members: list[dict[str, Any]] = json.load(f)
    if not 0 <= index < len(members):
        raise IndexError(f"launch index {index}, but the batch has {len(members)} member(s)")
    member = members[index]
    fd = os.open(params_path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(member, f)
    os.replace(params_path + ".tmp", params_path)
    os.remove(table_path)  # the other members' secrets are not ours to keep
    return f"batch member {index} of {len(members)}: job {member['job_id']}"


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[1] == "pick-member":
        try:
            print(pick_member(argv[2], int(argv[3]), argv[4]))
        except Exception as exc:  # the message names no secret
            print(f"pick-member: {exc!r}", file=sys.stderr)
            return 1
        return 0
    logging.basicConfig(
        stream=sys.stdout,  # bootstrap.sh tees stdout to agent.log and the console
        level=logging.INFO,
        format="%(asctime)s agent: %(levelname)s %(message)s",
    )
    env = dict(os.environ)
    agent = Agent(Params.load(argv[1]), Settings.from_env(env), env)

    def on_sigterm(signum: int, frame: object) -> None:
        agent.stop_reason = "agent got SIGTERM (instance shutting down)"

    signal.signal(signal.SIGTERM, on_sigterm)
    return agent.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
