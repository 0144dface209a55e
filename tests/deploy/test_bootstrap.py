"""`spotctl bootstrap` on moto: the first run creates everything, the second changes nothing."""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from spotctl.bootstrap import Bootstrap, Names, register

ROOT = Path(__file__).resolve().parents[2]
READ_PREFIXES = ("Get", "Describe", "Head", "List")


@pytest.fixture
def session() -> Iterator[boto3.session.Session]:
    with mock_aws():
        yield boto3.session.Session(region_name="us-east-1")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    shutil.copy(ROOT / ".chalice" / "config.json", path)
    return path


def names(session: boto3.session.Session) -> Names:
    account = session.client("sts").get_caller_identity()["Account"]
    return Names(stage="dev", account=account, region="us-east-1")


def record_calls(session: boto3.session.Session) -> list[str]:
    calls: list[str] = []

    def note(model: Any, **_: Any) -> None:
        calls.append(model.name)

    session.events.register("before-call.*.*", note)
    return calls


def test_first_run_creates_every_resource_and_second_run_changes_nothing(session, config) -> None:
    stage = names(session)
    first = Bootstrap(session, stage, config, new_secret=lambda: "k" * 64).run()
    assert any(c.startswith("created table spotctl-dev-jobs") for c in first)
    assert f"created bucket {stage.bucket}" in first
    assert "created role spotctl-dev-instance" in first
    assert "created instance profile spotctl-dev-instance" in first
    assert "created queue spotctl-dev-events-dlq" in first
    assert "created the signing key /spotctl/dev/signing-key" in first

    calls = record_calls(session)
    second = Bootstrap(session, stage, config, new_secret=lambda: "other").run()
    assert second == []
    writes = [c for c in calls if not c.startswith(READ_PREFIXES)]
    assert writes == [], f"the second run wrote: {writes}"


def test_what_bootstrap_creates_is_what_the_control_plane_expects(session, config) -> None:
    stage = names(session)
    Bootstrap(session, stage, config, new_secret=lambda: "k" * 64).run()

    dynamodb = session.client("dynamodb")
    table = dynamodb.describe_table(TableName="spotctl-dev-jobs")["Table"]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert {i["IndexName"] for i in table["GlobalSecondaryIndexes"]} == {"by_state", "by_created"}
    backups = dynamodb.describe_continuous_backups(TableName="spotctl-dev-jobs")
    pitr = backups["ContinuousBackupsDescription"]["PointInTimeRecoveryDescription"]
    assert pitr["PointInTimeRecoveryStatus"] == "ENABLED"

    s3 = session.client("s3")
    block = s3.get_public_access_block(Bucket=stage.bucket)["PublicAccessBlockConfiguration"]
    assert all(block.values())
    assert s3.get_bucket_encryption(Bucket=stage.bucket)["ServerSideEncryptionConfiguration"]
    assert s3.get_bucket_versioning(Bucket=stage.bucket)["Status"] == "Enabled"

    iam = session.client("iam")
    profile = iam.get_instance_profile(InstanceProfileName="spotctl-dev-instance")
    assert [r["RoleName"] for r in profile["InstanceProfile"]["Roles"]] == ["spotctl-dev-instance"]
    policy = iam.get_role_policy(RoleName="spotctl-dev-instance", PolicyName="job-files")
    statements = policy["PolicyDocument"]["Statement"]
    assert [(s["Action"], s["Resource"]) for s in statements] == [
        ("s3:ListBucket", f"arn:aws:s3:::{stage.bucket}"),
        (["s3:GetObject", "s3:PutObject"], f"arn:aws:s3:::{stage.bucket}/jobs/*"),
    ]

    parameter = session.client("ssm").get_parameter(
        Name="/spotctl/dev/signing-key", WithDecryption=True
    )
    assert parameter["Parameter"]["Type"] == "SecureString"

    written = json.loads(config.read_text())["stages"]["dev"]["environment_variables"]
    assert written["SPOTCTL_BUCKET"] == stage.bucket
    # What the Lambda reads must match what bootstrap made.
    assert written["SPOTCTL_TABLE"] == "spotctl-dev-jobs"
    assert written["SPOTCTL_INSTANCE_PROFILE"] == "spotctl-dev-instance"
    assert written["SPOTCTL_SIGNING_KEY_PARAMETER"] == "/spotctl/dev/signing-key"


def test_the_signing_key_is_never_replaced(session, config) -> None:
    stage = names(session)
    Bootstrap(session, stage, config, new_secret=lambda: "first-key").run()
    Bootstrap(session, stage, config, new_secret=lambda: "second-key").run()
    parameter = session.client("ssm").get_parameter(
        Name="/spotctl/dev/signing-key", WithDecryption=True
    )
    assert parameter["Parameter"]["Value"] == "first-key"


def test_after_chalice_deploy_rules_get_the_queue_and_config_gets_the_api_url_once(
    session, config
) -> None:
    stage = names(session)
    Bootstrap(session, stage, config).run()
    # What `chalice deploy` leaves: a rule named <app>-<stage>-<handler>, no DLQ.
    events = session.client("events")
    rule = "spotctl-dev-on_interruption_warning"
    events.put_rule(Name=rule, EventPattern=json.dumps({"source": ["aws.ec2"]}))
    arn = f"arn:aws:lambda:us-east-1:{stage.account}:function:spotctl-dev-on_interruption_warning"
    events.put_targets(Rule=rule, Targets=[{"Id": "1", "Arn": arn}])

    deployed = config.parent / "deployed"
    deployed.mkdir()
    url = "https://abc123.execute-api.us-east-1.amazonaws.com/api/"
    record = {"resources": [{"resource_type": "rest_api", "rest_api_url": url}]}
    (deployed / "dev.json").write_text(json.dumps(record))

    changes = Bootstrap(session, stage, config).run()
    assert changes == [
        f"sent failed deliveries of rule {rule} to the queue",
        f"set SPOTCTL_API_URL={url.rstrip('/')} in {config}",
    ]
    written = json.loads(config.read_text())["stages"]["dev"]["environment_variables"]
    assert written["SPOTCTL_API_URL"] == url.rstrip("/")
    (target,) = events.list_targets_by_rule(Rule=rule)["Targets"]
    assert target["DeadLetterConfig"]["Arn"].endswith(":spotctl-dev-events-dlq")
    assert Bootstrap(session, stage, config).run() == []


def test_register_adds_the_bootstrap_subcommand() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["bootstrap", "--stage", "prod", "--region", "eu-west-1"])
    assert (args.stage, args.region, args.config) == ("prod", "eu-west-1", ".chalice/config.json")
    assert callable(args.func)
