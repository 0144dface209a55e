"""A handler run writes JSON log lines that carry the job id, and EMF metrics in the
spotctl namespace, both on stdout where Lambda ships them to CloudWatch."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from chalicelib.log import logger
from chalicelib.metrics import NAMESPACE, pass_metrics
from chalicelib.models import Job
from tests.functional.conftest import Env, env, moto_url  # noqa: F401 - fixtures

HOUR = 3600.0


def emf_lines(text: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            found.append(json.loads(line))
    return found


def test_an_interruption_logs_the_job_id_and_emits_emf_metrics(env: Env, capsys) -> None:  # noqa: F811
    job = env.submit()
    job_id, first = job["job_id"], job["attempts"][0]["instance_id"]
    env.clock.advance(60)
    env.cloud.state_change(first, "running")
    env.clock.advance(5 * HOUR)
    capsys.readouterr()

    buffer = io.StringIO()
    handler: Any = logger.registered_handler
    previous = handler.setStream(buffer)
    try:
        env.cloud.deliver("spot-interruption-warning", first)
        env.clock.advance(120)
        env.cloud.reclaim(first)
        env.cloud.state_change(first, "terminated")
    finally:
        handler.setStream(previous)

    lines = [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]
    assert lines, "the handlers logged nothing"
    for line in lines:
        assert {"level", "location", "message", "timestamp", "service"} <= set(line), line
        assert line["service"] == "spotctl"
        assert line.get("job_id") == job_id, line

    emitted = emf_lines(capsys.readouterr().out)
    names: dict[str, float] = {}
    for blob in emitted:
        (directive,) = blob["_aws"]["CloudWatchMetrics"]
        assert directive["Namespace"] == NAMESPACE
        assert directive["Dimensions"] == [["service"]]
        assert blob["service"] == "spotctl"
        assert blob["job_id"] == job_id
        for metric in directive["Metrics"]:
            value = blob[metric["Name"]]  # Powertools writes a list when a name repeats
            names[metric["Name"]] = sum(value) if isinstance(value, list) else value
    assert names["WarningToReplacementSeconds"] == 0.0  # the replacement is asked at once
    assert names["Interruptions"] == 1
    assert names["Relaunches"] == 1
    assert names["SpotHours"] == pytest.approx(5 + 2 / 60, abs=0.01)
    assert names["DollarsSaved"] > 0


def test_pass_metrics_is_empty_when_nothing_changed() -> None:
    job = Job.model_validate(
        {
            "job_id": "j-0123456789abcdef",
            "spec": {
                "name": "x",
                "command": ["true"],
                "instance_types": ["g5.xlarge"],
                "volume_gib": 1,
            },
            "state": "SUBMITTED",
            "created_at": 0.0,
            "updated_at": 0.0,
            "secret_hash": "x",
        }
    )
    assert pass_metrics(job, job, 10.0) == []
