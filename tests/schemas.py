"""Validate a command's --json document against docs/schemas (the envelope, then the command's own schema)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema

SCHEMAS = Path(__file__).resolve().parents[1] / "docs" / "schemas"


@cache
def _schema(name: str) -> dict:
    path = SCHEMAS / f"{name}.json"
    schema = json.loads(path.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def validate_document(doc: dict | str, command: str | None = None) -> dict:
    """``doc`` (a dict or the JSON text a command printed) must be a valid envelope and, unless it is
    an error document, valid against ``docs/schemas/<command>.json`` (command: e.g. ``predict`` or
    ``data.digits``; default: the document's own ``schema`` name). Returns the document."""
    if isinstance(doc, str):
        doc = json.loads(doc)
    jsonschema.validate(doc, _schema("envelope"), cls=jsonschema.Draft202012Validator)
    name = doc["schema"].removeprefix("edgetl.")
    if command is not None:
        assert name == command, f"schema {doc['schema']!r}, expected edgetl.{command}"
    if "error" not in doc or doc.get("partial"):
        jsonschema.validate(doc, _schema(name), cls=jsonschema.Draft202012Validator)
    return doc
