"""Model updates over the air: fetch a signed bundle, verify it before ONNX Runtime sees a byte, stage it, check its
health beside the serving model, swap with no failed question, roll back on failure.

A bundle is a model folder published at a URL: `<url>/manifest.json`, `<url>/manifest.sig` and every file the
manifest lists (`edge-agent model pack` writes them). The flow, each step an event on `<prefix>/<gateway>/ota`
(through the store, so events raised during an outage arrive after it):

  requested -> manifest verified (signature by a trusted key; name, version above every version ever installed
  unless the manifest is a rollback permission — `"rollback": true`, `"rollback_from"` the floor, expiring within 7
  days, used once; not expired; the agent new enough; plain file names; the bundle's
  size within ota.max_bundle_bytes and the disk's free space less ota.disk_reserve_bytes) -> downloading (HTTPS
  with the gateway's client certificate, each file to a `.partial` that resumes with `Range` after an
  interruption, never past its stated size, then its sha256) -> staged (the whole folder verified again as the
  runtime loads it, fsynced, renamed into `<state>/models/<name>/<version>`; never over a live version) ->
  health (the model loads on the configured provider beside the serving one and its smoke set answers as the
  build's fp32 model did, each within ota.smoke_max_ms) -> active (one switch; questions in flight finish on the
  old engine) -> good (after ota.good_after_s without a restart).

Failure at any step leaves the serving model serving, and is an event with its reason and a counter. A restart
in the middle: the update is reported failed and its leftovers removed. A new model that makes the agent restart
ota.crash_restarts times within ota.crash_window_s before it is marked good is rolled back at the next start.

State (store meta `ota`): the active version, the good ones, the bad ones with their reasons, the highest version
ever installed (the anti-rollback floor), the version on trial and its boot count, an update in progress.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import ssl
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from edge_agent import __version__
from edge_agent.files import fsync_dir, fsync_file
from edge_agent.logs import TRACE
from edge_agent.glm.models import MAX_MANIFEST_BYTES, ModelError, load_verified, read_bounded, verify_manifest
from edge_agent.records import ModelHealthError

log = logging.getLogger(__name__)

# why an update did not happen: the label of edge_agent_model_updates_total{outcome="refused"|"failed"}
REASONS = ("signature", "digest", "size", "path", "expired", "downgrade", "agent_too_old", "disk", "tls",
           "download", "manifest", "health", "busy", "interrupted", "disabled", "not_found", "slow", "deadline",
           "cancelled", "wrong_target")
# the reasons that fail an update that was under way (the others refuse it): the label's outcome
_FAILURES = frozenset({"download", "interrupted", "health", "disk", "slow", "deadline", "cancelled"})
CHUNK = 1 << 16
# a model folder's refusal (glm.models.ModelError.reason) as an update's
_MODEL_REASONS = {"signature": "signature", "public_key": "signature", "digest": "digest", "missing": "digest",
                  "path": "path", "external_data": "path", "manifest": "manifest"}


MAX_KEYS = 5


def key_set_message(keys: list[str], serial: int) -> bytes:
    """What a key rotation signs: the new set and its serial, canonical JSON."""
    return json.dumps({"keys": list(keys), "serial": serial}, sort_keys=True, separators=(",", ":")).encode()


class UpdateError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason, self.message = reason, message


def semver(v: str) -> tuple:
    """Order of versions: numbers first; a pre-release (1.2.0-rc1) sorts before its release."""
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?", v)
    if not m:
        return (-1,)
    return (int(m[1]), int(m[2]), int(m[3]), 0 if m[4] else 1, m[4] or "")


@dataclass
class OtaState:
    name: str | None = None
    active: str | None = None      # the version serving (None: the configured or shipped model)
    good: list[str] = field(default_factory=list)  # versions that served ota.good_after_s, oldest first
    bad: dict[str, str] = field(default_factory=dict)  # version -> why it may not serve again
    highest: str | None = None     # no version at or below it is installed again, unless its manifest says rollback
    trial: dict | None = None      # {"version", "previous", "swapped_at", "boots"} until marked good
    pending: dict | None = None    # an update in progress: {"version", "url", "step"}
    keys: list[str] | None = None  # the trusted key set after a rotation (None: model.public_key, ota.trusted_keys)
    keys_serial: int = 0           # a rotation's serial: each must be above the last (no replay of an old set)
    rollbacks: list[str] = field(default_factory=list)  # sha256 of the rollback manifests used (never twice)

    @classmethod
    def of(cls, raw: Any) -> OtaState:
        if not isinstance(raw, dict):
            return cls()
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)


MAX_ROLLBACK_S = 7 * 86400  # a rollback permission lives at most this long (its manifest's `expires`)
MAX_ROLLBACKS_KEPT = 64      # the used rollback manifests remembered (oldest forgotten: long expired by then)


def manifest_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True)
class Target:
    """What a bundle may be meant for: this gateway's id and its hardware kind."""
    gateway: str = ""
    hardware: str = ""


def check_update(manifest: dict, state: OtaState, now: float, model_name: str | None, digest: str = "",
                 target: Target = Target()) -> None:
    """Refusals that need the manifest only (its signature already verified). A rollback permission (a manifest
    with "rollback": true, the only way below the floor) is bound: it names the version it rolls back from
    (`rollback_from`, which must be the floor now), expires within MAX_ROLLBACK_S, and is used once (`digest`, the
    manifest's sha256, is remembered). A manifest that names `gateways` or `hardware` (lists of ids and kinds)
    installs only on a gateway it names, of a kind it names (Uptane's replay to another device, wrong hardware)."""
    version = manifest["version"]
    for key, mine in (("gateways", target.gateway), ("hardware", target.hardware)):
        meant = manifest.get(key)
        if meant is None:
            continue
        if not isinstance(meant, list) or not all(isinstance(x, str) for x in meant):
            raise UpdateError("manifest", f"the manifest's {key!r} must be a list of strings")
        if mine not in meant:
            raise UpdateError("wrong_target", f"the bundle is meant for {key} {', '.join(meant)[:200]}; this "
                                              f"gateway is {mine!r}")
    if version in state.bad:
        raise UpdateError("health", f"version {version} was marked bad: {state.bad[version]}")
    if model_name and manifest["name"] != model_name:
        raise UpdateError("manifest", f"the bundle is model {manifest['name']!r}; this gateway runs {model_name!r}")
    expires = manifest.get("expires")
    if expires is not None and (isinstance(expires, bool) or not isinstance(expires, (int, float)) or now > expires):
        raise UpdateError("expired", f"the manifest expired at {expires} (unix time); now {int(now)}")
    if state.highest and semver(version) <= semver(state.highest):
        if manifest.get("rollback") is not True:
            raise UpdateError("downgrade", f"version {version} is not above {state.highest}, the highest ever "
                                           "installed (a manifest signed with \"rollback\": true is the only way down)")
        if manifest.get("rollback_from") != state.highest:
            raise UpdateError("downgrade", f"the rollback permission is from {manifest.get('rollback_from')!r}; this "
                                           f"gateway's floor is {state.highest} (a rollback is bound to the version it "
                                           "rolls back from)")
        if expires is None or expires - now > MAX_ROLLBACK_S:
            raise UpdateError("expired", f"a rollback permission must expire within {MAX_ROLLBACK_S // 86400} days "
                                         "(edge-agent model pack --rollback writes one)")
        if digest in state.rollbacks:
            raise UpdateError("downgrade", "this rollback permission was used already (it is never replayed)")
    need = manifest.get("min_agent_version", "0.0.0")
    if not isinstance(need, str) or semver(need) > semver(__version__):
        raise UpdateError("agent_too_old", f"the model needs agent {need}; this is {__version__}")


class Fetcher:
    """HTTPS (mutual TLS) GETs with urllib3: small bounded documents, and files streamed to `.partial` files that
    resume with Range. Blocking: run it in a thread."""

    def __init__(self, ctx: ssl.SSLContext | None, timeout_s: float, attempts: int, allow_http: bool,
                 progress: Callable[[int], None] | None = None, sleep=time.sleep) -> None:
        import urllib3

        self.urllib3 = urllib3
        self.pool = urllib3.PoolManager(ssl_context=ctx, timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
                                        retries=False, maxsize=1)
        self.attempts, self.allow_http, self.progress, self.sleep = attempts, allow_http, progress, sleep
        self.cancelled = False
        self.why: UpdateError | None = None  # why it was aborted (deadline, slow, cancelled, the agent stopping)
        self.received = 0  # bytes read from the server, every request: the watchdog's measure of the rate
        self._response = None  # the response being read (abort shuts its socket, from another thread)

    def abort(self, why: UpdateError) -> None:
        """Stop the transfer now, from any thread: a read blocked on the socket returns at once."""
        self.why, self.cancelled = self.why or why, True
        r = self._response
        if r is not None:
            try:
                r.shutdown()
            except Exception:  # noqa: BLE001 - the response may be closing on its own
                pass

    def _check_aborted(self) -> None:
        if self.cancelled:
            raise self.why or UpdateError("interrupted", "the update was cancelled (the agent is stopping)")

    def _read(self, r, limit: int):
        """The response's bytes as they come (read1: a server that drips bytes is seen dripping), at most `limit`."""
        self._response = r
        try:
            left = limit
            while left > 0:
                self._check_aborted()
                block = r.read1(min(CHUNK, left))
                if not block:
                    break
                self.received += len(block)
                left -= len(block)
                yield block
            self._check_aborted()
        finally:
            self._response = None

    def _check_url(self, url: str) -> None:
        if not (url.startswith("https://") or (self.allow_http and url.startswith("http://"))):
            raise UpdateError("tls", f"{url[:120]}: only https:// URLs (ota.allow_plain_http is off)")

    def _request(self, url: str, headers: dict[str, str] | None = None):
        u3 = self.urllib3
        self._check_url(url)
        try:
            r = self.pool.request("GET", url, headers=headers or {}, preload_content=False, redirect=False)
        except u3.exceptions.SSLError as e:
            raise UpdateError("tls", f"TLS with the model server failed: {str(e)[:200]}") from None
        if r.status in (400, 495, 496) and b"SSL" in (r.read(2048) or b""):
            r.release_conn()
            raise UpdateError("tls", f"the model server refused our client certificate (HTTP {r.status})")
        if r.status == 404:
            r.release_conn()
            raise UpdateError("not_found", f"{url[:160]}: not found (HTTP 404)")
        if r.status not in (200, 206):
            r.release_conn()
            raise UpdateError("download", f"{url[:160]}: HTTP {r.status}")
        return r

    def _retrying(self, what: str, fn):
        u3 = self.urllib3
        delay = 0.5
        for attempt in range(1, self.attempts + 1):
            self._check_aborted()
            try:
                return fn()
            except (u3.exceptions.HTTPError, OSError) as e:
                self._check_aborted()  # a read cut by abort() is the abort's failure, not the network's
                if attempt == self.attempts:
                    raise UpdateError("download", f"{what}: {type(e).__name__}: {str(e)[:160]} (after {attempt} "
                                                  "tries)") from None
                log.warning("model download interrupted; resuming", extra={"what": what, "try": attempt,
                                                                           "error": str(e)[:200]})
                self.sleep(delay)
                delay = min(delay * 2, 30.0)

    def get(self, url: str, limit: int) -> bytes:
        def once() -> bytes:
            r = self._request(url)
            try:
                data = b"".join(self._read(r, limit + 1))
            finally:
                r.release_conn()
            if len(data) > limit:
                raise UpdateError("size", f"{url[:160]}: larger than {limit} bytes")
            return data
        return self._retrying(url, once)

    def file(self, url: str, dest: Path, size: int, sha256: str) -> None:
        """dest, fetched whole and checked, through dest.partial; a partial file left by an earlier try (this
        process or one killed) is resumed from its end."""
        partial = dest.with_name(dest.name + ".partial")

        def once() -> None:
            have = partial.stat().st_size if partial.exists() else 0
            if have > size:
                partial.unlink()
                have = 0
            if have == size:
                return
            r = self._request(url, {"Range": f"bytes={have}-"} if have else None)
            try:
                total = r.headers.get("Content-Range", "").rpartition("/")[2] if r.status == 206 else \
                    r.headers.get("Content-Length")
                if total and total.isdigit() and int(total) != size:
                    raise UpdateError("size", f"{dest.name}: the server's file is {total} bytes; the manifest says "
                                              f"{size}")
                if have and r.status == 206:
                    start = int(re.match(r"bytes (\d+)-", r.headers.get("Content-Range", "bytes 0-"))[1])
                    if start != have:
                        raise UpdateError("download", f"{dest.name}: the server resumed at {start}, not {have}")
                    mode = "ab"
                else:  # the whole file (a server that ignores Range, or a fresh start)
                    have, mode = 0, "wb"
                with partial.open(mode) as f:
                    for block in self._read(r, size - have + 1):
                        if have + len(block) > size:
                            raise UpdateError("size", f"{dest.name}: the server sends more than the {size} bytes "
                                                      "the manifest states")
                        f.write(block)
                        have += len(block)
                        if self.progress is not None:
                            self.progress(len(block))
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                r.release_conn()
            if have < size:
                raise OSError(f"{dest.name}: the connection closed at {have} of {size} bytes")
        self._retrying(dest.name, once)
        h = hashlib.sha256()
        with partial.open("rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        if h.hexdigest() != sha256:
            partial.unlink()
            raise UpdateError("digest", f"{dest.name}: sha256 does not match the manifest")
        os.replace(partial, dest)


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
        self.target = target  # what a bundle that names its gateways or hardware must name
        self.root = Path(state_dir) / "models"
        self.incoming = self.root / ".incoming"
        self.ssl_context, self.clock = ssl_context, clock
        self.state = OtaState()
        self._busy: asyncio.Task | None = None
        self._fetcher: Fetcher | None = None
        self._good_timer: asyncio.TimerHandle | None = None
        self._loaded = False  # the state is read at boot (or by an update that comes first)
        self.progress: dict | None = None  # the update in progress: step, version, bytes done and in all
        self.last: dict | None = None      # the last update's outcome
        self.steps: list[str] = []         # the events of the update in progress, or of the last one
        self._stopping = False             # the agent is stopping (cancel): an update ends as interrupted

    @property
    def keys(self) -> list[str]:
        """The keys a model may be signed by: the rotated set where there is one, else ota.trusted_keys; and always
        model.public_key (the configured root: the shipped or configured model stays loadable)."""
        rotated = self.state.keys if self.state.keys is not None else self.cfg.trusted_keys
        return list(dict.fromkeys([self.agent.cfg.public_key, *rotated]))

    async def rotate_keys(self, keys: list[str], serial: int, sig: str) -> dict:
        """Replace the trusted key set with `keys`: accepted only when signed (Ed25519, over key_set_message) by a
        key of the current set, with a serial above the last one's."""
        from edge_agent.glm.models import parse_public_key

        if not 1 <= len(keys) <= MAX_KEYS:
            raise UpdateError("manifest", f"a key set holds 1..{MAX_KEYS} keys")
        try:
            for k in keys:
                parse_public_key(k)
        except ModelError as e:
            raise UpdateError("manifest", str(e)) from None
        if serial <= self.state.keys_serial:
            raise UpdateError("downgrade", f"key set serial {serial} is not above {self.state.keys_serial}, the last "
                                           "one accepted")
        msg = key_set_message(keys, serial)
        import base64
        import binascii

        from cryptography.exceptions import InvalidSignature
        try:
            raw = base64.b64decode(sig, validate=True)
        except (binascii.Error, ValueError):
            raise UpdateError("signature", "sig is not base64") from None
        for k in self.keys:
            try:
                parse_public_key(k).verify(raw, msg)
                break
            except InvalidSignature:
                continue
        else:
            self._count("refused", "signature")
            raise UpdateError("signature", "the new key set is not signed by a key of the current set")
        self.state.keys, self.state.keys_serial = list(keys), serial
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
            self.state, self._loaded = OtaState.of(await self.store.get_meta("ota")), True
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
                st.bad[bad["version"]] = why
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
            self.state, self._loaded = OtaState.of(await self.store.get_meta("ota")), True
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
                    await loop.run_in_executor(None, shutil.copyfile, src_file, staging / name)
                    self._progress(manifest["files"][name]["size"])
            self.state.pending["step"] = "stage"
            await self._save()
            target = await loop.run_in_executor(None, self._stage, staging, manifest)
            await _remove(self.incoming)
            self.event("staged", version=version, path=str(target))
            self.state.pending["step"] = "health"
            await self._save()
            try:
                engine = await self.agent.prepare(target)  # loads beside the serving engine; smoke set; latency
            except ModelHealthError as e:
                raise UpdateError("health", str(e)) from None
            self.event("health_passed", version=version, provider=engine.info()["provider"])
            st = self.state
            previous = st.active
            st.name, st.active, st.pending = manifest["name"], version, None
            if st.highest is None or semver(version) > semver(st.highest):
                st.highest = version
            elif manifest.get("rollback") is True:  # a rollback permission is used once
                st.rollbacks = [*st.rollbacks, manifest_digest(body)][-MAX_ROLLBACKS_KEPT:]
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
            err = UpdateError(_MODEL_REASONS.get(e.reason, "manifest"), str(e))
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
        outcome = "failed" if e.reason in _FAILURES else "refused"
        if e.reason == "health" and version and version not in self.state.bad:
            self.state.bad[version] = e.message[:300]
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
        try:
            manifest = verify_manifest(body, sig, self.keys)
        except ModelError as e:
            raise UpdateError(_MODEL_REASONS.get(e.reason, "manifest"), str(e)) from None
        if self.state.name is None:
            self.state.name = manifest["name"]
        check_update(manifest, self.state, self.clock(), self.agent.model_name(), manifest_digest(body), self.target)
        total = sum(m["size"] for m in manifest["files"].values())
        if total > self.cfg.max_bundle_bytes:
            raise UpdateError("size", f"the bundle is {total} bytes; ota.max_bundle_bytes is "
                                      f"{self.cfg.max_bundle_bytes}")
        return manifest

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
        load_verified(staging, self.keys).close()
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
            st.bad[old] = "rolled back by an operator"
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
