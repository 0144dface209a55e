"""A property-based fuzz run of the HTTP API, over real HTTP (Chalice's local server)
against moto: valid requests built from the same constraints as the models behind
``/openapi.json``, and hostile mutations of them (wrong types, NaN and Infinity, lone
surrogates, NUL, control characters, huge numbers and strings, duplicate keys, broken
and deep JSON, non-UTF-8, oversized bodies and headers, malformed job ids, unknown
queries, wrong and missing credentials, other jobs' secrets, other methods).

After every request: no 5xx; and if the API refused it (4xx), the table, the
instances and the volumes are exactly as before. ``SPOTCTL_FUZZ_REQUESTS`` sets how
many requests (default 1,000, the CI size); the figures are printed and written to
``build/fuzz/figures.json``.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moto.dynamodb.models import dynamodb_backends
from moto.ec2.models import ec2_backends

from chalicelib.agent_auth import derive_secret
from chalicelib.pricing import ON_DEMAND_USD_PER_HOUR
from tests.functional.conftest import SIGNING_KEY, TABLE, TOKEN, Env

ROOT = Path(__file__).resolve().parents[2]
REQUESTS = int(os.environ.get("SPOTCTL_FUZZ_REQUESTS", "1000"))
ACCOUNT = "123456789012"  # moto's default account
REGION = "us-east-1"
ZONES = ["us-east-1a", "us-east-1b", "us-east-1c"]


# -- what is sent ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    route: str  # "submit", "list", "job", "report", "openapi", "other"
    job: tuple[str, Any]  # how to pick the job id: ("known", index) | ("literal", text)
    query: tuple[tuple[str, str], ...]
    credentials: str  # "token", "none", "wrong", "own-secret", "other-secret", "huge"
    extra_headers: tuple[tuple[str, str], ...]
    content_type: str
    body: bytes


printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
# Hypothesis draws short strings; long ones are repeated.
long_text = st.builds(
    lambda text, times: text * times,
    st.text(printable, min_size=1, max_size=3),
    st.sampled_from([200, 1500, 5000]),
)
hostile_chars = st.one_of(
    st.characters(),  # any code point hypothesis likes, but no surrogates
    st.characters(categories=["Cs"]),  # lone surrogates (json.dumps escapes them)
    st.sampled_from(["\x00", "\n", "\r", "\t", "\x7f", "\u202e", "\ufeff", "é", "😀"]),
)
hostile_text = st.one_of(
    st.text(hostile_chars, max_size=40),
    long_text,
    st.sampled_from(["", " ", "..", "../etc", "/abs", "NaN", "null", "0", "-1", "1e999"]),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    hostile_text,
)
hostile_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(hostile_chars, max_size=8), inner)
    ),
    max_leaves=8,
)

bucket = st.from_regex(r"[a-z0-9][a-z0-9-]{1,20}[a-z0-9]", fullmatch=True)
valid_spec = st.fixed_dictionaries(
    {
        "name": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", fullmatch=True),
        "command": st.lists(st.text(printable, min_size=1, max_size=20), min_size=1, max_size=6),
        "instance_types": st.lists(
            st.sampled_from(sorted(ON_DEMAND_USD_PER_HOUR)), min_size=1, max_size=3, unique=True
        ),
        "volume_gib": st.integers(min_value=1, max_value=16384),
    },
    optional={
        "availability_zones": st.lists(st.sampled_from(ZONES), min_size=1, unique=True),
        "image": st.from_regex(r"[a-z0-9][a-z0-9._/:-]{0,30}", fullmatch=True),
        "results_s3_uri": st.builds(
            lambda b, k: f"s3://{b}/{k}",
            bucket,
            st.from_regex(r"[a-z0-9/_-]{0,30}", fullmatch=True),
        ),
        "expected_hours": st.floats(min_value=0.01, max_value=1000),
        "max_price_per_hour": st.floats(min_value=0.01, max_value=100),
        "max_restarts_on_errors": st.integers(min_value=0, max_value=10),
        "env": st.dictionaries(
            st.from_regex(r"[A-Z][A-Z0-9_]{0,10}", fullmatch=True).filter(
                lambda name: not name.startswith("SPOTCTL_")
            ),
            st.text(printable, max_size=30),
            max_size=4,
        ),
        "recover_on_exit_codes": st.lists(
            st.integers(min_value=1, max_value=255), max_size=4, unique=True
        ),
        "deadline": st.sampled_from(["2027-01-01T00:00:00Z", "2029-06-30T12:00:00+02:00"]),
        "checkpoint": st.fixed_dictionaries(
            {},
            optional={
                "directory": st.from_regex(r"[a-z0-9_-]{1,20}", fullmatch=True),
                "stop_signal": st.sampled_from(["TERM", "INT", "USR1", "USR2"]),
                "grace_seconds": st.integers(min_value=5, max_value=110),
                "sync_interval_seconds": st.integers(min_value=60, max_value=86400),
            },
        ),
    },
)
SPEC_FIELDS = [
    "name",
    "command",
    "instance_types",
    "volume_gib",
    "volume_id",
    "snapshot_id",
    "availability_zones",
    "image",
    "results_s3_uri",
    "expected_hours",
    "max_price_per_hour",
    "max_restarts_on_errors",
    "recover_on_exit_codes",
    "env",
    "deadline",
    "checkpoint",
]
FIELDS = [*SPEC_FIELDS, "attempt", "kind", "exit_code", "detail"]


@st.composite
def mutated_object(draw: st.DrawFn, base: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    body = dict(draw(base))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        how = draw(st.sampled_from(["replace", "drop", "add", "nested"]))
        if how == "replace" or not body:
            body[draw(st.sampled_from(FIELDS))] = draw(hostile_values)
        elif how == "drop":
            body.pop(draw(st.sampled_from(sorted(body))))
        elif how == "add":
            body[draw(st.text(hostile_chars, max_size=12))] = draw(hostile_values)
        else:
            key = draw(st.sampled_from(["grace_seconds", "directory", "stop_signal", "x"]))
            body["checkpoint"] = {key: draw(hostile_values)}
    return body


def encode(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8", "surrogatepass")  # NaN/Infinity stay as such


@st.composite
def raw_mutation(draw: st.DrawFn, text: bytes) -> bytes:
    how = draw(
        st.sampled_from(["truncate", "insert", "latin1", "duplicate", "deep", "huge", "constant"])
    )
    if how == "truncate":
        return text[: draw(st.integers(min_value=0, max_value=max(0, len(text) - 1)))]
    if how == "insert":
        at = draw(st.integers(min_value=0, max_value=len(text)))
        return text[:at] + draw(st.binary(min_size=1, max_size=8)) + text[at:]
    if how == "latin1":
        return text[:-1] + b', "name": "r\xe9sum\xe9"}'
    if how == "duplicate":
        return text[:-1] + b', "name": "again"}'
    if how == "deep":
        depth = draw(st.sampled_from([9, 50, 5000, 200_000]))
        return b'{"x": ' + b"[" * depth + b"]" * depth + b"}"
    if how == "huge":
        return text[:-1] + b', "pad": "' + b"x" * (64 * 1024) + b'"}'
    constant = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]))
    return text[:-1] + b', "volume_gib": ' + constant + b"}"


REPORT = st.fixed_dictionaries(
    {
        "attempt": st.integers(min_value=1, max_value=2),
        "kind": st.sampled_from(["started", "checkpoint_synced", "rebalance", "interrupted"]),
    },
    optional={"detail": st.text(printable, max_size=50)},
)


@st.composite
def bodies(draw: st.DrawFn, route: str) -> bytes:
    valid = valid_spec if route != "report" else REPORT
    kind = draw(st.sampled_from(["valid", "mutated", "mutated", "raw", "raw", "other"]))
    if kind == "valid":
        return encode(draw(valid))
    if kind == "mutated":
        return encode(draw(mutated_object(valid)))
    if kind == "raw":
        return draw(raw_mutation(encode(draw(valid))))
    return encode(draw(hostile_values))


QUERY_KEYS = ["state", "limit", "next_token", "delete_volume", "colour", "state"]
query_values = st.one_of(
    st.sampled_from(["RUNNING", "running", "SUBMITTED", "1", "100", "101", "0", "true", "false"]),
    st.sampled_from(["²", "٣", "eyJhIjogeyJYIjogMX19", "e30=", "%%%", "-1", "1e3"]),
    st.text(hostile_chars, max_size=30),
)
job_ids = st.one_of(
    st.tuples(st.just("known"), st.integers(min_value=0, max_value=1000)),
    st.tuples(st.just("literal"), st.from_regex(r"j-[0-9a-f]{16}", fullmatch=True)),
    st.tuples(st.just("literal"), st.text(hostile_chars, min_size=1, max_size=40)),
    st.tuples(
        st.just("literal"),
        st.sampled_from(["j-0123", "J-0123456789ABCDEF", "j-0123456789abcdef0", "..", "%00"]),
    ),
)
header_values = st.one_of(
    st.text(printable, max_size=40),
    st.builds(lambda c, n: c * n, st.sampled_from("ab9"), st.sampled_from([2000, 9000])),
)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    route = draw(
        st.sampled_from(["submit"] * 5 + ["list"] * 2 + ["job"] * 3 + ["report"] * 4 + ["openapi"])
    )
    method = {"submit": "POST", "list": "GET", "report": "POST", "openapi": "GET"}.get(
        route, draw(st.sampled_from(["GET", "DELETE"]))
    )
    if draw(st.integers(min_value=0, max_value=19)) == 0:
        method = draw(st.sampled_from(["PUT", "PATCH", "HEAD", "OPTIONS", "DELETE", "POST"]))
    query: tuple[tuple[str, str], ...] = ()
    if route in ("list", "job") and draw(st.booleans()):
        keys = draw(st.lists(st.sampled_from(QUERY_KEYS), max_size=3))
        query = tuple((key, draw(query_values)) for key in keys)
    credentials = draw(
        st.sampled_from(
            ["token"] * 6 + ["none", "wrong", "own-secret", "other-secret", "huge"]
            if route != "report"
            else ["own-secret"] * 5 + ["other-secret", "token", "none", "wrong", "huge"]
        )
    )
    extra: tuple[tuple[str, str], ...] = ()
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        extra = ((draw(st.from_regex(r"x-[a-z]{1,10}", fullmatch=True)), draw(header_values)),)
    content_type = draw(
        st.sampled_from(["application/json"] * 8 + ["text/plain", "application/json; charset=x"])
    )
    body = draw(bodies(route)) if method in ("POST", "PUT", "PATCH") else b""
    return Request(method, route, draw(job_ids), query, credentials, extra, content_type, body)


# -- how it is sent and judged ----------------------------------------------------------------


@dataclass
class Figures:
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: int = 0
    rejected: int = 0
    rejected_but_written: int = 0
    jobs_created: int = 0
    seconds: float = 0.0
    request_seconds: float = 0.0
    observe_seconds: float = 0.0


class Fuzzer:
    def __init__(self, base: str, env: Env) -> None:
        self.host, port = urllib.parse.urlsplit(base).netloc.split(":")
        self.port = int(port)
        self.env = env
        self.jobs: list[str] = []
        self.figures = Figures()
        self.world = self.observe()

    def observe(self) -> tuple[Any, ...]:
        """The table's items, the instances and the volumes, read from moto's own state
        (the server runs in this process): an API round trip per check would make the
        run ten times slower."""
        table = dynamodb_backends[ACCOUNT][REGION].get_table(TABLE)
        items = sorted(json.dumps(item.to_json(), sort_keys=True) for item in table.all_items())
        ec2 = ec2_backends[ACCOUNT][REGION]
        instances = sorted((i.id, i.state) for i in ec2.all_instances())
        volumes = sorted(
            (v.id, v.status, v.attachment.instance.id if v.attachment else None)
            for v in ec2.describe_volumes()
        )
        return items, instances, volumes

    def job_id(self, how: tuple[str, Any]) -> str:
        kind, value = how
        if kind == "known":
            return self.jobs[value % len(self.jobs)] if self.jobs else "j-0000000000000000"
        return str(value)

    def path(self, request: Request, job_id: str) -> str:
        # Lone surrogates cannot be text on the wire: send their bytes, percent-encoded.
        quoted = urllib.parse.quote(job_id.encode("utf-8", "surrogatepass"), safe="")
        path = {
            "submit": "/jobs",
            "list": "/jobs",
            "job": f"/jobs/{quoted}",
            "report": f"/jobs/{quoted}/reports",
            "openapi": "/openapi.json",
        }[request.route]
        if request.query:
            path += "?" + urllib.parse.urlencode(request.query, errors="surrogatepass")
        return path

    def authorization(self, request: Request, job_id: str) -> str | None:
        def secret_of(job_id: str) -> str:
            # A fuzzed id may hold lone surrogates, which no job id has: any secret will do.
            printable = job_id.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            return derive_secret(SIGNING_KEY, printable)

        other = next((j for j in self.jobs if j != job_id), "j-1111111111111111")
        return {
            "token": f"Bearer {TOKEN}",
            "none": None,
            "wrong": "Bearer " + TOKEN[::-1],
            "own-secret": f"Bearer {secret_of(job_id)}",
            "other-secret": f"Bearer {secret_of(other)}",
            "huge": "Bearer " + "a" * 9000,
        }[request.credentials]

    def send(self, request: Request) -> int:
        job_id = self.job_id(request.job)
        headers = {"Content-Type": request.content_type, **dict(request.extra_headers)}
        authorization = self.authorization(request, job_id)
        if authorization is not None:
            headers["Authorization"] = authorization
        started = time.perf_counter()
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            connection.request(
                request.method, self.path(request, job_id), body=request.body, headers=headers
            )
            response = connection.getresponse()
            status, answer = response.status, response.read()
        finally:
            connection.close()
        figures = self.figures
        figures.request_seconds += time.perf_counter() - started
        figures.sent += 1
        figures.statuses[status] += 1
        figures.server_errors += status >= 500
        assert status < 500, (status, answer[:300])
        started = time.perf_counter()
        after = self.observe()
        figures.observe_seconds += time.perf_counter() - started
        if status >= 400:
            figures.rejected += 1
            if after != self.world:
                figures.rejected_but_written += 1
            assert after == self.world, f"refused with {status} but wrote: {answer[:300]!r}"
        elif request.route == "submit" and status == 201:
            assert after != self.world, "the observer must see what a submission writes"
            figures.jobs_created += 1
            self.jobs.append(json.loads(answer)["job_id"])
        self.world = after
        return status


def test_fuzzed_requests_never_5xx_and_refused_ones_never_write(api_url: str, env: Env) -> None:
    fuzzer = Fuzzer(api_url, env)
    started = time.monotonic()

    @settings(
        max_examples=REQUESTS,
        deadline=None,
        database=None,
        derandomize=os.environ.get("SPOTCTL_FUZZ_RANDOM") != "1",
        suppress_health_check=list(HealthCheck),
    )
    @given(requests())
    def one(request: Request) -> None:
        fuzzer.send(request)

    one()
    figures = fuzzer.figures
    figures.seconds = round(time.monotonic() - started, 1)
    record = {**dataclasses.asdict(figures), "statuses": dict(sorted(figures.statuses.items()))}
    print("\nfuzz figures:", json.dumps(record))
    out = ROOT / "build" / "fuzz"
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures.json").write_text(json.dumps(record, indent=2) + "\n")
    assert figures.sent >= REQUESTS
    assert figures.server_errors == 0
    assert figures.rejected_but_written == 0
    assert figures.jobs_created > 0, "some valid submissions went through"
    assert figures.statuses[200] > 0 and figures.statuses[401] > 0 and figures.statuses[403] > 0
