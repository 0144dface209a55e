"""EC2's request token buckets in the sandbox: burst, refill on the sandbox clock, and the
RequestLimitExceeded answer."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from spotctl.sandbox import FakeClock, LocalCloud, SpotPool
from spotctl.sandbox.proxy import Ec2Error
from spotctl.sandbox.throttle import DESCRIBE, MUTATING, RUN_INSTANCES, Ec2Throttle, category
from tests.sandbox.conftest import AMI, GPU


@pytest.mark.parametrize(
    ("action", "bucket"),
    [
        ("RunInstances", RUN_INSTANCES),
        ("DescribeInstances", DESCRIBE),
        ("DescribeSpotPriceHistory", DESCRIBE),
        ("AttachVolume", MUTATING),
        ("TerminateInstances", MUTATING),
        ("CreateVolume", MUTATING),
    ],
)
def test_each_action_draws_from_its_bucket(action: str, bucket: str) -> None:
    assert category(action) == bucket


def test_run_instances_allows_a_burst_of_five_then_two_per_second() -> None:
    clock = FakeClock()
    throttle = Ec2Throttle(clock)
    for _ in range(5):
        throttle.admit("RunInstances")
    with pytest.raises(Ec2Error) as refused:
        throttle.admit("RunInstances")
    assert refused.value.code == "RequestLimitExceeded"
    assert refused.value.status == 503
    clock.advance(1.0)
    throttle.admit("RunInstances")
    throttle.admit("RunInstances")
    with pytest.raises(Ec2Error):
        throttle.admit("RunInstances")
    assert throttle.admitted["RunInstances"] == 7
    assert throttle.throttled["RunInstances"] == 2


def test_an_empty_run_instances_bucket_does_not_throttle_describes() -> None:
    throttle = Ec2Throttle(FakeClock())
    for _ in range(5):
        throttle.admit("RunInstances")
    for _ in range(100):
        throttle.admit("DescribeInstances")
    with pytest.raises(Ec2Error):
        throttle.admit("DescribeVolumes")


def test_a_bucket_refills_no_further_than_its_burst() -> None:
    clock = FakeClock()
    throttle = Ec2Throttle(clock)
    clock.advance(3600)
    for _ in range(50):
        throttle.admit("AttachVolume")
    with pytest.raises(Ec2Error):
        throttle.admit("AttachVolume")


def test_sandbox_answers_request_limit_exceeded_and_launches_up_to_max_count(
    make_cloud: Callable[..., LocalCloud], clock: FakeClock
) -> None:
    cloud = make_cloud(pools=[SpotPool(GPU, "us-east-1a")], rebalance_probability=0.0)
    ec2 = cloud.client("ec2", config=Config(retries={"mode": "standard", "max_attempts": 1}))
    cloud.ec2.throttle = Ec2Throttle(clock)
    spot = {"MarketType": "spot", "SpotOptions": {"SpotInstanceType": "one-time"}}
    launch = {"ImageId": AMI, "InstanceType": GPU, "InstanceMarketOptions": spot}
    launch["Placement"] = {"AvailabilityZone": "us-east-1a"}

    many = ec2.run_instances(MinCount=1, MaxCount=3, ClientToken="batch-1", **launch)
    assert len(many["Instances"]) == 3, "EC2 starts up to MaxCount when it has capacity"
    for n in range(4):
        ec2.run_instances(MinCount=1, MaxCount=1, ClientToken=f"one-{n}", **launch)
    with pytest.raises(ClientError) as refused:
        ec2.run_instances(MinCount=1, MaxCount=1, ClientToken="one-4", **launch)
    assert refused.value.response["Error"]["Code"] == "RequestLimitExceeded"

    warned = many["Instances"][0]["InstanceId"]
    assert cloud.ec2.interrupt(warned)
    assert not cloud.ec2.interrupt(warned), "already noticed"
    assert cloud.instance_action(warned) is not None
