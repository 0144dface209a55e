"""The CloudFormation template that `chalice package --merge-template` produces holds
everything the control plane needs, wired as the code expects.

`make deploy-check` packages both stages and passes the output directory in
SPOTCTL_DEPLOY_OUT (with the SAM expansion made by infra/sam_to_cfn.py); run alone,
these tests package the dev stage themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import (
    WARNINGS_BATCH_SIZE,
    WARNINGS_BATCHING_WINDOW_SECONDS,
    WARNINGS_MAX_CONCURRENCY,
)
from chalicelib import events
from chalicelib.store import TTL_ATTRIBUTE, table_definition
from tests.deploy.cfn import load_cfn

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    given = os.environ.get("SPOTCTL_DEPLOY_OUT")
    if given:
        yield Path(given) / "dev"
        return
    out = tmp_path_factory.mktemp("package") / "dev"
    env = {
        **os.environ,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "offline",
        "AWS_SECRET_ACCESS_KEY": "offline",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
    }
    chalice = Path(sys.executable).parent / "chalice"
    subprocess.run(
        [str(chalice), "package", "--stage", "dev", "--template-format", "yaml",
         "--merge-template", "infra/resources.yaml", str(out)],
        cwd=ROOT, env=env, check=True, capture_output=True,
    )  # fmt: skip
    yield out


@pytest.fixture(scope="module")
def template(packaged: Path) -> dict[str, Any]:
    loaded = load_cfn((packaged / "sam.yaml").read_text())
    return loaded


def resources_of(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == kind}


HANDLERS = {
    "OnInterruptionWarning": events.INTERRUPTION_WARNING_PATTERN,
    "OnRebalanceRecommendation": events.REBALANCE_PATTERN,
    "OnInstanceStateChange": events.STATE_CHANGE_PATTERN,
}
DLQ_ARN = {"Fn::GetAtt": ["EventsDeadLetterQueue", "Arn"]}
WARNINGS_QUEUE_ARN = {"Fn::GetAtt": ["InterruptionWarningsQueue", "Arn"]}
BATCH_HANDLER = "OnInterruptionWarningBatch"
LAUNCHING_FUNCTIONS = [*HANDLERS, BATCH_HANDLER, "Sweep"]


def test_each_ec2_rule_carries_the_exact_pattern_its_handler_registers(template) -> None:
    for function, pattern in HANDLERS.items():
        (event,) = template["Resources"][function]["Properties"]["Events"].values()
        assert event["Type"] == "CloudWatchEvent"
        assert event["Properties"]["Pattern"] == pattern


def test_the_sweep_runs_every_minute(template) -> None:
    (event,) = template["Resources"]["Sweep"]["Properties"]["Events"].values()
    assert event == {
        "Type": "Schedule",
        "Properties": {
            "Schedule": "rate(1 minute)",
            "DeadLetterConfig": {"Arn": DLQ_ARN},
            "RetryPolicy": {"MaximumEventAgeInSeconds": 60, "MaximumRetryAttempts": 2},
        },
    }


def test_failed_deliveries_and_failed_async_runs_go_to_the_dead_letter_queue(template) -> None:
    queue = template["Resources"]["EventsDeadLetterQueue"]
    assert queue["Properties"]["QueueName"] == {"Fn::Sub": "spotctl-${Stage}-events-dlq"}
    assert queue["Properties"]["SqsManagedSseEnabled"] is True
    for function in [*HANDLERS, "Sweep"]:
        properties = template["Resources"][function]["Properties"]
        assert properties["DeadLetterQueue"] == {"Type": "SQS", "TargetArn": DLQ_ARN}
        (event,) = properties["Events"].values()
        assert event["Properties"]["DeadLetterConfig"] == {"Arn": DLQ_ARN}
    policy = template["Resources"]["EventsDeadLetterQueuePolicy"]
    (statement,) = policy["Properties"]["PolicyDocument"]["Statement"]
    assert statement["Principal"] == {"Service": "events.amazonaws.com"}


def test_the_table_matches_what_the_store_queries(template) -> None:
    (table,) = resources_of(template, "AWS::DynamoDB::Table").values()
    properties = table["Properties"]
    expected = table_definition("x")
    assert properties["TableName"] == {"Fn::Sub": "spotctl-${Stage}-jobs"}
    assert properties["BillingMode"] == "PAY_PER_REQUEST"
    assert properties["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert properties["KeySchema"] == expected["KeySchema"]
    assert properties["GlobalSecondaryIndexes"] == expected["GlobalSecondaryIndexes"]
    assert sorted(properties["AttributeDefinitions"], key=str) == sorted(
        expected["AttributeDefinitions"], key=str
    )
    assert table["DeletionPolicy"] == "Retain"
    # Both paths leave encryption at DynamoDB's default, the AWS-owned key (docs/deploy.md):
    # SSEEnabled true would switch the template's table to the KMS key aws/dynamodb.
    assert "SSESpecification" not in properties
    assert "SSESpecification" not in expected
    assert properties["TimeToLiveSpecification"] == {
        "AttributeName": TTL_ATTRIBUTE,
        "Enabled": True,
    }


def test_the_bucket_is_encrypted_private_and_kept(template) -> None:
    (bucket,) = resources_of(template, "AWS::S3::Bucket").values()
    properties = bucket["Properties"]
    assert properties["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    rule = properties["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms")
    assert bucket["DeletionPolicy"] == "Retain"
    for function in [*LAUNCHING_FUNCTIONS, "APIHandler"]:
        variables = template["Resources"][function]["Properties"]["Environment"]["Variables"]
        assert variables["SPOTCTL_BUCKET"] == {"Ref": "ResultsBucket"}


def test_the_instance_role_reaches_the_job_prefixes_and_pulls_this_accounts_images(
    template,
) -> None:
    role = template["Resources"]["InstanceRole"]["Properties"]
    (policy,) = role["Policies"]
    statements = policy["PolicyDocument"]["Statement"]
    actions = {
        (s["Sid"], a)
        for s in statements
        for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    }
    assert actions == {
        ("ListJobPrefixes", "s3:ListBucket"),
        ("ReadWriteJobFiles", "s3:GetObject"),
        ("ReadWriteJobFiles", "s3:PutObject"),
        # user_data/agent.py: `aws ecr get-login-password`, then `docker pull`.
        ("LogInToEcr", "ecr:GetAuthorizationToken"),
        ("PullThisAccountsImages", "ecr:BatchCheckLayerAvailability"),
        ("PullThisAccountsImages", "ecr:BatchGetImage"),
        ("PullThisAccountsImages", "ecr:GetDownloadUrlForLayer"),
    }
    resources = {s["Sid"]: s["Resource"] for s in statements}
    assert resources["PullThisAccountsImages"] == {
        "Fn::Sub": "arn:${AWS::Partition}:ecr:${AWS::Region}:${AWS::AccountId}:repository/*"
    }
    # The one "*" is GetAuthorizationToken's, which has no resource type.
    assert [s["Sid"] for s in statements if s["Resource"] == "*"] == ["LogInToEcr"]
    profile = template["Resources"]["InstanceProfile"]["Properties"]
    assert profile["InstanceProfileName"] == {"Fn::Sub": "spotctl-${Stage}-instance"}
    assert role["RoleName"] == profile["InstanceProfileName"]


def test_tracing_is_on_for_the_functions_and_the_api(template) -> None:
    for function in resources_of(template, "AWS::Serverless::Function").values():
        assert function["Properties"]["Tracing"] == "Active"
    assert template["Resources"]["RestAPI"]["Properties"]["TracingEnabled"] is True


def test_every_function_role_carries_the_stage_policy(template) -> None:
    policy = json.loads((ROOT / ".chalice" / "policy-dev.json").read_text())
    for name, role in resources_of(template, "AWS::IAM::Role").items():
        if name == "InstanceRole":
            continue
        (inline,) = role["Properties"]["Policies"]
        assert inline["PolicyDocument"] == policy, name


def test_the_lambda_zip_holds_the_instance_files_as_real_files(packaged: Path) -> None:
    with zipfile.ZipFile(packaged / "deployment.zip") as bundle:
        names = set(bundle.namelist())
        for name in ("agent.py", "bootstrap.sh", "cloud-init.sh"):
            path = f"chalicelib/user_data/{name}"
            assert path in names
            assert bundle.read(path) == (ROOT / "user_data" / name).read_bytes()


def test_the_expansion_has_one_rule_per_ec2_pattern_and_the_schedule(packaged: Path) -> None:
    expanded = packaged / "cfn.json"
    if not expanded.exists():
        pytest.skip("the SAM expansion is made by `make deploy-check` (IaC venv)")
    rules = resources_of(json.loads(expanded.read_text()), "AWS::Events::Rule")
    patterns = [r["Properties"].get("EventPattern") for r in rules.values()]
    # Plus the warnings' second rule, to the batch queue.
    wanted = [*HANDLERS.values(), events.INTERRUPTION_WARNING_PATTERN]
    assert sorted(json.dumps(p, sort_keys=True) for p in patterns if p) == sorted(
        json.dumps(p, sort_keys=True) for p in wanted
    )
    schedules = [r["Properties"].get("ScheduleExpression") for r in rules.values()]
    schedules = [s for s in schedules if s]
    assert schedules == ["rate(1 minute)"]
    for rule in rules.values():
        (target,) = rule["Properties"]["Targets"]
        assert target["DeadLetterConfig"] == {"Arn": DLQ_ARN}


def test_the_functions_that_launch_know_where_agents_report(template) -> None:
    url = {"Fn::Sub": "https://${RestAPI}.execute-api.${AWS::Region}.${AWS::URLSuffix}/api"}
    for function in LAUNCHING_FUNCTIONS:
        variables = template["Resources"][function]["Properties"]["Environment"]["Variables"]
        assert variables["SPOTCTL_API_URL"] == url


@pytest.mark.parametrize("stage", ["dev", "prod"])
def test_deployed_stages_trace_with_xray(stage: str) -> None:
    config = json.loads((ROOT / ".chalice" / "config.json").read_text())
    assert config["stages"][stage]["xray"] is True


USER_ROUTES = {("/jobs", "get"), ("/jobs", "post"), ("/jobs/{job_id}", "get")}
USER_ROUTES |= {("/jobs/{job_id}", "delete")}
# The agent's reports carry the job's secret (instances have no IAM identity for the
# API); the OpenAPI description is public.
OPEN_ROUTES = {("/jobs/{job_id}/reports", "post"), ("/openapi.json", "get")}


def test_user_routes_need_sigv4_and_the_agent_route_needs_none(template) -> None:
    """API Gateway imports `awsSigv4` as AuthorizationType AWS_IAM on each method."""
    api = template["Resources"]["RestAPI"]["Properties"]["DefinitionBody"]
    scheme = api["securityDefinitions"]["sigv4"]
    assert scheme["x-amazon-apigateway-authtype"] == "awsSigv4"
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "Authorization")
    security = {
        (path, method): operation.get("security")
        for path, operations in api["paths"].items()
        for method, operation in operations.items()
    }
    assert set(security) == USER_ROUTES | OPEN_ROUTES, "classify every new route here"
    for route in USER_ROUTES:
        assert security[route] == [{"sigv4": []}], route
    for route in OPEN_ROUTES:
        assert security[route] is None, route


@pytest.mark.parametrize("stage", ["dev", "prod"])
def test_deployed_stages_authorise_users_with_iam(stage: str) -> None:
    config = json.loads((ROOT / ".chalice" / "config.json").read_text())
    assert config["stages"][stage]["environment_variables"]["SPOTCTL_AUTH"] == "iam"


# -- the storm path: warnings -> queue -> batch handler ---------------------------------


def test_the_warnings_queue_is_encrypted_short_lived_and_redriven_to_its_own_dlq(
    template,
) -> None:
    resources = template["Resources"]
    queue = resources["InterruptionWarningsQueue"]["Properties"]
    dlq = resources["InterruptionWarningsDeadLetterQueue"]["Properties"]
    assert queue["QueueName"] == {"Fn::Sub": "spotctl-${Stage}-interruption-warnings"}
    assert dlq["QueueName"] == {"Fn::Sub": "spotctl-${Stage}-interruption-warnings-dlq"}
    assert queue["SqsManagedSseEnabled"] is True and dlq["SqsManagedSseEnabled"] is True
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {
        "Fn::GetAtt": ["InterruptionWarningsDeadLetterQueue", "Arn"]
    }
    assert queue["RedrivePolicy"]["maxReceiveCount"] >= 2
    timeout = resources[BATCH_HANDLER]["Properties"]["Timeout"]
    assert queue["VisibilityTimeout"] >= timeout, "Lambda refuses a shorter visibility"
    assert queue["MessageRetentionPeriod"] <= 3600, "a warning is stale within minutes"


def test_a_rule_puts_every_interruption_warning_on_the_queue_and_only_it_may(
    template,
) -> None:
    resources = template["Resources"]
    rule = resources["InterruptionWarningsToQueue"]
    assert rule["Type"] == "AWS::Events::Rule"
    assert rule["Properties"]["State"] == "ENABLED"
    assert rule["Properties"]["EventPattern"] == events.INTERRUPTION_WARNING_PATTERN
    (target,) = rule["Properties"]["Targets"]
    assert target["Arn"] == WARNINGS_QUEUE_ARN
    assert target["DeadLetterConfig"] == {"Arn": DLQ_ARN}
    policy = resources["InterruptionWarningsQueuePolicy"]["Properties"]
    assert policy["Queues"] == [{"Ref": "InterruptionWarningsQueue"}]
    (statement,) = policy["PolicyDocument"]["Statement"]
    assert statement["Principal"] == {"Service": "events.amazonaws.com"}
    assert statement["Action"] == "sqs:SendMessage"
    assert statement["Resource"] == WARNINGS_QUEUE_ARN
    assert statement["Condition"] == {
        "ArnEquals": {"aws:SourceArn": {"Fn::GetAtt": ["InterruptionWarningsToQueue", "Arn"]}}
    }


def test_the_batch_handler_reads_the_queue_in_batches_reporting_item_failures(
    template,
) -> None:
    function = template["Resources"][BATCH_HANDLER]
    assert function["Properties"]["Handler"] == "app.on_interruption_warning_batch"
    assert function["DependsOn"] == ["InterruptionWarningsQueue"]
    (event,) = function["Properties"]["Events"].values()
    assert event["Type"] == "SQS"
    properties = event["Properties"]
    config = json.loads((ROOT / ".chalice" / "config.json").read_text())
    queue = config["stages"]["dev"]["environment_variables"]["SPOTCTL_WARNINGS_QUEUE"]
    assert queue == "spotctl-dev-interruption-warnings"
    assert properties["Queue"] == {
        "Fn::Sub": f"arn:${{AWS::Partition}}:sqs:${{AWS::Region}}:${{AWS::AccountId}}:{queue}"
    }
    assert properties["BatchSize"] == WARNINGS_BATCH_SIZE
    assert properties["MaximumBatchingWindowInSeconds"] == WARNINGS_BATCHING_WINDOW_SECONDS
    assert properties["ScalingConfig"] == {"MaximumConcurrency": WARNINGS_MAX_CONCURRENCY}
    assert properties["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


def test_the_expansion_maps_the_queue_to_the_batch_handler(packaged: Path) -> None:
    expanded = packaged / "cfn.json"
    if not expanded.exists():
        pytest.skip("the SAM expansion is made by `make deploy-check` (IaC venv)")
    resources = json.loads(expanded.read_text())["Resources"]
    (mapping,) = resources_of({"Resources": resources}, "AWS::Lambda::EventSourceMapping").values()
    properties = mapping["Properties"]
    assert properties["FunctionName"] == {"Ref": BATCH_HANDLER}
    assert "interruption-warnings" in json.dumps(properties["EventSourceArn"])
    assert properties["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert properties["BatchSize"] == WARNINGS_BATCH_SIZE
    assert "InterruptionWarningsQueue" in resources[BATCH_HANDLER]["DependsOn"]
