"""The router: what every operation has in common, and no operation.

A request is a JSON object; a channel (the MQTT command topic `<prefix>/<gateway>/cmd/<name>`, the local control
socket) hands its name and bytes here and delivers the reply this returns: `{"ok": true, "result": ...}` or
`{"ok": false, "error": {"code": ..., "message": ...}}` — always valid JSON (no NaN, no Infinity).

Error codes: `bad_request` (not JSON, not an object, unknown field, wrong type, bad id), `too_large`,
`unknown_command`, `forbidden` (not in `commands.allow`), `busy` (at the concurrency bound, or the model's queue is
full), `not_found`, `refused` (a write the adapter refused, with its reason), `timeout`, `unavailable` and
`unanswerable` (ask: the model did not answer in time / is not loaded / made no valid call within its token budget),
`internal`.

In order, for every request: the size bound, JSON, the id, the operation's name, its fields (types, required,
unknown, string length), the allow-list, request-id dedup (a request whose (name, id) was answered within
`dedup_window_s` gets the same reply again without running twice: a write the cloud resent is executed once), the
concurrency bound, then the operation; the outcome is counted per operation and code.

Every request may carry an `id` (1-64 of letters, digits, `_.-`); over MQTT 3.1.1 it is required, since the reply
goes to `<prefix>/<gateway>/res/<id>`.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import re
import time
from typing import Any, Protocol

from edge_agent.config import CommandsConfig, ConfigError
from edge_agent.metrics import Metrics
from edge_agent.ops import signing
from edge_agent.logs import new_trace
from edge_agent.ops.base import MAX_STRING, CommandError, Gateway, Operation, Request, reply_error, reply_ok

log = logging.getLogger(__name__)
audit = logging.getLogger("edge_agent.audit")

_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ID_IN_TEXT = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9_.-]{1,64})"')  # to route a refusal of an unparsable request
READ_ONLY = "read-only"  # in commands.allow: every operation that changes nothing
MAX_DEPTH = 32  # objects and arrays nested in a request, at most


class Journal(Protocol):
    """Where the ids of changing requests are committed before they run (the store)."""
    async def take_request(self, name: str, rid: str) -> bytes | None: ...

    def request_reply(self, name: str, rid: str, reply: bytes) -> None: ...


def allowed(table: dict[str, Operation], allow: list[str]) -> frozenset[str]:
    """The operations `commands.allow` names; raises ConfigError naming the key for an unknown one."""
    out: set[str] = set()
    for a in allow:
        if a == READ_ONLY:
            out |= {n for n, op in table.items() if not op.changes}
        elif a in table:
            out.add(a)
        else:
            raise ConfigError(f"commands.allow: unknown operation {a!r} (known: {READ_ONLY!r}, {', '.join(table)})")
    return frozenset(out)


class Router:
    def __init__(self, cfg: CommandsConfig, table: dict[str, Operation], gw: Gateway, metrics: Metrics,
                 journal: Journal | None = None, *, gateway_id: str) -> None:
        self.cfg, self.table, self.gw, self.metrics, self.journal = cfg, table, gw, metrics, journal
        self.gateway_id = gateway_id  # what an operator's signature must name (signing.canonical)
        self.allow = allowed(table, cfg.allow)
        self.by_tool = {op.tool.name: op for op in table.values() if op.tool is not None}
        self.keys = signing.parse_keys(cfg.operator_keys)
        self._seen: collections.OrderedDict[tuple[str, str], tuple[float, bytes]] = collections.OrderedDict()
        self._running: dict[tuple[str, str], asyncio.Future] = {}
        self._slots = asyncio.Semaphore(cfg.concurrency)

    def parse(self, name: str, body: bytes) -> tuple[Operation, dict, str | None, str | None]:
        """Validate a request; returns (operation, fields, id, signer). Raises CommandError (carrying the id when
        one could be read, so that even a refusal can be routed to res/<id>)."""
        if len(body) > self.cfg.max_request_bytes:
            m = _ID_IN_TEXT.search(body[:512])
            raise CommandError("too_large", f"request of {len(body)} bytes > max_request_bytes "
                                            f"{self.cfg.max_request_bytes}", m.group(1).decode() if m else None)
        try:
            doc = json.loads(body.decode("utf-8"), parse_constant=_no_constant) if body.strip() else {}
        except (UnicodeDecodeError, ValueError) as e:
            m = _ID_IN_TEXT.search(body[:512])
            raise CommandError("bad_request", f"request is not JSON: {e}"[:200],
                               m.group(1).decode() if m else None) from None
        except RecursionError:  # nested deeper than the parser goes: bad input, not a bug
            doc = None
        if doc is None or _depth(doc) > MAX_DEPTH:
            m = _ID_IN_TEXT.search(body[:512])
            raise CommandError("bad_request", f"request nested deeper than {MAX_DEPTH} levels",
                               m.group(1).decode() if m else None)
        if not isinstance(doc, dict):
            raise CommandError("bad_request", "request must be a JSON object")
        rid = doc.pop("id", None)
        if rid is not None and (not isinstance(rid, str) or not _ID.match(rid)):
            raise CommandError("bad_request", "id must be 1-64 letters, digits, '_', '.', '-'")
        sent = doc.pop("ts", None)
        if sent is not None:
            if isinstance(sent, bool) or not isinstance(sent, int):
                raise CommandError("bad_request", "ts must be an integer: unix time in milliseconds", rid)
            age = time.time() - sent / 1000
            if age > self.cfg.max_age_s:
                raise CommandError("expired", f"the request was sent {age:.0f} s ago, more than commands.max_age_s "
                                              f"({self.cfg.max_age_s:g}); it is not run late", rid)
        sig = doc.pop("sig", None)
        op = self.table.get(name)
        if op is None:
            raise CommandError("unknown_command", f"unknown command {name[:64]!r} (known: {', '.join(self.table)})",
                               rid)
        fields = self.check_fields(op, doc, rid)
        signer = None
        if sig is not None:
            if not self.keys:
                raise CommandError("bad_request", "this gateway has no operator keys (commands.operator_keys); send "
                                                  "the request unsigned", rid)
            try:
                signer = signing.verify(self.keys, self.cfg.signature_max_age_s, self.gateway_id, name, rid, sig,
                                        fields)
            except CommandError as e:
                e.rid = rid
                raise
        return op, fields, rid, signer

    @staticmethod
    def check_fields(op: Operation, doc: dict, rid: str | None = None) -> dict:
        name = op.name
        for k in doc:
            if k not in op.fields:
                raise CommandError("bad_request", f"{name}: unknown field {k[:40]!r} "
                                                  f"(fields: {', '.join(op.fields) or 'none'}, id)", rid)
        for k, f in op.fields.items():
            if k not in doc:
                if f.required:
                    raise CommandError("bad_request", f"{name}: field {k!r} is required", rid)
                continue
            v = doc[k]
            if not isinstance(v, f.types) or (isinstance(v, bool) and bool not in f.types):
                raise CommandError("bad_request", f"{name}: field {k!r} must be {f.describe()}, "
                                                  f"got {type(v).__name__}", rid)
            if isinstance(v, str) and len(v) > MAX_STRING:
                raise CommandError("bad_request", f"{name}: field {k!r} longer than {MAX_STRING} characters", rid)
        return doc

    async def handle(self, name: str, body: bytes, who: str, at_least_once: bool = False) -> tuple[bytes, str | None]:
        """Run one request; returns (reply, id). Never raises. Every log line it causes, and its reply, carry a new
        trace id (the tasks it starts inherit it). `at_least_once`: the channel may deliver the same message again
        (MQTT QoS 1)."""
        new_trace()
        rid = None
        label = name if name in self.table else "unknown"
        try:
            op, fields, rid, signer = self.parse(name, body)
            self.check_allowed(op)
            self.check_signed(op, signer)
            # the key a request is run once under: its id; or, for a changing request without one on a channel that
            # redelivers (MQTT at QoS 1), its bytes: a redelivery cannot be told from a resend, so the same id-less
            # change runs once per dedup window (send an id to run it twice)
            key = rid
            if rid is None and op.changes and at_least_once:
                key = "~" + hashlib.sha256(body).hexdigest()[:32]
            if key is not None:
                cached = self._cached(name, key)
                if cached is not None:
                    self.metrics.commands.labels(name, "duplicate").inc()
                    return cached, rid
                running = self._running.get((name, key))
                if running is not None:  # the same id again while the first still runs: one execution
                    self.metrics.commands.labels(name, "duplicate").inc()
                    return await asyncio.shield(running), rid
            if self._slots.locked():
                raise CommandError("busy", f"{self.cfg.concurrency} commands are running; retry")
            fut: asyncio.Future = asyncio.get_running_loop().create_future()
            if key is not None:
                self._running[(name, key)] = fut
            journaled = op.changes and key is not None and self.journal is not None
            try:
                async with self._slots:
                    prior = await self.journal.take_request(name, key) if journaled else None  # type: ignore[union-attr]
                    if prior is not None:  # taken before a restart: never run twice
                        journaled = False
                        self.metrics.commands.labels(name, "duplicate").inc()
                        reply = prior or reply_error("duplicate", f"request {key!r} was taken before the agent "
                                                     "restarted and its outcome was not recorded; it is not run "
                                                     "again (check with a read)")
                    else:
                        reply = reply_ok(await self.run(op, fields, f"key:{signer}" if signer else who, signer))
            except CommandError as e:
                reply = reply_error(e.code, e.message, e.call)
                self.metrics.commands.labels(name, e.code).inc()
            except Exception as e:  # noqa: BLE001 - a bug answers 'internal', the agent keeps running
                log.exception("command failed", extra={"command": name})
                reply = reply_error("internal", f"{type(e).__name__}: {e}"[:200])
                self.metrics.commands.labels(name, "internal").inc()
            else:
                if journaled or prior is None:
                    self.metrics.commands.labels(name, "ok").inc()
            finally:
                if key is not None:
                    self._running.pop((name, key), None)
            if journaled:
                self.journal.request_reply(name, key, reply)  # type: ignore[union-attr]
            fut.set_result(reply)
            if key is not None:
                self._remember(name, key, reply)
            log.debug("command handled", extra={"command": name, "who": who, "ok": reply.startswith(b'{"ok":true')})
            return reply, rid
        except CommandError as e:
            self.metrics.commands.labels(label, e.code).inc()
            return reply_error(e.code, e.message), rid or e.rid
        except Exception as e:  # noqa: BLE001 - a bug answers 'internal', the agent keeps running
            log.exception("command failed", extra={"command": name})
            self.metrics.commands.labels(label, "internal").inc()
            return reply_error("internal", f"{type(e).__name__}: {e}"[:200]), rid

    def check_allowed(self, op: Operation) -> None:
        if op.name not in self.allow:
            raise CommandError("forbidden", f"command {op.name!r} is not allowed on this gateway (commands.allow)")

    def check_signed(self, op: Operation, signer: str | None) -> None:
        if op.changes and self.keys and signer is None:
            raise CommandError("forbidden", f"{op.name!r} changes the gateway and this gateway requires an operator's "
                                            "signature for that (commands.operator_keys)")

    async def run(self, op: Operation, fields: dict, who: str, signer: str | None = None) -> Any:
        """Run an operation whose request passed the checks (`ask` runs the call it plans through here)."""
        return await op.run(self.gw, Request(op.name, fields, who, self.cfg, self, signer))

    def _cached(self, name: str, rid: str) -> bytes | None:
        now = time.monotonic()
        while self._seen:
            (_, (t, _r)) = next(iter(self._seen.items()))
            if now - t <= self.cfg.dedup_window_s:
                break
            self._seen.popitem(last=False)
        hit = self._seen.get((name, rid))
        return hit[1] if hit else None

    def _remember(self, name: str, rid: str, reply: bytes) -> None:
        self._seen[(name, rid)] = (time.monotonic(), reply)
        while len(self._seen) > self.cfg.dedup_max:
            self._seen.popitem(last=False)


def _depth(doc: Any) -> int:
    """How deep objects and arrays nest in a parsed document (iterative: no recursion on hostile input)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d)
            if d <= MAX_DEPTH:
                stack.extend((x, d + 1) for x in v)
    return deepest


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")
