"""Interruption storms: many warnings recovered with one RunInstances per pool
(chalicelib.batch), against moto in server mode, with the one-job path beside it."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import boto3

from chalicelib import runtime
from chalicelib.batch import BatchRecovery, recovery_for
from chalicelib.store import TTL_ATTRIBUTE
from tests.functional.conftest import TABLE, Env

ZONE = "us-east-1a"


def running_jobs(env: Env, count: int) -> dict[str, str]:
    """``count`` jobs running in one pool: job id -> instance id."""
    env.cloud.set_spot_prices({("g4dn.xlarge", ZONE): 0.2})
    jobs = {}
    for n in range(count):
        job = env.submit(
            name=f"storm-{n}", instance_types=["g4dn.xlarge"], availability_zones=[ZONE]
        )
        jobs[job["job_id"]] = job["attempts"][0]["instance_id"]
    env.clock.advance(60)
    for instance_id in jobs.values():
        env.cloud.state_change(instance_id, "running")
    assert {env.job(j)["state"] for j in jobs} == {"RUNNING"}
    return jobs


def recovery() -> BatchRecovery:
    plane = runtime.control_plane()

    def as_ec2_does(params: dict[str, Any], **_: Any) -> None:
        # EC2 starts up to MaxCount when it has the capacity; moto starts MinCount.
        params["MinCount"] = params["MaxCount"]

    client = plane.reconciler.ec2._client
    client.meta.events.register("provide-client-params.ec2.RunInstances", as_ec2_does)
    return recovery_for(plane)


def run_instances_counter(env: Env) -> Counter[str]:
    seen: Counter[str] = Counter()

    def count(params: dict[str, Any], **_: Any) -> None:
        seen[str(params["body"].get("MaxCount"))] += 1

    client = runtime.control_plane().reconciler.ec2._client
    client.meta.events.register("before-call.ec2.RunInstances", count)
    return seen


def test_batch_of_warnings_in_one_pool_launches_once_and_every_job_recovers(env: Env) -> None:
    jobs = running_jobs(env, 6)
    calls = run_instances_counter(env)
    env.clock.advance(30)

    outcome = recovery().recover(list(jobs.values()))

    assert calls == Counter({"6": 1}), "one RunInstances for the whole pool"
    assert set(outcome.launched) == set(jobs)
    assert not outcome.surplus and not outcome.retry and not outcome.one_by_one
    store = runtime.control_plane().store
    for job_id, old in jobs.items():
        new = outcome.launched[job_id]
        job = env.job(job_id)
        assert [a["instance_id"] for a in job["attempts"]] == [old, new]
        assert job["state"] == "RECOVERING"
        assert store.job_id_for_instance(new) == job_id
        # The rest is the usual loop: the old instance goes, the volume moves over.
        env.cloud.reclaim(old)
        env.cloud.state_change(old, "terminated")
        env.cloud.state_change(new, "running")
        assert env.job(job_id)["state"] == "RUNNING"
        env.cloud.assert_invariants(job_id)


def test_retried_delivery_gives_no_job_a_second_replacement(env: Env) -> None:
    jobs = running_jobs(env, 4)
    batch = recovery()
    first = batch.recover(list(jobs.values()))
    again = batch.recover(list(jobs.values()))

    for job_id in jobs:
        attempts = env.job(job_id)["attempts"]
        assert len(attempts) == 2
        assert attempts[1]["instance_id"] == first.launched[job_id]
    live = {
        i["InstanceId"]
        for r in env.ec2.describe_instances()["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] == "running"
    }
    assert live == set(jobs.values()) | set(first.launched.values()), "one replacement per job"
    # moto ignores ClientToken; whatever a replay launched went to no job and is gone.
    assert not set(again.launched.values()) - set(first.launched.values())
    for instance_id in again.surplus:
        state = env.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
        assert state["Instances"][0]["State"]["Name"] in ("shutting-down", "terminated")


def test_job_replaced_one_by_one_first_is_left_alone_by_the_batch(env: Env) -> None:
    jobs = running_jobs(env, 3)
    early, early_instance = next(iter(jobs.items()))
    env.cloud.deliver("spot-interruption-warning", early_instance)
    replacement = env.job(early)["attempts"][1]["instance_id"]

    outcome = recovery().recover(list(jobs.values()))

    assert outcome.already_replaced == [early]
    assert early not in outcome.launched and early not in outcome.one_by_one
    assert [a["instance_id"] for a in env.job(early)["attempts"]][1:] == [replacement]
    assert len(outcome.launched) == 2
    assert not outcome.surplus


def test_warning_for_an_instance_that_is_not_ours_is_ignored(env: Env) -> None:
    outcome = recovery().recover(["i-0123456789abcdef0"])
    assert outcome.launched == {} and outcome.one_by_one == [] and outcome.run_instances_calls == 0


def test_reap_terminates_only_batch_instances_no_job_took(env: Env) -> None:
    jobs = running_jobs(env, 2)
    batch = recovery()
    outcome = batch.recover(list(jobs.values()))
    # A handler that died after RunInstances: its instances are in no job's index.
    settings = runtime.control_plane().reconciler.launch_settings()
    candidate = next(iter(runtime.control_plane().store.get(next(iter(jobs))).attempts))
    orphans = runtime.control_plane().reconciler.ec2.run_instances(
        candidate.candidates[0],
        settings,
        "#!/bin/bash\n",
        {"spotctl:job-id": "spotctl-b-x", "spotctl:batch": "spotctl-b-x"},
        count=2,
        client_token="spotctl-b-x",
    )

    env.clock.now = time.time()  # moto stamps LaunchTime with the wall clock
    reconciler = runtime.control_plane().reconciler
    assert reconciler.reap_unrecorded() == [], "too young to be an orphan"
    env.clock.now = time.time() + 3600
    reaped = reconciler.reap_unrecorded()

    assert sorted(reaped) == sorted(orphans)
    kept = set(outcome.launched.values())
    states = {
        i["InstanceId"]: i["State"]["Name"]
        for r in env.ec2.describe_instances()["Reservations"]
        for i in r["Instances"]
    }
    assert all(states[i] == "running" for i in kept)
    assert all(states[i] in ("shutting-down", "terminated") for i in orphans)


def test_batch_records_expire_and_jobs_do_not(env: Env) -> None:
    jobs = running_jobs(env, 3)
    env.clock.advance(30)
    recovery().recover(list(jobs.values()))

    dynamodb = boto3.client("dynamodb", region_name="us-east-1")
    ttl = dynamodb.describe_time_to_live(TableName=TABLE)["TimeToLiveDescription"]
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": TTL_ATTRIBUTE}
    items = dynamodb.scan(TableName=TABLE)["Items"]
    (record,) = [i for i in items if i["pk"]["S"].startswith("BATCH#")]
    week = float(record[TTL_ATTRIBUTE]["N"]) - float(record["created"]["N"])
    assert 7 * 86400 - 1 <= week <= 7 * 86400
    kept = [i["pk"]["S"] for i in items if not i["pk"]["S"].startswith("BATCH#")]
    assert any(pk.startswith("JOB#") for pk in kept)
    assert all(TTL_ATTRIBUTE not in i for i in items if i["pk"]["S"] in kept)
