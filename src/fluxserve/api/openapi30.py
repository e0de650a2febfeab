"""pydantic's JSON Schema (2020-12) as OpenAPI 3.0 schema objects, for the documents that declare 3.0 (fal's
per-endpoint documents, Replicate's Cog schemas): ``{"type": "null"}`` alternatives become ``nullable``,
``const`` a one-value ``enum``, ``examples`` a single ``example``, an exclusive bound a bound with the
``exclusiveMinimum`` / ``exclusiveMaximum`` flag."""

from __future__ import annotations

from typing import Any


def to_openapi30(schema: Any) -> Any:
    """A copy of ``schema`` that OpenAPI 3.0 accepts."""
    if isinstance(schema, list):
        return [to_openapi30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: to_openapi30(value) for key, value in schema.items()}
    for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        value = out.get(flag)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[bound], out[flag] = value, True
    if "const" in out:
        out["enum"] = [out.pop("const")]
    if isinstance(out.get("examples"), list):
        examples = out.pop("examples")
        if examples:
            out["example"] = examples[0]
    for key in ("anyOf", "oneOf"):
        options = out.get(key)
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [option for option in options if option != {"type": "null"}]
            del out[key]
            if len(rest) == 1 and "$ref" not in rest[0]:
                out = {**rest[0], **out}
            elif rest:
                out[key] = rest
            out["nullable"] = True
    return out
