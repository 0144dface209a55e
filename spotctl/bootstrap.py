"""`spotctl bootstrap`: create what `chalice deploy` does not, idempotently.

For one stage: the jobs table (on-demand, point-in-time recovery, time to live), the
results bucket (encrypted, private, TLS only, versioned), the instance role and profile
(the job prefixes of that bucket, and pulling images from this account's ECR
repositories in the stage's region; nothing else), the dead-letter queue for EventBridge
deliveries, the interruption-warnings queue (with its own dead-letter queue) and the
rule that fills it, the signing key (an SSM SecureString, created once and never
replaced), and the EC2 Spot service-linked role. The queue, its DLQ, the rule and the
queue policy are those of ``infra/resources.yaml``; ``on_interruption_warning_batch``
reads the queue, and `chalice deploy` can map it only once it exists. It then writes the
bucket's name into ``.chalice/config.json`` for the stage. Run again after the first
`chalice deploy`, it also records the API's URL there (the instances report to it; a
redeploy passes it to the functions), points the targets of the EventBridge rules
Chalice made at the dead-letter queue and bounds their retries as the template does.
Every `chalice deploy` drops both from its targets, so run it after each one.

Every step reads first and writes only what differs, so a second run changes
nothing. The names are the ones ``.chalice/config.json`` and the stage's IAM policy
use: ``spotctl-<stage>-jobs``, ``spotctl-<stage>-instance``,
``spotctl-<stage>-events-dlq``, ``spotctl-<stage>-interruption-warnings`` (and
``…-dlq``), ``/spotctl/<stage>/signing-key``.
"""

from __future__ import annotations

import argparse
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from chalicelib.events import INTERRUPTION_WARNING_PATTERN
from chalicelib.store import TTL_ATTRIBUTE, create_table, ensure_time_to_live

if TYPE_CHECKING:
    import boto3

SPOT_SERVICE_ROLE = "AWSServiceRoleForEC2Spot"
SPOT_SERVICE_ROLE_PATH = "/aws-service-role/spot.amazonaws.com/"
DLQ_RETENTION_SECONDS = "1209600"  # 14 days, the most SQS keeps
# The interruption-warnings queue, as InterruptionWarningsQueue in infra/resources.yaml:
# visibility at least the batch handler's 60 s timeout (Lambda requires it), retention
# short (a warning is stale once its instance is gone), three receives, then its DLQ.
WARNINGS_VISIBILITY_SECONDS = "90"
WARNINGS_RETENTION_SECONDS = "600"
WARNINGS_MAX_RECEIVES = 3
# The rule's target, as InterruptionWarningsToQueue's: the warning's two minutes.
WARNINGS_TARGET_ID = "interruption-warnings-queue"
WARNINGS_RETRY_POLICY = {"MaximumEventAgeInSeconds": 120, "MaximumRetryAttempts": 10}
# The retry policy of the target of each rule `chalice deploy` makes, by handler name:
# how long its signal is worth delivering, as infra/resources.yaml gives it to that
# handler's event (a moto test compares them). Chalice sets none, and EventBridge's
# default is 24 hours and 185 attempts; past either bound of a policy, an event goes to
# the dead-letter queue
# (https://docs.aws.amazon.com/eventbridge/latest/userguide/eb-rule-retry-policy.html).
CHALICE_RULE_RETRY_POLICIES = {
    "on_interruption_warning": {"MaximumEventAgeInSeconds": 120, "MaximumRetryAttempts": 10},
    "on_rebalance_recommendation": {"MaximumEventAgeInSeconds": 600, "MaximumRetryAttempts": 10},
    "on_instance_state_change": {"MaximumEventAgeInSeconds": 3600, "MaximumRetryAttempts": 20},
    "sweep": {"MaximumEventAgeInSeconds": 60, "MaximumRetryAttempts": 2},  # next one in 60 s
}
WARNINGS_RULE_DESCRIPTION = "spot interruption warnings to the batch recovery queue"
_MISSING = {
    "NoSuchEntity",
    "NoSuchBucket",
    "404",
    "NotFound",
    "ResourceNotFoundException",
    "ParameterNotFound",
    "AWS.SimpleQueueService.NonExistentQueue",
    "NoSuchPublicAccessBlockConfiguration",
    "ServerSideEncryptionConfigurationNotFoundError",
    "NoSuchBucketPolicy",
    "NoSuchLifecycleConfiguration",
    "OwnershipControlsNotFoundError",
}


def _missing(exc: ClientError) -> bool:
    return exc.response["Error"]["Code"] in _MISSING


def _json(document: dict[str, Any]) -> str:
    return json.dumps(document, sort_keys=True)


def _same_json(text: str | dict[str, Any] | None, document: dict[str, Any]) -> bool:
    if text is None:
        return False
    loaded = json.loads(text) if isinstance(text, str) else text
    return _json(loaded) == _json(document)


def _same_attribute(current: str | None, wanted: str) -> bool:
    """SQS and EventBridge hand back JSON attributes re-serialised; compare their meaning."""
    if current == wanted:
        return True
    if current is None or not wanted.startswith("{"):
        return False
    try:
        loaded, expected = json.loads(current), json.loads(wanted)
    except ValueError:
        return False

    def scalars_as_text(document: Any) -> Any:
        # A redrive policy's maxReceiveCount may come back as 3 or as "3".
        if not isinstance(document, dict):
            return document
        return {k: str(v) if isinstance(v, int | float) else v for k, v in document.items()}

    return _json(scalars_as_text(loaded)) == _json(scalars_as_text(expected))


@dataclass(frozen=True)
class Names:
    stage: str
    account: str
    region: str

    @property
    def table(self) -> str:
        return f"spotctl-{self.stage}-jobs"

    @property
    def bucket(self) -> str:
        return f"spotctl-{self.stage}-{self.account}-{self.region}"

    @property
    def instance_role(self) -> str:
        return f"spotctl-{self.stage}-instance"  # the profile has the same name

    @property
    def queue(self) -> str:
        return f"spotctl-{self.stage}-events-dlq"

    @property
    def warnings_queue(self) -> str:
        return f"spotctl-{self.stage}-interruption-warnings"  # SPOTCTL_WARNINGS_QUEUE

    @property
    def warnings_dlq(self) -> str:
        return f"spotctl-{self.stage}-interruption-warnings-dlq"

    @property
    def warnings_rule(self) -> str:
        # In the stage's rule prefix, so the dead-letter queue's policy lets it write
        # there; named after the template's logical id, which no Chalice handler uses.
        return f"{self.rule_prefix}InterruptionWarningsToQueue"

    @property
    def signing_key(self) -> str:
        return f"/spotctl/{self.stage}/signing-key"

    @property
    def rule_prefix(self) -> str:
        # `chalice deploy` names rules <app>-<stage>-<handler>-event; a CloudFormation
        # stack named spotctl-<stage> gives its rules the same prefix.
        return f"spotctl-{self.stage}-"

    def chalice_rule(self, handler: str) -> str:
        """The rule `chalice deploy` makes for ``handler`` (chalice/deploy/appgraph.py)."""
        return f"{self.rule_prefix}{handler}-event"


def instance_policy(names: Names) -> dict[str, Any]:
    """What the agent needs (the same document as the template's, a moto test checks):
    `aws s3 sync` of its job's prefix, and `docker pull` of a job's image from this
    account's ECR repositories in the stage's region."""
    bucket = names.bucket
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ListJobPrefixes",
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": f"arn:aws:s3:::{bucket}",
                "Condition": {"StringLike": {"s3:prefix": ["jobs/*"]}},
            },
            {
                "Sid": "ReadWriteJobFiles",
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject"],
                "Resource": f"arn:aws:s3:::{bucket}/jobs/*",
            },
            # `aws ecr get-login-password` (user_data/agent.py). The action has no
            # resource type, so only "*" grants it; the token lets docker do no more
            # than the statement below allows.
            # https://docs.aws.amazon.com/service-authorization/latest/reference/list_amazonelasticcontainerregistry.html
            {
                "Sid": "LogInToEcr",
                "Effect": "Allow",
                "Action": "ecr:GetAuthorizationToken",
                "Resource": "*",
            },
            # `docker pull`: read only. Another account's repository would also need its
            # own repository policy to allow this role, and is not granted here.
            {
                "Sid": "PullThisAccountsImages",
                "Effect": "Allow",
                "Action": [
                    "ecr:BatchCheckLayerAvailability",
                    "ecr:BatchGetImage",
                    "ecr:GetDownloadUrlForLayer",
                ],
                "Resource": f"arn:aws:ecr:{names.region}:{names.account}:repository/*",
            },
        ],
    }


_EC2_TRUST = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Service": "ec2.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ],
}


def bucket_policy(bucket: str) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "TlsOnly",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            }
        ],
    }


def _events_may_send(sid: str, queue_arn: str, condition: dict[str, Any]) -> dict[str, Any]:
    """A queue policy letting EventBridge rules that meet ``condition`` send to it."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": sid,
                "Effect": "Allow",
                "Principal": {"Service": "events.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": condition,
            }
        ],
    }


def queue_policy(names: Names, queue_arn: str) -> dict[str, Any]:
    """Any rule of this stage may send failed deliveries to the dead-letter queue."""
    rules = f"arn:aws:events:{names.region}:{names.account}:rule/{names.rule_prefix}*"
    return _events_may_send(
        "EventBridgeRulesOfThisStage", queue_arn, {"ArnLike": {"aws:SourceArn": rules}}
    )


def warnings_queue_policy(queue_arn: str, rule_arn: str) -> dict[str, Any]:
    """Only the warnings rule may write to the warnings queue (same as the template)."""
    return _events_may_send(
        "TheWarningsRuleOnly", queue_arn, {"ArnEquals": {"aws:SourceArn": rule_arn}}
    )


_PUBLIC_ACCESS_BLOCK = {
    "BlockPublicAcls": True,
    "IgnorePublicAcls": True,
    "BlockPublicPolicy": True,
    "RestrictPublicBuckets": True,
}
_ENCRYPTION = {
    "Rules": [
        {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}, "BucketKeyEnabled": True}
    ]
}
_LIFECYCLE = {
    "Rules": [
        {
            "ID": "expire-old-checkpoint-versions",
            "Status": "Enabled",
            "Filter": {"Prefix": ""},
            "NoncurrentVersionExpiration": {"NoncurrentDays": 7},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 2},
        }
    ]
}


@dataclass
class Bootstrap:
    """One stage's resources; each ``ensure_*`` reads, then changes only what differs."""

    session: boto3.session.Session
    names: Names
    config_path: Path | None = None
    # False: no rule puts interruption warnings on the batch queue (the queue stays, for
    # the handler's mapping). A batch's instances can read each other's agent secrets.
    batch_rule: bool = True
    changes: list[str] = field(default_factory=list)
    new_secret: Callable[[], str] = lambda: secrets.token_urlsafe(48)

    def client(self, service: str) -> Any:
        make: Any = self.session.client
        return make(service, region_name=self.names.region)

    def run(self) -> list[str]:
        self.ensure_table()
        self.ensure_bucket()
        self.ensure_instance_role()
        self.ensure_spot_service_role()
        queue_arn = self.ensure_dead_letter_queue()
        self.ensure_interruption_warnings(queue_arn)
        self.ensure_signing_key()
        self.ensure_rule_targets(queue_arn)
        self.ensure_stage_config()
        return self.changes

    def _changed(self, what: str) -> None:
        self.changes.append(what)

    # -- DynamoDB ----------------------------------------------------------------

    def ensure_table(self) -> None:
        dynamodb = self.client("dynamodb")
        try:
            dynamodb.describe_table(TableName=self.names.table)
        except ClientError as exc:
            if not _missing(exc):
                raise
            create_table(dynamodb, self.names.table)
            self._changed(f"created table {self.names.table}")
        backups = dynamodb.describe_continuous_backups(TableName=self.names.table)
        pitr = backups["ContinuousBackupsDescription"].get("PointInTimeRecoveryDescription", {})
        if pitr.get("PointInTimeRecoveryStatus") != "ENABLED":
            dynamodb.update_continuous_backups(
                TableName=self.names.table,
                PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True},
            )
            self._changed(f"enabled point-in-time recovery on {self.names.table}")
        # create_table sets it on a new table; a table made before it did gets it here.
        if ensure_time_to_live(dynamodb, self.names.table):
            self._changed(f"enabled time to live on {TTL_ATTRIBUTE} of {self.names.table}")

    # -- S3 ------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        s3 = self.client("s3")
        bucket = self.names.bucket
        try:
            s3.head_bucket(Bucket=bucket, ExpectedBucketOwner=self.names.account)
        except ClientError as exc:
            if not _missing(exc):
                raise
            kwargs: dict[str, Any] = {"Bucket": bucket, "ObjectOwnership": "BucketOwnerEnforced"}
            if self.names.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.names.region}
            s3.create_bucket(**kwargs)
            self._changed(f"created bucket {bucket}")

        def current(read: Callable[[], Any], key: str) -> Any:
            try:
                return read()[key]
            except ClientError as exc:
                if not _missing(exc):
                    raise
                return None

        block = current(
            lambda: s3.get_public_access_block(Bucket=bucket), "PublicAccessBlockConfiguration"
        )
        if block != _PUBLIC_ACCESS_BLOCK:
            s3.put_public_access_block(
                Bucket=bucket, PublicAccessBlockConfiguration=_PUBLIC_ACCESS_BLOCK
            )
            self._changed(f"blocked public access to {bucket}")
        encryption = current(
            lambda: s3.get_bucket_encryption(Bucket=bucket), "ServerSideEncryptionConfiguration"
        )
        if not encryption or not encryption.get("Rules"):
            s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration=_ENCRYPTION)
            self._changed(f"encrypted {bucket}")
        if s3.get_bucket_versioning(Bucket=bucket).get("Status") != "Enabled":
            s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
            self._changed(f"enabled versioning on {bucket}")
        lifecycle = current(lambda: s3.get_bucket_lifecycle_configuration(Bucket=bucket), "Rules")
        if not lifecycle or [r.get("ID") for r in lifecycle] != [_LIFECYCLE["Rules"][0]["ID"]]:
            s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration=_LIFECYCLE)
            self._changed(f"set the checkpoint version lifecycle on {bucket}")
        policy = current(lambda: s3.get_bucket_policy(Bucket=bucket), "Policy")
        if not _same_json(policy, bucket_policy(bucket)):
            s3.put_bucket_policy(Bucket=bucket, Policy=_json(bucket_policy(bucket)))
            self._changed(f"required TLS on {bucket}")

    # -- IAM -----------------------------------------------------------------------

    def ensure_instance_role(self) -> None:
        iam = self.client("iam")
        name = self.names.instance_role
        try:
            iam.get_role(RoleName=name)
        except ClientError as exc:
            if not _missing(exc):
                raise
            iam.create_role(
                RoleName=name,
                AssumeRolePolicyDocument=_json(_EC2_TRUST),
                Description=(
                    "what the agent on a spotctl instance may do"
                    " (sync its job's files, pull its image)"
                ),
            )
            self._changed(f"created role {name}")
        wanted = instance_policy(self.names)
        try:
            document = iam.get_role_policy(RoleName=name, PolicyName="job-files")["PolicyDocument"]
        except ClientError as exc:
            if not _missing(exc):
                raise
            document = None
        if not _same_json(document, wanted):
            iam.put_role_policy(RoleName=name, PolicyName="job-files", PolicyDocument=_json(wanted))
            self._changed(f"set the job-files policy of {name}")
        try:
            profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        except ClientError as exc:
            if not _missing(exc):
                raise
            profile = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]
            self._changed(f"created instance profile {name}")
        if name not in [role["RoleName"] for role in profile.get("Roles", [])]:
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
            self._changed(f"put role {name} in its instance profile")

    def ensure_spot_service_role(self) -> None:
        """EC2 needs it to launch spot instances; it exists once any spot was requested."""
        iam = self.client("iam")
        roles = iam.list_roles(PathPrefix=SPOT_SERVICE_ROLE_PATH)["Roles"]
        if not roles:
            iam.create_service_linked_role(AWSServiceName="spot.amazonaws.com")
            self._changed(f"created the service-linked role {SPOT_SERVICE_ROLE}")

    # -- SQS and EventBridge ----------------------------------------------------------

    def ensure_dead_letter_queue(self) -> str:
        url, attributes = self._ensure_queue(
            self.names.queue,
            {"MessageRetentionPeriod": DLQ_RETENTION_SECONDS, "SqsManagedSseEnabled": "true"},
        )
        arn: str = attributes["QueueArn"]
        wanted = queue_policy(self.names, arn)
        if not _same_json(attributes.get("Policy"), wanted):
            sqs = self.client("sqs")
            sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": _json(wanted)})
            self._changed(f"let this stage's EventBridge rules write to {self.names.queue}")
        return arn

    def _ensure_queue(self, name: str, wanted: dict[str, str]) -> tuple[str, dict[str, str]]:
        """The queue ``name`` with the ``wanted`` attributes; its URL and attributes."""
        sqs = self.client("sqs")
        try:
            url: str = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        except ClientError as exc:
            if not _missing(exc):
                raise
            url = sqs.create_queue(QueueName=name, Attributes=wanted)["QueueUrl"]
            self._changed(f"created queue {name}")
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        stale = {k: v for k, v in wanted.items() if not _same_attribute(attributes.get(k), v)}
        if stale:
            sqs.set_queue_attributes(QueueUrl=url, Attributes=stale)
            attributes.update(stale)
            self._changed(f"set {', '.join(sorted(stale))} of queue {name}")
        return url, attributes

    def ensure_interruption_warnings(self, dead_letter_arn: str) -> None:
        """The queue `on_interruption_warning_batch` reads, its DLQ, and the rule that puts
        every interruption warning on it (failed deliveries to ``dead_letter_arn``)."""
        _, dlq = self._ensure_queue(
            self.names.warnings_dlq,
            {"MessageRetentionPeriod": DLQ_RETENTION_SECONDS, "SqsManagedSseEnabled": "true"},
        )
        redrive = {"deadLetterTargetArn": dlq["QueueArn"], "maxReceiveCount": WARNINGS_MAX_RECEIVES}
        url, queue = self._ensure_queue(
            self.names.warnings_queue,
            {
                "SqsManagedSseEnabled": "true",
                "VisibilityTimeout": WARNINGS_VISIBILITY_SECONDS,
                "MessageRetentionPeriod": WARNINGS_RETENTION_SECONDS,
                "RedrivePolicy": _json(redrive),
            },
        )
        queue_arn = queue["QueueArn"]

        events = self.client("events")
        rule = self.names.warnings_rule
        if not self.batch_rule:
            self._remove_rule(rule)
            return
        wanted_rule = {
            "EventPattern": _json(INTERRUPTION_WARNING_PATTERN),
            "State": "ENABLED",
            "Description": WARNINGS_RULE_DESCRIPTION,
        }
        try:
            current = events.describe_rule(Name=rule)
        except ClientError as exc:
            if not _missing(exc):
                raise
            current = None
        if current is None or any(
            not _same_attribute(current.get(k), v) for k, v in wanted_rule.items()
        ):
            rule_arn: str = events.put_rule(Name=rule, **wanted_rule)["RuleArn"]
            verb = "created" if current is None else "updated"
            self._changed(f"{verb} rule {rule}")
        else:
            rule_arn = current["Arn"]
        target = {
            "Id": WARNINGS_TARGET_ID,
            "Arn": queue_arn,
            "DeadLetterConfig": {"Arn": dead_letter_arn},
            "RetryPolicy": WARNINGS_RETRY_POLICY,
        }
        targets = events.list_targets_by_rule(Rule=rule)["Targets"]
        current_target: dict[str, Any] = next(
            (t for t in targets if t["Id"] == WARNINGS_TARGET_ID), {}
        )
        if {k: current_target.get(k) for k in target} != target:
            events.put_targets(Rule=rule, Targets=[target])
            self._changed(f"pointed rule {rule} at queue {self.names.warnings_queue}")

        policy = warnings_queue_policy(queue_arn, rule_arn)
        if not _same_json(queue.get("Policy"), policy):
            self.client("sqs").set_queue_attributes(
                QueueUrl=url, Attributes={"Policy": _json(policy)}
            )
            self._changed(f"let only rule {rule} write to {self.names.warnings_queue}")

    def _remove_rule(self, rule: str) -> None:
        """Delete the warnings rule and its targets if they exist (``batch_rule=False``)."""
        events = self.client("events")
        try:
            targets = events.list_targets_by_rule(Rule=rule)["Targets"]
        except ClientError as exc:
            if not _missing(exc):
                raise
            return
        if targets:
            events.remove_targets(Rule=rule, Ids=[t["Id"] for t in targets])
        events.delete_rule(Name=rule)
        self._changed(f"removed rule {rule}: warnings go to the per-job handler only")

    def ensure_rule_targets(self, queue_arn: str) -> None:
        """Every target of this stage's rules sends failed deliveries to the queue, and the
        targets of the rules `chalice deploy` made (none before the first deploy) retry
        only as long as the template's. Chalice has no setting for either, and every
        `chalice deploy` puts each of its targets again with only an id and the function
        (chalice/awsclient.py's connect_rule_to_lambda), which drops both: so this must
        run after every `chalice deploy`."""
        retries = {self.names.chalice_rule(h): p for h, p in CHALICE_RULE_RETRY_POLICIES.items()}
        retries[self.names.warnings_rule] = WARNINGS_RETRY_POLICY
        events = self.client("events")
        paginator = events.get_paginator("list_rules")
        for page in paginator.paginate(NamePrefix=self.names.rule_prefix):
            for rule in page.get("Rules", []):
                name = rule["Name"]
                wanted: dict[str, Any] = {"DeadLetterConfig": {"Arn": queue_arn}}
                # A rule of the prefix that bootstrap did not name (a path B stack's,
                # spotctl-<stage>-<logical id>-<suffix>) keeps the retries it was given.
                if name in retries:
                    wanted["RetryPolicy"] = retries[name]
                targets = events.list_targets_by_rule(Rule=name)["Targets"]
                stale = [t for t in targets if any(t.get(k) != v for k, v in wanted.items())]
                if not stale:
                    continue
                events.put_targets(Rule=name, Targets=[{**t, **wanted} for t in stale])
                if "RetryPolicy" in wanted:
                    self._changed(f"set the dead-letter queue and retry policy of rule {name}")
                else:
                    self._changed(f"sent failed deliveries of rule {name} to the queue")

    # -- SSM -------------------------------------------------------------------------

    def ensure_signing_key(self) -> None:
        ssm = self.client("ssm")
        try:
            ssm.get_parameter(Name=self.names.signing_key)
        except ClientError as exc:
            if not _missing(exc):
                raise
            # Never overwritten: every running job's secret derives from it.
            ssm.put_parameter(
                Name=self.names.signing_key,
                Type="SecureString",
                Value=self.new_secret(),
                Description="spotctl: HMAC key for per-job agent secrets",
            )
            self._changed(f"created the signing key {self.names.signing_key}")

    # -- .chalice/config.json ---------------------------------------------------------

    def ensure_stage_config(self) -> None:
        """The stage's variables in ``.chalice/config.json``: the bucket's name, and once
        `chalice deploy` has run, the API's URL (where instance agents report)."""
        if self.config_path is None:
            return
        config = json.loads(self.config_path.read_text())
        stage = config["stages"].setdefault(self.names.stage, {})
        variables = stage.setdefault("environment_variables", {})
        wanted = {"SPOTCTL_BUCKET": self.names.bucket}
        api_url = deployed_api_url(self.config_path.parent, self.names.stage)
        if api_url:
            wanted["SPOTCTL_API_URL"] = api_url
        changed = {k: v for k, v in wanted.items() if variables.get(k) != v}
        if changed:
            variables.update(changed)
            self.config_path.write_text(json.dumps(config, indent=2) + "\n")
            for key, value in changed.items():
                self._changed(f"set {key}={value} in {self.config_path}")


def deployed_api_url(chalice_dir: Path, stage: str) -> str | None:
    """The REST API URL `chalice deploy` recorded for ``stage``, without the final slash."""
    record = chalice_dir / "deployed" / f"{stage}.json"
    if not record.exists():
        return None
    for resource in json.loads(record.read_text()).get("resources", []):
        if resource.get("resource_type") == "rest_api" and resource.get("rest_api_url"):
            url: str = resource["rest_api_url"]
            return url.rstrip("/")
    return None


def run(args: argparse.Namespace) -> int:
    import boto3  # noqa: PLC0415 - only this command needs it

    session = boto3.session.Session(region_name=args.region)
    region = session.region_name
    if not region:
        print("bootstrap: no region; pass --region or set AWS_REGION")
        return 2
    account = session.client("sts").get_caller_identity()["Account"]
    names = Names(stage=args.stage, account=account, region=region)
    config = Path(args.config) if args.config else None
    changes = Bootstrap(session, names, config, batch_rule=not args.no_batch_rule).run()
    for change in changes:
        print(f"changed: {change}")
    print(f"bootstrap {names.stage} in {account}/{region}: {len(changes)} change(s)")
    return 0


def register(subparsers: Any) -> None:
    """Add `spotctl bootstrap` to the CLI's subcommands."""
    parser = subparsers.add_parser(
        "bootstrap",
        help="create the table, bucket, roles, queues, rule and key `chalice deploy` needs",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--stage", choices=["dev", "prod"], default="dev")
    parser.add_argument("--region", default=None, help="default: the AWS profile's region")
    parser.add_argument(
        "--config",
        default=".chalice/config.json",
        help="Chalice config to write the bucket name into ('' to leave it alone)",
    )
    parser.add_argument(
        "--no-batch-rule",
        action="store_true",
        help="send no interruption warnings to the batch queue (and remove that rule): "
        "every instance of a batch can read the other members' agent secrets",
    )
    parser.set_defaults(func=run)
