"""The operations table: every operation, declared once, and the tools the GLM may call (generated from it).

Rooms: `base` (Operation, Field, Gateway, Request, CommandError, replies), `router` (what is common to all),
`status`, `data`, `write`, `rules`, `forward`, `ask` (one module per family of operations). Adding an operation is one
definition in one of them (or a new module listed here) and its tests.
"""
from __future__ import annotations

from edge_agent.glm.schema import CLARIFY, Toolset
from edge_agent.ops import ask, data, forward, model, rules, status, write
from edge_agent.ops.ask import PendingWrites
from edge_agent.ops.base import CommandError, Gateway, Operation, reply_error, reply_ok
from edge_agent.ops.router import READ_ONLY, Router, allowed

_ORDER = ("ping", "status", "devices", "devices.forget", "query", "write", "logs.tail", "logs.level", "ask",
          "config.get", "rules.list", "rules.add", "rules.remove", "alerts.list",
          "forward.list", "forward.set", "forward.remove", "confirm", "model.list", "model.update",
          "model.cancel", "model.rollback", "model.keys", "certs.renew")
_ALL = {op.name: op for mod in (status, data, write, rules, forward, ask, model) for op in mod.OPERATIONS}
assert set(_ALL) == set(_ORDER), "list a new operation in _ORDER (the order `known:` messages and docs show)"
TABLE: dict[str, Operation] = {name: _ALL[name] for name in _ORDER}
BY_TOOL: dict[str, Operation] = {op.tool.name: op for op in TABLE.values() if op.tool is not None}
# the GLM's tools: one per operation that has one, and `clarify` (runs nothing: ask answers with its reason)
TOOLSET = Toolset([*(op.tool for op in TABLE.values() if op.tool is not None), CLARIFY])


def reference_markdown() -> str:
    """The operations as a Markdown table (docs/operations.md carries it; tests/test_docs.py checks it is current):
    name, what it changes, its fields, what it does, the GLM tool that runs it."""
    rows = ["| operation | kind | fields (`?`: optional) | what it does | GLM tool |", "|---|---|---|---|---|"]
    for op in TABLE.values():
        fields = ", ".join(f"`{k}{'' if f.required else '?'}`: {f.describe()}" for k, f in op.fields.items()) or "—"
        kind = "changes" if op.changes else "read-only"
        tool = f"`{op.tool.name}`" if op.tool else ""
        rows.append(f"| `{op.name}` | {kind} | {fields} | {op.doc.replace('|', '/')} | {tool} |")
    return "\n".join(rows) + "\n"

__all__ = ["BY_TOOL", "READ_ONLY", "TABLE", "TOOLSET", "CommandError", "Gateway", "Operation", "PendingWrites",
           "Router", "allowed", "reference_markdown",
           "reply_error", "reply_ok"]
