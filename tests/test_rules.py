"""Rules fire and clear as specified; cooldown holds; alerts raised during an outage reach the cloud."""
from __future__ import annotations

import json
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import RuleConfig, RulesConfig
from edge_agent.metrics import Metrics
from edge_agent.records import Reading
from edge_agent.rules import RuleEngine
from conftest import Publisher, wait_for


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def engine(*rules: RuleConfig) -> tuple[RuleEngine, list[dict], Clock]:
    out: list[dict] = []
    clock = Clock()
    e = RuleEngine(RulesConfig(rule=list(rules)), "gw", lambda b, *_: out.append(json.loads(b)), Metrics(), clock)
    return e, out, clock


def feed(e: RuleEngine, clock: Clock, values, point="t", dt=1.0) -> None:
    for v in values:
        clock.t += dt
        e.observe([Reading("d", point, v, None, int(clock.t * 1e9), "good", "test")])


def states(out):
    return [(a["rule"], a["state"]) for a in out]


def test_above_with_hysteresis_fires_once_and_clears_below_the_band():
    e, out, clock = engine(RuleConfig(id="hot", kind="above", device="d", point="t", threshold=80, hysteresis=5,
                                      cooldown_s=0))
    feed(e, clock, [70, 81, 79, 76, 82, 74])
    assert states(out) == [("hot", "firing"), ("hot", "cleared")]
    assert out[0]["value"] == 81 and out[1]["value"] == 74 and "above 80" in out[0]["text"]


def test_below_rate_and_zscore():
    e, out, clock = engine(
        RuleConfig(id="low", kind="below", device="d", point="t", threshold=10, cooldown_s=0),
        RuleConfig(id="jump", kind="rate", device="d", point="p", threshold=5, cooldown_s=0),
        RuleConfig(id="odd", kind="zscore", device="d", point="z", threshold=3, window=10, cooldown_s=0))
    feed(e, clock, [12, 9, 11])
    feed(e, clock, [100, 102, 120, 121], point="p")           # +18/s fires, +1/s clears
    feed(e, clock, [50, 51, 49, 50, 51, 49, 50, 90, 50], point="z")
    assert states(out) == [("low", "firing"), ("low", "cleared"), ("jump", "firing"), ("jump", "cleared"),
                           ("odd", "firing"), ("odd", "cleared")]
    assert out[2]["stats"]["rate_per_s"] == 18.0
    assert out[4]["stats"]["samples"] == 7 and out[4]["stats"]["z"] > 3


def test_nodata_fires_after_silence_and_clears_with_data():
    e, out, clock = engine(RuleConfig(id="quiet", kind="nodata", device="d", point="t", seconds=30, cooldown_s=0))
    feed(e, clock, [1])
    clock.t += 29
    e.tick()
    assert out == []
    clock.t += 2
    e.tick()
    e.tick()
    assert states(out) == [("quiet", "firing")] and out[0]["stats"]["silent_s"] >= 30
    feed(e, clock, [2])
    assert states(out) == [("quiet", "firing"), ("quiet", "cleared")]


def test_the_clock_runs_only_while_a_nodata_rule_needs_it():
    """No `nodata` rule: the engine's task sleeps until a rule is added (an idle gateway is not woken every second);
    one added by command starts the clock at once."""
    import asyncio

    async def main():
        e, out, clock = engine(RuleConfig(id="hot", kind="above", device="d", point="t", threshold=5))
        ticks = []
        real = e.tick
        e.tick = lambda: (ticks.append(1), real())[1]  # type: ignore[method-assign]
        task = asyncio.ensure_future(e.run())
        await asyncio.sleep(2.5)
        assert len(ticks) == 1  # the first pass only
        e.add(RuleConfig(id="quiet", kind="nodata", device="d", point="t", seconds=30, cooldown_s=0))
        clock.t += 31
        await asyncio.sleep(1.5)
        assert len(ticks) >= 2 and states(out) == [("quiet", "firing")]
        await e.stop()
        await asyncio.wait_for(task, 5)
    asyncio.run(main())


def test_cooldown_holds_a_flapping_value():
    e, out, clock = engine(RuleConfig(id="hot", kind="above", device="d", point="t", threshold=80, cooldown_s=60))
    feed(e, clock, [90, 70] * 10)            # 20 s of flapping: one firing, one clearing
    assert states(out) == [("hot", "firing"), ("hot", "cleared")]
    assert e.metrics.value("edge_agent_alerts_total", {"state": "suppressed"}) == 9
    clock.t += 60
    feed(e, clock, [95])
    assert states(out)[-1] == ("hot", "firing")


def test_alerts_raised_while_the_cloud_is_down_arrive_after_it_returns(local_broker, cloud_broker, make_agent, pki):
    cert, key = pki["viewer"]
    got: list[dict] = []
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="alert-viewer", clean_session=False)
    c.tls_set(ca_certs=str(pki["ca"].cert_path), certfile=str(cert), keyfile=str(key))
    c.on_message = lambda _c, _u, m: got.append(json.loads(m.payload))
    c.reconnect_delay_set(0.1, 0.5)
    c.connect("localhost", cloud_broker.port, 30)
    c.subscribe("edge/+/alerts", 1)
    c.loop_start()
    time.sleep(0.3)
    cloud_broker.stop()  # the viewer's session survives the broker's restart
    agent = make_agent(local_broker, cloud_broker, rules={"rule": [
        {"id": "hot", "kind": "above", "device": "boiler", "point": "temperature", "threshold": 80,
         "hysteresis": 2, "cooldown_s": 0}]}).start()
    agent.wait_ready()
    pub = Publisher(local_broker)
    for v in (70, 85, 86, 75):
        pub.publish(0, payload=json.dumps({"values": {"temperature": v}}).encode(), device="boiler")
    wait_for(lambda: agent.metric("edge_agent_alerts_total", 'state="cleared"') == 1, 10, what="alerts raised")
    assert got == []
    cloud_broker.start()
    wait_for(lambda: len(got) >= 2, 20, what="alerts at the cloud")
    assert [(a["rule"], a["state"], a["value"]) for a in got] == [("hot", "firing", 85), ("hot", "cleared", 75)]
    assert got[0]["gateway"] == "gw-test" and got[0]["device"] == "boiler" and got[0]["text"]
    wait_for(lambda: agent.metric("edge_agent_alerts_total", 'state="sent"') == 2, 10, what="alerts acknowledged")
    pub.close()
    c.loop_stop()
    c.disconnect()
    assert agent.stop() == 0


def test_rule_actions_publish_locally_and_write_through_the_allow_list(local_broker, cloud_broker, make_agent):
    from edge_agent.devkit.brokers import free_port
    from test_opcua import FAST, NODES, Plc, _read
    import asyncio
    plc = Plc(free_port()).start()
    local_alerts: list[dict] = []
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="local-alarm-panel")
    sub.on_message = lambda _c, _u, m: local_alerts.append(json.loads(m.payload))
    sub.connect("127.0.0.1", local_broker.port, 30)
    sub.subscribe("alarms/boiler", 1)
    sub.loop_start()
    try:
        agent = make_agent(local_broker, cloud_broker, rules={"rule": [
            {"id": "overheat", "kind": "above", "device": "boiler", "point": "temperature", "threshold": 90,
             "cooldown_s": 0, "local_topic": "alarms/boiler",
             "action_device": "plc-1", "action_point": "setpoint", "action_value": "12.5"},
            {"id": "bad-action", "kind": "above", "device": "boiler", "point": "pressure", "threshold": 5,
             "cooldown_s": 0, "action_device": "plc-1", "action_point": "temperature", "action_value": "0"}]},
            southbound__opcua={"enabled": True, "servers": [
                {"device": "plc-1", "endpoint": plc.endpoint, **FAST, "nodes": NODES}]}).start()
        agent.wait_ready()
        wait_for(lambda: agent.metric("edge_agent_ingest_connected", 'source="opcua"') == 1, 20, what="opcua")
        pub = Publisher(local_broker)
        pub.publish(0, device="boiler", payload=b'{"values": {"temperature": 95, "pressure": 9}}')
        pub.publish(0, device="boiler", payload=b'{"values": {"temperature": 70}}')
        wait_for(lambda: len(local_alerts) >= 2, 10, what="alerts on the local topic")
        assert [(a["rule"], a["state"]) for a in local_alerts] == [("overheat", "firing"), ("overheat", "cleared")]
        wait_for(lambda: agent.metric("edge_agent_alerts_total", 'state="action_done"') == 1, 10, what="write")
        assert asyncio.run(_read(plc.endpoint, "2:PLC/2:Setpoint")) == 12.5
        wait_for(lambda: agent.metric("edge_agent_alerts_total", 'state="action_refused"') == 1, 10,
                 what="refused action")
        log = agent.log()
        assert 'msg="rule action write done"' in log and "not allow-listed" in log
        pub.close()
        assert agent.stop() == 0
    finally:
        sub.loop_stop()
        sub.disconnect()
        plc.kill()


def test_rule_config_errors_name_the_field():
    import pytest
    from edge_agent.config import ConfigError, from_dict
    base = {"id": "r", "kind": "above", "device": "d", "point": "p", "threshold": 1}
    for extra, msg in (({"kind": "sideways"}, "rules.rule[0].kind"),
                       ({"action_device": "plc"}, "go together"),
                       ({"action_device": "plc", "action_point": "x", "action_value": "nope"}, "action_value"),
                       ({"local_topic": "a/#"}, "local_topic")):
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            from_dict({"rules": {"rule": [{**base, **extra}]}})
