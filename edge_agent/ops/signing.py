"""Operators' signatures on requests: who may change the gateway, proven by a key rather than claimed.

Where `commands.operator_keys` names keys, every operation that changes anything (and an `ask` whose call would
change anything) must carry a signature by one of them:

    {"id": "w-17", "device": "plc-1", "point": "setpoint", "value": 42,
     "sig": {"key": "alice", "ts": 1764400000123, "sig": "<base64 Ed25519 signature>"}}

The signature covers the canonical JSON of {"gateway": the gateway's id, "op": name, "id": id, "ts": ts, "fields": the
request's fields} (sorted keys, no spaces), so it binds the gateway it is meant for, the operation, its arguments, its
request id and its time: a signed request cannot be replayed to another gateway of the fleet, under another id or
name, nor after `commands.signature_max_age_s`, and a changed argument breaks it. The audit records the key id.
`edge-agent sign --gateway ID` makes such a request.
"""
from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.config import ConfigError
from edge_agent.ops.base import CommandError


def canonical(gateway: str, name: str, rid: str | None, ts: int, fields: dict[str, Any]) -> bytes:
    return json.dumps({"gateway": gateway, "op": name, "id": rid, "ts": ts, "fields": fields}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def parse_keys(entries: list[str]) -> dict[str, Ed25519PublicKey]:
    """commands.operator_keys: "KEY_ID=BASE64 Ed25519 public key" each; ConfigError names the entry."""
    keys: dict[str, Ed25519PublicKey] = {}
    for i, entry in enumerate(entries):
        kid, sep, b64 = entry.partition("=")
        kid = kid.strip()
        if not sep or not kid or len(kid) > 64 or kid in keys:
            raise ConfigError(f"commands.operator_keys[{i}]: expected \"KEY_ID=BASE64\" with a unique id")
        try:
            keys[kid] = Ed25519PublicKey.from_public_bytes(base64.b64decode(b64.strip(), validate=True))
        except (binascii.Error, ValueError):
            raise ConfigError(f"commands.operator_keys[{i}] ({kid}): not a base64 Ed25519 public key") from None
    return keys


def verify(keys: dict[str, Ed25519PublicKey], max_age_s: float, gateway: str, name: str, rid: str | None, sig: Any,
           fields: dict[str, Any]) -> str:
    """The key id that signed this request; raises CommandError('forbidden') saying why not."""
    if not isinstance(sig, dict) or set(sig) != {"key", "ts", "sig"}:
        raise CommandError("bad_request", 'sig must be {"key": ID, "ts": unix ms, "sig": base64}')
    kid, ts, value = sig["key"], sig["ts"], sig["sig"]
    if not isinstance(kid, str) or isinstance(ts, bool) or not isinstance(ts, int) or not isinstance(value, str):
        raise CommandError("bad_request", 'sig must be {"key": ID, "ts": unix ms, "sig": base64}')
    key = keys.get(kid)
    if key is None:
        raise CommandError("forbidden", f"signed by an unknown key {kid[:64]!r}")
    if rid is None:
        raise CommandError("forbidden", "a signed request needs an id (the signature covers it)")
    age = time.time() - ts / 1000
    if abs(age) > max_age_s:
        raise CommandError("forbidden", f"signature made {age:.0f} s from now; commands.signature_max_age_s is "
                                        f"{max_age_s:g} (replayed, or a wrong clock)")
    try:
        key.verify(base64.b64decode(value, validate=True), canonical(gateway, name, rid, ts, fields))
    except (InvalidSignature, binascii.Error, ValueError):
        raise CommandError("forbidden", f"the signature by {kid!r} does not verify for this request on gateway "
                                        f"{gateway!r}") from None
    return kid


def sign(key: Ed25519PrivateKey, kid: str, name: str, rid: str, fields: dict[str, Any], *, gateway: str,
         ts: int | None = None) -> dict[str, Any]:
    """A signed request body for one gateway (the operator's side)."""
    ts = int(time.time() * 1000) if ts is None else ts
    sig = base64.b64encode(key.sign(canonical(gateway, name, rid, ts, fields))).decode()
    return {**fields, "id": rid, "sig": {"key": kid, "ts": ts, "sig": sig}}
