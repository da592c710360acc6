"""Typed configuration from TOML.

Each section is a dataclass; `load()` walks the TOML tables against the dataclass fields, so an
unknown key or a wrong type becomes one line that names the key and says what is expected. Field
metadata carries the bounds (`ge`, `le`) and the allowed values (`choices`) and a line of doc that
`edge-agent check` and the example config share.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import typing

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6): the same parser, from PyPI
    import tomli as tomllib  # type: ignore[no-redef]
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# store.batch_max_delay_ms by default, measured: `tests/bench/bench_ingest.py --paced` (README, Performance)
BATCH_MAX_DELAY_MS = 20.0


class ConfigError(Exception):
    """A user error in the configuration: one line that names the key."""


def opt(default: Any = dataclasses.MISSING, *, doc: str = "", ge: float | None = None,
        le: float | None = None, choices: tuple | None = None, factory: Any = None,
        secret: bool = False) -> Any:
    meta = {"doc": doc, "ge": ge, "le": le, "choices": choices, "secret": secret}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class GatewayConfig:
    id: str = opt("gateway-1", doc="gateway id: the uplink client id and the topic segment")
    state_dir: str = opt("/var/lib/edge-agent", doc="where the SQLite store lives")
    hardware: str = opt("", doc="this gateway's hardware kind, as model bundles name it (e.g. jetson-orin-nano); "
                        "'' = the processor architecture (aarch64, x86_64). A bundle that names hardware kinds "
                        "installs only on those")

    def check(self, key: str) -> None:
        if not _ID_RE.match(self.id):
            raise ConfigError(f"{key}.id: expected 1-128 characters of letters, digits, '_', '.', '-' "
                              f"(it becomes an MQTT topic segment), got {self.id!r}")


@dataclass
class LogConfig:
    level: str = opt("info", doc="debug|info|warning|error", choices=("debug", "info", "warning", "error"))
    format: str = opt("auto", doc="auto (journal under systemd, else text) | journal | text",
                      choices=("auto", "journal", "text"))
    ship: bool = opt(True, doc="keep log records in the store and send them to <prefix>/<gateway>/logs (compressed "
                     "batches, after readings and alerts)")
    ship_level: str = opt("info", doc="the agent's records shipped from this level (logs.level changes it for a "
                          "while)", choices=("debug", "info", "warning", "error"))
    ship_library_level: str = opt("warning", doc="the libraries' records shipped from this level",
                                  choices=("debug", "info", "warning", "error"))
    ship_quota_bytes: int = opt(16 << 20, doc="log records kept for the cloud at most (their own bound, within the "
                                "store's quota); beyond, the oldest are dropped and counted", ge=1 << 16)
    ship_batch_bytes: int = opt(256 << 10, doc="log lines per batch before compression, at most", ge=4096,
                                le=16 << 20)
    ship_max_line_chars: int = opt(4000, doc="a longer line is cut (with a mark)", ge=200, le=65536)


@dataclass
class StoreConfig:
    batch_max_rows: int = opt(5000, doc="readings per commit at most", ge=1, le=1_000_000)
    batch_max_delay_ms: float = opt(BATCH_MAX_DELAY_MS, doc="a reading waits at most this long for a commit (and its "
                                     "acknowledgement, and its uplink batch): the longer, the more readings share "
                                     "a commit and a batch (less CPU, fewer fsyncs: less flash wear), the later they "
                                     "reach the cloud; 0: each commit takes what is queued", ge=0, le=10_000)
    lazy_max_delay_ms: float = opt(1000.0, doc="the cloud's acknowledgements and log lines wait at most this long "
                                   "for a commit of readings to ride along with", ge=0, le=60_000)
    queue_max_batches: int = opt(1024, doc="write requests waiting for the writer; beyond, writers wait",
                                 ge=1, le=1_000_000)
    synchronous: str = opt("full", doc="full: a commit survives a power cut; normal: the last commits may not",
                           choices=("full", "normal"))
    quota_bytes: int = opt(1 << 30, doc="disk quota for the database; beyond it the oldest outbox rows go",
                           ge=1 << 20)
    at_quota: str = opt("evict", doc="at the quota (the smaller of quota_bytes and half the disk's room "
                        "less disk_reserve_bytes: deleting needs WAL room): evict (the oldest outbox rows go, counted) or backpressure (new readings "
                        "wait with their source — the broker holds them — until the cloud's acknowledgements free "
                        "room)", choices=("evict", "backpressure"))
    disk_reserve_bytes: int = opt(8 << 20, doc="space kept free on the state directory's filesystem (at most an eighth "
                                  "of it), and a file of this size set aside so that a full disk still leaves room "
                                  "to record acknowledgements and delete", ge=0, le=1 << 34)
    outbox_chunk_readings: int = opt(500, doc="readings per outbox row (an uplink batch holds one or more)",
                                     ge=1, le=100_000)
    retention_s: int = opt(7 * 86400, doc="readings window: keep this many seconds", ge=60)
    retention_rows: int = opt(5_000_000, doc="readings window: keep at most this many rows", ge=1000)
    dead_letter_rows: int = opt(1000, doc="rejected payloads kept for inspection (oldest go first)",
                                ge=0, le=1_000_000)
    dead_letter_payload_bytes: int = opt(4096, doc="bytes of a rejected payload kept", ge=0, le=1 << 20)
    max_devices: int = opt(10_000, doc="devices the registry holds; readings of a new device beyond it are refused "
                           "(counted, dead-lettered), known devices go on", ge=1, le=10_000_000)
    max_points: int = opt(100_000, doc="series (device, point) the registry holds; readings of a new series beyond "
                          "it are refused (counted, dead-lettered), known series go on", ge=1, le=100_000_000)
    max_points_per_device: int = opt(1000, doc="series one device may register; its readings of a new point beyond "
                                     "are refused (counted, dead-lettered)", ge=1, le=1_000_000)
    new_devices_per_minute: int = opt(600, doc="new devices one source (mqtt, coap, opcua) may register per minute; "
                                      "beyond, refused (counted, dead-lettered) — one client cannot fill the "
                                      "registry in seconds", ge=1, le=1_000_000)
    new_points_per_minute: int = opt(6000, doc="new series one source may register per minute; beyond, refused "
                                     "(counted, dead-lettered): a flood of devices with many points each cannot fill "
                                     "the registry in seconds", ge=1, le=10_000_000)
    registry_reserve: float = opt(0.1, doc="share of max_devices and max_points that devices the config does not "
                                  "name cannot take: kept for those it names (OPC UA servers, CoAP observations, "
                                  "rules); known series always go on", ge=0.0, le=0.9)
    series_expiry_s: int = opt(30 * 86400, doc="a series silent this long leaves the registry (and a device with "
                               "none left); its readings stay in the window; 0 = never", ge=0)


@dataclass(kw_only=True)
class PayloadConfig:
    decoder: str = opt("json", doc="json | number", choices=("json", "number"))
    ts_path: str = opt("ts", doc="json: dotted path of the timestamp ('' = receive time)")
    ts_unit: str = opt("ms", doc="unit of the timestamp", choices=("s", "ms", "us", "ns"))
    values_path: str = opt("values", doc="json: dotted path of an object of point -> value")
    value_path: str = opt("value", doc="json: dotted path of a single value (used when values_path is absent)")
    point: str = opt("value", doc="point name for a single value (number decoder, or json value_path)")
    unit: str = opt("", doc="unit given to every point of this source ('' = none)")


@dataclass(kw_only=True)
class TopicConfig(PayloadConfig):
    filter: str = opt(doc="MQTT topic filter to subscribe to, e.g. devices/+/telemetry")
    device: str = opt("{device}", doc="topic pattern naming the device segment, e.g. devices/{device}/telemetry")

    def check(self, key: str) -> None:
        if not self.filter or "#" in self.filter[:-1] or any(len(s) > 1 and ("+" in s or "#" in s)
                                                              for s in self.filter.split("/")):
            raise ConfigError(f"{key}.filter: expected a valid MQTT topic filter, got {self.filter!r}")
        if self.device.count("{device}") != 1:
            raise ConfigError(f"{key}.device: expected a pattern with exactly one {{device}}, got {self.device!r}")


@dataclass(kw_only=True)
class CoapObserveConfig(PayloadConfig):
    uri: str = opt(doc="resource to observe, e.g. coap://192.0.2.7/sensors/temp")
    device: str = opt(doc="device id its readings are stored under")
    max_age_margin_s: float = opt(5.0, doc="re-register when no notification came for Max-Age plus this", ge=0.1)

    def check(self, key: str) -> None:
        if not self.uri.startswith(("coap://", "coap+tcp://")):
            raise ConfigError(f"{key}.uri: expected a coap:// URI, got {self.uri!r}")
        if not _ID_RE.match(self.device):
            raise ConfigError(f"{key}.device: expected a device id, got {self.device!r}")


@dataclass
class CoapConfig:
    enabled: bool = opt(False, doc="take in readings over CoAP (server, and observations of devices)")
    host: str = opt("127.0.0.1", doc="address the server binds ('::' for all)")
    port: int = opt(5683, doc="server UDP port (0 = no server, observations only)", ge=0, le=65535)
    max_payload_bytes: int = opt(8192, doc="larger requests get 4.13 and are counted", ge=16, le=1 << 20)
    max_concurrent: int = opt(256, doc="requests being committed at once; beyond, 5.03 with Max-Age 1",
                              ge=1, le=100_000)
    payload: PayloadConfig = opt(factory=PayloadConfig, doc="how POST/PUT /telemetry/{device} payloads decode")
    credentials_file: str = opt("", doc="aiocoap credentials (JSON) for OSCORE: the server accepts requests "
                                "protected with these contexts, observations use them ('' = none)")
    require_oscore: bool = opt(False, doc="refuse unprotected POST/PUT with 4.01 (needs credentials_file)")
    request_timeout_s: float = opt(10.0, doc="an observation registration without an answer by then fails",
                                   ge=0.5, le=300)
    reconnect_min_s: float = opt(0.5, doc="first re-registration delay after a failure", ge=0.05)
    reconnect_max_s: float = opt(30.0, doc="re-registration delay cap", ge=0.1)
    observe: list[CoapObserveConfig] = opt(factory=list, doc="resources on devices to observe (RFC 7641)")

    def check(self, key: str) -> None:
        if self.require_oscore and not self.credentials_file:
            raise ConfigError(f"{key}.require_oscore: needs {key}.credentials_file")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ConfigError(f"{key}: the minimum delay ({self.reconnect_min_s}) is above the maximum "
                              f"({self.reconnect_max_s})")


@dataclass
class TlsClientConfig:
    ca_file: str = opt("", doc="CA bundle that signed the broker's certificate")
    cert_file: str = opt("", doc="client certificate (PEM)")
    key_file: str = opt("", doc="client private key (PEM); must not be readable by group or others")
    server_hostname: str = opt("", doc="name to verify in the broker's certificate ('' = host)")


@dataclass
class MqttIngestConfig:
    enabled: bool = opt(True, doc="take in readings from the local MQTT broker")
    host: str = opt("127.0.0.1", doc="local broker host")
    port: int = opt(1883, doc="local broker port", ge=1, le=65535)
    protocol: str = opt("5", doc="MQTT protocol version: 5 | 3.1.1", choices=("5", "3.1.1"))
    client_id: str = opt("", doc="client id ('' = <gateway.id>-ingest); the persistent session is keyed on it")
    username: str = opt("", doc="username ('' = none)")
    password: str = opt("", doc="password", secret=True)
    keepalive_s: int = opt(30, doc="MQTT keepalive", ge=5, le=3600)
    receive_maximum: int = opt(3000, doc="unacknowledged QoS 1 messages in flight (MQTT 5 receive maximum); "
                               "the window that keeps ingest fast while commits are in flight", ge=1, le=65535)
    max_pending_bytes: int = opt(8 << 20, doc="payload bytes taken but not yet committed; at this bound ingest stops "
                                 "reading from the broker until commits catch up", ge=64 << 10, le=1 << 30)
    max_payload_bytes: int = opt(65536, doc="larger payloads are rejected and counted", ge=16, le=16 << 20)
    reconnect_min_s: float = opt(0.5, doc="first reconnect delay", ge=0.05)
    reconnect_max_s: float = opt(30.0, doc="reconnect delay cap", ge=0.1)
    tls: bool = opt(False, doc="use TLS to the local broker (the [southbound.mqtt.tls_files] section)")
    tls_files: TlsClientConfig = opt(factory=TlsClientConfig, doc="TLS files for the local broker")
    topics: list[TopicConfig] = opt(factory=lambda: [TopicConfig(filter="devices/+/telemetry",
                                                                 device="devices/{device}/telemetry")],
                                    doc="topic filters and their decoders")

    def check(self, key: str) -> None:
        if self.enabled and not self.topics:
            raise ConfigError(f"{key}.topics: at least one [[{key}.topics]] is needed when {key}.enabled = true")
        if self.tls and not self.tls_files.ca_file:
            raise ConfigError(f"{key}.tls_files.ca_file: required when {key}.tls = true (verification cannot be "
                              "turned off)")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ConfigError(f"{key}: the minimum delay ({self.reconnect_min_s}) is above the maximum "
                              f"({self.reconnect_max_s})")


@dataclass
class OpcuaNodeConfig:
    point: str = opt(doc="point name the readings are stored under")
    node_id: str = opt("", doc="NodeId, e.g. ns=2;i=7 or ns=2;s=Line1.Temperature (or use browse_path)")
    browse_path: str = opt("", doc="path from Objects, e.g. 2:PLC/2:Temperature (resolved again on every connect)")
    unit: str = opt("", doc="unit ('' = none)")
    sampling_ms: float = opt(100.0, doc="sampling interval asked of the server", ge=0, le=3_600_000)
    queue_size: int = opt(10, doc="server-side queue of the monitored item", ge=1, le=10_000)
    deadband: float = opt(0.0, doc="absolute deadband (0 = every change)", ge=0)
    writable: bool = opt(False, doc="allow write_point to this node (the allow-list)")
    min: float = opt(-1e308, doc="writes below are refused")
    max: float = opt(1e308, doc="writes above are refused")

    def check(self, key: str) -> None:
        if bool(self.node_id) == bool(self.browse_path):
            raise ConfigError(f"{key}: give exactly one of node_id and browse_path")
        if self.min > self.max:
            raise ConfigError(f"{key}: min ({self.min}) is above max ({self.max})")


@dataclass
class OpcuaServerConfig:
    device: str = opt(doc="device id the server's readings are stored under (e.g. the PLC's name)")
    endpoint: str = opt(doc="opc.tcp://host:port/path")
    security_policy: str = opt("None", doc="None (development only) | Basic256Sha256 | Aes256_Sha256_RsaPss",
                               choices=("None", "Basic256Sha256", "Aes256_Sha256_RsaPss"))
    security_mode: str = opt("SignAndEncrypt", doc="Sign | SignAndEncrypt", choices=("Sign", "SignAndEncrypt"))
    client_cert_file: str = opt("", doc="this client's application certificate (PEM or DER; RSA)")
    client_key_file: str = opt("", doc="its private key; mode 0600 or stricter")
    server_cert_file: str = opt("", doc="the server's certificate, pinned: never fetched over an unsecured channel")
    application_uri: str = opt("urn:edge-agent:client", doc="must match the URI in the client certificate")
    username: str = opt("", doc="user name ('' = anonymous)")
    password: str = opt("", doc="password", secret=True)
    publishing_ms: float = opt(100.0, doc="subscription publishing interval", ge=10, le=3_600_000)
    request_timeout_s: float = opt(4.0, doc="a request without an answer by then fails", ge=0.1, le=600)
    watchdog_s: float = opt(1.0, doc="how often the session is probed; a failed probe means reconnect",
                            ge=0.1, le=600)
    reconnect_min_s: float = opt(0.5, doc="first reconnect delay", ge=0.05)
    reconnect_max_s: float = opt(30.0, doc="reconnect delay cap", ge=0.1)
    max_items_per_subscription: int = opt(1000, doc="monitored items per subscription; more nodes, more "
                                          "subscriptions", ge=1, le=100_000)
    nodes: list[OpcuaNodeConfig] = opt(factory=list, doc="the nodes to monitor")

    def check(self, key: str) -> None:
        if not self.endpoint.startswith("opc.tcp://"):
            raise ConfigError(f"{key}.endpoint: expected opc.tcp://host:port/..., got {self.endpoint!r}")
        if not _ID_RE.match(self.device):
            raise ConfigError(f"{key}.device: expected a device id, got {self.device!r}")
        if self.security_policy != "None":
            for k in ("client_cert_file", "client_key_file", "server_cert_file"):
                if not getattr(self, k):
                    raise ConfigError(f"{key}.{k}: required with security_policy = {self.security_policy!r} "
                                      "(the server certificate is pinned, never fetched)")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ConfigError(f"{key}: the minimum delay ({self.reconnect_min_s}) is above the maximum "
                              f"({self.reconnect_max_s})")
        points = [n.point for n in self.nodes]
        for j, point in enumerate(points):
            if point in points[:j]:
                raise ConfigError(f"{key}.nodes[{j}].point: {point!r} appears twice for device {self.device!r}")


@dataclass
class OpcuaConfig:
    enabled: bool = opt(False, doc="take in readings from OPC UA servers")
    max_buffered: int = opt(100_000, doc="readings received but not yet handed to the store; beyond, the newest "
                            "are dropped and counted (OPC UA does not redeliver)", ge=100, le=10_000_000)
    servers: list[OpcuaServerConfig] = opt(factory=list, doc="servers to connect to")


@dataclass
class SouthboundConfig:
    mqtt: MqttIngestConfig = opt(factory=MqttIngestConfig, doc="local MQTT ingest")
    coap: CoapConfig = opt(factory=CoapConfig, doc="CoAP server and observations")
    opcua: OpcuaConfig = opt(factory=OpcuaConfig, doc="OPC UA clients")


@dataclass
class UplinkConfig:
    enabled: bool = opt(True, doc="forward the outbox to the cloud")
    host: str = opt("localhost", doc="cloud broker host")
    port: int = opt(8883, doc="cloud broker port", ge=1, le=65535)
    protocol: str = opt("5", doc="MQTT protocol version: 5 | 3.1.1", choices=("5", "3.1.1"))
    topic_prefix: str = opt("edge", doc="topics are <prefix>/<gateway>/{status,telemetry}")
    ca_file: str = opt("/etc/edge-agent/ca.pem", doc="CA bundle that signed the cloud broker's certificate")
    cert_file: str = opt("/etc/edge-agent/client.pem", doc="this gateway's client certificate")
    key_file: str = opt("/etc/edge-agent/client.key", doc="its private key; mode 0600 or stricter")
    server_hostname: str = opt("", doc="name to verify in the cloud broker's certificate ('' = host)")
    keepalive_s: int = opt(30, doc="MQTT keepalive", ge=5, le=3600)
    batch_max_readings: int = opt(2000, doc="readings per telemetry message at most", ge=1, le=1_000_000)
    batch_max_bytes: int = opt(256 * 1024, doc="bytes per telemetry message at most (one outbox row always fits)",
                               ge=1024, le=64 << 20)
    max_inflight: int = opt(32, doc="telemetry messages awaiting PUBACK at once", ge=1, le=65535)
    reconnect_min_s: float = opt(0.5, doc="first reconnect delay (jittered)", ge=0.05)
    reconnect_max_s: float = opt(60.0, doc="reconnect delay cap", ge=0.1)
    publish_timeout_s: float = opt(15.0, doc="a publish the cloud has not acknowledged by then declares the link "
                                   "dead: counted, reconnected, sent again", ge=0.5, le=600)
    cert_watch_s: float = opt(5.0, doc="how often the certificate files are looked at while connected (also on "
                              "SIGHUP); new valid files switch the connection, the old ones serve until the broker "
                              "takes them", ge=0.2, le=3600)
    renew: bool = opt(False, doc="renew the client certificate on the device: a new key made here, a CSR to "
                      "<prefix>/<gateway>/certs/csr, the cloud's signer answers on .../certs/crt (needs a signer on "
                      "the cloud side)")
    renew_fraction: float = opt(0.667, doc="renew at this fraction of the certificate's lifetime (less up to 5 % "
                                "jitter)", ge=0.05, le=0.99)
    renew_timeout_s: float = opt(60.0, doc="the signer's answer must come within this", ge=1, le=3600)
    renew_retry_s: float = opt(300.0, doc="after a failed renewal, retry after this (doubling, up to a day)",
                               ge=1, le=86400)
    renew_min_lifetime_s: float = opt(0.0, doc="a renewed certificate must not expire before the one it replaces; "
                                      "where this is above 0, one valid at least this long is taken too (a fleet "
                                      "moving to shorter certificates)", ge=0)
    cert_warn_days: int = opt(30, doc="warn when the client certificate expires within this many days", ge=0)
    encoding: str = opt("json", doc="telemetry encoding: json (a JSON object per reading, on <prefix>/<gateway>/"
                        "telemetry) | columns (columnar, compressed, a few bytes a reading, on .../telemetry/"
                        "columns.<compression>; docs/forwarding.md has the format and `edge-agent decode` reads it)",
                        choices=("json", "columns"))
    compression: str = opt("zstd", doc="columns: zstd (the zstandard wheel) | gzip (the standard library)",
                           choices=("zstd", "gzip"))
    linger_s: float = opt(0.0, doc="a telemetry message with fewer than batch_max_readings readings waits up to this "
                          "long for more (fewer, larger messages: with columns, names are sent once a message); "
                          "0 = at once. A message of filtered ranges only (forwarding rules) waits at least 5 s",
                          ge=0, le=600)

    def check(self, key: str) -> None:
        if self.encoding == "columns" and self.compression == "zstd":
            try:
                import zstandard  # noqa: F401
            except ImportError:
                raise ConfigError(f"{key}.compression: zstd needs the zstandard package (pip install zstandard), "
                                  "or set compression = \"gzip\"") from None
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ConfigError(f"{key}: the minimum delay ({self.reconnect_min_s}) is above the maximum "
                              f"({self.reconnect_max_s})")
        if self.enabled:
            for k in ("ca_file", "cert_file", "key_file"):
                if not getattr(self, k):
                    raise ConfigError(f"{key}.{k}: required when {key}.enabled = true "
                                      "(the uplink is mutual TLS only; verification cannot be turned off)")
            if "/" in self.topic_prefix or "+" in self.topic_prefix or "#" in self.topic_prefix or not self.topic_prefix:
                raise ConfigError(f"{key}.topic_prefix: expected one topic segment without / + #, got "
                                  f"{self.topic_prefix!r}")


@dataclass
class RuleConfig:
    id: str = opt(doc="rule id (letters, digits, _ . -)")
    kind: str = opt(doc="above | below | rate | zscore | nodata", choices=("above", "below", "rate", "zscore", "nodata"))
    device: str = opt(doc="device the rule watches")
    point: str = opt(doc="point the rule watches")
    threshold: float = opt(0.0, doc="above/below: the limit; rate: |change| per second; zscore: |z|")
    hysteresis: float = opt(0.0, doc="above/below: clears only once back past threshold -/+ this", ge=0)
    window: int = opt(30, doc="zscore: samples in the window", ge=5, le=10_000)
    seconds: float = opt(60.0, doc="nodata: silence that fires", ge=1)
    cooldown_s: float = opt(60.0, doc="after an alert, the rule alerts again no sooner (flapping guard)", ge=0)
    local_topic: str = opt("", doc="also publish the alert on this topic of the local broker ('' = no)")
    action_device: str = opt("", doc="on firing, write action_value to this device's action_point ('' = no); "
                             "the write goes through the adapters' allow-list")
    action_point: str = opt("", doc="the point to write on firing")
    action_value: str = opt("", doc="the value to write, as JSON: false, 0, 12.5, \"stop\"")

    def check(self, key: str) -> None:
        _check_rule(self, key)


@dataclass
class RulesConfig:
    enabled: bool = opt(True, doc="evaluate rules on the ingest path; alerts go through the store to the cloud")
    max_pending_alerts: int = opt(10_000, doc="alerts waiting for the cloud; beyond, the oldest go (counted)",
                                  ge=10, le=10_000_000)
    max_command_rules: int = opt(100, doc="rules that rules.add may hold at once (besides the config's); beyond, "
                                 "refused", ge=0, le=10_000)
    command_topic_prefix: str = opt("alarms/", doc="a rule added by command may publish locally only under this "
                                    "topic prefix")
    history_max: int = opt(1000, doc="alerts kept in the alert log for alerts.list (firing and cleared); beyond, the "
                           "oldest go", ge=10, le=1_000_000)
    rule: list[RuleConfig] = opt(factory=list, doc="the rules ([[rules.rule]] tables)")

    def check(self, key: str) -> None:
        ids = [r.id for r in self.rule]
        for i, rule_id in enumerate(ids):
            if rule_id in ids[:i]:
                raise ConfigError(f"{key}.rule[{i}].id: {rule_id!r} is used twice")


@dataclass
class ForwardRuleConfig:
    id: str = opt(doc="rule id (letters, digits, _ . -)")
    device: str = opt("*", doc="devices it applies to: a name or a pattern (* ? [..])")
    point: str = opt("*", doc="points it applies to: a name or a pattern")
    deadband: float = opt(0.0, doc="report by exception: a reading goes north only when it moved more than this "
                          "from the last value sent (absolute); 0 with no other setting = on any change", ge=0)
    deadband_pct: float = opt(0.0, doc="as deadband, in percent of the last value sent", ge=0, le=1000)
    max_silence_s: float = opt(0.0, doc="heartbeat: the current value goes north at least this often even when it "
                               "did not move (0 = no heartbeat)", ge=0, le=7 * 86400)
    min_interval_s: float = opt(0.0, doc="at most one value a series per interval (aligned to the clock): the "
                                "aggregate (mode) of the readings in it, with their count and the interval", ge=0,
                                le=7 * 86400)
    mode: str = opt("last", doc="min_interval_s: last | avg | min | max", choices=("last", "avg", "min", "max"))
    drop: bool = opt(False, doc="kept on the gateway, never forwarded")

    def check(self, key: str) -> None:
        if not _ID_RE.match(self.id):
            raise ConfigError(f"{key}.id: expected 1-128 characters of letters, digits, '_', '.', '-', got "
                              f"{self.id!r}")
        for k in ("device", "point"):
            v = getattr(self, k)
            if not v or len(v) > 256:
                raise ConfigError(f"{key}.{k}: expected a name or pattern of 1-256 characters, got {v!r}")
        if self.deadband and self.deadband_pct:
            raise ConfigError(f"{key}.deadband_pct: set deadband or deadband_pct, not both")
        if self.drop and (self.deadband or self.deadband_pct or self.max_silence_s or self.min_interval_s):
            raise ConfigError(f"{key}.drop: a dropping rule takes no deadband, max_silence_s or min_interval_s")
        if self.min_interval_s:
            if self.min_interval_s < 0.001:
                raise ConfigError(f"{key}.min_interval_s: expected 0 or at least 0.001 s, got {self.min_interval_s}")
            if self.deadband or self.deadband_pct or self.max_silence_s:
                raise ConfigError(f"{key}.min_interval_s: an interval rule sends one value an interval; it takes no "
                                  "deadband or max_silence_s (make two rules for two series sets)")
        elif self.mode != "last":
            raise ConfigError(f"{key}.mode: {self.mode!r} needs min_interval_s")


@dataclass
class ForwardConfig:
    max_command_rules: int = opt(100, doc="rules that forward.set may hold at once (besides the config's); beyond, "
                                 "refused", ge=0, le=10_000)
    rule: list[ForwardRuleConfig] = opt(factory=list, doc="what of the readings goes to the cloud ([[forward.rule]] "
                                        "tables): the first rule that matches a series decides; a series no rule "
                                        "matches is forwarded whole. Every reading stays in the gateway's store")

    def check(self, key: str) -> None:
        ids = [r.id for r in self.rule]
        for i, rule_id in enumerate(ids):
            if rule_id in ids[:i]:
                raise ConfigError(f"{key}.rule[{i}].id: {rule_id!r} is used twice")


def forward_rule_from_dict(raw: object) -> ForwardRuleConfig:
    """A forwarding rule sent by command, checked like the config's [[forward.rule]] (ConfigError names the field)."""
    rc = _convert("rule", ForwardRuleConfig, raw)
    check_tree(rc, "rule")
    return rc


SHIPPED_MODEL_PUBLIC_KEY = "uajP+EhvSIyBkPEyb0G+gTnRjOkhohSNmekAMnmCM/A="  # signs models/glm-edge-iot/*

@dataclass
class CommandsConfig:
    enabled: bool = opt(True, doc="answer commands on <prefix>/<gateway>/cmd/<name> over the uplink")
    allow: list[str] = opt(factory=lambda: ["read-only"],
                           doc="operations allowed: names (`edge-agent ops` lists them), and \"read-only\" for every "
                           "operation that changes nothing; write and rules.add/remove are off by default")
    max_request_bytes: int = opt(16384, doc="larger requests are refused", ge=64, le=1 << 20)
    dedup_window_s: float = opt(600.0, doc="a request id seen within this window is answered from the cache, "
                                "not executed again; the ids of changing operations are committed to the store "
                                "before they run, so this holds across restarts too", ge=0, le=86400)
    dedup_max: int = opt(1000, doc="request ids remembered at most (oldest forgotten first)", ge=1, le=1_000_000)
    query_max_rows: int = opt(1_000_000, doc="readings a query may scan; beyond, it is refused", ge=1000)
    concurrency: int = opt(8, doc="commands executing at once; beyond, 'busy'", ge=1, le=1000)
    operator_keys: list[str] = opt(factory=list, doc="operators' Ed25519 public keys, \"KEY_ID=BASE64\" each; when "
                                   "any is set, every operation that changes anything must be signed by one (the "
                                   "audit records the key id); none: the broker's ACL alone decides who may")
    signature_max_age_s: float = opt(300.0, doc="a signature older (or further ahead) than this is refused",
                                     ge=1, le=86400)
    session_expiry_s: int = opt(3600, doc="the broker keeps the command subscription and the QoS 1 commands sent "
                                "while the agent is down for this long (MQTT 5 session expiry; 3.1.1: a persistent "
                                "session, expired by the broker's own setting)", ge=0, le=7 * 86400)
    max_age_s: float = opt(300.0, doc="a request carrying \"ts\" (unix ms when sent) older than this is answered "
                           "'expired' and not run (a command queued while the agent was down is never run late)",
                           ge=1, le=7 * 86400)
    reply_prefixes: list[str] = opt(factory=list, doc="MQTT 5 response topics may start with these, besides "
                                    "<prefix>/<gateway>/res/ (always allowed); a request whose response topic is "
                                    "elsewhere is refused unrun and counted")

    def check(self, key: str) -> None:
        if self.operator_keys and self.signature_max_age_s > self.dedup_window_s:
            raise ConfigError(f"{key}.signature_max_age_s: must not exceed {key}.dedup_window_s, or a signed "
                              "request could be replayed after its id is forgotten")


@dataclass
class PointWordsConfig:
    name: str = opt(doc="a point name of this gateway's devices (or a shipped one: temperature, level, ...)")
    words: list[str] = opt(factory=list, doc="operators' words for it (\"blower\", \"how loud\"); whole words")


@dataclass
class AskConfig:
    writes: str = opt("confirm", doc="a write the model proposes: confirm (the reply carries it and a one-time token; "
                      "the confirm operation runs it), direct (runs at once), never", choices=("confirm", "direct",
                                                                                             "never"))
    confirm_ttl_s: float = opt(60.0, doc="a confirmation token expires after this", ge=5, le=3600)
    max_pending: int = opt(64, doc="writes awaiting confirmation at once; beyond, the oldest is dropped (counted)",
                           ge=1, le=10_000)
    points: list[PointWordsConfig] = opt(factory=list, doc="this gateway's own point names and operators' words for "
                                         "them, added to the shipped table (at most 64 points, 16 words each)")
    memory_ttl_s: float = opt(300.0, doc="a requester's conversation memory (the last resolved call or plan, the "
                              "writes it ran) is forgotten after this much silence", ge=5, le=86400)
    max_requesters: int = opt(256, doc="requesters whose conversation memory is kept at once; beyond, the least "
                              "recently seen is forgotten (counted)", ge=1, le=100_000)

    def check(self, key: str) -> None:
        _check_points(self.points, f"{key}.points")


@dataclass
class ModelConfig:
    enabled: bool = opt(True, doc="load the GLM for the ask command (off: ask answers 'unavailable')")
    dir: str = opt("", doc="model folder (manifest.json, manifest.sig, files); '' = the shipped default model")
    public_key: str = opt(SHIPPED_MODEL_PUBLIC_KEY, doc="Ed25519 public key (base64) the manifest signature must "
                          "verify with; the default is the key of the shipped model")
    providers: list[str] = opt(factory=lambda: ["tensorrt", "cuda", "cpu"], doc="execution providers in order of "
                               "preference (tensorrt, cuda, cpu); the first that can serve the model does")
    threads: int = opt(1, doc="CPU provider intra-op threads", ge=1, le=64)
    queue: int = opt(4, doc="questions waiting for the inference worker; beyond, 'busy'", ge=1, le=1000)
    timeout_s: float = opt(5.0, doc="a question not answered by then fails (queue wait included)", ge=0.05, le=600)
    max_new_tokens: int = opt(96, doc="tokens the model may write per answer", ge=8, le=4096)
    lookahead: int = opt(4, doc="draft tokens copied from the question per forward pass, kept where the model "
                         "agrees (greedy, CPU; 0 = one token per pass)", ge=0, le=32)
    second_look: bool = opt(True, doc="when the model answers 'which value?' of a question that states one (or "
                            "'which device?' of one that names a device), it answers again without that option; the "
                            "guard checks the second answer like any other")
    trt_fp16: bool = opt(True, doc="TensorRT: allow fp16 kernels")
    trt_int8: bool = opt(True, doc="TensorRT: allow int8 kernels (the QDQ file carries its scales)")
    trt_workspace_mb: int = opt(1024, doc="TensorRT: builder workspace", ge=64, le=65536)

    def check(self, key: str) -> None:
        for p in self.providers:
            if p not in ("tensorrt", "cuda", "cpu"):
                raise ConfigError(f"{key}.providers: unknown provider {p!r} (tensorrt, cuda, cpu)")
        if not self.providers or len(set(self.providers)) != len(self.providers):
            raise ConfigError(f"{key}.providers: name each of tensorrt, cuda, cpu at most once, at least one")


@dataclass
class OtaConfig:
    enabled: bool = opt(True, doc="accept model updates (model.update, edge-agent model install)")
    trusted_keys: list[str] = opt(factory=list, doc="Ed25519 public keys (base64) that may sign a model, besides "
                                  "model.public_key")
    ca_file: str = opt("", doc="CA that signs the model server's certificate ('' = uplink.ca_file)")
    cert_file: str = opt("", doc="client certificate for the model server ('' = uplink.cert_file)")
    key_file: str = opt("", doc="its private key ('' = uplink.key_file)")
    allow_plain_http: bool = opt(False, doc="also fetch http:// URLs (tests on loopback only; the signature still "
                                 "decides what is installed)")
    max_bundle_bytes: int = opt(4 << 30, doc="a bundle larger than this (all its files) is refused", ge=1 << 20)
    disk_reserve_bytes: int = opt(64 << 20, doc="free space that must remain after the download", ge=0)
    timeout_s: float = opt(30.0, doc="connect and read timeout of each request to the model server", ge=1, le=600)
    attempts: int = opt(6, doc="tries per file (each resumes where the last stopped); then the update fails",
                        ge=1, le=100)
    deadline_s: float = opt(7200.0, doc="an update's whole download (manifest and every file, resumes included) "
                            "must end within this; beyond, it fails (reason deadline)", ge=1, le=7 * 86400)
    min_rate_bps: int = opt(4096, doc="bytes a second the model server must keep up, averaged over rate_window_s "
                            "(Uptane's slow retrieval); below, the update fails (reason slow). 0: no minimum",
                            ge=0)
    rate_window_s: float = opt(60.0, doc="the window the transfer rate is averaged over", ge=1, le=3600)
    keep_versions: int = opt(3, doc="installed versions kept (the active one, the previous good ones); older ones "
                             "are deleted", ge=2, le=20)
    smoke_max_ms: float = opt(5000.0, doc="health check: a smoke question slower than this fails the model", ge=10)
    good_after_s: float = opt(120.0, doc="a new model is marked good after serving this long without the agent "
                              "restarting", ge=1, le=86400)
    crash_restarts: int = opt(3, doc="restarts before a new model is marked good that roll it back", ge=1, le=100)
    crash_window_s: float = opt(600.0, doc="... counted within this time after the swap", ge=10)


@dataclass
class MetricsConfig:
    enabled: bool = opt(True, doc="serve Prometheus metrics")
    host: str = opt("127.0.0.1", doc="listen address (loopback by default)")
    port: int = opt(9108, doc="listen port (0 = any free port)", ge=0, le=65535)


@dataclass
class SupervisorConfig:
    stop_timeout_s: float = opt(10.0, doc="bound on a graceful stop (flush included)", ge=0.1, le=600)
    restart_min_s: float = opt(0.5, doc="first restart delay of a crashed component", ge=0.01)
    restart_max_s: float = opt(60.0, doc="restart delay cap", ge=0.1)

    def check(self, key: str) -> None:
        if self.restart_min_s > self.restart_max_s:
            raise ConfigError(f"{key}: the minimum delay ({self.restart_min_s}) is above the maximum "
                              f"({self.restart_max_s})")


@dataclass
class Config:
    gateway: GatewayConfig = opt(factory=GatewayConfig, doc="identity and state")
    log: LogConfig = opt(factory=LogConfig, doc="logging")
    store: StoreConfig = opt(factory=StoreConfig, doc="the durable store")
    southbound: SouthboundConfig = opt(factory=SouthboundConfig, doc="device-side adapters")
    uplink: UplinkConfig = opt(factory=UplinkConfig, doc="mutual-TLS link to the cloud")
    commands: CommandsConfig = opt(factory=CommandsConfig, doc="the command channel over the uplink")
    rules: RulesConfig = opt(factory=RulesConfig, doc="rules and alerts (edge autonomy)")
    forward: ForwardConfig = opt(factory=ForwardConfig, doc="what goes to the cloud (forwarding rules)")
    model: ModelConfig = opt(factory=ModelConfig, doc="the GLM on the gateway (ask)")
    ask: AskConfig = opt(factory=AskConfig, doc="what ask may do with the model's calls")
    ota: OtaConfig = opt(factory=OtaConfig, doc="model updates over the air")
    metrics: MetricsConfig = opt(factory=MetricsConfig, doc="Prometheus endpoint")
    supervisor: SupervisorConfig = opt(factory=SupervisorConfig, doc="component supervision")

    def configured_devices(self) -> frozenset[str]:
        """The devices the config names (OPC UA servers, CoAP observations, rules and their actions): the store
        keeps room in its registry for them (store.registry_reserve)."""
        sb = self.southbound
        return frozenset([*(s.device for s in sb.opcua.servers), *(o.device for o in sb.coap.observe),
                          *(r.device for r in self.rules.rule), *(r.action_device for r in self.rules.rule
                                                                    if r.action_device)])


_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _convert(key: str, hint: Any, raw: Any) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(raw, dict):
            raise ConfigError(f"{key}: expected a table ([{key}]), got {_describe(raw)}")
        return _build(hint, raw, key)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(raw, list):
            raise ConfigError(f"{key}: expected an array ([[{key}]] tables), got {_describe(raw)}")
        out, errors = [], []
        for i, v in enumerate(raw):
            try:
                out.append(_convert(f"{key}[{i}]", item, v))
            except ConfigError as e:
                errors.append(str(e))
        if errors:
            raise ConfigError("\n".join(errors))
        return out
    if hint is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"{key}: expected true or false, got {_describe(raw)}")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{key}: expected an integer, got {_describe(raw)}")
        return raw
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_describe(raw)}")
        if not math.isfinite(raw):  # TOML's nan/inf, JSON's 1e999: no bound or threshold is infinite
            raise ConfigError(f"{key}: expected a finite number, got {raw}")
        return float(raw)
    if hint is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{key}: expected a string, got {_describe(raw)}")
        return raw
    raise TypeError(f"unsupported config type {hint!r} at {key}")  # a programming error, not a user one


def _describe(raw: Any) -> str:
    if isinstance(raw, dict):
        return "a table"
    if isinstance(raw, list):
        return "an array"
    if isinstance(raw, bool):
        return f"boolean {str(raw).lower()}"
    if isinstance(raw, (int, float)):
        return f"number {raw}"
    if isinstance(raw, str):
        return f"string {raw!r}"
    return type(raw).__name__


def _build(cls: type, raw: dict, prefix: str) -> Any:
    """The section as its dataclass; every problem of the file is collected and reported at once (one line each)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    errors: list[str] = []
    for k in raw:
        if k not in fields:
            where = f"{prefix}.{k}" if prefix else k
            errors.append(f"{where}: unknown key (known in {prefix or 'the top level'}: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{key}: required key is missing ({f.metadata.get('doc', '')})")
            continue
        try:
            value = _convert(key, hints[name], raw[name])
        except ConfigError as e:
            errors.append(str(e))
            continue
        meta = f.metadata
        if meta.get("choices") and value not in meta["choices"]:
            errors.append(f"{key}: expected one of {', '.join(map(str, meta['choices']))}, got {value!r}")
        elif meta.get("ge") is not None and value < meta["ge"]:
            errors.append(f"{key}: must be >= {meta['ge']}, got {value}")
        elif meta.get("le") is not None and value > meta["le"]:
            errors.append(f"{key}: must be <= {meta['le']}, got {value}")
        else:
            values[name] = value
    if errors:
        raise ConfigError("\n".join(errors))
    return cls(**values)


MAX_EXTRA_POINTS, MAX_WORDS_PER_POINT, MAX_NAME_CHARS = 64, 16, 48  # ask.points (48: the grammar's name bound)


def _check_points(points: list[PointWordsConfig], where: str) -> None:
    if len(points) > MAX_EXTRA_POINTS:
        raise ConfigError(f"{where}: at most {MAX_EXTRA_POINTS} points, got {len(points)}")
    for i, p in enumerate(points):
        key = f"{where}[{i}]"
        if not 1 <= len(p.name) <= MAX_NAME_CHARS or not re.fullmatch(r"[A-Za-z0-9_.-]+", p.name):
            raise ConfigError(f"{key}.name: expected 1-{MAX_NAME_CHARS} letters, digits, '_', '.', '-', "
                              f"got {p.name!r}")
        if len(p.words) > MAX_WORDS_PER_POINT:
            raise ConfigError(f"{key}.words: at most {MAX_WORDS_PER_POINT}, got {len(p.words)}")
        for w in p.words:
            if not 1 <= len(w) <= MAX_NAME_CHARS or not re.search(r"[A-Za-z0-9]", w):
                raise ConfigError(f"{key}.words: expected words of 1-{MAX_NAME_CHARS} characters, got {w!r}")


def check_tree(obj: Any, key: str) -> None:
    """Every section's own cross-field rules (its `check(key)`), deepest first, defaulted sections too; raises the
    first ConfigError, which names the key."""
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            check_tree(item, f"{key}[{i}]")
        return
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        check_tree(getattr(obj, f.name), f"{key}.{f.name}" if key else f.name)
    check = getattr(obj, "check", None)
    if check is not None:
        check(key)


def _check_rule(rc: "RuleConfig", key: str) -> None:
    if not _ID_RE.match(rc.id):
        raise ConfigError(f"{key}.id: expected letters, digits, '_', '.', '-', got {rc.id!r}")
    if rc.kind in ("rate", "zscore") and rc.threshold <= 0:
        raise ConfigError(f"{key}.threshold: must be > 0 for a {rc.kind} rule")
    if rc.local_topic and ("+" in rc.local_topic or "#" in rc.local_topic):
        raise ConfigError(f"{key}.local_topic: a topic to publish to has no wildcards, got {rc.local_topic!r}")
    if bool(rc.action_device) != bool(rc.action_point) or (rc.action_device and not rc.action_value):
        raise ConfigError(f"{key}: action_device, action_point and action_value go together")
    if rc.action_value:
        try:
            v = json.loads(rc.action_value)
        except ValueError:
            raise ConfigError(f"{key}.action_value: expected a JSON value (false, 0, 12.5, \"stop\"), "
                              f"got {rc.action_value!r}") from None
        if not isinstance(v, (bool, int, float, str)) or (isinstance(v, float) and not math.isfinite(v)):
            raise ConfigError(f"{key}.action_value: expected a finite number, boolean or string")


def action_value(rc: "RuleConfig") -> object:
    return json.loads(rc.action_value)


def rule_from_dict(raw: object) -> RuleConfig:
    """A rule sent by command, checked like the config's [[rules.rule]] (ConfigError names the field)."""
    rc = _convert("rule", RuleConfig, raw)
    check_tree(rc, "rule")
    return rc


def from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw, "")
    check_tree(cfg, "")
    return cfg


def load(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found (pass --config PATH)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read config: {e}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return from_dict(raw)


def to_dict(obj: Any, redact: bool = True) -> Any:
    """The effective config as plain data, secrets replaced by '***' when set."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            out[f.name] = "***" if (redact and f.metadata.get("secret") and v) else to_dict(v, redact)
        return out
    if isinstance(obj, list):
        return [to_dict(v, redact) for v in obj]
    return obj


def to_toml(data: dict, prefix: str = "") -> str:
    """Render plain config data as TOML (for `edge-agent check`)."""
    lines: list[str] = []
    tables: list[tuple[str, dict]] = []
    arrays: list[tuple[str, list]] = []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            arrays.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in tables:
        name = f"{prefix}.{k}" if prefix else k
        body = to_toml(v, name)
        lines.append(f"\n[{name}]\n{body}" if not body.startswith("\n[") else f"\n[{name}]{body}")
    for k, items in arrays:
        name = f"{prefix}.{k}" if prefix else k
        for item in items:
            lines.append(f"\n[[{name}]]\n{to_toml(item, name)}")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))




def example_toml() -> str:
    """The example config (systemd/edge-agent.toml): every key, its default and its doc line."""
    out = ["# Open-AutoGLM Edge Agent configuration: every key with its default value.",
           "# Generated by `python -c 'from edge_agent.config import example_toml; print(example_toml())'`;",
           "# a test keeps it in step with the code. Validate with: edge-agent check --config PATH", ""]

    def walk(obj: Any, prefix: str, array: bool = False) -> None:
        tables = []
        if prefix:
            out.append(f"[[{prefix}]]" if array else f"[{prefix}]")
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            doc = f.metadata.get("doc", "")
            if dataclasses.is_dataclass(v) or (isinstance(v, list) and v and dataclasses.is_dataclass(v[0])):
                tables.append((f.name, v, doc))
                continue
            extra = []
            if f.metadata.get("ge") is not None:
                extra.append(f">= {f.metadata['ge']}")
            if f.metadata.get("le") is not None:
                extra.append(f"<= {f.metadata['le']}")
            out.append(f"# {doc}" + (f" ({', '.join(extra)})" if extra else ""))
            out.append(f"{f.name} = {_toml_value(v)}")
        out.append("")
        for name, v, doc in tables:
            full = f"{prefix}.{name}" if prefix else name
            out.append(f"# --- {full}: {doc}")
            if isinstance(v, list):
                for item in v:
                    walk(item, full, array=True)
            else:
                walk(v, full)

    walk(Config(), "")
    return "\n".join(out).rstrip() + "\n"
