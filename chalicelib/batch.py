"""Interruption storms: replace many warned instances with one RunInstances per pool.

When a whole pool is reclaimed, hundreds of warnings arrive within two minutes. One
``RunInstances`` per job meets EC2's RunInstances token bucket (5 burst, 2 per second):
1,000 jobs need at least 500 s. Warnings delivered together (EventBridge → SQS →
Lambda with a batch size: app.py ``on_interruption_warning_batch``) are recovered here:

1. each warned job is read and ``decide`` plans its next attempt exactly as the
   one-job path does (spot prices and the pools' fleet records are read once per
   instance types and zone); a job whose warned instance was already replaced (by the
   per-job handler, the sweep or an earlier delivery) is skipped without another look;
2. jobs whose next step is only a launch are grouped by their first candidate
   (pool, market, max price), in job id order, and cut into requests of at most
   ``MAX_BATCH`` members and at most what one user data carries (16 KB, see
   ``chalicelib.userdata.members_that_fit``); a request of fewer than ``MIN_BATCH``
   members goes the one-job way, which also has the other candidates to fall back on;
3. the request is written ahead as one ``BATCH#<token>`` item (members and pool), then
   launched with one ``RunInstances`` (``MinCount=1``, ``MaxCount=N``) whose
   ClientToken is derived from the members, so a retried delivery of the same
   warnings gets the same instances back instead of new ones;
4. the user data carries the ordered member table (each member's job, attempt, volume,
   secret...). EC2 numbers the instances of one request 0..N-1 (``AmiLaunchIndex``; the
   gateway returns them in that order) and each instance keeps the table entry at its
   ``ami-launch-index``. So instance i is member i's or nobody's: it is handed to member
   i with the usual conditional write (job record + instance index in one
   transaction); if member i's job changed meanwhile (another trigger replaced it),
   the instance is terminated at once. When EC2 starts fewer than N (capacity), the
   members it started none for go the one-job way;
5. if the handler dies between launching and handing out and the delivery is never
   retried, the sweep's :meth:`Reconciler.reap_unrecorded` terminates the instances
   that no job took, as it does any spotctl instance no record names.

Everything else (jobs with no volume yet, jobs waiting, pools with too little
capacity, a group EC2 refused) goes through the one-job path,
:meth:`Reconciler.reconcile`, which tries the remaining candidates.

In a storm the per-job handler steps aside: a delivery of ``STORM_WARNINGS`` or more
warnings declares a storm (one ``STORM`` item in the jobs table, for
``STORM_HOLD_SECONDS``), and while it lasts app.py's ``on_interruption_warning`` leaves
its warning to the queue. Otherwise each of hundreds of per-job passes would write its
attempt ahead and then wait on the RunInstances bucket, and this path, finding those
attempts planned, could batch nothing.

The per-job handler and this path racing on the same warning end with one replacement:
both plan attempt n+1 on the version they read, and only one conditional write of it
succeeds. The per-job path writes its attempt ahead of its RunInstances, so if it wins,
the batch finds the attempt planned elsewhere and terminates member i's instance; if
the batch wins, the per-job write-ahead fails, it reads again and finds the job
replaced, and never calls RunInstances.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from botocore.exceptions import ClientError

from chalicelib import clients
from chalicelib.agent_auth import derive_secret
from chalicelib.errors import (
    ConcurrentUpdate,
    Ec2Failure,
    InsufficientCapacity,
    SpotPriceTooLow,
)
from chalicelib.log import logger
from chalicelib.models import Attempt, Candidate, Job, Pool
from chalicelib.placement import CapacityObservation, new_observations
from chalicelib.reconcile import (
    FleetView,
    Launch,
    Observed,
    Reconciler,
    apply_launched,
    decide,
    note_warning,
)
from chalicelib.store import TTL_ATTRIBUTE
from chalicelib.userdata import (
    USER_DATA_LIMIT_BYTES,
    AgentParams,
    members_that_fit,
    render_batch_user_data,
    validate,
)

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

    from chalicelib.runtime import ControlPlane

MAX_BATCH = 100  # instances per RunInstances: bounds what one refused request delays
MIN_BATCH = 2  # one instance is the one-job path's request, which has fallbacks
MAX_ASSIGN_TRIES = 3
BATCH_TAG = "spotctl:batch"
# This many warnings in one delivery (gathered over ≤ 5 s) are a storm, not bad luck.
STORM_WARNINGS = 10
# The per-job handler stays aside this long after the last storm-sized delivery: a
# pool's reclaim spreads its warnings over two minutes.
STORM_HOLD_SECONDS = 180.0
_STORM_KEY = {"pk": {"S": "STORM"}}
# A batch's record is only read by a retry of the same delivery (minutes); DynamoDB's
# time to live removes it a week later, so storms do not grow the table forever.
BATCH_RECORD_DAYS = 7


@dataclass(frozen=True)
class Member:
    """A warned job whose replacement is planned: attempt ``number`` on ``candidate``."""

    job_id: str
    warned_instance: str
    number: int
    candidate: Candidate
    params: AgentParams  # its entry in the batch's member table: what its instance runs
    fleet: FleetView = None  # the pools' fleet records it was planned on


class _Market(NamedTuple):
    """What a group of warned jobs is planned on: spot prices and the pools' records."""

    prices: dict[Pool, float]
    fleet: FleetView


@dataclass
class BatchOutcome:
    """What one call did; ``retry`` holds warnings to deliver again (throttled, failed)."""

    launched: dict[str, str] = field(default_factory=dict)  # job id -> new instance id
    one_by_one: list[str] = field(default_factory=list)  # job ids left to the one-job path
    already_replaced: list[str] = field(default_factory=list)  # job ids another path served
    surplus: list[str] = field(default_factory=list)  # launched, taken by no job, terminated
    retry: list[str] = field(default_factory=list)  # warned instance ids
    run_instances_calls: int = 0
    # What the records of the jobs handed an instance newly say about spot capacity:
    # shared with one write per pool once the delivery is done.
    observed: dict[Pool, list[CapacityObservation]] = field(default_factory=dict)


def batch_token(members: Sequence[Member]) -> str:
    """One ClientToken (≤ 64 characters) for a group, the same for the same members."""
    key = "|".join(f"{m.job_id}:{m.number}" for m in sorted(members, key=lambda m: m.job_id))
    return "spotctl-b-" + hashlib.sha256(key.encode()).hexdigest()[:48]


class BatchLog:
    """The write-ahead record of a batch: ``BATCH#<token>`` in the jobs table."""

    def __init__(self, client: DynamoDBClient, table_name: str) -> None:
        self._client = client
        self._table = table_name

    def record(self, token: str, pool: Pool, members: Sequence[Member], now: float) -> None:
        """Write the batch before launching it; a retry finds it already there."""
        doc = {
            "pool": str(pool),
            "members": [[m.job_id, m.number, m.warned_instance] for m in members],
        }
        try:
            self._client.put_item(
                TableName=self._table,
                Item={
                    "pk": {"S": f"BATCH#{token}"},
                    "created": {"N": f"{now:.3f}"},
                    TTL_ATTRIBUTE: {"N": str(int(now) + BATCH_RECORD_DAYS * 86400)},
                    "doc": {"S": json.dumps(doc)},
                },
                ConditionExpression="attribute_not_exists(pk)",
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise


class StormSignal:
    """Whether an interruption storm is on: ``STORM`` in the jobs table, with its end."""

    def __init__(self, client: DynamoDBClient, table_name: str) -> None:
        self._client = client
        self._table = table_name

    def declare(self, until: float) -> None:
        self._client.put_item(
            TableName=self._table, Item={**_STORM_KEY, "until": {"N": f"{until:.3f}"}}
        )

    def is_on(self, now: float) -> bool:
        # An eventually consistent read: a storm seen a second late costs nothing more
        # than the race the version condition settles anyway.
        item = self._client.get_item(TableName=self._table, Key=_STORM_KEY).get("Item")
        return item is not None and float(item["until"]["N"]) > now


@dataclass
class BatchRecovery:
    """Recovers the jobs of many interruption warnings at once."""

    reconciler: Reconciler
    log: BatchLog
    agent_params: Callable[[Job, Attempt], AgentParams]  # what the attempt's instance runs
    max_batch: int = MAX_BATCH
    min_batch: int = MIN_BATCH
    user_data_limit: int = USER_DATA_LIMIT_BYTES  # EC2's; lower only to test the split
    storm: StormSignal | None = None

    def recover(self, warned_instances: Sequence[str]) -> BatchOutcome:
        outcome = BatchOutcome()
        now = self.reconciler.clock()
        store = self.reconciler.store
        if self.storm is not None and len(set(warned_instances)) >= STORM_WARNINGS:
            self.storm.declare(now + STORM_HOLD_SECONDS)  # the per-job handler steps aside
        groups: dict[tuple[Pool, str, float | None], list[Member]] = {}
        markets: dict[tuple[tuple[str, ...], str], _Market] = {}
        for instance_id in sorted(set(warned_instances)):
            job_id = store.job_id_for_instance(instance_id)
            if job_id is None:
                continue
            try:
                member = self._plan(job_id, instance_id, now, markets, outcome)
            except Ec2Failure as exc:
                logger.warning("batch: no prices", extra={"job_id": job_id, "error": str(exc)})
                outcome.retry.append(instance_id)
                continue
            if member is not None:
                key = (member.candidate.pool, member.candidate.market, member.candidate.max_price)
                groups.setdefault(key, []).append(member)

        alone: list[Member] = []
        for members in groups.values():
            members.sort(key=lambda m: m.job_id)
            requests, left = self._requests(members)
            for request in requests:
                self._launch_group(request, now, outcome)
            alone += left
        # After the batches: each of these costs a RunInstances token of its own.
        for member in alone:
            self._one_by_one(member.job_id, member.warned_instance, outcome)
        self.reconciler.share_capacity(outcome.observed, now)
        return outcome

    # -- planning --------------------------------------------------------------------

    def _plan(
        self,
        job_id: str,
        instance_id: str,
        now: float,
        markets: dict[tuple[tuple[str, ...], str], _Market],
        outcome: BatchOutcome,
    ) -> Member | None:
        """The member for this warning, or None when the batch does not launch for it
        (already replaced elsewhere, or recovered one by one here and now)."""
        job = note_warning(instance_id)(self.reconciler.store.get(job_id), now)
        replayed = self._batch_member_already(job, instance_id)
        if replayed is not None:
            return replayed  # a retried delivery: same members, same token, same instances
        if _replaced_elsewhere(job, instance_id):
            outcome.already_replaced.append(job_id)
            return None
        member = self._plan_launch(job, instance_id, now, markets)
        if member is None:
            self._one_by_one(job_id, instance_id, outcome)
        return member

    def _plan_launch(
        self,
        job: Job,
        instance_id: str,
        now: float,
        markets: dict[tuple[tuple[str, ...], str], _Market],
    ) -> Member | None:
        first = decide(job, Observed(), now)
        if not first.needs_prices or job.volume is None:
            return None
        key = (job.spec.instance_types, job.volume.az)
        if key not in markets:
            self.reconciler.calls.append("ec2:DescribeSpotPriceHistory")
            prices = self.reconciler.ec2.spot_prices(key[0], [key[1]], now)
            markets[key] = _Market(prices, self.reconciler.fleet_records(job, prices, now))
        market = markets[key]
        decision = decide(job, Observed(prices=market.prices, fleet=market.fleet), now)
        if len(decision.actions) != 1 or not isinstance(decision.actions[0], Launch):
            return None
        attempt = decision.job.attempt(decision.actions[0].attempt)
        assert attempt is not None
        return self._member(decision.job, instance_id, attempt, market.fleet)

    def _member(
        self, job: Job, warned_instance: str, attempt: Attempt, fleet: FleetView = None
    ) -> Member | None:
        params = self.agent_params(job, attempt)
        try:
            validate(params)
        except ValueError as exc:  # the one-job path records it on the job itself
            logger.warning("batch: unusable member", extra={"job_id": job.job_id, "e": str(exc)})
            return None
        candidate = attempt.candidates[0]
        return Member(job.job_id, warned_instance, attempt.number, candidate, params, fleet)

    def _batch_member_already(self, job: Job, warned_instance: str) -> Member | None:
        """The member this job was in, if a batch already replaced ``warned_instance``."""
        current = job.current
        if current is None or current.instance_id is None or current.number < 2:
            return None
        previous = job.attempt(current.number - 1)
        if previous is None or previous.instance_id != warned_instance:
            return None
        if not any(
            e.kind == "batch-launched" and e.attempt == current.number for e in job.timeline
        ):
            return None
        return self._member(job, warned_instance, current)

    def _requests(self, members: list[Member]) -> tuple[list[list[Member]], list[Member]]:
        """Cut a group into requests of at most ``max_batch`` members and what one user
        data carries; and the members left to the one-job path (a request too small to
        batch, a member too large for any)."""
        requests: list[list[Member]] = []
        alone: list[Member] = []
        rest = members
        while rest:
            window = rest[: self.max_batch]
            fit = members_that_fit([m.params for m in window], self.user_data_limit)
            request, rest = window[: max(fit, 1)], rest[max(fit, 1) :]
            if fit == 0 or len(request) < self.min_batch:
                alone += request
            else:
                requests.append(request)
        return requests, alone

    # -- launching and handing out ----------------------------------------------------

    def _launch_group(self, members: list[Member], now: float, outcome: BatchOutcome) -> None:
        token = batch_token(members)
        candidate = members[0].candidate
        self.log.record(token, candidate.pool, members, now)
        # One request, one set of tags: the job of each instance is in the instance index.
        # The IAM policy requires a spotctl:job-id tag on what spotctl creates.
        tags = {
            "spotctl:job-id": token,
            BATCH_TAG: token,
            "Name": f"spotctl-batch-{token[-8:]}",
        }
        ec2 = self.reconciler.ec2
        try:
            outcome.run_instances_calls += 1
            self.reconciler.calls.append("ec2:RunInstances")
            instances = ec2.run_instances(
                candidate,
                self.reconciler.launch_settings(),
                render_batch_user_data([m.params for m in members]),
                tags,
                count=len(members),
                client_token=token,
            )
        except (InsufficientCapacity, SpotPriceTooLow) as exc:
            logger.info("batch refused; one by one", extra={"batch": token, "reason": str(exc)})
            for member in members:
                self._one_by_one(member.job_id, member.warned_instance, outcome)
            return
        except Ec2Failure as exc:
            logger.warning("batch launch failed", extra={"batch": token, "error": str(exc)})
            outcome.retry += [m.warned_instance for m in members]
            return

        # Instance i runs member i's entry of the table (its launch index): it is member
        # i's or nobody's.
        surplus = list(instances[len(members) :])
        for index, member in enumerate(members):
            if index >= len(instances):
                # EC2 started fewer than asked (MinCount=1): the rest go one by one.
                self._one_by_one(member.job_id, member.warned_instance, outcome)
            elif self._assign(member, instances[index], now, outcome):
                outcome.launched[member.job_id] = instances[index]
            else:
                surplus.append(instances[index])
        if surplus:
            outcome.surplus += surplus
            ec2.terminate(surplus)
            logger.info("batch surplus terminated", extra={"batch": token, "instances": surplus})

    def _assign(self, member: Member, instance_id: str, now: float, outcome: BatchOutcome) -> bool:
        """Give ``instance_id`` to the member's job if it still wants exactly this launch."""
        store = self.reconciler.store
        for _ in range(MAX_ASSIGN_TRIES):
            read = store.get(member.job_id)
            job = note_warning(member.warned_instance)(read, now)
            if _already_has(job, instance_id):
                return True  # a retried delivery: this instance is the job's already
            planned = _planned_attempt(job, member, now)
            if planned is None:
                return False
            job = apply_launched(planned, member.number, 0, instance_id, now)
            job = job.with_event(now, "batch-launched", f"{instance_id}", member.number)
            try:
                saved = store.save(
                    job.model_copy(update={"updated_at": now}), [(instance_id, member.number)]
                )
            except ConcurrentUpdate:
                continue
            for pool, found in new_observations(read, saved).items():
                outcome.observed.setdefault(pool, []).extend(found)  # the warning
            return True
        return False

    def _one_by_one(self, job_id: str, instance_id: str, outcome: BatchOutcome) -> None:
        outcome.one_by_one.append(job_id)
        try:
            self.reconciler.reconcile(job_id, note_warning(instance_id))
        except Exception as exc:
            # One job's failure must not fail the others' delivery: only its warning is
            # delivered again.
            logger.warning("one-by-one recovery failed", extra={"job_id": job_id, "e": str(exc)})
            outcome.retry.append(instance_id)


def _replaced_elsewhere(job: Job, warned_instance: str) -> bool:
    """A later attempt than the warned instance's exists (launched or written ahead)."""
    warned = next((a for a in job.attempts if a.instance_id == warned_instance), None)
    current = job.current
    return warned is not None and current is not None and current.number > warned.number


def _already_has(job: Job, instance_id: str) -> bool:
    return any(a.instance_id == instance_id for a in job.attempts)


def _planned_attempt(job: Job, member: Member, now: float) -> Job | None:
    """The job with the member's attempt added, if deciding now still plans just that."""
    observed = Observed(prices={member.candidate.pool: _price(member)}, fleet=member.fleet)
    decision = decide(job, observed, now)
    if len(decision.actions) != 1 or decision.actions[0] != Launch(member.number):
        return None
    attempt: Attempt | None = decision.job.attempt(member.number)
    if attempt is None or attempt.candidates[0].pool != member.candidate.pool:
        return None
    return decision.job


def _price(member: Member) -> float:
    return member.candidate.expected_price


# -- wiring ------------------------------------------------------------------------


def recovery_for(plane: ControlPlane) -> BatchRecovery:
    """The batch path over the same store, EC2 gateway and settings as ``plane``."""
    config = plane.config
    signing_key = plane.service.signing_key

    def params(job: Job, attempt: Attempt) -> AgentParams:
        from chalicelib.runtime import agent_params  # noqa: PLC0415 - runtime builds the plane

        return agent_params(job, attempt, config, derive_secret(signing_key(), job.job_id))

    client = clients.dynamodb(config.region)
    log = BatchLog(client, config.table_name)
    return BatchRecovery(plane.reconciler, log, params, storm=storm_for(plane))


def storm_for(plane: ControlPlane) -> StormSignal:
    return StormSignal(clients.dynamodb(plane.config.region), plane.config.table_name)
