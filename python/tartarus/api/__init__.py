"""The Olympus API's wire types, shared by the server (`tartarus.server`) and the SDK.

Every request and response body is a msgspec Struct defined here; the OpenAPI document
at `/v1/openapi.json` is generated from them, so the schema and the code cannot drift.
"""
