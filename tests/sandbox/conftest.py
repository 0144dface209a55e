"""Fixtures for the sandbox tests: a fresh LocalCloud on a FakeClock per test."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spotctl.sandbox import FakeClock, LocalCloud, SpotPool, load_trace

AMI = "ami-12345678"
GPU = "p3.2xlarge"


@pytest.fixture(autouse=True)
def fake_aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def write_trace(directory: Path, name: str, gap: int, data: list[int]) -> Path:
    """A trace file in the real format (1 = no spot capacity in that tick)."""
    path = directory / name
    path.write_text(json.dumps({"metadata": {"gap_seconds": gap}, "data": data}))
    return path


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_cloud(clock: FakeClock) -> Iterator[Callable[..., LocalCloud]]:
    started: list[LocalCloud] = []

    def make(**options: Any) -> LocalCloud:
        options.setdefault("clock", clock)
        cloud = LocalCloud(**options)
        cloud.start()
        started.append(cloud)
        return cloud

    yield make
    for cloud in started:
        cloud.stop()


@pytest.fixture
def pool_trace(tmp_path: Path) -> Path:
    """us-east-1a p3.2xlarge: capacity for 10 min, none for the next 10 min, then back."""
    return write_trace(tmp_path, "us-east-1a_v100_1.json", 600, [0, 1, 0, 0])


@pytest.fixture
def cloud(make_cloud: Callable[..., LocalCloud], pool_trace: Path) -> LocalCloud:
    pool = SpotPool(GPU, "us-east-1a", load_trace(pool_trace))
    return make_cloud(pools=[pool], rebalance_probability=0.0, detach_seconds=30.0)


@pytest.fixture
def ec2(cloud: LocalCloud) -> Any:
    return cloud.client("ec2")


def launch(ec2: Any, az: str = "us-east-1a", spot: bool = True, **extra: Any) -> str:
    args: dict[str, Any] = {
        "ImageId": AMI,
        "MinCount": 1,
        "MaxCount": 1,
        "InstanceType": GPU,
        "Placement": {"AvailabilityZone": az},
        **extra,
    }
    if spot:
        args.setdefault("InstanceMarketOptions", {"MarketType": "spot"})
    answer = ec2.run_instances(**args)
    return str(answer["Instances"][0]["InstanceId"])


def volume_in(ec2: Any, az: str = "us-east-1a") -> str:
    return str(ec2.create_volume(AvailabilityZone=az, Size=10)["VolumeId"])


def trace_dir() -> Path:
    """The project's copy of the public traces if present, else the shared one."""
    root = Path(__file__).resolve().parents[2]
    for candidate in (root / "traces", root.parent / "shared" / "traces"):
        if (candidate / "aws-10-26-2022").is_dir():
            return candidate
    pytest.skip("no availability traces on this machine")
