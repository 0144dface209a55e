"""Expand the packaged SAM template into plain CloudFormation, offline.

Runs in the IaC tools venv (``make deploy-check`` builds it): aws-sam-translator
needs an older pydantic than the Lambda pins, so it cannot live in ``.venv``.
``CodeUri`` becomes a placeholder S3 URI, as ``aws cloudformation package`` would
make it, so the expansion (AWS::Events::Rule, AWS::Lambda::EventInvokeConfig, ...)
can be checked and scanned without uploading anything.

    python infra/sam_to_cfn.py build/deploy/dev/sam.yaml build/deploy/dev/cfn.json
"""

from __future__ import annotations

import copy
import json
import os
import sys
from typing import Any

from cfnlint.decode.decode import decode
from samtranslator.translator.transform import transform


class _NoManagedPolicies:
    """The translator asks IAM for managed policy ARNs; we attach none."""

    def load(self) -> dict[str, str]:
        return {}


def expand(sam_path: str) -> dict[str, Any]:
    template, problems = decode(sam_path)
    if problems or template is None:
        raise SystemExit(f"cannot read {sam_path}: {problems}")
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::Serverless::Function":
            resource["Properties"]["CodeUri"] = "s3://spotctl-artifacts/deployment.zip"
    metadata = {
        name: copy.deepcopy(resource["Metadata"])
        for name, resource in template["Resources"].items()
        if "Metadata" in resource
    }
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    expanded: dict[str, Any] = transform(template, {}, _NoManagedPolicies())
    # The transform drops a function's Metadata; carry it over so the checkov
    # suppressions written on the function reach the AWS::Lambda::Function.
    for name, value in metadata.items():
        resource = expanded["Resources"].get(name)
        if resource is not None and "Metadata" not in resource:
            resource["Metadata"] = value
    return expanded


def main() -> None:
    source, target = sys.argv[1:3]
    with open(target, "w", encoding="utf-8") as out:
        json.dump(expand(source), out, indent=1, sort_keys=True, default=str)


if __name__ == "__main__":
    main()
