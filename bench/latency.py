"""Recovery latency: from an interruption warning reaching the handler to the
replacement's RunInstances request leaving it, against moto in server mode on
loopback (real HTTP), over many jobs.

Also counts the AWS calls one recovery makes (EC2 and DynamoDB, by operation).

    .venv/bin/python -m bench.latency [--runs 200]

Writes bench/results/latency.json and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
EVENTS = Path(__file__).parent.parent / "tests" / "fixtures" / "aws-events"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def warning_event(instance_id: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS / "spot-interruption-warning.json").read_text())
    event["detail"]["instance-id"] = instance_id
    event["resources"] = [f"arn:aws:ec2:us-east-1:123456789012:instance/{instance_id}"]
    return event


API_TOKEN = "bench-token"  # noqa: S105 - a local stand-in, as the sandbox uses


def state_event(instance_id: str, state: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS / f"state-change-{state}.json").read_text())
    event["detail"]["instance-id"] = instance_id
    return event


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args(argv)

    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        MOTO_EC2_LOAD_DEFAULT_AMIS="false",
        SPOTCTL_TABLE="spotctl-bench",
        SPOTCTL_SIGNING_KEY="bench-key",
        SPOTCTL_AUTH="token",
        SPOTCTL_API_TOKEN=API_TOKEN,
        SPOTCTL_API_URL="http://127.0.0.1:9/api",
        POWERTOOLS_LOG_LEVEL="WARNING",
        LOG_LEVEL="WARNING",
    )
    import boto3
    from chalice.test import Client
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    try:
        return _run(args.runs, boto3, Client)
    finally:
        server.stop()


def _run(runs: int, boto3: Any, client_class: Any) -> int:
    from chalicelib import runtime
    from chalicelib.log import logger
    from chalicelib.store import create_table

    logger.setLevel("WARNING")
    ec2 = boto3.client("ec2")
    os.environ["SPOTCTL_AMI_ID"] = ec2.register_image(Name="bench")["ImageId"]
    create_table(boto3.client("dynamodb"), "spotctl-bench")
    runtime.reset()
    plane = runtime.control_plane()

    calls: Counter[str] = Counter()
    sent: dict[str, float] = {}

    def count(event_name: str, **_: Any) -> None:
        service, operation = event_name.split(".")[1:]
        calls[f"{service}:{operation}"] += 1

    def run_instances_sent(**_: Any) -> None:
        sent.setdefault("run_instances", time.perf_counter())

    ec2_client = plane.reconciler.ec2._client
    ddb_client = plane.store._client
    ec2_client.meta.events.register("before-call.ec2", count)
    ddb_client.meta.events.register("before-call.dynamodb", count)
    ec2_client.meta.events.register("before-send.ec2.RunInstances", run_instances_sent)

    from app import app

    spec = {
        "name": "bench",
        "command": ["python", "train.py"],
        "instance_types": ["g4dn.xlarge", "g5.xlarge"],
        "volume_gib": 10,
    }
    latencies_ms: list[float] = []
    handler_ms: list[float] = []
    per_recovery: list[Counter[str]] = []
    with client_class(app) as client:
        for _ in range(runs):
            response = client.http.post(
                "/jobs",
                headers={
                    "content-type": "application/json",
                    "authorization": f"Bearer {API_TOKEN}",
                },
                body=json.dumps(spec),
            )
            job = json.loads(response.body)
            instance_id = job["attempts"][0]["instance_id"]
            client.lambda_.invoke("on_instance_state_change", state_event(instance_id, "running"))

            calls.clear()
            sent.clear()
            start = time.perf_counter()
            client.lambda_.invoke("on_interruption_warning", warning_event(instance_id))
            end = time.perf_counter()
            if "run_instances" not in sent:
                print("no replacement was requested", file=sys.stderr)
                return 1
            latencies_ms.append((sent["run_instances"] - start) * 1000)
            handler_ms.append((end - start) * 1000)
            per_recovery.append(Counter(calls))

    typical = per_recovery[len(per_recovery) // 2]
    dynamodb_reads = sum(
        n
        for op, n in typical.items()
        if op in ("dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query")
    )
    dynamodb_writes = sum(
        n for op, n in typical.items() if op in ("dynamodb:PutItem", "dynamodb:TransactWriteItems")
    )
    ec2_calls = {op: n for op, n in typical.items() if op.startswith("ec2:")}
    result = {
        "runs": runs,
        "warning_to_run_instances_ms": {
            "p50": round(percentile(latencies_ms, 50), 2),
            "p99": round(percentile(latencies_ms, 99), 2),
            "max": round(max(latencies_ms), 2),
        },
        "handler_total_ms": {
            "p50": round(percentile(handler_ms, 50), 2),
            "p99": round(percentile(handler_ms, 99), 2),
        },
        "calls_per_recovery": dict(sorted(typical.items())),
        "ec2_calls_per_recovery": ec2_calls,
        "dynamodb_reads_per_recovery": dynamodb_reads,
        "dynamodb_writes_per_recovery": dynamodb_writes,
        "identical_call_mix_in_every_run": all(c == typical for c in per_recovery),
        "mean_ms": round(statistics.fmean(latencies_ms), 2),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latency.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
