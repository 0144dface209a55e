"""The EC2 fidelity rules of the sandbox, each against a real LocalCloud over HTTP."""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from chalicelib import clients
from spotctl.sandbox import LocalCloud, SpotPool, load_trace, pools_from_traces

from .conftest import AMI, GPU, launch, trace_dir, write_trace


def error_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def test_proxy_error_is_ec2_xml_that_botocore_parses_into_client_error(
    cloud: LocalCloud, ec2: Any
) -> None:
    cloud.clock.advance(600)  # type: ignore[attr-defined]  # the pool has no capacity now
    with pytest.raises(ClientError) as exc:
        launch(ec2)
    assert error_code(exc) == "InsufficientInstanceCapacity"
    # EC2 lists it among its server errors: HTTP 500, as it answers it.
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500

    body = (
        f"Action=RunInstances&Version=2016-11-15&ImageId={AMI}&MinCount=1&MaxCount=1"
        f"&InstanceType={GPU}&Placement.AvailabilityZone=us-east-1a"
        "&InstanceMarketOptions.MarketType=spot"
    ).encode()
    raw = urllib.request.Request(  # noqa: S310 - loopback sandbox
        cloud.endpoint_url,
        data=body,
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20261128/us-east-1/ec2/"
            "aws4_request, SignedHeaders=host, Signature=0",
        },
    )
    with pytest.raises(urllib.error.HTTPError) as http_error:
        urllib.request.urlopen(raw)  # noqa: S310 - loopback sandbox
    xml = http_error.value.read().decode()
    assert http_error.value.code == 500
    assert "<Response><Errors><Error><Code>InsufficientInstanceCapacity</Code><Message>" in xml
    assert "</Message></Error></Errors><RequestID>" in xml


def test_spotctl_takes_a_capacity_refusal_at_once_where_botocore_would_retry_it(
    cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests: list[str] = []
    proxy = cloud._proxy
    assert proxy is not None
    handle = proxy.ec2_handler

    def counted(request: Any) -> Any:
        requests.append(request.action)
        return handle(request)

    monkeypatch.setattr(proxy, "ec2_handler", counted)
    cloud.clock.advance(600)  # type: ignore[attr-defined]  # the pool has no capacity now
    # botocore alone (standard mode, one retry: max_attempts counts retries) sends it again.
    plain = cloud.client("ec2", config=Config(retries={"mode": "standard", "max_attempts": 1}))
    with pytest.raises(ClientError):
        launch(plain)
    assert requests.count("RunInstances") == 2
    # spotctl's client (chalicelib.clients): one request; the next pool is the retry.
    monkeypatch.setenv("AWS_ENDPOINT_URL", cloud.endpoint_url)
    clients.reset()
    try:
        with pytest.raises(ClientError) as exc:
            launch(clients.ec2("us-east-1"))
    finally:
        clients.reset()
    assert error_code(exc) == "InsufficientInstanceCapacity"
    assert requests.count("RunInstances") == 3


def test_spot_launch_in_pool_without_capacity_fails_with_insufficient_capacity(
    cloud: LocalCloud, ec2: Any
) -> None:
    assert launch(ec2).startswith("i-")  # tick 0: capacity
    cloud.clock.advance(600)  # type: ignore[attr-defined]  # tick 1: data[1] == 1
    with pytest.raises(ClientError) as exc:
        launch(ec2)
    assert error_code(exc) == "InsufficientInstanceCapacity"
    assert launch(ec2, spot=False).startswith("i-")  # on-demand is not in the spot pool


def test_real_trace_decides_capacity_of_its_pool(
    make_cloud: Callable[..., LocalCloud], clock: Any
) -> None:
    path = trace_dir() / "aws-10-26-2022" / "us-west-2a_v100_1.json"
    trace = load_trace(path)
    cloud = make_cloud(trace_paths=[path], region="us-west-2")
    ec2 = cloud.client("ec2")
    first_gap = trace.unavailable.index(True)
    first_open = trace.unavailable.index(False)
    clock.advance(first_gap * trace.gap_seconds)
    with pytest.raises(ClientError) as exc:
        launch(ec2, az="us-west-2a")
    assert error_code(exc) == "InsufficientInstanceCapacity"
    clock.set(cloud.market.start + first_open * trace.gap_seconds)
    assert launch(ec2, az="us-west-2a").startswith("i-")


def test_spot_launch_below_current_price_fails_with_max_price_too_low(
    cloud: LocalCloud, ec2: Any
) -> None:
    price = cloud.market.price(GPU, "us-east-1a", cloud.clock.now())
    too_low = {"MarketType": "spot", "SpotOptions": {"MaxPrice": f"{price * 0.5:.4f}"}}
    with pytest.raises(ClientError) as exc:
        launch(ec2, InstanceMarketOptions=too_low)
    assert error_code(exc) == "SpotMaxPriceTooLow"
    enough = {"MarketType": "spot", "SpotOptions": {"MaxPrice": f"{price * 2:.4f}"}}
    assert launch(ec2, InstanceMarketOptions=enough).startswith("i-")


def test_spot_price_history_moves_and_honours_filters(cloud: LocalCloud, ec2: Any) -> None:
    history = ec2.describe_spot_price_history(
        InstanceTypes=[GPU], AvailabilityZone="us-east-1a", ProductDescriptions=["Linux/UNIX"]
    )["SpotPriceHistory"]
    prices = {float(h["SpotPrice"]) for h in history}
    assert len(history) > 24 and len(prices) > 5  # a week of hourly steps that move
    assert all(h["InstanceType"] == GPU and h["AvailabilityZone"] == "us-east-1a" for h in history)
    assert all(0.306 <= p <= 3.06 for p in prices)  # between 10 % of on-demand and on-demand
    times = [h["Timestamp"] for h in history]
    assert times == sorted(times, reverse=True)
    latest = float(history[0]["SpotPrice"])
    assert latest == pytest.approx(cloud.market.price(GPU, "us-east-1a", cloud.clock.now()))

    since = times[3]
    recent = ec2.describe_spot_price_history(
        InstanceTypes=[GPU], AvailabilityZone="us-east-1a", StartTime=since
    )["SpotPriceHistory"]
    assert len(recent) == 4  # three changes after StartTime plus the price in effect at it
    windows = ec2.describe_spot_price_history(InstanceTypes=[GPU], ProductDescriptions=["Windows"])
    assert windows["SpotPriceHistory"] == []
    other_type = ec2.describe_spot_price_history(
        InstanceTypes=["p2.xlarge"], AvailabilityZone="us-east-1a"
    )
    assert {h["InstanceType"] for h in other_type["SpotPriceHistory"]} == {"p2.xlarge"}


def test_capacity_loss_warns_120_seconds_before_termination(cloud: LocalCloud, ec2: Any) -> None:
    events: list[dict[str, Any]] = []
    cloud.add_target({"source": ["aws.ec2"]}, events.append)
    instance_id = launch(ec2)
    cloud.advance(600)  # the trace takes capacity away at 600 s
    kinds = [(e["detail-type"], e["detail"].get("state")) for e in events]
    assert ("EC2 Spot Instance Interruption Warning", None) in kinds
    assert cloud.instance_action(instance_id) == {
        "action": "terminate",
        "time": "2026-11-28T12:12:00Z",
    }
    state = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    assert state["State"]["Name"] == "running"
    cloud.advance(119)
    assert cloud.ec2.instance_state(instance_id) == "running"
    cloud.advance(1)
    state = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    assert state["State"]["Name"] == "terminated"
    states = [e["detail"]["state"] for e in events if "state" in e["detail"]]
    assert states == ["pending", "running", "shutting-down", "terminated"]
    warning = next(e for e in events if e["detail-type"].endswith("Interruption Warning"))
    assert warning["time"] == "2026-11-28T12:10:00Z"


def test_rebalance_recommendation_precedes_warning_when_configured(
    make_cloud: Callable[..., LocalCloud], pool_trace: Path
) -> None:
    pool = SpotPool(GPU, "us-east-1a", load_trace(pool_trace))
    cloud = make_cloud(pools=[pool], rebalance_probability=1.0)
    events: list[dict[str, Any]] = []
    cloud.add_target(
        {"detail-type": [{"prefix": "EC2 Spot"}, {"prefix": "EC2 Instance Rebalance"}]},
        events.append,
    )
    instance_id = launch(cloud.client("ec2"))
    cloud.advance(600)
    assert [e["detail-type"] for e in events] == [
        "EC2 Instance Rebalance Recommendation",
        "EC2 Spot Instance Interruption Warning",
    ]
    assert cloud.rebalance_notice(instance_id) == {"noticeTime": "2026-11-28T12:10:00Z"}


def test_price_rising_above_max_price_interrupts_spot_instance(cloud: LocalCloud, ec2: Any) -> None:
    now = cloud.clock.now()
    price = cloud.market.price(GPU, "us-east-1a", now)
    capped = {"MarketType": "spot", "SpotOptions": {"MaxPrice": f"{price + 0.01:.4f}"}}
    capped_id = launch(ec2, InstanceMarketOptions=capped)
    uncapped_id = launch(ec2)  # max price defaults to on-demand
    cloud.market.set_price(GPU, "us-east-1a", price + 0.5, at=now + 60)
    cloud.advance(60)
    capped_notice = cloud.ec2.interruption(capped_id)
    assert capped_notice is not None and capped_notice.reason == "price"
    assert cloud.ec2.interruption(uncapped_id) is None


def test_gpu_instance_types_of_the_traces_exist_and_unknown_types_fail(ec2: Any) -> None:
    known = ec2.describe_instance_types(
        InstanceTypes=["p3.2xlarge", "p3.16xlarge", "p2.xlarge", "p2.8xlarge"]
    )
    gpus = {t["InstanceType"]: t["GpuInfo"]["Gpus"][0]["Name"] for t in known["InstanceTypes"]}
    assert gpus == {
        "p3.2xlarge": "V100",
        "p3.16xlarge": "V100",
        "p2.xlarge": "K80",
        "p2.8xlarge": "K80",
    }
    for name in ("p3.16xlarge", "p2.xlarge", "p2.8xlarge"):
        assert launch(ec2, InstanceType=name).startswith("i-")
    with pytest.raises(ClientError) as exc:
        launch(ec2, InstanceType="p9.mega")
    assert error_code(exc) == "InvalidParameterValue"


def test_run_instances_with_same_client_token_returns_same_instance(ec2: Any) -> None:
    first = launch(ec2, ClientToken="job-1-attempt-1")
    again = launch(ec2, ClientToken="job-1-attempt-1")
    assert again == first
    reservations = ec2.describe_instances()["Reservations"]
    assert sum(len(r["Instances"]) for r in reservations) == 1


def test_run_instances_reusing_client_token_with_other_params_fails_with_mismatch(ec2: Any) -> None:
    launch(ec2, ClientToken="job-1-attempt-1")
    with pytest.raises(ClientError) as exc:
        launch(ec2, ClientToken="job-1-attempt-1", InstanceType="p2.xlarge")
    assert error_code(exc) == "IdempotentParameterMismatch"


def test_create_volume_with_same_client_token_is_idempotent(ec2: Any) -> None:
    first = ec2.create_volume(AvailabilityZone="us-east-1a", Size=10, ClientToken="job-1-volume")
    again = ec2.create_volume(AvailabilityZone="us-east-1a", Size=10, ClientToken="job-1-volume")
    assert again["VolumeId"] == first["VolumeId"]
    with pytest.raises(ClientError) as exc:
        ec2.create_volume(AvailabilityZone="us-east-1a", Size=20, ClientToken="job-1-volume")
    assert error_code(exc) == "IdempotentParameterMismatch"
    assert len(ec2.describe_volumes()["Volumes"]) == 1


def test_stopping_one_time_spot_instance_fails_like_aws(ec2: Any) -> None:
    instance_id = launch(ec2)
    with pytest.raises(ClientError) as exc:
        ec2.stop_instances(InstanceIds=[instance_id])
    assert error_code(exc) == "UnsupportedOperation"


def test_spot_launch_without_placement_picks_an_az_with_capacity(
    make_cloud: Callable[..., LocalCloud], tmp_path: Path, clock: Any
) -> None:
    closed = write_trace(tmp_path, "us-east-1a_v100_1.json", 600, [1])
    opened = write_trace(tmp_path, "us-east-1b_v100_1.json", 600, [0])
    cloud = make_cloud(pools=pools_from_traces([closed, opened]), unlisted_pools_available=False)
    ec2 = cloud.client("ec2")
    answer = ec2.run_instances(
        ImageId=AMI,
        MinCount=1,
        MaxCount=1,
        InstanceType=GPU,
        InstanceMarketOptions={"MarketType": "spot"},
    )
    assert answer["Instances"][0]["Placement"]["AvailabilityZone"] == "us-east-1b"


def test_non_ec2_calls_pass_through_to_moto_unchanged(cloud: LocalCloud) -> None:
    dynamodb = cloud.client("dynamodb")
    dynamodb.create_table(
        TableName="jobs",
        KeySchema=[{"AttributeName": "job_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "job_id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    dynamodb.put_item(TableName="jobs", Item={"job_id": {"S": "j-1"}, "state": {"S": "RUNNING"}})
    item = dynamodb.get_item(TableName="jobs", Key={"job_id": {"S": "j-1"}})["Item"]
    assert item["state"] == {"S": "RUNNING"}
    s3 = cloud.client("s3")
    s3.create_bucket(Bucket="results")
    s3.put_object(Bucket="results", Key="ckpt/step-1", Body=b"weights" * 1000)
    assert s3.get_object(Bucket="results", Key="ckpt/step-1")["Body"].read() == b"weights" * 1000


def test_stopping_cloud_leaves_no_thread_or_port_behind(clock: Any) -> None:
    before = set(threading.enumerate())
    with LocalCloud(clock=clock) as cloud:
        ec2 = cloud.client("ec2")
        launch(ec2, spot=False)
        ec2.describe_instances()
        ports = cloud.ports
    leftovers = [t for t in threading.enumerate() if t not in before]
    assert leftovers == []
    for port in ports:
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_launch_time_is_on_the_sandbox_clock_not_the_wall_clock(
    cloud: LocalCloud, ec2: Any
) -> None:
    cloud.clock.advance(7200)  # type: ignore[attr-defined]  # two sandbox hours on
    instance_id = launch(ec2)
    (reservation,) = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    (instance,) = reservation["Instances"]
    # The Lambdas' clock and EC2's LaunchTime agree, as in AWS: the reaper ages by it.
    assert instance["LaunchTime"].timestamp() == pytest.approx(cloud.clock.now(), abs=1.0)


def test_tags_in_instance_metadata_restrict_instance_tag_keys_like_aws(ec2: Any) -> None:
    def tags(*keys: str) -> list[dict[str, Any]]:
        return [{"ResourceType": "instance", "Tags": [{"Key": k, "Value": "v"} for k in keys]}]

    in_metadata = {"InstanceMetadataTags": "enabled"}
    for bad in ("team/owner", "has space", "_index", "..", "caf\u00e9"):
        with pytest.raises(ClientError) as exc:
            launch(ec2, spot=False, MetadataOptions=in_metadata, TagSpecifications=tags(bad))
        assert error_code(exc) == "InvalidParameterValue"
        assert f"'{bad}'" in str(exc.value)
    # The launch was refused: moto never saw it.
    assert ec2.describe_instances()["Reservations"] == []

    # spotctl's own keys comply; without tags in metadata any key goes, as in EC2.
    ours = launch(
        ec2,
        spot=False,
        MetadataOptions=in_metadata,
        TagSpecifications=tags("spotctl:job-id", "spotctl:attempt", "spotctl:batch", "Name"),
    )
    plain = launch(ec2, spot=False, TagSpecifications=tags("team/owner"))

    # Tagging an instance with tags in metadata is held to the same rule.
    with pytest.raises(ClientError) as exc:
        ec2.create_tags(Resources=[ours], Tags=[{"Key": "team/owner", "Value": "x"}])
    assert error_code(exc) == "InvalidParameterValue"
    ec2.create_tags(Resources=[ours], Tags=[{"Key": "spotctl:leave", "Value": "now"}])
    ec2.create_tags(Resources=[plain], Tags=[{"Key": "with space", "Value": "x"}])
    described = {
        i["InstanceId"]: {t["Key"] for t in i.get("Tags", [])}
        for r in ec2.describe_instances()["Reservations"]
        for i in r["Instances"]
    }
    assert "team/owner" not in described[ours]
    assert "spotctl:leave" in described[ours]
    assert {"team/owner", "with space"} <= described[plain]


def test_an_instance_s_state_reason_says_how_it_ended(cloud: LocalCloud, ec2: Any) -> None:
    """EC2 tells a reclaim, a shutdown from the instance's OS and a TerminateInstances
    apart (StateReason); moto says "user initiated" of all three."""

    def reason(instance_id: str) -> str:
        found = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
        return str(found["Instances"][0]["StateReason"]["Code"])

    reclaimed, shut, terminated = launch(ec2), launch(ec2), launch(ec2)
    assert cloud.ec2.interrupt(reclaimed)
    cloud.advance(121)  # the notice's two minutes
    cloud.ec2.note_shutdown_from_inside(shut)
    ec2.terminate_instances(InstanceIds=[shut])
    ec2.terminate_instances(InstanceIds=[terminated])
    assert cloud.ec2.instance_state(reclaimed) == "terminated"
    assert reason(reclaimed) == "Server.SpotInstanceTermination"
    assert reason(shut) == "Client.InstanceInitiatedShutdown"
    assert reason(terminated) == "Client.UserInitiatedShutdown"
