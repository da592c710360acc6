"""Installed model versions: the one place that decides whether a model folder may reach ONNX Runtime.

A model folder holds `manifest.json`, `manifest.sig` (Ed25519 over the manifest's exact bytes, base64) and the
files the manifest lists with their sha256 and size. `load_verified` checks, in this order: the signature
against the configured public key, that every listed file exists inside the folder with its size and sha256,
that nothing unlisted is used, and that the ONNX files reference external data only in listed files of the same
folder. What it returns holds the verified bytes of the tokenizer and, for each graph, the open file descriptor it
was hashed through: ONNX Runtime opens that very file (`/proc/self/fd/N`, the inode that was verified, whatever
happens to the path since), so that a graph is in memory once, as ONNX Runtime's, and never also as bytes of ours
(at 0.5B that is ~0.5 GB less at the peak). A file anyone may write is refused: the verified inode can change
under the process only by its owner's or group's hand (the agent's, or root's). A graph with external data
(models over 2 GB) is opened by its folder's path (ONNX Runtime resolves its data files there), so that folder
must be writable by root only (systemd's ReadOnlyPaths, or the package's install location).

A file rewritten in place after it was hashed is caught: each graph's (and its external data's) inode, size, mtime
and ctime are recorded as it is verified, and `VerifiedModel.check_unchanged` compares them once ONNX Runtime has
read the graph: a write moves the mtime, and its ctime, which no user can set back (where only the ctime moved — a
rename or unlink of the path does that — the bytes are hashed again); the load is refused (`digest`). A model folder that is a symbolic link is refused (`path`).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

MAX_MANIFEST_BYTES = 1 << 20
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
PROVIDER_KEYS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class ModelError(Exception):
    """A model folder that must not be used: the message says why, `reason` is its metric label (signature, digest,
    external_data, missing, manifest, path, public_key)."""

    def __init__(self, message: str, reason: str = "manifest") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class VerifiedModel:
    dir: Path
    manifest: dict[str, Any]
    blobs: dict[str, bytes] = field(repr=False)  # the tokenizer, as verified
    external: dict[str, list[str]] = field(default_factory=dict)  # graph -> its verified external data files
    fds: dict[str, int] = field(default_factory=dict, repr=False)  # graph -> the descriptor it was verified through
    stamps: dict[str, tuple] = field(default_factory=dict, repr=False)  # file -> (inode, size, mtime, ctime) verified

    def check_unchanged(self, file: str) -> None:
        """After ONNX Runtime read `file` (a graph) and its external data: refuse it if any of them was written
        since it was hashed (what was read may not be what was verified)."""
        for name in (file, *self.external.get(file, ())):
            try:
                st = os.fstat(self.fds[name]) if name in self.fds else os.stat(self.dir / name, follow_symlinks=False)
            except OSError:
                st = None
            was = self.stamps.get(name)
            if st is None or was is None or _stamp(st)[:3] != was[:3] or (
                    _stamp(st)[3] != was[3] and not self._same_bytes(name)):
                raise ModelError(f"{name}: changed after it was verified (rewritten in place while loading?)",
                                 "digest")

    def _same_bytes(self, name: str) -> bool:
        """Only the inode's ctime moved (a rename or unlink of its path does that too): its bytes again."""
        h = hashlib.sha256()
        fd = self.fds.get(name)
        if fd is None:
            return False
        pos = 0
        while block := os.pread(fd, 1 << 22, pos):
            h.update(block)
            pos += len(block)
        return h.hexdigest() == self.manifest["files"][name]["sha256"]

    def source(self, file: str) -> str:
        """What ONNX Runtime opens for a graph: the verified inode itself, or (external data) the folder's path."""
        if file in self.external or file not in self.fds:
            return str(self.dir / file)
        return f"/proc/self/fd/{self.fds[file]}"

    def close(self) -> None:
        """Close the graphs' descriptors (once ONNX Runtime has read what it serves)."""
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()

    def __del__(self) -> None:
        self.close()

    @property
    def name(self) -> str:
        return f"{self.manifest['name']}@{self.manifest['version']}"

    @property
    def arch(self) -> dict[str, Any]:
        return self.manifest["architecture"]

    def file_for(self, provider: str) -> str:
        return self.manifest["providers"][provider]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sign_folder(folder: Path, manifest: dict[str, Any], key) -> bytes:
    """Write `manifest` (its `files` set to every other file of the folder, with size and sha256) as manifest.json
    and its Ed25519 signature by `key` (a private key) as manifest.sig; returns the manifest's bytes. The one way a
    model folder is signed: the recipe, `edge-agent model pack` and the tests use it."""
    manifest["files"] = {p.name: {"sha256": file_sha256(p), "size": p.stat().st_size}
                         for p in sorted(folder.iterdir()) if p.name not in ("manifest.json", "manifest.sig")}
    body = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (folder / "manifest.json").write_bytes(body)
    (folder / "manifest.sig").write_text(base64.b64encode(key.sign(body)).decode() + "\n")
    return body


def parse_public_key(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as e:
        raise ModelError(f"model.public_key is not a base64 Ed25519 public key: {e}", "public_key") from None


def read_bounded(path: Path, limit: int) -> bytes:
    """A regular file's bytes, at most `limit` (a FIFO or a device in its place would block the reader: refused)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ModelError(f"{path.name}: not a regular file", "missing")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ModelError(f"{path.name}: larger than {limit} bytes")
    return data


def check_manifest(m: Any) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise ModelError("manifest.json: not a JSON object")
    for key, typ in (("name", str), ("version", str), ("files", dict), ("architecture", dict), ("providers", dict),
                     ("tokenizer", str)):
        if not isinstance(m.get(key), typ):
            raise ModelError(f"manifest.json: {key!r} missing or not a {typ.__name__}")
    if not re.match(r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?$", m["version"]):
        raise ModelError(f"manifest.json: version {m['version']!r} is not semver")
    for name, meta in m["files"].items():
        if not _FILE_NAME.match(name) or name in ("manifest.json", "manifest.sig"):
            raise ModelError(f"manifest.json: file name {name[:80]!r} is not a plain name inside the folder", "path")
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or not isinstance(meta.get("size"), int) \
                or isinstance(meta["size"], bool) or meta["size"] < 0:
            raise ModelError(f"manifest.json: files[{name!r}] needs sha256 and a size of 0 bytes or more")
    used = [m["tokenizer"], *m["providers"].values()]
    for name in used:
        if name not in m["files"]:
            raise ModelError(f"manifest.json: {name!r} is used but not listed in files")
    for p in m["providers"]:
        if p not in PROVIDER_KEYS:
            raise ModelError(f"manifest.json: unknown provider {p!r}")
    for key in ("vocab_size", "num_hidden_layers", "num_key_value_heads", "head_dim", "context"):
        if not isinstance(m["architecture"].get(key), int) or m["architecture"][key] <= 0:
            raise ModelError(f"manifest.json: architecture.{key} missing or not a positive integer")
    return m


def _mentions(fd: int, needle: bytes) -> bool:
    """Whether the file's bytes contain `needle` (streamed through the descriptor: no copy of the file)."""
    tail, pos = b"", 0
    while block := os.pread(fd, 1 << 22, pos):
        if needle in tail + block[:len(needle) - 1] or needle in block:
            return True
        tail, pos = block[-(len(needle) - 1):], pos + len(block)
    return False


def _external_data(name: str, fd: int) -> list[str]:
    """Locations of the external data an ONNX file references (read through its verified descriptor, without its
    external data). A reference is a tensor's `external_data` entry keyed "location": a file without those bytes
    has none, and is not parsed here (a 0.5 GB graph would cost its size again in memory); one with them (a graph
    whose weights live outside it, so a small one) is parsed."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    if not _mentions(fd, b"location"):
        return []
    try:
        proto = onnx.load_model(f"/proc/self/fd/{fd}", load_external_data=False)  # the inode that was verified
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad model file
        raise ModelError(f"{name}: not a readable ONNX model ({type(e).__name__})") from None
    out = []
    for t in _get_all_tensors(proto):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location", "")
            out.append(loc)
    return out


def verify_signed(message: bytes, sig_text: bytes | str, keys: str | Sequence[str]) -> None:
    """The one check of an Ed25519 signature (base64) over `message` by any of the trusted keys: a model's manifest,
    a key rotation. Raises ModelError (reason signature) when none verifies."""
    trusted = [parse_public_key(k) for k in ([keys] if isinstance(keys, str) else keys)]
    try:
        sig = base64.b64decode(sig_text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ModelError("the signature is not base64", "signature") from None
    for key in trusted:
        try:
            key.verify(sig, message)
            return
        except InvalidSignature:
            continue
    raise ModelError("the signature does not verify with any trusted key (model.public_key, ota.trusted_keys)",
                     "signature")


def verify_manifest(body: bytes, sig_text: bytes, keys: str | Sequence[str]) -> dict[str, Any]:
    """The manifest, once its signature verifies with one of the trusted keys and its content is well formed."""
    try:
        verify_signed(body, sig_text, keys)
    except ModelError as e:
        raise ModelError(f"manifest.sig: {e}", "signature") from None
    try:
        return check_manifest(json.loads(body))
    except ValueError as e:
        raise ModelError(f"manifest.json: not JSON: {e}") from None


def load_verified(folder: Path, public_key: str | Sequence[str], providers: Sequence[str] | None = None
                  ) -> VerifiedModel:
    """A model folder whose manifest is signed by a trusted key (one, or any of several) and whose files match it.
    Every file is hashed; the bytes kept (`blobs`) are the tokenizer's and the graphs of `providers` (ONNX Runtime
    names; None: every provider's) — a CPU gateway never holds the GPU's graph in memory."""
    folder = Path(folder)
    if folder.is_symlink():  # a link can be turned elsewhere between this check and the load: refused
        raise ModelError(f"model folder {folder} is a symbolic link; name the folder itself", "path")
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist", "missing")
    try:
        body = read_bounded(folder / "manifest.json", MAX_MANIFEST_BYTES)
        sig_text = read_bounded(folder / "manifest.sig", 4096)
    except FileNotFoundError as e:
        raise ModelError(f"{folder}: {Path(e.filename).name} is missing", "missing") from None
    except OSError as e:  # a symlink (O_NOFOLLOW) or unreadable
        raise ModelError(f"{folder}: {Path(e.filename or 'manifest').name} cannot be read: {e.strerror}",
                         "missing") from None
    try:
        manifest = verify_manifest(body, sig_text, public_key)
    except ModelError as e:
        raise ModelError(f"{folder}: {e}", e.reason) from None
    graphs = {f for p, f in manifest["providers"].items() if providers is None or p in providers}
    blobs: dict[str, bytes] = {}
    fds: dict[str, int] = {}
    stamps: dict[str, tuple] = {}
    try:
        for name, meta in manifest["files"].items():
            fd = _open_verified(folder, name, meta, keep_bytes=name == manifest["tokenizer"], blobs=blobs,
                                stamps=stamps)
            if name in graphs:
                fds[name] = fd
            else:
                os.close(fd)
        external: dict[str, list[str]] = {}
        for name in sorted(graphs):
            locs = _external_data(name, fds[name])
            for loc in locs:
                if loc not in manifest["files"] or Path(loc).name != loc:
                    raise ModelError(f"{name}: references external data {loc!r} that is not a listed file of "
                                     "its folder", "external_data")
            if locs:
                external[name] = sorted(set(locs))
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return VerifiedModel(folder, manifest, blobs, external, fds, stamps)


def _stamp(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _open_verified(folder: Path, name: str, meta: dict, keep_bytes: bool, blobs: dict[str, bytes],
                   stamps: dict[str, tuple]) -> int:
    """A listed file opened (no symlink, a regular file not writable by anyone), its size and sha256 checked
    through the descriptor that is returned (positioned at 0); its bytes into `blobs` where asked."""
    try:
        # O_NONBLOCK: a FIFO in a file's place is refused at once (fstat below), never waited on
        fd = os.open(folder / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise ModelError(f"{name}: missing (or not a regular file) in {folder}", "missing") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelError(f"{name}: missing (or not a regular file) in {folder}", "missing")
        if st.st_mode & stat.S_IWOTH:
            raise ModelError(f"{name}: writable by anyone (mode {stat.S_IMODE(st.st_mode):o})", "path")
        h, size, chunks = hashlib.sha256(), 0, []
        while block := os.read(fd, 1 << 22):
            size += len(block)
            if size > meta["size"]:
                break
            h.update(block)
            if keep_bytes:
                chunks.append(block)
        if size != meta["size"]:
            raise ModelError(f"{name}: {'more than ' if size > meta['size'] else ''}{size} bytes, the manifest "
                             f"says {meta['size']}", "digest")
        if h.hexdigest() != meta["sha256"]:
            raise ModelError(f"{name}: sha256 does not match the manifest", "digest")
        if keep_bytes:
            blobs[name] = b"".join(chunks)
        stamps[name] = _stamp(st)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd
    except BaseException:
        os.close(fd)
        raise
