"""Faults from AWS, one test each: what EC2 and DynamoDB answer when things go wrong,
and a Lambda killed between two of its AWS calls.

Faults are injected with botocore hooks on the control plane's own clients, so the
code under test is exactly the deployed code; moto (server mode) plays AWS otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse, HTTPHeaders
from botocore.retries import standard

from chalicelib import runtime
from chalicelib.models import JobState
from chalicelib.reconcile import note_rebalance
from tests.functional.conftest import Env

HOUR = 3600.0
JOB_ID = "j-00000000000000aa"
PRICES = {
    ("g4dn.xlarge", "us-east-1a"): 0.10,
    ("g5.xlarge", "us-east-1a"): 0.20,
    ("g4dn.xlarge", "us-east-1b"): 0.30,
}


class LambdaCrash(BaseException):
    """The Lambda was killed (timeout, out of memory): no handler code survives it."""


def ec2_client() -> Any:
    return runtime.control_plane().reconciler.ec2._client


def dynamodb_client() -> Any:
    return runtime.control_plane().store._client


class Refusal(list[int]):
    """Counts the refused calls; ``stop()`` lets them through again."""

    active = True

    def stop(self) -> None:
        self.active = False


def refuse(operation: str, code: str, when: Any = lambda params: True) -> Refusal:
    """Answer ``operation`` with error ``code`` while ``when(params)``."""
    refused = Refusal()

    def handler(params: dict[str, Any], **_: Any) -> Any:
        if not refused.active or not when(params):
            return None
        refused.append(1)
        body = {"Error": {"Code": code, "Message": f"chaos: {code}"}}
        return AWSResponse("http://moto", 400, HTTPHeaders(), None), body

    ec2_client().meta.events.register(f"before-call.ec2.{operation}", handler)
    return refused


def crash_before(client: Any, event: str, times: int = 1) -> list[str]:
    """Kill the handler before its next ``times`` calls matching ``event``."""
    crashed: list[str] = []

    def handler(event_name: str, **_: Any) -> None:
        if len(crashed) < times:
            crashed.append(event_name)
            raise LambdaCrash(event_name)

    client.meta.events.register(f"before-call.{event}", handler)
    return crashed


def submit_directly(env: Env, **overrides: Any) -> str:
    """Submit through the service (the HTTP layer would turn a crash into a 502)."""
    service = runtime.control_plane().service
    service.new_id = lambda: JOB_ID
    spec = {
        "name": "resnet",
        "command": ["python", "train.py"],
        "instance_types": ["g4dn.xlarge", "g5.xlarge"],
        "volume_gib": 100,
        **overrides,
    }
    service.submit(spec)
    return JOB_ID


def running(env: Env, **overrides: Any) -> tuple[str, str, str]:
    job = env.submit(**overrides)
    first = job["attempts"][0]["instance_id"]
    env.clock.advance(60)
    env.cloud.state_change(first, "running")
    job = env.job(job["job_id"])
    assert job["state"] == "RUNNING", job["events"]
    return job["job_id"], first, job["volume"]["volume_id"]


def kinds(job: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in job["events"]]


# -- capacity and price --------------------------------------------------------------


def test_insufficient_capacity_in_every_pool_waits_then_launches_when_it_returns(
    env: Env,
) -> None:
    env.cloud.set_spot_prices(PRICES)
    refused = refuse("RunInstances", "InsufficientInstanceCapacity")
    job = env.submit()
    assert job["state"] == "WAITING"
    assert len(refused) == 2  # both pools of the volume's zone, each once
    assert env.cloud.live_instances(job["job_id"]) == []

    env.clock.advance(60)
    env.cloud.sweep()
    assert len(refused) == 2, "no retry before the wait is over"

    refused.stop()
    env.clock.advance(300)
    env.cloud.sweep()
    job = env.job(job["job_id"])
    assert job["state"] == "PROVISIONING"
    assert [a["end_reason"] for a in job["attempts"]] == ["launch-failed", None]
    assert len(env.cloud.live_instances(job["job_id"])) == 1


def spot_only(params: dict[str, Any]) -> bool:
    return bool(params["body"].get("InstanceMarketOptions.MarketType") == "spot")


def deadline_in(env: Env, hours: float) -> str:
    return datetime.fromtimestamp(env.clock.now + hours * HOUR, UTC).isoformat()


def test_a_deadline_job_refused_spot_plans_again_at_the_next_sweep_knowing_it(
    env: Env,
) -> None:
    # 1 h of slack for 10 h of work: no room to wait out an outage. Refused spot, the
    # job must not idle for the retry interval (the policy, knowing spot is out, takes
    # on-demand), nor try spot again blind.
    env.cloud.set_spot_prices(PRICES)
    refused = refuse("RunInstances", "InsufficientInstanceCapacity", when=spot_only)
    job = env.submit(expected_hours=10, deadline=deadline_in(env, 11))
    assert job["state"] == "WAITING", job["events"]
    assert refused
    tries = len(refused)

    env.clock.advance(60)
    env.cloud.sweep()
    job = env.job(job["job_id"])
    assert len(refused) == tries, "spot not tried again while its refusal is remembered"
    assert job["state"] == "PROVISIONING", job["events"]
    assert [a["market"] for a in job["attempts"]] == [None, "on-demand"]
    assert len(env.cloud.live_instances(job["job_id"])) == 1


def test_a_deadline_job_waiting_for_spot_tries_again_within_five_minutes(env: Env) -> None:
    # 20 h of slack: the policy waits for spot, long. Spot's return is learnt only by
    # trying, so the job tries again within the retry interval, not at the wait's end.
    env.cloud.set_spot_prices(PRICES)
    refused = refuse("RunInstances", "InsufficientInstanceCapacity", when=spot_only)
    job_id = env.submit(expected_hours=10, deadline=deadline_in(env, 30))["job_id"]
    env.clock.advance(60)
    env.cloud.sweep()
    job = env.job(job_id)
    assert job["state"] == "WAITING", job["events"]
    assert events_of(job, "waiting")[-1]["detail"] == "no spot now; slack allows waiting for it"
    waiting_until = datetime.fromisoformat(job["wait_until"]).timestamp()
    assert waiting_until <= env.clock.now + 300

    refused.stop()  # spot is back
    env.clock.advance(300)
    env.cloud.sweep()
    job = env.job(job_id)
    assert job["state"] == "PROVISIONING", job["events"]
    assert job["attempts"][-1]["market"] == "spot"


def events_of(job: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e for e in job["events"] if e["kind"] == kind]


def test_spot_price_above_the_cap_waits_without_launching_then_launches_under_it(
    env: Env,
) -> None:
    prices = {("g4dn.xlarge", "us-east-1a"): 0.60}
    env.cloud.set_spot_prices(prices)  # read at each call: edited below
    job = env.submit(max_price_per_hour=0.50)
    assert job["state"] == "WAITING"
    assert "price" in job["events"][-1]["detail"]  # the wording is the policy's
    assert env.cloud.instances(job["job_id"]) == []

    prices[("g4dn.xlarge", "us-east-1a")] = 0.40
    env.clock.advance(301)
    env.cloud.sweep()
    job = env.job(job["job_id"])
    assert job["state"] == "PROVISIONING"
    assert job["attempts"][-1]["max_price"] == 0.50  # the cap, never more


def test_spot_max_price_too_low_at_launch_tries_the_next_pool(env: Env) -> None:
    # The price moved between DescribeSpotPriceHistory and RunInstances.
    env.cloud.set_spot_prices(PRICES)
    refused = refuse(
        "RunInstances", "SpotMaxPriceTooLow", lambda p: p["body"]["InstanceType"] == "g4dn.xlarge"
    )
    job = env.submit()
    assert len(refused) == 1
    assert job["attempts"][0]["pool"] == "g5.xlarge@us-east-1a"
    assert "launch-refused" in kinds(job)


# -- throttling ---------------------------------------------------------------------


def test_request_limit_exceeded_is_retried_by_botocore_with_backoff(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    sends: list[float] = []
    delays: list[float] = []

    def throttle(request: Any, **_: Any) -> AWSResponse | None:
        body = request.body or b""
        if b"Action=RunInstances" not in (body.encode() if isinstance(body, str) else body):
            return None
        sends.append(time.monotonic())
        if len(sends) > 2:
            return None
        error = (
            b"<Response><Errors><Error><Code>RequestLimitExceeded</Code>"
            b"<Message>Request limit exceeded.</Message></Error></Errors></Response>"
        )
        return AWSResponse("http://moto", 503, HTTPHeaders(), _Raw(error))

    original = standard.ExponentialBackoff.delay_amount

    def spy(self: Any, context: Any) -> float:
        delay = float(original(self, context))
        delays.append(delay)
        return delay

    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", spy)
    ec2_client().meta.events.register("before-send.ec2", throttle)
    job = env.submit()
    assert job["state"] == "PROVISIONING"
    assert len(env.cloud.live_instances(job["job_id"])) == 1
    assert len(sends) == 3  # two throttled, the third went through
    assert len(delays) == 2 and all(d > 0 for d in delays)
    # botocore slept what it asked for between the sends: no tight loop.
    assert sends[2] - sends[0] >= sum(delays) * 0.9


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


# -- EBS -------------------------------------------------------------------------------


def test_volume_in_use_on_attach_defers_to_the_next_pass(env: Env) -> None:
    refused = refuse("AttachVolume", "VolumeInUse")
    job = env.submit()
    first = job["attempts"][0]["instance_id"]
    env.clock.advance(60)
    env.cloud.state_change(first, "running")
    job = env.job(job["job_id"])
    assert len(refused) == 1
    assert job["state"] == "PROVISIONING"  # nothing undone, nothing recorded as failed

    refused.stop()
    env.clock.advance(60)
    env.cloud.sweep()
    assert env.job(job["job_id"])["state"] == "RUNNING"


def test_incorrect_state_on_attach_defers_to_the_next_pass(env: Env) -> None:
    refused = refuse("AttachVolume", "IncorrectState")
    job = env.submit()
    first = job["attempts"][0]["instance_id"]
    env.cloud.state_change(first, "running")
    assert len(refused) == 1
    refused.stop()
    env.cloud.sweep()
    assert env.job(job["job_id"])["state"] == "RUNNING"


def test_deleted_volume_is_restored_from_s3_into_a_new_volume(env: Env) -> None:
    job_id, first, volume_id = running(env, results_s3_uri="s3://bucket/resnet")
    env.clock.advance(HOUR)
    env.cloud.reclaim(first)  # moto frees the volume at once
    env.ec2.delete_volume(VolumeId=volume_id)
    env.cloud.state_change(first, "terminated")
    job = env.job(job_id)
    assert "volume-lost" in kinds(job)
    assert job["volume"]["volume_id"] != volume_id
    assert job["state"] in ("RECOVERING", "PROVISIONING")
    second = job["attempts"][-1]["instance_id"]
    env.cloud.state_change(second, "running")
    job = env.job(job_id)
    assert job["state"] == "RUNNING"
    assert len(env.cloud.live_instances(job_id)) == 1


def test_a_job_synced_to_the_deployment_bucket_restores_from_it_too(env: Env) -> None:
    # No results_s3_uri: the agent syncs to the stage's bucket, which is an S3 copy too.
    job_id, first, volume_id = running(env)
    assert env.job(job_id)["results_uri"] == f"s3://spotctl-results/jobs/{job_id}"
    env.clock.advance(HOUR)
    env.cloud.reclaim(first)
    env.ec2.delete_volume(VolumeId=volume_id)
    env.cloud.state_change(first, "terminated")
    job = env.job(job_id)
    assert "volume-lost" in kinds(job), job["failure"]
    assert job["state"] in ("RECOVERING", "PROVISIONING")
    assert job["volume"]["volume_id"] != volume_id


def test_deleted_volume_without_an_s3_copy_fails_the_job(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    plane = runtime.control_plane()  # a stage without a results bucket
    monkeypatch.setattr(plane.service, "bucket", None)
    monkeypatch.setattr(plane.reconciler, "bucket", "")
    job_id, first, volume_id = running(env)
    assert env.job(job_id)["results_uri"] is None
    env.clock.advance(HOUR)
    env.cloud.reclaim(first)
    env.ec2.delete_volume(VolumeId=volume_id)
    env.cloud.state_change(first, "terminated")
    job = env.job(job_id)
    assert job["state"] == "FAILED"
    assert "no S3 copy" in job["failure"]


# -- DynamoDB ------------------------------------------------------------------------


def test_conditional_check_failure_rereads_and_keeps_both_writes(env: Env) -> None:
    job_id, first, _ = running(env)
    store = runtime.control_plane().store
    raced: list[int] = []

    def someone_else_writes_first(**_: Any) -> None:
        if not raced:
            raced.append(1)
            other = store.get(job_id)
            store.save(note_rebalance(first)(other, env.clock()))

    dynamodb_client().meta.events.register(
        "before-call.dynamodb.PutItem", someone_else_writes_first
    )
    dynamodb_client().meta.events.register(
        "before-call.dynamodb.TransactWriteItems", someone_else_writes_first
    )
    env.clock.advance(HOUR)
    env.cloud.deliver("spot-interruption-warning", first)
    job = env.job(job_id)
    assert raced
    assert "rebalance-recommendation" in kinds(job)  # the other writer's change survived
    assert "interruption-warning" in kinds(job)  # and ours was decided again on top
    assert len(job["attempts"]) == 2
    assert len(env.cloud.live_instances(job_id)) == 2  # the warned one and its replacement


# -- a Lambda killed mid-pass --------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        "ec2.CreateVolume",
        "ec2.RunInstances",
        "dynamodb.TransactWriteItems",  # RunInstances done, the record not yet written
    ],
)
def test_handler_killed_mid_pass_the_next_pass_finishes(env: Env, event: str) -> None:
    client = ec2_client() if event.startswith("ec2") else dynamodb_client()
    crashed = crash_before(client, event)
    with pytest.raises(LambdaCrash):
        submit_directly(env)
    assert crashed
    env.cloud.sweep()
    job = env.job(JOB_ID)
    assert job["state"] == "PROVISIONING", job["events"]
    live = env.cloud.live_instances(JOB_ID)
    assert len(live) == 1
    assert job["attempts"][0]["instance_id"] == live[0]["InstanceId"]
    assert len(job["attempts"]) == 1
    env.cloud.state_change(live[0]["InstanceId"], "running")
    assert env.job(JOB_ID)["state"] == "RUNNING"
    env.cloud.assert_invariants(JOB_ID)


def test_killed_after_launching_the_second_candidate_the_retry_adopts_it(env: Env) -> None:
    """The known gap: candidate 0 refused, candidate 1 launched, the Lambda dies before
    the record names the instance; by the retry candidate 0 has capacity again."""
    env.cloud.set_spot_prices(PRICES)
    refused = {"g4dn.xlarge"}
    refuse(
        "RunInstances",
        "InsufficientInstanceCapacity",
        lambda p: p["body"]["InstanceType"] in refused,
    )
    crash_before(dynamodb_client(), "dynamodb.TransactWriteItems")
    with pytest.raises(LambdaCrash):
        submit_directly(env)
    [launched] = env.cloud.live_instances(JOB_ID)
    assert launched["InstanceType"] == "g5.xlarge"

    refused.clear()  # capacity is back for candidate 0
    env.cloud.sweep()
    job = env.job(JOB_ID)
    live = env.cloud.live_instances(JOB_ID)
    assert [i["InstanceId"] for i in live] == [launched["InstanceId"]]
    assert job["attempts"][0]["instance_id"] == launched["InstanceId"]
    assert job["attempts"][0]["pool"] == "g5.xlarge@us-east-1a"
    assert "launch-adopted" in kinds(job)


def test_cancelled_after_a_killed_launch_leaves_no_unrecorded_instance(env: Env) -> None:
    crash_before(dynamodb_client(), "dynamodb.TransactWriteItems")
    with pytest.raises(LambdaCrash):
        submit_directly(env)
    assert len(env.cloud.live_instances(JOB_ID)) == 1
    response = env.client.http.delete(f"/jobs/{JOB_ID}")
    assert response.status_code == 200, response.body
    env.cloud.sweep()
    assert env.job(JOB_ID)["state"] == "CANCELLED"
    assert env.cloud.live_instances(JOB_ID) == []


def test_waiting_job_is_not_launched_twice_by_overlapping_sweeps(env: Env) -> None:
    env.cloud.set_spot_prices(PRICES)
    refuse("RunInstances", "InsufficientInstanceCapacity")
    job = env.submit()
    env.clock.advance(10)
    env.cloud.sweep()
    env.cloud.sweep()
    assert env.job(job["job_id"])["state"] == JobState.WAITING.value
    assert len(env.job(job["job_id"])["attempts"]) == 1
