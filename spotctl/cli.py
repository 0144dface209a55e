"""``spotctl``: submit and watch jobs through any spotctl API, and run the local sandbox.

    spotctl sandbox up               # a local AWS + control plane in the background
    spotctl submit examples/demo-job.yaml
    spotctl jobs --state RUNNING
    spotctl status j-0123abcd        # attempts, interruptions, cost and saving
    spotctl logs j-0123abcd          # the job's events (and, in the sandbox, agent logs)
    spotctl wait j-0123abcd          # follow its events until it ends; exit 0 if it succeeded
    spotctl cancel j-0123abcd --delete-volume
    spotctl sandbox down

The API is ``--api-url``, else ``$SPOTCTL_API_URL``, else the sandbox started from this
directory (``.sandbox/state.json``). Requests carry ``$SPOTCTL_API_TOKEN`` as a bearer
token, else the sandbox's token when the API is that sandbox's, else (a deployed stage,
``*.execute-api.*.amazonaws.com``) an AWS SigV4 signature made with the caller's AWS
credentials.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SANDBOX_DIR = Path(".sandbox")
STATE_FILE = SANDBOX_DIR / "state.json"
UP_TIMEOUT_SECONDS = 90.0
PAGE = 100  # jobs per GET /jobs, the API's largest page
SUBMIT_TRIES = 5  # 1 + 2 + 4 + 8 s of pauses between them
DOWN_TIMEOUT_SECONDS = 60.0


class CliError(Exception):
    """A problem to tell the user in one line (exit code 1)."""


class ApiUnavailable(CliError):
    """The API could not be reached or answered 429/5xx: worth asking again later."""


# What ``spotctl wait`` (and ``submit --wait``, ``logs --follow``) exits with, by the
# state the job ended in; 1 stays "spotctl itself could not do it".
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 3, "CANCELLED": 4}
EXIT_TIMEOUT = 5  # --timeout passed with the job still live
# While following a job, how long the API may stay unreachable before spotctl gives up,
# and the longest pause between tries (a laptop asleep, a network blip, a throttled API).
FOLLOW_OUTAGE_SECONDS = 1800.0
FOLLOW_BACKOFF_MAX_SECONDS = 60.0
WAIT_CLOCK: Any = time  # its monotonic() and sleep(); the tests' fake replaces it


# -- the API -------------------------------------------------------------------------------


def sandbox_state(directory: Path = SANDBOX_DIR) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((directory / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state


def api_url(args: argparse.Namespace) -> str:
    url = args.api_url or os.environ.get("SPOTCTL_API_URL")
    if not url:
        state = sandbox_state()
        url = state["api_url"] if state else None
    if not url:
        raise CliError(
            "no API: pass --api-url, set SPOTCTL_API_URL, or run `spotctl sandbox up` here"
        )
    return str(url).rstrip("/")


def api_token(url: str) -> str | None:
    """The bearer token for ``url``: $SPOTCTL_API_TOKEN, else the local sandbox's."""
    token = os.environ.get("SPOTCTL_API_TOKEN")
    if token:
        return token
    state = sandbox_state()
    if state is not None and str(state["api_url"]).rstrip("/") == url:
        return state.get("api_token") or None
    return None


def _sigv4_headers(
    url: str, method: str, data: bytes | None, headers: dict[str, str]
) -> dict[str, str]:
    """Sign for API Gateway's IAM authorization with the caller's AWS credentials."""
    try:
        import botocore.session  # noqa: PLC0415 - only deployed stages need it
        from botocore.auth import SigV4Auth  # noqa: PLC0415
        from botocore.awsrequest import AWSRequest  # noqa: PLC0415
    except ImportError:
        raise CliError("signing for a deployed stage needs botocore (pip install boto3)") from None
    credentials = botocore.session.get_session().get_credentials()
    if credentials is None:
        raise CliError("no AWS credentials to sign the request with (SigV4)")
    region = (urllib.parse.urlsplit(url).hostname or "").split(".")[2]
    request = AWSRequest(method=method, url=url, data=data, headers=headers)
    SigV4Auth(credentials.get_frozen_credentials(), "execute-api", region).add_auth(request)
    return dict(request.headers.items())


def _is_api_gateway(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    return ".execute-api." in host and host.endswith(".amazonaws.com")


def call(base: str, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    """One API call; the decoded JSON answer, or CliError with the API's message.

    ``token`` defaults to :func:`api_token` for ``base``."""
    url = base + path
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise CliError(f"not a URL: {base}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(f"not an http(s) URL: {url}")
    try:
        data = json.dumps(body).encode() if body is not None else None
    except (TypeError, ValueError) as exc:
        raise CliError(f"cannot send this as JSON: {exc}") from None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    token = token if token is not None else api_token(base)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif _is_api_gateway(url):
        headers = _sigv4_headers(url, method, data, headers)
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            text = response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            answer = json.loads(text)
            message, code = answer.get("Message", text), answer.get("Code")
        except (json.JSONDecodeError, AttributeError):
            message, code = text, None
        # A deployment that lacks a setting stays so: asking again would only wait.
        transient = exc.code == 429 or (exc.code >= 500 and code != "NotConfiguredError")
        kind = ApiUnavailable if transient else CliError
        raise kind(f"{method} {path}: HTTP {exc.code}: {message}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise ApiUnavailable(f"cannot reach the spotctl API at {base}: {exc!r}") from None
    try:
        return json.loads(text or "null")
    except ValueError:
        raise CliError(
            f"{method} {path}: the answer is not JSON (is {base} a spotctl API?): {text[:80]!r}"
        ) from None


# -- rendering -------------------------------------------------------------------------------


def _time(iso: str | None) -> str:
    if not iso:
        return "-"
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).strftime("%m-%d %H:%M:%S")


def _minutes(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    a = datetime.fromisoformat(start.replace("Z", "+00:00"))
    b = datetime.fromisoformat(end.replace("Z", "+00:00"))
    return (b - a).total_seconds() / 60.0


def interruptions(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Each interrupted attempt, with how long the job had no running instance after it."""
    attempts = [a for a in job["attempts"] if a["instance_id"]]
    found = []
    for index, attempt in enumerate(attempts):
        if attempt["end_reason"] not in ("interrupted", "reclaimed"):
            continue
        following = attempts[index + 1] if index + 1 < len(attempts) else None
        lost_at = attempt["ended_at"]
        back_at = following["running_at"] if following else None
        found.append(
            {
                "attempt": attempt["number"],
                "instance_id": attempt["instance_id"],
                "warned_at": attempt["warned_at"],
                "ended_at": lost_at,
                "resumed_at": back_at,
                "down_minutes": _minutes(lost_at, back_at),
                "reason": attempt["end_reason"],
            }
        )
    return found


def render_status(job: dict[str, Any]) -> str:
    lines = [
        f"job {job['job_id']} ({job['name']}): {job['state']}",
        f"  cost ${job['cost_usd']:.4f}, on-demand for the same hours "
        f"${job['on_demand_cost_usd']:.4f}, saved ${job['saved_usd']:.4f}",
    ]
    if job.get("failure"):
        lines.append(f"  failure: {job['failure']}")
    allowed = job.get("spec", {}).get("max_restarts_on_errors", 0)
    if allowed:
        lines.append(f"  restarts on errors: {job.get('error_restarts', 0)} of {allowed}")
    listed = job.get("spec", {}).get("recover_on_exit_codes")
    if listed:
        codes = ", ".join(map(str, listed))
        lines.append(f"  restarts on exit codes {codes}: {job.get('exit_code_restarts', 0)}")
    if job.get("volume"):
        lines.append(f"  volume {job['volume']['volume_id']} in {job['volume']['az']}")
    lines.append("attempts:")
    for a in job["attempts"]:
        lines.append(
            f"  #{a['number']:<3} {a['instance_id'] or '-':<21} {a['pool'] or '-':<24} "
            f"{a['market'] or '-':<9} ${a['price'] or 0:.4f}/h  running {_time(a['running_at'])}"
            f"  ended {_time(a['ended_at'])} {a['end_reason'] or ''}  ${a['cost_usd']:.4f}"
        )
    found = interruptions(job)
    lines.append(f"interruptions: {len(found)}")
    for item in found:
        down = item["down_minutes"]
        lines.append(
            f"  attempt {item['attempt']} ({item['instance_id']}) {item['reason']} at "
            f"{_time(item['ended_at'])}; "
            + (f"down {down:.1f} min" if down is not None else "not resumed yet")
        )
    return "\n".join(lines)


def render_event(event: dict[str, Any]) -> str:
    attempt = f"#{event['attempt']} " if event["attempt"] is not None else ""
    return f"{_time(event['at'])}  {event['kind']:<24} {attempt}{event['detail']}"


def render_events(job: dict[str, Any]) -> str:
    return "\n".join(render_event(e) for e in job["events"])


def follow(
    base: str, job_id: str, interval: float, timeout: float | None
) -> tuple[dict[str, Any] | None, int]:
    """Print the job's events as they come until it ends: its last view and the exit
    code for the state it ended in (``EXIT_TIMEOUT`` if ``timeout`` seconds pass first).

    The API may be unreachable for a while (it is retried with backoff, up to
    ``FOLLOW_OUTAGE_SECONDS``); any other API error ends the wait with that error."""
    path = f"/jobs/{urllib.parse.quote(job_id)}"
    clock, sleep = WAIT_CLOCK.monotonic, WAIT_CLOCK.sleep
    started = clock()
    printed: set[tuple[Any, ...]] = set()  # the timeline keeps its newest events only
    job: dict[str, Any] | None = None
    failing_since: float | None = None
    pause = interval
    while True:
        try:
            job = call(base, "GET", path)
        except ApiUnavailable as exc:
            failing_since = clock() if failing_since is None else failing_since
            if clock() - failing_since > FOLLOW_OUTAGE_SECONDS:
                raise CliError(f"gave up after {FOLLOW_OUTAGE_SECONDS:.0f} s: {exc}") from None
            print(f"spotctl: {exc}; trying again", file=sys.stderr)
            pause = min(pause * 2, FOLLOW_BACKOFF_MAX_SECONDS)
        else:
            failing_since, pause = None, interval
            for event in job["events"]:
                key = (event["at"], event["kind"], event["attempt"], event["detail"])
                if key not in printed:
                    printed.add(key)
                    print(render_event(event), flush=True)
            if job["state"] in EXIT_CODES:
                return job, EXIT_CODES[job["state"]]
        left = None if timeout is None else timeout - (clock() - started)
        if left is not None and left <= 0:
            state = job["state"] if job else "unknown"
            print(f"spotctl: still {state} after {timeout:g} s", file=sys.stderr)
            return job, EXIT_TIMEOUT
        sleep(pause if left is None else min(pause, left))


# -- commands --------------------------------------------------------------------------------


class _SpecLoader(yaml.SafeLoader):
    """YAML as the API reads JSON: a timestamp stays the string it was written as
    (``deadline: 2026-12-01T00:00:00Z`` is what the API asks for, not a datetime)."""


_SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_spec(path: Path) -> Any:
    """The job spec in ``path`` (YAML or JSON), or a CliError naming what is wrong."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{path}: cannot read it: {exc}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader
        return json.loads(text)
    except (yaml.YAMLError, ValueError) as exc:
        raise CliError(f"{path}: not valid {path.suffix[1:] or 'json'}: {_one_line(exc)}") from None


def _one_line(exc: Exception) -> str:
    """A parser's complaint without the multi-line excerpt PyYAML adds."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    return " ".join(str(exc).split())


def submit(base: str, spec: Any) -> dict[str, Any]:
    """POST the spec, sent again (with the same client token, so it makes one job)
    while the API cannot be reached or answers 429/5xx, up to SUBMIT_TRIES times."""
    if isinstance(spec, dict) and "client_token" not in spec:
        spec = {**spec, "client_token": secrets.token_hex(16)}
    pause = 1.0
    for _ in range(SUBMIT_TRIES - 1):
        try:
            job: dict[str, Any] = call(base, "POST", "/jobs", spec)
        except ApiUnavailable as exc:
            print(f"spotctl: {exc}; sending it again", file=sys.stderr)
            WAIT_CLOCK.sleep(pause)
            pause *= 2
        else:
            return job
    last: dict[str, Any] = call(base, "POST", "/jobs", spec)
    return last


def cmd_submit(args: argparse.Namespace) -> int:
    base = api_url(args)
    job = submit(base, load_spec(Path(args.spec)))
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        print(f"{job['job_id']} {job['state']}", flush=True)
    if not args.wait:
        return 0
    return _follow_to_the_end(base, job["job_id"], args)


def _follow_to_the_end(base: str, job_id: str, args: argparse.Namespace) -> int:
    job, code = follow(base, job_id, args.interval, args.timeout)
    if job is not None and code != EXIT_TIMEOUT:
        ended = f"{job_id} {job['state']}"
        print(ended + (f": {job['failure']}" if job.get("failure") else ""))
    return code


def cmd_wait(args: argparse.Namespace) -> int:
    return _follow_to_the_end(api_url(args), args.job_id, args)


def list_jobs(base: str, state: str | None, limit: int | None) -> list[dict[str, Any]]:
    """Newest first, every page of them (or the first ``limit``)."""
    jobs: list[dict[str, Any]] = []
    token: str | None = None
    while limit is None or len(jobs) < limit:
        query = {"limit": str(min(PAGE, limit - len(jobs)) if limit else PAGE)}
        if state:
            query["state"] = state
        if token:
            query["next_token"] = token
        answer = call(base, "GET", "/jobs?" + urllib.parse.urlencode(query))
        jobs += answer["jobs"]
        token = answer.get("next_token")
        if not token:
            break
    return jobs


def cmd_jobs(args: argparse.Namespace) -> int:
    jobs = list_jobs(api_url(args), args.state, args.limit)
    if args.json:
        print(json.dumps({"jobs": jobs}, indent=2))  # GET /jobs's shape, every page
        return 0
    print(f"{'JOB':<20} {'NAME':<20} {'STATE':<13} {'ATTEMPTS':>8} {'COST':>10}  CREATED")
    for job in jobs:
        print(
            f"{job['job_id']:<20} {job['name']:<20} {job['state']:<13} {job['attempts']:>8} "
            f"${job['cost_usd']:>9.4f}  {_time(job['created_at'])}"
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    job = call(api_url(args), "GET", f"/jobs/{urllib.parse.quote(args.job_id)}")
    print(json.dumps(job, indent=2) if args.json else render_status(job))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    query = "?delete_volume=true" if args.delete_volume else ""
    job = call(api_url(args), "DELETE", f"/jobs/{urllib.parse.quote(args.job_id)}{query}")
    print(f"{job['job_id']} {job['state']}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    code = 0
    if args.follow:
        found, code = follow(api_url(args), args.job_id, args.interval, args.timeout)
        if found is None:
            return code
        job = found
    else:
        job = call(api_url(args), "GET", f"/jobs/{urllib.parse.quote(args.job_id)}")
        print(render_events(job))
    state = sandbox_state()
    if (
        state is None
        or args.api_url
        or os.environ.get("SPOTCTL_API_URL")
        not in (
            None,
            state["api_url"],
        )
    ):
        return code
    root = Path(state["root"]) / "instances"
    for attempt in job["attempts"]:
        if not attempt["instance_id"]:
            continue
        for name in ("agent.log", "workload.log"):
            path = root / attempt["instance_id"] / "log" / name
            if path.exists():
                print(f"\n== attempt {attempt['number']} {attempt['instance_id']} {name} ==")
                print(path.read_text().rstrip())
    return code


# -- the sandbox in the background -------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_sandbox_up(args: argparse.Namespace) -> int:
    state = sandbox_state()
    if state is not None and _alive(int(state["pid"])):
        print(f"sandbox already running: {state['api_url']} (pid {state['pid']})")
        return 0
    SANDBOX_DIR.mkdir(exist_ok=True)
    STATE_FILE.unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        "spotctl.sandbox.sandbox",
        "--root",
        str(SANDBOX_DIR.resolve()),
        "--state",
        str(STATE_FILE.resolve()),
        "--speed",
        str(args.speed),
        "--trace-offset-hours",
        str(args.trace_offset_hours),
    ]
    for trace in args.trace:
        argv += ["--trace", str(Path(trace).resolve())]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("SPOTCTL_API_URL", None)  # the sandbox sets its own
    with (SANDBOX_DIR / "sandbox.log").open("ab") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # outlives this command and its terminal
        )
    deadline = time.monotonic() + UP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        state = sandbox_state()
        if state is not None:
            print(f"sandbox up: API {state['api_url']} (pid {state['pid']})")
            print(f"  AWS endpoint {state['endpoint_url']}, clock x{state['speed']:g}")
            return 0
        if process.poll() is not None:
            raise CliError(f"the sandbox exited ({process.returncode}); see .sandbox/sandbox.log")
        time.sleep(0.2)
    process.terminate()
    raise CliError("the sandbox did not come up in time; see .sandbox/sandbox.log")


def cmd_sandbox_down(args: argparse.Namespace) -> int:
    state = sandbox_state()
    if state is None:
        print("no sandbox running here")
        if SANDBOX_DIR.exists() and not args.keep:
            shutil.rmtree(SANDBOX_DIR)
        return 0
    pid = int(state["pid"])
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DOWN_TIMEOUT_SECONDS
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            raise CliError(f"the sandbox (pid {pid}) did not stop in time; killed it")
    if not args.keep:
        shutil.rmtree(SANDBOX_DIR, ignore_errors=True)
    print("sandbox down")
    return 0


def cmd_sandbox_status(args: argparse.Namespace) -> int:
    state = sandbox_state()
    if state is None or not _alive(int(state["pid"])):
        print("no sandbox running here")
        return 1
    print(json.dumps(state, indent=2))
    return 0


# -- wiring ----------------------------------------------------------------------------------


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text}")
    return value


def _waiting_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--interval", type=_positive, default=10.0, help="seconds between polls (default 10)"
    )
    parser.add_argument(
        "--timeout", type=_positive, help="stop waiting after this many seconds (exit 5)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spotctl",
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--api-url", help="spotctl API base URL [$SPOTCTL_API_URL, sandbox]")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", help="submit a job spec (YAML or JSON)")
    p.add_argument("spec")
    p.add_argument("--json", action="store_true", help="print the whole job")
    p.add_argument(
        "--wait", action="store_true", help="then follow its events until it ends (as `wait`)"
    )
    _waiting_options(p)
    p.set_defaults(func=cmd_submit, reads_api=True)

    p = sub.add_parser(
        "wait",
        help="follow a job's events until it ends",
        description="Print a job's events as they come until it ends. Exit code: 0 "
        "SUCCEEDED, 3 FAILED, 4 CANCELLED, 5 --timeout passed first, 1 spotctl could "
        "not ask (the API is retried for 30 min when unreachable).",
    )
    p.add_argument("job_id")
    _waiting_options(p)
    p.set_defaults(func=cmd_wait, reads_api=True)

    p = sub.add_parser("jobs", help="list jobs")
    p.add_argument("--state", help="only jobs in this state (RUNNING, SUCCEEDED, ...)")
    p.add_argument("--limit", type=_count, help="only the newest N (default: all)")
    p.add_argument("--json", action="store_true", help="print them as a JSON list")
    p.set_defaults(func=cmd_jobs, reads_api=True)

    p = sub.add_parser("status", help="a job's attempts, interruptions, cost and saving")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status, reads_api=True)

    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job_id")
    p.add_argument(
        "--delete-volume", action="store_true", help="delete its volume (if synced to S3)"
    )
    p.set_defaults(func=cmd_cancel, reads_api=True)

    p = sub.add_parser("logs", help="a job's events; in the sandbox also its agent logs")
    p.add_argument("job_id")
    p.add_argument(
        "-f", "--follow", action="store_true", help="print events until the job ends (as `wait`)"
    )
    _waiting_options(p)
    p.set_defaults(func=cmd_logs, reads_api=True)

    p = sub.add_parser("sandbox", help="the local sandbox (no AWS account needed)")
    sandbox = p.add_subparsers(dest="sandbox_command", required=True)
    up = sandbox.add_parser("up", help="start it in the background (state in .sandbox/)")
    up.add_argument("--speed", type=float, default=60.0, help="sandbox seconds per real second")
    up.add_argument("--trace", action="append", default=[], help="availability trace file")
    up.add_argument("--trace-offset-hours", type=float, default=0.0)
    up.set_defaults(func=cmd_sandbox_up)
    down = sandbox.add_parser("down", help="stop it and remove .sandbox/")
    down.add_argument("--keep", action="store_true", help="keep .sandbox/ (volumes, logs)")
    down.set_defaults(func=cmd_sandbox_down)
    status = sandbox.add_parser("status", help="show the running sandbox")
    status.set_defaults(func=cmd_sandbox_status)

    if str(REPO_ROOT) not in sys.path and (REPO_ROOT / "chalicelib").is_dir():
        sys.path.append(str(REPO_ROOT))  # simulate runs the Lambda's own policy code
    try:
        from spotctl import bootstrap, simulate  # noqa: PLC0415 - they need chalicelib
    except ImportError:
        pass
    else:
        simulate.register(sub)
        bootstrap.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except CliError as exc:
        print(f"spotctl: {exc}", file=sys.stderr)
        return 1
    except (KeyError, TypeError, AttributeError) as exc:
        if not getattr(args, "reads_api", False):
            raise
        # An answer of the wrong shape: another service at the URL, or another version.
        print(f"spotctl: the API's answer is not what spotctl expects: {exc!r}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
