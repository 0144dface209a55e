"""EventBridge pattern matching, one row per rule (pure: no cloud needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from spotctl.sandbox import InvalidEventPattern, matches, validate_pattern

EVENTS = Path(__file__).resolve().parents[1] / "fixtures" / "aws-events"  # the documented shapes


def documented(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((EVENTS / name).read_text())
    return loaded


WARNING = {
    "version": "0",
    "detail-type": "EC2 Spot Instance Interruption Warning",
    "source": "aws.ec2",
    "region": "us-east-1",
    "resources": ["arn:aws:ec2:us-east-1:123456789012:instance/i-0abc"],
    "detail": {"instance-id": "i-0abc", "instance-action": "terminate", "count": 3},
}


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ({"source": ["aws.ec2"]}, True),
        ({"source": ["aws.s3", "aws.ec2"]}, True),
        ({"source": ["aws.s3"]}, False),
        ({"detail": {"instance-action": ["terminate"]}}, True),
        ({"detail": {"instance-action": ["stop"]}}, False),
        ({"detail": {"state": ["running"]}}, False),  # field absent
        ({"detail-type": [{"prefix": "EC2 Spot"}]}, True),
        ({"detail-type": [{"prefix": "EC2 Instance"}]}, False),
        ({"detail-type": [{"suffix": "Warning"}]}, True),
        ({"detail": {"instance-action": [{"anything-but": "stop"}]}}, True),
        ({"detail": {"instance-action": [{"anything-but": ["stop", "terminate"]}]}}, False),
        ({"detail": {"instance-id": [{"anything-but": {"prefix": "i-0"}}]}}, False),
        ({"detail": {"instance-id": [{"exists": True}]}}, True),
        ({"detail": {"state": [{"exists": False}]}}, True),
        ({"detail": {"state": [{"exists": True}]}}, False),
        ({"detail": {"count": [{"numeric": [">", 1, "<=", 3]}]}}, True),
        ({"detail": {"count": [{"numeric": [">", 3]}]}}, False),
        ({"detail": {"count": ["3"]}}, False),  # a string does not equal a number
        ({"resources": [{"wildcard": "arn:aws:ec2:*:instance/i-0abc"}]}, True),
        ({"detail-type": [{"equals-ignore-case": "ec2 spot instance interruption warning"}]}, True),
        ({"$or": [{"source": ["aws.s3"]}, {"detail": {"instance-id": ["i-0abc"]}}]}, True),
        ({"source": ["aws.ec2"], "detail-type": ["EC2 Instance State-change Notification"]}, False),
    ],
)
def test_pattern_matching_follows_eventbridge(pattern: dict[str, Any], expected: bool) -> None:
    validate_pattern(pattern)
    assert matches(pattern, WARNING) is expected


@pytest.mark.parametrize(
    "pattern",
    [
        {},
        {"source": "aws.ec2"},  # values must be in a list
        {"source": []},
        {"detail": {"state": [{"beginswith": "run"}]}},
        {"detail": {"state": [{"exists": "yes"}]}},
        {"detail": {"count": [{"numeric": [">>", 1]}]}},
        ["aws.ec2"],
    ],
)
def test_invalid_pattern_is_rejected_like_put_rule(pattern: Any) -> None:
    with pytest.raises(InvalidEventPattern):
        validate_pattern(pattern)


def test_documented_state_change_matches_state_pattern() -> None:
    running = documented("state-change-running.json")
    pattern = {
        "source": ["aws.ec2"],
        "detail-type": ["EC2 Instance State-change Notification"],
        "detail": {"state": ["running", "terminated"]},
    }
    assert matches(pattern, running)
    assert not matches(pattern, documented("state-change-stopping.json"))
