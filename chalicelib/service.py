"""What the HTTP API does: validate, store, reconcile, and render jobs for users."""

from __future__ import annotations

import hmac
import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from chalicelib.agent_auth import derive_secret, hash_secret, secret_matches
from chalicelib.errors import (
    Busy,
    ConcurrentUpdate,
    Ec2Failure,
    InvalidJobSpec,
    InvalidTransition,
    JobNotFound,
    NotAuthenticated,
    NotAuthorized,
    NotConfigured,
    RequestTooLarge,
    SubmittedBefore,
    TokenReused,
)
from chalicelib.log import logger
from chalicelib.models import (
    ENDED_COMPLETED,
    ENDED_FAILED,
    ENDED_INTERRUPTED,
    ENDED_RECLAIMED,
    ENDED_SHUT_DOWN,
    Attempt,
    Job,
    JobSpec,
    JobState,
    Volume,
    is_job_id,
    iso,
)
from chalicelib.reconcile import Reconciler, note_rebalance
from chalicelib.store import MAX_PAGE, JobStore
from chalicelib.userdata import UserDataTooLarge

ReportKind = Literal["started", "checkpoint_synced", "rebalance", "interrupted", "exited"]

# What a request may carry. API Gateway's own ceilings are 10 MB of body and 10 KB of
# headers; a job spec is a few hundred bytes, so ours are far lower.
MAX_BODY_BYTES = 64 * 1024
# What the submission's user data check renders in place of what a launch knows.
LONGEST_VOLUME_ID = "vol-" + "f" * 17
FAR_ATTEMPT = 10**6
MAX_HEADER_BYTES = 8 * 1024
MAX_AUTHORIZATION_CHARS = 512
MAX_JSON_DEPTH = 8
MAX_QUERY_VALUE_CHARS = 2048


class AgentReport(BaseModel):
    """What the instance agent posts to ``/jobs/{id}/reports``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    attempt: int = Field(ge=1, le=100_000)
    kind: ReportKind
    exit_code: int | None = Field(default=None, ge=-255, le=255)
    detail: str = Field(default="", max_length=500)
    # With the last report (interrupted, exited): whether the final sync to S3, after
    # the workload stopped, worked. Absent: not known (nothing ran, or no S3 prefix).
    synced: StrictBool | None = None

    @model_validator(mode="after")
    def _exit_code_with_exit(self) -> AgentReport:
        if (self.kind == "exited") != (self.exit_code is not None):
            raise ValueError("exit_code is required with kind 'exited' and only with it")
        if self.synced is not None and self.kind not in ("interrupted", "exited"):
            raise ValueError("synced goes only with kind 'interrupted' or 'exited'")
        return self


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each starting with the field it concerns."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "body"
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}")
    return "; ".join(lines)


class ListQuery(BaseModel):
    """The query of ``GET /jobs``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state: JobState | None = None
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)
    next_token: str | None = Field(
        default=None, min_length=1, max_length=MAX_QUERY_VALUE_CHARS, pattern=r"^[A-Za-z0-9_=-]+$"
    )

    @field_validator("state", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("limit", mode="before")
    @classmethod
    def _digits(cls, value: object) -> object:
        # int("²") fails and int("٣") is 3: accept ASCII digits only.
        if isinstance(value, str) and not (value.isascii() and value.isdigit()):
            raise ValueError(f"must be an integer from 1 to {MAX_PAGE}")
        return value


class CancelQuery(BaseModel):
    """The query of ``DELETE /jobs/{job_id}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delete_volume: Literal["true", "false"] = "false"

    @field_validator("delete_volume", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


M = TypeVar("M", bound=BaseModel)


def parse_model(model: type[M], body: Any) -> M:
    if not isinstance(body, dict):
        raise InvalidJobSpec("body: must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise InvalidJobSpec(describe_validation_error(exc)) from exc


def parse_query(model: type[M], query: Mapping[str, str]) -> M:
    for name, value in query.items():
        _check_text(name, "query")
        _check_text(value, name)
    return parse_model(model, dict(query))


def check_job_id(job_id: str) -> str:
    """Refuse a malformed job id before anything reads the table."""
    if not is_job_id(job_id):
        raise InvalidJobSpec("job_id: must look like 'j-' and 16 hex digits")
    return job_id


def decode_json_body(raw: bytes | str | None) -> Any:
    """The body as JSON, stricter than ``json.loads``: size-capped UTF-8, no NaN or
    Infinity, no duplicate keys, no NUL or lone surrogates, bounded nesting."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else (raw or b"")
    if len(data) > MAX_BODY_BYTES:
        raise RequestTooLarge(f"body: over {MAX_BODY_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidJobSpec("body: not UTF-8") from None
    try:
        body = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise InvalidJobSpec("body: nested too deeply") from None
    except ValueError as exc:
        detail = str(exc) if isinstance(exc, _BodyError) else "not valid JSON"
        raise InvalidJobSpec(f"body: {detail}") from None
    _check_tree(body)
    return body


class _BodyError(ValueError):
    """A JSON document that parses but that the API refuses."""


def _no_constant(name: str) -> Any:
    raise _BodyError(f"{name} is not a number this API accepts")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _BodyError("an object repeats a key")
    return result


def _check_tree(body: Any) -> None:
    pending: list[tuple[Any, int, str]] = [(body, 0, "body")]
    while pending:
        value, depth, where = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidJobSpec("body: nested too deeply")
        if isinstance(value, str):
            _check_text(value, where)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, where)
                pending.append((item, depth + 1, key if where == "body" else f"{where}.{key}"))
        elif isinstance(value, list):
            pending.extend((item, depth + 1, where) for item in value)


def _check_text(value: str, where: str) -> None:
    if "\x00" in value:
        raise InvalidJobSpec(f"{_printable(where)}: contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidJobSpec(f"{_printable(where)}: contains a lone surrogate") from None


def _printable(name: str) -> str:
    return name.encode("utf-8", "replace").decode("utf-8")[:64].replace("\x00", "?")


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header ("" if it is not one);
    the scheme is case-insensitive (RFC 7235)."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def check_bearer(authorization: str | None, expected: str) -> None:
    """The user routes' token check (auth mode "token"), in constant time."""
    presented = bearer_token(authorization)
    if not expected or not presented:
        raise NotAuthenticated("this API needs 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise NotAuthenticated("this token is not valid for this API")


# Reads and conditional writes of a cancel request before giving up (each lost race is
# another writer, a Lambda pass or another cancel, updating the job meanwhile).
CANCEL_TRIES = 5


def new_job_id() -> str:
    return f"j-{secrets.token_hex(8)}"


@dataclass
class JobService:
    store: JobStore
    reconciler: Reconciler
    signing_key: Callable[[], str]
    clock: Callable[[], float]
    new_id: Callable[[], str] = new_job_id
    region: str | None = None  # the deployment's: a job's zones must be in it
    bucket: str | None = None  # the deployment's, for jobs that name no results_s3_uri
    # Instance families whose GPU the stage's AMI has no driver for (Config).
    families_without_gpu_driver: frozenset[str] = frozenset()

    def submit(self, body: Any) -> Job:
        spec = parse_model(JobSpec, body)
        earlier = self._submitted_before(spec)
        if earlier is not None:
            return earlier
        now = self.clock()
        _check_deadline(spec, now)
        self._check_zones(spec)
        self._check_instance_types(spec)
        self._check_data_source(spec)
        job_id = self.new_id()
        job = Job(
            job_id=job_id,
            spec=spec,
            state=JobState.SUBMITTED,
            created_at=now,
            updated_at=now,
            secret_hash=hash_secret(derive_secret(self.signing_key(), job_id)),
            results_uri=spec.results_s3_uri
            or (f"s3://{self.bucket}/jobs/{job_id}" if self.bucket else None),
        ).with_event(now, "submitted", spec.name)
        self._check_user_data(job, now)
        try:
            self.store.create(job)
        except SubmittedBefore as exc:  # the same submission, a moment ahead of this one
            return self._same_spec(self.store.get(exc.job_id), spec)
        logger.info("job submitted", extra={"job_id": job_id})
        return self._reconcile_best_effort(job)

    def get(self, job_id: str) -> Job:
        return self.store.get(check_job_id(job_id))

    def list(self, query: Mapping[str, str]) -> tuple[list[Job], str | None]:
        parsed = parse_query(ListQuery, query)
        return self.store.page(parsed.state, parsed.limit, parsed.next_token)

    def cancel(self, job_id: str, query: Mapping[str, str]) -> Job:
        """Store the request first, then act on it: once the answer is 200 the cancel
        is on record, and a pass that fails after terminating the instance (or a
        Lambda that dies there) leaves the sweep a cancel to finish, not a lost
        instance to replace. A second request may add ``delete_volume``."""
        check_job_id(job_id)
        delete_volume = parse_query(CancelQuery, query).delete_volume == "true"
        for _ in range(CANCEL_TRIES):
            job = self.store.get(job_id)
            if job.state is JobState.CANCELLED:
                if delete_volume and not job.delete_volume_on_cancel:
                    raise InvalidTransition(
                        f"job {job_id} was cancelled already, keeping its volume; "
                        "delete the volume with EC2 if you no longer need it"
                    )
                return job  # a resent cancel (its answer was lost): done already
            if job.state.is_terminal():
                raise InvalidTransition(f"job {job_id} already ended: {job.state.value}")
            asked = job.cancel_requested_at is not None
            if asked and (job.delete_volume_on_cancel or not delete_volume):
                break  # already asked for, as much as now
            now = self.clock()
            update = {
                "cancel_requested_at": job.cancel_requested_at or now,
                "delete_volume_on_cancel": job.delete_volume_on_cancel or delete_volume,
            }
            detail = "delete its volume once safe in S3" if delete_volume else ""
            requested = job.model_copy(update=update).with_event(now, "cancel-requested", detail)
            try:
                job = self.store.save(requested)
            except ConcurrentUpdate:
                continue
            break
        else:
            raise Busy(f"job {job_id} kept changing while the cancel was written; try again")
        return self._reconcile_best_effort(job)

    def report(self, job_id: str, authorization: str | None, body: Any) -> Job:
        """An agent's report, authorised by the job's secret (we keep only its hash).

        An unknown job answers like a wrong secret: the route tells no one without
        the secret whether a job exists."""
        check_job_id(job_id)
        token = bearer_token(authorization)
        if not token or len(token) > MAX_AUTHORIZATION_CHARS:
            raise NotAuthorized("this secret does not belong to this job")
        try:
            job = self.store.get(job_id)
        except JobNotFound:
            raise NotAuthorized("this secret does not belong to this job") from None
        if not secret_matches(token, job.secret_hash):
            raise NotAuthorized("this secret does not belong to this job")
        report = parse_model(AgentReport, body)
        if job.attempt(report.attempt) is None:
            raise InvalidJobSpec(f"attempt: job {job_id} has no attempt {report.attempt}")
        return self.reconciler.reconcile(job_id, _report_signal(report))

    def _submitted_before(self, spec: JobSpec) -> Job | None:
        """The job an earlier submission with this spec's client token made, if any."""
        if spec.client_token is None:
            return None
        job_id = self.store.job_id_for_token(spec.client_token)
        return None if job_id is None else self._same_spec(self.store.get(job_id), spec)

    @staticmethod
    def _same_spec(job: Job, spec: JobSpec) -> Job:
        if job.spec != spec:
            raise TokenReused(
                f"client_token: job {job.job_id} was submitted with it, with another spec"
            )
        return job

    def _check_instance_types(self, spec: JobSpec) -> None:
        """Refuse a type whose GPU the stage's AMI cannot drive: the instance would
        start, bill and run the workload with no GPU."""
        refused = [
            t for t in spec.instance_types if t.split(".")[0] in self.families_without_gpu_driver
        ]
        if refused:
            raise InvalidJobSpec(
                f"instance_types: {', '.join(refused)}: this stage's AMI (AWS's Deep "
                "Learning Base OSS Nvidia Driver GPU AMI, Amazon Linux 2023) has no NVIDIA "
                "driver for its GPU; choose g4dn, g5, g6, p4d or newer, or give the stage "
                "an AMI that has one (SPOTCTL_AMI_ID or SPOTCTL_AMI_PARAMETER)"
            )

    def _check_zones(self, spec: JobSpec) -> None:
        if self.region is None:
            return
        pattern = re.escape(self.region) + "[a-z]"
        alien = [z for z in spec.availability_zones or () if not re.fullmatch(pattern, z)]
        if alien:
            raise InvalidJobSpec(
                f"availability_zones: {', '.join(alien)} not in this deployment's "
                f"region, {self.region}"
            )

    def _check_data_source(self, spec: JobSpec) -> None:
        """Refuse a volume_id or snapshot_id EC2 does not know (or a volume outside the
        job's zones, or a volume_gib smaller than the snapshot). Best effort: when EC2
        cannot answer now, the first pass finds out and fails the job saying so."""
        ec2 = self.reconciler.ec2
        try:
            if spec.volume_id is not None:
                self.reconciler.calls.append("ec2:DescribeVolumes")
                volume = ec2.describe_volume(spec.volume_id)
                if volume.gone:
                    raise InvalidJobSpec(f"volume_id: {spec.volume_id} does not exist")
                zones = spec.availability_zones
                if zones and volume.az not in zones:
                    raise InvalidJobSpec(
                        f"volume_id: {spec.volume_id} is in {volume.az}, outside availability_zones"
                    )
                if volume.job_id is not None:
                    self.store.refuse_if_live(spec.volume_id, volume.job_id)
            if spec.snapshot_id is not None:
                self.reconciler.calls.append("ec2:DescribeSnapshots")
                size = ec2.snapshot_size(spec.snapshot_id)
                if size is None:
                    raise InvalidJobSpec(
                        f"snapshot_id: {spec.snapshot_id} does not exist "
                        "(or is not shared with this account)"
                    )
                if spec.volume_gib is not None and spec.volume_gib < size:
                    raise InvalidJobSpec(
                        f"volume_gib: {spec.volume_gib} is smaller than snapshot "
                        f"{spec.snapshot_id} ({size} GiB); give at least {size}, or leave "
                        "volume_gib out for a volume of the snapshot's size"
                    )
        except Ec2Failure as exc:
            if not exc.transient:
                raise
            logger.warning("could not check the job's data source", extra={"error": str(exc)})

    def _check_user_data(self, job: Job, now: float) -> None:
        """Refuse a job whose instances' user data would be over EC2's 16 KB (its
        command is what varies): rendered as the job's longest could be, with the
        longest volume id and a far attempt number."""
        zone = (job.spec.availability_zones or ("us-east-1a",))[0]
        volume = Volume(volume_id=LONGEST_VOLUME_ID, az=zone, created_by_spotctl=True)
        probe = job.model_copy(update={"volume": volume})
        attempt = Attempt(number=FAR_ATTEMPT, reason="", candidates=(), requested_at=now)
        try:
            self.reconciler.render_user_data(probe, attempt)
        except UserDataTooLarge as exc:
            raise InvalidJobSpec(f"command: {exc}") from None
        except ValueError as exc:
            # Every field the user data carries is validated with the spec: what is left
            # is the deployment's own settings (an API URL not set yet, say).
            logger.error("cannot make user data", extra={"error": str(exc)})
            raise NotConfigured(f"this deployment cannot launch instances yet: {exc}") from None

    def _reconcile_best_effort(self, job: Job) -> Job:
        try:
            return self.reconciler.reconcile(job.job_id)
        except Exception:
            # The job is stored; the next sweep carries on from here.
            logger.exception("first reconcile failed", extra={"job_id": job.job_id})
            return self.store.get(job.job_id)


def _check_deadline(spec: JobSpec, now: float) -> None:
    if spec.deadline is None:
        return
    hours = (spec.deadline.timestamp() - now) / 3600.0
    if hours <= 0.0:
        raise InvalidJobSpec("deadline: is in the past")
    if spec.expected_hours is not None and spec.expected_hours >= hours:
        raise InvalidJobSpec(
            f"deadline: {hours:.2f} h away, and expected_hours is "
            f"{spec.expected_hours:g}: not even on-demand could finish in time"
        )


def _note_final_sync(job: Job, report: AgentReport) -> Job:
    """Whether the volume's data is all in S3 after this attempt's last sync (a late
    report of an earlier attempt changes nothing of a later one's)."""
    if report.attempt < (job.final_sync_attempt or 0):
        return job
    synced = report.attempt if report.synced else None
    return job.model_copy(update={"final_sync_attempt": synced})


def _report_signal(report: AgentReport) -> Callable[[Job, float], Job]:
    def apply(job: Job, now: float) -> Job:
        attempt = job.attempt(report.attempt)
        if job.state.is_terminal() or attempt is None:
            return job
        if report.kind in ("interrupted", "exited"):
            job = _note_final_sync(job, report)
        if report.kind == "interrupted" and attempt.end_reason == ENDED_SHUT_DOWN:
            # Its word came after its instance was seen gone: a notice, not a silence.
            noticed = attempt.model_copy(update={"end_reason": ENDED_INTERRUPTED})
            job = job.replace_attempt(noticed)
        detail = report.detail
        if report.kind == "exited":
            if job.exit_code is not None or attempt.end_reason == ENDED_FAILED:
                return job  # told already (an attempt that failed was started again)
            if _replaced_failure_restarts(job, attempt, report):
                # Its instance went before its report came, and a relaunch has started
                # the workload again already: that was the restart.
                failed = attempt.model_copy(update={"end_reason": ENDED_FAILED})
                job, told = job.replace_attempt(failed).restarted(report.exit_code)
                detail = f"exit code {report.exit_code}, after a relaunch: {told}"
                return job.with_event(now, "agent-exited", detail, report.attempt)
            if attempt.end_reason in (ENDED_RECLAIMED, ENDED_SHUT_DOWN):
                # Its instance was found gone unwarned before this report: the
                # workload's exit (its agent shuts the instance down) was the end.
                ended = attempt.model_copy(update={"end_reason": ENDED_COMPLETED})
                job = job.replace_attempt(ended)
            update = {
                "exit_code": report.exit_code,
                "exit_attempt": report.attempt,
                "exit_detail": report.detail,
            }
            job = job.model_copy(update=update)
            detail = f"exit code {report.exit_code}" + (f": {detail}" if detail else "")
        elif report.kind == "checkpoint_synced":
            job = job.model_copy(update={"data_synced_at": now})
        elif report.kind == "rebalance" and attempt.instance_id:
            return note_rebalance(attempt.instance_id)(job, now)
        return job.with_event(now, f"agent-{report.kind}", detail, report.attempt)

    return apply


def _replaced_failure_restarts(job: Job, attempt: Attempt, report: AgentReport) -> bool:
    """Whether a non-zero exit of an attempt that has ended and been followed by
    another counts as a restart on errors (the spec has one left)."""
    current = job.current
    return (
        attempt.ended
        and current is not None
        and current.number > attempt.number
        and job.restart_for(report.exit_code) is not None
    )


def job_summary(job: Job, now: float) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "name": job.spec.name,
        "state": job.state.value,
        "created_at": iso(job.created_at),
        "attempts": len([a for a in job.attempts if a.instance_id]),
        "cost_usd": round(job.cost(now), 4),
    }


def job_view(job: Job, now: float) -> dict[str, Any]:
    """Everything a user may see about a job (never its secret or its hash)."""
    cost = job.cost(now)
    on_demand = job.on_demand_cost(now)
    interruptions = sum(1 for a in job.attempts if a.end_reason in ("interrupted", "reclaimed"))
    return {
        **job_summary(job, now),
        "spec": job.spec.model_dump(mode="json", exclude_none=True),
        "updated_at": iso(job.updated_at),
        "volume": job.volume.model_dump() if job.volume else None,
        "volume_move": job.move.model_dump() if job.move else None,
        "kept_after_moves": list(job.kept_after_moves),
        "interruptions": interruptions,
        "cost_usd": round(cost, 4),
        "on_demand_cost_usd": round(on_demand, 4),
        "saved_usd": round(on_demand - cost, 4),
        "exit_code": job.exit_code,
        "error_restarts": job.error_restarts,
        "exit_code_restarts": job.exit_code_restarts,
        "failure": job.failure,
        "wait_until": iso(job.wait_until),
        "cancel_requested_at": iso(job.cancel_requested_at),
        "delete_volume_on_cancel": job.delete_volume_on_cancel,
        "results_uri": job.results_uri,
        "data_synced_at": iso(job.data_synced_at),
        "attempts": [
            {
                "number": a.number,
                "reason": a.reason,
                "instance_id": a.instance_id,
                "pool": str(a.pool) if a.pool else None,
                "market": a.market,
                "max_price": a.max_price,
                "price": a.price,
                "requested_at": iso(a.requested_at),
                "running_at": iso(a.running_at),
                "warned_at": iso(a.warned_at),
                "left_at": iso(a.left_at),
                "ended_at": iso(a.ended_at),
                "end_reason": a.end_reason,
                "cost_usd": round(a.cost(now), 4),
            }
            for a in job.attempts
        ],
        "events": [
            {"at": iso(e.at), "kind": e.kind, "detail": e.detail, "attempt": e.attempt}
            for e in job.timeline
        ],
    }
