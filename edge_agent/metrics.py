"""Prometheus metrics: one registry per agent, served on loopback by prometheus-client."""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "edge_agent_"
        self.readings_received = Counter(p + "readings_received", "Readings decoded from devices", ["source"], registry=r)
        self.readings_committed = Counter(p + "readings_committed", "Readings committed to the store", registry=r)
        self.telemetry_bytes = Counter(p + "uplink_telemetry_bytes", "Payload bytes of the telemetry messages sent "
                                       "(each attempt)", registry=r)
        self.forward_readings = Counter(p + "forward_readings", "Readings a forwarding rule decided on: sent, filtered "
                                        "(within the deadband), dropped (drop = true), aggregated (into an interval's "
                                        "aggregate)", ["outcome"], registry=r)
        self.messages_rejected = Counter(p + "messages_rejected", "Device messages rejected, by reason",
                                         ["source", "reason"], registry=r)
        self.ingest_paused = Counter(p + "ingest_paused", "Times ingest stopped reading from a broker at its "
                                     "bound of uncommitted messages", ["source"], registry=r)
        self.readings_refused = Counter(p + "readings_refused", "Readings the store refused, by reason (registry_full: "
                                        "a new device or series beyond store.max_devices / store.max_points)",
                                        ["reason"], registry=r)
        self.dead_letters_dropped = Counter(p + "dead_letters_dropped", "Dead letters removed at the table bound",
                                            registry=r)
        self.store_commits = Counter(p + "store_commits", "Store transactions committed", registry=r)
        self.store_commit_seconds = Histogram(p + "store_commit_seconds", "Store commit duration", registry=r,
                                              buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1, 5))
        self.store_bytes = Gauge(p + "store_bytes", "Bytes in use in the database", registry=r)
        self.outbox_readings = Gauge(p + "outbox_readings", "Readings waiting for the cloud", registry=r)
        self.outbox_bytes = Gauge(p + "outbox_bytes", "Payload bytes waiting for the cloud", registry=r)
        self.outbox_evicted = Counter(p + "outbox_evicted_readings", "Readings evicted from the outbox "
                                      "at the disk quota (never reach the cloud)", registry=r)
        self.window_evicted = Counter(p + "window_evicted_readings", "Readings trimmed from the local window",
                                      ["reason"], registry=r)
        self.uplink_connected = Gauge(p + "uplink_connected", "1 while the cloud link is up", registry=r)
        self.uplink_connects = Counter(p + "uplink_connects", "Cloud connections established", registry=r)
        self.uplink_errors = Counter(p + "uplink_errors", "Cloud link failures, by reason", ["reason"], registry=r)
        self.batches_sent = Counter(p + "uplink_batches_sent", "Telemetry batches published", registry=r)
        self.batches_acked = Counter(p + "uplink_batches_acked", "Telemetry batches acknowledged by the cloud",
                                     registry=r)
        self.readings_acked = Counter(p + "uplink_readings_acked", "Readings acknowledged by the cloud", registry=r)
        self.uplink_ack_seq = Gauge(p + "uplink_acked_seq", "Highest seq acknowledged by the cloud", registry=r)
        self.ingest_connected = Gauge(p + "ingest_connected", "1 while connected to the local broker",
                                      ["source"], registry=r)
        self.last_data = Gauge(p + "adapter_last_data_timestamp_seconds", "When an adapter last took in readings "
                               "(unix time; age = time() - this)", ["source"], registry=r)
        self.adapter_reconnects = Counter(p + "adapter_reconnects", "Southbound sessions re-established "
                                          "(observations registered again, OPC UA sessions reconnected)",
                                          ["source"], registry=r)
        self.adapter_errors = Counter(p + "adapter_errors", "Southbound session failures, by reason",
                                      ["source", "reason"], registry=r)
        self.commands = Counter(p + "commands", "Commands answered, by outcome (ok, duplicate, or the error code)",
                                ["command", "outcome"], registry=r)
        self.readings_retimed = Counter(p + "readings_retimed", "Readings whose timestamp disagreed with the "
                                        "gateway's clock: stored with the receive time, quality says why",
                                        ["source", "quality"], registry=r)
        self.ask_outcomes = Counter(p + "ask_outcomes", "ask answers by outcome: done, clarify (nothing ran: the "
                                    "question did not plainly ask it, or names what the gateway does not know), "
                                    "confirm (a write awaits its token), confirmed, dropped (a pending write "
                                    "pushed out at ask.max_pending)", ["outcome"], registry=r)
        self.agent_events = Counter(p + "agent_events", "The orchestrator and the conversation memory, by event: "
                                    "plan_refused (a plan failed validation or its dry-run: nothing ran), "
                                    "plan_proposed, plan_nothing_to_do, plan_done, plan_partial (stopped at a failed "
                                    "write), recheck_failed (a condition no longer held at confirmation: that write "
                                    "not run), rule_proposed, followup, answered (a yes/no), memory_evicted "
                                    "(ask.max_requesters), memory_expired (ask.memory_ttl_s), frame_too_large (over "
                                    "4 KB: not kept)", ["event"], registry=r)
        self.registry_expired = Counter(p + "registry_expired", "Series and devices that left the registry after "
                                        "store.series_expiry_s of silence", ["kind"], registry=r)
        self.store_full = Gauge(p + "store_full", "1 while the store is at its quota and holds new readings back "
                                "(store.at_quota = backpressure)", registry=r)
        self.rule_errors = Counter(p + "rule_errors", "Readings a rule failed on (skipped; the others go on)",
                                   ["rule"], registry=r)
        self.alerts = Counter(p + "alerts", "Alerts by state: firing, cleared, suppressed (cooldown), dropped "
                              "(bound), sent (acknowledged by the cloud)", ["state"], registry=r)
        self.backoff_waits = Counter(p + "backoff_waits", "Waits before a retry (reconnects, re-registrations, "
                                     "restarts), by loop", ["loop"], registry=r)
        self.restarts = Counter(p + "component_restarts", "Component restarts after a crash", ["component"],
                                registry=r)
        self.loop_lag = Gauge(p + "event_loop_lag_seconds", "Latest event-loop scheduling lag", registry=r)
        self.cert_days_left = Gauge(p + "cert_days_left", "Days until a certificate expires", ["cert"], registry=r)
        self.cert_expiring = Gauge(p + "cert_expiring", "1 when a certificate expires within the warning window",
                                   ["cert"], registry=r)
        self.glm_requests = Counter(p + "glm_requests", "GLM requests by outcome: ok, busy (queue full), timeout, "
                                    "bad_input, no_call (no valid call within the token budget), error", ["outcome"], registry=r)
        self.glm_tokens = Counter(p + "glm_tokens", "Tokens the GLM wrote, by how: sampled, forced (grammar "
                                  "fast-forward) or drafted (lookahead, confirmed by the model)", ["how"], registry=r)
        self.glm_seconds = Histogram(p + "glm_request_seconds", "GLM request latency (queue wait included)",
                                     registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10))
        self.glm_queue = Gauge(p + "glm_queue_depth", "GLM requests waiting for the inference worker", registry=r)
        self.logs_dropped = Counter(p + "logs_dropped", "Log lines for the cloud dropped: quota (the oldest, at "
                                    "log.ship_quota_bytes), queue (a flood), store_error, set_aside (a batch the cloud "
                                    "kept refusing)", ["reason"], registry=r)
        self.logs_sent = Counter(p + "logs_sent", "Log lines the cloud acknowledged", registry=r)
        self.cert_renewals = Counter(p + "cert_renewals", "Uplink certificate renewals: ok, refused (by the broker), "
                                     "invalid (the signer's answer failed the checks), timeout", ["outcome"],
                                     registry=r)
        self.cert_reloads = Counter(p + "cert_reloads", "New uplink certificate files: switched (the broker took "
                                    "them), refused (by the broker: back to the old ones), invalid (refused by the "
                                    "checks)", ["outcome"], registry=r)
        self.model_updates = Counter(p + "model_updates", "Model updates by outcome (active, refused, failed, "
                                     "rolled_back) and reason", ["outcome", "reason"], registry=r)
        self.model_load_errors = Counter(p + "model_load_errors", "Model folders refused at load, by reason",
                                         ["reason"], registry=r)

    def serve(self, host: str, port: int):
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics listening", extra={"addr": f"{host}:{server.server_port}"})
        return server, thread

    def value(self, name: str, labels: dict | None = None) -> float:
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v
