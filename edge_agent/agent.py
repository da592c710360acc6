"""The agent: the supervisor's component that owns the GLM engine (load, plan, close).

The GLM only proposes a tool call; `ops.ask` runs it as the operation the tool belongs to, through that operation's
checks. The tools the model may call come from the operations table (`ops.TOOLSET`), handed in here.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class AskError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class Agent:
    """The supervisor's component that owns the GLM engine."""
    name = "glm"

    def __init__(self, cfg, tools, state_dir: Path, metrics, points=None) -> None:
        self.cfg = cfg
        self.tools = tools
        self.points = points
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

        from edge_agent.glm.points import SHIPPED

        engine = Engine(self.cfg, self.tools, cache_dir=self._state_dir / "model-cache", metrics=self._metrics,
                        points=self.points or SHIPPED)
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

    async def plan(self, text: str, known=None) -> dict:
        """The model's call for a question (named from `known`, the registry, where given); raises AskError with a
        command error code."""
        from edge_agent.glm.engine import Busy, Unavailable
        from edge_agent.glm.generate import ConstraintError, GenerationTimeout
        from edge_agent.glm.tokenizer import PromptError

        if self.engine is None:
            raise AskError("unavailable", self.error or "the model is still loading")
        try:
            plan = await self.engine.ask(text, known=known)
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
