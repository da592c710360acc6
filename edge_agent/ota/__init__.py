"""Model updates over the air (the workflow; `trust.py` holds the trusted state and every check, with no I/O;
`fetch.py` the HTTPS fetcher): fetch a signed bundle, verify it before ONNX Runtime sees a byte, stage it, check its
health beside the serving model, swap with no failed question, roll back on failure.

A bundle is a model folder published at a URL: `<url>/manifest.json`, `<url>/manifest.sig` and every file the
manifest lists (`edge-agent model pack` writes them). The flow, each step an event on `<prefix>/<gateway>/ota`
(through the store, so events raised during an outage arrive after it):

  requested -> manifest verified (signature by a trusted key; name, version above every version ever installed
  unless the manifest is a rollback permission — `"rollback": true`, `"rollback_from"` the floor, expiring within 7
  days, used once; not expired; the agent new enough; plain file names; the bundle's
  size within ota.max_bundle_bytes and the disk's free space less ota.disk_reserve_bytes) -> downloading (HTTPS
  with the gateway's client certificate, each file to a `.partial` that resumes with `Range` after an
  interruption, never past its stated size, hashed once on its way in) -> staged (fsynced, renamed into
  `<state>/models/<name>/<version>`; never over a live version) -> health (the folder verified as a whole as the
  runtime loads it, beside the serving one, and its smoke set answers as the build's fp32 model did, each within
  ota.smoke_max_ms) -> active (one switch; questions in flight finish on the
  old engine) -> good (after ota.good_after_s without a restart).

Failure at any step leaves the serving model serving, and is an event with its reason and a counter. A restart
in the middle: the update is reported failed and its leftovers removed. A new model that makes the agent restart
ota.crash_restarts times within ota.crash_window_s before it is marked good is rolled back at the next start.

State (store meta `ota`): the active version, the good ones, the bad ones with their reasons, the highest version
ever installed (the anti-rollback floor), the version on trial and its boot count, an update in progress.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import ssl
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from edge_agent import __version__
from edge_agent.files import fsync_dir, fsync_file
from edge_agent.glm.models import MAX_MANIFEST_BYTES, ModelError, read_bounded
from edge_agent.logs import TRACE
from edge_agent.ota.fetch import Fetcher, copy_checked
from edge_agent.ota.trust import (MODEL_REASONS, REASONS, OtaState, Target, Trust, UpdateError, check_update,
                                  key_set_message, semver)
from edge_agent.records import ModelHealthError

__all__ = ["REASONS", "Fetcher", "OtaState", "Target", "Trust", "UpdateError", "Updater", "check_update",
           "key_set_message", "semver"]

log = logging.getLogger(__name__)

# the reasons that fail an update that was under way (the others refuse it): the label's outcome
FAILURES = frozenset({"download", "interrupted", "health", "disk", "slow", "deadline", "cancelled"})


async def _remove(path: Path) -> None:
    """Delete a folder (a partial download, an old version) in a worker thread, not on the event loop."""
    try:
        await asyncio.get_running_loop().run_in_executor(None, lambda: shutil.rmtree(path, ignore_errors=True))
    except RuntimeError:  # the executor is shutting down with the agent: do it here, it is the last thing
        shutil.rmtree(path, ignore_errors=True)


class Updater:
    """The model update path of one gateway. `agent` (agent.Agent) loads, checks and swaps engines; `store` keeps
    the state (meta) and the events; `metrics` counts the outcomes."""

    def __init__(self, cfg, state_dir: Path, store, metrics, agent, ssl_context: Callable[[], ssl.SSLContext | None],
                 clock=time.time, target: Target = Target()) -> None:
        self.cfg, self.store, self.metrics, self.agent = cfg, store, metrics, agent
        self.trust = Trust(OtaState(), agent.cfg.public_key, cfg.trusted_keys, target, cfg.max_bundle_bytes)
        self.root = Path(state_dir) / "models"
        self.incoming = self.root / ".incoming"
        self.ssl_context, self.clock = ssl_context, clock
        self._busy: asyncio.Task | None = None
        self._fetcher: Fetcher | None = None
        self._good_timer: asyncio.TimerHandle | None = None
        self._loaded = False  # the state is read at boot (or by an update that comes first)
        self.progress: dict | None = None  # the update in progress: step, version, bytes done and in all
        self.last: dict | None = None      # the last update's outcome
        self.steps: list[str] = []         # the events of the update in progress, or of the last one
        self._stopping = False             # the agent is stopping (cancel): an update ends as interrupted

    @property
    def state(self) -> OtaState:
        return self.trust.state

    @property
    def keys(self) -> list[str]:
        return self.trust.keys

    async def rotate_keys(self, keys: list[str], serial: int, sig: str) -> dict:
        """Replace the trusted key set (Trust.rotate decides); the agent's engines load with the new set."""
        try:
            self.trust.rotate(keys, serial, sig)
        except UpdateError as e:
            if e.reason == "signature":
                self._count("refused", "signature")
            raise
        await self._save()
        self.agent.keys = self.keys
        self.event("keys_rotated", serial=serial, keys=len(keys))
        return {"keys": self.keys, "serial": serial}

    # ---- state and events -----------------------------------------------------------------------
    async def _save(self) -> None:
        await self.store.set_meta("ota", asdict(self.state))

    def event(self, event: str, **fields: Any) -> None:
        if self.progress is not None and event not in ("requested", "deleted"):
            self.progress["step"] = event
        if event != "deleted":
            self.steps = [*self.steps[-20:], event] if event != "requested" else [event]
        doc = {"event": event, "ts": round(self.clock(), 3), "agent": __version__, **fields}
        if TRACE.get():
            doc["trace"] = TRACE.get()  # the model.update request that started it
        self.store.event("ota", json.dumps(doc, separators=(",", ":"), default=str).encode())
        (log.warning if event in ("refused", "failed", "rolled_back", "health_failed") else log.info)(
            f"model update: {event}", extra={k: str(v)[:200] for k, v in fields.items()})

    def _count(self, outcome: str, reason: str = "") -> None:
        self.metrics.model_updates.labels(outcome, reason).inc()

    def folder(self, version: str) -> Path:
        return self.root / (self.state.name or "model") / version

    # ---- boot ----------------------------------------------------------------------------------
    async def boot(self) -> Path | None:
        """Which model folder to load at start (None: the configured or shipped one), after the bookkeeping of a
        restart: an update a restart interrupted is reported failed; a model on trial counts this boot and is
        rolled back when it has made the agent restart too often."""
        if not self._loaded:
            self.trust.state, self._loaded = OtaState.of(await self.store.get_meta("ota")), True
        st = self.state
        self.agent.keys = self.keys
        if st.pending and not self.busy():  # (an update this process started before boot is not interrupted)
            p, st.pending = st.pending, None
            self.event("failed", version=p.get("version"), reason="interrupted",
                       error=f"the agent restarted during the update (at {p.get('step')})")
            self._count("failed", "interrupted")
        if not self.busy():
            await _remove(self.incoming)
        if st.trial:
            st.trial["boots"] = st.trial.get("boots", 0) + 1
            within = self.clock() - st.trial.get("swapped_at", 0) <= self.cfg.crash_window_s
            if st.trial["boots"] > self.cfg.crash_restarts and within:
                bad, st.trial = st.trial, None
                why = (f"the agent restarted {bad['boots'] - 1} times within {self.cfg.crash_window_s:g} s of the "
                       "swap, before the model was marked good")
                self.trust.mark_bad(bad["version"], why)
                st.active = bad.get("previous")
                self.event("rolled_back", version=bad["version"], to=st.active or "default", reason=why)
                self._count("rolled_back", "crash_loop")
        await self._save()
        return self.folder(st.active) if st.active else None

    def booted(self, version: str | None) -> None:
        """The agent serves `version` after a start: a model on trial is marked good after ota.good_after_s."""
        if self.state.trial and self.state.trial["version"] == version:
            self._arm_good(version)

    def _arm_good(self, version: str) -> None:
        if self._good_timer is not None:
            self._good_timer.cancel()
        loop = asyncio.get_running_loop()
        self._good_timer = loop.call_later(self.cfg.good_after_s,
                                           lambda: asyncio.ensure_future(self._mark_good(version)))

    async def _mark_good(self, version: str) -> None:
        st = self.state
        if not st.trial or st.trial["version"] != version:
            return
        st.trial = None
        st.good = [v for v in st.good if v != version] + [version]
        await self._save()
        self.event("good", version=version)
        await self._prune()

    async def _prune(self) -> None:
        """Keep the active version and the newest good ones, ota.keep_versions in all; delete the others (off the
        event loop: a real-size version is gigabytes)."""
        st = self.state
        base = self.root / (st.name or "model")
        if not base.is_dir():
            return
        keep = [st.active] + [v for v in reversed(st.good) if v != st.active]
        keep = set([v for v in keep if v][: self.cfg.keep_versions])
        if st.trial:
            keep |= {st.trial["version"], st.trial.get("previous")}
        for d in base.iterdir():
            if d.is_dir() and d.name not in keep:
                await _remove(d)
                self.event("deleted", version=d.name)

    # ---- the update ----------------------------------------------------------------------------
    def busy(self) -> bool:
        return self._busy is not None and not self._busy.done()

    async def update(self, url: str | None = None, folder: str | None = None, wait: bool = False) -> dict:
        """Start an update from a URL (a bundle on an HTTPS server) or a local folder. wait=False: returns once it
        is accepted (its steps follow as events); wait=True: returns its outcome."""
        if not self.cfg.enabled or not self.agent.cfg.enabled:
            self._count("refused", "disabled")
            raise UpdateError("disabled", "model updates are off on this gateway (ota.enabled = false)" if not
                              self.cfg.enabled else "the model is off on this gateway (model.enabled = false)")
        if self.busy():
            self._count("refused", "busy")
            raise UpdateError("busy", "another model update is in progress")
        if not self._loaded:  # an update before the agent's start read the state: the floor and the bad list hold
            self.trust.state, self._loaded = OtaState.of(await self.store.get_meta("ota")), True
        source = url or folder or ""
        self.event("requested", source=source[:200])
        self.progress = {"step": "requested", "source": source[:200], "version": None, "done": 0, "total": None}
        self._busy = asyncio.ensure_future(self._update(url, folder))
        if not wait:
            self._busy.add_done_callback(lambda t: t.cancelled() or t.exception())
            return {"accepted": True, "source": source[:200]}
        return await asyncio.shield(self._busy)

    async def _update(self, url: str | None, folder: str | None) -> dict:
        loop = asyncio.get_running_loop()
        version, watchdog = None, None
        try:
            if url:
                try:
                    ctx = self.ssl_context() if url.startswith("https://") else None
                except Exception as e:  # noqa: BLE001 - the TLS files: a clear refusal, not a crash
                    raise UpdateError("tls", f"the gateway's TLS files for the model server: {e}") from None
                fetcher = Fetcher(ctx, self.cfg.timeout_s, self.cfg.attempts, self.cfg.allow_plain_http,
                                  self._progress)
                self._fetcher = fetcher
                watchdog = asyncio.ensure_future(self._watch(fetcher))
                base = url.rstrip("/")
                body = await loop.run_in_executor(None, fetcher.get, f"{base}/manifest.json", MAX_MANIFEST_BYTES)
                try:
                    sig = await loop.run_in_executor(None, fetcher.get, f"{base}/manifest.sig", 4096)
                except UpdateError as e:
                    if e.reason != "not_found":
                        raise
                    raise UpdateError("signature", "the bundle is not signed (no manifest.sig)") from None
            else:
                src = Path(folder or "")
                try:  # bounded, regular files only (a FIFO in their place would block the loop)
                    body = read_bounded(src / "manifest.json", MAX_MANIFEST_BYTES)
                    sig = read_bounded(src / "manifest.sig", 4096)
                except OSError as e:
                    raise UpdateError("not_found", f"{src}: {e.strerror}") from None
            manifest = self._verify(body, sig)
            version = manifest["version"]
            self.progress.update(version=version, total=sum(m["size"] for m in manifest["files"].values()))
            self.state.pending = {"version": version, "source": (url or folder or "")[:200], "step": "download"}
            await self._save()
            self.event("verified", version=version, files=len(manifest["files"]),
                       bytes=sum(m["size"] for m in manifest["files"].values()))
            staging = self.incoming / f"{manifest['name']}-{version}"
            staging.mkdir(parents=True, exist_ok=True)
            self._room(manifest, staging)
            (staging / "manifest.json").write_bytes(body)
            (staging / "manifest.sig").write_bytes(sig)
            if url:
                await loop.run_in_executor(None, self._download, fetcher, url.rstrip("/"), manifest, staging)
                watchdog.cancel()
                self._fetcher = None  # from here a cancel cancels the task
            else:
                for name in manifest["files"]:
                    src_file = Path(folder) / name
                    if src_file.is_symlink() or not src_file.is_file():
                        raise UpdateError("path", f"{name}: not a regular file in {folder}")
                    m = manifest["files"][name]
                    await loop.run_in_executor(None, copy_checked, src_file, staging / name, m["size"], m["sha256"])
                    self._progress(manifest["files"][name]["size"])
            self.state.pending["step"] = "stage"
            await self._save()
            target = await loop.run_in_executor(None, self._stage, staging, manifest)
            await _remove(self.incoming)
            self.event("staged", version=version, path=str(target))
            self.state.pending["step"] = "health"
            await self._save()
            try:
                engine = await self.agent.prepare(target)  # verified as it loads, beside the serving engine; smoke set
            except ModelHealthError as e:
                raise UpdateError("health", str(e)) from None
            except ModelError:  # the folder as a whole fails the gate: it never serves, and does not stay installed
                await _remove(target)
                raise
            self.event("health_passed", version=version, provider=engine.info()["provider"])
            st = self.state
            previous = st.active
            st.name, st.active, st.pending = manifest["name"], version, None
            self.trust.activated(manifest, body)  # the floor rises, or a rollback permission is used
            st.trial = {"version": version, "previous": previous, "swapped_at": self.clock(), "boots": 0}
            await self._save()  # from here a restart boots the new version (on trial)
            await self.agent.swap(engine)
            self.event("active", version=version, previous=previous or "default")
            self._count("active")
            self._arm_good(version)
            await self._prune()
            self.last = {"outcome": "active", "version": version}
            return {"version": version, "active": True}
        except UpdateError as e:
            await self._fail(version, e)
            raise
        except asyncio.CancelledError:
            why = UpdateError("interrupted", "the agent stopped during the update") if self._stopping else \
                UpdateError("cancelled", "the update was cancelled by an operator")
            await self._fail(version, why)
            raise
        except ModelError as e:
            err = UpdateError(MODEL_REASONS.get(e.reason, "manifest"), str(e))
            await self._fail(version, err)
            raise err from None
        finally:
            if watchdog is not None:
                watchdog.cancel()
            self._fetcher = None
            self.progress = None

    async def _watch(self, fetcher: Fetcher) -> None:
        """The download's bounds, from the event loop: the whole of it within ota.deadline_s, and at least
        ota.min_rate_bps averaged over each ota.rate_window_s; either broken aborts the transfer at once."""
        cfg, start = self.cfg, time.monotonic()
        mark, seen = start, 0
        while True:
            await asyncio.sleep(min(1.0, cfg.rate_window_s / 4))
            now = time.monotonic()
            if now - start > cfg.deadline_s:
                fetcher.abort(UpdateError("deadline", f"the download did not finish within ota.deadline_s "
                                                      f"({cfg.deadline_s:g} s)"))
                return
            if now - mark >= cfg.rate_window_s:
                rate = (fetcher.received - seen) / (now - mark)
                if rate < cfg.min_rate_bps:
                    fetcher.abort(UpdateError("slow", f"the model server sent {rate:.0f} B/s over the last "
                                                      f"{now - mark:.0f} s; ota.min_rate_bps is {cfg.min_rate_bps}"))
                    return
                mark, seen = now, fetcher.received

    def abort(self) -> bool:
        """Cancel the update in progress (model.cancel): its download stops at once, any later step is cancelled;
        it fails with reason `cancelled`. False when none is in progress."""
        if not self.busy():
            return False
        if self._fetcher is not None:
            self._fetcher.abort(UpdateError("cancelled", "the update was cancelled by an operator"))
        else:
            self._busy.cancel()
        return True

    async def _fail(self, version: str | None, e: UpdateError) -> None:
        outcome = "failed" if e.reason in FAILURES else "refused"
        if e.reason == "health" and version and version not in self.state.bad:
            self.trust.mark_bad(version, e.message)
            self.event("health_failed", version=version, reason=e.reason, error=e.message[:300])
        self.event(outcome, version=version, reason=e.reason, error=e.message[:300])
        self._count(outcome, e.reason)
        self.last = {"outcome": outcome, "version": version, "reason": e.reason, "error": e.message[:300]}
        self.state.pending = None
        await _remove(self.incoming)  # one update at a time: nothing else is in there
        try:
            await self._save()
        except Exception:  # noqa: BLE001 - the store may be closing; the state is rebuilt at the next start
            log.exception("model update state not saved")

    def _progress(self, n: int) -> None:  # from the download thread: a dict update is atomic enough to read
        p = self.progress
        if p is not None:
            p["done"] += n

    def _verify(self, body: bytes, sig: bytes) -> dict:
        return self.trust.manifest(body, sig, self.clock(), self.agent.model_name())

    def _room(self, manifest: dict, staging: Path) -> None:
        """Refuse before the first byte when the bundle would not leave ota.disk_reserve_bytes free."""
        need = 0
        for name, m in manifest["files"].items():
            part = staging / (name + ".partial")
            need += m["size"] - (part.stat().st_size if part.exists() else 0)
        free = shutil.disk_usage(staging).free
        if need + self.cfg.disk_reserve_bytes > free:
            raise UpdateError("disk", f"the bundle needs {need} more bytes and ota.disk_reserve_bytes "
                                      f"({self.cfg.disk_reserve_bytes}) must stay free; {free} are free")

    def _download(self, fetcher: Fetcher, base: str, manifest: dict, staging: Path) -> None:
        for name, m in sorted(manifest["files"].items()):
            fetcher.file(f"{base}/{name}", staging / name, m["size"], m["sha256"])

    def _stage(self, staging: Path, manifest: dict) -> Path:
        """Verify the downloaded folder as the runtime will load it, fsync it, rename it into place."""
        # each file's size and sha256 were checked on its way in (Fetcher.file, copy_checked); the folder is verified
        # once more, as a whole, when the agent loads it (prepare)
        for p in staging.iterdir():
            fsync_file(p)
        fsync_dir(staging)
        target = self.root / manifest["name"] / manifest["version"]
        target.parent.mkdir(parents=True, exist_ok=True)
        if self.state.active == manifest["version"]:
            raise UpdateError("downgrade", f"version {manifest['version']} is the one serving")
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
        fsync_dir(target.parent)
        return target

    # ---- rollback, list ------------------------------------------------------------------------
    async def rollback(self) -> dict:
        """Serve the previous good version again (health-checked like an update); the current one is marked bad."""
        if self.busy():
            raise UpdateError("busy", "a model update is in progress")
        st = self.state
        candidates = [v for v in reversed(st.good) if v != st.active and self.folder(v).is_dir()]
        target = candidates[0] if candidates else None
        folder = self.folder(target) if target else None
        try:
            engine = await self.agent.prepare(folder)
        except ModelHealthError as e:
            raise UpdateError("health", f"the version to roll back to fails its health check: {e}") from None
        old = st.active
        if old:
            self.trust.mark_bad(old, "rolled back by an operator")
        st.active, st.trial = target, None
        await self._save()
        await self.agent.swap(engine)
        self.event("rolled_back", version=old or "default", to=target or "default", reason="operator")
        self._count("rolled_back", "operator")
        return {"active": target or "default", "previous": old or "default"}

    def list(self) -> dict:
        base = self.root / (self.state.name or "model")
        installed = sorted((d.name for d in base.iterdir() if d.is_dir()), key=semver) if base.is_dir() else []
        st = self.state
        return {"active": st.active or "default", "serving": self.agent.model_name_version(),
                "installed": installed, "good": st.good, "bad": st.bad, "highest": st.highest,
                "trial": st.trial, "updating": dict(self.progress) if self.progress else None, "last": self.last,
                "steps": list(self.steps)}

    def cancel(self) -> None:
        """The agent is stopping: a download stops at once (reason interrupted)."""
        self._stopping = True
        if self._fetcher is not None:
            self._fetcher.abort(UpdateError("interrupted", "the update was cancelled (the agent is stopping)"))
        if self._good_timer is not None:
            self._good_timer.cancel()
