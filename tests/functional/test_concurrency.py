"""Two Lambdas working on one job at the same moment.

Each "Lambda" is a control plane built with its own boto3 clients (as two containers
would have), against the sandbox's LocalCloud (moto behind the EC2 fidelity proxy,
which keeps RunInstances ClientTokens idempotent as EC2 does). A barrier on each one's
first DynamoDB write makes both read the same version before either writes.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from chalicelib import clients, runtime
from chalicelib.config import Config
from chalicelib.errors import ConcurrentUpdate, InsufficientCapacity, VolumeClaimed
from chalicelib.models import Job
from chalicelib.reconcile import note_warning
from chalicelib.runtime import ControlPlane
from chalicelib.store import create_table
from spotctl.sandbox.clock import FakeClock
from spotctl.sandbox.cloud import FAKE_CREDENTIALS, LocalCloud

TABLE = "spotctl-concurrency"
SPEC = {
    "name": "resnet",
    "command": ["python", "train.py"],
    "instance_types": ["g4dn.xlarge"],
    "availability_zones": ["us-east-1a"],
    "volume_gib": 10,
}


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalCloud]:
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    with LocalCloud(clock=FakeClock(1_790_000_000.0), region="us-east-1") as local:
        for name, value in local.env().items():
            monkeypatch.setenv(name, value)
        ami = local.client("ec2").register_image(Name="spotctl-test")["ImageId"]
        for name, value in {
            "SPOTCTL_TABLE": TABLE,
            "SPOTCTL_SIGNING_KEY": "test-key",
            "SPOTCTL_AMI_ID": ami,
            "SPOTCTL_API_URL": "http://127.0.0.1:9",
            "POWERTOOLS_METRICS_DISABLED": "true",
        }.items():
            monkeypatch.setenv(name, value)
        create_table(local.client("dynamodb"), TABLE)
        yield local
    runtime.reset()


def lambda_container(cloud: LocalCloud) -> ControlPlane:
    """A control plane with clients of its own, as a separate Lambda container has."""
    clients.reset()
    plane = runtime.build(Config.from_env(os.environ))  # type: ignore[arg-type]
    plane.reconciler.clock = cloud.clock.now
    plane.service.clock = cloud.clock.now
    return plane


def both_at_once(
    first: ControlPlane, second: ControlPlane, work: Callable[[ControlPlane], Job]
) -> int:
    """Run ``work`` on both planes in threads, each waiting for the other before its
    first write; returns how many writes lost the race (ConcurrentUpdate)."""
    barrier = threading.Barrier(2, timeout=20)
    lost: list[int] = []

    def hold_first_write() -> Callable[..., None]:
        held: list[int] = []

        def hold(**_: Any) -> None:
            if not held:
                held.append(1)
                with contextlib.suppress(threading.BrokenBarrierError):
                    barrier.wait()  # broken: the other one had nothing to write

        return hold

    for plane in (first, second):
        hold = hold_first_write()
        for operation in ("PutItem", "TransactWriteItems"):
            plane.store._client.meta.events.register(f"before-call.dynamodb.{operation}", hold)
        plane.store.save = _counting(plane.store.save, lost)  # type: ignore[method-assign]
    results: list[Job] = []
    errors: list[BaseException] = []

    def run(plane: ControlPlane) -> None:
        try:
            results.append(work(plane))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(results) == 2
    return len(lost)


def _counting(save: Callable[..., Job], lost: list[int]) -> Callable[..., Job]:
    def counted(*args: Any, **kwargs: Any) -> Job:
        try:
            return save(*args, **kwargs)
        except ConcurrentUpdate:
            lost.append(1)
            raise

    return counted


def live_instances(cloud: LocalCloud, job_id: str) -> list[str]:
    ec2 = cloud.client("ec2")
    reservations = ec2.describe_instances(
        Filters=[
            {"Name": "tag:spotctl:job-id", "Values": [job_id]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ]
    )["Reservations"]
    return sorted(i["InstanceId"] for r in reservations for i in r["Instances"])


def test_two_handlers_on_one_warning_launch_one_replacement(cloud: LocalCloud) -> None:
    a = lambda_container(cloud)
    job = a.service.submit(SPEC)
    first = job.attempts[0].instance_id
    assert first is not None
    cloud.advance(60)
    assert a.reconciler.reconcile(job.job_id).state.value == "RUNNING"

    b = lambda_container(cloud)
    cloud.clock.set(cloud.clock.now() + 3600)  # type: ignore[attr-defined]
    lost = both_at_once(
        a, b, lambda plane: plane.reconciler.reconcile(job.job_id, note_warning(first))
    )
    assert lost >= 1  # the loser re-read and decided again instead of launching blind

    stored = a.store.get(job.job_id)
    assert len(stored.attempts) == 2, [e.kind for e in stored.timeline]
    second = stored.attempts[1].instance_id
    assert second is not None
    assert live_instances(cloud, job.job_id) == sorted([first, second])
    assert sum(e.kind == "interruption-warning" for e in stored.timeline) == 1


def test_two_sweeps_replaying_one_written_ahead_launch_start_one_instance(
    cloud: LocalCloud,
) -> None:
    a = lambda_container(cloud)
    # Written ahead, then the Lambda died before RunInstances: the sweep must finish it.
    a.reconciler.launch_settings = _dies(a.reconciler.launch_settings)
    a.service.new_id = lambda: "j-00000000000000bb"
    job = a.service.submit(SPEC)  # the first pass fails after the write-ahead
    assert job.attempts and job.attempts[0].instance_id is None

    a = lambda_container(cloud)
    b = lambda_container(cloud)
    assert both_at_once(a, b, lambda plane: plane.reconciler.reconcile(job.job_id)) >= 1

    stored = a.store.get(job.job_id)
    assert len(stored.attempts) == 1
    assert stored.attempts[0].instance_id is not None
    assert live_instances(cloud, job.job_id) == [stored.attempts[0].instance_id]


def _dies(settings: Callable[[], Any]) -> Callable[[], Any]:
    def dead() -> Any:
        raise RuntimeError("the Lambda timed out")

    return dead


def test_two_sweeps_launching_different_candidates_keep_only_the_recorded_one(
    cloud: LocalCloud,
) -> None:
    """One pass gets the first candidate; the other, refused there, starts the second.
    The write that loses must not leave its instance running with no record naming it."""
    a = lambda_container(cloud)
    a.reconciler.launch_settings = _dies(a.reconciler.launch_settings)
    a.service.new_id = lambda: "j-00000000000000cc"
    job = a.service.submit({**SPEC, "instance_types": ["g4dn.xlarge", "m5.large"]})
    (attempt,) = job.attempts
    assert attempt.instance_id is None
    first, second = (c.pool.instance_type for c in attempt.candidates[:2])
    assert first != second

    a = lambda_container(cloud)
    b = lambda_container(cloud)
    # Both look for an earlier launch (none) before either starts one: a just before
    # its RunInstances, b in the request EC2 refuses.
    launching = threading.Barrier(2, timeout=20)
    held: list[int] = []

    def hold(**_: Any) -> None:
        if not held:
            held.append(1)
            launching.wait()

    a.reconciler.ec2._client.meta.events.register("before-call.ec2.RunInstances", hold)
    run_instance = b.reconciler.ec2.run_instance

    def refused_on_the_first(candidate: Any, *args: Any, **kwargs: Any) -> str:
        if candidate.pool.instance_type == first:
            launching.wait()
            raise InsufficientCapacity("InsufficientInstanceCapacity: none left")
        return run_instance(candidate, *args, **kwargs)

    b.reconciler.ec2.run_instance = refused_on_the_first  # type: ignore[method-assign]

    assert both_at_once(a, b, lambda plane: plane.reconciler.reconcile(job.job_id)) >= 1

    stored = a.store.get(job.job_id)
    (attempt,) = stored.attempts
    assert attempt.instance_id is not None
    assert live_instances(cloud, job.job_id) == [attempt.instance_id]
    ended = cloud.client("ec2").describe_instances(
        Filters=[
            {"Name": "tag:spotctl:job-id", "Values": [job.job_id]},
            {"Name": "instance-state-name", "Values": ["shutting-down", "terminated"]},
        ]
    )["Reservations"]
    assert len([i for r in ended for i in r["Instances"]]) == 1, "both candidates started"


def submits_first(
    a: ControlPlane,
    spec: dict[str, Any],
    b: ControlPlane,
    events: tuple[str, ...],
    when: Callable[[dict[str, Any]], bool] = lambda params: True,
) -> list[Job]:
    """Make ``a`` submit ``spec`` once, just before ``b``'s first DynamoDB call on one of
    ``events`` (botocore event names) that ``when`` picks by its parameters: an
    interleaving of two submissions that no timing could promise. Its job, once made."""
    first: list[Job] = []

    def hook(params: dict[str, Any], **_: Any) -> None:
        if not first and when(params):
            first.append(a.service.submit(spec))

    for event in events:
        b.store._client.meta.events.register(event, hook)
    return first


def test_two_submissions_of_one_volume_at_once_start_one_job(cloud: LocalCloud) -> None:
    """The second submission read the volume as free just before the first claimed it:
    its write must fail on DynamoDB's condition, not give the volume to two jobs."""
    volume = cloud.client("ec2").create_volume(AvailabilityZone="us-east-1a", Size=10)
    spec = {**{k: v for k, v in SPEC.items() if k != "volume_gib"}, "volume_id": volume["VolumeId"]}
    a = lambda_container(cloud)
    b = lambda_container(cloud)
    first = submits_first(a, spec, b, ("before-call.dynamodb.TransactWriteItems",))
    with pytest.raises(VolumeClaimed) as refused:
        b.service.submit(spec)
    (job,) = first
    assert f"is the data volume of job {job.job_id}" in str(refused.value)
    jobs, _ = a.store.page(None, 10, None)
    assert [j.job_id for j in jobs] == [job.job_id]
    assert a.store.get(job.job_id).volume is not None


def test_a_submission_and_its_resend_at_once_make_one_job(cloud: LocalCloud) -> None:
    """The resend found no job for its token, then the first submission stored one:
    the resend's write fails on the token's condition and answers with that job."""
    spec = {**SPEC, "client_token": "resent-4c1d"}
    a = lambda_container(cloud)
    b = lambda_container(cloud)
    writes = ("before-call.dynamodb.PutItem", "before-call.dynamodb.TransactWriteItems")
    first = submits_first(a, spec, b, writes)
    resent = b.service.submit(spec)
    (job,) = first
    assert resent.job_id == job.job_id
    jobs, _ = a.store.page(None, 10, None)
    assert [j.job_id for j in jobs] == [job.job_id]
    assert live_instances(cloud, job.job_id) == [job.attempts[0].instance_id]


def test_a_resend_that_finds_its_own_volume_claim_answers_with_its_job(
    cloud: LocalCloud,
) -> None:
    """The first submission stored its job (and the volume's claim) after the resend
    looked for its token, before it read the claim: the holder is its own job."""
    volume = cloud.client("ec2").create_volume(AvailabilityZone="us-east-1a", Size=10)
    spec = {
        **{k: v for k, v in SPEC.items() if k != "volume_gib"},
        "volume_id": volume["VolumeId"],
        "client_token": "resent-77aa",
    }
    a = lambda_container(cloud)
    b = lambda_container(cloud)

    def reads_the_claim(params: dict[str, Any]) -> bool:
        return bool(params["Key"]["pk"]["S"].startswith("VOLUME#"))

    reads = ("before-parameter-build.dynamodb.GetItem",)
    first = submits_first(a, spec, b, reads, reads_the_claim)
    resent = b.service.submit(spec)
    (job,) = first
    assert resent.job_id == job.job_id
    jobs, _ = a.store.page(None, 10, None)
    assert [j.job_id for j in jobs] == [job.job_id]
