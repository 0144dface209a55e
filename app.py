"""spotctl's Chalice app: HTTP routes, EC2 event handlers, the one-minute sweep.

Thin on purpose: each entry point parses its input, calls one thing in
``chalicelib``, and maps domain errors to HTTP errors.

Every interruption warning reaches two handlers (two EventBridge targets):
``on_interruption_warning`` at once, one job per invocation (the fast path for the
ordinary, lone warning), and ``on_interruption_warning_batch`` through an SQS queue, in
batches gathered over a few seconds (the storm path: one RunInstances per pool,
chalicelib.batch). While a storm is on (the batch handler saw 10+ warnings in one
delivery, chalicelib.batch.StormSignal) the fast path leaves every warning to the
queue. They coexist without double launches: the batch skips a job whose warned
instance another path already replaced, and when both plan the same job at the same
moment, the job record's version condition lets one of them write the new attempt; the
per-job path writes it before its RunInstances, the batch terminates an instance no job
took. The queue is also the second chance for a warning the fast path failed on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

from chalice.app import (
    BadRequestError,
    Chalice,
    ChaliceViewError,
    CloudWatchEvent,
    ConflictError,
    ForbiddenError,
    IAMAuthorizer,
    NotFoundError,
    Rate,
    Request,
    Response,
    SQSEvent,
    UnauthorizedError,
)
from pydantic import BaseModel, ValidationError

from chalicelib import events, openapi, reconcile, runtime
from chalicelib.errors import (
    Busy,
    InvalidJobSpec,
    InvalidTransition,
    JobNotFound,
    NotAuthenticated,
    NotAuthorized,
    NotConfigured,
    RequestTooLarge,
    SpotctlError,
    TokenReused,
    VolumeClaimed,
)
from chalicelib.log import logger
from chalicelib.service import (
    MAX_HEADER_BYTES,
    check_bearer,
    decode_json_body,
    job_summary,
    job_view,
)

app = Chalice(app_name="spotctl")

# Read at import because `chalice package` renders the authorizers into the template;
# .chalice/config.json sets SPOTCTL_AUTH=iam on the deployed stages.
_USER_AUTH = IAMAuthorizer() if os.environ.get("SPOTCTL_AUTH", "").lower() == "iam" else None

# The queue EventBridge puts interruption warnings on (infra/resources.yaml), per stage.
_WARNINGS_QUEUE = os.environ.get("SPOTCTL_WARNINGS_QUEUE", "spotctl-dev-interruption-warnings")
# Up to 100 warnings per invocation, gathered for up to 5 s: a storm's warnings of one
# pool share a RunInstances, a lone warning waits 5 s more (the fast path has it already).
WARNINGS_BATCH_SIZE = 100
WARNINGS_BATCHING_WINDOW_SECONDS = 5
# Two invocations at most: more would only compete for RunInstances tokens.
WARNINGS_MAX_CONCURRENCY = 2

# Routes anyone may call: the API's description, and the agent's reports (which the
# job's own secret authorises, in chalicelib.service).
_OPEN_ROUTES = frozenset({"/openapi.json", "/jobs/{job_id}/reports"})


class PayloadTooLargeError(ChaliceViewError):
    STATUS_CODE = 413


class HeadersTooLargeError(ChaliceViewError):
    STATUS_CODE = 431


class ServiceUnavailableError(ChaliceViewError):
    STATUS_CODE = 503


class NotConfiguredError(ChaliceViewError):
    """503 that asking again will not cure: the deployment lacks a setting. Its own
    ``Code`` (Chalice answers with the class's name) tells clients not to retry."""

    STATUS_CODE = 503


_HTTP_ERRORS: dict[type[SpotctlError], type[ChaliceViewError]] = {
    InvalidJobSpec: BadRequestError,
    JobNotFound: NotFoundError,
    NotAuthenticated: UnauthorizedError,
    NotAuthorized: ForbiddenError,
    InvalidTransition: ConflictError,
    VolumeClaimed: ConflictError,
    TokenReused: ConflictError,
    RequestTooLarge: PayloadTooLargeError,
    Busy: ServiceUnavailableError,
    NotConfigured: NotConfiguredError,
}

T = TypeVar("T")


def _api(call: Callable[[], T]) -> T:
    try:
        return call()
    except tuple(_HTTP_ERRORS) as exc:
        raise _HTTP_ERRORS[type(exc)](str(exc)) from exc


def _query() -> dict[str, str]:
    request = app.current_request
    assert request is not None
    return dict(request.query_params or {})


def _json_body() -> Any:
    request = app.current_request
    assert request is not None
    return decode_json_body(request.raw_body)


def _now() -> float:
    return runtime.control_plane().reconciler.clock()


# -- HTTP API ----------------------------------------------------------------------


def _error(error: type[ChaliceViewError], message: str) -> Response:
    """The shape Chalice gives a raised view error, for answers made before the view."""
    return Response(
        status_code=error.STATUS_CODE, body={"Code": error.__name__, "Message": message}
    )


def _learn_api_url(request: Request) -> None:
    """On a stage that could not give the API handler its own URL, read it from the
    request: API Gateway names the domain and the stage it was called on. Only its
    own execute-api domain is taken, never a Host a client could send."""
    config = runtime.control_plane().config
    if config.api_url:
        return
    context = request.context or {}
    domain, stage = str(context.get("domainName", "")), str(context.get("stage", ""))
    api, region = str(context.get("apiId", "")), config.region
    own = rf"{re.escape(api)}\.execute-api\.{re.escape(region)}\.amazonaws\.com(\.cn)?"
    if api and re.fullmatch(own, domain) and re.fullmatch(r"[A-Za-z0-9_-]+", stage):
        runtime.learn_api_url(f"https://{domain}/{stage}")


@app.middleware("http")
def authenticate(request: Request, get_response: Callable[[Request], Response]) -> Response:
    """Every route: bounded headers; user routes: the configured credentials."""
    header_bytes = sum(len(k) + len(v) for k, v in request.headers.items())
    if header_bytes > MAX_HEADER_BYTES:
        return _error(HeadersTooLargeError, f"headers: over {MAX_HEADER_BYTES} bytes in all")
    _learn_api_url(request)
    if request.path not in _OPEN_ROUTES:
        config = runtime.control_plane().config
        if config.auth == "token":
            try:
                check_bearer(request.headers.get("authorization"), config.api_token)
            except NotAuthenticated as exc:
                return _error(UnauthorizedError, str(exc))
        # "iam": API Gateway verified the SigV4 signature before the Lambda ran.
    return get_response(request)


@app.route("/openapi.json", methods=["GET"])
def openapi_document() -> dict[str, Any]:
    return openapi.document()


@app.route("/jobs", methods=["POST"], authorizer=_USER_AUTH)
def submit_job() -> Response:
    service = runtime.control_plane().service
    job = _api(lambda: service.submit(_json_body()))
    return Response(status_code=201, body=job_view(job, _now()))


@app.route("/jobs", methods=["GET"], authorizer=_USER_AUTH)
def list_jobs() -> dict[str, Any]:
    service = runtime.control_plane().service
    jobs, next_token = _api(lambda: service.list(_query()))
    now = _now()
    return {"jobs": [job_summary(job, now) for job in jobs], "next_token": next_token}


@app.route("/jobs/{job_id}", methods=["GET"], authorizer=_USER_AUTH)
def get_job(job_id: str) -> dict[str, Any]:
    service = runtime.control_plane().service
    return job_view(_api(lambda: service.get(job_id)), _now())


@app.route("/jobs/{job_id}", methods=["DELETE"], authorizer=_USER_AUTH)
def cancel_job(job_id: str) -> dict[str, Any]:
    service = runtime.control_plane().service
    return job_view(_api(lambda: service.cancel(job_id, _query())), _now())


@app.route("/jobs/{job_id}/reports", methods=["POST"])
def agent_report(job_id: str) -> dict[str, Any]:
    """The instance agent's reports; authorised by the job's secret, not by IAM."""
    request = app.current_request
    assert request is not None
    service = runtime.control_plane().service
    authorization = request.headers.get("authorization")
    job = _api(lambda: service.report(job_id, authorization, _json_body()))
    return {"job_id": job.job_id, "state": job.state.value}


# -- EC2 events ------------------------------------------------------------------

E = TypeVar("E", bound=BaseModel)


def _parse_event(model: type[E], event: CloudWatchEvent) -> E | None:
    try:
        return model.model_validate(event.to_dict())
    except ValidationError as exc:
        logger.warning("ignoring malformed event", extra={"error": str(exc)})
        return None


def _parse_message(model: type[E], body: str) -> E | None:
    """An EventBridge event that SQS carried as a message body."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        logger.warning("ignoring malformed message", extra={"error": str(exc)})
        return None


def _reconcile_instance(
    instance_id: str,
    signal: Callable[[Any, float], Any] | None = None,
    left_elsewhere: Callable[[], bool] | None = None,
) -> None:
    """Reconcile the instance's job, unless ``left_elsewhere()`` says another handler
    has it (asked only for an instance of ours)."""
    plane = runtime.control_plane()
    job_id = plane.store.job_id_for_instance(instance_id)
    if job_id is None:
        logger.info("event for an instance that is not ours", extra={"instance_id": instance_id})
        return
    if left_elsewhere is not None and left_elsewhere():
        logger.info("left to another handler", extra={"job_id": job_id, "instance_id": instance_id})
        return
    logger.append_keys(job_id=job_id, instance_id=instance_id)
    try:
        plane.reconciler.reconcile(job_id, signal)
    finally:
        logger.remove_keys(["job_id", "instance_id"])


@app.on_cw_event(events.INTERRUPTION_WARNING_PATTERN, name="on_interruption_warning")
def on_interruption_warning(event: CloudWatchEvent) -> None:
    parsed = _parse_event(events.InterruptionWarning, event)
    if parsed is None:
        return
    instance_id = parsed.detail.instance_id
    from chalicelib import batch  # noqa: PLC0415 - kept off the other handlers' cold start

    def in_a_storm() -> bool:
        # The queue has this warning too: in a storm the batch handler launches for it.
        plane = runtime.control_plane()
        return batch.storm_for(plane).is_on(plane.reconciler.clock())

    _reconcile_instance(instance_id, reconcile.note_warning(instance_id), in_a_storm)


@app.on_sqs_message(
    queue=_WARNINGS_QUEUE,
    batch_size=WARNINGS_BATCH_SIZE,
    maximum_batching_window_in_seconds=WARNINGS_BATCHING_WINDOW_SECONDS,
    maximum_concurrency=WARNINGS_MAX_CONCURRENCY,
    name="on_interruption_warning_batch",
)
def on_interruption_warning_batch(event: SQSEvent) -> dict[str, list[dict[str, str]]]:
    """Interruption warnings in bulk (EventBridge -> SQS). Returns the messages to deliver
    again (the event source mapping reports batch item failures); an error that is not
    one job's (the table unreachable) is raised, and the whole batch comes again."""
    message_ids: dict[str, list[str]] = {}
    for record in event:
        message_id = str(record.to_dict()["messageId"])
        parsed = _parse_message(events.InterruptionWarning, record.body)
        if parsed is not None:
            message_ids.setdefault(parsed.detail.instance_id, []).append(message_id)
    if not message_ids:
        return {"batchItemFailures": []}
    from chalicelib import batch  # noqa: PLC0415 - only this handler needs it

    outcome = batch.recovery_for(runtime.control_plane()).recover(list(message_ids))
    logger.info(
        "interruption warnings recovered",
        extra={
            "warnings": len(message_ids),
            "batched": len(outcome.launched),
            "one_by_one": len(outcome.one_by_one),
            "already_replaced": len(outcome.already_replaced),
            "surplus": len(outcome.surplus),
            "retry": len(outcome.retry),
            "run_instances_calls": outcome.run_instances_calls,
        },
    )
    failed = sorted({m for instance_id in outcome.retry for m in message_ids[instance_id]})
    return {"batchItemFailures": [{"itemIdentifier": m} for m in failed]}


@app.on_cw_event(events.REBALANCE_PATTERN, name="on_rebalance_recommendation")
def on_rebalance_recommendation(event: CloudWatchEvent) -> None:
    parsed = _parse_event(events.RebalanceRecommendation, event)
    if parsed is not None:
        instance_id = parsed.detail.instance_id
        _reconcile_instance(instance_id, reconcile.note_rebalance(instance_id))


@app.on_cw_event(events.STATE_CHANGE_PATTERN, name="on_instance_state_change")
def on_instance_state_change(event: CloudWatchEvent) -> None:
    parsed = _parse_event(events.StateChange, event)
    if parsed is not None:
        _reconcile_instance(parsed.detail.instance_id)


@app.schedule(Rate(1, unit=Rate.MINUTES), name="sweep")
def sweep(event: Any) -> dict[str, int]:
    """Visit every live job: progress never depends on an event arriving. Then end the
    spotctl instances no record names (a batch handler that died and was not retried,
    a pass that lost a race and died before ending its launch)."""
    plane = runtime.control_plane()
    reaped = 0
    visited, failed, named = plane.reconciler.sweep(plane.store.live_job_ids())
    try:
        reaped = len(plane.reconciler.reap_unrecorded(known=named))
    except Exception:
        failed += 1
        logger.exception("sweep could not reap unrecorded instances")
    return {"visited": visited, "failed": failed, "reaped": reaped}
