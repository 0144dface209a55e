"""``Sandbox``: the whole of spotctl on one machine, with no AWS account.

    with Sandbox(root=".sandbox", speed=60.0, trace_paths=[...]) as sandbox:
        requests.post(sandbox.api_url + "/jobs", json=spec,
                      headers={"Authorization": f"Bearer {sandbox.api_token}"})

It composes a ``LocalCloud`` (moto behind the fidelity proxy, the spot market, the event
bus, the sandbox clock), the control plane in this process exactly as deployed (app.py's
Chalice app: its EC2 event handlers registered on the bus by their patterns, its
schedule on the sandbox clock), Chalice's local HTTP server serving the API on a free
loopback port, and the instance emulator running the real user data of each instance,
whose agent reports to that API.

``python -m spotctl.sandbox.sandbox --root DIR --state FILE`` runs one until SIGTERM
(``spotctl sandbox up`` starts it so).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import secrets
import signal
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from chalice.config import Config
from chalice.local import (
    ChaliceRequestHandler,
    LocalChalice,
    LocalDevServer,
    ThreadedHTTPServer,
)

from spotctl.sandbox.clock import Clock, ScaledClock
from spotctl.sandbox.cloud import FAKE_CREDENTIALS, LocalCloud
from spotctl.sandbox.emulator import InstanceEmulator
from spotctl.sandbox.events import EventBus, schedules_from_chalice_app, targets_from_chalice_app
from spotctl.sandbox.market import SpotPool, pools_from_traces

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLE = "spotctl-sandbox-jobs"
BUCKET = "spotctl-sandbox"
DEFAULT_REGION = "us-west-2"
EXAMPLE_TRAINER = REPO_ROOT / "examples" / "train" / "train.py"


class Sandbox:
    """LocalCloud + the control plane + its HTTP API + the instance emulator."""

    def __init__(
        self,
        root: str | Path,
        *,
        clock: Clock | None = None,
        speed: float = 60.0,
        region: str = DEFAULT_REGION,
        pools: Sequence[SpotPool] = (),
        trace_paths: Iterable[str | Path] = (),
        trace_offset_seconds: float = 0.0,
        unlisted_pools_available: bool = False,
        seed: int = 0,
        duplicate_probability: float = 0.0,
        reorder_window: int = 1,
        rebalance_probability: float = 0.5,
        instance_env: Mapping[str, str] | None = None,
        image_programs: Mapping[str, Sequence[str]] | None = None,
        quiet: bool = True,
    ) -> None:
        self.root = Path(root).resolve()
        self.clock: Clock = clock if clock is not None else ScaledClock(speed)
        self.region = region
        all_pools = [
            *pools,
            *pools_from_traces(trace_paths, trace_offset_seconds=trace_offset_seconds),
        ]
        self.bus = EventBus(
            seed=seed, duplicate_probability=duplicate_probability, reorder_window=reorder_window
        )
        self.cloud = LocalCloud(
            clock=self.clock,
            pools=all_pools,
            bus=self.bus,
            region=region,
            seed=seed,
            rebalance_probability=rebalance_probability,
            unlisted_pools_available=unlisted_pools_available,
        )
        programs: dict[str, Sequence[str]] = dict(default_image_programs())
        programs.update(image_programs or {})
        self.emulator = InstanceEmulator(
            self.cloud, self.root, env=instance_env, image_programs=programs
        )
        self.quiet = quiet
        self._server: Any = None
        self._server_thread: threading.Thread | None = None
        self._saved_env: dict[str, str | None] = {}
        self._started = False
        # The user routes' bearer token (the agents use their jobs' own secrets).
        self.api_token = secrets.token_urlsafe(32)

    # -- start / stop ----------------------------------------------------------------------

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        # moto's catalogue of public AMIs takes seconds to load; one registered image does.
        self._set_env({"MOTO_EC2_LOAD_DEFAULT_AMIS": "false", **FAKE_CREDENTIALS})
        self._set_env({"AWS_DEFAULT_REGION": self.region, "AWS_REGION": self.region})
        if self.quiet:  # no EMF metric lines on the terminal (Lambda sends them to CloudWatch)
            self._set_env({"POWERTOOLS_METRICS_DISABLED": "true"})
        self.cloud.start()
        app = load_app()
        self._server = _local_server(app)
        host, port = self._server.server.server_address[:2]
        self._set_env(
            {
                **self.cloud.env(),
                "SPOTCTL_TABLE": TABLE,
                "SPOTCTL_BUCKET": BUCKET,
                "SPOTCTL_SIGNING_KEY": secrets.token_hex(16),
                "SPOTCTL_AUTH": "token",
                "SPOTCTL_API_TOKEN": self.api_token,
                "SPOTCTL_API_URL": f"http://{host}:{port}",
                "SPOTCTL_AMI_ID": self._register_image(),
            }
        )
        self._prepare_storage()
        from chalicelib import runtime  # noqa: PLC0415 - importable once load_app() ran

        runtime.reset()
        plane = runtime.control_plane()
        plane.reconciler.clock = self.clock.now
        plane.service.clock = self.clock.now
        if self.quiet:
            logging.getLogger("spotctl").setLevel(logging.WARNING)  # Powertools' logger
        self.emulator.start()
        for target in targets_from_chalice_app(app):
            self.cloud.add_target(target.pattern, target.handler, target.name)
        for schedule in schedules_from_chalice_app(app):
            self.cloud.add_schedule(schedule)
        self._server_thread = threading.Thread(
            target=self._server.server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="sandbox-api",
            daemon=True,
        )
        self._server_thread.start()

    def stop(self) -> None:
        """Stop everything this sandbox started; safe to call twice."""
        if not self._started:
            return
        self._started = False
        self.emulator.stop()
        if self._server is not None:
            if self._server_thread is not None:
                self._server.server.shutdown()
                self._server_thread.join()
                self._server_thread = None
            self._server.server.server_close()
            self._server = None
        self.cloud.stop()
        self.emulator.stop()  # anything booted while the cloud was stopping
        from chalicelib import runtime  # noqa: PLC0415 - importable once load_app() ran

        runtime.reset()
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env.clear()

    def _set_env(self, values: Mapping[str, str]) -> None:
        for name, value in values.items():
            self._saved_env.setdefault(name, os.environ.get(name))
            os.environ[name] = value

    def _register_image(self) -> str:
        image = self.cloud.client("ec2").register_image(Name="spotctl-sandbox-dlami")
        return str(image["ImageId"])

    def _prepare_storage(self) -> None:
        from chalicelib.store import create_table  # noqa: PLC0415 - see load_app()

        create_table(self.cloud.client("dynamodb"), TABLE)
        s3 = self.cloud.client("s3")
        if self.region == "us-east-1":
            s3.create_bucket(Bucket=BUCKET)
        else:
            s3.create_bucket(
                Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": self.region}
            )

    # -- for users -------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return os.environ["SPOTCTL_API_URL"]

    @property
    def endpoint_url(self) -> str:
        return self.cloud.endpoint_url

    def client(self, service: str) -> Any:
        return self.cloud.client(service)

    def ports(self) -> list[int]:
        """Every loopback port the sandbox listens on (API, proxy, moto)."""
        if self._server is None:
            return []
        return [int(self._server.server.server_address[1]), *self.cloud.ports]


def default_image_programs() -> dict[str, list[str]]:
    """The sandbox AMI's extra programs: the example trainer (examples/train/train.py)."""
    return {"spotctl-example-train": [sys.executable, str(EXAMPLE_TRAINER)]}


def load_app() -> Any:
    """app.py's Chalice app (the repository root must be importable)."""
    if str(REPO_ROOT) not in sys.path and (REPO_ROOT / "app.py").exists():
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("app").app


def _local_server(app: Any) -> Any:
    """Chalice's local dev server for ``app`` on a free loopback port (not yet serving)."""

    class QuietHandler(ChaliceRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("api: " + format, *args)

    class QuietServer(ThreadedHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            # An agent killed with its instance drops its connection; that is no error.
            logger.debug("api: request from %s ended early", client_address, exc_info=True)

    if not isinstance(app, LocalChalice):
        # What chalice.local.create_local_server does: per-thread current_request.
        class SandboxChalice(LocalChalice, app.__class__):  # type: ignore[misc]
            pass

        app.__class__ = SandboxChalice
    config = Config.create(chalice_stage="dev", app_name="spotctl")
    return LocalDevServer(
        app, config, "127.0.0.1", 0, handler_cls=QuietHandler, server_cls=QuietServer
    )


# -- run one until told to stop (``spotctl sandbox up``) -------------------------------------


def serve(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a spotctl sandbox until SIGTERM.")
    parser.add_argument("--root", required=True, help="directory for volumes and instances")
    parser.add_argument("--state", required=True, help="JSON file written once serving")
    parser.add_argument("--speed", type=float, default=60.0, help="sandbox seconds per second")
    parser.add_argument("--trace", action="append", default=[], help="availability trace")
    parser.add_argument("--trace-offset-hours", type=float, default=0.0)
    parser.add_argument("--region", default=DEFAULT_REGION)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    traces = args.trace or [str(path) for path in default_traces()]
    sandbox = Sandbox(
        args.root,
        speed=args.speed,
        region=args.region,
        trace_paths=traces,
        trace_offset_seconds=args.trace_offset_hours * 3600,
        unlisted_pools_available=True,
    )
    state = Path(args.state)
    try:
        sandbox.start()
        document = {
            "api_url": sandbox.api_url,
            "api_token": sandbox.api_token,
            "endpoint_url": sandbox.endpoint_url,
            "pid": os.getpid(),
            "root": str(sandbox.root),
            "region": sandbox.region,
            "speed": args.speed,
            "ports": sandbox.ports(),
        }
        tmp = state.with_name(state.name + ".tmp")
        tmp.unlink(missing_ok=True)
        # It holds the API token: readable by its owner only, from the first byte.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(json.dumps(document, indent=2))
        tmp.replace(state)
        logger.info("sandbox serving on %s", sandbox.api_url)
        stop.wait()
    finally:
        sandbox.stop()
        with contextlib.suppress(FileNotFoundError):
            state.unlink()
    return 0


def default_traces() -> list[Path]:
    """The us-west-2 V100 traces of the project (one pool per zone)."""
    directory = REPO_ROOT / "traces" / "aws-10-26-2022"
    return sorted(directory.glob("us-west-2*_v100_1.json"))


if __name__ == "__main__":
    sys.exit(serve())
