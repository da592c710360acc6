"""The model's whole output language: one JSON tool call, and the prompt around the operator's text.

Shared by the recipe that trains the model and the runtime that constrains it, so the two never drift.
"""
from __future__ import annotations

import json
import math
from typing import Any

USER = "<|user|>"
ASSISTANT = "<|assistant|>"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [PAD, EOS, USER, ASSISTANT]

MAX_TEXT_CHARS = 256  # an operator's question beyond this is refused before tokenization
MAX_NAME_CHARS = 48  # device / point / filter / string value bound inside the grammar
AGGS = ("last", "min", "max", "avg", "count")
MAX_WINDOW_S = 366 * 86400
TOOLS = ("query_stats", "list_devices", "write_point", "status")
# the point names the model normalises to ("temp" -> temperature); any other point is copied from the question
CANONICAL_POINTS = ("temperature", "pressure", "humidity", "speed", "flow", "level", "voltage", "current", "power",
                    "vibration", "setpoint", "co2", "rpm", "enabled", "mode")
_STRIP = ",.;:!?()[]{}\"'`"

_NAME = {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS}
_NUMBER = {"type": "number", "minimum": -1e9, "maximum": 1e9}

def _tool(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """{"tool": name, "args": {...}} with exactly these args, in this order (the order the model writes them
    and the grammar enforces)."""
    return {"type": "object", "additionalProperties": False, "required": ["tool", "args"],
            "properties": {"tool": {"const": name},
                           "args": {"type": "object", "properties": args, "required": list(args),
                                    "additionalProperties": False}}}


TOOL_SCHEMA: dict[str, Any] = {
    "x-guidance": {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"},
    "anyOf": [
        _tool("query_stats", {"device": _NAME, "point": _NAME, "agg": {"enum": list(AGGS)},
                              "window_s": {"type": "integer", "minimum": 1, "maximum": MAX_WINDOW_S}}),
        _tool("list_devices", {"filter": {"anyOf": [_NAME, {"type": "null"}]}}),
        _tool("write_point", {"device": _NAME, "point": _NAME,
                              "value": {"anyOf": [_NUMBER, {"type": "boolean"}, _NAME]}}),
        _tool("status", {}),
    ],
}


def candidates(text: str) -> list[str]:
    """The words of a question that may name a device, a point, a filter or a string value."""
    out: list[str] = []
    for word in text.split():
        w = word.strip(_STRIP)
        if w.endswith("'s"):
            w = w[:-2]
        for c in (w, w[:-1] if w.endswith("s") and len(w) > 2 else ""):
            if c and len(c) <= MAX_NAME_CHARS and c not in out and '"' not in c and "\\" not in c:
                out.append(c)
    return out[:64]


def request_schema(text: str) -> dict[str, Any]:
    """TOOL_SCHEMA narrowed to one question: names must be spelt as they are in the question (or be a canonical
    point), so the model can neither invent a device nor garble one it copies."""
    words = candidates(text)
    schema = json.loads(json.dumps(TOOL_SCHEMA))
    q, ld, w, st = schema["anyOf"]
    if not words:  # nothing in the question can name a device or a point: only the nameless calls remain
        ld["properties"]["args"]["properties"]["filter"] = {"type": "null"}
        schema["anyOf"] = [ld, st]
        return schema
    name = {"enum": words}
    numbered = [w for w in words if any(ch.isdigit() for ch in w) and not w.lstrip("-").replace(".", "").isdigit()]
    device = {"enum": numbered} if numbered else name  # device ids carry a number: prefer words that have one
    point = {"enum": list(dict.fromkeys([*CANONICAL_POINTS, *words]))}
    q["properties"]["args"]["properties"].update(device=device, point=point)
    ld["properties"]["args"]["properties"]["filter"] = {"anyOf": [name, {"type": "null"}]}
    w["properties"]["args"]["properties"].update(device=device, point=point,
                                                 value={"anyOf": [_NUMBER, {"type": "boolean"}, name]})
    return schema


def prompt(text: str) -> str:
    """The exact string the model sees before it writes the call (GLM-Edge chat layout)."""
    return f"{USER}\n{text.strip()}{ASSISTANT}\n"


def format_call(call: dict[str, Any]) -> str:
    """The canonical spelling of a call: the one the model is trained to write."""
    return json.dumps(call, separators=(",", ":"), ensure_ascii=False)


class InvalidCall(ValueError):
    pass


def _name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME_CHARS:
        raise InvalidCall(f"{key} must be a string of 1..{MAX_NAME_CHARS} characters")
    return value


def validate_call(call: Any) -> dict[str, Any]:
    """Check a call against TOOL_SCHEMA by hand (the grammar already enforces it; this is the second lock)."""
    if not isinstance(call, dict) or set(call) != {"tool", "args"} or not isinstance(call["args"], dict):
        raise InvalidCall('a call is {"tool": NAME, "args": {...}}')
    tool, args = call["tool"], call["args"]
    expected = {
        "query_stats": {"device", "point", "agg", "window_s"},
        "list_devices": {"filter"},
        "write_point": {"device", "point", "value"},
        "status": set(),
    }.get(tool)
    if expected is None:
        raise InvalidCall(f"unknown tool {tool!r}; tools: {', '.join(TOOLS)}")
    if set(args) != expected:
        raise InvalidCall(f"{tool} takes exactly {sorted(expected)}")
    if tool == "query_stats":
        _name(args["device"], "device")
        _name(args["point"], "point")
        if args["agg"] not in AGGS:
            raise InvalidCall(f"agg must be one of {', '.join(AGGS)}")
        w = args["window_s"]
        if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= MAX_WINDOW_S:
            raise InvalidCall(f"window_s must be an integer in 1..{MAX_WINDOW_S}")
    elif tool == "list_devices":
        if args["filter"] is not None:
            _name(args["filter"], "filter")
    elif tool == "write_point":
        _name(args["device"], "device")
        _name(args["point"], "point")
        v = args["value"]
        if isinstance(v, str):
            _name(v, "value")
        elif isinstance(v, bool):
            pass
        elif not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > 1e9:
            raise InvalidCall("value must be a finite number, a boolean or a short string")
    return call
