"""Coverage-guided fuzzing of every payload decoder with atheris (where it installs: pip install atheris).

    python tests/fuzz/atheris_decoders.py -max_total_time=600 /tmp/corpus tests/fuzz/seeds

A decoder may return readings or raise RejectedInput with a known reason; anything else (another
exception, a non-finite value, a reading that is not JSON-serialisable) is a crash that atheris
reports with the input that caused it. The hypothesis tests in tests/test_decode.py run in CI.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    from edge_agent.config import PayloadConfig
    from edge_agent.records import RejectedInput
    from edge_agent.southbound.decode import make_decoder

DECODERS = [
    ("devices/d/telemetry", make_decoder(PayloadConfig(), "devices/{device}/telemetry", "mqtt")),
    ("telemetry/d", make_decoder(PayloadConfig(), "telemetry/{device}", "coap", cbor=True)),
    ("sensors/d/temp", make_decoder(PayloadConfig(decoder="number"), "sensors/{device}/temp", "mqtt")),
    ("plant/d/data", make_decoder(PayloadConfig(ts_path="meta.t", ts_unit="s", values_path="", value_path="r.v"),
                                  "plant/{device}/data", "mqtt")),
]
NOW = time.time_ns()


def one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    topic, decode = DECODERS[fdp.ConsumeIntInRange(0, len(DECODERS) - 1)]
    if fdp.ConsumeBool():
        topic = fdp.ConsumeUnicodeNoSurrogates(40)
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        readings = decode(topic, payload, NOW)
    except RejectedInput:
        return
    for r in readings:
        assert not (isinstance(r.value, float) and not math.isfinite(r.value)), r
        json.dumps(r.value, allow_nan=False)


if __name__ == "__main__":
    atheris.instrument_all()  # instrument_imports() alone left the decoders uninstrumented here
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
