"""The sandbox's speed-ups change how fast moto answers, never what it answers.

moto is called in process by the proxy, finds a resource's tags by one lookup, and
backs up only the items a DynamoDB transaction touches (spotctl.sandbox.moto_patch).
"""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from spotctl.sandbox import LocalCloud
from tests.sandbox.conftest import launch

TABLE = "speed"


def test_describe_by_tag_key_shows_each_resource_with_its_own_tags(
    cloud: LocalCloud, ec2: Any
) -> None:
    tagged = launch(
        ec2,
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": "spotctl:job-id", "Value": "j-1"}]}
        ],
    )
    other = launch(
        ec2,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "x"}]}],
    )
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": "tag-key", "Values": ["spotctl:job-id"]}],
        PaginationConfig={"PageSize": 1000},
    )
    found = {i["InstanceId"]: i for p in pages for r in p["Reservations"] for i in r["Instances"]}
    assert list(found) == [tagged]
    assert found[tagged]["Tags"] == [{"Key": "spotctl:job-id", "Value": "j-1"}]
    shown = ec2.describe_instances(InstanceIds=[other])["Reservations"][0]["Instances"][0]
    assert shown["Tags"] == [{"Key": "Name", "Value": "x"}]
    assert ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [other]}])["Tags"] == [
        {"Key": "Name", "Value": "x", "ResourceId": other, "ResourceType": "instance"}
    ]


@pytest.fixture
def table(cloud: LocalCloud) -> Any:
    client = cloud.client("dynamodb")
    client.create_table(
        TableName=TABLE,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    client.put_item(TableName=TABLE, Item={"pk": {"S": "a"}, "v": {"N": "1"}})
    return client


def test_a_transaction_whose_condition_fails_writes_nothing(table: Any) -> None:
    with pytest.raises(ClientError) as caught:
        table.transact_write_items(
            TransactItems=[
                {"Put": {"TableName": TABLE, "Item": {"pk": {"S": "new"}}}},
                {"Put": {"TableName": TABLE, "Item": {"pk": {"S": "a"}, "v": {"N": "9"}}}},
                {
                    "Put": {
                        "TableName": TABLE,
                        "Item": {"pk": {"S": "b"}},
                        "ConditionExpression": "attribute_exists(pk)",
                    }
                },
            ]
        )
    assert caught.value.response["Error"]["Code"] == "TransactionCanceledException"
    items = table.scan(TableName=TABLE)["Items"]
    assert items == [{"pk": {"S": "a"}, "v": {"N": "1"}}]


def test_a_transaction_that_succeeds_writes_every_item(table: Any) -> None:
    table.transact_write_items(
        TransactItems=[
            {
                "Put": {
                    "TableName": TABLE,
                    "Item": {"pk": {"S": "a"}, "v": {"N": "2"}},
                    "ConditionExpression": "v = :one",
                    "ExpressionAttributeValues": {":one": {"N": "1"}},
                }
            },
            {"Put": {"TableName": TABLE, "Item": {"pk": {"S": "b"}}}},
        ]
    )
    items = sorted(table.scan(TableName=TABLE)["Items"], key=lambda i: i["pk"]["S"])
    assert items == [{"pk": {"S": "a"}, "v": {"N": "2"}}, {"pk": {"S": "b"}}]


def test_describe_by_instance_id_filter_shows_only_the_asked_instances(
    cloud: LocalCloud, ec2: Any
) -> None:
    batch = ec2.run_instances(
        ImageId="ami-12345678",
        MinCount=3,
        MaxCount=3,
        InstanceType="p3.2xlarge",
        Placement={"AvailabilityZone": "us-east-1a"},
    )
    ids = sorted(i["InstanceId"] for i in batch["Instances"])
    alone = launch(ec2)
    found = ec2.describe_instances(
        Filters=[{"Name": "instance-id", "Values": [ids[0], ids[2], "i-0000000000000000f"]}]
    )["Reservations"]
    assert [sorted(i["InstanceId"] for i in r["Instances"]) for r in found] == [[ids[0], ids[2]]]
    everything = ec2.describe_instances()["Reservations"]
    assert sorted(len(r["Instances"]) for r in everything) == [1, 3]
    assert alone in {i["InstanceId"] for r in everything for i in r["Instances"]}
