"""Command routing and request/response, independent of the transport.

A request is a JSON object on `<prefix>/<gateway>/cmd/<name>`; the uplink hands its name and bytes
here and publishes the reply this returns: `{"ok": true, "result": ...}` or
`{"ok": false, "error": {"code": ..., "message": ...}}`.

Error codes: `bad_request` (not JSON, not an object, unknown field, wrong type, bad id),
`too_large`, `unknown_command`, `forbidden` (not in `commands.allow`), `busy` (at the concurrency
bound, or the model's queue is full), `not_found`, `refused` (a write the adapter refused, with its reason),
`timeout`, `unavailable` and `unanswerable` (ask: the model did not answer in time / is not loaded / made no
valid call within its token budget), `internal`.

`ask` runs the model's tool call as the matching command, through that command's own checks: a question that
maps to a command not in `commands.allow` is refused with `forbidden`, and the error carries the call.

Every request may carry an `id` (1-64 of letters, digits, `_.-`); over MQTT 3.1.1 it is required,
since the reply goes to `<prefix>/<gateway>/res/<id>`. A request whose (name, id) was answered
within `dedup_window_s` gets the same reply again without running twice: a write the cloud resent
is executed once.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from edge_agent.config import CommandsConfig
from edge_agent.metrics import Metrics

log = logging.getLogger(__name__)
audit = logging.getLogger("edge_agent.audit")

_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ID_IN_TEXT = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9_.-]{1,64})"')  # to route a refusal of an unparsable request
_AGGS = ("last", "min", "max", "avg", "count")
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class CommandError(Exception):
    def __init__(self, code: str, message: str, rid: str | None = None, call: dict | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.rid, self.call = code, message, rid, call


@dataclass
class Gateway:
    """What the commands may touch, handed in by the supervisor."""
    status: Callable[[], dict]
    devices: Callable[[], Awaitable[list[dict]]]
    query_stats: Callable[[str, str, str, int, int], Awaitable[dict]]
    write_point: Callable[[str, str, Any], Awaitable[None]]
    config: Callable[[], dict]
    log_lines: Callable[[], list[tuple[str, str, str]]]
    rules_list: Callable[[], list[dict]]
    rules_add: Callable[[dict], Awaitable[dict]]       # raises ValueError (bad rule) / PermissionError
    rules_remove: Callable[[str], Awaitable[bool]]     # raises PermissionError (a config rule)
    ask: Callable[[str], Awaitable[dict]] | None = None  # the agent's plan(); raises agent.AskError


# name -> {field: (types, required)}; "id" is allowed everywhere
_SCHEMAS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "ping": {},
    "status": {},
    "devices": {"filter": ((str, type(None)), False)},
    "query": {"device": ((str,), True), "point": ((str,), True), "agg": ((str,), True), "window_s": ((int,), True)},
    "write": {"device": ((str,), True), "point": ((str,), True), "value": ((int, float, bool, str), True)},
    "logs.tail": {"n": ((int,), False), "level": ((str,), False), "component": ((str,), False)},
    "ask": {"text": ((str,), True)},
    "config.get": {},
    "rules.list": {},
    "rules.add": {"rule": ((dict,), True)},
    "rules.remove": {"rule_id": ((str,), True)},
}


def reply_ok(result: Any) -> bytes:
    return json.dumps({"ok": True, "result": result}, separators=(",", ":"), default=str).encode()


def reply_error(code: str, message: str, call: dict | None = None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message}
    if call is not None:
        err["call"] = call  # ask: the tool call the model made of the question
    return json.dumps({"ok": False, "error": err}, separators=(",", ":")).encode()


class Commands:
    def __init__(self, cfg: CommandsConfig, gw: Gateway, metrics: Metrics) -> None:
        self.cfg, self.gw, self.metrics = cfg, gw, metrics
        self._seen: collections.OrderedDict[tuple[str, str], tuple[float, bytes]] = collections.OrderedDict()
        self._running: dict[tuple[str, str], asyncio.Future] = {}
        self._slots = asyncio.Semaphore(cfg.concurrency)

    def parse(self, name: str, body: bytes) -> tuple[dict, str | None]:
        """Validate a request; returns (fields, id). Raises CommandError (carrying the id when one
        could be read, so that even a refusal can be routed to res/<id>)."""
        if len(body) > self.cfg.max_request_bytes:
            m = _ID_IN_TEXT.search(body[:512])
            raise CommandError("too_large", f"request of {len(body)} bytes > max_request_bytes "
                                            f"{self.cfg.max_request_bytes}", m.group(1).decode() if m else None)
        try:
            doc = json.loads(body.decode("utf-8")) if body.strip() else {}
        except (UnicodeDecodeError, ValueError) as e:
            m = _ID_IN_TEXT.search(body[:512])
            raise CommandError("bad_request", f"request is not JSON: {e}"[:200],
                               m.group(1).decode() if m else None) from None
        if not isinstance(doc, dict):
            raise CommandError("bad_request", "request must be a JSON object")
        rid = doc.pop("id", None)
        if rid is not None and (not isinstance(rid, str) or not _ID.match(rid)):
            raise CommandError("bad_request", "id must be 1-64 letters, digits, '_', '.', '-'")
        if name not in _SCHEMAS:
            raise CommandError("unknown_command", f"unknown command {name[:64]!r} (known: {', '.join(_SCHEMAS)})",
                               rid)
        schema = _SCHEMAS[name]
        for k in doc:
            if k not in schema:
                raise CommandError("bad_request", f"{name}: unknown field {k[:40]!r} "
                                                  f"(fields: {', '.join(schema) or 'none'}, id)", rid)
        for k, (types, required) in schema.items():
            if k not in doc:
                if required:
                    raise CommandError("bad_request", f"{name}: field {k!r} is required", rid)
                continue
            v = doc[k]
            if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
                want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise CommandError("bad_request", f"{name}: field {k!r} must be {want}, got {type(v).__name__}",
                                   rid)
            if isinstance(v, str) and len(v) > 256:
                raise CommandError("bad_request", f"{name}: field {k!r} longer than 256 characters", rid)
        return doc, rid

    async def handle(self, name: str, body: bytes, who: str) -> tuple[bytes, str | None]:
        """Run one request; returns (reply, id). Never raises."""
        rid = None
        try:
            fields, rid = self.parse(name, body)
            if name not in self.cfg.allow:
                raise CommandError("forbidden", f"command {name!r} is not allowed on this gateway (commands.allow)")
            if rid is not None:
                cached = self._cached(name, rid)
                if cached is not None:
                    self.metrics.commands.labels(name, "duplicate").inc()
                    return cached, rid
                running = self._running.get((name, rid))
                if running is not None:  # the same id again while the first still runs: one execution
                    self.metrics.commands.labels(name, "duplicate").inc()
                    return await asyncio.shield(running), rid
            if self._slots.locked():
                raise CommandError("busy", f"{self.cfg.concurrency} commands are running; retry")
            fut: asyncio.Future = asyncio.get_running_loop().create_future()
            if rid is not None:
                self._running[(name, rid)] = fut
            try:
                async with self._slots:
                    reply = await self._execute(name, fields, who)
            except CommandError as e:
                reply = reply_error(e.code, e.message, e.call)
                self.metrics.commands.labels(name, e.code).inc()
            except Exception as e:  # noqa: BLE001 - a bug answers 'internal', the agent keeps running
                log.exception("command failed", extra={"command": name})
                reply = reply_error("internal", f"{type(e).__name__}: {e}"[:200])
                self.metrics.commands.labels(name, "internal").inc()
            else:
                self.metrics.commands.labels(name, "ok").inc()
            finally:
                if rid is not None:
                    self._running.pop((name, rid), None)
            fut.set_result(reply)
            if rid is not None:
                self._remember(name, rid, reply)
            return reply, rid
        except CommandError as e:
            self.metrics.commands.labels(name if name in _SCHEMAS else "unknown", e.code).inc()
            return reply_error(e.code, e.message), rid or e.rid
        except Exception as e:  # noqa: BLE001 - a bug answers 'internal', the agent keeps running
            log.exception("command failed", extra={"command": name})
            self.metrics.commands.labels(name if name in _SCHEMAS else "unknown", "internal").inc()
            return reply_error("internal", f"{type(e).__name__}: {e}"[:200]), rid

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

    async def _execute(self, name: str, f: dict, who: str) -> bytes:
        if name == "ask":
            return reply_ok(await self._ask(f["text"], who))
        return reply_ok(await self._run(name, f, who))

    async def _ask(self, text: str, who: str) -> dict:
        from edge_agent.agent import AskError, answer_text, command_for

        if self.gw.ask is None:
            raise CommandError("unavailable", "this gateway runs without the model")
        try:
            plan = await self.gw.ask(text)
        except AskError as e:
            raise CommandError(e.code, e.message) from None
        call = plan["call"]
        name, fields = command_for(call)
        if name not in self.cfg.allow:
            audit.warning("ask refused", extra={"who": who, "text": text[:200], "call": json.dumps(call)})
            raise CommandError("forbidden", f"the question maps to {call['tool']}, which runs command {name!r}, and "
                                            f"{name!r} is not allowed on this gateway (commands.allow)", call=call)
        try:
            result = await self._run(name, fields, f"{who} via ask")
        except CommandError as e:
            e.call = call
            raise
        return {"call": call, "result": result, "answer": answer_text(call, result), **plan}

    async def _run(self, name: str, f: dict, who: str) -> Any:
        gw = self.gw
        if name == "ping":
            return {"pong": True, "ts": time.time_ns()}
        if name == "status":
            return gw.status()
        if name == "devices":
            devices = await gw.devices()
            flt = f.get("filter")
            if flt:
                devices = [d for d in devices if flt.lower() in d["device"].lower()]
            return devices
        if name == "query":
            if f["agg"] not in _AGGS:
                raise CommandError("bad_request", f"query: agg must be one of {', '.join(_AGGS)}")
            if not 1 <= f["window_s"] <= 366 * 86400:
                raise CommandError("bad_request", "query: window_s must be 1 .. 31622400")
            try:
                return (await gw.query_stats(f["device"], f["point"], f["agg"], f["window_s"],
                                                     self.cfg.query_max_rows))
            except LookupError as e:
                raise CommandError("not_found", str(e).strip("'\"")) from None
            except OverflowError as e:
                raise CommandError("refused", str(e)) from None
        if name == "write":
            from edge_agent.southbound import WriteRefused
            what = {"device": f["device"], "point": f["point"], "value": f["value"]}
            try:
                await gw.write_point(f["device"], f["point"], f["value"])
            except WriteRefused as e:
                audit.warning("write refused", extra={"who": who, **what, "reason": str(e)})
                raise CommandError("refused", str(e)) from None
            audit.info("write done", extra={"who": who, **what})
            return {"written": what}
        if name == "logs.tail":
            n = f.get("n", 50)
            if not 1 <= n <= 1000:
                raise CommandError("bad_request", "logs.tail: n must be 1 .. 1000")
            level = f.get("level", "debug")
            if level not in _LEVELS:
                raise CommandError("bad_request", f"logs.tail: level must be one of {', '.join(_LEVELS)}")
            comp = f.get("component")
            lines = [line for lv, c, line in gw.log_lines()
                     if _LEVELS.get(lv, 50) >= _LEVELS[level] and (comp is None or c.startswith(comp))]
            return lines[-n:]
        if name == "config.get":
            return gw.config()
        if name == "rules.list":
            return gw.rules_list()
        if name == "rules.add":
            try:
                rule = await gw.rules_add(f["rule"])
            except (ValueError, PermissionError) as e:
                audit.warning("rule add refused", extra={"who": who, "rule": str(f["rule"])[:200], "reason": str(e)})
                raise CommandError("bad_request" if isinstance(e, ValueError) else "refused", str(e)) from None
            audit.info("rule added", extra={"who": who, "rule": rule["id"], "kind": rule["kind"],
                                            "device": rule["device"], "point": rule["point"]})
            return {"added": rule}
        if name == "rules.remove":
            try:
                removed = await gw.rules_remove(f["rule_id"])
            except PermissionError as e:
                audit.warning("rule remove refused", extra={"who": who, "rule": f["rule_id"], "reason": str(e)})
                raise CommandError("refused", str(e)) from None
            if not removed:
                raise CommandError("not_found", f"no rule {f['rule_id']!r}")
            audit.info("rule removed", extra={"who": who, "rule": f["rule_id"]})
            return {"removed": f["rule_id"]}
        raise CommandError("unknown_command", name)  # pragma: no cover - parse() refused it already
