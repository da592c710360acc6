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
