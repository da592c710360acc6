"""The uplink's certificate renewed on the device: the key is made here and never leaves; only a CSR does.

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

import datetime as dt
import json
import logging
import os
import random
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_agent import tls
from edge_agent.files import fsync_dir, write_synced

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
