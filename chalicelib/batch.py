"""Interruption storms: replace many warned instances with one RunInstances per pool.

When a whole pool is reclaimed, hundreds of warnings arrive within two minutes. One
``RunInstances`` per job meets EC2's RunInstances token bucket (5 burst, 2 per second):
1,000 jobs need at least 500 s. Warnings delivered together (EventBridge → SQS →
Lambda with a batch size) are recovered here instead:

1. each warned job is read and ``decide`` plans its next attempt exactly as the
   one-job path does (spot prices are read once per instance types and zone);
2. jobs whose next step is only a launch are grouped by their first candidate
   (pool, market, max price), at most ``MAX_BATCH`` per group;
3. the group is written ahead as one ``BATCH#<token>`` item (members and pool), then
   launched with one ``RunInstances`` (``MinCount=1``, ``MaxCount=N``) whose
   ClientToken is derived from the members, so a retried delivery of the same
   warnings gets the same instances back instead of new ones;
4. instances are handed to jobs in a fixed order, each with the usual conditional
   write (job record + instance index in one transaction). A job that changed meanwhile
   (the sweep or another trigger already replaced it) does not take one: instances no
   job took are terminated at once, so no job ever keeps two replacements;
5. if the handler dies between launching and handing out and the delivery is never
   retried, :meth:`BatchRecovery.reap` (run it from the sweep) terminates batch
   instances that no job took after ``ORPHAN_AFTER_SECONDS``.

Everything else (jobs with no volume yet, jobs waiting, pools with too little
capacity, a group EC2 refused) goes through the one-job path,
:meth:`Reconciler.reconcile`, which tries the remaining candidates.

A batch shares one user data (EC2 gives every instance of a request the same), so
``render_user_data`` renders it for the batch token; the instance learns its job
from the instance index this module writes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from chalicelib.errors import (
    ConcurrentUpdate,
    Ec2Failure,
    InsufficientCapacity,
    SpotPriceTooLow,
)
from chalicelib.log import logger
from chalicelib.models import Attempt, Candidate, Job, Pool
from chalicelib.reconcile import Launch, Observed, Reconciler, apply_launched, decide, note_warning

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

MAX_BATCH = 100  # instances per RunInstances: bounds what one refused request delays
MAX_ASSIGN_TRIES = 3
BATCH_TAG = "spotctl:batch"
# A batch hands its instances out within one invocation (seconds); one still unowned
# after this long belongs to a handler that died and was not retried.
ORPHAN_AFTER_SECONDS = 900.0


@dataclass(frozen=True)
class Member:
    """A warned job whose replacement is planned: attempt ``number`` on ``candidate``."""

    job_id: str
    warned_instance: str
    number: int
    candidate: Candidate


@dataclass
class BatchOutcome:
    """What one call did; ``retry`` holds warnings to deliver again (throttled, failed)."""

    launched: dict[str, str] = field(default_factory=dict)  # job id -> new instance id
    one_by_one: list[str] = field(default_factory=list)  # job ids left to the one-job path
    surplus: list[str] = field(default_factory=list)  # launched, taken by no job, terminated
    retry: list[str] = field(default_factory=list)  # warned instance ids
    run_instances_calls: int = 0


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
                    "doc": {"S": json.dumps(doc)},
                },
                ConditionExpression="attribute_not_exists(pk)",
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise


@dataclass
class BatchRecovery:
    """Recovers the jobs of many interruption warnings at once."""

    reconciler: Reconciler
    log: BatchLog
    render_user_data: Callable[[str], str]  # batch token -> the batch's user data
    max_batch: int = MAX_BATCH

    def recover(self, warned_instances: Sequence[str]) -> BatchOutcome:
        outcome = BatchOutcome()
        now = self.reconciler.clock()
        store = self.reconciler.store
        groups: dict[tuple[Pool, str, float | None], list[Member]] = {}
        prices: dict[tuple[tuple[str, ...], str], dict[Pool, float]] = {}
        for instance_id in sorted(set(warned_instances)):
            job_id = store.job_id_for_instance(instance_id)
            if job_id is None:
                continue
            try:
                member = self._plan(job_id, instance_id, now, prices)
            except Ec2Failure as exc:
                logger.warning("batch: no prices", extra={"job_id": job_id, "error": str(exc)})
                outcome.retry.append(instance_id)
                continue
            if member is None:
                outcome.one_by_one.append(job_id)
                self._one_by_one(job_id, instance_id, outcome)
                continue
            key = (member.candidate.pool, member.candidate.market, member.candidate.max_price)
            groups.setdefault(key, []).append(member)

        for members in groups.values():
            members.sort(key=lambda m: m.job_id)
            for start in range(0, len(members), self.max_batch):
                self._launch_group(members[start : start + self.max_batch], now, outcome)
        return outcome

    def reap(self, older_than_seconds: float = ORPHAN_AFTER_SECONDS) -> list[str]:
        """Terminate batch instances no job took (a handler died between launching and
        handing out, and its delivery was never retried). Safe to run any time: an
        instance in the instance index is a job's and is never touched."""
        now = self.reconciler.clock()
        store = self.reconciler.store
        orphans = [
            instance_id
            for instance_id, launched in self.reconciler.ec2.live_instances_tagged(
                BATCH_TAG
            ).items()
            if now - launched.timestamp() > older_than_seconds
            and store.job_id_for_instance(instance_id) is None
        ]
        if orphans:
            self.reconciler.ec2.terminate(orphans)
            logger.warning("terminated batch instances no job took", extra={"ids": orphans})
        return orphans

    # -- planning --------------------------------------------------------------------

    def _plan(
        self,
        job_id: str,
        instance_id: str,
        now: float,
        prices: dict[tuple[tuple[str, ...], str], dict[Pool, float]],
    ) -> Member | None:
        """The member for this warning, or None if it needs more than a plain launch."""
        job = note_warning(instance_id)(self.reconciler.store.get(job_id), now)
        replayed = _batch_member_already(job, instance_id)
        if replayed is not None:
            return replayed  # a retried delivery: same members, same token, same instances
        first = decide(job, Observed(), now)
        if not first.needs_prices or job.volume is None:
            return None
        key = (job.spec.instance_types, job.volume.az)
        if key not in prices:
            self.reconciler.calls.append("ec2:DescribeSpotPriceHistory")
            prices[key] = self.reconciler.ec2.spot_prices(key[0], [key[1]], now)
        decision = decide(job, Observed(prices=prices[key]), now)
        if len(decision.actions) != 1 or not isinstance(decision.actions[0], Launch):
            return None
        number = decision.actions[0].attempt
        attempt = decision.job.attempt(number)
        assert attempt is not None
        return Member(job_id, instance_id, number, attempt.candidates[0])

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
                self.render_user_data(token),
                tags,
                count=len(members),
                client_token=token,
            )
        except (InsufficientCapacity, SpotPriceTooLow) as exc:
            logger.info("batch refused; one by one", extra={"batch": token, "reason": str(exc)})
            for member in members:
                outcome.one_by_one.append(member.job_id)
                self._one_by_one(member.job_id, member.warned_instance, outcome)
            return
        except Ec2Failure as exc:
            logger.warning("batch launch failed", extra={"batch": token, "error": str(exc)})
            outcome.retry += [m.warned_instance for m in members]
            return

        spare = list(instances)
        for member in members:
            if not spare:
                # EC2 started fewer than asked (MinCount=1): the rest go one by one.
                outcome.one_by_one.append(member.job_id)
                self._one_by_one(member.job_id, member.warned_instance, outcome)
                continue
            if self._assign(member, spare[0], now):
                outcome.launched[member.job_id] = spare.pop(0)
        if spare:
            outcome.surplus += spare
            ec2.terminate(spare)
            logger.info("batch surplus terminated", extra={"batch": token, "instances": spare})

    def _assign(self, member: Member, instance_id: str, now: float) -> bool:
        """Give ``instance_id`` to the member's job if it still wants exactly this launch."""
        store = self.reconciler.store
        for _ in range(MAX_ASSIGN_TRIES):
            job = note_warning(member.warned_instance)(store.get(member.job_id), now)
            if _already_has(job, instance_id):
                return True  # a retried delivery: this instance is the job's already
            planned = _planned_attempt(job, member, now)
            if planned is None:
                return False
            job = apply_launched(planned, member.number, 0, instance_id, now)
            job = job.with_event(now, "batch-launched", f"{instance_id}", member.number)
            try:
                store.save(
                    job.model_copy(update={"updated_at": now}), [(instance_id, member.number)]
                )
            except ConcurrentUpdate:
                continue
            return True
        return False

    def _one_by_one(self, job_id: str, instance_id: str, outcome: BatchOutcome) -> None:
        try:
            self.reconciler.reconcile(job_id, note_warning(instance_id))
        except Ec2Failure as exc:
            logger.warning("one-by-one recovery failed", extra={"job_id": job_id, "e": str(exc)})
            outcome.retry.append(instance_id)


def _batch_member_already(job: Job, warned_instance: str) -> Member | None:
    """The member this job was in, if a batch already replaced ``warned_instance``."""
    current = job.current
    if current is None or current.instance_id is None or current.number < 2:
        return None
    previous = job.attempt(current.number - 1)
    if previous is None or previous.instance_id != warned_instance:
        return None
    if not any(e.kind == "batch-launched" and e.attempt == current.number for e in job.timeline):
        return None
    return Member(job.job_id, warned_instance, current.number, current.candidates[0])


def _already_has(job: Job, instance_id: str) -> bool:
    return any(a.instance_id == instance_id for a in job.attempts)


def _planned_attempt(job: Job, member: Member, now: float) -> Job | None:
    """The job with the member's attempt added, if deciding now still plans just that."""
    decision = decide(job, Observed(prices={member.candidate.pool: _price(member)}), now)
    if len(decision.actions) != 1 or decision.actions[0] != Launch(member.number):
        return None
    attempt: Attempt | None = decision.job.attempt(member.number)
    if attempt is None or attempt.candidates[0].pool != member.candidate.pool:
        return None
    return decision.job


def _price(member: Member) -> float:
    return member.candidate.expected_price
