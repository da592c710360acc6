"""What an operation is, what it may touch, and how it answers.

An `Operation` is declared once: its name, its fields (validated by the router before it runs, with messages that
name the field), whether it changes anything, `run(gateway, request)`, its one-line answer text and, where the GLM
may call it, its tool. The MQTT command channel, `ask` and the CLI (through the daemon's control socket) are three
clients of the same table (`edge_agent.ops.TABLE`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from edge_agent.config import CommandsConfig
from edge_agent.logs import TRACE
from edge_agent.glm.schema import ToolSpec

if TYPE_CHECKING:
    from edge_agent.ops.router import Router

MAX_STRING = 256  # any string field of a request


class CommandError(Exception):
    """An operation's refusal: `code` is one of the error codes the router documents."""

    def __init__(self, code: str, message: str, rid: str | None = None, call: dict | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.rid, self.call = code, message, rid, call


@dataclass(frozen=True)
class Field:
    """One field of a request: the JSON types it may have, whether it must be there."""
    types: tuple[type, ...]
    required: bool = True

    def describe(self) -> str:
        return " or ".join("null" if t is type(None) else t.__name__ for t in self.types)


@dataclass
class Gateway:
    """What operations may touch, handed in by the supervisor."""
    status: Callable[[], dict]
    devices: Callable[[], Awaitable[list[dict]]]
    query_stats: Callable[[str, str, str, int, int], Awaitable[dict]]
    write_point: Callable[[str, str, Any], Awaitable[None]]
    config: Callable[[], dict]
    log_lines: Callable[[], list[tuple[str, str, str]]]
    rules_list: Callable[[], list[dict]]
    rules_add: Callable[[dict], Awaitable[dict]]       # raises ValueError (bad rule) / PermissionError
    rules_remove: Callable[[str], Awaitable[bool]]     # raises PermissionError (a config rule)
    alerts: Callable[[str | None, int], Awaitable[dict]]  # (device or None, cleared to show) -> firing, cleared
    # the agent's plan(text, registry: device -> points); raises agent.AskError
    ask: Callable[[str, dict], Awaitable[dict]] | None = None
    pending: Any = None  # ops.ask.PendingWrites: writes ask proposed, awaiting confirmation
    memory: Any = None  # ops.memory.Memory: each requester's conversation frame (None: no follow-ups)
    points: Any = None  # glm.points.PointTable: the shipped point words and the gateway's own (ask.points)
    models: Any = None  # ota.Updater: model updates, rollback, the installed versions
    log_level: Callable[[str, float], dict] | None = None  # the shipped log level for a while (logs.level)
    renew_cert: Callable[[], dict] | None = None  # start an uplink certificate renewal (certs.renew)
    forget_device: Callable[[str], Awaitable[int | None]] | None = None  # devices.forget (the store's registry)
    forward_list: Callable[[], list[dict]] = list                  # the forwarding rules, in match order
    forward_set: Callable[[Any], Awaitable[dict]] | None = None   # a ForwardRuleConfig; raises PermissionError
    forward_remove: Callable[[str], Awaitable[bool]] | None = None  # raises PermissionError (a config rule)


@dataclass
class Request:
    """One validated request on its way to an operation."""
    name: str
    fields: dict[str, Any]
    who: str                       # for the audit: the channel and what it knows of the sender
    cfg: CommandsConfig
    router: "Router"               # ask runs the call it plans through the same router
    signer: str | None = None      # the operator key that signed the request, when it was signed


@dataclass(frozen=True)
class Operation:
    name: str
    doc: str
    fields: dict[str, Field]
    changes: bool                  # read-only (False) or changes something (True)
    run: Callable[[Gateway, Request], Awaitable[Any]]
    answer: Callable[[dict, Any], str] | None = None  # one line for a person, from the fields and the result
    tool: ToolSpec | None = None   # where the GLM may call it: the tool's arguments are the operation's fields
    examples: tuple[str, ...] = field(default=())  # for `edge-agent ops`


def _finite(x: Any) -> Any:
    """JSON has no NaN or Infinity: a non-finite float in a reply is written as null, never as bare NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _dumps(doc: dict) -> bytes:
    try:
        return json.dumps(doc, separators=(",", ":"), default=str, allow_nan=False).encode()
    except ValueError:  # a NaN or an infinity somewhere in the result
        return json.dumps(_finite(doc), separators=(",", ":"), default=str, allow_nan=False).encode()


def reply_ok(result: Any) -> bytes:
    return _dumps({"ok": True, "result": result, **_trace()})


def reply_error(code: str, message: str, call: dict | None = None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message}
    if call is not None:
        err["call"] = call  # ask: the tool call the model made of the question
    return _dumps({"ok": False, "error": err, **_trace()})


def _trace() -> dict:
    """The request's trace id (every log line it caused carries it as trace=...)."""
    t = TRACE.get()
    return {"trace": t} if t else {}
