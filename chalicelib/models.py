"""The job, its attempts and its timeline: what spotctl stores and reasons about.

Times are epoch seconds (floats) everywhere inside the control plane; the API renders
them as ISO 8601. A job record is one DynamoDB item; every change to it goes through
a conditional write on ``version``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from chalicelib.pricing import ON_DEMAND_USD_PER_HOUR

MAX_TIMELINE_EVENTS = 300
# A JSON number, as the API's schema says: not "3", not true (pydantic would convert them).
StrictNumber = Annotated[float, Strict()]


class JobState(StrEnum):
    SUBMITTED = "SUBMITTED"  # accepted and stored; nothing launched yet
    PROVISIONING = "PROVISIONING"  # first instance requested; waiting for it and its volume
    RUNNING = "RUNNING"  # an instance runs with the job's volume attached
    # The instance got a notice or vanished, or spotctl is ending its on-demand instance
    # to go back to spot; no replacement yet.
    INTERRUPTED = "INTERRUPTED"
    RECOVERING = "RECOVERING"  # replacement requested; waiting to move the volume onto it
    WAITING = "WAITING"  # no pool fits the price or has capacity now; retried later
    CANCELLING = "CANCELLING"  # cancel requested; waiting for instances to go away
    SUCCEEDED = "SUCCEEDED"  # the workload exited 0
    FAILED = "FAILED"  # the workload exited non-zero, or the job could not run at all
    CANCELLED = "CANCELLED"  # cancelled by the user; no instance left

    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
LIVE_STATES = tuple(state for state in JobState if not state.is_terminal())

Market = Literal["spot", "on-demand"]

# End reasons of an attempt.
ENDED_INTERRUPTED = "interrupted"  # AWS warned, then took the instance back
ENDED_RECLAIMED = "reclaimed"  # the instance vanished without a warning reaching us
# The instance shut itself down (its OS did: EC2's Client.InstanceInitiatedShutdown),
# and no report of why reached us: not capacity taken back.
ENDED_SHUT_DOWN = "shut-down"
ENDED_STOPPED = "stopped"  # the instance stopped; we terminated it to free the volume
ENDED_COMPLETED = "completed"  # the workload exited (any code)
ENDED_FAILED = "failed"  # the workload exited non-zero; the job starts it again
ENDED_CANCELLED = "cancelled"  # the user cancelled the job
ENDED_LAUNCH_FAILED = "launch-failed"  # no candidate pool would start an instance
# We ended an on-demand instance to go back to spot (ahead of schedule): neither an
# interruption nor a failure.
ENDED_LEFT_ON_DEMAND = "left-on-demand"

# Formats, as AWS defines them; matched with ``fullmatch`` (``$`` would let a
# trailing newline through).
_INSTANCE_TYPE = re.compile(
    r"[a-z][a-z0-9]*(-[a-z0-9]+)*\."
    r"(nano|micro|small|medium|large|[1-9][0-9]{0,2}xlarge|xlarge|metal(-[1-9][0-9]{0,2}xl)?)"
)
_AZ = re.compile(r"[a-z]{2}(-gov)?-[a-z]+-\d[a-z]")
_VOLUME_ID = re.compile(r"vol-[0-9a-f]{8}([0-9a-f]{9})?")
_SNAPSHOT_ID = re.compile(r"snap-[0-9a-f]{8}([0-9a-f]{9})?")
_S3_URI = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/(?P<key>.*))?", re.S)
_IP_ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+")
# Bucket names AWS reserves for access points, directory buckets and the like.
_RESERVED_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_BUCKET_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_IMAGE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._/:@-]{0,254}")
# An ISO 8601 date and time (extended format, seconds optional, time zone checked after
# parsing): pydantic alone would also take Unix time ("2000000000") or a '_' separator.
_DATE_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}(:[0-9]{2}([.,][0-9]+)?)?"
    r"([Zz]|[+-][0-9]{2}:?[0-9]{2})?"
)
JOB_ID = re.compile(r"j-[0-9a-f]{16}")

MAX_COMMAND_BYTES = 4096
MAX_INSTANCE_TYPES = 20
MAX_INSTANCE_TYPE_CHARS = 32
MAX_S3_KEY_BYTES = 1024  # S3's own limit on a key
MAX_EXIT_CODES = 32  # recover_on_exit_codes listed
MAX_ENV_VARS = 64
MAX_ENV_VALUE_BYTES = 4096  # each; the user data's 16 KB bounds them all together
ENV_RESERVED_PREFIX = "SPOTCTL_"  # the agent's own variables
MAX_EXIT_CODE_RESTARTS = 100  # restarts on listed exit codes, per job


def is_job_id(value: str) -> bool:
    return JOB_ID.fullmatch(value) is not None


class CheckpointSettings(BaseModel):
    """How the agent warns the workload and saves its checkpoints."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    directory: str = Field(default="checkpoints", max_length=200, pattern=r"^[A-Za-z0-9._/-]+$")
    stop_signal: Literal["TERM", "INT", "USR1", "USR2"] = "TERM"
    grace_seconds: StrictInt = Field(default=90, ge=5, le=110)  # the notice is 120 s
    sync_interval_seconds: StrictInt = Field(default=1800, ge=60, le=86400)

    @field_validator("directory")
    @classmethod
    def _relative(cls, value: str) -> str:
        if value.startswith("/") or ".." in value.split("/"):
            raise ValueError("must be a path inside the volume (relative, no '..')")
        parts = PurePosixPath(value).parts
        if not parts:
            raise ValueError("must name a directory inside the volume, not its root")
        if parts[0] == ".spotctl":
            raise ValueError("'.spotctl' on the volume is spotctl's own")
        return value


class JobSpec(BaseModel):
    """What a user submits: ``POST /jobs``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    command: tuple[Annotated[str, Field(max_length=MAX_COMMAND_BYTES)], ...] = Field(
        min_length=1, max_length=256
    )
    image: str | None = Field(default=None, max_length=255)
    instance_types: tuple[Annotated[str, Field(max_length=MAX_INSTANCE_TYPE_CHARS)], ...] = Field(
        min_length=1, max_length=MAX_INSTANCE_TYPES
    )
    availability_zones: tuple[Annotated[str, Field(max_length=32)], ...] | None = Field(
        default=None, min_length=1, max_length=30
    )
    volume_gib: StrictInt | None = Field(default=None, ge=1, le=16384)
    volume_id: str | None = Field(default=None, max_length=21)
    snapshot_id: str | None = Field(default=None, max_length=22)
    results_s3_uri: str | None = Field(default=None, max_length=5 + 63 + 1 + MAX_S3_KEY_BYTES)
    deadline: datetime | None = None
    expected_hours: StrictNumber | None = Field(default=None, gt=0, le=24 * 90)
    max_price_per_hour: StrictNumber | None = Field(default=None, gt=0, le=1000)
    # A workload that exits non-zero is started again (on a new instance, from its
    # volume and so its last checkpoint) this many times before the job fails.
    max_restarts_on_errors: StrictInt = Field(default=0, ge=0, le=10)
    # Exit codes the workload uses to ask to be started again (a transient fault it
    # recognised: an NCCL timeout, a lost GPU): these restart it whatever
    # max_restarts_on_errors says and do not use up its restarts, up to
    # MAX_EXIT_CODE_RESTARTS in all (each is a new instance: a brake on a code that
    # comes back every time).
    recover_on_exit_codes: tuple[StrictInt, ...] = Field(default=(), max_length=MAX_EXIT_CODES)
    # Environment variables for the workload (in its container too); stored with the
    # job and shipped in the instance's user data: no secrets (see the README).
    env: dict[str, StrictStr] = Field(default_factory=dict, max_length=MAX_ENV_VARS)
    checkpoint: CheckpointSettings = CheckpointSettings()
    # Makes submitting idempotent: a submission sent again with the same token (after a
    # timeout, say) answers with the job the first one made. The CLI sends one for you.
    client_token: str | None = Field(
        default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$"
    )

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"{name[:64]!r} is not a variable name (like 'NCCL_DEBUG')")
            if name.upper().startswith(ENV_RESERVED_PREFIX):
                raise ValueError(f"{name}: names starting {ENV_RESERVED_PREFIX} are spotctl's")
            if "\x00" in text:
                raise ValueError(f"{name}: the value has a NUL character")
            if "\n" in text or "\r" in text:
                raise ValueError(f"{name}: the value spans lines (docker's env files cannot)")
            if len(text.encode("utf-8", "surrogatepass")) > MAX_ENV_VALUE_BYTES:
                raise ValueError(f"{name}: the value is over {MAX_ENV_VALUE_BYTES} bytes")
        return value

    @field_validator("command")
    @classmethod
    def _command(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if sum(len(arg.encode()) + 1 for arg in value) > MAX_COMMAND_BYTES:
            raise ValueError(f"longer than {MAX_COMMAND_BYTES} bytes in all")
        if any("\x00" in arg for arg in value):
            raise ValueError("contains a NUL byte")
        if not value[0]:
            raise ValueError("the program (first element) is empty")
        return value

    @field_validator("recover_on_exit_codes", mode="before")
    @classmethod
    def _one_exit_code(cls, value: object) -> object:
        return [value] if type(value) is int else value  # one code, as SkyPilot allows

    @field_validator("recover_on_exit_codes")
    @classmethod
    def _exit_codes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        for code in value:
            if code == 0:
                raise ValueError("0 is success: a workload that exits 0 is done")
            if not 1 <= code <= 255:
                raise ValueError(f"{code} is not an exit code (1-255)")
        if len(set(value)) != len(value):
            raise ValueError("lists a code twice")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str | None) -> str | None:
        if value is not None and not _IMAGE.fullmatch(value):
            raise ValueError("not a container image reference")
        return value

    @field_validator("instance_types")
    @classmethod
    def _instance_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if not _INSTANCE_TYPE.fullmatch(item):
                raise ValueError(f"{item!r} is not an EC2 instance type (like 'p3.2xlarge')")
        if len(set(value)) != len(value):
            raise ValueError("lists a type twice")
        return value

    @field_validator("availability_zones")
    @classmethod
    def _zones(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for item in value or ():
            if not _AZ.fullmatch(item):
                raise ValueError(f"{item!r} is not an Availability Zone (like 'us-east-1a')")
        return value

    @field_validator("volume_id")
    @classmethod
    def _volume_id(cls, value: str | None) -> str | None:
        if value is not None and not _VOLUME_ID.fullmatch(value):
            raise ValueError("not an EBS volume id (like 'vol-0123456789abcdef0')")
        return value

    @field_validator("snapshot_id")
    @classmethod
    def _snapshot_id(cls, value: str | None) -> str | None:
        if value is not None and not _SNAPSHOT_ID.fullmatch(value):
            raise ValueError("not an EBS snapshot id (like 'snap-0123456789abcdef0')")
        return value

    @field_validator("results_s3_uri")
    @classmethod
    def _s3_uri(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = _S3_URI.fullmatch(value)
        if not match or not _valid_bucket(match["bucket"]):
            raise ValueError("not an S3 URI (like 's3://my-bucket/runs/resnet')")
        key = match["key"] or ""
        if len(key.encode()) > MAX_S3_KEY_BYTES or _CONTROL.search(key):
            raise ValueError(f"the key is over {MAX_S3_KEY_BYTES} bytes or has control characters")
        if ".." in key.split("/"):
            raise ValueError("the key has a '..' segment")
        return value.rstrip("/")

    @field_validator("deadline", mode="before")
    @classmethod
    def _time_string(cls, value: object) -> object:
        if value is not None and not isinstance(value, str | datetime):
            raise ValueError("must be a time like '2026-12-01T00:00:00Z' (a string)")
        if isinstance(value, str) and not _DATE_TIME.fullmatch(value):
            raise ValueError("must be an ISO 8601 date and time like '2026-12-01T00:00:00Z'")
        return value

    @field_validator("deadline")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("needs a time zone (like '2026-12-01T00:00:00Z')")
        return value

    @model_validator(mode="after")
    def _one_volume_source(self) -> JobSpec:
        given = [f for f in ("volume_gib", "volume_id") if getattr(self, f) is not None]
        if self.snapshot_id is None and len(given) != 1:
            raise ValueError("give exactly one of volume_gib, volume_id or snapshot_id")
        if self.snapshot_id is not None and self.volume_id is not None:
            raise ValueError("give either volume_id or snapshot_id, not both")
        unknown = [t for t in self.instance_types if t not in ON_DEMAND_USD_PER_HOUR]
        if unknown and self.max_price_per_hour is None:
            raise ValueError(
                f"instance_types: no on-demand price known for {', '.join(unknown)}; "
                "set max_price_per_hour"
            )
        return self


def _valid_bucket(bucket: str) -> bool:
    """S3's bucket naming rules (general purpose buckets)."""
    return not (
        ".." in bucket
        or _IP_ADDRESS.fullmatch(bucket)
        or bucket.startswith(_RESERVED_BUCKET_PREFIXES)
        or bucket.endswith(_RESERVED_BUCKET_SUFFIXES)
    )


class Pool(BaseModel):
    """Where an instance runs: an instance type in an Availability Zone."""

    model_config = ConfigDict(frozen=True)

    instance_type: str
    az: str

    def __str__(self) -> str:
        return f"{self.instance_type}@{self.az}"


class Candidate(BaseModel):
    """One pool to try for an attempt, with the ClientToken that makes it idempotent."""

    model_config = ConfigDict(frozen=True)

    pool: Pool
    market: Market
    max_price: float | None  # None for on-demand
    expected_price: float  # $/h we expect to pay: spot price now, or on-demand
    client_token: str


class Attempt(BaseModel):
    """One instance (or one try at launching one) working on the job."""

    model_config = ConfigDict(frozen=True)

    number: int
    reason: str  # why this pool and market were chosen
    candidates: tuple[Candidate, ...]  # in the order they are tried
    requested_at: float
    instance_id: str | None = None
    pool: Pool | None = None
    market: Market | None = None
    max_price: float | None = None
    price: float | None = None  # $/h this attempt is billed at (spot price at launch)
    on_demand_price: float | None = None
    running_at: float | None = None
    warned_at: float | None = None  # interruption notice received
    left_at: float | None = None  # we chose to end it: leaving on-demand for spot
    leave_asked_at: float | None = None  # the instance was tagged to drain and go
    ended_at: float | None = None
    end_reason: str | None = None

    @property
    def ended(self) -> bool:
        return self.end_reason is not None

    def billed_hours(self, now: float) -> float:
        if self.instance_id is None:
            return 0.0
        start = self.running_at if self.running_at is not None else self.requested_at
        end = self.ended_at if self.ended_at is not None else now
        return max(0.0, end - start) / 3600.0

    def cost(self, now: float) -> float:
        return self.billed_hours(now) * (self.price or 0.0)

    def on_demand_cost(self, now: float) -> float:
        return self.billed_hours(now) * (self.on_demand_price or 0.0)


class TimelineEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    at: float
    kind: str
    detail: str = ""
    attempt: int | None = None


class Volume(BaseModel):
    model_config = ConfigDict(frozen=True)

    volume_id: str
    az: str
    created_by_spotctl: bool
    created_at: float | None = None  # when spotctl made it (None: adopted, or older record)


class VolumeMove(BaseModel):
    """A move of the job's volume to another zone: snapshot it, restore it there.

    Written ahead like a launch: ``snapshot_requested`` is stored before
    CreateSnapshot (which has no ClientToken), so a pass that died after the call
    finds the snapshot by its tags instead of taking a second one.
    """

    model_config = ConfigDict(frozen=True)

    number: int  # the job's how-manieth move: names its tags and ClientToken
    from_volume_id: str
    from_az: str
    to_az: str
    reason: str  # the policy's, for the attempt launched after the move
    requested_at: float
    snapshot_requested: bool = False
    snapshot_id: str | None = None
    volume_id: str | None = None  # the restored volume in ``to_az``


class Job(BaseModel):
    """The stored record of a job: spec, state, attempts and timeline."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    spec: JobSpec
    state: JobState
    version: int = 0
    created_at: float
    updated_at: float
    secret_hash: str
    volume: Volume | None = None
    move: VolumeMove | None = None  # a move of the volume to another zone, under way
    moves: int = 0  # moves started so far
    # Volumes and snapshots a move left behind: spotctl never deletes them.
    kept_after_moves: tuple[str, ...] = ()
    attempts: tuple[Attempt, ...] = ()
    timeline: tuple[TimelineEvent, ...] = ()
    wait_until: float | None = None
    exit_code: int | None = None
    exit_attempt: int | None = None
    exit_detail: str = ""  # what the agent said with the exit (its sync, its own failure)
    error_restarts: int = 0  # times the workload was started again after a failure
    # ... after an exit with one of the spec's recover_on_exit_codes (not counted above)
    exit_code_restarts: int = 0
    cancel_requested_at: float | None = None
    delete_volume_on_cancel: bool = False
    data_synced_at: float | None = None  # the agent's last checkpoint sync to S3
    # The attempt whose agent said, in its last report (interrupted or exited), that its
    # final sync to S3 worked: after the workload stopped, so nothing newer is on the
    # volume. Only then may a cancel delete the volume (if that attempt was its last).
    final_sync_attempt: int | None = None
    # Where the agent syncs checkpoints and results, fixed at submission: the spec's
    # results_s3_uri, or the deployment bucket's jobs/<id> (None: no S3 copy at all).
    # Records stored before it was kept have None here and runtime.s3_prefix_for's
    # fallback.
    results_uri: str | None = None
    failure: str | None = None

    @property
    def results_prefix(self) -> str | None:
        """Where the job's checkpoints and results go in S3 (None: nowhere)."""
        return self.results_uri or self.spec.results_s3_uri

    @property
    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    def attempt(self, number: int) -> Attempt | None:
        return next((a for a in self.attempts if a.number == number), None)

    def with_event(self, at: float, kind: str, detail: str = "", attempt: int | None = None) -> Job:
        event = TimelineEvent(at=at, kind=kind, detail=detail, attempt=attempt)
        timeline = (*self.timeline, event)[-MAX_TIMELINE_EVENTS:]
        return self.model_copy(update={"timeline": timeline})

    def replace_attempt(self, updated: Attempt) -> Job:
        attempts = tuple(updated if a.number == updated.number else a for a in self.attempts)
        return self.model_copy(update={"attempts": attempts})

    def restart_for(self, code: int | None) -> Literal["exit-code", "error"] | None:
        """Which allowance starts the workload again after it exited with ``code``:
        the spec's recover_on_exit_codes, its max_restarts_on_errors, or none."""
        if code in (None, 0):
            return None
        listed = code in self.spec.recover_on_exit_codes
        if listed and self.exit_code_restarts < MAX_EXIT_CODE_RESTARTS:
            return "exit-code"
        if self.error_restarts < self.spec.max_restarts_on_errors:
            return "error"
        return None

    def restarted(self, code: int | None) -> tuple[Job, str]:
        """The job with the restart after an exit with ``code`` counted, and how to
        tell it ("restart 1 of 2"). Only for a ``code`` that :meth:`restart_for`
        allows."""
        kind = self.restart_for(code)
        if kind == "exit-code":
            n = self.exit_code_restarts + 1
            told = f"restart {n} on a listed exit code (at most {MAX_EXIT_CODE_RESTARTS})"
            return self.model_copy(update={"exit_code_restarts": n}), told
        if kind == "error":
            n = self.error_restarts + 1
            told = f"restart {n} of {self.spec.max_restarts_on_errors}"
            return self.model_copy(update={"error_restarts": n}), told
        raise ValueError(f"exit code {code}: no restart left")

    def cost(self, now: float) -> float:
        return sum(a.cost(now) for a in self.attempts)

    def on_demand_cost(self, now: float) -> float:
        return sum(a.on_demand_cost(now) for a in self.attempts)


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


JobIdStr = Annotated[str, Field(pattern=r"^j-[0-9a-f]{16}$")]
