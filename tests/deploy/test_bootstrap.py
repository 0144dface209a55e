"""`spotctl bootstrap` on moto: the first run creates everything, the second changes nothing."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch, fnmatchcase
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from chalicelib import events as ec2_events
from spotctl.bootstrap import Bootstrap, Names, register
from tests.deploy.cfn import load_cfn

ROOT = Path(__file__).resolve().parents[2]
READ_PREFIXES = ("Get", "Describe", "Head", "List")
# What `docker pull` of a private ECR image needs, after `aws ecr get-login-password`
# (ecr:GetAuthorizationToken) has logged docker in (user_data/agent.py's start).
ECR_PULL_ACTIONS = (
    "ecr:BatchCheckLayerAvailability",
    "ecr:BatchGetImage",
    "ecr:GetDownloadUrlForLayer",
)


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
    assert "created queue spotctl-dev-interruption-warnings" in first
    assert "created queue spotctl-dev-interruption-warnings-dlq" in first
    assert "created rule spotctl-dev-InterruptionWarningsToQueue" in first
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
        ("ecr:GetAuthorizationToken", "*"),
        (list(ECR_PULL_ACTIONS), f"arn:aws:ecr:us-east-1:{stage.account}:repository/*"),
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


def allows(document: dict[str, Any], action: str, resource: str) -> bool:
    """Whether a statement of ``document`` allows ``action`` on ``resource`` without a
    condition (IAM's wildcards; actions compare without case, as IAM does)."""

    def listed(value: str | list[str]) -> list[str]:
        return [value] if isinstance(value, str) else value

    return any(
        statement["Effect"] == "Allow"
        and "Condition" not in statement
        and any(fnmatchcase(action.lower(), a.lower()) for a in listed(statement["Action"]))
        and any(fnmatchcase(resource, r) for r in listed(statement["Resource"]))
        for statement in document["Statement"]
    )


def instance_role_policy(session: boto3.session.Session) -> dict[str, Any]:
    iam = session.client("iam")
    found = iam.get_role_policy(RoleName="spotctl-dev-instance", PolicyName="job-files")
    document = found["PolicyDocument"]  # boto3 parses it; its stubs also allow the text
    parsed: dict[str, Any] = json.loads(document) if isinstance(document, str) else dict(document)
    return parsed


def test_the_instance_role_may_pull_images_from_this_accounts_ecr(session, config) -> None:
    """The agent logs docker in to ECR with the instance role, then pulls the job's image."""
    stage = names(session)
    Bootstrap(session, stage, config).run()
    document = instance_role_policy(session)

    # GetAuthorizationToken has no resource type: only "*" grants it.
    assert allows(document, "ecr:GetAuthorizationToken", "*")
    repository = f"arn:aws:ecr:us-east-1:{stage.account}:repository/team/trainer"
    for action in ECR_PULL_ACTIONS:
        assert allows(document, action, repository), action
        # Another account's repositories are not granted (docs/workload-contract.md).
        assert not allows(document, action, "arn:aws:ecr:us-east-1:999999999999:repository/x")
    # Pull only: the instance may not push or change the images jobs run.
    for action in ("ecr:PutImage", "ecr:InitiateLayerUpload", "ecr:BatchDeleteImage"):
        assert not allows(document, action, repository), action


def test_the_instance_role_policy_is_the_templates(session, config) -> None:
    """Path A and path B give instances the same rights (and bootstrap, run beside a
    path B stack, finds the role's policy as it wants it)."""
    stage = names(session)
    Bootstrap(session, stage, config).run()
    role = template_resources()["InstanceRole"]["Properties"]
    (policy,) = role["Policies"]
    assert policy["PolicyName"] == "job-files"
    arns = {"ResultsBucket": f"arn:aws:s3:::{stage.bucket}"}
    wanted = resolve(policy["PolicyDocument"], "dev", arns, stage.account)
    assert instance_role_policy(session) == wanted


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
    # What `chalice deploy` leaves: a rule named <app>-<stage>-<handler>-event, no DLQ.
    events = session.client("events")
    rule = "spotctl-dev-on_interruption_warning-event"
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
        f"set the dead-letter queue and retry policy of rule {rule}",
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
    assert args.no_batch_rule is False
    assert parser.parse_args(["bootstrap", "--no-batch-rule"]).no_batch_rule is True
    assert callable(args.func)


# -- the interruption-warnings queue, as infra/resources.yaml has it ---------------------


def template_resources() -> dict[str, Any]:
    resources: dict[str, Any] = load_cfn((ROOT / "infra" / "resources.yaml").read_text())[
        "Resources"
    ]
    return resources


def resolve(value: Any, stage: str, arns: dict[str, str], account: str | None = None) -> Any:
    """The template's value with each GetAtt .Arn looked up and each Fn::Sub filled in:
    ``${Stage}``, ``${Logical.Arn}``, the partition and region of the moto session, and
    ``${AWS::AccountId}`` when ``account`` is given. A variable it cannot fill fails."""
    if isinstance(value, dict):
        if set(value) == {"Fn::GetAtt"}:
            logical, attribute = value["Fn::GetAtt"]
            assert attribute == "Arn"
            return arns[logical]
        if set(value) == {"Fn::Sub"}:
            variables = {"Stage": stage, "AWS::Partition": "aws", "AWS::Region": "us-east-1"}
            variables |= {f"{logical}.Arn": arn for logical, arn in arns.items()}
            if account is not None:
                variables["AWS::AccountId"] = account
            return re.sub(r"\$\{([^}]+)\}", lambda m: variables[m[1]], value["Fn::Sub"])
        return {k: resolve(v, stage, arns, account) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, stage, arns, account) for v in value]
    return value


def as_sqs_attribute(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, dict) else str(value)


def test_the_warnings_queue_its_dlq_rule_and_policy_are_the_templates(session, config) -> None:
    stage = names(session)
    Bootstrap(session, stage, config).run()
    resources = template_resources()
    sqs = session.client("sqs")
    events = session.client("events")

    def attributes(queue: str) -> dict[str, str]:
        url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
        found: dict[str, str] = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])[
            "Attributes"
        ]
        return found

    queues = {
        "InterruptionWarningsQueue": attributes(stage.warnings_queue),
        "InterruptionWarningsDeadLetterQueue": attributes(stage.warnings_dlq),
        "EventsDeadLetterQueue": attributes(stage.queue),
    }
    rule = events.describe_rule(Name=stage.warnings_rule)
    arns = {logical: queue["QueueArn"] for logical, queue in queues.items()}
    arns["InterruptionWarningsToQueue"] = rule["Arn"]

    for logical in ("InterruptionWarningsQueue", "InterruptionWarningsDeadLetterQueue"):
        wanted = resolve(resources[logical]["Properties"], "dev", arns)
        actual = queues[logical]
        assert actual["QueueArn"].endswith(f":{wanted.pop('QueueName')}")
        if "RedrivePolicy" in wanted:
            redrive = json.loads(actual.pop("RedrivePolicy"))
            assert redrive == wanted.pop("RedrivePolicy")
        # Every other property of the template is an SQS attribute of the same name.
        assert {k: actual.get(k) for k in wanted} == {
            k: as_sqs_attribute(v) for k, v in wanted.items()
        }, logical
    assert queues["InterruptionWarningsQueue"]["VisibilityTimeout"] == "90"

    wanted_rule = resolve(resources["InterruptionWarningsToQueue"]["Properties"], "dev", arns)
    wanted_targets = wanted_rule.pop("Targets")
    assert json.loads(rule.pop("EventPattern")) == wanted_rule.pop("EventPattern")
    assert wanted_rule == {k: rule[k] for k in wanted_rule}  # State, Description
    assert events.list_targets_by_rule(Rule=stage.warnings_rule)["Targets"] == wanted_targets

    wanted_policy = resolve(resources["InterruptionWarningsQueuePolicy"]["Properties"], "dev", arns)
    assert wanted_policy.pop("Queues") == [{"Ref": "InterruptionWarningsQueue"}]
    assert json.loads(queues["InterruptionWarningsQueue"]["Policy"]) == wanted_policy.pop(
        "PolicyDocument"
    )
    assert wanted_policy == {}

    calls = record_calls(session)
    assert Bootstrap(session, stage, config).run() == []
    assert [c for c in calls if not c.startswith(READ_PREFIXES)] == []


def test_the_warnings_rule_has_the_handlers_pattern_and_may_use_the_stages_dlq(
    session, config
) -> None:
    stage = names(session)
    Bootstrap(session, stage, config).run()
    rule = session.client("events").describe_rule(Name=stage.warnings_rule)
    # One pattern for app.py's handler, the template's rule and bootstrap's.
    assert json.loads(rule["EventPattern"]) == ec2_events.INTERRUPTION_WARNING_PATTERN
    # In the stage's rule prefix: the events DLQ takes its failed deliveries, and
    # ensure_rule_targets finds its target already pointing there.
    assert stage.warnings_rule.startswith(stage.rule_prefix)
    sqs = session.client("sqs")
    url = sqs.get_queue_url(QueueName=stage.queue)["QueueUrl"]
    policy = json.loads(
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Policy"])["Attributes"]["Policy"]
    )
    (statement,) = policy["Statement"]
    assert fnmatch(rule["Arn"], statement["Condition"]["ArnLike"]["aws:SourceArn"])


def test_drift_in_the_warnings_queue_and_rule_is_put_back(session, config) -> None:
    stage = names(session)
    Bootstrap(session, stage, config).run()
    sqs = session.client("sqs")
    events = session.client("events")
    url = sqs.get_queue_url(QueueName=stage.warnings_queue)["QueueUrl"]
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "30", "Policy": ""})
    (target,) = events.list_targets_by_rule(Rule=stage.warnings_rule)["Targets"]
    del target["DeadLetterConfig"]
    events.put_targets(Rule=stage.warnings_rule, Targets=[target])
    events.put_rule(Name=stage.warnings_rule, EventPattern=json.dumps({"source": ["aws.ec2"]}))

    changes = Bootstrap(session, stage, config).run()
    assert changes == [
        f"set VisibilityTimeout of queue {stage.warnings_queue}",
        f"updated rule {stage.warnings_rule}",
        f"pointed rule {stage.warnings_rule} at queue {stage.warnings_queue}",
        f"let only rule {stage.warnings_rule} write to {stage.warnings_queue}",
    ]
    assert Bootstrap(session, stage, config).run() == []


def test_no_batch_rule_leaves_the_rule_out_and_removes_one_made_before(session, config) -> None:
    stage = names(session)
    events = session.client("events")
    Bootstrap(session, stage, config).run()
    assert events.list_targets_by_rule(Rule=stage.warnings_rule)["Targets"]

    changes = Bootstrap(session, stage, config, batch_rule=False).run()

    assert changes == [
        f"removed rule {stage.warnings_rule}: warnings go to the per-job handler only"
    ]
    with pytest.raises(ClientError):
        events.describe_rule(Name=stage.warnings_rule)
    sqs = session.client("sqs")
    sqs.get_queue_url(QueueName=stage.warnings_queue)  # the handler's mapping needs it
    assert Bootstrap(session, stage, config, batch_rule=False).run() == []


def test_a_fresh_stage_with_no_batch_rule_never_makes_it(session, config) -> None:
    stage = names(session)
    changes = Bootstrap(session, stage, config, batch_rule=False).run()
    assert f"created queue {stage.warnings_queue}" in changes
    assert not [c for c in changes if "InterruptionWarningsToQueue" in c]
    rules = session.client("events").list_rules(NamePrefix=stage.rule_prefix)["Rules"]
    assert rules == []


def test_a_table_made_before_time_to_live_gets_it(session, config) -> None:
    from chalicelib.store import TTL_ATTRIBUTE, table_definition

    stage = names(session)
    dynamodb = session.client("dynamodb")
    dynamodb.create_table(**table_definition(stage.table))
    changes = Bootstrap(session, stage, config).run()
    assert f"enabled time to live on {TTL_ATTRIBUTE} of {stage.table}" in changes
    ttl = dynamodb.describe_time_to_live(TableName=stage.table)["TimeToLiveDescription"]
    assert (ttl["TimeToLiveStatus"], ttl["AttributeName"]) == ("ENABLED", TTL_ATTRIBUTE)


# -- the targets of the rules `chalice deploy` makes, as infra/resources.yaml has them ------


@dataclass(frozen=True)
class ChaliceRule:
    name: str  # the rule `chalice deploy` puts
    function: str  # the deployed function's name
    sam_function: str  # the function's logical id in `chalice package`'s template
    sam_event: str  # its event's key there (what infra/resources.yaml patches)
    schedule: str | None
    pattern: str | None


def chalice_rules(stage: str) -> list[ChaliceRule]:
    """app.py's EventBridge rules, named by Chalice's own code: the application graph that
    `chalice deploy` plans from (chalice/deploy/appgraph.py), and the logical ids that
    `chalice package` gives the same resources (chalice/package.py)."""
    from chalice.config import Config
    from chalice.deploy import models
    from chalice.deploy.appgraph import ApplicationGraphBuilder, DependencyBuilder
    from chalice.utils import to_cfn_resource_name

    from app import app

    on_disk = json.loads((ROOT / ".chalice" / "config.json").read_text())
    config = Config.create(  # as chalice/cli/factory.py makes it
        chalice_stage=stage,
        app_name=on_disk["app_name"],
        project_dir=str(ROOT),
        chalice_app=app,
        config_from_disk=on_disk,
    )
    graph = ApplicationGraphBuilder().build(config, stage)
    return [
        ChaliceRule(
            name=resource.rule_name,
            function=resource.lambda_function.function_name,
            sam_function=to_cfn_resource_name(resource.lambda_function.resource_name),
            sam_event=to_cfn_resource_name(resource.resource_name),
            schedule=getattr(resource, "schedule_expression", None),
            pattern=getattr(resource, "event_pattern", None),
        )
        for resource in DependencyBuilder().build_dependencies(graph)
        if isinstance(resource, models.CloudWatchEventBase)
    ]


def chalice_deploys_its_rules(account: str) -> None:
    """What every `chalice deploy` does to each rule, through Chalice's own client: put_rule,
    then put_targets with only an id and the function (chalice/awsclient.py)."""
    import botocore.session
    from chalice.awsclient import TypedAWSClient

    botocore_session = botocore.session.get_session()
    botocore_session.set_config_variable("region", "us-east-1")
    client = TypedAWSClient(botocore_session)
    for rule in chalice_rules("dev"):
        client.get_or_create_rule_arn(
            rule.name, schedule_expression=rule.schedule, event_pattern=rule.pattern
        )
        function_arn = f"arn:aws:lambda:us-east-1:{account}:function:{rule.function}"
        client.connect_rule_to_lambda(rule.name, function_arn)


def template_retry_policies(stage: Names) -> dict[str, dict[str, int]]:
    """The RetryPolicy infra/resources.yaml gives the target of each rule, by rule name."""
    resources = template_resources()
    wanted = {
        rule.name: resources[rule.sam_function]["Properties"]["Events"][rule.sam_event][
            "Properties"
        ]["RetryPolicy"]
        for rule in chalice_rules("dev")
    }
    (target,) = resources["InterruptionWarningsToQueue"]["Properties"]["Targets"]
    wanted[stage.warnings_rule] = target["RetryPolicy"]
    return wanted


def assert_every_target_is_the_templates(session: boto3.session.Session, stage: Names) -> None:
    sqs = session.client("sqs")
    url = sqs.get_queue_url(QueueName=stage.queue)["QueueUrl"]
    dlq = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]
    events = session.client("events")
    wanted = template_retry_policies(stage)
    rules = [r["Name"] for r in events.list_rules(NamePrefix=stage.rule_prefix)["Rules"]]
    assert sorted(rules) == sorted(wanted)
    for rule in rules:
        targets = events.list_targets_by_rule(Rule=rule)["Targets"]
        assert targets, rule
        for target in targets:
            assert target.get("DeadLetterConfig") == {"Arn": dlq["QueueArn"]}, rule
            assert target.get("RetryPolicy") == wanted[rule], rule


def test_every_rule_target_gets_the_templates_dlq_and_retries_after_each_chalice_deploy(
    session, config
) -> None:
    stage = names(session)
    Bootstrap(session, stage, config).run()
    chalice_deploys_its_rules(stage.account)
    Bootstrap(session, stage, config).run()
    assert_every_target_is_the_templates(session, stage)

    # A redeploy (the one that passes the API URL, or any later code change)...
    chalice_deploys_its_rules(stage.account)
    events = session.client("events")
    rules = sorted(rule.name for rule in chalice_rules("dev"))
    for rule in rules:
        (target,) = events.list_targets_by_rule(Rule=rule)["Targets"]
        assert "DeadLetterConfig" not in target and "RetryPolicy" not in target, rule

    # ...is why docs/deploy.md runs bootstrap after every `chalice deploy`.
    changes = Bootstrap(session, stage, config).run()
    assert sorted(changes) == [
        f"set the dead-letter queue and retry policy of rule {rule}" for rule in rules
    ]
    assert_every_target_is_the_templates(session, stage)
    assert Bootstrap(session, stage, config).run() == []


def test_a_rule_bootstrap_does_not_know_gets_the_queue_and_keeps_its_retries(
    session, config
) -> None:
    """Such as a path B stack's rule (spotctl-<stage>-<logical id>-<suffix>), whose
    retries the template set."""
    stage = names(session)
    Bootstrap(session, stage, config).run()
    events = session.client("events")
    rule = f"{stage.rule_prefix}OnInstanceStateChangeOnInsta-1A2B3C4D5E6F"
    events.put_rule(Name=rule, EventPattern=json.dumps({"source": ["aws.ec2"]}))
    retries = {"MaximumEventAgeInSeconds": 3600, "MaximumRetryAttempts": 20}
    arn = f"arn:aws:lambda:us-east-1:{stage.account}:function:f"
    events.put_targets(Rule=rule, Targets=[{"Id": "1", "Arn": arn, "RetryPolicy": retries}])

    assert Bootstrap(session, stage, config).run() == [
        f"sent failed deliveries of rule {rule} to the queue"
    ]
    (target,) = events.list_targets_by_rule(Rule=rule)["Targets"]
    assert target["DeadLetterConfig"]["Arn"].endswith(f":{stage.queue}")
    assert target["RetryPolicy"] == retries


# -- docs/deploy.md lists exactly the IAM actions bootstrap's calls need --------------------

# botocore's event names use the service id; IAM uses the service prefix.
_IAM_PREFIX = {"eventbridge": "events"}
# API operations whose IAM action has another name, or that need a second action.
_ACTIONS_OF = {
    "s3:HeadBucket": ["s3:ListBucket"],
    "s3:CreateBucket": ["s3:CreateBucket", "s3:PutBucketOwnershipControls"],  # ObjectOwnership
    "s3:GetBucketEncryption": ["s3:GetEncryptionConfiguration"],
    "s3:PutBucketEncryption": ["s3:PutEncryptionConfiguration"],
    "s3:GetBucketLifecycleConfiguration": ["s3:GetLifecycleConfiguration"],
    "s3:PutBucketLifecycleConfiguration": ["s3:PutLifecycleConfiguration"],
    "s3:GetPublicAccessBlock": ["s3:GetBucketPublicAccessBlock"],
    "s3:PutPublicAccessBlock": ["s3:PutBucketPublicAccessBlock"],
}


def documented_bootstrap_actions() -> set[str]:
    text = (ROOT / "docs" / "deploy.md").read_text()
    bullet = text.split("- `spotctl bootstrap` (exactly the calls it makes", 1)[1]
    bullet = bullet.split("\n- ", 1)[0]
    actions: set[str] = set()
    service = ""
    # `s3:CreateBucket, ListBucket` (HeadBucket), `Get/PutEncryptionConfiguration, ...`:
    # a span without a service continues the one before it.
    for span in re.findall(r"`([^`]+)`", bullet):
        prefixed = re.fullmatch(r"(\w+):(.*)", span, re.DOTALL)
        service, listed = prefixed.groups() if prefixed else (service, span)
        for name in re.split(r",\s*", " ".join(listed.split())):
            if name.startswith("Get/Put"):
                actions |= {f"{service}:Get{name[7:]}", f"{service}:Put{name[7:]}"}
            else:
                actions.add(f"{service}:{name}")
    return actions


def test_the_deployer_iam_in_the_docs_is_exactly_what_bootstrap_calls(session, config) -> None:
    stage = names(session)
    recording = True
    operations: set[str] = set()

    def note(event_name: str, **_: Any) -> None:
        if recording:
            service, operation = event_name.split(".")[1:]
            operations.add(f"{_IAM_PREFIX.get(service, service)}:{operation}")

    session.events.register("before-call.*.*", note)
    Bootstrap(session, stage, config).run()
    # What `chalice deploy` leaves: a rule of the stage without the dead-letter queue.
    recording = False
    events = session.client("events")
    rule = f"{stage.rule_prefix}on_interruption_warning"
    events.put_rule(Name=rule, EventPattern=json.dumps({"source": ["aws.ec2"]}))
    events.put_targets(Rule=rule, Targets=[{"Id": "1", "Arn": "arn:aws:lambda:x"}])
    recording = True
    Bootstrap(session, stage, config).run()
    Bootstrap(session, stage, config, batch_rule=False).run()  # removes the rule
    needed = {action for op in operations for action in _ACTIONS_OF.get(op, [op])}
    documented = documented_bootstrap_actions()
    assert (sorted(documented - needed), sorted(needed - documented)) == ([], [])
