"""The sweep observes all live jobs with a constant number of describe calls.

``Reconciler.sweep`` makes one paginated DescribeInstances and one DescribeVolumes for
however many jobs it visits, then decides each job on its slice of that observation.
These tests hold it to the per-job path: the same observation for every job, the same
outcome after every sweep, and two describe calls where the per-job path makes 2 per job.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from chalicelib import runtime
from chalicelib.reconcile import Reconciler
from tests.functional.conftest import Env

SITUATIONS = ("running", "reclaimed", "stopped", "provisioning")


@pytest.fixture
def ec2_calls(env: Env) -> Iterator[Counter[str]]:
    """EC2 operations the control plane's client sends, counted by a botocore hook."""
    counts: Counter[str] = Counter()

    def count(event_name: str, **_: Any) -> None:
        counts[event_name.rsplit(".", 1)[-1]] += 1

    client = runtime.control_plane().reconciler.ec2._client
    client.meta.events.register("before-call.ec2", count)
    yield counts
    client.meta.events.unregister("before-call.ec2", count)


def job_in(env: Env, situation: str) -> str:
    """A job in ``situation``, as the sweep will find it (no event tells it more)."""
    job = env.submit()
    job_id: str = job["job_id"]
    instance_id = job["attempts"][0]["instance_id"]
    if situation == "provisioning":
        return job_id  # running in EC2, its volume not yet attached: the sweep attaches it
    env.cloud.state_change(instance_id, "running")
    assert env.job(job_id)["state"] == "RUNNING"
    if situation == "reclaimed":
        env.cloud.reclaim(instance_id)
    elif situation == "stopped":
        env.ec2.stop_instances(InstanceIds=[instance_id])
    return job_id


def outcome(env: Env, job_id: str) -> tuple[Any, ...]:
    """What a sweep did to a job, without the ids that differ from job to job."""
    job = env.job(job_id)
    live = env.cloud.live_instances(job_id)
    current = job["attempts"][-1]["instance_id"] if job["attempts"] else None
    volume = env.ec2.describe_volumes(VolumeIds=[job["volume"]["volume_id"]])["Volumes"][0]
    attached = [a["InstanceId"] for a in volume["Attachments"] if a["State"] != "detached"]
    return (
        job["state"],
        [(a["end_reason"], a["instance_id"] is not None) for a in job["attempts"]],
        [e["kind"] for e in job["events"]],
        len(live),
        attached == [current],
    )


def per_job(reconciler: Reconciler) -> Callable[[list[str]], None]:
    def sweep(job_ids: list[str]) -> None:
        for job_id in job_ids:
            reconciler.reconcile(job_id)

    return sweep


def test_each_job_is_observed_by_the_sweep_as_by_its_own_pass(env: Env) -> None:
    jobs = [job_in(env, situation) for situation in SITUATIONS * 2]
    reconciler = runtime.control_plane().reconciler
    stored = [reconciler.store.get(job_id) for job_id in jobs]
    observation = reconciler._observe_many(stored)
    for job in stored:
        assert observation.slice(job) == reconciler._observe(job), job.job_id


@pytest.mark.parametrize("jobs_per_situation", [1, 4])
def test_sweep_over_n_jobs_makes_two_describe_calls(
    env: Env, ec2_calls: Counter[str], jobs_per_situation: int
) -> None:
    jobs = [job_in(env, s) for s in SITUATIONS for _ in range(jobs_per_situation)]
    reconciler = runtime.control_plane().reconciler
    ec2_calls.clear()
    read = [reconciler.store.get(job_id) for job_id in jobs]
    outcome_of_sweep = reconciler.sweep(jobs)
    assert outcome_of_sweep[:2] == (len(jobs), 0)
    # What the records it read name: the sweep's reaper leaves these alone unread.
    assert outcome_of_sweep.named == {a.instance_id for j in read for a in j.attempts} - {None}
    assert ec2_calls["DescribeInstances"] == 1
    assert ec2_calls["DescribeVolumes"] == 1
    zones = {reconciler.store.get(job_id).volume.az for job_id in jobs}  # type: ignore[union-attr]
    assert ec2_calls["DescribeSpotPriceHistory"] <= len(zones)
    # The work itself is per job: a replacement for each reclaimed or stopped job.
    assert ec2_calls["RunInstances"] == 2 * jobs_per_situation

    ec2_calls.clear()
    per_job(reconciler)(jobs)
    assert ec2_calls["DescribeInstances"] == len(jobs)
    assert ec2_calls["DescribeVolumes"] == len(jobs)


def test_sweep_outcomes_equal_the_per_job_path(env: Env) -> None:
    reconciler = runtime.control_plane().reconciler
    twins = [(job_in(env, s), job_in(env, s)) for s in SITUATIONS for _ in range(2)]
    one_by_one = per_job(reconciler)
    for _ in range(3):  # replace, then attach, then nothing left to do
        env.clock.advance(60)
        one_by_one([a for a, _ in twins])
        assert reconciler.sweep([b for _, b in twins]).failed == 0
        for a, b in twins:
            assert outcome(env, a) == outcome(env, b)
    for _, b in twins:
        state, _, _, live, attached = outcome(env, b)
        assert (state, live, attached) == ("RUNNING", 1, True)


def test_a_job_written_during_the_sweep_is_reconciled_on_its_own(
    env: Env, ec2_calls: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [job_in(env, "reclaimed") for _ in range(3)]
    reconciler = runtime.control_plane().reconciler
    store = reconciler.store
    raced = jobs[1]
    real_get = store.get

    def get_then_an_event_writes(job_id: str) -> Any:
        job = real_get(job_id)
        if job_id == raced:
            # An event's pass writes the job after the sweep read it.
            store.save(job.with_event(job.updated_at, "raced", "by a test"))
            monkeypatch.setattr(store, "get", real_get)
        return job

    monkeypatch.setattr(store, "get", get_then_an_event_writes)
    ec2_calls.clear()
    assert reconciler.sweep(jobs)[:2] == (3, 0)
    # The raced job's conditional write failed; its own pass observed it (2 more describes).
    assert ec2_calls["DescribeInstances"] == 2
    assert ec2_calls["DescribeVolumes"] == 2
    assert ec2_calls["RunInstances"] == 3
    for job_id in jobs:
        job = store.get(job_id)
        assert job.state.value == "RECOVERING"
        assert len([a for a in job.attempts if a.instance_id and not a.ended]) == 1


def test_a_long_sweep_looks_again_before_acting_on_an_old_observation(
    env: Env, ec2_calls: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [job_in(env, "running") for _ in range(3)]
    reconciler = runtime.control_plane().reconciler
    real_pass = reconciler._pass_on

    def slow_pass(*args: Any, **kwargs: Any) -> Any:
        job = real_pass(*args, **kwargs)
        env.clock.advance(31)  # throttled calls backing off, say
        return job

    monkeypatch.setattr(reconciler, "_pass_on", slow_pass)
    ec2_calls.clear()
    assert reconciler.sweep(jobs)[:2] == (3, 0)
    # The first observation, then one for the two jobs left, then one for the last.
    assert ec2_calls["DescribeInstances"] == 3
    assert ec2_calls["DescribeVolumes"] == 3
