"""The control plane against moto in server mode (real HTTP on loopback).

Each test gets a fresh moto state, the jobs table, a settable clock, and helpers
that play the parts AWS plays: deliver events in the documented shapes, and take
instances away.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from botocore.awsrequest import AWSResponse, HTTPHeaders
from chalice.config import Config as ChaliceConfig
from chalice.local import ChaliceRequestHandler, LocalChalice, LocalDevServer
from chalice.test import Client
from moto.server import ThreadedMotoServer

from chalicelib import policy, runtime
from chalicelib.agent_auth import derive_secret
from chalicelib.store import create_table

EVENTS = Path(__file__).parent.parent / "fixtures" / "aws-events"
SIGNING_KEY = "test-signing-key"
TOKEN = "test-token-5f0c1e2d3b4a59687766554433221100"  # the API's, where it is served
TABLE = "spotctl-test-jobs"


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    # moto's catalogue of public AMIs takes seconds to load on every reset; our
    # instances only need an image id that moto accepts.
    os.environ["MOTO_EC2_LOAD_DEFAULT_AMIS"] = "false"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass
class Clock:
    now: float = 1_790_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def load_event(name: str, instance_id: str, **detail: str) -> dict[str, Any]:
    """A documented event with only the instance id (and given detail fields) changed."""
    event: dict[str, Any] = copy.deepcopy(json.loads((EVENTS / f"{name}.json").read_text()))
    event["detail"]["instance-id"] = instance_id
    event["detail"].update(detail)
    arn = event["resources"][-1].rsplit("/", 1)[0]
    event["resources"][-1] = f"{arn}/{instance_id}"
    event["region"] = "us-east-1"
    return event


class Cloud:
    """What AWS does on its own, and what the tests check about EC2's state."""

    def __init__(self, ec2: Any, client: Client) -> None:
        self.ec2 = ec2
        self.client = client

    def deliver(self, name: str, instance_id: str, **detail: str) -> None:
        handler = {
            "spot-interruption-warning": "on_interruption_warning",
            "rebalance-recommendation": "on_rebalance_recommendation",
        }.get(name, "on_instance_state_change")
        self.client.lambda_.invoke(handler, load_event(name, instance_id, **detail))

    def state_change(self, instance_id: str, state: str) -> None:
        self.deliver(f"state-change-{state}", instance_id)

    def reclaim(self, instance_id: str) -> None:
        """EC2 takes the instance back (moto frees its volume at once)."""
        self.ec2.terminate_instances(InstanceIds=[instance_id])

    def sweep(self) -> None:
        event = self.client.events.generate_cw_event(
            source="aws.events",
            detail_type="Scheduled Event",
            detail={},
            resources=["arn:aws:events:us-east-1:123456789012:rule/spotctl-dev-sweep"],
            region="us-east-1",
        )
        self.client.lambda_.invoke("sweep", event)

    def set_spot_prices(self, prices: dict[tuple[str, str], float]) -> None:
        """Answer DescribeSpotPriceHistory with these (type, zone) prices; moto has one
        constant price for everything, which would make every choice a tie."""

        def handler(params: dict[str, Any], **_: Any) -> Any:
            body = params["body"]  # the serialized query: InstanceType.1, ...
            types = [v for k, v in body.items() if k.startswith("InstanceType.")]
            zone = body.get("AvailabilityZone")
            history = [
                {
                    "InstanceType": t,
                    "AvailabilityZone": z,
                    "ProductDescription": "Linux/UNIX",
                    "SpotPrice": f"{price:.6f}",
                    "Timestamp": datetime(2026, 1, 1, tzinfo=UTC),
                }
                for (t, z), price in prices.items()
                if t in types and zone in (None, z)
            ]
            return AWSResponse("http://moto", 200, HTTPHeaders(), None), {
                "SpotPriceHistory": history
            }

        client = runtime.control_plane().reconciler.ec2._client
        client.meta.events.register("before-call.ec2.DescribeSpotPriceHistory", handler)

    def instances(self, job_id: str) -> list[dict[str, Any]]:
        pages = self.ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "tag:spotctl:job-id", "Values": [job_id]}]
        )
        return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]

    def live_instances(self, job_id: str) -> list[dict[str, Any]]:
        return [
            i
            for i in self.instances(job_id)
            if i["State"]["Name"] not in ("terminated", "shutting-down")
        ]

    def volumes(self) -> list[dict[str, Any]]:
        return list(self.ec2.describe_volumes()["Volumes"])

    def assert_invariants(self, job_id: str) -> None:
        """What real AWS enforces and moto does not, checked after every step."""
        by_id = {i["InstanceId"]: i for i in self.instances(job_id)}
        for volume in self.volumes():
            attached = [a for a in volume["Attachments"] if a["State"] != "detached"]
            assert len(attached) <= 1, f"{volume['VolumeId']} attached twice: {attached}"
            for attachment in attached:
                instance = by_id.get(attachment["InstanceId"])
                if instance is not None:
                    zone = instance["Placement"]["AvailabilityZone"]
                    assert zone == volume["AvailabilityZone"], "attached across zones"
        unwarned_live = len(self.live_instances(job_id))
        assert unwarned_live <= 2, "more than the instance and its replacement"


@dataclass
class Env:
    client: Client
    cloud: Cloud
    clock: Clock
    ec2: Any

    def submit(self, **overrides: Any) -> dict[str, Any]:
        spec = {
            "name": "resnet",
            "command": ["python", "train.py", "--epochs", "90"],
            "instance_types": ["g4dn.xlarge", "g5.xlarge"],
            "volume_gib": 100,
            **overrides,
        }
        response = self.client.http.post(
            "/jobs", headers={"content-type": "application/json"}, body=json.dumps(spec)
        )
        assert response.status_code == 201, response.body
        job: dict[str, Any] = json.loads(response.body)
        return job

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.client.http.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.body
        job: dict[str, Any] = json.loads(response.body)
        return job

    def report(self, job_id: str, body: dict[str, Any], secret: str | None = None) -> Any:
        secret = derive_secret(SIGNING_KEY, job_id) if secret is None else secret
        return self.client.http.post(
            f"/jobs/{job_id}/reports",
            headers={"content-type": "application/json", "authorization": f"Bearer {secret}"},
            body=json.dumps(body),
        )


@pytest.fixture
def env(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    requests.post(f"{moto_url}/moto-api/reset", timeout=10)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_url)
    ami = ec2.register_image(Name="spotctl-test-dlami")["ImageId"]
    for key, value in {
        "SPOTCTL_TABLE": TABLE,
        "SPOTCTL_SIGNING_KEY": SIGNING_KEY,
        "SPOTCTL_AMI_ID": ami,
        "SPOTCTL_API_URL": "http://127.0.0.1:9/api",
        "SPOTCTL_BUCKET": "spotctl-results",
        # The user routes' credentials are tested in test_auth.py; elsewhere they
        # would only add a header to every call.
        "SPOTCTL_AUTH": "none",
    }.items():
        monkeypatch.setenv(key, value)
    runtime.reset()
    create_table(boto3.client("dynamodb", region_name="us-east-1"), TABLE)
    clock = Clock()
    plane = runtime.control_plane()
    plane.reconciler.clock = clock
    plane.service.clock = clock
    from app import app

    with Client(app) as client:
        yield Env(client, Cloud(ec2, client), clock, ec2)
    runtime.reset()


@pytest.fixture
def policy_views(monkeypatch: pytest.MonkeyPatch) -> list[policy.PlacementView]:
    """Every view the Lambda asks the placement policy to decide on, in order."""
    seen: list[policy.PlacementView] = []
    decide = policy.decide_placement

    def spy(view: policy.PlacementView, now: float, *args: Any) -> policy.Placement:
        seen.append(view)
        return decide(view, now, *args)

    monkeypatch.setattr(policy, "decide_placement", spy)
    return seen


class QuietHandler(ChaliceRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def api_url(env: Env) -> Iterator[str]:
    """The app over real HTTP (Chalice's local server), with bearer TOKEN required."""
    from app import app

    plane = runtime.control_plane()
    plane.config = dataclasses.replace(plane.config, auth="token", api_token=TOKEN)
    if not isinstance(app, LocalChalice):
        # What chalice.local.create_local_server does: per-thread current_request.
        app.__class__ = type("ServedChalice", (LocalChalice, type(app)), {})
    config = ChaliceConfig.create(chalice_stage="dev", app_name="spotctl")
    server = LocalDevServer(app, config, "127.0.0.1", 0, handler_cls=QuietHandler)
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server.server_address[:2]
    yield f"http://{host}:{port}"
    server.server.shutdown()
    thread.join()
    server.server.server_close()
