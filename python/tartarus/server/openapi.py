"""Generates the OpenAPI 3.1 document from the route table and the msgspec Structs."""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

import msgspec

from tartarus import __version__
from tartarus.api.security import KeyId, PolicyName
from tartarus.api.types import (
    PROBLEM_MEDIA,
    CodeContextId,
    Pid,
    Port,
    Problem,
    SandboxId,
    SnapshotId,
    TemplateName,
)
from tartarus.server.routing import JSON, NDJSON, OCTETS, SSE, Operation

REF_TEMPLATE = "#/components/schemas/{name}"

# Schemas of the path parameters, by name.
PATH_PARAMS: dict[str, Any] = {
    "id": SandboxId,
    "pid": Pid,
    "template": TemplateName,
    "node": str,
    "snapshot_id": SnapshotId,
    "key_id": KeyId,
    "policy": PolicyName,
    "port": Port,
    "context": CodeContextId,
    # The rest of a proxied URL's path (it may hold slashes).
    "path": str,
}


def _media_schema(media: str, body: Any, refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    if media == OCTETS:
        return {"type": "string", "contentMediaType": OCTETS}
    if media == SSE:
        # Per event (OpenAPI 3.1 has no itemSchema; tools read `schema` as one event):
        # `data` is a JSON document of the item type.
        return {
            "type": "object",
            "required": ["data"],
            "properties": {
                "event": {"type": "string", "enum": ["log"]},
                "id": {"type": "string"},
                "data": {
                    "type": "string",
                    "contentMediaType": JSON,
                    "contentSchema": refs[body],
                },
            },
        }
    if media == NDJSON:
        # A stream of JSON documents, each matching the item schema.
        return {
            "type": "string",
            "description": "one JSON document per event",
            "x-item": refs[body],
        }
    return refs[body]


def _collect_types(ops: list[Operation]) -> list[Any]:
    seen: list[Any] = [Problem]
    for op in ops:
        candidates = [op.body] + [r.body for r in op.replies]
        candidates += [tp for r in op.replies for _, tp in r.alternatives]
        for tp in candidates:
            if tp is not None and tp not in seen:
                seen.append(tp)
    return seen


def _query_parameters(query: type[msgspec.Struct]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    fields = msgspec.structs.fields(query)
    schemas, components = msgspec.json.schema_components(
        [f.type for f in fields], ref_template=REF_TEMPLATE
    )
    params = []
    for f, schema in zip(fields, schemas, strict=True):
        param: dict[str, Any] = {
            "name": f.encode_name,
            "in": "query",
            "required": f.required,
            "schema": schema,
        }
        doc = query.__doc__ or ""
        match = re.search(rf"^\s*{f.name}: (.+)$", doc, re.MULTILINE)
        if match:
            param["description"] = match.group(1).strip()
        if schema.get("type") == "array":
            param["style"] = "form"
            param["explode"] = True
        params.append(param)
    return params, components


def _links(source: Operation, provides: dict[str, str], ops: list[Operation]) -> dict[str, Any]:
    """OpenAPI links from a reply that supplies path parameters (`provides`: name ->
    JSON pointer into its body) to every operation that takes them, the rest of whose
    path parameters the source's own path has: what a client (or a fuzzer) does next
    with what it just got."""
    links: dict[str, Any] = {}
    for target in ops:
        wanted = target.path_params
        if target is source or target.websocket or not set(wanted) & set(provides):
            continue
        if not set(wanted) <= set(provides) | set(source.path_params):
            continue
        links[target.operation_id] = {
            "operationId": target.operation_id,
            "parameters": {
                name: f"$response.body#{provides[name]}"
                if name in provides
                else f"$request.path.{name}"
                for name in wanted
            },
        }
    return links


def build_document(ops: list[Operation]) -> dict[str, Any]:
    types = _collect_types(ops)
    schemas, components = msgspec.json.schema_components(types, ref_template=REF_TEMPLATE)
    refs = dict(zip(types, schemas, strict=True))
    path_schemas, path_components = msgspec.json.schema_components(
        list(PATH_PARAMS.values()), ref_template=REF_TEMPLATE
    )
    components.update(path_components)
    path_param_schema = dict(zip(PATH_PARAMS, path_schemas, strict=True))

    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        if op.websocket:
            continue
        entry: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "tags": [op.tag],
            # What the caller's roles must grant (docs/auth.md).
            "x-permission": op.permission,
        }
        doc = (op.handler.__doc__ or "").strip()
        if doc:
            entry["description"] = doc
        params: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": path_param_schema[name]}
            for name in op.path_params
        ]
        if op.query is not None:
            query_params, query_components = _query_parameters(op.query)
            params.extend(query_params)
            components.update(query_components)
        params.extend(
            {
                "name": h.name,
                "in": "header",
                "required": False,
                "description": h.description,
                "schema": h.schema,
            }
            for h in op.headers
        )
        if params:
            entry["parameters"] = params
        if op.body is not None or (op.body_media == OCTETS and op.method in ("PUT", "POST")):
            entry["requestBody"] = {
                "required": op.body_required,
                "content": {op.body_media: {"schema": _media_schema(op.body_media, op.body, refs)}},
            }
        responses: dict[str, Any] = {}
        for r in op.replies:
            response: dict[str, Any] = {"description": r.description or HTTPStatus(r.status).phrase}
            if r.body is not None or r.media != JSON:
                response["content"] = {
                    media: {"schema": _media_schema(media, body, refs)}
                    for media, body in ((r.media, r.body), *r.alternatives)
                }
            if r.provides:
                response["links"] = _links(op, dict(r.provides), ops)
            responses[str(r.status)] = response
        for status in sorted({400, 401, 403, 413, 422, 500, *op.errors}):
            responses[str(status)] = {
                "description": HTTPStatus(status).phrase,
                "content": {PROBLEM_MEDIA: {"schema": refs[Problem]}},
            }
        paths.setdefault(op.document_path, {})[op.method.lower()] = entry | {"responses": responses}

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tartarus API (Olympus)",
            "version": __version__,
            "description": (
                "Create sandboxes, run commands in them, move files in and out, and follow "
                "their logs. Errors are RFC 9457 problem details. Interactive exec and PTY "
                "use WebSocket endpoints described in docs/api.md."
            ),
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (tsk_...) or a JWT from a configured OIDC "
                    "issuer; the owner's unix socket needs none",
                }
            },
        },
        "security": [{"bearer": []}, {}],
    }


def encode_document(document: dict[str, Any]) -> bytes:
    return msgspec.json.encode(document)
