#!/usr/bin/env python3
"""Regenerates schemas/usage-event.schema.json from schemas/meters.json.

Run from the repository root: python3 ops/gen-event-schema.py
The test schemas/tests/schema_agreement.rs checks the result agrees with the
Rust validation on a corpus of events."""
import json, pathlib

root = pathlib.Path(__file__).resolve().parent.parent / "schemas"

def quantity(integer):
    # A JSON number must keep its exact value: one with more significant
    # digits than an f64 holds is refused by the collector (send a decimal
    # string instead), which JSON Schema cannot express.
    if integer:
        return {"oneOf": [{"type": "integer", "minimum": 0, "exclusiveMaximum": 1e16},
                          {"type": "string", "pattern": "^[0-9]{1,16}$"}]}
    return {"oneOf": [{"type": "number", "minimum": 0, "exclusiveMaximum": 1e16, "multipleOf": 1e-12},
                      {"type": "string", "pattern": "^[0-9]{1,16}(\\.[0-9]{1,12})?$"}]}

dim = {"type": "string", "minLength": 1, "maxLength": 256}
meters = json.loads((root / "meters.json").read_text())["meters"]
branches = []
for m in meters:
    props, req = {}, []
    for d in m["dimensions"]:
        assert "." not in d["path"], "nested dimension paths are not generated"
        props[d["path"]] = dim if d["required"] else {"oneOf": [dim, {"type": "null"}]}
        if d["required"]:
            req.append(d["path"])
    if m.get("value_path"):
        props[m["value_path"]] = quantity(m.get("integer", False))
        req.append(m["value_path"])
    branches.append({"if": {"properties": {"type": {"const": m["event_type"]}}},
                     "then": {"properties": {"data": {"type": "object", "properties": props, "required": req}}}})
schema = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://tally.dev/schemas/usage-event.schema.json",
    "title": "Tally usage event (CloudEvents 1.0, JSON)",
    "description": "One usage event. A batch (application/cloudevents-batch+json) is a non-empty array of these. "
                   "Generated from meters.json by ops/gen-event-schema.py; the rolling time window "
                   "(previous month start .. now + 5 min) is checked by the collector and cannot be expressed here, "
                   "nor can the rule that a JSON number must keep its exact value (at most the ~15 significant "
                   "digits an f64 holds; send longer quantities as decimal strings).",
    "type": "object",
    "required": ["specversion", "id", "source", "type", "subject", "time", "data"],
    "properties": {
        "specversion": {"const": "1.0"},
        "id": {"type": "string", "minLength": 1, "maxLength": 256},
        "source": {"type": "string", "minLength": 1, "maxLength": 512},
        "type": {"enum": sorted({m["event_type"] for m in meters})},
        "subject": {"type": "string", "pattern": "^[A-Za-z0-9._:@-]{1,128}$", "description": "the customer id"},
        "time": {"type": "string",
                 "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$"},
        "datacontenttype": {"oneOf": [{"type": "null"}, {"type": "string", "pattern": "^application/json(;.*)?$"}]},
        "data": {"type": "object"},
    },
    "allOf": branches,
}
(root / "usage-event.schema.json").write_text(json.dumps(schema, indent=2) + "\n")
