"""Jobs in DynamoDB: one item per job, one small item per instance pointing at its job.

Table layout (single table, string keys):

- ``pk = "JOB#<job id>"``: the job record as JSON in ``doc``, plus ``state``,
  ``created_at``, ``kind = "job"`` and ``version`` as top-level attributes for the
  indexes and the write condition.
- ``pk = "INSTANCE#<instance id>"``: ``job_id`` and ``attempt``, so an EC2 event finds
  its job with one GetItem (no scan, no EC2 tag lookup).
- ``pk = "TOKEN#<client token>"``: ``job_id``, the job submitted with that token, so
  a submission sent again (a timeout, a retry) finds its job instead of making another.
- ``pk = "VOLUME#<volume id>"``: ``job_id``, the job a user's ``volume_id`` was last
  given to, written with the job itself; a new job may take the volume only from a job
  that has ended, so two live jobs never share one.
- ``pk = "POOL#<instance type>#<zone>"``: the pool's fleet record, what every job saw
  of spot capacity there (``chalicelib.fleet``).
- ``pk = "BATCH#<token>"`` and ``pk = "STORM"``: the storm path's (``chalicelib.batch``).

Indexes: ``by_state`` (state, created_at) for the sweep and ``GET /jobs?state=``;
``by_created`` (kind, created_at) for ``GET /jobs``.

Every write that changes a job carries ``version = :read_version``; a failed
condition becomes :class:`ConcurrentUpdate`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from chalicelib.errors import (
    Busy,
    ConcurrentUpdate,
    InvalidJobSpec,
    JobNotFound,
    SubmittedBefore,
    VolumeClaimed,
)
from chalicelib.models import LIVE_STATES, Job, JobState

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_dynamodb.type_defs import AttributeValueTypeDef, TransactWriteItemTypeDef

BY_STATE = "by_state"
BY_CREATED = "by_created"
MAX_PAGE = 100
# Reads and conditional writes of a volume's claim before a submission gives up (each
# lost race means another submission claimed or took over the volume meanwhile).
CLAIM_TRIES = 3


def _job_key(job_id: str) -> dict[str, AttributeValueTypeDef]:
    return {"pk": {"S": f"JOB#{job_id}"}}


def _instance_key(instance_id: str) -> dict[str, AttributeValueTypeDef]:
    return {"pk": {"S": f"INSTANCE#{instance_id}"}}


def _volume_key(volume_id: str) -> dict[str, AttributeValueTypeDef]:
    return {"pk": {"S": f"VOLUME#{volume_id}"}}


def _token_key(client_token: str) -> dict[str, AttributeValueTypeDef]:
    return {"pk": {"S": f"TOKEN#{client_token}"}}


def _created_sort_key(job: Job) -> str:
    # Fixed width so string order is time order; the id breaks ties.
    return f"{job.created_at:017.6f}#{job.job_id}"


def _job_item(job: Job) -> dict[str, AttributeValueTypeDef]:
    return {
        **_job_key(job.job_id),
        "kind": {"S": "job"},
        "state": {"S": job.state.value},
        "created_at": {"S": _created_sort_key(job)},
        "version": {"N": str(job.version)},
        "doc": {"S": job.model_dump_json()},
    }


def _job_from_item(item: dict[str, Any]) -> Job:
    return Job.model_validate_json(item["doc"]["S"])


class JobStore:
    """Jobs and the instance index in one DynamoDB table."""

    def __init__(self, client: DynamoDBClient, table_name: str) -> None:
        self._client = client
        self._table = table_name

    def create(self, job: Job) -> None:
        """Store a new job, with what it claims in the same transaction: its
        ``client_token`` (:class:`SubmittedBefore` if a job has it already) and its
        ``volume_id`` (:class:`VolumeClaimed` while a live job holds the volume)."""
        volume_id = job.spec.volume_id
        for _ in range(CLAIM_TRIES):
            holder = None
            if volume_id is not None:
                holder = self._claimant(_volume_key(volume_id))
                if holder is not None:
                    self.refuse_if_live(volume_id, holder, job.spec.client_token)
            if self._create_claiming(job, holder):
                return
        raise Busy(f"volume_id: {volume_id} was claimed and released meanwhile; try again")

    def job_id_for_token(self, client_token: str) -> str | None:
        """The job submitted with this client token, if any."""
        return self._claimant(_token_key(client_token))

    def _claimant(
        self, key: dict[str, AttributeValueTypeDef], consistent: bool = True
    ) -> str | None:
        """The ``job_id`` of the item at ``key`` (an instance's, a token's, a volume's)."""
        response = self._client.get_item(TableName=self._table, Key=key, ConsistentRead=consistent)
        item = response.get("Item")
        return item["job_id"]["S"] if item else None

    def refuse_if_live(self, volume_id: str, holder: str, client_token: str | None = None) -> None:
        """Raise :class:`VolumeClaimed` if job ``holder`` (which has the volume) is live;
        :class:`SubmittedBefore` if it is the job this submission (``client_token``)
        made a moment ago."""
        try:
            held_by = self.get(holder)
        except JobNotFound:
            return
        if client_token is not None and held_by.spec.client_token == client_token:
            raise SubmittedBefore(holder)
        state = held_by.state
        if not state.is_terminal():
            raise VolumeClaimed(
                f"volume_id: {volume_id} is the data volume of job {holder} ({state.value}); "
                "cancel it or wait for it to end"
            )

    def _create_claiming(self, job: Job, holder: str | None) -> bool:
        """The job, its token and its volume claim in one transaction; False when
        another submission changed the volume's claim since we read it (``holder``)."""
        new = {"ConditionExpression": "attribute_not_exists(pk)"}
        mine = {"job_id": {"S": job.job_id}}
        items: list[TransactWriteItemTypeDef] = [
            {"Put": {"TableName": self._table, "Item": _job_item(job), **new}}  # type: ignore[typeddict-item]
        ]
        token = job.spec.client_token
        if token is not None:
            item = {**_token_key(token), **mine}
            items.append({"Put": {"TableName": self._table, "Item": item, **new}})  # type: ignore[typeddict-item]
        volume_id = job.spec.volume_id
        if volume_id is not None:
            taken: dict[str, Any] = {
                "ConditionExpression": "job_id = :holder",
                "ExpressionAttributeValues": {":holder": {"S": holder}},
            }
            item = {**_volume_key(volume_id), **mine}
            condition = new if holder is None else taken
            items.append({"Put": {"TableName": self._table, "Item": item, **condition}})  # type: ignore[typeddict-item]
        if len(items) == 1:
            self._client.put_item(TableName=self._table, Item=_job_item(job), **new)  # type: ignore[arg-type]
            return True
        try:
            # The job's id as the request token: a retry of this call (its answer lost)
            # succeeds again instead of failing on the items it wrote itself.
            self._client.transact_write_items(TransactItems=items, ClientRequestToken=job.job_id)
        except ClientError as exc:
            reasons = exc.response.get("CancellationReasons", [])
            failed = [reason.get("Code") == "ConditionalCheckFailed" for reason in reasons]
            if token is not None and len(failed) > 1 and failed[1]:
                earlier = self.job_id_for_token(token)
                if earlier is not None:
                    raise SubmittedBefore(earlier) from None
            if volume_id is not None and failed and failed[-1]:
                return False
            raise
        return True

    def get(self, job_id: str) -> Job:
        response = self._client.get_item(
            TableName=self._table, Key=_job_key(job_id), ConsistentRead=True
        )
        if "Item" not in response:
            raise JobNotFound(job_id)
        return _job_from_item(response["Item"])

    def save(self, job: Job, new_instances: Sequence[tuple[str, int]] = ()) -> Job:
        """Write ``job`` if nobody wrote since we read version ``job.version``.

        Returns the job with its new version. ``new_instances`` (instance id, attempt)
        are indexed in the same transaction, so an event for a new instance can never
        find the index without the job knowing the instance.
        """
        stored = job.model_copy(update={"version": job.version + 1})
        condition = {
            "ConditionExpression": "#v = :read",
            "ExpressionAttributeNames": {"#v": "version"},
            "ExpressionAttributeValues": {":read": {"N": str(job.version)}},
        }
        try:
            if not new_instances:
                self._client.put_item(TableName=self._table, Item=_job_item(stored), **condition)  # type: ignore[arg-type]
            else:
                items: list[TransactWriteItemTypeDef] = [
                    {"Put": {"TableName": self._table, "Item": _job_item(stored), **condition}}  # type: ignore[typeddict-item]
                ]
                items += [
                    {
                        "Put": {
                            "TableName": self._table,
                            "Item": {
                                **_instance_key(instance_id),
                                "job_id": {"S": job.job_id},
                                "attempt": {"N": str(attempt)},
                            },
                        }
                    }
                    for instance_id, attempt in new_instances
                ]
                self._client.transact_write_items(TransactItems=items)
        except ClientError as exc:
            code = exc.response["Error"]["Code"]
            if code in ("ConditionalCheckFailedException", "TransactionCanceledException"):
                raise ConcurrentUpdate(job.job_id) from exc
            raise
        return stored

    def job_id_for_instance(self, instance_id: str) -> str | None:
        return self._claimant(_instance_key(instance_id), consistent=False)

    def page(
        self, state: JobState | None, limit: int, page_token: str | None
    ) -> tuple[list[Job], str | None]:
        """Newest first; ``page_token`` is what the previous page returned."""
        if state is None:
            index, condition, values = BY_CREATED, "kind = :k", {":k": {"S": "job"}}
        else:
            index, condition, values = BY_STATE, "#s = :k", {":k": {"S": state.value}}
        query: dict[str, Any] = {
            "TableName": self._table,
            "IndexName": index,
            "KeyConditionExpression": condition,
            "ExpressionAttributeValues": values,
            "ScanIndexForward": False,
            "Limit": min(limit, MAX_PAGE),
        }
        if state is not None:
            query["ExpressionAttributeNames"] = {"#s": "state"}
        if page_token:
            index_key = "kind" if state is None else "state"
            query["ExclusiveStartKey"] = _decode_token(page_token, {"pk", index_key, "created_at"})
        try:
            response = self._client.query(**query)
        except ClientError as exc:
            if page_token and exc.response["Error"]["Code"] == "ValidationException":
                raise InvalidJobSpec("next_token: not a token for this query") from exc
            raise
        jobs = [_job_from_item(item) for item in response.get("Items", [])]
        last = response.get("LastEvaluatedKey")
        return jobs, (_encode_token(last) if last else None)

    def live_job_ids(self) -> list[str]:
        """Every job not yet in a terminal state (what the sweep visits)."""
        job_ids: list[str] = []
        for state in LIVE_STATES:
            job_ids += self._ids_in_state(state)
        return job_ids

    def _ids_in_state(self, state: JobState) -> Iterable[str]:
        paginator = self._client.get_paginator("query")
        pages = paginator.paginate(
            TableName=self._table,
            IndexName=BY_STATE,
            KeyConditionExpression="#s = :s",
            ExpressionAttributeNames={"#s": "state"},
            ExpressionAttributeValues={":s": {"S": state.value}},
            ProjectionExpression="pk",
        )
        for page in pages:
            for item in page.get("Items", []):
                yield item["pk"]["S"].removeprefix("JOB#")


def _encode_token(key: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key, sort_keys=True).encode()).decode()


def _decode_token(token: str, key_names: set[str]) -> dict[str, Any]:
    try:
        key = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, binascii.Error, RecursionError) as exc:
        raise InvalidJobSpec("next_token: not a token this API returned") from exc
    # Only the key attributes of our indexes, as strings: anything else would reach
    # DynamoDB as a malformed ExclusiveStartKey (a 500, not a 400).
    if (
        not isinstance(key, dict)
        or set(key) != key_names
        or not all(
            isinstance(v, dict) and list(v) == ["S"] and isinstance(v["S"], str) and v["S"]
            for v in key.values()
        )
    ):
        raise InvalidJobSpec("next_token: not a token this API returned")
    return key


def table_definition(table_name: str) -> dict[str, Any]:
    """CreateTable arguments: on-demand billing, the two indexes (also used by bootstrap)."""
    return {
        "TableName": table_name,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "state", "AttributeType": "S"},
            {"AttributeName": "kind", "AttributeType": "S"},
            {"AttributeName": "created_at", "AttributeType": "S"},
        ],
        "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}],
        "GlobalSecondaryIndexes": [
            {
                "IndexName": BY_STATE,
                "KeySchema": [
                    {"AttributeName": "state", "KeyType": "HASH"},
                    {"AttributeName": "created_at", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            },
            {
                "IndexName": BY_CREATED,
                "KeySchema": [
                    {"AttributeName": "kind", "KeyType": "HASH"},
                    {"AttributeName": "created_at", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            },
        ],
    }


# Bookkeeping items (a batch's write-ahead record) carry this epoch-seconds attribute;
# DynamoDB's time to live deletes them after it. Jobs and attempts never carry it.
TTL_ATTRIBUTE = "expires_at"


def create_table(client: DynamoDBClient, table_name: str) -> None:
    """Create the jobs table if it does not exist, with its time to live (sandbox, tests,
    bootstrap)."""
    definition = table_definition(table_name)
    try:
        client.create_table(**definition)
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceInUseException":
            raise
    client.get_waiter("table_exists").wait(
        TableName=table_name, WaiterConfig={"Delay": 1, "MaxAttempts": 30}
    )
    ensure_time_to_live(client, table_name)


def ensure_time_to_live(client: DynamoDBClient, table_name: str) -> bool:
    """Turn on the table's time to live on ``TTL_ATTRIBUTE``; whether it was off."""
    ttl = client.describe_time_to_live(TableName=table_name)["TimeToLiveDescription"]
    if ttl.get("TimeToLiveStatus") in ("ENABLED", "ENABLING"):
        return False
    client.update_time_to_live(
        TableName=table_name,
        TimeToLiveSpecification={"AttributeName": TTL_ATTRIBUTE, "Enabled": True},
    )
    return True
