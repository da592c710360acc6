"""The agent: the supervisor's component that owns the GLM engine (load, plan, close).

The GLM only proposes a tool call; `ops.ask` runs it as the operation the tool belongs to, through that operation's
checks. The tools the model may call come from the operations table (`ops.TOOLSET`), handed in here.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Awaitable, Callable

from edge_agent.glm.models import ModelError
from edge_agent.records import ModelHealthError

log = logging.getLogger(__name__)


class AskError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class Agent:
    """The supervisor's component that owns the GLM engine."""
    name = "glm"

    def __init__(self, cfg, tools, state_dir: Path, metrics, points=None, keys: list[str] | None = None,
                 smoke_max_ms: float = 5000.0, boot: Callable[[], Awaitable[Path | None]] | None = None,
                 booted: Callable[[str | None], None] | None = None) -> None:
        self.cfg = cfg
        self.tools = tools
        self.points = points
        self.keys = keys or [cfg.public_key]  # the keys a model may be signed by (model.public_key, ota.trusted_keys)
        self.smoke_max_ms = smoke_max_ms
        # where updates are on (handed in by the supervisor): which folder to load at start, and the version that
        # then serves (the agent never holds the updater; the updater drives prepare and swap)
        self.boot, self.booted = boot, booted
        self.engine = None
        self.error: str | None = None if cfg.enabled else "the model is disabled (model.enabled = false)"
        self._state_dir = state_dir
        self._metrics = metrics
        self._stop = asyncio.Event()

    async def run(self) -> None:
        self._stop.clear()
        if self.cfg.enabled and self.engine is None:
            folder = await self.boot() if self.boot is not None else None
            loop = asyncio.get_running_loop()
            engine = await loop.run_in_executor(None, self._load, folder)
            if engine is None and folder is not None:  # an installed version that does not load: the default
                log.error("installed model not loaded; starting the configured one", extra={"folder": str(folder)})
                engine = await loop.run_in_executor(None, self._load, None)
            if engine is not None:
                self.engine, self.error = engine, None
                if self.booted is not None:
                    self.booted(engine.model.manifest["version"] if folder is not None else None)
        await self._stop.wait()

    def _engine(self):
        from edge_agent.glm.engine import Engine
        from edge_agent.glm.points import SHIPPED

        return Engine(self.cfg, self.tools, cache_dir=self._state_dir / "model-cache", metrics=self._metrics,
                      points=self.points or SHIPPED, keys=self.keys)

    def _load(self, folder: Path | None):
        engine = self._engine()
        try:
            engine.load(folder)
        except Exception as e:  # noqa: BLE001 - a model that cannot load: ask says why, the rest runs on
            self.error = f"model not loaded: {e}"[:300]
            log.error("model not loaded; ask is unavailable", extra={"error": str(e)[:300]})
            return None
        return engine

    async def prepare(self, folder: Path | None):
        """A new engine on `folder` (None: the configured or shipped model), loaded beside the serving one and
        health-checked: its smoke set answers as the build's fp32 model did, each within the latency bound.
        Raises records.ModelHealthError with the reason, or glm.models.ModelError where the folder fails the gate."""

        def build():
            engine = self._engine()
            try:
                engine.load(folder)
                wrong, slowest = engine.smoke()
            except ModelError:  # the folder fails the gate: not a health matter, its reason says what
                engine.close()
                raise
            except Exception as e:  # noqa: BLE001 - whatever else fails here fails the health check
                engine.close()
                raise ModelHealthError(f"the model does not load: {str(e)[:240]}") from None
            if wrong or slowest * 1e3 > self.smoke_max_ms:
                engine.close()
                if wrong:
                    text, got, want = wrong[0]
                    raise ModelHealthError(f"{len(wrong)} smoke answers differ from the build's: {text!r} -> "
                                                f"{got}, expected {want}")
                raise ModelHealthError(f"a smoke answer took {slowest * 1e3:.0f} ms (ota.smoke_max_ms = "
                                            f"{self.smoke_max_ms:g})")
            return engine
        return await asyncio.get_running_loop().run_in_executor(None, build)

    async def swap(self, engine) -> None:
        """Serve `engine` from now on: one switch; questions already queued on the old engine finish there, then it
        is closed."""
        old, self.engine, self.error = self.engine, engine, None
        if old is not None:
            await asyncio.get_running_loop().run_in_executor(None, old.close)

    def model_name(self) -> str | None:
        return self.engine.model.manifest["name"] if self.engine is not None else None

    def model_name_version(self) -> str | None:
        return self.engine.model.name if self.engine is not None else None

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

        engine = self.engine  # the one that answers, even if a swap happens meanwhile
        if engine is None:
            raise AskError("unavailable", self.error or "the model is still loading")
        try:
            plan = await engine.ask(text, known=known)
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
        info = engine.info()
        return {"call": plan.call, "model": f"{info['name']}@{info['version']}", "provider": info["provider"],
                "timings": plan.timings()}
