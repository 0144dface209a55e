"""The EC2 events we consume, as typed models of the shapes AWS documents.

EventBridge envelope: version, id, detail-type, source, account, time, region,
resources, detail. ``version`` is the string "0" (some tools send the integer);
``account`` may be missing from events that test tools deliver, so nothing needs it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

INTERRUPTION_WARNING = "EC2 Spot Instance Interruption Warning"
REBALANCE_RECOMMENDATION = "EC2 Instance Rebalance Recommendation"
STATE_CHANGE = "EC2 Instance State-change Notification"

# The EventBridge patterns the handlers register, exactly as deployed.
INTERRUPTION_WARNING_PATTERN: dict[str, Any] = {
    "source": ["aws.ec2"],
    "detail-type": [INTERRUPTION_WARNING],
}
REBALANCE_PATTERN: dict[str, Any] = {
    "source": ["aws.ec2"],
    "detail-type": [REBALANCE_RECOMMENDATION],
}
WATCHED_STATES = ["running", "stopping", "stopped", "shutting-down", "terminated"]
STATE_CHANGE_PATTERN: dict[str, Any] = {
    "source": ["aws.ec2"],
    "detail-type": [STATE_CHANGE],
    "detail": {"state": WATCHED_STATES},
}


class _Envelope(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    version: str
    id: str
    detail_type: str = Field(alias="detail-type")
    source: Literal["aws.ec2"]
    account: str | None = None
    time: datetime
    region: str
    resources: list[str] = []

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: object) -> str:
        return str(value)


class InstanceDetail(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    instance_id: str = Field(alias="instance-id", pattern=r"^i-[0-9a-f]{8,17}$")


class InterruptionWarningDetail(InstanceDetail):
    instance_action: Literal["terminate", "stop", "hibernate"] = Field(alias="instance-action")


class StateChangeDetail(InstanceDetail):
    state: Literal["pending", "running", "stopping", "stopped", "shutting-down", "terminated"]


class InterruptionWarning(_Envelope):
    detail: InterruptionWarningDetail


class RebalanceRecommendation(_Envelope):
    detail: InstanceDetail


class StateChange(_Envelope):
    detail: StateChangeDetail
