"""Why chalicelib/events.py keeps its own envelope instead of Powertools' EventBridgeModel:
the shapes we must accept (no ``account``, integer ``version`` 0) fail Powertools' model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from pydantic import ValidationError

from chalicelib.events import InterruptionWarning

EVENT = Path(__file__).parents[1] / "fixtures" / "aws-events" / "spot-interruption-warning.json"


@pytest.mark.parametrize(
    "change",
    [lambda e: e.pop("account"), lambda e: e.update(version=0)],
    ids=["without-account", "integer-version"],
)
def test_powertools_rejects_a_shape_we_accept(change) -> None:
    event = json.loads(EVENT.read_text())
    change(event)
    assert InterruptionWarning.model_validate(event).detail.instance_id
    with pytest.raises(ValidationError):
        EventBridgeModel.model_validate(event)


def test_both_accept_the_documented_shape() -> None:
    event = json.loads(EVENT.read_text())
    InterruptionWarning.model_validate(event)
    EventBridgeModel.model_validate(event)
