#!/usr/bin/env python3
# spotctl instance agent, exec'd by bootstrap.sh once the job's volume is mounted.
# (``agent.py pick-member TABLE INDEX PARAMS``: see pick_member; ``agent.py report-exit
# PARAMS CODE DETAIL``: bootstrap.sh telling a failure no new instance would get past.)
#
# Restores checkpoints onto a fresh volume, runs the workload, polls instance metadata
# for the interruption notice and the rebalance recommendation, syncs checkpoints to S3,
# reports to the spotctl API, and shuts the instance down. Standard library only, and
# Python 3.9 (Amazon Linux 2023's python3). Overrides: docs/workload-contract.md.
# Comments, unlike docstrings, are not shipped (chalicelib/userdata.py): the user data
# is limited to 16 KB.

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import logging
import os
import random
import re
import shutil
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
from datetime import datetime
from typing import IO, Any

LOG = logging.getLogger("agent")
MARKER = ".spotctl/volume-id"  # the volume this filesystem was last mounted from
ECR_HOST = re.compile(r"\d{12}\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?")
LEAVE_TAG = "spotctl:leave"
# The exit code told when the agent could not run the workload to its end (the restore
# failed, or the agent did): the job fails, or restarts if its spec allows, rather than
# being relaunched without end. docker uses 125 alike.
AGENT_FAILED = 125
FINAL_SYNC_SECONDS = 300  # after the workload's exit, the last sync is retried this long
# After the exit, its report is retried this long: a long job's result is worth an API
# outage (a deploy, throttling; lost, the job would run again), but the instance bills
# meanwhile.
FINAL_REPORT_SECONDS = 600
STOP_RESERVE_SECONDS = 30  # of a notice's two minutes, kept for the last sync and report


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
    sync_backoff_seconds: float
    pull_attempts: int
    log_limit_bytes: int
    restore_seconds: float

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
            sync_backoff_seconds=float(get("SYNC_BACKOFF_SECONDS", "2")),
            pull_attempts=int(get("PULL_ATTEMPTS", "3")),
            log_limit_bytes=int(get("LOG_LIMIT_BYTES", str(512 * 2**20))),
            # An S3 outage this long fails the attempt (the job, unless it may restart).
            restore_seconds=float(get("RESTORE_SECONDS", "600")),
        )


def run_command(
    argv: list[str], stdin_text: str | None = None, timeout: float | None = None
) -> tuple[int, str]:
    # Run an external command; its exit code (124: timed out) and combined output.
    try:
        done = subprocess.run(
            argv, input=stdin_text, capture_output=True, text=True, check=False, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f}s"
    except OSError as exc:
        return 127, str(exc)
    return done.returncode, done.stdout + done.stderr


def retried(
    what: str, attempt: Callable[[], bool | None], backoff: float, tries: int, until: float = 0
) -> bool:
    # attempt() until it returns True (None: give up), with doubling jittered pauses,
    # ``tries`` times or, given ``until`` (monotonic), while a pause ends before it.
    for n in itertools.count(1):
        done = attempt()
        if done is not False:
            return bool(done)
        delay = min(backoff * 2 ** (n - 1), 60.0) * random.uniform(0.5, 1.0)
        if (time.monotonic() + delay >= until) if until else (n >= tries):
            LOG.error("%s: gave up after %d tries", what, n)
            return False
        time.sleep(delay)
    return False


def notice_time(notice: str) -> float | None:
    # The notice's "time" (2026-11-28T12:02:00Z) as epoch seconds.
    try:
        when = json.loads(notice)["time"]
        return datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def files_under(top: str) -> list[str]:
    # The paths of the files under ``top``, relative to it.
    paths = (os.path.join(d, name) for d, _, names in os.walk(top) for name in names)
    return [os.path.relpath(path, top) for path in paths]


def log_over(path: str, limit: int) -> bool:
    try:
        return os.path.getsize(path) > limit
    except OSError:
        return False


def cap_log(path: str, limit: int) -> None:
    # A week of a chatty workload fills the root disk: past ``limit``, the log is copied
    # to <path>.1 (the one before is dropped) and emptied in place, as logrotate's
    # copytruncate does. The workload writes with O_APPEND, so it goes on at the new
    # end; the lines written between the copy and the truncate are lost.
    try:
        shutil.copyfile(path, path + ".1")
        os.truncate(path, 0)
    except OSError as exc:
        LOG.warning("could not cap %s: %s", path, exc)
        return
    LOG.info("%s passed %d bytes: moved to %s.1", path, limit, path)


def group_alive(pgid: int) -> bool:
    # Zombies do not count: an orphan whose parent died waits for init to reap it.
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue  # ended meanwhile
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]  # after "pid (comm)"
        if int(pgrp) == pgid and state not in ("Z", "X"):
            return True
    return False


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
        # meta-data/<path>, or None when it is absent (404).
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
        # get(), with a metadata outage logged and read as "nothing there".
        try:
            return self.get(path)
        except NO_ANSWER as exc:
            LOG.warning("metadata %s unavailable: %s", path, exc)
            return None


class Reporter:
    """POST {api}/jobs/{id}/reports: 4xx but 408/429 final, else retried."""

    def __init__(self, params: Params, settings: Settings) -> None:
        self._params = params
        self._attempts = settings.report_attempts
        self._backoff = settings.report_backoff_seconds
        self._url = f"{params.api_url}/jobs/{urllib.parse.quote(params.job_id, safe='')}/reports"
        self._pending: list[threading.Thread] = []

    def report(
        self,
        kind: str,
        exit_code: int | None = None,
        detail: str = "",
        until: float = 0,
        synced: bool | None = None,
    ) -> bool:
        # Tried report_attempts times or, given ``until``, until that monotonic time.
        # ``synced``: the last sync, after the workload stopped, worked (a cancel may
        # then delete the volume); None when there is no S3 copy or nothing ran.
        body: dict[str, Any] = {"attempt": self._params.attempt, "kind": kind}
        if exit_code is not None:
            body["exit_code"] = exit_code
        if synced is not None:
            body["synced"] = synced
        if detail:
            body["detail"] = detail[:500]
        headers = {
            "Authorization": f"Bearer {self._params.secret}",
            "Content-Type": "application/json",
        }

        def post() -> bool | None:
            try:
                with http_open(self._url, "POST", headers, 10, json.dumps(body).encode()) as r:
                    LOG.info("reported %s (HTTP %s)", kind, r.status)
                    return True
            except urllib.error.HTTPError as exc:
                if exc.code not in (408, 429) and exc.code < 500:
                    LOG.error("report %s refused (HTTP %s); not retrying", kind, exc.code)
                    return None
                LOG.warning("report %s failed (HTTP %s)", kind, exc.code)
            except NO_ANSWER as exc:
                LOG.warning("report %s failed (%s)", kind, str(exc) or type(exc).__name__)
            return False

        return retried(f"report {kind}", post, self._backoff, self._attempts, until)

    def report_soon(self, kind: str, detail: str = "") -> None:
        # Report from a thread, so that watching never waits for the API.
        thread = threading.Thread(target=self.report, args=(kind, None, detail), daemon=True)
        thread.start()
        self._pending.append(thread)

    def drain(self, timeout: float) -> None:
        # Let earlier reports land first, so that the API sees them in order.
        deadline = time.monotonic() + timeout
        for thread in self._pending:
            thread.join(max(0.0, deadline - time.monotonic()))


class CheckpointStore:
    """The checkpoint directory on the volume, mirrored under the job's S3 prefix."""

    def __init__(self, params: Params, settings: Settings) -> None:
        self.mount = settings.mount_point
        self.local = os.path.join(settings.mount_point, params.checkpoint_dir)
        prefix = params.s3_prefix
        self.remote = f"{prefix}/{params.checkpoint_dir}/" if prefix else None
        self.logs_remote = f"{prefix}/logs/attempt-{params.attempt}/" if prefix else None
        self._backoff = settings.sync_backoff_seconds
        self._restore_seconds = settings.restore_seconds
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.on_synced: Callable[[int], None] = lambda uploaded: None

    def restore(self) -> bool:
        # Copy S3's newer checkpoints onto the volume (no deletes); False if S3 failed.
        # `aws s3 sync` copies whenever the sizes differ, even an S3 file older than the
        # volume's (a volume from a snapshot taken after the last sync is ahead of S3).
        # So it syncs into a staging copy made of hard links (no space taken; a download
        # replaces a link by a rename, never writes through it), and a downloaded file
        # goes into place only where it is newer (sync gives it the object's time).
        if self.remote is None:
            return True
        staging = os.path.join(self.mount, ".spotctl", "restore")
        shutil.rmtree(staging, ignore_errors=True)
        for name in files_under(self.local):
            with contextlib.suppress(OSError):  # not linked: downloaded, then compared
                os.makedirs(os.path.dirname(os.path.join(staging, name)), exist_ok=True)
                os.link(os.path.join(self.local, name), os.path.join(staging, name))

        def download() -> bool:
            # --exact-timestamps: else a same-sized file is fetched only when the
            # volume's is newer (awscli's rule), and S3's newer one would be missed.
            argv = ["aws", "s3", "sync", str(self.remote), staging, "--no-progress"]
            rc, out = run_command([*argv, "--exact-timestamps"])
            if rc != 0:
                LOG.warning("restore from %s failed (exit %d): %s", self.remote, rc, out.strip())
            return rc == 0

        until = time.monotonic() + self._restore_seconds
        if not retried("restore", download, self._backoff, 0, until):
            return False
        restored = 0
        for name in files_under(staging):
            new, old = os.path.join(staging, name), os.path.join(self.local, name)
            if os.path.exists(old) and (
                os.path.samefile(new, old) or os.path.getmtime(old) >= os.path.getmtime(new)
            ):
                continue
            os.makedirs(os.path.dirname(old), exist_ok=True)
            os.replace(new, old)
            restored += 1
        shutil.rmtree(staging, ignore_errors=True)
        LOG.info("restored %d file(s) from %s", restored, self.remote)
        return True

    def push(self, until: float = 0, hard: bool = False) -> bool:
        # Upload new and changed checkpoints (no deletes). A periodic sync tries once
        # (the next one comes); the last is retried until ``until`` (monotonic), and
        # with ``hard`` not even an upload under way outlasts it.

        def upload() -> bool:
            os.sync()
            # A workload writes "<name>.tmp" and renames it: never upload a half file.
            argv = ["aws", "s3", "sync", self.local, str(self.remote), "--no-progress"]
            timeout = max(1, until - time.monotonic()) if hard else None
            rc, out = run_command([*argv, "--exclude", "*.tmp"], timeout=timeout)
            # Exit 2: a .tmp renamed away mid-sync was skipped; the next takes it.
            if rc not in (0, 2):
                LOG.error("sync to %s failed (exit %d): %s", self.remote, rc, out.strip())
                return False
            uploaded = out.count("upload:")
            LOG.info("synced %d file(s) to %s", uploaded, self.remote)
            if uploaded and not until:  # the last sync is told in its report
                self.on_synced(uploaded)
            return True

        if self.remote is None:
            return True
        # A periodic sync in flight ends first; with ``hard``, not past ``until``.
        wait = max(0.0, until - time.monotonic()) if hard else -1
        if not self._lock.acquire(timeout=wait):
            LOG.error("sync to %s: a periodic sync still runs at the deadline", self.remote)
            return False
        try:
            return retried("sync", upload, self._backoff, 1, until)
        finally:
            self._lock.release()

    def told(self, synced: bool) -> bool | None:
        # What a last report says of its sync: nothing when there is no S3 copy.
        return synced if self.remote is not None else None

    def push_soon(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self.push, daemon=True)
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
        argv = ["docker", "run", "--rm", "--ipc=host", "--name", self.container]
        # The agent keeps the output (workload.log); docker's own copy stays small.
        argv += ["--log-opt", "max-size=64m", "--log-opt", "max-file=2"]
        # tini (--init) gets docker kill's signal: to the child's whole process group.
        argv += ["--init", "-e", "TINI_KILL_PROCESS_GROUP=1"]
        argv += ["--gpus", "all"] if rc == 0 and "GPU" in gpus else []
        argv += ["-v", f"{mount}:{mount}", "-e", f"SPOTCTL_JOB_ID={p.job_id}"]
        argv += ["-e", f"SPOTCTL_ATTEMPT={p.attempt}"]
        argv += ["-e", f"SPOTCTL_CHECKPOINT_DIR={self.checkpoint_dir}"]
        if p.env:
            argv += ["--env-file", self.env_file()]
        return [*argv, str(p.image), *p.command]

    def env_file(self) -> str:
        # The job's variables for ``docker run --env-file`` (a file only root reads):
        # out of docker's argv, and out of the docker client's own environment, where a
        # PATH or DOCKER_HOST meant for the container would steer the client. One
        # NAME=VALUE a line; the API accepts only single-line values.
        fd, path = tempfile.mkstemp(prefix="spotctl-env-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(f"{name}={value}\n" for name, value in self.params.env.items())
        return path

    def poll(self) -> int | None:
        # None while the workload (or its image pull) goes on, else its exit code.
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

    def running(self) -> bool:
        # Its first process, or any other of its process group: a "bash -c" wrapper
        # dies on SIGTERM while the python it started still saves.
        if self.proc is None:
            return False
        return self.proc.poll() is None or group_alive(self.proc.pid)

    def wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def stop(self, signame: str, grace: float) -> int | None:
        # Signal it, wait up to ``grace`` for all of it to end, then SIGKILL what is
        # left (even once the first process is gone). The first process's exit code.
        self.send(signame)
        if not self.wait_gone(grace):
            LOG.warning("workload still running after %.0fs; killing it", grace)
            self.send("KILL")
            self.wait_gone(5)
        return self.poll()

    def send(self, signame: str) -> None:
        self.stopping = True
        if self.proc is None:
            return
        if self.phase == "run" and self.params.image and self.proc.poll() is None:
            rc, out = run_command(["docker", "kill", "--signal", signame, self.container])
            if rc == 0 and signame != "KILL":
                return
            if rc != 0:
                LOG.warning("docker kill --signal %s failed: %s", signame, out.strip())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, getattr(signal, "SIG" + signame))


def shutdown() -> int:
    LOG.info("shutting down")
    rc, out = run_command(["shutdown", "-h", "now"])
    if rc != 0:
        LOG.error("shutdown failed (exit %d): %s", rc, out.strip())
    return 0


def shell_code(returncode: int) -> int:
    # Popen says -N for death by signal N; report it as a shell does, 128+N.
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
        self.workload: Workload | None = None
        self.notice: str | None = None  # why the instance is going, once known

    def prepare_volume(self) -> bool:
        # Restore from S3 unless this filesystem already was this job's volume.
        # A new volume has no marker; one made from a snapshot in another AZ names the
        # old volume. Either way S3 may hold checkpoints newer than what it carries. The
        # marker is written only once restored: a failed restore is tried again.
        os.makedirs(self.store.local, exist_ok=True)
        marker = os.path.join(self.settings.mount_point, MARKER)
        seen = ""
        with contextlib.suppress(FileNotFoundError), open(marker, encoding="utf-8") as f:
            seen = f.read().strip()
        if seen == self.params.volume_id:
            LOG.info("volume was already this job's; nothing to restore")
            return True
        LOG.info("fresh volume (last held by %s); restoring checkpoints", seen or "nothing")
        if not self.store.restore():
            return False
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker + ".tmp", "w", encoding="utf-8") as f:
            f.write(self.params.volume_id + "\n")
        os.replace(marker + ".tmp", marker)
        return True

    def run(self) -> int:
        p, env = self.params, self.env
        LOG.info("job %s attempt %d", p.job_id, p.attempt)
        if not self.prepare_volume():
            # Run from the volume's older state, its next sync would overwrite the newer
            # checkpoints in S3. Nothing ran, so nothing is synced either.
            why = f"could not restore from {self.store.remote}; the workload was not started"
            LOG.error("%s", why)
            return self.exit_report(AGENT_FAILED, why)
        os.makedirs(self.settings.log_dir, exist_ok=True)
        with open(os.path.join(self.settings.log_dir, "workload.log"), "a") as output:
            workload = self.workload = Workload(p, self.settings, output)
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
        capping: threading.Thread | None = None
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
            leave = self.asked_to_leave()
            if leave is not None:
                return self.interrupted(workload, leave)
            rebalance = self.metadata.probe("events/recommendations/rebalance")
            if rebalance is not None and rebalance != rebalance_seen:
                LOG.warning("rebalance recommendation: %s", rebalance)
                rebalance_seen = rebalance
                self.reporter.report_soon("rebalance", rebalance)
            if time.monotonic() >= next_sync:
                next_sync = time.monotonic() + self.params.sync_interval_seconds
                self.store.push_soon()
            log_args = (workload.output.name, self.settings.log_limit_bytes)
            if (capping is None or not capping.is_alive()) and log_over(*log_args):
                # Beside the loop: a copy of 512 MiB takes seconds, a notice does not wait.
                capping = threading.Thread(target=cap_log, args=log_args, daemon=True)
                capping.start()
            workload.wait(self.settings.poll_seconds)

    def asked_to_leave(self) -> str | None:
        # The leave tag (spotctl moving off on-demand, or a cancel that deletes the
        # volume), as a notice; None when it is not there.
        leave = self.metadata.probe("tags/instance/" + LEAVE_TAG)
        return f"asked to leave ({leave})" if leave is not None else None

    def synced(self, pushed: bool, workload: Workload) -> bool | None:
        # What a last report says of its sync: worked, and nothing of the workload still
        # runs to write after it (a hung docker); nothing when there is no S3 copy.
        return self.store.told(pushed and not workload.running())

    def stop_window(self, notice: str | None) -> tuple[float, float, bool]:
        # When the instance goes (monotonic), the workload's grace, and whether that
        # time is EC2's. EC2 takes the instance at the notice's time: the grace ends
        # early enough to keep STOP_RESERVE_SECONDS for the last sync and the report.
        # Told otherwise (the leave tag, the OS), or by a time already past (the
        # instance would be gone: the clocks disagree), the full grace, and the sync is
        # retried for the reserve but never cut short.
        p, reserve = self.params, STOP_RESERVE_SECONDS
        now, wall = time.monotonic(), time.time()
        goes_at = notice_time(notice) if notice is not None else None
        if goes_at is not None and goes_at > wall:
            deadline, known = now + goes_at - wall, True
        else:
            deadline, known = now + p.grace_seconds + reserve, False
        return deadline, max(0.0, min(p.grace_seconds, deadline - reserve - now)), known

    def interrupted(self, workload: Workload, notice: str) -> int:
        p = self.params
        self.notice = notice
        deadline, grace, known = self.stop_window(notice)
        LOG.warning("interruption: %s; SIG%s, %.0fs of grace", notice, p.stop_signal, grace)
        code = workload.stop(p.stop_signal, grace)
        synced = self.store.push(until=deadline - 5, hard=known)
        detail = f"{notice.strip()}; workload exit {code}; sync {'ok' if synced else 'FAILED'}"
        return self.interrupted_report(detail, deadline, self.synced(synced, workload))

    def finish(self, workload: Workload, code: int) -> int:
        LOG.info("workload exited with %d", code)
        if workload.running():  # what a "&" in a "bash -c" started
            workload.stop(self.params.stop_signal, self.params.grace_seconds)
        synced = self.store.push(until=time.monotonic() + FINAL_SYNC_SECONDS)
        sync = f"sync {'ok' if synced else 'FAILED'}"
        detail = f"{workload.error}; {sync}" if workload.error else sync
        return self.exit_report(code, detail, self.synced(synced, workload))

    def failed(self, exc: BaseException) -> int:
        # An error of the agent's own: the workload (if it ran) is stopped and its
        # checkpoints synced, as at an interruption, before the failure is told. On an
        # instance that is going anyway (a notice, the leave tag), the error is no
        # failure of the job's: it is told as the interruption it was, so the job is
        # relaunched from its checkpoint instead of failing.
        workload, p = self.workload, self.params
        notice = self.notice
        if notice is None:
            with contextlib.suppress(Exception):
                action = self.metadata.probe("spot/instance-action")
                notice = self.stop_reason or action or self.asked_to_leave()
        deadline, grace, _ = self.stop_window(notice)
        synced = None  # nothing ran, or it could not be stopped and synced
        with contextlib.suppress(Exception):
            if workload is not None:
                if workload.running():
                    workload.stop(p.stop_signal, grace)
                synced = self.synced(self.store.push(until=deadline - 5, hard=True), workload)
        if notice is None:
            return self.exit_report(AGENT_FAILED, f"agent failed: {exc!r}", synced)
        return self.interrupted_report(f"{notice.strip()}; agent failed: {exc!r}", deadline, synced)

    def interrupted_report(self, detail: str, deadline: float, synced: bool | None) -> int:
        self.reporter.drain(5)
        with contextlib.suppress(Exception):  # a report that fails must not skip shutdown
            self.reporter.report("interrupted", detail=detail, until=deadline, synced=synced)
            self.store.push_logs(self.settings.log_dir)
        # Going now frees the volume for the replacement.
        return shutdown()

    def exit_report(self, code: int, detail: str, synced: bool | None = None) -> int:
        self.reporter.drain(10)
        until = time.monotonic() + FINAL_REPORT_SECONDS
        with contextlib.suppress(Exception):  # a report that fails must not skip shutdown
            self.reporter.report("exited", code, detail, until, synced)
            self.store.push_logs(self.settings.log_dir)
        return shutdown()


def pick_member(table_path: str, index: int, params_path: str) -> str:
    # On an instance of a batch (bootstrap.sh runs this first): keep member ``index``
    # (our ami-launch-index) of the table as params.json and delete the table, which
    # holds every member's secret. Returns the line to log.
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
    if len(argv) == 5 and argv[1] == "report-exit":
        reporter = Reporter(Params.load(argv[2]), Settings.from_env(env))
        until = time.monotonic() + FINAL_REPORT_SECONDS
        return 0 if reporter.report("exited", int(argv[3]), argv[4], until) else 1
    agent: Agent | None = None
    # bootstrap.sh exec'd us, so its EXIT trap is gone: whatever fails, this is the last
    # code to run on the instance, and it must report and shut the instance down.
    try:
        agent = Agent(Params.load(argv[1]), Settings.from_env(env), env)

        def on_sigterm(signum: int, frame: object) -> None:
            if agent is not None:
                agent.stop_reason = "agent got SIGTERM (instance shutting down)"

        signal.signal(signal.SIGTERM, on_sigterm)
        return agent.run()
    except BaseException as exc:
        LOG.exception("agent failed")
        if agent is None:
            return shutdown()
        return agent.failed(exc)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
