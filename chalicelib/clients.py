"""AWS clients, made lazily in one place with botocore's standard retry mode.

Never at import time: tests and the sandbox point boto3 at moto first (through
``AWS_ENDPOINT_URL``, which botocore reads itself).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ssm import SSMClient

# Standard mode retries throttling (RequestLimitExceeded, ThrottlingException) and
# transient errors with exponential backoff and jitter, and keeps a retry quota so a
# throttled account is not hammered.
_RETRIES = {"mode": "standard", "max_attempts": 6}


# EC2 answers a launch it has no capacity for as a server error (HTTP 500), which the
# standard mode would send again six times, with backoff, into the same empty pool:
# seconds of a two-minute notice, and the account's RunInstances budget. A refusal
# is final; the next pool is the retry.
FINAL_LAUNCH_ERRORS = frozenset(
    {"InsufficientInstanceCapacity", "InsufficientHostCapacity", "InsufficientCapacity"}
)


def _refusal_is_final(response: Any = None, operation: Any = None, **_: Any) -> None:
    """needs-retry handler: raise a capacity refusal at once instead of retrying it."""
    from botocore.exceptions import ClientError  # noqa: PLC0415

    if response is None:  # no answer (a connection error): the retry mode decides
        return
    _, parsed = response
    if parsed.get("Error", {}).get("Code") in FINAL_LAUNCH_ERRORS:
        raise ClientError(parsed, operation.name)


@cache
def _client(service: str, region: str) -> Any:
    import boto3  # noqa: PLC0415 - lazy: the handlers that never call AWS skip it
    from botocore.config import Config as BotoConfig  # noqa: PLC0415

    config = BotoConfig(retries=_RETRIES, connect_timeout=5, read_timeout=20)  # type: ignore[arg-type]
    make: Any = boto3.session.Session().client  # the service name is a plain str here
    client = make(service, region_name=region, config=config)
    if service == "ec2":
        client.meta.events.register_first("needs-retry.ec2.RunInstances", _refusal_is_final)
    return client


def ec2(region: str) -> EC2Client:
    client: EC2Client = _client("ec2", region)
    return client


def dynamodb(region: str) -> DynamoDBClient:
    client: DynamoDBClient = _client("dynamodb", region)
    return client


def ssm(region: str) -> SSMClient:
    client: SSMClient = _client("ssm", region)
    return client


def reset() -> None:
    """Forget every client (tests switch endpoints between cases)."""
    _client.cache_clear()
