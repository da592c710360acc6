"""Payload decoders: untrusted bytes in, `Reading`s out, or `RejectedInput(reason, detail)`.

Reasons are short metric labels: not_utf8, bad_json, bad_cbor, non_finite, bad_shape, no_values, bad_value,
bad_point, bad_timestamp, bad_device, topic_mismatch, too_large.

A clock disagreement never loses a reading: a timestamp that is a number but before 2000 or more than a day ahead of
the gateway's clock (a device without a real-time clock) is replaced by the receive time and the reading's quality
says why (`ts_before_2000`, `ts_ahead`), counted in `edge_agent_readings_retimed_total{source,quality}`. A gateway
whose own clock reads before CLOCK_FLOOR_NS (this release's date: a gateway that lost its time at a power cut) knows
its clock is wrong: there a device's timestamp from after the floor is kept as it is (quality `good`), and counted
as `edge_agent_readings_retimed_total{quality="gateway_clock_behind"}`. Only a timestamp that is not a finite number
is refused.
"""
from __future__ import annotations

import json
import math

import cbor2
from typing import Any, Callable

from edge_agent.config import PayloadConfig
from edge_agent.records import Reading, RejectedInput

MAX_NAME = 128
MAX_STRING_VALUE = 1024
_TS_SCALE = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}
_MIN_TS_NS = 946_684_800 * 1_000_000_000   # 2000-01-01
_MAX_FUTURE_NS = 86400 * 1_000_000_000      # one day ahead of our clock at most
CLOCK_FLOOR_NS = 1_793_491_200 * 1_000_000_000  # 2026-11-01: a gateway clock before this is known to be wrong
_MAX_TRUSTED_NS = 4_102_444_800 * 1_000_000_000  # 2100-01-01: beyond, no device's clock is believed either


def _reject_constant(name: str) -> Any:
    raise RejectedInput("non_finite", f"{name} is not a number the agent accepts")


_json_loads = json.JSONDecoder(parse_constant=_reject_constant).decode


_GOOD_NAMES: set[str] = set()  # names that passed: a device sends the same few again and again
_GOOD_NAMES_MAX = 65_536       # bounded: past it, the set starts over
_TOPIC_DEVICES_MAX = 65_536    # per pattern, likewise


def _check_name(kind: str, name: Any) -> str:
    if type(name) is str and name in _GOOD_NAMES:
        return name
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable() \
            or "/" in name or "+" in name or "#" in name:
        raise RejectedInput(f"bad_{kind}", f"{kind} name must be 1-{MAX_NAME} printable characters "
                                           f"without / + #, got {str(name)[:40]!r}")
    if len(_GOOD_NAMES) >= _GOOD_NAMES_MAX:
        _GOOD_NAMES.clear()
    _GOOD_NAMES.add(name)
    return name


def _check_value(point: str, v: Any) -> Any:
    t = type(v)
    if t is float:
        if not math.isfinite(v):  # 1e400 parses as inf without parse_constant
            raise RejectedInput("non_finite", f"{point}: {v}")
        return v
    if t is int or t is bool:
        if t is int and not -(1 << 63) <= v < (1 << 63):
            raise RejectedInput("bad_value", f"{point}: integer out of 64-bit range")
        return v
    if t is str:
        if len(v) > MAX_STRING_VALUE:
            raise RejectedInput("bad_value", f"{point}: string longer than {MAX_STRING_VALUE}")
        if not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON): no UTF-8 can store it
                raise RejectedInput("bad_value", f"{point}: string is not valid Unicode (a lone surrogate)") from None
        return v
    raise RejectedInput("bad_value", f"{point}: expected a number, boolean or string, got {type(v).__name__}")


def _path(obj: Any, path: list[str]) -> Any:
    for k in path:
        if not isinstance(obj, dict) or k not in obj:
            return _MISSING
        obj = obj[k]
    return obj


_MISSING = object()


class DevicePattern:
    """`devices/{device}/telemetry` → the device segment of a matching topic."""

    def __init__(self, pattern: str) -> None:
        self.segments = pattern.split("/")
        self.index = next(i for i, s in enumerate(self.segments) if "{device}" in s)
        seg = self.segments[self.index]
        self.prefix, self.suffix = seg.split("{device}")
        self._known: dict[str, str] = {}  # topic -> its device, for topics that matched

    def device(self, topic: str) -> str:
        device = self._known.get(topic)
        if device is None:
            device = self._device(topic)
            if len(self._known) >= _TOPIC_DEVICES_MAX:
                self._known.clear()
            self._known[topic] = device
        return device

    def _device(self, topic: str) -> str:
        parts = topic.split("/")
        if len(parts) != len(self.segments) or any(
                p != s for i, (p, s) in enumerate(zip(parts, self.segments)) if i != self.index):
            raise RejectedInput("topic_mismatch", f"topic {topic[:80]!r} does not match "
                                                  f"{'/'.join(self.segments)!r}")
        seg = parts[self.index]
        if not (seg.startswith(self.prefix) and seg.endswith(self.suffix)) or \
                len(seg) <= len(self.prefix) + len(self.suffix):
            raise RejectedInput("topic_mismatch", f"topic {topic[:80]!r} has no device segment")
        return _check_name("device", seg[len(self.prefix):len(seg) - len(self.suffix)])


Decoder = Callable[[str, bytes, int], list[Reading]]


def make_decoder(cfg: PayloadConfig, device_pattern: str, source: str, cbor: bool = False,
                 retimed: Callable[[str], None] | None = None) -> Decoder:
    """Build a decoder: (topic or path, payload, receive time ns) -> readings; the device id is the
    `{device}` part of the topic/path under `device_pattern`. `cbor`: the json decoder's document
    arrives as CBOR (same structure, same paths)."""
    pattern = DevicePattern(device_pattern)
    unit = cfg.unit or None
    scale = _TS_SCALE[cfg.ts_unit]
    ts_path = cfg.ts_path.split(".") if cfg.ts_path else []
    values_path = cfg.values_path.split(".") if cfg.values_path else []
    value_path = cfg.value_path.split(".") if cfg.value_path else []
    point = _check_name("point", cfg.point)

    def timestamp(raw: Any, recv_ns: int) -> tuple[int, str]:
        """(timestamp, quality)"""
        if raw is _MISSING:
            return recv_ns, "good"
        if type(raw) not in (int, float):
            raise RejectedInput("bad_timestamp", f"timestamp must be a number of {cfg.ts_unit}, got {raw!r:.40}")
        if type(raw) is float and not math.isfinite(raw):
            raise RejectedInput("bad_timestamp", f"timestamp {raw!r} is not finite")
        ts = int(raw * scale) if type(raw) is int else int(min(max(raw * scale, -1e30), 1e30))
        if _MIN_TS_NS <= ts <= recv_ns + _MAX_FUTURE_NS:
            return ts, "good"
        if recv_ns < CLOCK_FLOOR_NS <= ts < _MAX_TRUSTED_NS:  # our clock is the wrong one: the device's is kept
            if retimed is not None:
                retimed("gateway_clock_behind")
            return ts, "good"
        quality = "ts_before_2000" if ts < _MIN_TS_NS else "ts_ahead"
        if retimed is not None:
            retimed(quality)
        return recv_ns, quality

    def text(payload: bytes) -> str:
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RejectedInput("not_utf8", f"payload is not UTF-8 ({e.reason} at byte {e.start})") from None

    def decode_json(topic: str, payload: bytes, recv_ns: int) -> list[Reading]:
        device = pattern.device(topic)
        try:
            doc = _json_loads(text(payload))
        except ValueError as e:
            raise RejectedInput("bad_json", f"not valid JSON: {e}"[:200]) from None
        except RecursionError:
            raise RejectedInput("bad_json", "JSON nested too deeply") from None
        return interpret(device, doc, recv_ns)

    def decode_cbor(topic: str, payload: bytes, recv_ns: int) -> list[Reading]:
        device = pattern.device(topic)
        try:
            doc = cbor2.loads(payload)
        except RecursionError:
            raise RejectedInput("bad_cbor", "CBOR nested too deeply") from None
        except Exception as e:  # noqa: BLE001 - cbor2 raises several types for malformed input
            raise RejectedInput("bad_cbor", f"not valid CBOR: {e}"[:200]) from None
        return interpret(device, doc, recv_ns)

    def interpret(device: str, doc: Any, recv_ns: int) -> list[Reading]:
        if not isinstance(doc, dict):
            if value_path:
                raise RejectedInput("bad_shape", f"expected a JSON object, got {type(doc).__name__}")
            doc = {"": doc}
        ts, quality = timestamp(_path(doc, ts_path) if ts_path else _MISSING, recv_ns)
        values = _path(doc, values_path) if values_path else _MISSING
        if values is _MISSING:
            v = _path(doc, value_path) if value_path else doc.get("", _MISSING)
            if v is _MISSING:
                raise RejectedInput("no_values", f"neither '{cfg.values_path}' nor '{cfg.value_path}' in the payload")
            return [Reading(device, point, _check_value(point, v), unit, ts, quality, source)]
        if not isinstance(values, dict):
            raise RejectedInput("bad_shape", f"'{cfg.values_path}' must be an object of point: value")
        if not values:
            raise RejectedInput("no_values", f"'{cfg.values_path}' is empty")
        return [Reading(device, _check_name("point", p), _check_value(p, v), unit, ts, quality, source)
                for p, v in values.items()]

    def decode_number(topic: str, payload: bytes, recv_ns: int) -> list[Reading]:
        device = pattern.device(topic)
        s = text(payload).strip()
        if s in ("true", "false"):
            return [Reading(device, point, s == "true", unit, recv_ns, "good", source)]
        try:
            v = int(s) if s.lstrip("-").isdigit() and len(s) < 20 else float(s)
        except ValueError:
            raise RejectedInput("bad_value", f"not a number: {s[:40]!r}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise RejectedInput("non_finite", f"{s[:40]!r} is not a finite number")
        return [Reading(device, point, v, unit, recv_ns, "good", source)]

    if cfg.decoder == "number":
        return decode_number
    return decode_cbor if cbor else decode_json
