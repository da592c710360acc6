"""The gateway's certificate, one owner: the live pair and its TLS context, a candidate that waits for the broker's
acceptance (new files put in place by hand or by provisioning, or a renewal's pair), the files refused, the renewal
and its schedule (on Backoff), metrics and status (`GatewayCert`). The uplink asks it for the context to connect
with and reports what the broker did; it stays a transport.

Changed certificate files are looked at every `uplink.cert_watch_s` and on SIGHUP: a valid new set waits as the
candidate, the connection ends cleanly and the next one tries it; if the broker refuses it, the old pair serves on
at once and the refused files are not tried again until they change. Files that cannot serve at all (unreadable, a
key readable by others, expired, not matching) disable only the uplink: counted, said in status, retried.

Renewal on the device: the key is made here and never leaves; only a CSR does.

At `uplink.renew_fraction` of the certificate's lifetime (default 2/3, with a jitter of up to 5 % of the lifetime
so a fleet issued together does not renew together), or on `certs.renew`:

1. a new EC P-256 key is written to `<key_file>.new` (mode 0600, fsynced) and a CSR for CN=<gateway id> goes to
   `<prefix>/<gateway>/certs/csr` as `{"id", "csr"}`;
2. the cloud's signer answers on `<prefix>/<gateway>/certs/crt` with `{"id", "cert"}` (PEM; may carry its chain)
   within `uplink.renew_timeout_s`;
3. the certificate is checked (its key is the new key, CN the gateway id, a leaf — not a CA —, valid now, its chain
   holds, and it expires no sooner than the live one, or lives at least `uplink.renew_min_lifetime_s` where that
   is set: a renewal never shortens the gateway's life) and written to `<cert_file>.new`;
4. the uplink connects with the new pair; only when the broker accepts it are the files committed: `.new`
   renamed over the certificate, then over the key (the old key is gone). A refusal deletes the `.new` files and
   the old pair serves on; the renewal is retried after `uplink.renew_retry_s`, doubling.

A crash in the middle: at the next start `recover()` finishes a commit that was halfway (certificate renamed,
key not yet) or drops the `.new` files of an uncommitted renewal, so the gateway always comes back with a pair
that matches.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import random
import ssl
import time
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_agent import tls
from edge_agent.backoff import Backoff
from edge_agent.config import UplinkConfig
from edge_agent.files import fsync_dir, write_synced
from edge_agent.metrics import Metrics

log = logging.getLogger(__name__)
MAX_CERT_BYTES = 64 << 10


class RenewalError(Exception):
    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome  # a metric label: invalid, timeout, refused


def make_key_and_csr(gateway: str) -> tuple[bytes, bytes]:
    """(private key PEM, CSR PEM) for CN=<gateway>: what the cloud broker's ACL expects (identity = CN)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, gateway)]))
           .sign(key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            csr.public_bytes(serialization.Encoding.PEM))


def due_at(cert_file: str, fraction: float, rng: random.Random | None = None) -> dt.datetime:
    """When the certificate in `cert_file` is due for renewal: not_before + fraction of its lifetime, less a jitter
    of up to 5 % of the lifetime."""
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    jitter = (rng or random).uniform(0, 0.05) * life
    return cert.not_valid_before_utc + fraction * life - jitter


class Files:
    """The live pair and its pending successor (`.new`)."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert, self.key = Path(cert_file), Path(key_file)
        self.cert_new, self.key_new = Path(cert_file + ".new"), Path(key_file + ".new")

    def recover(self) -> str | None:
        """At start: finish a half-done commit, or drop an uncommitted renewal. Returns what was done, or None."""
        if not self.cert_new.exists() and not self.key_new.exists():
            return None
        if self.key_new.exists() and not self.cert_new.exists() and _matches(self.cert, self.key_new):
            os.replace(self.key_new, self.key)  # the certificate was renamed, the key not yet: finish
            fsync_dir(self.key.parent)
            return "finished a renewal's commit"
        for p in (self.cert_new, self.key_new):
            p.unlink(missing_ok=True)
        return "dropped an uncommitted renewal (the old pair serves)"

    def write_key(self, key_pem: bytes) -> None:
        write_synced(self.key_new, key_pem)

    def accept(self, cert_pem: bytes, gateway: str, ca_file: str, min_lifetime_s: float = 0.0) -> tls.CertInfo:
        """Check the signer's certificate against the new key and the live certificate, and write it beside the
        live one."""
        if len(cert_pem) > MAX_CERT_BYTES:
            raise RenewalError("invalid", f"the signed certificate is larger than {MAX_CERT_BYTES} bytes")
        try:
            chain = x509.load_pem_x509_certificates(cert_pem)
        except ValueError as e:
            raise RenewalError("invalid", f"the signer's answer is not a PEM certificate ({e})") from None
        leaf = chain[0]
        key = serialization.load_pem_private_key(self.key_new.read_bytes(), None)
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        if leaf.public_key().public_bytes(serialization.Encoding.DER, pub) != \
                key.public_key().public_bytes(serialization.Encoding.DER, pub):
            raise RenewalError("invalid", "the signed certificate is not for the key this gateway made")
        cn = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cn != [gateway]:
            raise RenewalError("invalid", f"the signed certificate names {cn}, not {gateway!r}")
        try:
            basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            basic = None
        if basic is not None and basic.ca:
            raise RenewalError("invalid", "the signed certificate is a CA certificate (CA:TRUE), not a leaf")
        live_until = _not_after(self.cert)
        now = dt.datetime.now(dt.timezone.utc)
        long_enough = min_lifetime_s > 0 and leaf.not_valid_after_utc - now >= dt.timedelta(seconds=min_lifetime_s)
        if live_until is not None and leaf.not_valid_after_utc < live_until and not long_enough:
            raise RenewalError("invalid", f"the signed certificate expires {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} "
                                          f"UTC, before the live one ({live_until:%Y-%m-%d %H:%M} UTC): a renewal "
                                          "never shortens the gateway's life (uplink.renew_min_lifetime_s)")
        write_synced(self.cert_new, cert_pem, 0o644)
        try:
            info = tls.load_cert(str(self.cert_new), "the renewed certificate")
            tls.check_chain(str(self.cert_new), ca_file, "the renewed certificate")
            tls.client_context(ca_file, str(self.cert_new), str(self.key_new), prefix="renewal.")
        except tls.TlsConfigError as e:
            self.discard()
            raise RenewalError("invalid", str(e)) from None
        return info

    def commit(self) -> None:
        """The broker accepted the new pair: it becomes the live one (certificate first; see recover())."""
        os.replace(self.cert_new, self.cert)
        os.replace(self.key_new, self.key)
        fsync_dir(self.key.parent)
        if self.cert.parent != self.key.parent:
            fsync_dir(self.cert.parent)

    def discard(self) -> None:
        for p in (self.cert_new, self.key_new):
            p.unlink(missing_ok=True)


def _not_after(cert: Path) -> dt.datetime | None:
    try:
        return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    except (OSError, ValueError):
        return None


def _matches(cert: Path, key: Path) -> bool:
    try:
        c = x509.load_pem_x509_certificate(cert.read_bytes())
        k = serialization.load_pem_private_key(key.read_bytes(), None)
    except (OSError, ValueError, TypeError):
        return False
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    return c.public_key().public_bytes(serialization.Encoding.DER, pub) == \
        k.public_key().public_bytes(serialization.Encoding.DER, pub)


def csr_message(rid: str, csr_pem: bytes) -> bytes:
    return json.dumps({"id": rid, "csr": csr_pem.decode()}).encode()


CHECK_INTERVAL_S = 3600  # how often the live certificate's days left are measured (and warned of)


def _files_stat(paths: tuple[str, ...]) -> tuple:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((path, None))
            continue
        out.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


class GatewayCert:
    """The uplink's certificate whole. Loop thread only."""

    def __init__(self, cfg: UplinkConfig, gateway: str, metrics: Metrics) -> None:
        self.cfg, self.gateway, self.metrics = cfg, gateway, metrics
        self.paths = (cfg.ca_file, cfg.cert_file, cfg.key_file)
        self.ssl_context: ssl.SSLContext | None = None  # the live pair's
        self.cert: tls.CertInfo | None = None
        self.tls_error: str | None = None  # why the certificate files cannot serve, if they cannot
        self._files: tuple | None = None   # the live files' stat signature
        # a candidate (context, cert, file signature or None for a renewal's pair) while it waits for the broker;
        # the signature of files refused (by the checks or the broker): not tried again until they change
        self._candidate: tuple | None = None
        self._refused: tuple | None = None
        self._renewing = False  # the candidate is a renewal's .new pair: committed when the broker takes it
        self.last_reload: str | None = None
        self.last_renewal: str | None = None
        self.reload = asyncio.Event()     # SIGHUP: look at the files now
        self.renew_now = asyncio.Event()  # certs.renew: renew now
        self.files = Files(cfg.cert_file, cfg.key_file)
        self._renew_backoff = Backoff(cfg.renew_retry_s, 86400.0, metrics.backoff_waits.labels("cert_renewal"))
        self._renew_after = 0.0  # monotonic: no renewal before (after a failure)
        self._answers: dict[str, asyncio.Future] = {}  # renewal id -> the signer's answer
        self._last_check = 0.0
        done = self.files.recover()
        if done:
            log.warning("uplink certificate files: " + done)
        self.load()

    # -- the pair to connect with --------------------------------------------------------------------
    def load(self) -> bool:
        """(Re)build the live context when the files changed or the last try failed; True when one is ready."""
        sig = _files_stat(self.paths)
        if self.ssl_context is not None and sig == self._files:
            return True
        cfg = self.cfg
        try:
            ctx = tls.client_context(cfg.ca_file, cfg.cert_file, cfg.key_file, prefix="uplink.")
            cert = tls.load_cert(cfg.cert_file, "uplink.cert_file")
        except tls.TlsConfigError as e:
            self.ssl_context, self._files = None, None
            if str(e) != self.tls_error:
                log.error("uplink disabled until its certificate files are fixed; data keeps being stored",
                          extra={"error": str(e)})
            self.tls_error = str(e)
            self.metrics.uplink_errors.labels("tls_config").inc()
            return False
        if self.tls_error is not None or self._files is not None:
            log.info("uplink certificate files loaded", extra={"cert": cfg.cert_file, "subject": cert.subject})
        self.ssl_context, self.cert, self._files, self.tls_error = ctx, cert, sig, None
        self.check_expiry(force=True)
        return True

    def changed(self) -> bool:
        """While a context serves: whether the files changed into a valid new set (then it waits as the candidate).
        An invalid set is refused, said once, counted; the serving context stays."""
        sig = _files_stat(self.paths)
        if self._candidate is not None or sig in (self._files, self._refused):
            return self._candidate is not None
        cfg = self.cfg
        try:
            ctx = tls.client_context(cfg.ca_file, cfg.cert_file, cfg.key_file, prefix="uplink.")
            cert = tls.load_cert(cfg.cert_file, "uplink.cert_file")
            tls.check_chain(cfg.cert_file, cfg.ca_file, "uplink.cert_file")
        except tls.TlsConfigError as e:
            self._refused = sig
            self.last_reload = f"refused: {e}"[:300]
            self.metrics.cert_reloads.labels("invalid").inc()
            log.error("new uplink certificate files refused; the connection keeps the old ones",
                      extra={"error": str(e)})
            return False
        self._candidate = (ctx, cert, sig)
        log.info("uplink certificate files changed; switching the connection to them",
                 extra={"subject": cert.subject, "not_after": cert.not_after.isoformat()})
        return True

    def context(self) -> ssl.SSLContext | None:
        """The context the next connection uses: the candidate's while one waits, else the live one; None when the
        files cannot serve (the uplink waits and asks again)."""
        if self.ssl_context is None:
            if not self.load():
                return None
        else:
            self.changed()
        return self._candidate[0] if self._candidate is not None else self.ssl_context

    @property
    def trying(self) -> bool:
        """The next connection tries a candidate."""
        return self._candidate is not None

    def accepted(self) -> None:
        """The broker took the connection's certificate: a candidate becomes the live pair (a renewal's is committed
        to the files now)."""
        trying, self._candidate = self._candidate, None
        if trying is None:
            return
        self.ssl_context, self.cert = trying[0], trying[1]
        self._files = trying[2]
        if self._renewing:  # the broker took the renewed pair: now it becomes the live one
            self._renewing = False
            self.files.commit()
            self._files = _files_stat(self.paths)
            self._renew_backoff.reset()
            self.last_renewal = f"renewed: valid until {trying[1].not_after.isoformat()}"
            self.metrics.cert_renewals.labels("ok").inc()
            log.info("uplink certificate renewed and committed", extra={"not_after": trying[1].not_after.isoformat()})
        self.last_reload = f"switched to {trying[1].subject}, valid until {trying[1].not_after.isoformat()}"
        self.metrics.cert_reloads.labels("switched").inc()
        log.info("uplink switched to the new certificate", extra={"subject": trying[1].subject})
        self.check_expiry(force=True)

    def refused(self, reason: str) -> bool:
        """The broker refused the connection. True when it was a candidate's (the live pair serves on: reconnect at
        once); False when the live pair itself failed (the uplink backs off)."""
        trying, self._candidate = self._candidate, None
        if trying is None:
            return False
        if self._renewing:
            self._renewing = False
            self.files.discard()
            self.renewal_failed("refused", f"the cloud broker refused the renewed certificate: {reason}")
            return True
        self._refused = trying[2]
        self.last_reload = f"refused by the cloud broker: {reason}"[:300]
        self.metrics.cert_reloads.labels("refused").inc()
        log.error("the cloud broker refused the new uplink certificate; back to the old one",
                  extra={"error": reason, "subject": trying[1].subject})
        return True

    async def watch(self, disconnected: asyncio.Future) -> bool:
        """While connected: every uplink.cert_watch_s, and on SIGHUP, look at the files; True when a valid new set
        waits (the uplink ends the connection cleanly so that the next one tries it)."""
        while not disconnected.done():
            try:
                await asyncio.wait_for(self.reload.wait(), self.cfg.cert_watch_s)
            except (asyncio.TimeoutError, TimeoutError):
                pass
            self.reload.clear()
            if self.changed():
                return True
        return False

    def check_expiry(self, force: bool = False) -> None:
        """Days left of the live certificate (a gauge), and a warning within uplink.cert_warn_days; once an hour."""
        if not force and time.monotonic() - self._last_check < CHECK_INTERVAL_S:
            return
        self._last_check = time.monotonic()
        if self.cert is None:
            return
        days = self.cert.days_left()
        self.metrics.cert_days_left.labels("uplink").set(round(days, 2))
        expiring = days < self.cfg.cert_warn_days
        self.metrics.cert_expiring.labels("uplink").set(1 if expiring else 0)
        if expiring:
            log.warning("uplink client certificate expires soon", extra={
                "cert": self.cert.path, "days_left": round(days, 1),
                "not_after": self.cert.not_after.astimezone(dt.timezone.utc).isoformat()})

    # -- renewal ---------------------------------------------------------------------------------
    def renew(self) -> dict:
        """certs.renew: renew now (on the current connection, or the next)."""
        self.renew_now.set()
        return {"started": True, "last": self.last_renewal}

    def due_in(self) -> float:
        """Seconds until a renewal is due (its time in the certificate's life, or the retry after a failure);
        raises OSError/ValueError when the live certificate cannot be read."""
        due = due_at(self.cfg.cert_file, self.cfg.renew_fraction)
        return max((due - dt.datetime.now(dt.timezone.utc)).total_seconds(), self._renew_after - time.monotonic(),
                   0.0)

    def renewal_failed(self, outcome: str, why: str) -> None:
        wait = self._renew_backoff.next()
        self.last_renewal = f"{outcome}: {why}"[:300]
        self.metrics.cert_renewals.labels(outcome).inc()
        self._renew_after = time.monotonic() + wait
        log.error("uplink certificate renewal failed; the old pair serves on", extra={
            "outcome": outcome, "error": why[:300], "retry_s": round(wait)})

    def begin_renewal(self) -> tuple[str, bytes]:
        """A new key (written beside the live one) and the CSR message to send: (its id, the message)."""
        self.renew_now.clear()
        rid = uuid.uuid4().hex[:16]
        key_pem, csr_pem = make_key_and_csr(self.gateway)
        self.files.write_key(key_pem)
        self._answers[rid] = asyncio.get_running_loop().create_future()
        return rid, csr_message(rid, csr_pem)

    def answer(self, payload: bytes) -> None:
        """The signer's answer (<prefix>/<gateway>/certs/crt): {"id", "cert"}; anything else is counted."""
        try:
            doc = json.loads(payload[:MAX_CERT_BYTES + 4096])
            fut = self._answers.get(str(doc.get("id")))
            if fut is not None and not fut.done():
                fut.set_result(str(doc.get("cert", "")).encode())
        except (ValueError, AttributeError):
            self.metrics.cert_renewals.labels("invalid").inc()

    def abandon(self, rid: str) -> None:
        """The link went while a renewal waited: its key is dropped; the next connection tries again."""
        self._answers.pop(rid, None)
        self.files.discard()

    async def finish_renewal(self, rid: str) -> bool:
        """Await the signer's answer (uplink.renew_timeout_s) and check it; True when the renewed pair waits as the
        candidate (the uplink ends the connection so that the next one tries it)."""
        cfg = self.cfg
        try:
            cert_pem = await asyncio.wait_for(self._answers[rid], cfg.renew_timeout_s)
            info = self.files.accept(cert_pem, self.gateway, cfg.ca_file, cfg.renew_min_lifetime_s)
            ctx = tls.client_context(cfg.ca_file, str(self.files.cert_new), str(self.files.key_new),
                                     prefix="renewal.")
        except (asyncio.TimeoutError, TimeoutError):
            self.files.discard()
            self.renewal_failed("timeout", f"no signed certificate within {cfg.renew_timeout_s:g} s")
            return False
        except (RenewalError, tls.TlsConfigError) as e:
            self.files.discard()
            self.renewal_failed(getattr(e, "outcome", "invalid"), str(e))
            return False
        finally:
            self._answers.pop(rid, None)
        self._candidate, self._renewing = (ctx, info, None), True
        log.info("uplink certificate renewal: signed certificate checked; switching to it",
                 extra={"not_after": info.not_after.isoformat()})
        return True

    def status(self) -> dict:
        return {"cert_days_left": round(self.cert.days_left(), 1) if self.cert else None,
                "uplink_error": self.tls_error, "cert_reload": self.last_reload, "cert_renewal": self.last_renewal}
