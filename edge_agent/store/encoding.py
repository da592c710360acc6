"""The wire encoding of readings for the cloud: JSON objects of consecutive seqs, pre-encoded as they are committed."""
from __future__ import annotations

import json
import math
from typing import Any

from edge_agent.records import Reading

_JSON_NAMES: dict[str, str] = {}
_SERIES_JSON: dict[tuple, tuple[str, str, str]] = {}  # (device, point, unit, source) -> the JSON around a value


def _json_name(s: str | None) -> str:
    v = _JSON_NAMES.get(s)  # type: ignore[arg-type]
    if v is None:
        if len(_JSON_NAMES) > 100_000:  # bounded: names are few, but never trust that
            _JSON_NAMES.clear()
        v = _JSON_NAMES[s] = json.dumps(s, ensure_ascii=False)  # type: ignore[index]
    return v


def _json_value(v: Any) -> tuple[str, bool]:
    """(JSON text, ok); non-finite floats (adapters reject them; this is the last guard) become null."""
    t = type(v)
    if t is float:
        return (repr(v), True) if math.isfinite(v) else ("null", False)
    if t is bool:
        return ("true" if v else "false"), True
    if t is int:
        return str(v), True
    return json.dumps(v, ensure_ascii=False), True


def encode_readings(first_seq: int, readings: list[Reading]) -> bytes:
    """JSON objects of consecutive readings from `first_seq`, comma-joined without the enclosing
    brackets, so that consecutive chunks concatenate into one array. Same output as json.dumps of
    {"seq", "device", "point", "value", "unit", "ts", "quality", "source"}, three times faster."""
    parts = []
    seq = first_seq
    pieces = _SERIES_JSON
    for r in readings:
        key = (r.device, r.point, r.unit, r.source)
        p = pieces.get(key)
        if p is None:
            if len(pieces) > 100_000:  # bounded, like _JSON_NAMES
                pieces.clear()
            p = pieces[key] = (f',"device":{_json_name(r.device)},"point":{_json_name(r.point)},"value":',
                               f',"unit":{_json_name(r.unit)},"ts":', f',"source":{_json_name(r.source)}}}')
        v = r.value
        t = type(v)
        if t is float and math.isfinite(v):
            value, ok = repr(v), True
        else:
            value, ok = _json_value(v)
        parts.append(f'{{"seq":{seq}{p[0]}{value}{p[1]}{r.ts_ns},"quality":'
                     f'{_json_name(r.quality if ok else "bad")}{p[2]}')
        seq += 1
    return ",".join(parts).encode()

