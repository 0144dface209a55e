"""What one reconcile pass did, as CloudWatch metrics in EMF (namespace ``spotctl``).

``pass_metrics(before, after, now)`` is pure: it compares the record a pass read with
the record it wrote. ``publish`` writes the figures as one EMF line on stdout, which
Lambda sends to CloudWatch Logs and CloudWatch turns into metrics (no PutMetricData
call, no extra IAM). Hours and dollars are counted when an attempt ends, so a sum
over any period is what ended in that period.

Powertools' ``Metrics`` comes with the ``Logger`` import already made by
``chalicelib.log``, so this module adds nothing to the cold start.
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit

from chalicelib.log import logger
from chalicelib.models import ENDED_INTERRUPTED, ENDED_RECLAIMED, Job

NAMESPACE = "spotctl"

# Shared by every pass in the container; publish() flushes what one pass added.
metrics = Metrics(namespace=NAMESPACE, service="spotctl")


@dataclass(frozen=True)
class Figure:
    name: str
    unit: MetricUnit
    value: float


def pass_metrics(before: Job, after: Job, now: float) -> list[Figure]:
    """The figures a pass produced, from the record it read and the one it wrote."""
    figures: list[Figure] = []
    old = {a.number: a for a in before.attempts}
    launched_before = any(a.instance_id for a in before.attempts)
    for attempt in after.attempts:
        previous = old.get(attempt.number)
        if attempt.ended_at is not None and (previous is None or previous.ended_at is None):
            if attempt.end_reason in (ENDED_INTERRUPTED, ENDED_RECLAIMED):
                figures.append(Figure("Interruptions", MetricUnit.Count, 1))
            hours = attempt.billed_hours(now)
            if hours > 0:
                name = "SpotHours" if attempt.market == "spot" else "OnDemandHours"
                figures.append(Figure(name, MetricUnit.NoUnit, hours))
                saved = attempt.on_demand_cost(now) - attempt.cost(now)
                figures.append(Figure("DollarsSaved", MetricUnit.NoUnit, round(saved, 6)))
        new_launch = attempt.instance_id and (previous is None or previous.instance_id is None)
        if new_launch and (launched_before or attempt.number > 1):
            figures.append(Figure("Relaunches", MetricUnit.Count, 1))
        if previous is None and attempt.number > 1:
            warned = after.attempt(attempt.number - 1)
            if warned is not None and warned.warned_at is not None:
                figures.append(
                    Figure(
                        "WarningToReplacementSeconds",
                        MetricUnit.Seconds,
                        max(0.0, attempt.requested_at - warned.warned_at),
                    )
                )
    return figures


def publish(job_id: str, figures: list[Figure]) -> None:
    """One EMF line for the pass; the job id rides along as a property, not a dimension
    (a dimension per job would make a metric per job)."""
    if not figures:
        return
    try:
        for figure in figures:
            metrics.add_metric(name=figure.name, unit=figure.unit, value=figure.value)
        metrics.add_metadata(key="job_id", value=job_id)
        metrics.flush_metrics()
    except Exception:
        # Metrics never stop the control loop.
        logger.exception("could not publish metrics", extra={"job_id": job_id})
        metrics.clear_metrics()
