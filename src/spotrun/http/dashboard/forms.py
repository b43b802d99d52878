"""The submit form: its fields from a pipeline's params schema, and the params typed in."""

from __future__ import annotations

import json
import math
from typing import Any


def form_fields(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """Form fields from a pipeline's params schema (JSON Schema from pydantic)."""
    required = set(schema.get("required", ()))
    fields = []
    for name, prop in schema.get("properties", {}).items():
        kind, choices = "json", None
        typ = prop.get("type")
        if "enum" in prop:
            kind, choices = "choice", [str(c) for c in prop["enum"]]
        elif typ == "integer":
            kind = "int"
        elif typ == "number":
            kind = "float"
        elif typ == "boolean":
            kind = "bool"
        elif typ == "string":
            kind = "text"
        default = prop.get("default")
        words = str(prop.get("description", ""))
        fields.append({
            "name": name,
            # The description reads better than a param name ("Adam learning rate", not
            # "Lr"); the name is shown beside it for those who use the API or the CLI.
            "label": (words[:1].upper() + words[1:]) if words else
            name.replace("_", " ").capitalize(),
            "kind": kind,
            "choices": choices,
            "required": name in required,
            "default": "" if default is None else (
                json.dumps(default) if kind == "json" else default),
            "min": prop.get("minimum", prop.get("exclusiveMinimum")),
            "max": prop.get("maximum", prop.get("exclusiveMaximum")),
        })
    return fields


def params_from_form(fields: list[dict[str, Any]], form: dict[str, str]
                     ) -> tuple[dict[str, Any], list[str]]:
    """The params typed into the form: (params, problems in words). Blank means default."""
    params: dict[str, Any] = {}
    problems: list[str] = []
    for f in fields:
        name, kind = f["name"], f["kind"]
        if kind == "bool":
            params[name] = form.get(name) in ("on", "true", "1")
            continue
        raw = form.get(name, "").strip()
        if raw == "":
            continue
        try:
            if kind == "int":
                params[name] = int(raw)
            elif kind == "float":
                value = float(raw)
                if not math.isfinite(value):
                    raise ValueError(raw)
                params[name] = value
            elif kind == "json":
                params[name] = json.loads(raw)
            else:
                params[name] = raw
        except ValueError:
            what = {"int": "a whole number", "float": "a number",
                    "json": "valid JSON"}.get(kind, "valid")
            problems.append(f"{f['label']}: must be {what}")
    return params, problems
