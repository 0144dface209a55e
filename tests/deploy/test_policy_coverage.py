"""The hand-kept Lambda policies grant exactly the IAM actions the Lambda code needs.

How the needed actions are found, and why no call can slip past silently:

1. Clients are made only in ``chalicelib/clients.py`` (checked: no other module in
   the Lambda calls ``boto3.client``/``resource``/``Session``); the services the Lambda
   can reach are the string literals passed to ``_client`` there.
2. Every call in ``app.py`` and ``chalicelib/`` whose method name is an operation of
   one of those services (botocore's own model, snake-cased) counts, whatever the
   receiver is called: a gateway's ``self._client``, a local ``client``, anything.
   Our own methods that share an operation's name (``Ec2Gateway.create_volume``)
   count too, which can only over-count, never miss.
3. ``get_paginator``/``get_waiter`` must name their operation with a literal; a
   computed name, or ``getattr`` on a client, fails the test instead of hiding a call.
4. What AWS authorises beyond the call itself (tags written by TagSpecifications,
   PassRole for an instance profile, the item actions inside a transaction) and what
   the Lambda service does on the function's behalf (logs, X-Ray, the async dead-letter
   queue) are listed below with their reason.

Recording botocore calls during the functional tests was the alternative; it only
sees the paths the tests happen to run (error branches would be missed), so it is
the weaker check.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore import xform_name

from chalicelib.ec2 import LEAVE_TAG

ROOT = Path(__file__).resolve().parents[2]
CHALICE_DIR = ROOT / ".chalice"
STAGES = ("dev", "prod")

# Instance-side code ships inside chalicelib/ (symlinks) but never runs in the Lambda.
NOT_LAMBDA_CODE = ("chalicelib/user_data/",)

# Functions in chalicelib that the Lambda never runs, and why.
NOT_RUN_BY_LAMBDA = {
    ("chalicelib/store.py", "create_table"): "bootstrap, the sandbox and tests create the "
    "table; the deployed Lambda never does",
    ("chalicelib/store.py", "ensure_time_to_live"): "create_table and bootstrap set the "
    "table's time to live; the deployed Lambda never does",
}

# Actions the Lambda service takes for the function, not the function's code.
RUNTIME_ACTIONS = {
    "logs:CreateLogGroup": "Lambda writes the function's stdout (logs and EMF metrics)",
    "logs:CreateLogStream": "Lambda writes the function's stdout (logs and EMF metrics)",
    "logs:PutLogEvents": "Lambda writes the function's stdout (logs and EMF metrics)",
    "xray:PutTraceSegments": 'tracing is on ("xray": true) for the stage',
    "xray:PutTelemetryRecords": 'tracing is on ("xray": true) for the stage',
    "sqs:SendMessage": "failed asynchronous invocations go to the dead-letter queue "
    "(DeadLetterQueue in infra/resources.yaml)",
    "sqs:ReceiveMessage": "the SQS event source mapping polls the interruption-warnings "
    "queue with the function's role",
    "sqs:DeleteMessage": "the event source mapping deletes the messages the batch handler "
    "did not report failed",
    "sqs:GetQueueAttributes": "the event source mapping reads the queue's attributes",
}

# Actions AWS does not allow to scope to a resource.
UNSCOPED_ACTIONS = {
    "ec2:DescribeInstances",
    "ec2:DescribeVolumes",
    "ec2:DescribeSnapshots",
    "ec2:DescribeSpotPriceHistory",
    "xray:PutTraceSegments",
    "xray:PutTelemetryRecords",
}

_PAGINATE_OR_WAIT = {"get_paginator", "get_waiter", "can_paginate"}
_TRANSACT_ITEM_ACTIONS = {
    "Put": "dynamodb:PutItem",
    "Update": "dynamodb:UpdateItem",
    "Delete": "dynamodb:DeleteItem",
    "ConditionCheck": "dynamodb:ConditionCheckItem",
}


@dataclass(frozen=True)
class Call:
    path: str
    line: int
    function: str
    action: str


def lambda_sources() -> Iterator[Path]:
    yield ROOT / "app.py"
    for path in sorted((ROOT / "chalicelib").rglob("*.py")):
        if not any(path.relative_to(ROOT).as_posix().startswith(p) for p in NOT_LAMBDA_CODE):
            yield path


def reachable_services() -> set[str]:
    tree = ast.parse((ROOT / "chalicelib" / "clients.py").read_text())
    services: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "_client"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            services.add(node.args[0].value)
    return services


@cache
def _operations(service: str) -> dict[str, str]:
    model = botocore.session.get_session().get_service_model(service)
    return {xform_name(op): op for op in model.operation_names}


def _waiter_operation(service: str, waiter: str) -> str:
    model = botocore.session.get_session().get_waiter_model(service)
    operation: str = model.get_waiter(xform_name(waiter, "_").replace("_", "")).operation
    return operation


def _function_of(tree: ast.Module) -> dict[ast.AST, str]:
    """Map every node to the name of its enclosing function ("" at module level)."""
    owner: dict[ast.AST, str] = {}

    def visit(node: ast.AST, name: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = (
                child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else name
            )
            owner[child] = inner
            visit(child, inner)

    visit(tree, "")
    return owner


def _strings_in(tree: ast.Module, function: str, owner: dict[ast.AST, str]) -> set[str]:
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and owner.get(node) == function
    }


def _dynamic_client_access(node: ast.Call) -> bool:
    """``getattr(client, name)`` or ``getattr(x, name)(...)``: a call the scan cannot name."""
    if isinstance(node.func, ast.Call):
        inner = node.func
        if isinstance(inner.func, ast.Name) and inner.func.id == "getattr":
            return True
    if not (isinstance(node.func, ast.Name) and node.func.id == "getattr" and node.args):
        return False
    receiver = ast.unparse(node.args[0]).lower()
    return any(word in receiver for word in ("client", "ec2", "dynamodb", "ssm", "boto"))


def scan() -> tuple[list[Call], list[str]]:
    """Every AWS call in the Lambda code as an IAM action, and every call we could not
    resolve (which fails the test)."""
    services = sorted(reachable_services())
    calls: list[Call] = []
    unresolved: list[str] = []
    for path in lambda_sources():
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text())
        owner = _function_of(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            where = f"{rel}:{node.lineno}"
            if _dynamic_client_access(node):
                unresolved.append(f"{where}: getattr may call a client method by a computed name")
                continue
            if not isinstance(node.func, ast.Attribute):
                continue
            method = node.func.attr
            function = owner.get(node, "")
            if (rel, function) in NOT_RUN_BY_LAMBDA:
                continue
            if rel != "chalicelib/clients.py" and method in {"client", "resource", "Session"}:
                unresolved.append(f"{where}: makes a client outside chalicelib/clients.py")
                continue
            if method in _PAGINATE_OR_WAIT:
                arg = node.args[0] if node.args else None
                if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                    unresolved.append(f"{where}: {method} without a literal operation name")
                    continue
                for service in services:
                    if method == "get_waiter":
                        try:
                            op = _waiter_operation(service, arg.value)
                        except ValueError:
                            continue
                    else:
                        op = _operations(service).get(arg.value, "")
                    if op:
                        calls.append(Call(rel, node.lineno, function, f"{service}:{op}"))
                continue
            for service in services:
                found = _operations(service).get(method)
                if found is None:
                    continue
                op = found
                calls.append(Call(rel, node.lineno, function, f"{service}:{op}"))
                strings = _strings_in(tree, function, owner)
                if (
                    op in ("RunInstances", "CreateVolume", "CreateSnapshot")
                    and "TagSpecifications" in strings
                ):
                    calls.append(Call(rel, node.lineno, function, "ec2:CreateTags"))
                if op == "RunInstances" and "IamInstanceProfile" in strings:
                    calls.append(Call(rel, node.lineno, function, "iam:PassRole"))
                if op == "TransactWriteItems":
                    for key, action in _TRANSACT_ITEM_ACTIONS.items():
                        if key in strings:
                            calls.append(Call(rel, node.lineno, function, action))
    return calls, unresolved


def needed_actions() -> set[str]:
    calls, _ = scan()
    # IAM authorises a transaction by the item actions inside it; there is no
    # dynamodb:TransactWriteItems action to grant.
    code = {c.action for c in calls} - {"dynamodb:TransactWriteItems"}
    return code | set(RUNTIME_ACTIONS)


def load_policy(stage: str) -> dict[str, Any]:
    policy: dict[str, Any] = json.loads((CHALICE_DIR / f"policy-{stage}.json").read_text())
    return policy


def _listed(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def granted(stage: str) -> dict[str, list[dict[str, Any]]]:
    """Action -> the Allow statements that grant it."""
    by_action: dict[str, list[dict[str, Any]]] = {}
    for statement in load_policy(stage)["Statement"]:
        assert statement["Effect"] == "Allow", statement
        for action in _listed(statement["Action"]):
            by_action.setdefault(action, []).append(statement)
    return by_action


def stage_env(stage: str) -> dict[str, str]:
    config = json.loads((CHALICE_DIR / "config.json").read_text())
    env: dict[str, str] = {**config["environment_variables"]}
    env.update(config["stages"][stage]["environment_variables"])
    return env


# -- the scan itself -------------------------------------------------------------


def test_scan_resolves_every_call_in_the_lambda_code() -> None:
    _, unresolved = scan()
    assert unresolved == []


def test_scan_finds_the_calls_the_design_names() -> None:
    actions = {c.action for c in scan()[0]}
    expected = {
        "ec2:RunInstances",
        "ec2:CreateVolume",
        "ec2:AttachVolume",
        "ec2:TerminateInstances",
        "ec2:DeleteVolume",
        "ec2:DescribeInstances",
        "ec2:DescribeVolumes",
        "ec2:DescribeSpotPriceHistory",
        "ec2:CreateSnapshot",
        "ec2:DescribeSnapshots",
        "ec2:CreateTags",
        "iam:PassRole",
        "ssm:GetParameter",
        "dynamodb:GetItem",
        "dynamodb:PutItem",
        "dynamodb:Query",
        "dynamodb:TransactWriteItems",
    }
    assert expected <= actions


def test_code_the_lambda_never_runs_is_not_called_from_the_lambda() -> None:
    for (rel, function), why in NOT_RUN_BY_LAMBDA.items():
        assert why
        for path in lambda_sources():
            if path.relative_to(ROOT).as_posix() == rel:
                continue
            tree = ast.parse(path.read_text())
            names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
            names |= {
                a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
            }
            names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
            assert function not in names, f"{path.name} uses {function}; it runs in the Lambda"


# -- the policies ------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_policy_grants_every_action_the_lambda_needs(stage: str) -> None:
    missing = needed_actions() - set(granted(stage))
    assert not missing, f"policy-{stage}.json lacks {sorted(missing)}"


@pytest.mark.parametrize("stage", STAGES)
def test_policy_grants_nothing_the_lambda_does_not_use(stage: str) -> None:
    unused = set(granted(stage)) - needed_actions()
    assert not unused, f"policy-{stage}.json grants unused {sorted(unused)}"


@pytest.mark.parametrize("stage", STAGES)
def test_policy_uses_star_resources_only_where_aws_allows_nothing_else(stage: str) -> None:
    for action, statements in granted(stage).items():
        for statement in statements:
            if "*" in _listed(statement["Resource"]):
                assert action in UNSCOPED_ACTIONS, f"{action} on every resource"
            assert "*" not in action, f"wildcard action {action}"


@pytest.mark.parametrize("stage", STAGES)
def test_policy_names_the_stage_table_role_and_parameters(stage: str) -> None:
    env = stage_env(stage)
    by_action = granted(stage)

    def resources(action: str) -> set[str]:
        return {r for s in by_action[action] for r in _listed(s["Resource"])}

    table = env["SPOTCTL_TABLE"]
    for action in ("dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:Query"):
        assert resources(action) == {
            f"arn:aws:dynamodb:*:*:table/{table}",
            f"arn:aws:dynamodb:*:*:table/{table}/index/*",
        }
    # The instance profile and its role share a name (bootstrap and the template do so).
    assert resources("iam:PassRole") == {f"arn:aws:iam::*:role/{env['SPOTCTL_INSTANCE_PROFILE']}"}
    ssm = resources("ssm:GetParameter")
    assert f"arn:aws:ssm:*:*:parameter{env['SPOTCTL_SIGNING_KEY_PARAMETER']}" in ssm
    ami_scopes = [r.split(":parameter", 1)[1].rstrip("*") for r in ssm if "/aws/service/" in r]
    assert any(env["SPOTCTL_AMI_PARAMETER"].startswith(scope) for scope in ami_scopes)


@pytest.mark.parametrize("stage", STAGES)
def test_instances_and_volumes_are_acted_on_only_when_tagged_by_spotctl(stage: str) -> None:
    by_action = granted(stage)
    for action in ("ec2:TerminateInstances", "ec2:DeleteVolume"):
        for statement in by_action[action]:
            assert statement["Condition"] == {"Null": {"aws:ResourceTag/spotctl:job-id": "false"}}
    for action in ("ec2:RunInstances", "ec2:CreateVolume"):
        created = [
            s
            for s in by_action[action]
            if any(r.endswith(("instance/*", ":volume/*")) for r in _listed(s["Resource"]))
            and s.get("Condition")
        ]
        assert created, f"{action} must require the spotctl:job-id tag on what it creates"
    # Tags are written while creating, or, on a spotctl instance afterwards, only the
    # one that asks it to leave (the agent reads it in the instance metadata).
    for statement in by_action["ec2:CreateTags"]:
        condition = statement["Condition"]
        if "ec2:CreateAction" in condition.get("StringEquals", {}):
            continue
        assert statement["Resource"] == "arn:aws:ec2:*:*:instance/*"
        assert condition == {
            "Null": {"aws:ResourceTag/spotctl:job-id": "false"},
            "ForAllValues:StringEquals": {"aws:TagKeys": [LEAVE_TAG]},
        }


def test_dev_and_prod_policies_differ_only_in_the_stage_name() -> None:
    dev = json.dumps(load_policy("dev"), sort_keys=True)
    prod = json.dumps(load_policy("prod"), sort_keys=True)
    assert dev.replace("spotctl-dev", "spotctl-prod").replace("/dev/", "/prod/") == prod


@pytest.mark.parametrize("stage", STAGES)
def test_only_the_stage_warnings_queue_is_polled(stage: str) -> None:
    queue = stage_env(stage)["SPOTCTL_WARNINGS_QUEUE"]
    assert queue == f"spotctl-{stage}-interruption-warnings"
    by_action = granted(stage)
    for action in ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"):
        (statement,) = by_action[action]
        assert statement["Resource"] == f"arn:aws:sqs:*:*:{queue}"
