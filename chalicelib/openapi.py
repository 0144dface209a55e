"""The API's OpenAPI 3 description, built from the pydantic models that validate input.

Served at ``GET /openapi.json``; ``docs/openapi.json`` is a copy that a test keeps
current. Request schemas come from the models themselves, so the description cannot
drift from what the API accepts.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel

from chalicelib.models import JOB_ID, JobSpec, JobState
from chalicelib.service import (
    MAX_BODY_BYTES,
    AgentReport,
    CancelQuery,
    ListQuery,
)

REF = "#/components/schemas/{model}"
_MODELS: tuple[type[BaseModel], ...] = (JobSpec, AgentReport)


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}},
    }


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(model=ref)}}},
    }


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template=REF)
    required = set(schema.get("required", ()))
    return [
        {"name": name, "in": "query", "required": name in required, "schema": prop}
        for name, prop in schema["properties"].items()
    ]


def _schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in _MODELS:
        schema = model.model_json_schema(ref_template=REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    job_state = {"type": "string", "enum": [state.value for state in JobState]}
    schemas["JobState"] = job_state
    schemas["Error"] = {
        "type": "object",
        "required": ["Code", "Message"],
        "properties": {
            "Code": {"type": "string"},
            "Message": {"type": "string", "description": "names the field at fault"},
        },
    }
    summary_properties: dict[str, Any] = {
        "job_id": {"type": "string", "pattern": f"^{JOB_ID.pattern}$"},
        "name": {"type": "string"},
        "state": {"$ref": REF.format(model="JobState")},
        "created_at": {"type": "string", "format": "date-time"},
        "attempts": {"type": "integer"},
        "cost_usd": {"type": "number"},
    }
    schemas["JobSummary"] = {
        "type": "object",
        "required": sorted(summary_properties),
        "properties": summary_properties,
    }
    schemas["JobPage"] = {
        "type": "object",
        "required": ["jobs", "next_token"],
        "properties": {
            "jobs": {"type": "array", "items": {"$ref": REF.format(model="JobSummary")}},
            "next_token": {"type": ["string", "null"]},
        },
    }
    schemas["Job"] = {
        "type": "object",
        "description": "A job's summary plus its spec, attempts, events and costs "
        "(never its secret or the secret's hash).",
        "required": [*sorted(summary_properties), "spec", "events"],
        "properties": {
            **summary_properties,
            "attempts": {"type": "array", "items": {"type": "object"}},
            "spec": {"$ref": REF.format(model="JobSpec")},
            "updated_at": {"type": "string", "format": "date-time"},
            "volume": {"type": ["object", "null"]},
            "volume_move": {"type": ["object", "null"]},
            "kept_after_moves": {"type": "array", "items": {"type": "string"}},
            "interruptions": {"type": "integer"},
            "on_demand_cost_usd": {"type": "number"},
            "saved_usd": {"type": "number"},
            "exit_code": {"type": ["integer", "null"]},
            "error_restarts": {"type": "integer"},
            "exit_code_restarts": {"type": "integer"},
            "failure": {"type": ["string", "null"]},
            "wait_until": {"type": ["string", "null"], "format": "date-time"},
            "cancel_requested_at": {"type": ["string", "null"], "format": "date-time"},
            "delete_volume_on_cancel": {"type": "boolean"},
            "results_uri": {"type": ["string", "null"]},
            "data_synced_at": {"type": ["string", "null"], "format": "date-time"},
            "events": {"type": "array", "items": {"type": "object"}},
        },
    }
    schemas["ReportAccepted"] = {
        "type": "object",
        "required": ["job_id", "state"],
        "properties": {
            "job_id": {"type": "string"},
            "state": {"$ref": REF.format(model="JobState")},
        },
    }
    return dict(sorted(schemas.items()))


_JOB_ID_PARAMETER = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": f"^{JOB_ID.pattern}$"},
}
_USER_SECURITY: list[dict[str, list[str]]] = [{"sigv4": []}, {"sandboxToken": []}]
_USER_ERRORS = {
    "400": _error("invalid input; the message names the field"),
    "401": _error("no valid credentials (sandbox token)"),
    "403": _error("not allowed (API Gateway, SigV4)"),
}


@cache
def document() -> dict[str, Any]:
    body_limit = f"Bodies over {MAX_BODY_BYTES} bytes are refused with 413."
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "spotctl",
            "version": "1",
            "description": "Jobs on EC2 Spot that survive interruptions. " + body_limit,
        },
        "paths": {
            "/jobs": {
                "post": {
                    "operationId": "submitJob",
                    "security": _USER_SECURITY,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": REF.format(model="JobSpec")}}
                        },
                    },
                    "responses": {
                        "201": _json("Job", "the job, stored and on its way"),
                        **_USER_ERRORS,
                        "409": _error(
                            "the volume_id is the data volume of a live job, or the "
                            "client_token made a job from another spec"
                        ),
                        "413": _error("body too large"),
                        "503": _error(
                            "busy: other writers kept changing the volume's claim (asking "
                            "again will do); or, with Code NotConfiguredError, the "
                            "deployment lacks a setting (asking again will not)"
                        ),
                    },
                },
                "get": {
                    "operationId": "listJobs",
                    "security": _USER_SECURITY,
                    "parameters": _query_parameters(ListQuery),
                    "responses": {"200": _json("JobPage", "newest first"), **_USER_ERRORS},
                },
            },
            "/jobs/{job_id}": {
                "parameters": [_JOB_ID_PARAMETER],
                "get": {
                    "operationId": "getJob",
                    "security": _USER_SECURITY,
                    "responses": {
                        "200": _json("Job", "the job"),
                        **_USER_ERRORS,
                        "404": _error("no such job"),
                    },
                },
                "delete": {
                    "operationId": "cancelJob",
                    "security": _USER_SECURITY,
                    "parameters": _query_parameters(CancelQuery),
                    "responses": {
                        "200": _json("Job", "cancel requested"),
                        **_USER_ERRORS,
                        "404": _error("no such job"),
                        "409": _error("the job already succeeded or failed"),
                        "503": _error("busy: the job kept changing; the cancel was not stored"),
                    },
                },
            },
            "/jobs/{job_id}/reports": {
                "parameters": [_JOB_ID_PARAMETER],
                "post": {
                    "operationId": "reportFromAgent",
                    "description": "For the instance agent only, with its job's secret.",
                    "security": [{"jobSecret": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": REF.format(model="AgentReport")}
                            }
                        },
                    },
                    "responses": {
                        "200": _json("ReportAccepted", "recorded"),
                        "400": _error("invalid report"),
                        "403": _error("not this job's secret (or no such job)"),
                        "409": _error("the job's state does not allow it"),
                        "413": _error("body too large"),
                    },
                },
            },
            "/openapi.json": {
                "get": {
                    "operationId": "describeApi",
                    "security": [],
                    "responses": {"200": {"description": "this document"}},
                },
            },
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "sigv4": {
                    "type": "apiKey",
                    "name": "Authorization",
                    "in": "header",
                    "description": "AWS SigV4 (execute-api); deployed stages",
                },
                "sandboxToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the sandbox's token (SPOTCTL_API_TOKEN)",
                },
                "jobSecret": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the per-job secret in the instance's user data",
                },
            },
        },
    }
