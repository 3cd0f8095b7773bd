"""The chart's schema of the value `config` (batchgate's own settings), made from batchgate's table
of settings, so that `helm install` refuses what `batchgate serve` would refuse at start (a value
of the wrong type, below a setting's minimum, not among its choices, or an unknown setting),
instead of rendering pods that crash-loop.

    python tools/chart_config_schema.py            # writes it into helm/batchgate/values.schema.json
    python tools/chart_config_schema.py --check    # exit 1 if the file holds another one

It is the entry "config" of the file's "definitions"; properties.config refers to it. It also
holds config.remote_models, whose entries' fields come from batchgate's RemoteModel. Each setting
is accepted in every spelling batchgate reads (dashes for underscores, Triton's aliases). Values
batchgate converts from text (a number or a switch given as a string) are left to batchgate, so the
schema never refuses a value batchgate takes. Needs batchgate importable (PYTHONPATH as for tests).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from batchgate.config import ALIASES, MAX_INT_SETTING, SETTINGS, Spec
from batchgate.core.types import MODEL_NAME
from batchgate.remote_models import (
    BATCHING_MODES,
    CLIENTS,
    FORWARDING_MODES,
    MAX_REMOTE_INT,
    REMOTE_FIELDS,
)

SCHEMA = Path(__file__).resolve().parents[1] / "helm" / "batchgate" / "values.schema.json"


def setting_schema(spec: Spec) -> dict[str, Any]:
    """What the value of one setting may be, as batchgate's config._coerce and _validate take it."""
    bounds: dict[str, Any] = {}
    if spec.minimum is not None:
        bounds["minimum"] = spec.minimum
    if spec.maximum is not None:
        bounds["maximum"] = spec.maximum
    if spec.positive:
        bounds["exclusiveMinimum"] = 0
    text = {"type": "string"}  # converted (and checked) by batchgate itself
    if spec.kind == "int":
        bounds.setdefault("minimum", -MAX_INT_SETTING)
        bounds.setdefault("maximum", MAX_INT_SETTING)
        return {"anyOf": [{"type": "integer", **bounds}, text]}
    if spec.zero_or_at_least is not None:  # 0 (off), or at least this
        at_least = {**bounds, "minimum": max(bounds.get("minimum", spec.zero_or_at_least), spec.zero_or_at_least)}
        number = "integer" if spec.kind == "int" else "number"
        return {"anyOf": [{"type": number, "enum": [0]}, {"type": number, **at_least}, text]}
    if spec.kind == "float":
        return {"anyOf": [{"type": "number", **bounds}, text]}
    if spec.kind == "bool":
        return {"type": ["boolean", "string"]}
    if spec.kind == "list":
        return {"anyOf": [text, {"type": "array", "items": {"type": ["string", "number"]}}]}
    if spec.choices:  # a YAML 1.1 on/off (read as a boolean) is taken for the word
        words: list[Any] = list(spec.choices)
        if {"on", "off"} & set(spec.choices):
            words += [True, False]
        return {"enum": words}
    return {"type": ["string", "number"]}


def remote_model_schema() -> dict[str, Any]:
    """One entry of config.remote_models, as batchgate's remote_models.parse_remote_model takes it:
    a ``key=value ...`` line (left to batchgate), or a mapping of its fields (dashes too)."""
    choices = {"batching": BATCHING_MODES, "client": CLIENTS, "forwarding": FORWARDING_MODES}
    text = {"type": "string"}
    props: dict[str, Any] = {}
    for name, f in REMOTE_FIELDS.items():
        if name == "name":
            s: dict[str, Any] = {"type": ["string", "integer"], "pattern": f"^{MODEL_NAME.pattern}$"}
        elif name == "upstreams":
            s = {"anyOf": [{"type": "string", "minLength": 1}, {"type": "array", "minItems": 1, "items": text}]}
        elif name in choices:
            s = {"enum": list(choices[name])}
        elif f.type == "int":
            s = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": MAX_REMOTE_INT}, text]}
        elif f.type == "float":
            s = {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, text]}
        elif f.type == "bool":
            s = {"type": ["boolean", "string"]}
        else:
            s = {"type": ["string", "number"]}
        for form in dict.fromkeys((name, name.replace("_", "-"))):
            props[form] = s
    entry = {"type": "object", "additionalProperties": False, "required": ["name", "upstreams"], "properties": props}
    return {"type": ["array", "null"], "items": {"anyOf": [text, entry]}}


def config_schema() -> dict[str, Any]:
    sections: dict[str, dict[str, Any]] = {}
    for name, spec in SETTINGS.items():
        if not spec.section:
            continue
        props = sections.setdefault(spec.section, {})
        for spelling in (name, *spec.aliases):
            for form in dict.fromkeys((spelling, spelling.replace("_", "-"))):
                props[form] = setting_schema(spec)
    assert all(a.name in SETTINGS for a in ALIASES.values())
    return {
        "type": "object",
        "properties": {
            **{
                section: {"type": ["object", "null"], "additionalProperties": False, "properties": props}
                for section, props in sections.items()
            },
            "remote_models": remote_model_schema(),
        },
    }


def layout(schema: dict[str, Any]) -> str:
    """``schema`` as JSON with one line per setting (as compact as the hand-written rest)."""

    def one(value: Any) -> str:
        return json.dumps(value, separators=(", ", ": "))

    sections = []
    for section, body in schema["properties"].items():
        if "properties" not in body:  # a list (remote_models): one line
            sections.append(f"      {one(section)}: {one(body)}")
            continue
        head = {k: v for k, v in body.items() if k != "properties"}
        rows = ",\n".join(f"        {one(name)}: {one(s)}" for name, s in body["properties"].items())
        sections.append(f'      {one(section)}: {one(head)[:-1]}, "properties": {{\n{rows}\n      }}}}')
    parts = ",\n".join(sections)
    return f'{{"type": {one(schema["type"])}, "properties": {{\n{parts}\n    }}}}'


def written(text: str, schema: dict[str, Any]) -> str:
    """The file's text with definitions.config replaced by ``schema`` (the rest kept as written)."""
    key = '\n    "config": '
    start = text.index(key, text.index('"definitions"')) + len(key)
    _, length = json.JSONDecoder().raw_decode(text[start:])
    body = layout(schema)
    return text[:start] + body + text[start + length :]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the file holds another schema")
    args = ap.parse_args(argv)
    text = SCHEMA.read_text()
    new = written(text, config_schema())
    if args.check:
        if new != text:
            print(f"{SCHEMA}: definitions.config is not what the settings make; run {sys.argv[0]}")
            return 1
        return 0
    SCHEMA.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
