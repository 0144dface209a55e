"""The storm path as deployed: interruption warnings in an SQS batch, through app.py's
``on_interruption_warning_batch``, against moto in server mode; partial fulfilment; and the
per-job handler racing the batch on the same warning."""

from __future__ import annotations

import base64
import json
import re
import time
import zlib
from collections import Counter
from typing import Any

import pytest

from chalicelib import batch, runtime
from chalicelib.agent_auth import derive_secret
from chalicelib.batch import recovery_for
from chalicelib.userdata import batch_user_data_size
from tests.functional.conftest import SIGNING_KEY, Env, load_event
from tests.functional.test_batch import running_jobs

QUEUE = "spotctl-dev-interruption-warnings"


def sqs_event(env: Env, instance_ids: list[str], malformed: int = 0) -> dict[str, Any]:
    """What the event source mapping hands the function: one record per warning, the
    EventBridge event as the body, each with its own message id."""
    bodies = [json.dumps(load_event("spot-interruption-warning", iid)) for iid in instance_ids]
    bodies += ['{"detail-type": "not a warning"}'] * malformed
    event: dict[str, Any] = env.client.events.generate_sqs_event(bodies, queue_name=QUEUE)
    for n, record in enumerate(event["Records"]):
        record["messageId"] = f"message-{n}"
    return event


def deliver_batch(env: Env, event: dict[str, Any]) -> list[str]:
    """Invoke the SQS handler; the message ids it asks to be delivered again."""
    response = env.client.lambda_.invoke("on_interruption_warning_batch", event)
    return [f["itemIdentifier"] for f in response.payload["batchItemFailures"]]


class Ec2Requests:
    """Watches RunInstances on the control plane's client; can make EC2 start fewer
    than asked, and numbers the instances (AmiLaunchIndex) as EC2 does, which moto
    leaves out: in reverse of moto's order, so that only the index can match them."""

    def __init__(self, start_at_most: int | None = None) -> None:
        self.start_at_most = start_at_most
        self.max_counts: list[int] = []
        self.launch_index: dict[str, int] = {}
        self.during_batch: list[Any] = []  # callables run while a batch request is in flight
        client = runtime.control_plane().reconciler.ec2._client
        client.meta.events.register("provide-client-params.ec2.RunInstances", self._params)
        client.meta.events.register("before-call.ec2.RunInstances", self._before)
        client.meta.events.register("after-call.ec2.RunInstances", self._after)

    def _params(self, params: dict[str, Any], **_: Any) -> None:
        asked = params["MaxCount"]
        self.max_counts.append(asked)
        # EC2 starts up to MaxCount when it has the capacity; moto starts MinCount.
        given = asked if self.start_at_most is None else min(asked, self.start_at_most)
        params["MinCount"] = params["MaxCount"] = given

    def _before(self, params: dict[str, Any], **_: Any) -> None:
        if self.max_counts[-1] > 1:
            while self.during_batch:
                self.during_batch.pop(0)()

    def _after(self, parsed: dict[str, Any], **_: Any) -> None:
        instances = parsed.get("Instances", [])
        for index, instance in enumerate(reversed(instances)):
            instance["AmiLaunchIndex"] = index
            self.launch_index[instance["InstanceId"]] = index

    @property
    def batch_requests(self) -> int:
        return sum(1 for n in self.max_counts if n > 1)

    @property
    def single_requests(self) -> int:
        return sum(1 for n in self.max_counts if n == 1)


def user_data(env: Env, instance_id: str) -> str:
    found = env.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(found["UserData"]["Value"]).decode()


def member_table(text: str) -> list[dict[str, Any]]:
    match = re.search(r"^SPOTCTL_MEMBERS_B85='([^']+)'$", text, re.MULTILINE)
    assert match, "not a batch's user data"
    table: list[dict[str, Any]] = json.loads(zlib.decompress(base64.b85decode(match[1])))
    return table


def replacement(env: Env, job_id: str) -> str:
    attempts = env.job(job_id)["attempts"]
    assert len(attempts) == 2, attempts
    instance_id: str = attempts[1]["instance_id"]
    return instance_id


def state(env: Env, instance_id: str) -> str:
    reservations = env.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    name: str = reservations[0]["Instances"][0]["State"]["Name"]
    return name


def live_replacements(env: Env, job_id: str) -> list[str]:
    """Live instances launched for the job after its first (batch instances carry the
    batch's token as their job tag, so they are found through the record and EC2)."""
    first = env.job(job_id)["attempts"][0]["instance_id"]
    tagged = {i["InstanceId"] for i in env.cloud.live_instances(job_id)} - {first}
    recorded = {a["instance_id"] for a in env.job(job_id)["attempts"][1:] if a["instance_id"]}
    return sorted(i for i in tagged | recorded if state(env, i) in ("pending", "running"))


def assert_instance_runs_its_own_entry(env: Env, requests: Ec2Requests, job_id: str) -> None:
    """The instance the job took carries, at its launch index, the job's own entry."""
    instance_id = replacement(env, job_id)
    entry = member_table(user_data(env, instance_id))[requests.launch_index[instance_id]]
    assert entry["job_id"] == job_id
    assert entry["attempt"] == 2
    assert entry["secret"] == derive_secret(SIGNING_KEY, job_id)
    assert entry["volume_id"] == env.job(job_id)["volume"]["volume_id"]


def test_a_storm_batch_through_the_sqs_handler_recovers_every_job_in_one_request(
    env: Env,
) -> None:
    jobs = running_jobs(env, 5)
    requests = Ec2Requests()
    env.clock.advance(30)

    failed = deliver_batch(env, sqs_event(env, sorted(jobs.values()), malformed=1))

    assert failed == [], "the malformed message is dropped, not retried"
    assert requests.max_counts == [5], "one RunInstances for the pool"
    taken = {replacement(env, job_id) for job_id in jobs}
    assert len(taken) == 5
    assert sorted(requests.launch_index[i] for i in taken) == [0, 1, 2, 3, 4]
    for job_id, old in jobs.items():
        assert env.job(job_id)["state"] == "RECOVERING"
        assert_instance_runs_its_own_entry(env, requests, job_id)
        # Then the usual loop: the old instance goes, the volume moves over.
        env.cloud.reclaim(old)
        env.cloud.state_change(old, "terminated")
        env.cloud.state_change(replacement(env, job_id), "running")
        assert env.job(job_id)["state"] == "RUNNING"
        env.cloud.assert_invariants(job_id)

    # The per-job handler's copy of each warning, arriving late, changes nothing.
    for old in jobs.values():
        env.cloud.deliver("spot-interruption-warning", old)
    assert requests.max_counts == [5]
    assert {replacement(env, job_id) for job_id in jobs} == taken


def test_partial_fulfilment_hands_out_what_ec2_started_and_the_rest_go_one_by_one(
    env: Env,
) -> None:
    jobs = running_jobs(env, 5)
    requests = Ec2Requests(start_at_most=3)  # capacity for 3 of the 5 in one request

    assert deliver_batch(env, sqs_event(env, sorted(jobs.values()))) == []

    assert requests.batch_requests == 1 and requests.single_requests == 2
    batched = sorted(jobs)[:3]  # members in job id order: EC2 started members 0..2
    for job_id in jobs:
        instance_id = replacement(env, job_id)
        assert live_replacements(env, job_id) == [instance_id]
        if job_id in batched:
            assert_instance_runs_its_own_entry(env, requests, job_id)
        else:
            text = user_data(env, instance_id)
            assert "SPOTCTL_MEMBERS_B85=''" in text, "a one-job launch has its own user data"
            assert re.search(r"^SPOTCTL_PARAMS_B64='[^']+'$", text, re.MULTILINE)


def test_a_group_over_the_user_data_limit_is_split_into_several_requests(env: Env) -> None:
    jobs = running_jobs(env, 5)
    requests = Ec2Requests()
    recovery = recovery_for(runtime.control_plane())
    members = []
    for job_id in sorted(jobs):
        job = runtime.control_plane().store.get(job_id)
        members.append(recovery.agent_params(job, job.attempts[0]))
    # Room for two members per request (the real limit holds ~30 typical ones); a third
    # adds ~100 bytes, more than two members' sizes differ by.
    pairs = [batch_user_data_size(members[n : n + 2]) for n in (0, 2)]
    assert batch_user_data_size(members[:3]) > max(pairs) + 20
    recovery.user_data_limit = max(pairs) + 10

    outcome = recovery.recover(sorted(jobs.values()))

    assert requests.max_counts == [2, 2, 1], "2 + 2 batched, the last one by itself"
    assert outcome.run_instances_calls == 2
    assert sorted(outcome.launched) == sorted(jobs)[:4]
    assert outcome.one_by_one == [sorted(jobs)[4]]
    for job_id in sorted(jobs)[:4]:
        assert_instance_runs_its_own_entry(env, requests, job_id)
        assert len(member_table(user_data(env, replacement(env, job_id)))) == 2


def test_per_job_handler_winning_the_race_leaves_the_batch_instance_unowned_and_ended(
    env: Env,
) -> None:
    jobs = running_jobs(env, 3)
    requests = Ec2Requests()
    early = sorted(jobs)[1]
    # The per-job handler plans and launches while the batch's request is in flight.
    requests.during_batch.append(
        lambda: env.cloud.deliver("spot-interruption-warning", jobs[early])
    )

    assert deliver_batch(env, sqs_event(env, sorted(jobs.values()))) == []

    assert requests.max_counts == [3, 1]
    per_job = replacement(env, early)
    assert requests.launch_index.get(per_job) is not None
    batch_ids = [i for i, n in requests.launch_index.items() if i != per_job]
    (unowned,) = [i for i in batch_ids if requests.launch_index[i] == 1]
    assert state(env, unowned) in ("shutting-down", "terminated"), "member 1's, nobody's"
    assert live_replacements(env, early) == [per_job]
    for job_id in jobs:
        if job_id != early:
            assert_instance_runs_its_own_entry(env, requests, job_id)
    assert runtime.control_plane().store.job_id_for_instance(unowned) is None


def test_batch_winning_the_race_makes_the_per_job_handler_launch_nothing(env: Env) -> None:
    jobs = running_jobs(env, 3)
    requests = Ec2Requests()
    early = sorted(jobs)[0]
    store_client = runtime.control_plane().store._client
    raced: list[bool] = []

    def batch_first(params: dict[str, Any], **_: Any) -> None:
        # The per-job handler read the job and is about to write its attempt ahead:
        # the whole batch runs to the end before that write reaches DynamoDB.
        item = json.loads(params["body"]).get("Item", {})
        if not raced and item.get("pk", {}).get("S") == f"JOB#{early}":
            raced.append(True)
            assert deliver_batch(env, sqs_event(env, sorted(jobs.values()))) == []

    store_client.meta.events.register("before-call.dynamodb.PutItem", batch_first)
    env.cloud.deliver("spot-interruption-warning", jobs[early])
    store_client.meta.events.unregister("before-call.dynamodb.PutItem", batch_first)

    assert raced
    assert requests.max_counts == [3], "the per-job handler never called RunInstances"
    for job_id in jobs:
        assert_instance_runs_its_own_entry(env, requests, job_id)
        assert live_replacements(env, job_id) == [replacement(env, job_id)]


def test_a_failed_launch_returns_exactly_its_warnings_for_delivery_again(env: Env) -> None:
    jobs = running_jobs(env, 3)
    client = runtime.control_plane().reconciler.ec2._client

    def refuse(**_: Any) -> Any:
        from botocore.awsrequest import AWSResponse
        from botocore.awsrequest import HTTPHeaders as Headers

        error = {"Error": {"Code": "UnauthorizedOperation", "Message": "no"}}
        return AWSResponse("http://moto", 403, Headers(), None), {
            **error,
            "ResponseMetadata": {"HTTPStatusCode": 403},
        }

    client.meta.events.register("before-call.ec2.RunInstances", refuse)
    event = sqs_event(env, sorted(jobs.values()), malformed=1)
    failed = deliver_batch(env, event)
    client.meta.events.unregister("before-call.ec2.RunInstances", refuse)

    assert failed == ["message-0", "message-1", "message-2"]
    for job_id in jobs:
        assert len(env.job(job_id)["attempts"]) == 1
    # Delivered again, they recover.
    Ec2Requests()
    retried = {"Records": [r for r in event["Records"] if r["messageId"] in failed]}
    assert deliver_batch(env, retried) == []
    assert Counter(len(env.job(j)["attempts"]) for j in jobs) == Counter({2: 3})


def test_the_sweep_reaps_batch_instances_no_job_took(env: Env) -> None:
    jobs = running_jobs(env, 2)
    plane = runtime.control_plane()
    attempt = plane.store.get(next(iter(jobs))).attempts[0]
    orphans = plane.reconciler.ec2.run_instances(
        attempt.candidates[0],
        plane.reconciler.launch_settings(),
        "#!/bin/bash\n",
        {"spotctl:job-id": "spotctl-b-dead", "spotctl:batch": "spotctl-b-dead"},
        count=1,
        client_token="spotctl-b-dead",
    )
    env.clock.now = time.time() + 3600  # moto stamps LaunchTime with the wall clock

    scheduled = env.client.events.generate_cw_event(
        source="aws.events", detail_type="Scheduled Event", detail={}, resources=[]
    )
    response = env.client.lambda_.invoke("sweep", scheduled)

    assert response.payload["reaped"] == len(orphans) == 1
    assert state(env, orphans[0]) in ("shutting-down", "terminated")
    for old in jobs.values():
        assert state(env, old) == "running"


def test_the_sweep_reaps_a_race_losers_launch_once_it_is_old(env: Env) -> None:
    """A pass that launched another candidate of an attempt, lost the write and died
    before ending it: tagged with the job and attempt, named by no record."""
    jobs = running_jobs(env, 2)
    plane = runtime.control_plane()
    job_id = next(iter(jobs))
    attempt = plane.store.get(job_id).attempts[0]
    (lost,) = plane.reconciler.ec2.run_instances(
        attempt.candidates[0],
        plane.reconciler.launch_settings(),
        "#!/bin/bash\n",
        {"spotctl:job-id": job_id, "spotctl:attempt": str(attempt.number)},
        count=1,
        client_token=f"{job_id}-race-loser",
    )
    scheduled = env.client.events.generate_cw_event(
        source="aws.events", detail_type="Scheduled Event", detail={}, resources=[]
    )

    env.clock.now = time.time()  # moto stamps LaunchTime with the wall clock
    assert env.client.lambda_.invoke("sweep", scheduled).payload["reaped"] == 0, "too young"
    env.clock.now = time.time() + 3600
    assert env.client.lambda_.invoke("sweep", scheduled).payload["reaped"] == 1

    assert state(env, lost) in ("shutting-down", "terminated")
    for job, instance in jobs.items():
        assert state(env, instance) == "running"
        assert env.job(job)["state"] == "RUNNING"


def test_in_a_storm_the_per_job_handler_leaves_warnings_to_the_batch(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch, "STORM_WARNINGS", 3)
    jobs = running_jobs(env, 5)
    first, late = sorted(jobs)[:3], sorted(jobs)[3:]
    requests = Ec2Requests()

    assert deliver_batch(env, sqs_event(env, [jobs[j] for j in first])) == []
    assert requests.max_counts == [3]
    # The storm is on: the fast path neither launches nor writes anything ahead ...
    for job_id in late:
        env.cloud.deliver("spot-interruption-warning", jobs[job_id])
        assert len(env.job(job_id)["attempts"]) == 1
    assert requests.max_counts == [3]
    # ... and the queue's copies are recovered by the batch, in one request.
    env.clock.advance(5)
    assert deliver_batch(env, sqs_event(env, [jobs[j] for j in late])) == []
    assert requests.max_counts == [3, 2]
    for job_id in jobs:
        assert_instance_runs_its_own_entry(env, requests, job_id)

    # Once the storm has passed, a lone warning takes the fast path again.
    env.clock.advance(batch.STORM_HOLD_SECONDS)
    for old in jobs.values():
        env.cloud.reclaim(old)
        env.cloud.state_change(old, "terminated")
    lone = sorted(jobs)[0]
    env.cloud.state_change(replacement(env, lone), "running")
    env.cloud.deliver("spot-interruption-warning", replacement(env, lone))
    assert requests.max_counts == [3, 2, 1]
    assert len(env.job(lone)["attempts"]) == 3
