"""The agent, whole, end to end: the daemon with the shipped model, a real asyncua PLC, the command channel over
Mosquitto with TLS. A conditional plan writes the PLC only in the state where its condition holds, only once
confirmed (by "yes" in the same conversation or by its token), and the condition is read again at confirmation."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from conftest import wait_for
from edge_agent.devkit.brokers import free_port
from test_commands import CommandClient
from test_opcua import FAST, NODES, Plc, _read

SETPOINT = "2:PLC/2:Setpoint"
ROOT = Path(__file__).resolve().parents[1]


def test_a_confirmed_conditional_plan_writes_the_plc_only_where_its_condition_holds(local_broker, cloud_broker,
                                                                                     make_agent, pki):
    plc = Plc(free_port()).start()
    try:
        agent = make_agent(local_broker, cloud_broker, commands={"allow": ["read-only", "write", "confirm"]},
                           southbound__opcua={"enabled": True, "servers": [
                               {"device": "plc-1", "endpoint": plc.endpoint, **FAST, "nodes": NODES}]}).start()
        agent.wait_ready()
        wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 10, what="uplink")
        cli = CommandClient(cloud_broker, pki, "5")
        setpoint = lambda: asyncio.run(_read(plc.endpoint, SETPOINT))  # noqa: E731
        try:
            wait_for(lambda: cli.call("status")["result"]["model"]["loaded"], 20, what="model")
            wait_for(lambda: cli.call("query", {"device": "plc-1", "point": "setpoint", "agg": "last",
                                                "window_s": 60}).get("result", {}).get("value") == 50, 20,
                     what="the setpoint in the store")
            # the condition does not hold: nothing to do, the reply shows the evidence, the PLC is untouched
            r = cli.call("ask", {"text": "if plc-1 temperature is above 1000, set plc-1 setpoint to 43",
                                 "conversation": "c1"}, timeout=20)["result"]
            assert r["outcome"] == "done" and "nothing to do" in r["answer"] and "> 1000 does not hold" in r["answer"]
            assert setpoint() == 50
            # it holds: one confirmation listing the write with its evidence; nothing written until "yes"
            r = cli.call("ask", {"text": "if plc-1 temperature is above -50, set plc-1 setpoint to 42",
                                 "conversation": "c1"}, timeout=20)["result"]
            assert r["outcome"] == "confirm" and "plc-1.setpoint 50 → 42 (plc-1 temperature" in r["answer"], r
            assert setpoint() == 50
            other = cli.call("ask", {"text": "yes", "conversation": "c2"})["result"]  # another conversation
            assert other["outcome"] == "clarify" and setpoint() == 50
            yes = cli.call("ask", {"text": "yes", "conversation": "c1"}, timeout=20)["result"]
            assert yes["resolved"] == {"confirm": True} and yes["outcome"] == "done", yes
            assert setpoint() == 42
            # proposed while it holds, flipped before the confirmation: read again, not written
            wait_for(lambda: cli.call("query", {"device": "plc-1", "point": "setpoint", "agg": "last",
                                                "window_s": 60})["result"]["value"] == 42, 20, what="42 stored")
            r = cli.call("ask", {"text": "if plc-1 setpoint is below 50, set plc-1 setpoint to 30"},
                         timeout=20)["result"]
            assert r["outcome"] == "confirm", r
            assert cli.call("write", {"device": "plc-1", "point": "setpoint", "value": 70})["ok"]
            wait_for(lambda: cli.call("query", {"device": "plc-1", "point": "setpoint", "agg": "last",
                                                "window_s": 60})["result"]["value"] == 70, 20, what="70 stored")
            done = cli.call("confirm", {"token": r["confirm"]["token"]}, timeout=20)["result"]
            assert done["result"]["ran"] == [] and "no longer holds" in done["answer"], done
            assert setpoint() == 70
            # edge-agent chat: one conversation through the control socket (a line in, the reply out)
            chat = subprocess.run([sys.executable, "-m", "edge_agent", "chat", "--config", str(agent.config_path)],
                                  input="what is the setpoint of plc-1 right now\nyes\n", capture_output=True,
                                  text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
            lines = chat.stdout.splitlines()
            assert chat.returncode == 0 and lines[0] == "plc-1 setpoint is 70.0", chat
            assert lines[1] == "nothing is waiting for your confirmation" and setpoint() == 70
        finally:
            cli.close()
        log = agent.log()
        assert 'msg="ask plan proposed"' in log and 'msg="ask plan run"' in log
        assert agent.stop() == 0
    finally:
        plc.kill()


def test_fan_out_rule_in_words_two_operators_and_a_failed_dry_run(local_broker, cloud_broker, make_agent, pki):
    """Two PLCs: a fan-out lists both writes and writes both once confirmed; a rule proposed in words, confirmed, is
    added and fires (its action writes the second PLC); two operators' follow-ups never cross; a plan whose dry-run
    fails (an unknown device in its second step) writes nothing, not even its first step."""
    plcs = [Plc(free_port()).start(), Plc(free_port()).start()]
    try:
        servers = [{"device": f"plc-{i + 1}", "endpoint": p.endpoint, **FAST, "nodes": NODES}
                   for i, p in enumerate(plcs)]
        agent = make_agent(local_broker, cloud_broker,
                           commands={"allow": ["read-only", "write", "confirm", "rules.add"]},
                           southbound__opcua={"enabled": True, "servers": servers}).start()
        agent.wait_ready()
        wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 10, what="uplink")
        cli = CommandClient(cloud_broker, pki, "5")
        sp = lambda i: asyncio.run(_read(plcs[i].endpoint, SETPOINT))  # noqa: E731

        def ask(text: str, conv: str) -> dict:
            return cli.call("ask", {"text": text, "conversation": conv}, timeout=20)["result"]
        try:
            wait_for(lambda: cli.call("status")["result"]["model"]["loaded"], 20, what="model")
            for d in ("plc-1", "plc-2"):
                wait_for(lambda: cli.call("query", {"device": d, "point": "setpoint", "agg": "last",
                                                    "window_s": 60}).get("result", {}).get("value") == 50, 20,
                         what=f"{d}'s setpoint in the store")
            # a plan whose second step names a device the gateway does not have: nothing runs, the reply says why
            r = ask("set plc-1 setpoint to 44 and set plc-9 setpoint to 44", "a")
            assert r["outcome"] == "clarify" and "plc-9" in r["answer"], r
            assert (sp(0), sp(1)) == (50, 50)
            # a fan-out over both PLCs: one confirmation that lists both writes; both written once confirmed
            r = ask("set the setpoint of all plcs to 45", "a")
            assert r["outcome"] == "confirm", r
            assert "plc-1.setpoint 50 → 45" in r["answer"] and "plc-2.setpoint 50 → 45" in r["answer"], r
            assert (sp(0), sp(1)) == (50, 50)
            assert ask("yes", "a")["outcome"] == "done"
            assert (sp(0), sp(1)) == (45, 45)
            # two operators' follow-ups never cross
            assert "plc-1" in ask("what is the setpoint of plc-1 right now", "op-a")["answer"]
            assert "plc-2" in ask("what is the setpoint of plc-2 right now", "op-b")["answer"]
            a, b = ask("and the temperature?", "op-a"), ask("and the temperature?", "op-b")
            assert "plc-1 temperature" in a["answer"] and "plc-2 temperature" in b["answer"], (a, b)
            # a standing condition becomes a rule proposal; confirmed, the rule is added and its action fires
            r = ask("whenever plc-1 temperature is above -50, set plc-2 setpoint to 41", "a")
            assert r["outcome"] == "confirm" and r["resolved"]["tool"] == "add_rule", r
            assert not cli.call("rules.list")["result"]
            assert ask("yes", "a")["outcome"] == "done"
            assert [x["device"] for x in cli.call("rules.list")["result"]] == ["plc-1"]
            wait_for(lambda: sp(1) == 41, 20, what="the rule's action on plc-2")
            assert sp(0) == 45
        finally:
            cli.close()
        assert agent.stop() == 0
    finally:
        for p in plcs:
            p.kill()
