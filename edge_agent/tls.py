"""TLS client contexts and the checks that refuse an unsafe uplink before it starts."""
from __future__ import annotations

import datetime as dt
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature


class TlsConfigError(Exception):
    """A TLS file or setting that the agent refuses to run with (one line, names the file)."""


@dataclass(frozen=True)
class CertInfo:
    path: str
    subject: str
    not_after: dt.datetime

    def days_left(self, now: dt.datetime | None = None) -> float:
        now = now or dt.datetime.now(dt.timezone.utc)
        return (self.not_after - now).total_seconds() / 86400


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TlsConfigError(f"{what} {path}: file not found") from None
    except OSError as e:
        raise TlsConfigError(f"{what} {path}: cannot read: {e.strerror}") from None


def check_key_file(path: str, what: str = "key_file") -> None:
    _read(path, what)
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TlsConfigError(f"{what} {path}: readable by group or others (mode {stat.S_IMODE(mode):04o}); "
                             f"run: chmod 600 {path}")


def load_cert(path: str, what: str = "cert_file") -> CertInfo:
    data = _read(path, what)
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise TlsConfigError(f"{what} {path}: not a PEM certificate ({e})") from None
    now = dt.datetime.now(dt.timezone.utc)
    info = CertInfo(path, cert.subject.rfc4514_string(), cert.not_valid_after_utc)
    if cert.not_valid_after_utc <= now:
        raise TlsConfigError(f"{what} {path}: certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
                             "install a renewed certificate")
    if cert.not_valid_before_utc > now:
        raise TlsConfigError(f"{what} {path}: certificate not valid before "
                             f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the clock)")
    return info


def client_context(ca_file: str, cert_file: str = "", key_file: str = "", *, prefix: str = "") -> ssl.SSLContext:
    """A verifying TLS >= 1.2 client context; client certificate when cert/key are given.

    Hostname verification and certificate verification are always on; there is no setting to turn
    them off.
    """
    _read(ca_file, f"{prefix}ca_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as e:
        raise TlsConfigError(f"{prefix}ca_file {ca_file}: not a usable CA bundle ({e.reason})") from None
    if cert_file or key_file:
        if not (cert_file and key_file):
            raise TlsConfigError(f"{prefix}cert_file and {prefix}key_file: give both or neither")
        check_key_file(key_file, f"{prefix}key_file")
        load_cert(cert_file, f"{prefix}cert_file")
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except ssl.SSLError as e:
            raise TlsConfigError(f"{prefix}cert_file {cert_file} / key_file {key_file}: "
                                 f"certificate and key do not load together ({e.reason})") from None
    return ctx


def check_chain(cert_file: str, ca_file: str, what: str = "cert_file") -> None:
    """The certificate file's own chain holds (each certificate issued by the next), and where its last issuer is
    in the CA file, that CA signed it. (A client certificate from another CA than the broker's is allowed: the
    broker decides; this refuses only a chain that contradicts itself or the CA it names.)"""
    chain = x509.load_pem_x509_certificates(_read(cert_file, what))
    try:
        cas = x509.load_pem_x509_certificates(_read(ca_file, "ca_file"))
    except ValueError:
        cas = []
    for child, parent in zip(chain, chain[1:]):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise TlsConfigError(f"{what} {cert_file}: its chain does not hold ({child.subject.rfc4514_string()} is "
                                 f"not issued by {parent.subject.rfc4514_string()})") from None
    last = chain[-1]
    for ca in cas:
        if ca.subject == last.issuer:
            try:
                last.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                raise TlsConfigError(f"{what} {cert_file}: claims to be issued by {ca.subject.rfc4514_string()} "
                                     "but its signature does not verify with that CA") from None
