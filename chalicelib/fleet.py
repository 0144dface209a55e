"""Pool history shared by every job: one fleet record per pool in the jobs table.

What one job learns about spot capacity in a pool (an instance launched there, one
interrupted, a launch refused for want of capacity) would otherwise be lost to every
other job: their placement sees only their own records. The reconciler shares each
pass's new :class:`~chalicelib.placement.CapacityObservation` here and reads the
offered pools' records before it plans (``placement.pool_histories`` merges them with
the job's own record).

Item ``pk = "POOL#<instance type>#<zone>"``: the observations as a JSON list in
``doc`` (oldest first) and ``version`` for the write condition, as for jobs. An
observation is stored once under its key, so a retried pass or two Lambdas seeing
the same event record it once. The record keeps the history window
(``policy.DEFAULT_TUNING.history_window_hours``) and at most ``MAX_OBSERVATIONS``
observations (well under DynamoDB's 400 KB item limit): older ones are dropped when
it is written, except the start of an instance not known to have ended (a spell that
is still on, kept up to ``OPEN_SPELL_SECONDS``).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from chalicelib import policy
from chalicelib.errors import ConcurrentUpdate
from chalicelib.models import Pool
from chalicelib.placement import CapacityObservation, Seen

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_dynamodb.type_defs import AttributeValueTypeDef

MAX_OBSERVATIONS = 500  # ~200 bytes each: ~100 KB, a quarter of an item's limit
WINDOW_SECONDS = policy.DEFAULT_TUNING.history_window_hours * 3600.0
# A spell still on is kept past the window, but not forever: an instance whose end no
# pass shared (a failed write, a job that failed with it running) would otherwise
# claim the pool's capacity up for good.
OPEN_SPELL_SECONDS = 30 * 86400.0
WRITE_TRIES = 3  # conditional writes lost to other passes before giving up
BATCH_GET_LIMIT = 100  # keys per BatchGetItem (DynamoDB's limit)
READ_TRIES = 3  # BatchGetItem calls for keys DynamoDB left unprocessed

_FIELDS = ("seen", "at", "job_id", "instance_id", "started_at", "max_price", "attempt")


def pool_key(pool: Pool) -> dict[str, AttributeValueTypeDef]:
    return {"pk": {"S": f"POOL#{pool.instance_type}#{pool.az}"}}


def _pool_of(item: Mapping[str, Any]) -> Pool:
    _, instance_type, az = item["pk"]["S"].split("#", 2)
    return Pool(instance_type=instance_type, az=az)


def encode(observations: Iterable[CapacityObservation]) -> str:
    """The ``doc`` of a fleet record; fields that are None are left out."""
    rows = [
        {name: value for name in _FIELDS if (value := getattr(o, name)) is not None}
        for o in observations
    ]
    return json.dumps(rows, separators=(",", ":"))


def decode(doc: str) -> tuple[CapacityObservation, ...]:
    return tuple(
        CapacityObservation(**{**row, "seen": Seen(row["seen"])}) for row in json.loads(doc)
    )


def kept(
    stored: Sequence[CapacityObservation], new: Iterable[CapacityObservation], now: float
) -> tuple[CapacityObservation, ...]:
    """The record after adding ``new`` to ``stored``: each key once (the first
    recorded), oldest first, without what is older than the window (a spell still on
    excepted, up to ``OPEN_SPELL_SECONDS``), at most ``MAX_OBSERVATIONS`` (the newest)."""
    by_key = {o.key: o for o in reversed(stored)}  # the first of a key wins
    for o in new:
        by_key.setdefault(o.key, o)
    ended = {o.instance_id for o in by_key.values() if o.seen in (Seen.INTERRUPTED, Seen.LEFT)}
    since = now - WINDOW_SECONDS
    recent = [
        o
        for o in by_key.values()
        if o.at >= since
        or (
            o.seen is Seen.STARTED
            and o.instance_id not in ended
            and o.at >= now - OPEN_SPELL_SECONDS
        )
    ]
    recent.sort(key=lambda o: (o.at, o.key))
    return tuple(recent[-MAX_OBSERVATIONS:])


class FleetRecords:
    """The fleet records of the pools, in the jobs table."""

    def __init__(self, client: DynamoDBClient, table_name: str) -> None:
        self._client = client
        self._table = table_name

    def read(self, pools: Collection[Pool]) -> dict[Pool, tuple[CapacityObservation, ...]]:
        """The observations of each of ``pools`` that has a record (BatchGetItem,
        eventually consistent: a fact a second late changes one choice at most). Keys
        DynamoDB still leaves unprocessed after ``READ_TRIES`` calls (throttling) are
        planned without, as if they had no record."""
        found: dict[Pool, tuple[CapacityObservation, ...]] = {}
        keys = [pool_key(pool) for pool in sorted(set(pools), key=str)]
        for start in range(0, len(keys), BATCH_GET_LIMIT):
            wanted: dict[str, Any] = {
                self._table: {
                    "Keys": keys[start : start + BATCH_GET_LIMIT],
                    "ProjectionExpression": "pk, doc",
                }
            }
            for _ in range(READ_TRIES):
                response = self._client.batch_get_item(RequestItems=wanted)
                for item in response.get("Responses", {}).get(self._table, []):
                    found[_pool_of(item)] = decode(item["doc"]["S"])
                wanted = dict(response.get("UnprocessedKeys") or {})
                if not wanted:
                    break
        return found

    def record(
        self, observations: Mapping[Pool, Sequence[CapacityObservation]], now: float
    ) -> None:
        """Add ``observations`` to each pool's record: one conditional write per pool
        that gains any. Raises :class:`ConcurrentUpdate` when other writers beat every
        try (the caller logs it and goes on)."""
        for pool, new in sorted(observations.items(), key=lambda item: str(item[0])):
            self._record_in(pool, new, now)

    def _record_in(self, pool: Pool, new: Sequence[CapacityObservation], now: float) -> None:
        key = pool_key(pool)
        for _ in range(WRITE_TRIES):
            item = self._client.get_item(TableName=self._table, Key=key, ConsistentRead=True).get(
                "Item"
            )
            stored = decode(item["doc"]["S"]) if item else ()
            version = int(item["version"]["N"]) if item else 0
            known = {o.key for o in stored}
            fresh = [o for o in new if o.key not in known]
            record = kept(stored, fresh, now)
            if not {o.key for o in fresh} & {o.key for o in record}:
                return  # recorded already (an earlier try, another pass) or too old
            condition: dict[str, Any] = (
                {
                    "ConditionExpression": "#v = :read",
                    "ExpressionAttributeNames": {"#v": "version"},
                    "ExpressionAttributeValues": {":read": {"N": str(version)}},
                }
                if item
                else {"ConditionExpression": "attribute_not_exists(pk)"}
            )
            try:
                self._client.put_item(
                    TableName=self._table,
                    Item={
                        **key,
                        "version": {"N": str(version + 1)},
                        "doc": {"S": encode(record)},
                    },
                    **condition,
                )
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                    raise
                continue  # another pass wrote the record: merge into what it wrote
            return
        raise ConcurrentUpdate(f"POOL#{pool}")
