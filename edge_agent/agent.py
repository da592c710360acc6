"""Question -> tool call (via the GLM) -> the command that executes it -> a short answer.

The GLM only proposes: a call becomes the matching command (`query_stats` -> `query`, `list_devices` ->
`devices`, `write_point` -> `write`, `status` -> `status`) and runs through the same checks as that command
sent directly: the command allow-list, argument checks, the adapters' write allow-list and range checks, audit.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TOOL_COMMAND = {"query_stats": "query", "list_devices": "devices", "write_point": "write", "status": "status"}


class AskError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def command_for(call: dict) -> tuple[str, dict]:
    args = call["args"]
    if call["tool"] == "list_devices":
        return "devices", {"filter": args["filter"]}
    return TOOL_COMMAND[call["tool"]], dict(args)


def _window(s: int) -> str:
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s % n == 0:
            k = s // n
            return f"{k} {unit}{'s' if k != 1 else ''}"
    return f"{s} s"


def answer_text(call: dict, result: Any) -> str:
    tool, a = call["tool"], call["args"]
    if tool == "query_stats":
        value = result.get("value") if isinstance(result, dict) else None
        if value is None:
            return f"no {a['point']} readings from {a['device']} in the last {_window(a['window_s'])}"
        if isinstance(value, float):
            value = round(value, 3)
        if a["agg"] == "last":
            return f"{a['device']} {a['point']} is {value}"
        if a["agg"] == "count":
            return f"{value} {a['point']} readings from {a['device']} in the last {_window(a['window_s'])}"
        words = {"min": "lowest", "max": "highest", "avg": "average"}
        return f"{words[a['agg']]} {a['point']} of {a['device']} over the last {_window(a['window_s'])}: {value}"
    if tool == "list_devices":
        names = [d["device"] for d in result]
        head = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        what = f" matching {a['filter']!r}" if a["filter"] else ""
        return f"{len(names)} device{'s' if len(names) != 1 else ''}{what}" + (f": {head}" if names else "")
    if tool == "write_point":
        return f"wrote {a['value']!r} to {a['device']} {a['point']}"
    up = result.get("uptime_s", 0)
    return (f"gateway {result.get('gateway')} up {up / 3600:.1f} h; uplink "
            f"{'connected' if result.get('uplink_connected') else 'down'}; "
            f"{result.get('outbox_readings', 0)} readings waiting for the cloud")


class Agent:
    """The supervisor's component that owns the GLM engine."""
    name = "glm"

    def __init__(self, cfg, state_dir: Path, metrics) -> None:
        self.cfg = cfg
        self.engine = None
        self.error: str | None = None if cfg.enabled else "the model is disabled (model.enabled = false)"
        self._state_dir = state_dir
        self._metrics = metrics
        self._stop = asyncio.Event()

    async def run(self) -> None:
        self._stop.clear()
        if self.cfg.enabled and self.engine is None:
            await asyncio.get_running_loop().run_in_executor(None, self._load)
        await self._stop.wait()

    def _load(self) -> None:
        from edge_agent.glm.engine import Engine

        engine = Engine(self.cfg, cache_dir=self._state_dir / "model-cache", metrics=self._metrics)
        try:
            engine.load()
        except Exception as e:  # noqa: BLE001 - a model that cannot load: ask says why, the rest runs on
            self.error = f"model not loaded: {e}"[:300]
            log.error("model not loaded; ask is unavailable", extra={"error": str(e)[:300]})
            return
        self.engine, self.error = engine, None

    async def stop(self) -> None:
        self._stop.set()
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await asyncio.get_running_loop().run_in_executor(None, engine.close)

    def info(self) -> dict | None:
        if self.engine is None:
            return {"loaded": False, "error": self.error}
        return {"loaded": True, **self.engine.info()}

    async def plan(self, text: str) -> dict:
        """The model's call for a question; raises AskError with a command error code."""
        from edge_agent.glm.engine import Busy, Unavailable
        from edge_agent.glm.generate import ConstraintError, GenerationTimeout
        from edge_agent.glm.tokenizer import PromptError

        if self.engine is None:
            raise AskError("unavailable", self.error or "the model is still loading")
        try:
            plan = await self.engine.ask(text)
        except Busy as e:
            raise AskError("busy", str(e)) from None
        except GenerationTimeout as e:
            raise AskError("timeout", str(e)) from None
        except PromptError as e:
            raise AskError("bad_request", f"ask: {e}") from None
        except ConstraintError as e:
            raise AskError("unanswerable", f"the model made no call of this question: {e}") from None
        except Unavailable as e:
            raise AskError("unavailable", str(e)) from None
        info = self.engine.info()
        return {"call": plan.call, "model": f"{info['name']}@{info['version']}", "provider": info["provider"],
                "timings": plan.timings()}
