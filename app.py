"""spotctl's Chalice app: HTTP routes, EC2 event handlers, the one-minute sweep.

Thin on purpose: each entry point parses its input, calls one thing in
``chalicelib``, and maps domain errors to HTTP errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from chalice.app import (
    BadRequestError,
    Chalice,
    ChaliceViewError,
    CloudWatchEvent,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    Rate,
    Response,
)
from pydantic import BaseModel, ValidationError

from chalicelib import events, reconcile, runtime
from chalicelib.errors import (
    InvalidJobSpec,
    InvalidTransition,
    JobNotFound,
    NotAuthorized,
    SpotctlError,
)
from chalicelib.log import logger
from chalicelib.service import job_summary, job_view

app = Chalice(app_name="spotctl")

_HTTP_ERRORS: dict[type[SpotctlError], type[ChaliceViewError]] = {
    InvalidJobSpec: BadRequestError,
    JobNotFound: NotFoundError,
    NotAuthorized: ForbiddenError,
    InvalidTransition: ConflictError,
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
    try:
        return request.json_body
    except BadRequestError:
        raise BadRequestError("body: not valid JSON") from None


def _now() -> float:
    return runtime.control_plane().reconciler.clock()


# -- HTTP API ----------------------------------------------------------------------


@app.route("/jobs", methods=["POST"])
def submit_job() -> Response:
    service = runtime.control_plane().service
    job = _api(lambda: service.submit(_json_body()))
    return Response(status_code=201, body=job_view(job, _now()))


@app.route("/jobs", methods=["GET"])
def list_jobs() -> dict[str, Any]:
    service = runtime.control_plane().service
    jobs, next_token = _api(lambda: service.list(_query()))
    now = _now()
    return {"jobs": [job_summary(job, now) for job in jobs], "next_token": next_token}


@app.route("/jobs/{job_id}", methods=["GET"])
def get_job(job_id: str) -> dict[str, Any]:
    service = runtime.control_plane().service
    return job_view(_api(lambda: service.get(job_id)), _now())


@app.route("/jobs/{job_id}", methods=["DELETE"])
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


def _reconcile_instance(
    instance_id: str, signal: Callable[[Any, float], Any] | None = None
) -> None:
    plane = runtime.control_plane()
    job_id = plane.store.job_id_for_instance(instance_id)
    if job_id is None:
        logger.info("event for an instance that is not ours", extra={"instance_id": instance_id})
        return
    logger.append_keys(job_id=job_id, instance_id=instance_id)
    try:
        plane.reconciler.reconcile(job_id, signal)
    finally:
        logger.remove_keys(["job_id", "instance_id"])


@app.on_cw_event(events.INTERRUPTION_WARNING_PATTERN, name="on_interruption_warning")
def on_interruption_warning(event: CloudWatchEvent) -> None:
    parsed = _parse_event(events.InterruptionWarning, event)
    if parsed is not None:
        instance_id = parsed.detail.instance_id
        _reconcile_instance(instance_id, reconcile.note_warning(instance_id))


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
    """Visit every live job: progress never depends on an event arriving."""
    plane = runtime.control_plane()
    visited = failed = 0
    for job_id in plane.store.live_job_ids():
        visited += 1
        try:
            plane.reconciler.reconcile(job_id)
        except Exception:
            failed += 1
            logger.exception("sweep could not reconcile job", extra={"job_id": job_id})
    return {"visited": visited, "failed": failed}
