"""The OpenAPI document at /openapi.json: FastAPI's, saying what the server really does. Torch-free."""

from __future__ import annotations

from fastapi import FastAPI


def openapi(app: FastAPI) -> dict:
    """FastAPI's document, saying what the server really does: bearer tokens, and errors as {"error"} with a 4xx
    (never FastAPI's 422 validation body)."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    # Infer is a FastRoute (plain ASGI, run by the front), which FastAPI does not describe: described here by hand.
    tensors = {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": {"type": "object"}}, "outputs": {"type": "array", "items": {"type": "object"}}}}
    body = {"required": True, "content": {"application/json": {"schema": tensors},
                                          "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    ok = {"200": {"description": "the outputs (JSON, or a JSON header and binary tensors: the binary extension)",
                  "content": {"application/json": {"schema": {"type": "object"}}}}}

    def operation(summary: str, params: list[str]) -> dict:
        return {"post": {"tags": ["Open Inference Protocol v2"], "summary": summary, "requestBody": body,
                         "operationId": summary.replace(" ", "_"), "responses": dict(ok),
                         "parameters": [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                                        for p in params]}}

    schema["paths"]["/v2/models/{model}/infer"] = operation("run the latest version", ["model"])
    schema["paths"]["/v2/models/{model}/versions/{version}/infer"] = operation("run one version", ["model", "version"])
    components = schema.setdefault("components", {})
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                "description": "TANDEM_TOKEN (inference) or TANDEM_ADMIN_TOKEN"}}
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["Error"] = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
    schema["security"] = [{"bearer": []}, {}]
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for operations in schema["paths"].values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            responses["4XX"] = {"description": "bad request (400), token (401, 403), not found (404), body too "
                                               "large (413), unsupported encoding (415)", **error}
            responses["5XX"] = {"description": "model not available now (503), timeout (504)", **error}
    app.openapi_schema = schema
    return schema
