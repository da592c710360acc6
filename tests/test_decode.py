"""Decoders take untrusted bytes: every input is either readings or a counted rejection, never a crash."""
from __future__ import annotations

import json
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.config import PayloadConfig
from edge_agent.records import RejectedInput
from edge_agent.southbound.decode import make_decoder

JSON = make_decoder(PayloadConfig(), "devices/{device}/telemetry", "mqtt")
NUMBER = make_decoder(PayloadConfig(decoder="number", point="temperature", unit="degC"), "sensors/{device}/temp", "mqtt")
NESTED = make_decoder(PayloadConfig(ts_path="meta.time", ts_unit="s", values_path="", value_path="reading.v",
                                    point="level"), "plant/{device}/data", "mqtt")
REASONS = {"not_utf8", "bad_json", "non_finite", "bad_shape", "no_values", "bad_value", "bad_point",
           "bad_timestamp", "bad_device", "topic_mismatch", "too_large"}
NOW = time.time_ns()


def test_json_values_object():
    rs = JSON("devices/pump-1/telemetry", b'{"ts": 1790000000123, "values": {"t": 21.5, "on": true, "mode": "auto"}}',
              NOW)
    assert [(r.device, r.point, r.value, r.ts_ns) for r in rs] == [
        ("pump-1", "t", 21.5, 1790000000123000000), ("pump-1", "on", True, 1790000000123000000),
        ("pump-1", "mode", "auto", 1790000000123000000)]


def test_json_single_value_with_paths_and_receive_time_fallback():
    rs = NESTED("plant/tank-3/data", b'{"meta": {"time": 1790000000.5}, "reading": {"v": 3}}', NOW)
    assert [(r.device, r.point, r.value, r.ts_ns) for r in rs] == [("tank-3", "level", 3, 1790000000500000000)]
    rs = NESTED("plant/tank-3/data", b'{"reading": {"v": 4}}', NOW)
    assert rs[0].ts_ns == NOW


def test_plain_number():
    assert [(r.device, r.point, r.value, r.unit) for r in NUMBER("sensors/s1/temp", b" 21.25\n", NOW)] == [
        ("s1", "temperature", 21.25, "degC")]
    assert NUMBER("sensors/s1/temp", b"-7", NOW)[0].value == -7
    assert NUMBER("sensors/s1/temp", b"true", NOW)[0].value is True


@pytest.mark.parametrize("decoder, topic, payload, reason", [
    (JSON, "devices/d/telemetry", b"\xff\xfe", "not_utf8"),
    (JSON, "devices/d/telemetry", b"{", "bad_json"),
    (JSON, "devices/d/telemetry", b'{"values": {"t": NaN}}', "non_finite"),
    (JSON, "devices/d/telemetry", b'{"values": {"t": -Infinity}}', "non_finite"),
    (JSON, "devices/d/telemetry", b'{"values": {"t": 1e999}}', "non_finite"),
    (JSON, "devices/d/telemetry", b'{"values": [1]}', "bad_shape"),
    (JSON, "devices/d/telemetry", b'{"values": {}}', "no_values"),
    (JSON, "devices/d/telemetry", b'{"other": 1}', "no_values"),
    (JSON, "devices/d/telemetry", b'{"values": {"t": {"x": 1}}}', "bad_value"),
    (JSON, "devices/d/telemetry", b'{"values": {"t": 123456789012345678901234567890}}', "bad_value"),
    (JSON, "devices/d/telemetry", b'{"values": {"": 1}}', "bad_point"),
    (JSON, "devices/d/telemetry", b'{"ts": 1790000000123E999, "values": {"t": 1}}', "bad_timestamp"),
    (JSON, "devices/d/telemetry", b'{"ts": -1e999, "values": {"t": 1}}', "bad_timestamp"),
    (JSON, "devices/d/other", b'{"values": {"t": 1}}', "topic_mismatch"),
    (JSON, "devices/" + "x" * 200 + "/telemetry", b'{"values": {"t": 1}}', "bad_device"),
    (JSON, "devices/d/telemetry", b"[" * 100000, "bad_json"),
    (NUMBER, "sensors/s/temp", b"nan", "non_finite"),
    (NUMBER, "sensors/s/temp", b"inf", "non_finite"),
    (NUMBER, "sensors/s/temp", b"12 degrees", "bad_value"),
])
def test_rejections_carry_reasons(decoder, topic, payload, reason):
    with pytest.raises(RejectedInput) as e:
        decoder(topic, payload, NOW)
    assert e.value.reason == reason


def _decode_all(topic: str, payload: bytes) -> None:
    for d in (JSON, NUMBER, NESTED):
        try:
            rs = d(topic, payload, NOW)
        except RejectedInput as e:
            assert e.reason in REASONS
            continue
        assert rs
        for r in rs:
            assert isinstance(r.value, (int, float, bool, str))
            assert not (isinstance(r.value, float) and not math.isfinite(r.value))
            assert 0 < len(r.device) <= 128 and 0 < len(r.point) <= 128
            json.dumps(r.value, allow_nan=False)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512), st.sampled_from(["devices/d/telemetry", "sensors/s/temp", "plant/t/data", "x"]))
def test_fuzz_random_bytes(payload, topic):
    _decode_all(topic, payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["ts", "values", "value", "meta", "reading", "x"]), json_values, max_size=4))
def test_fuzz_structured_json(doc):
    payload = json.dumps(doc).encode()  # NaN/Infinity literals included, as a sloppy device would send them
    _decode_all("devices/d/telemetry", payload)
    _decode_all("plant/t/data", payload)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(min_value=0, max_value=199))
def test_fuzz_mutated_valid_payload(noise, pos):
    base = bytearray(b'{"ts": 1790000000123, "values": {"temperature": 21.5, "running": true}}')
    base[pos % len(base):pos % len(base) + len(noise)] = noise
    _decode_all("devices/d/telemetry", bytes(base))


def test_a_clock_disagreement_keeps_the_reading_with_the_receive_time_and_says_why():
    seen: list[str] = []
    dec = make_decoder(PayloadConfig(), "devices/{device}/telemetry", "mqtt", retimed=seen.append)
    now = 1_800_000_000 * 10**9
    day_ms = 86400 * 1000
    cases = [(-5, "ts_before_2000"), (1e30, "ts_ahead"), (now // 10**6 + 2 * day_ms, "ts_ahead"),  # our clock behind
             (now // 10**6 + day_ms // 2, "good")]
    for ts, quality in cases:
        (r,) = dec("devices/d/telemetry", json.dumps({"ts": ts, "values": {"t": 1}}).encode(), now)
        assert r.quality == quality, (ts, r)
        assert r.ts_ns == (now if quality != "good" else int(ts * 10**6))
    assert seen == ["ts_before_2000", "ts_ahead", "ts_ahead"]
