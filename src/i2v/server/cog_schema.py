"""The model's OpenAPI schema in Cog's shape, generated from `KlingRequest` (never written by hand).

Replicate serves this as `latest_version.openapi_schema`; clients and UIs read `components.schemas.Input`
and `Output` from it. Cog's conventions: enums become their own component referenced through `allOf`,
optional inputs are simply not required (no null type), bounds are inclusive `minimum`/`maximum`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

from ..images import FORMATS, MAX_ASPECT, MAX_BYTES, MIN_SIDE
from ..request import FPS, SHORT_SIDE, KlingRequest
from .states import STATUSES, WEBHOOK_EVENTS

COG_VERSION = (
    "0.23.1"  # the Cog release whose schema conventions this follows (and predict.py is tested with)
)
OUTPUT = {"type": "string", "title": "Output", "format": "uri"}
# i2v's extensions (`x-i2v-*`, ignored by clients that do not know them): the rules the server checks
# beyond the JSON types, so a page or client can check an image and show the output size before uploading.
IMAGE_RULES = {
    "formats": sorted(f"image/{name.lower()}" for name in FORMATS),
    "max_bytes": MAX_BYTES,
    "min_side": MIN_SIDE,
    "max_aspect": MAX_ASPECT,
}
OUTPUT_RULES = {"short_side": SHORT_SIDE, "fps": FPS}


def _cog_property(name: str, prop: dict[str, Any], enums: dict[str, Any]) -> dict[str, Any]:
    prop = copy.deepcopy(prop)
    variants = prop.pop("anyOf", None)
    if variants:  # Optional[T]: Cog writes T and leaves the field out of `required`
        (inner,) = [v for v in variants if v.get("type") != "null"]
        prop = {**inner, **prop}
        if prop.get("default", ...) is None:
            del prop["default"]
    if "exclusiveMaximum" in prop:
        prop["maximum"] = prop.pop("exclusiveMaximum") - 1
    if "exclusiveMinimum" in prop:
        prop["minimum"] = prop.pop("exclusiveMinimum") + 1
    if "enum" in prop:
        enums[name] = {
            "title": name,
            "description": "An enumeration.",
            "enum": prop.pop("enum"),
            "type": prop.pop("type"),
        }
        prop.pop("title", None)
        prop = {"allOf": [{"$ref": f"#/components/schemas/{name}"}], **prop}
    return prop


def input_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """(Input component, enum components) from KlingRequest's JSON schema."""
    source = KlingRequest.model_json_schema()
    enums: dict[str, Any] = {}
    properties = {name: _cog_property(name, prop, enums) for name, prop in source["properties"].items()}
    for name in ("start_image", "end_image"):
        properties[name]["x-i2v-image"] = IMAGE_RULES
    properties["mode"]["x-i2v-output"] = OUTPUT_RULES
    schema = {
        "type": "object",
        "title": "Input",
        "required": source.get("required", []),
        "properties": properties,
    }
    return schema, enums


@cache
def openapi_schema() -> dict[str, Any]:
    """The whole OpenAPI document a Cog model of this predictor would carry."""
    inputs, enums = input_schema()
    ref = lambda name: {"$ref": f"#/components/schemas/{name}"}  # noqa: E731
    json_body = lambda name: {"content": {"application/json": {"schema": ref(name)}}}  # noqa: E731
    response = {"200": {"description": "Successful Response", **json_body("PredictionResponse")}}
    prediction_fields = {
        "id": {"title": "Id", "type": "string"},
        "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
        "webhook": {
            "title": "Webhook",
            "type": "string",
            "format": "uri",
            "maxLength": 65536,
            "minLength": 1,
        },
        "webhook_events_filter": {
            "type": "array",
            "items": ref("WebhookEvent"),
            "default": list(WEBHOOK_EVENTS),
        },
        "output_file_prefix": {"title": "Output File Prefix", "type": "string"},
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {
            "/": {
                "get": {
                    "summary": "Root",
                    "operationId": "root__get",
                    "responses": {"200": {"description": "Successful Response"}},
                }
            },
            "/health-check": {
                "get": {
                    "summary": "Healthcheck",
                    "operationId": "healthcheck_health_check_get",
                    "responses": {"200": {"description": "Successful Response"}},
                }
            },
            "/predictions": {
                "post": {
                    "summary": "Predict",
                    "operationId": "predict_predictions_post",
                    "requestBody": json_body("PredictionRequest"),
                    "responses": response,
                }
            },
            "/predictions/{prediction_id}": {
                "put": {
                    "summary": "Predict Idempotent",
                    "operationId": "predict_idempotent_predictions__prediction_id__put",
                    "requestBody": json_body("PredictionRequest"),
                    "responses": response,
                }
            },
            "/predictions/{prediction_id}/cancel": {
                "post": {
                    "summary": "Cancel",
                    "operationId": "cancel_predictions__prediction_id__cancel_post",
                    "responses": {"200": {"description": "Successful Response"}},
                }
            },
        },
        "components": {
            "schemas": {
                "Input": inputs,
                "Output": OUTPUT,
                **enums,
                "Status": {
                    "title": "Status",
                    "description": "An enumeration.",
                    "enum": list(STATUSES),
                    "type": "string",
                },
                "WebhookEvent": {
                    "title": "WebhookEvent",
                    "description": "An enumeration.",
                    "enum": list(WEBHOOK_EVENTS),
                    "type": "string",
                },
                "PredictionRequest": {
                    "title": "PredictionRequest",
                    "type": "object",
                    "properties": {"input": ref("Input"), **prediction_fields},
                },
                "PredictionResponse": {
                    "title": "PredictionResponse",
                    "type": "object",
                    "properties": {
                        "input": ref("Input"),
                        "output": ref("Output"),
                        "id": {"title": "Id", "type": "string"},
                        "version": {"title": "Version", "type": "string"},
                        "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
                        "started_at": {"title": "Started At", "type": "string", "format": "date-time"},
                        "completed_at": {"title": "Completed At", "type": "string", "format": "date-time"},
                        "logs": {"title": "Logs", "type": "string", "default": ""},
                        "error": {"title": "Error", "type": "string"},
                        "status": ref("Status"),
                        "metrics": {"title": "Metrics", "type": "object"},
                    },
                },
            }
        },
    }


def version_id(engine_model: str | None) -> str:
    """A 64-hex version id that changes when the schema or the served model changes."""
    text = json.dumps(openapi_schema(), sort_keys=True) + "\n" + (engine_model or "default")
    return hashlib.sha256(text.encode()).hexdigest()


# Cog's runtime (coglet) validates inputs against `.cog/openapi_schema.json` in the model's folder, which
# `cog build` writes; without it `/openapi.json` is 503 and inputs reach predict() unchecked. The file is
# shipped in the repository, generated here (tests/test_cog_predictor.py fails when it drifts):
#     python -m i2v.server.cog_schema
SHIPPED_SCHEMA = Path(".cog") / "openapi_schema.json"


def schema_text() -> str:
    return json.dumps(openapi_schema(), indent=2) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else SHIPPED_SCHEMA
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(schema_text())
    print(f"wrote {target}")
