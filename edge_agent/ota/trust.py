"""The gateway's trust about models, and every check on it, in one object with no I/O (python-tuf's
TrustedMetadataSet is the model): which keys may sign a model (the configured root, model.public_key, always; the
rotated set or ota.trusted_keys), the key set's serial, the anti-rollback floor, the versions marked bad, the
rollback permissions already used, and what this gateway is (its id and hardware kind). The updater only fetches
and moves files; what it acts on is what `Trust` verified. Tested alone, against each attack it decides
(tests/test_ota_trust.py).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from edge_agent import __version__
from edge_agent.glm.models import ModelError, parse_public_key, verify_manifest, verify_signed

# why an update did not happen: the label of edge_agent_model_updates_total{outcome="refused"|"failed"}
REASONS = ("signature", "digest", "size", "path", "expired", "downgrade", "agent_too_old", "disk", "tls",
           "download", "manifest", "health", "busy", "interrupted", "disabled", "not_found", "slow", "deadline",
           "cancelled", "wrong_target")
# a model folder's refusal (glm.models.ModelError.reason) as an update's
MODEL_REASONS = {"signature": "signature", "public_key": "signature", "digest": "digest", "missing": "digest",
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


class Trust:
    """Trusted state (OtaState) and the checks that change it. Every method is pure computation on its arguments
    and the state; the caller persists the state after a change."""

    def __init__(self, state: OtaState, root_key: str, configured_keys: list[str], target: Target = Target(),
                 max_bundle_bytes: int = 4 << 30) -> None:
        self.state, self.root_key, self.configured = state, root_key, list(configured_keys)
        self.target, self.max_bundle_bytes = target, max_bundle_bytes

    @property
    def keys(self) -> list[str]:
        """The keys a model may be signed by: the rotated set where there is one, else ota.trusted_keys; and always
        model.public_key (the configured root: the shipped or configured model stays loadable)."""
        rotated = self.state.keys if self.state.keys is not None else self.configured
        return list(dict.fromkeys([self.root_key, *rotated]))

    def manifest(self, body: bytes, sig: bytes, now: float, model_name: str | None) -> dict:
        """The manifest of a bundle, once signed by a trusted key and allowed on this gateway now; raises
        UpdateError with the reason."""
        try:
            manifest = verify_manifest(body, sig, self.keys)
        except ModelError as e:
            raise UpdateError(MODEL_REASONS.get(e.reason, "manifest"), str(e)) from None
        if self.state.name is None:
            self.state.name = manifest["name"]
        check_update(manifest, self.state, now, model_name, manifest_digest(body), self.target)
        total = sum(m["size"] for m in manifest["files"].values())
        if total > self.max_bundle_bytes:
            raise UpdateError("size", f"the bundle is {total} bytes; ota.max_bundle_bytes is {self.max_bundle_bytes}")
        return manifest

    def activated(self, manifest: dict, body: bytes) -> None:
        """A verified bundle serves: the floor rises to it, or, for a rollback permission, the permission is used."""
        st, version = self.state, manifest["version"]
        if st.highest is None or semver(version) > semver(st.highest):
            st.highest = version
        elif manifest.get("rollback") is True:
            st.rollbacks = [*st.rollbacks, manifest_digest(body)][-MAX_ROLLBACKS_KEPT:]

    def mark_bad(self, version: str, why: str) -> None:
        self.state.bad[version] = why[:300]

    def rotate(self, keys: list[str], serial: int, sig: str) -> None:
        """Replace the trusted key set with `keys`: accepted only when signed (Ed25519, over key_set_message) by a
        key of the current set, with a serial above the last one's."""
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
        try:
            verify_signed(key_set_message(keys, serial), sig, self.keys)
        except ModelError:
            raise UpdateError("signature", "the new key set is not signed by a key of the current set") from None
        self.state.keys, self.state.keys_serial = list(keys), serial
