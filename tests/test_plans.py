"""The task orchestrator: plans are validated strictly, dry-run whole before anything runs, confirmed once, re-checked
at confirmation, run in order and stopped at the first failure; standing conditions become rule proposals run as
rules.add. The model is replaced by a fixed table (clause -> call), so each test says exactly what the engine
proposed; the composer, the checks and the execution are the real ones."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest

from edge_agent import ops
from edge_agent.config import AskConfig, CommandsConfig
from edge_agent.metrics import Metrics
from edge_agent.ops import plans
from edge_agent.ops.memory import Memory
from edge_agent.records import WriteRefused

Q = lambda d, p, agg="last", w=60: {"tool": "query_stats", "args": {"device": d, "point": p, "agg": agg, "window_s": w}}  # noqa: E731
W = lambda d, p, v: {"tool": "write_point", "args": {"device": d, "point": p, "value": v}}  # noqa: E731


class World:
    """Devices, their points and values; reads answer the value now; a write to a device in `refuse` fails as the
    adapter's allow-list would; `calls` is what the engine was asked (clause -> the call it answers)."""

    def __init__(self, values: dict, calls: dict | None = None, refuse=()) -> None:
        self.values = {d: dict(p) for d, p in values.items()}
        self.calls = calls or {}
        self.refuse = set(refuse)
        self.writes: list[tuple] = []
        self.rules: list[dict] = []
        self.asked: list[str] = []

    async def devices(self):
        return [{"device": d, "points": [{"point": p} for p in ps]} for d, ps in self.values.items()]

    async def query(self, device, point, agg, window_s, max_rows):
        if point not in self.values.get(device, {}):
            raise LookupError(f"no point {point!r} on device {device!r}")
        return {"device": device, "point": point, "agg": agg, "window_s": window_s, "value": self.values[device][point]}

    async def write(self, device, point, value):
        if device in self.refuse:
            raise WriteRefused(f"{device} is not writable here")
        self.writes.append((device, point, value))
        self.values[device][point] = value

    async def rules_add(self, doc):
        self.rules.append(doc)
        return {**doc, "hysteresis": 0.0}

    async def ask(self, text, known):
        self.asked.append(text)
        if text not in self.calls:
            return {"call": {"tool": "clarify", "args": {"reason": "nothing"}}, "model": "table"}
        return {"call": self.calls[text], "model": "table", "provider": "none", "timings": {}}


def router(world: World, writes="confirm", allow=("read-only", "write", "confirm", "rules.add"), clock=None):
    m = Metrics()

    async def alerts(device, n):
        return {"firing": [], "cleared": []}
    pending = ops.PendingWrites(AskConfig(writes=writes, confirm_ttl_s=30), m.ask_outcomes.labels("dropped"))
    memory = Memory(300, 8, lambda e: m.agent_events.labels(e).inc())
    if clock is not None:
        pending.clock = memory.clock = clock
    gw = ops.Gateway(status=dict, devices=world.devices, query_stats=world.query, write_point=world.write,
                     config=dict, log_lines=list, rules_list=list, rules_add=world.rules_add, rules_remove=None,
                     alerts=alerts, ask=world.ask, pending=pending, memory=memory)
    return ops.Router(CommandsConfig(allow=list(allow)), ops.TABLE, gw, m, gateway_id="gw-test")


async def call(r: ops.Router, name: str, body: dict, who="mqtt") -> dict:
    return json.loads((await r.handle(name, json.dumps(body).encode(), who))[0])


def run(coro):
    return asyncio.run(coro)


# ---- validation: any plan, from anywhere ----

def _steps(n):
    return {"plan": [Q("pump-1", "temperature")] * n}


@pytest.mark.parametrize("doc,reason,words", [
    (_steps(5), "too_complex", "5 steps"),
    (_steps(1), "nothing", "at least 2"),
    ({"plan": [Q("pump-1", "temperature"), {**W("pump-1", "enabled", False), "when": {"step": 2, "op": ">", "value": 1}}]},
     "nothing", "backwards"),                                                                    # a reference to itself
    ({"plan": [{**W("pump-1", "enabled", False), "when": {"step": 2, "op": ">", "value": 1}}, Q("pump-1", "temperature")]},
     "nothing", "backwards"),                                                                    # forward
    ({"plan": [Q("pump-1", "temperature"), {**W("pump-1", "enabled", False), "when": {"step": 0, "op": ">", "value": 1}}]},
     "nothing", "backwards"),
    ({"plan": [Q("pump-1", "temperature"), {**W("pump-1", "enabled", False), "when": {"step": True, "op": ">", "value": 1}}]},
     "nothing", "backwards"),                                                                    # a bool is no index
    ({"plan": [Q("pump-1", "temperature"), {"tool": "rules.remove", "args": {"rule_id": "x"}}]}, "nothing",
     "not a tool a plan may use"),
    ({"plan": [Q("pump-1", "temperature"), {"tool": "clarify", "args": {"reason": "nothing"}}]}, "nothing",
     "not a tool"),
    ({"plan": [Q("pump-1", "temperature"), {**W("pump-1", "enabled", False), "when": {"step": 1, "op": "~", "value": 1}}]},
     "nothing", "op is one of"),
    ({"plan": [Q("pump-1", "temperature"), {**W("pump-1", "enabled", False), "when": {"step": 1, "op": ">",
                                                                                       "value": float("nan")}}]},
     "nothing", "finite"),
    ({"plan": [Q("pump-1", "temperature"), {**W("pump-1", "enabled", False), "when": {"step": 1, "op": ">",
                                                                                       "value": "80"}}]},
     "nothing", "finite"),
    ({"plan": [Q("pump-1", "temperature"), {**W("pump-1", "enabled", False), "when": {"step": 1, "op": ">", "value": 1},
                                            "then": "rm -rf"}]}, "nothing", "optionally"),
    ({"plan": [{"tool": "list_devices", "args": {"filter": "pump"}},
               {**W("x", "enabled", False), "when": {"step": 1, "op": ">", "value": 1}}]}, "nothing", "query_stats"),
    ({"plan": [Q("pump-1", "temperature"), {"tool": "write_point", "args": {"device": {"each": 1}, "point": "enabled",
                                                                            "value": False}}]},
     "nothing", "list_devices"),                                                             # fan-out over a read
    ({"plan": [{"tool": "list_devices", "args": {"filter": "pump"}},
               {"tool": "write_point", "args": {"device": {"each": 2}, "point": "enabled", "value": False}}]},
     "nothing", "fan-out"),                                                                  # fan-out over itself
    ({"plan": [Q("pump-1", "temperature"), {**Q("pump-1", "temperature"), "when": {"step": 1, "op": ">", "value": 1}},
               {**W("pump-1", "enabled", False), "when": {"step": 2, "op": ">", "value": 1}}]}, "too_complex",
     "condition on a conditional"),
    ({"plan": [Q("pump-1\u0000; drop", "temperature"), Q("pump-2", "temperature")]}, "nothing", "not a name"),
    ({"plan": [Q("pump-1", "temperature"), W("pump-1", "mode", "<|assistant|>")]}, "nothing", "plain word"),
    ({"plan": [Q("p" * 300, "temperature"), Q("pump-2", "temperature")]}, "nothing", "1..48"),
    ({"plan": [Q("pump-1", "temperature"), {"tool": "write_point", "args": {"device": "pump-1", "point": "enabled"}}]},
     "nothing", "takes exactly"),
    ({"steps": []}, "nothing", "a plan is"),
    ([Q("pump-1", "temperature")], "nothing", "a plan is"),
])
def test_a_plan_that_breaks_the_grammar_is_refused_and_says_why(doc, reason, words):
    with pytest.raises(plans.PlanRefused) as e:
        plans.validate(doc, plans.toolset(ops.BY_TOOL))
    assert e.value.reason == reason and words in e.value.words(), e.value.words()


def test_a_good_plan_passes_validation():
    doc = {"plan": [{"tool": "list_devices", "args": {"filter": "pump"}}, Q("tank-4", "level"),
                    {"tool": "write_point", "args": {"device": {"each": 1}, "point": "enabled", "value": False},
                     "when": {"step": 2, "op": ">=", "value": 90}}]}
    assert len(plans.validate(doc, plans.toolset(ops.BY_TOOL))) == 3


# ---- the whole path: the composer, the dry-run, one confirmation ----

PUMPS = {"pump-3": {"temperature": 85.2, "enabled": True}, "pump-4": {"temperature": 60.0, "enabled": True},
         "valve-3": {"enabled": True}, "tank-4": {"level": 72.0}}
STOP3 = {"stop pump-3": W("pump-3", "enabled", False), "stop pump-4": W("pump-4", "enabled", False),
         "close valve-3": W("valve-3", "enabled", False)}


def test_a_conditional_plan_lists_its_write_with_evidence_and_writes_only_once_confirmed():
    world = World(PUMPS, STOP3)

    async def main():
        r = ops_router = router(world)
        a = (await call(r, "ask", {"text": "if pump-3 temperature is above 80, stop it"}))["result"]
        assert a["resolved"] == {"plan": [Q("pump-3", "temperature"), {**W("pump-3", "enabled", False),
                                                                       "when": {"step": 1, "op": ">", "value": 80}}]}
        assert a["outcome"] == "confirm" and world.writes == []
        assert "pump-3.enabled on → off (pump-3 temperature 85.2 > 80)" in a["answer"]
        assert world.asked == ["stop pump-3"]  # the model saw the action clause, the pronoun resolved
        done = (await call(ops_router, "confirm", {"token": a["confirm"]["token"]}))["result"]
        assert done["outcome"] == "done" and world.writes == [("pump-3", "enabled", False)]
        assert done["result"]["ran"] == [{"device": "pump-3", "point": "enabled", "value": False, "old": True}]
    run(main())


def test_a_condition_that_does_not_hold_is_nothing_to_do_with_the_evidence():
    world = World(PUMPS, STOP3)
    r = run(call(router(world), "ask", {"text": "if pump-4 temperature is above 80, stop it"}))["result"]
    assert r["outcome"] == "done" and world.writes == []
    assert "nothing to do" in r["answer"] and "pump-4 temperature 60 > 80 does not hold" in r["answer"]


def test_at_confirmation_the_condition_is_read_again_and_a_flipped_one_writes_nothing():
    world = World(PUMPS, STOP3)

    async def main():
        r = router(world)
        a = (await call(r, "ask", {"text": "if pump-3 temperature is above 80, stop pump-3 and close valve-3"}))
        a = a["result"]
        assert a["outcome"] == "confirm" and len(a["confirm"]["writes"]) == 2
        world.values["pump-3"]["temperature"] = 75.0  # it cooled down meanwhile
        done = (await call(r, "confirm", {"token": a["confirm"]["token"]}))["result"]
        assert world.writes == [] and done["result"]["ran"] == []
        assert "pump-3 temperature 75 > 80 no longer holds" in done["answer"]
        assert r.metrics.value("edge_agent_agent_events_total", {"event": "recheck_failed"}) == 2
    run(main())


def test_writes_stop_at_the_first_failure_and_the_reply_says_partial():
    world = World({"pump-3": {"enabled": True}, "pump-4": {"enabled": True}, "valve-3": {"enabled": True}},
                  {**STOP3, "stop valve-3": W("valve-3", "enabled", False)}, refuse={"pump-4"})

    async def main():
        r = router(world)
        a = (await call(r, "ask", {"text": "stop pump-3, pump-4 and valve-3"}))["result"]
        assert [w["device"] for w in a["confirm"]["writes"]] == ["pump-3", "pump-4", "valve-3"]
        done = (await call(r, "confirm", {"token": a["confirm"]["token"]}))["result"]
        assert done["outcome"] == "partial" and world.writes == [("pump-3", "enabled", False)]
        assert "stopped: pump-4.enabled failed" in done["answer"] and "1 later write not run" in done["answer"]
        assert world.values["valve-3"]["enabled"] is True
    run(main())


def test_a_failed_dry_run_runs_nothing_and_names_the_step():
    world = World(PUMPS, {"stop pump-3": W("pump-3", "enabled", False), "stop pump-9": W("pump-9", "enabled", False)})
    r = run(call(router(world, writes="direct"), "ask", {"text": "stop pump-3 and pump-9"}))["result"]
    assert r["outcome"] == "clarify" and r["reason"] == "which_device" and r["answer"].startswith("step 2: no device")
    assert world.writes == []  # pump-3's write, step 1, did not run either


def test_the_guard_reads_each_steps_own_words():
    """"read pump-3's temperature and don't stop it": the negated step is void; a write the model slips in for a
    clause that asks none is refused by the guard on that clause's words."""
    world = World(PUMPS, {"read pump-3's temperature": Q("pump-3", "temperature"),
                          "what is pump-4's temperature": W("pump-4", "enabled", False)})

    async def main():
        r = router(world, writes="direct")
        a = (await call(r, "ask", {"text": "read pump-3's temperature but don't stop it"}))["result"]
        assert a["resolved"] == Q("pump-3", "temperature") and a["outcome"] == "done"
        b = (await call(r, "ask", {"text": "read pump-3's temperature and what is pump-4's temperature"}))["result"]
        assert b["outcome"] == "clarify" and b["answer"].startswith("step 2:")
        assert world.writes == []
    run(main())


def test_a_fan_out_over_the_cap_is_too_complex_and_under_it_lists_every_write():
    many = {f"pump-{i}": {"enabled": True} for i in range(1, 10)}
    world = World(many, {"stop zz-0": W("zz-0", "enabled", False)})

    async def main():
        r = router(world)
        a = (await call(r, "ask", {"text": "stop all pumps"}))["result"]
        assert a["outcome"] == "clarify" and a["reason"] == "too_complex" and "9 devices" in a["answer"]
        del world.values["pump-9"]
        b = (await call(r, "ask", {"text": "stop all pumps"}))["result"]
        assert b["resolved"]["plan"][1]["args"]["device"] == {"each": 1}
        assert len(b["confirm"]["writes"]) == 8 and world.writes == []
        await call(r, "confirm", {"token": b["confirm"]["token"]})
        assert len(world.writes) == 8
    run(main())


def test_a_comparison_is_written_by_code():
    world = World({"pump-1": {"temperature": 70.5}, "pump-2": {"temperature": 64.0}})
    r = run(call(router(world), "ask", {"text": "compare the temperature of pump-1 and pump-2 over the last hour"}))
    r = r["result"]
    assert r["resolved"]["plan"] == [Q("pump-1", "temperature", "avg", 3600), Q("pump-2", "temperature", "avg", 3600)]
    assert r["answer"] == "temperature (avg): pump-1 70.5 is higher than pump-2 64 by 6.5" and world.asked == []


def test_beyond_the_grammar_is_too_complex():
    world = World(PUMPS, STOP3)
    for text in ("stop pump-3 every minute", "stop pump-3, pump-4, valve-3, tank-4 and pump-5"):
        r = run(call(router(world), "ask", {"text": text}))["result"]
        assert r["outcome"] == "clarify" and r["reason"] == "too_complex", (text, r)
    assert world.writes == []


def test_a_plan_is_audited_with_its_id_hash_who_and_confirmation(caplog):
    world = World(PUMPS, STOP3)

    async def main():
        r = router(world)
        a = (await call(r, "ask", {"text": "if pump-3 temperature is above 80, stop it"}))["result"]
        await call(r, "confirm", {"token": a["confirm"]["token"]})
        return a
    with caplog.at_level(logging.INFO, logger="edge_agent.audit"):
        a = run(main())
    recs = [x for x in caplog.records if x.name == "edge_agent.audit" and x.getMessage().startswith("ask plan")]
    assert [x.getMessage() for x in recs] == ["ask plan proposed", "ask plan run"]
    assert {x.plan for x in recs} == {a["plan_id"]} and {x.sha256 for x in recs} == {a["sha256"]}
    assert a["sha256"] == plans.plan_hash(a["resolved"]) and recs[1].confirmed is True and recs[0].who == "mqtt"


# ---- standing conditions: rule proposals ----

def test_a_standing_condition_becomes_a_rule_that_runs_only_once_confirmed_as_rules_add():
    world = World(PUMPS, STOP3)

    async def main():
        r = router(world)
        a = (await call(r, "ask", {"text": "close valve-3 whenever tank-4 level is above 95"}))["result"]
        assert a["resolved"] == {"tool": "add_rule", "args": {
            "kind": "above", "device": "tank-4", "point": "level", "threshold": 95, "action_device": "valve-3",
            "action_point": "enabled", "action_value": "false"}}
        assert a["outcome"] == "confirm" and world.rules == []
        done = (await call(r, "confirm", {"token": a["confirm"]["token"]}))
        assert done["ok"] and world.rules == [{**a["resolved"]["args"], "id": "ask-tank-4-level-above"}]
        alert = (await call(r, "ask", {"text": "alert me when tank-4 level goes above 90"}))["result"]
        assert alert["resolved"]["args"] == {"kind": "above", "device": "tank-4", "point": "level", "threshold": 90}
        # a rule needs what rules.add needs: not allowed here -> refused, nothing added
        strict = router(world, allow=("read-only", "write", "confirm"))
        no = await call(strict, "ask", {"text": "alert me when tank-4 level goes above 90"})
        assert no["error"]["code"] == "forbidden" and len(world.rules) == 1
    run(main())


def test_a_rule_whose_action_the_words_do_not_state_is_asked_back():
    world = World(PUMPS, {"set valve-3 pump-3": W("valve-3", "enabled", True)})
    r = run(call(router(world), "ask", {"text": "whenever pump-3 temperature is above 80, set valve-3"}))["result"]
    assert r["outcome"] == "clarify" and world.rules == []


def test_a_request_whose_order_depends_on_words_the_cutter_does_not_parse_is_never_cut():
    """"unless chiller-1 is running, turn off compressor-5": cut at the comma, the write would lose the words that
    govern it. Such a request goes whole to the model and the guard (here: the model proposes the write; the
    guard refuses it on the whole text)."""
    world = World({"chiller-1": {"enabled": True}, "compressor-5": {"enabled": True}},
                  {"unless chiller-1 is running, turn off compressor-5": W("compressor-5", "enabled", False),
                   "turn off compressor-5": W("compressor-5", "enabled", False)})
    r = run(call(router(world, writes="direct"), "ask", {"text": "unless chiller-1 is running, turn off compressor-5"}))
    assert r["result"]["outcome"] == "clarify" and world.writes == []
    assert world.asked == ["unless chiller-1 is running, turn off compressor-5"]


def test_a_second_thing_not_named_by_its_id_is_asked_back_not_dropped():
    """"stop pump-3 and the mixer": proposing pump-3 alone would do half of what was asked."""
    world = World(PUMPS, STOP3)
    r = run(call(router(world), "ask", {"text": "stop pump-3 and the mixer"}))["result"]
    assert r["resolved"] == {"tool": "clarify", "args": {"reason": "which_device"}} and world.writes == []


HOSTILE = ["if", "if if if if", "whenever", "alert me when", "compare", "and", "and and and and and", ", , , ;;;",
           "if pump-3 temperature is above", "if pump-3 temperature is above 80,", "if 80 > 70 then stop it",
           "stop all", "stop all all all", "set it back set it back", "undo undo", "no, ", "make that",
           "if pump-3 temperature is above 1e999, stop it", "if pump-3 temperature is above -0, stop pump-3",
           "alert me when tank-4 level goes above 90 and below 10", "whenever tank-4 level rises by 5 stop pump-3",
           "if pump-3 temperature is above 80 and pump-4 temperature is above 70, stop pump-3",
           "stop pump-3 if if pump-4 temperature is above 3", "compare pump-3 and pump-4 and pump-5 and tank-4",
           "what about", "and pump-99?", "the minimum?", "its", "it", "them", "(((((((", "\\d+*?", "ünïcödé pump-3 ☃",
           "stop pump-3 " * 20, "if " + "pump-3 " * 30 + "is above 5 stop it"]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_words_are_an_answer_never_an_internal_error_nor_a_write(text):
    world = World(PUMPS, STOP3)

    async def main():
        r = router(world, writes="direct")
        for t in (text, "yes", text):
            reply = await call(r, "ask", {"text": t[:256]})
            assert reply["ok"] or reply["error"]["code"] in ("bad_request", "forbidden"), (t, reply)
    run(main())
    assert set(world.writes) <= {("pump-3", "enabled", False)}  # only a stated "stop pump-3" may write


def test_a_question_that_governs_an_order_is_a_condition_never_an_unconditional_write():
    """"pump-4 temperature equals 60? then stop pump-4" cut at its clauses was a read and an unconditional write."""
    world = World(PUMPS, STOP3)

    async def main():
        r = router(world)
        a = (await call(r, "ask", {"text": "pump-4 temperature equals 61? then stop pump-4"}))["result"]
        assert a["resolved"]["plan"][1]["when"] == {"step": 1, "op": "==", "value": 61}
        assert a["outcome"] == "done" and "does not hold" in a["answer"] and world.writes == []
    run(main())


def test_one_write_for_words_that_name_two_devices_is_asked_back():
    """The model wrote one device of "switch off pump-3 and pump-4" when the cutter did not see the order."""
    world = World(PUMPS, {"switch off pump-3 & pump-4": W("pump-4", "enabled", False),
                          "switch off pump-3 with pump-4": W("pump-4", "enabled", False)})
    r = run(call(router(world), "ask", {"text": "switch off pump-3 & pump-4"}))["result"]
    # "&" now cuts the clauses: both writes, each read from its own words, or the request asked back; never one
    assert r["resolved"] in ({"plan": [W("pump-3", "enabled", False), W("pump-4", "enabled", False)]},
                             {"tool": "clarify", "args": {"reason": "which_device"}}) and world.writes == []
    r = run(call(router(world), "ask", {"text": "switch off pump-3 with pump-4"}))["result"]
    assert r["resolved"] == {"tool": "clarify", "args": {"reason": "which_device"}} and world.writes == []


# ---- several reads in one request (devices or points), one aggregate and window for all ----

GRAIN = {"hopper-3": {"moisture": 11.0, "level": 40.0}, "hopper-4": {"moisture": 12.5, "level": 55.0},
         "hopper-5": {"moisture": 10.0, "level": 60.0}, "hopper-6": {"moisture": 9.0, "level": 20.0},
         "hopper-7": {"moisture": 9.5, "level": 25.0}, "cooler-2": {"temperature": 4.0, "humidity": 61.0}}


@pytest.mark.parametrize("text,model,want", [
    # several devices: the model answers the first device alone, code copies the read to each
    ("hopper-3 and hopper-4 moisture at the moment?", {"hopper-3 moisture at the moment?": Q("hopper-3", "moisture")},
     [Q("hopper-3", "moisture"), Q("hopper-4", "moisture")]),
    # the window and the aggregate the words state apply to every read (the model's own choice is overruled)
    ("mean moisture for hopper-3, hopper-4 during the past 20 minutes",
     {"mean moisture for hopper-3 during the past 20 minutes": Q("hopper-3", "moisture", "avg", 3600)},
     [Q("hopper-3", "moisture", "avg", 1200), Q("hopper-4", "moisture", "avg", 1200)]),
    ("lowest level of hopper-3 and hopper-4 over the last three hours",
     {"lowest level of hopper-3 over the last three hours": Q("hopper-3", "level", "min", 3600)},
     [Q("hopper-3", "level", "min", 10800), Q("hopper-4", "level", "min", 10800)]),
    # several points of one device
    ("cooler-2 humidity and temperature currently", {"cooler-2 humidity and temperature currently":
                                                     Q("cooler-2", "humidity")},
     [Q("cooler-2", "humidity"), Q("cooler-2", "temperature")]),
    # each device its own point
    ("cooler-2 humidity + hopper-3 level, right now", {}, None),
    # "compare", misspelt, without a window: avg over the hour
    ("comapre the level of hopper-3 and hopper-4", {"comapre the level of hopper-3": Q("hopper-3", "level")},
     [Q("hopper-3", "level", "avg", 3600), Q("hopper-4", "level", "avg", 3600)]),
])
def test_several_reads_named_at_once_are_a_plan_of_reads(text, model, want):
    world = World(GRAIN, model)
    if want is None:
        model[text.replace(" + hopper-3 level", "")] = Q("cooler-2", "humidity")
        world = World(GRAIN, model)
        want = [Q("cooler-2", "humidity"), Q("hopper-3", "level")]
    r = run(call(router(world), "ask", {"text": text}))["result"]
    assert r["resolved"] == {"plan": want} and world.writes == [], (text, r)


def test_five_reads_or_more_are_too_complex():
    world = World(GRAIN, {"moisture of hopper-3 now": Q("hopper-3", "moisture")})
    r = run(call(router(world), "ask", {"text": "moisture of hopper-3 hopper-4 hopper-5 hopper-6 hopper-7 now"}))
    assert r["result"]["resolved"] == {"tool": "clarify", "args": {"reason": "too_complex"}}


# ---- conditions "is at least" / "is at most"; writes the words state plainly; ids without a digit ----

def test_is_at_least_and_is_at_most_are_one_comparison_not_two():
    world = World({"kettle-9": {"pressure": 7.0, "enabled": True}},
                  {"turn kettle-9 off": W("kettle-9", "enabled", False)})
    for text, op, value in (("if kettle-9 pressure is at least seven turn it off", ">=", 7),
                            ("if kettle-9 pressure is at most 8 turn it off", "<=", 8)):
        r = run(call(router(world), "ask", {"text": text}))["result"]
        assert r["resolved"]["plan"][1]["when"] == {"step": 1, "op": op, "value": value}, (text, r)
    assert world.writes == []


@pytest.mark.parametrize("text,model,want", [
    # the model chose a point the words do not name: the words win
    ("set kettle-9 stage to 4", W("kettle-9", "temperature", 4), W("kettle-9", "stage", 4)),
    # the model gave up on a plain "mode to X"
    ("set kettle-9 mode to standby", {"tool": "clarify", "args": {"reason": "nothing"}},
     W("kettle-9", "mode", "standby")),
    # an id without a digit, said as it is registered
    ("switch off kettle-b", {"tool": "clarify", "args": {"reason": "nothing"}}, W("kettle-b", "enabled", False)),
])
def test_a_write_the_words_state_plainly_is_read_by_code_where_the_model_misses_it(text, model, want):
    world = World({"kettle-9": {"stage": 1, "temperature": 60.0, "mode": "auto"}, "kettle-b": {"enabled": True}},
                  {text: model})
    r = run(call(router(world), "ask", {"text": text}))["result"]
    assert r["resolved"] == want and r["outcome"] == "confirm" and world.writes == [], (text, r)


@pytest.mark.parametrize("text", ["don't set kettle-9 stage to 4", "set kettle-9 stage", "what if I set kettle-9 stage to 4",
                                  "set kettle-9 stage to 4 or 5"])
def test_code_never_reads_a_write_the_words_do_not_state(text):
    world = World({"kettle-9": {"stage": 1, "temperature": 60.0}},
                  {text: {"tool": "clarify", "args": {"reason": "nothing"}}})
    r = run(call(router(world), "ask", {"text": text}))["result"]
    assert r["outcome"] == "clarify" and world.writes == [], (text, r)


# ---- arrows, questions that state a condition, a plain read then an order, hypotheticals, schedules ----

KILN = {"kiln-8": {"temperature": 1000.0, "speed": 30.0, "enabled": True}, "fan-9": {"enabled": False}}


def test_an_arrow_after_a_condition_is_if_then():
    world = World(KILN, {"start fan-9": W("fan-9", "enabled", True)})
    r = run(call(router(world), "ask", {"text": "kiln-8 temperature at most 1200 => start fan-9"}))["result"]
    assert r["resolved"] == {"plan": [Q("kiln-8", "temperature"), {**W("fan-9", "enabled", True),
                                                                  "when": {"step": 1, "op": "<=", "value": 1200}}]}
    assert world.writes == []


def test_a_question_that_states_a_condition_governs_the_order_after_it_and_a_bare_value_writes_its_point():
    world = World(KILN, {})
    r = run(call(router(world), "ask", {"text": "kiln-8 speed isn't 45 at the moment? set it to 45"}))["result"]
    assert r["resolved"] == {"plan": [Q("kiln-8", "speed"), {**W("kiln-8", "speed", 45),
                                                            "when": {"step": 1, "op": "!=", "value": 45}}]}
    assert r["outcome"] == "confirm" and world.writes == []


def test_a_plain_read_asked_then_an_order_of_its_own_is_a_read_and_the_write():
    world = World(KILN, {"what is kiln-8 speed now": Q("kiln-8", "speed"),
                         "stop fan-9": W("fan-9", "enabled", False)})
    r = run(call(router(world), "ask", {"text": "what is kiln-8 speed now? also stop fan-9"}))["result"]
    assert r["resolved"] == {"plan": [Q("kiln-8", "speed"), W("fan-9", "enabled", False)]} and world.writes == []
    for sep in (" & ", " + ", " n "):
        r = run(call(router(World(KILN, {"what is kiln-8 speed now": Q("kiln-8", "speed"),
                                         "stop fan-9": W("fan-9", "enabled", False)})),
                     "ask", {"text": f"what is kiln-8 speed now{sep}stop fan-9"}))["result"]
        assert r["resolved"] == {"plan": [Q("kiln-8", "speed"), W("fan-9", "enabled", False)]}, (sep, r)


@pytest.mark.parametrize("text", ["suppose I stopped fan-9, what would kiln-8 temperature do?",
                                  "hypothetically, would you start fan-9 if kiln-8 got to 1100?"])
def test_a_hypothetical_that_is_no_read_is_nothing_to_do(text):
    world = World(KILN, {text: W("fan-9", "enabled", True)})
    r = run(call(router(world), "ask", {"text": text}))["result"]
    assert r["resolved"] == {"tool": "clarify", "args": {"reason": "nothing"}} and world.writes == []


def test_a_schedule_said_in_number_words_is_too_complex():
    world = World(KILN, {})
    r = run(call(router(world), "ask", {"text": "toggle fan-9 every five minutes"}))["result"]
    assert r["resolved"] == {"tool": "clarify", "args": {"reason": "too_complex"}}


def test_a_read_of_a_point_the_device_lacks_takes_the_point_the_words_or_registry_leave():
    world = World({"bin-4": {"level": 3.0}}, {"curent level of bin-4": Q("bin-4", "current")})
    r = run(call(router(world), "ask", {"text": "curent level of bin-4"}))["result"]
    assert r["resolved"] == Q("bin-4", "level")


def test_one_order_for_a_run_of_devices_is_one_write_each_from_its_own_sentence():
    world = World({"rtu-5": {"mode": "auto"}, "rtu-6": {"mode": "auto"}, "rtu-7": {"mode": "auto"}},
                  {f"switch rtu-{n} to night mode": W(f"rtu-{n}", "mode", "night") for n in (5, 6, 7)})
    r = run(call(router(world), "ask", {"text": "switch rtu-5, rtu-6 & rtu-7 to night mode"}))["result"]
    assert r["resolved"] == {"plan": [W(f"rtu-{n}", "mode", "night") for n in (5, 6, 7)]} and world.writes == []


def test_leave_it_alone_voids_the_step_it_governs_and_never_borrows_the_previous_verb():
    world = World(PUMPS, {"start pump-3": W("pump-3", "enabled", True), "start pump-4": W("pump-4", "enabled", True)})
    r = run(call(router(world), "ask", {"text": "start pump-3 and stop pump-4... actually no, leave pump-4 alone"}))
    assert r["result"]["resolved"] == W("pump-3", "enabled", True) and world.writes == []


# ---- standing conditions phrased freely; orders on a device not named by its id; a condition without its value ----

SILO = {"bin-7": {"level": 30.0}, "press-3": {"temperature": 80.0, "setpoint": 70.0, "stage": 1},
        "auger-2": {"enabled": True}, "auger-3": {"enabled": True}}


@pytest.mark.parametrize("text,model,want", [
    ("page me whenever bin-7 level drops below 5", {}, {"kind": "below", "device": "bin-7", "point": "level",
                                                        "threshold": 5}),
    ("from now on, if press-3 temperature exceeds 95, set its stage to 2",
     {"set press-3's stage to 2": W("press-3", "temperature", 2)},          # the model's wrong point: the words win
     {"kind": "above", "device": "press-3", "point": "temperature", "threshold": 95, "action_device": "press-3",
      "action_point": "stage", "action_value": "2"}),
    ("warn me if bin-7 has not reported in 20 minutes", {}, {"kind": "nodata", "device": "bin-7", "point": "level",
                                                             "seconds": 1200}),
])
def test_standing_conditions_phrased_freely_are_rule_proposals(text, model, want):
    world = World(SILO, model)
    r = run(call(router(world), "ask", {"text": text}))["result"]
    assert r["resolved"] == {"tool": "add_rule", "args": want} and world.rules == [], (text, r)


@pytest.mark.parametrize("text,reason", [
    ("if bin-7 level is below 10 now, start the auger", "which_device"),   # which auger?
    ("check bin-7 level now and stop the auger", "which_device"),
    ("start auger-2 and set the setpoint to 65", "which_device"),          # whose setpoint?
    ("if press-3 temperature gets too hot stop auger-3", "which_value"),   # too hot is no value
])
def test_an_order_on_a_device_not_named_by_its_id_or_a_condition_without_its_value_is_asked_back(text, reason):
    world = World(SILO, {"start auger-2": W("auger-2", "enabled", True), "stop bin-7": W("bin-7", "level", False),
                         "check bin-7 level now": Q("bin-7", "level"),
                         "start bin-7": W("bin-7", "level", True)})
    r = run(call(router(world), "ask", {"text": text}))["result"]
    assert r["resolved"] == {"tool": "clarify", "args": {"reason": reason}} and world.writes == [], (text, r)


def test_a_name_the_registry_does_not_have_as_a_device_is_not_a_second_read():
    """"max flow_2 @ skid-9 last hour": flow_2 is a point (it has a digit), not a second device to read."""
    world = World({"skid-9": {"flow_2": 3.0}}, {"max flow_2 @ skid-9 last hour": Q("skid-9", "flow_2", "max", 3600)})
    r = run(call(router(world), "ask", {"text": "max flow_2 @ skid-9 last hour"}))["result"]
    assert r["resolved"] == Q("skid-9", "flow_2", "max", 3600)


def test_a_negation_voids_the_bare_devices_that_follow_it():
    world = World(PUMPS, {"pump-4": Q("pump-4", "temperature"), "stop pump-4": W("pump-4", "enabled", False)})
    r = run(call(router(world), "ask", {"text": "never stop pump-3 and pump-4"}))["result"]
    assert r["resolved"] == {"tool": "clarify", "args": {"reason": "nothing"}} and world.writes == []


def test_a_fan_out_over_a_slipped_kind_word_or_a_slipped_every():
    devices = {f"damper-{n}": {"enabled": True} for n in range(1, 4)}
    world = World(devices, {"shut zz-0": W("zz-0", "enabled", False), "turn zz-0 on": W("zz-0", "enabled", True)})
    r = run(call(router(world), "ask", {"text": "shut all dapmers"}))["result"]
    assert r["resolved"]["plan"][0] == {"tool": "list_devices", "args": {"filter": "damper"}}
    r = run(call(router(world), "ask", {"text": "turn evry damper on"}))["result"]
    assert r["resolved"]["plan"][0] == {"tool": "list_devices", "args": {"filter": "damper"}} and world.writes == []


def test_an_elided_order_takes_its_own_values_never_the_previous_clauses():
    world = World({"kiln-a": {"stage": 1}, "kiln-c": {"stage": 1}}, {})
    r = run(call(router(world), "ask", {"text": "kiln-a to stage 4, kiln-c stage 5 please"}))["result"]
    assert r["resolved"] == {"plan": [W("kiln-a", "stage", 4), W("kiln-c", "stage", 5)]} and world.writes == []
    r = run(call(router(world), "ask", {"text": "kiln-a to stage 4, kiln-c 5"}))["result"]
    assert r["resolved"]["tool"] == "clarify" and world.writes == []   # kiln-c's 5 of what? asked, never stage 4


def test_a_yes_no_question_before_an_order_never_makes_it_unconditional():
    """"is press-3 hot? stop auger-2": the question may govern the order; it is never cut into a read and a write.
    "what's bin-7 level now? then stop auger-2": a read asked for, then an order of its own: both."""
    world = World(SILO, {"stop auger-2": W("auger-2", "enabled", False), "what's bin-7 level now": Q("bin-7", "level"),
                         "is press-3 hot? then stop auger-2": W("auger-2", "enabled", False),
                         "is press-3 hot? stop auger-2": W("auger-2", "enabled", False)})
    for text in ("is press-3 hot? then stop auger-2", "is press-3 hot? stop auger-2"):
        r = run(call(router(world), "ask", {"text": text}))["result"]
        assert not any(s.get("tool") == "write_point" and "when" not in s
                       for s in r["resolved"].get("plan", [r["resolved"]])), (text, r)
    r = run(call(router(world), "ask", {"text": "what's bin-7 level now? then stop auger-2"}))["result"]
    assert r["resolved"] == {"plan": [Q("bin-7", "level"), W("auger-2", "enabled", False)]}
    assert world.writes == []


def test_not_equal_to_is_one_comparison_and_two_conditions_stay_too_complex():
    world = World(SILO, {"set press-3 setpoint to 72": W("press-3", "setpoint", 72)})
    r = run(call(router(world), "ask", {"text": "if press-3 stage is not equal to 2 then set press-3 setpoint to 72"}))
    assert r["result"]["resolved"]["plan"][1]["when"] == {"step": 1, "op": "!=", "value": 2}
    r = run(call(router(world), "ask", {"text": "if press-3 stage is over 2 and its temperature is above 90 stop "
                                                "auger-2"}))
    assert r["result"]["resolved"] == {"tool": "clarify", "args": {"reason": "too_complex"}}


def test_which_is_hotter_compares_and_how_cold_is_the_minimum():
    world = World(SILO | {"press-4": {"temperature": 70.0}}, {"how cold did press-3 get today":
                                                             Q("press-3", "temperature", "last", 86400)})
    r = run(call(router(world), "ask", {"text": "which is hotter, press-3 or press-4?"}))["result"]
    assert r["resolved"] == {"plan": [Q("press-3", "temperature", "avg", 3600), Q("press-4", "temperature", "avg", 3600)]}
    r = run(call(router(world), "ask", {"text": "how cold did press-3 get today"}))["result"]
    assert r["resolved"] == Q("press-3", "temperature", "min", 86400)


@pytest.mark.parametrize("text,model", [
    ("raise press-3 setpoint by 5", W("press-3", "setpoint", 5)),             # a change by an amount
    ("make press-3 setpoint 10 degrees hotter", W("press-3", "setpoint", 10)),
    ("bump press-3 setpoint up 3", W("press-3", "setpoint", 3)),
    ("set press-3 setpoint to 70 or 72", W("press-3", "setpoint", 72)),       # two values
    ("set press-3, press-4 setpoints to 61 and 62", W("press-3", "setpoint", 62)),
])
def test_a_write_whose_words_state_no_single_value_is_asked_back(text, model):
    world = World(SILO | {"press-4": {"setpoint": 60.0}}, {text: model, text.replace(", press-4", ""): model})
    r = run(call(router(world), "ask", {"text": text}))["result"]
    assert r["resolved"]["tool"] == "clarify" and world.writes == [], (text, r)


def test_a_condition_with_two_thresholds_is_too_complex():
    world = World(SILO, {"stop auger-2": W("auger-2", "enabled", False)})
    r = run(call(router(world), "ask", {"text": "if press-3 temperature is between 60 and 80 stop auger-2"}))["result"]
    assert r["resolved"] == {"tool": "clarify", "args": {"reason": "too_complex"}}


def test_reads_of_several_points_of_several_devices_and_a_window_each():
    world = World(GRAIN, {"hopper-3 moisture last 10 min": Q("hopper-3", "moisture", "avg", 600),
                          "hopper-4 levels last hour": Q("hopper-4", "level", "avg", 3600),
                          "hopper-3 moisture now": Q("hopper-3", "moisture")})
    r = run(call(router(world), "ask", {"text": "hopper-3 and hopper-4 moistures and levels now"}))["result"]
    assert r["resolved"] == {"plan": [Q("hopper-3", "moisture"), Q("hopper-3", "level"), Q("hopper-4", "moisture"),
                                      Q("hopper-4", "level")]}
    r = run(call(router(world), "ask", {"text": "hopper-3 moisture last 10 min, hopper-4 levels last hour"}))["result"]
    assert r["resolved"] == {"plan": [Q("hopper-3", "moisture", "avg", 600), Q("hopper-4", "level", "avg", 3600)]}


def test_a_standing_condition_held_for_a_time_is_too_complex_and_an_order_after_it_is_its_action():
    world = World(SILO, {"stop auger-2": W("auger-2", "enabled", False)})
    r = run(call(router(world), "ask", {"text": "warn me if bin-7 level is below 5 for 10 minutes"}))["result"]
    assert r["resolved"] == {"tool": "clarify", "args": {"reason": "too_complex"}}
    r = run(call(router(world), "ask", {"text": "notify me whenever bin-7 level is below 5 and stop auger-2"}))["result"]
    assert r["resolved"]["args"] == {"kind": "below", "device": "bin-7", "point": "level", "threshold": 5,
                                     "action_device": "auger-2", "action_point": "enabled", "action_value": "false"}
    assert world.rules == []


def test_a_name_filter_lists_or_fans_out_and_its_word_is_no_device():
    """'whose name contains X' is a filter on the ids (issue 23 §6): a listing, or a fan-out of the order over what it
    finds; X ('cell7', with a digit) is a part of ids, never taken for a device of its own."""
    world = World({"cell7_robot": {"enabled": True}, "cell7_feeder": {"enabled": True}, "cell8_robot": {"enabled": True}},
                  {"halt zz-0": W("zz-0", "enabled", False)})

    async def main():
        r = router(world)
        a = (await call(r, "ask", {"text": "show me the devices whose name contains cell7"}))["result"]
        assert a["resolved"] == {"tool": "list_devices", "args": {"filter": "cell7"}}, a
        b = (await call(r, "ask", {"text": "halt everything whose name contains cell7"}))["result"]
        assert b["resolved"]["plan"] == [{"tool": "list_devices", "args": {"filter": "cell7"}},
                                         {"tool": "write_point", "args": {"device": {"each": 1}, "point": "enabled",
                                                                          "value": False}}], b
        assert sorted(w["device"] for w in b["confirm"]["writes"]) == ["cell7_feeder", "cell7_robot"]
        assert world.writes == []
    run(main())


def test_alarms_on_a_named_device_keep_the_device():
    world = World({"press_a": {"pressure": 3.0}, "press_b": {"pressure": 2.0}},
                  {"any alarms on press_a?": {"tool": "list_alerts", "args": {"device": None}}})
    r = run(call(router(world), "ask", {"text": "any alarms on press_a?"}))["result"]
    assert r["resolved"] == {"tool": "list_alerts", "args": {"device": "press_a"}}, r


def test_a_condition_that_names_no_point_is_asked_back_even_where_the_device_has_one():
    """The conventions: a condition must name its point. 'if sump-9 is over 2.5 now start drain-pump-1' names none:
    clarify which_value, nothing proposed (it once took the device's only point and proposed the write)."""
    world = World({"sump-9": {"level": 3.1}, "drain-pump-1": {"enabled": False}},
                  {"start drain-pump-1": W("drain-pump-1", "enabled", True)})
    r = run(call(router(world), "ask", {"text": "if sump-9 is over 2.5 now start drain-pump-1"}))["result"]
    assert r["outcome"] == "clarify" and r["reason"] == "which_value", r
    assert "confirm" not in r and world.writes == []


# ---- found by the blind P3 and F2 runs, made general and tested on names of our own ----

SETTLERS = {"settler-4": {"silt": 1.2, "acidity_idx": 7.1, "enabled": True},
            "settler-5": {"silt": 0.8, "acidity_idx": 6.9, "enabled": True},
            "kiln-44": {"power": 410.0, "pressure": 1.1, "temperature": 900.0, "enabled": True},
            "bin-4": {"moisture": 50.0}, "fan-9": {"enabled": False}}


def test_the_registrys_own_point_names_are_points_the_words_can_name():
    """A point the shipped table does not know ("silt", "acidity_idx", said "acidity idx") is read where the registry
    has it; a registered name said as it is wins over the table's word for another point ("moisture" is not humidity)."""
    world = World(SETTLERS, {"start fan-9": W("fan-9", "enabled", True)})

    async def main():
        r = router(world)
        a = (await call(r, "ask", {"text": "settler-4 silt and acidity_idx now"}))["result"]
        assert a["resolved"] == {"plan": [Q("settler-4", "silt"), Q("settler-4", "acidity_idx")]}, a
        b = (await call(r, "ask", {"text": "compare silt of settler-4 and settler-5"}))["result"]
        assert b["resolved"] == {"plan": [Q("settler-4", "silt", "avg", 3600), Q("settler-5", "silt", "avg", 3600)]}, b
        c = (await call(r, "ask", {"text": "whats the acidity idx on settler-5 rn"}))["result"]
        assert c["resolved"] == Q("settler-5", "acidity_idx"), c
        d = (await call(r, "ask", {"text": "should bin-4 moisture exceed 45, start fan-9"}))["result"]
        assert d["resolved"] == {"plan": [Q("bin-4", "moisture"), {**W("fan-9", "enabled", True), "when": {
            "step": 1, "op": ">", "value": 45}}]}, d
        assert world.writes == []
    run(main())


@pytest.mark.parametrize("text,model,want", [
    # the model proposed a write for a read ("power" read as an order): the words ask a read, code reads it
    ("kiln-44 power now", W("kiln-44", "power", False), Q("kiln-44", "power")),
    # the model gave up on a slipped point word
    ("whats the presure on kiln-44 rn", {"tool": "clarify", "args": {"reason": "nothing"}}, Q("kiln-44", "pressure")),
    ("peak power kiln-44 today", {"tool": "clarify", "args": {"reason": "which_value"}},
     Q("kiln-44", "power", "max", 86400)),
    # a window no word states is the conventions' (3600), never the model's guess
    ("highest silt settler-4", Q("settler-4", "silt", "max", 900), Q("settler-4", "silt", "max", 3600)),
    # ... but a window the words may state, slipped, is left as the model read it
    ("avg silt settler-4 over the last half horu", Q("settler-4", "silt", "avg", 1800), Q("settler-4", "silt", "avg", 1800)),
    # a word the plain read does not know leaves the model's answer
    ("why is kiln-44 power so high now", {"tool": "clarify", "args": {"reason": "nothing"}}, None),
    ("don't bother reading kiln-44 power now", {"tool": "clarify", "args": {"reason": "nothing"}}, None),
    # an order stated plainly that the model read as a question is the order (a number in words)
    ("set kiln-44 temperature to eight hundred and fifty", Q("kiln-44", "temperature"), W("kiln-44", "temperature", 850)),
    # ... and a question stays a question
    ("is kiln-44 temperature set to 850?", Q("kiln-44", "temperature"), Q("kiln-44", "temperature")),
])
def test_a_read_or_an_order_the_words_state_wholly_is_read_by_code_where_the_model_misses_it(text, model, want):
    world = World(SETTLERS, {text: model})
    r = run(call(router(world), "ask", {"text": text}))["result"]
    if want is None:
        assert r["outcome"] == "clarify" and r["reason"] == "nothing", r
    else:
        assert r["resolved"] == want, (text, r)
        assert ("confirm" in r) == (want["tool"] == "write_point"), r
    assert world.writes == []


def test_slips_in_ids_alert_verbs_and_order_verbs_are_read_through_and_digits_never_are():
    world = World({"dryer-31": {"temperature": 80.0, "enabled": True}, "dryer-32": {"enabled": True},
                   "pump-1": {"enabled": True}, "pump-12": {"enabled": True}},
                  {"stpo dryer-31": W("dryer-31", "enabled", True), "stpo dryer-32": W("dryer-32", "enabled", True),
                   "stop dryer-31": W("dryer-31", "enabled", False), "stop pump-13": W("pump-13", "enabled", False)})

    async def main():
        r = router(world)
        a = (await call(r, "ask", {"text": "stpo dryer-31 and dryer-32"}))["result"]  # the model read "stpo" as start
        assert a["resolved"] == {"plan": [W("dryer-31", "enabled", False), W("dryer-32", "enabled", False)]}, a
        b = (await call(r, "ask", {"text": "notfy me if dryer-31 temp goes above 90"}))["result"]
        assert b["resolved"] == {"tool": "add_rule", "args": {"kind": "above", "device": "dryer-31",
                                                              "point": "temperature", "threshold": 90}}, b
        c = (await call(r, "ask", {"text": "stop dryr-31"}))["result"]
        assert c["resolved"] == W("dryer-31", "enabled", False) and c["confirm"]["write"]["device"] == "dryer-31", c
        d = (await call(r, "ask", {"text": "stop pump-13"}))["result"]  # pump-1 and pump-12 are one slip away: digits
        assert d["outcome"] == "clarify" and "confirm" not in d, d
        for near in ("stop dryer-31b", "stop dryer-3l", "stop dryer31"):  # a short run, a digit, a separator: no slip
            e = (await call(r, "ask", {"text": near}))["result"]
            assert "confirm" not in e or e["confirm"]["write"]["device"] not in ("dryer-31", "dryer-32"), (near, e)
        assert world.writes == []
    run(main())


@pytest.mark.parametrize("text", ["start dryer-31 in 10 minutes", "stop dryer-31 at midnight", "shut dryer-31 tonight",
                                  "set dryer-31 temperature to 70 tomorrow morning",
                                  "if dryer-31 temp stays above 90 for 5 minutes stop it",
                                  "if dryer-31 temperature is over 90 for ten minutes, stop dryer-31"])
def test_orders_for_later_and_conditions_held_for_a_time_are_too_complex(text):
    world = World({"dryer-31": {"temperature": 95.0, "enabled": True}},
                  {"stop dryer-31": W("dryer-31", "enabled", False), "stop it": W("dryer-31", "enabled", False)})
    r = run(call(router(world), "ask", {"text": text}))["result"]
    assert r["outcome"] == "clarify" and r["reason"] == "too_complex", (text, r)


def test_a_reminder_is_not_a_schedule_and_a_window_is_not_a_delay():
    world = World({"dryer-31": {"temperature": 95.0, "enabled": True}},
                  {"remind me to stop dryer-31 tonight": {"tool": "clarify", "args": {"reason": "nothing"}}})
    r = run(call(router(world), "ask", {"text": "remind me to stop dryer-31 tonight"}))["result"]
    assert r["reason"] == "nothing", r
    r = run(call(router(world), "ask", {"text": "max temperature of dryer-31 in the last 10 minutes"}))["result"]
    assert r["resolved"] == Q("dryer-31", "temperature", "max", 600), r


def test_a_fan_out_over_a_kind_with_a_hyphen():
    world = World({"uv-lamp-1": {"enabled": True}, "uv-lamp-2": {"enabled": True}, "pump-1": {"enabled": True}},
                  {"turn off zz-0 pls": W("zz-0", "enabled", False)})
    r = run(call(router(world), "ask", {"text": "turn off all uv-lamps pls"}))["result"]
    assert r["resolved"]["plan"][0] == {"tool": "list_devices", "args": {"filter": "uv-lamp"}}, r
    assert sorted(w["device"] for w in r["confirm"]["writes"]) == ["uv-lamp-1", "uv-lamp-2"] and world.writes == []


def test_the_backlog_and_the_alarms_are_two_questions_even_after_a_read():
    alarms = {"tool": "list_alerts", "args": {"device": None}}
    world = World(SETTLERS, {"active alarms pls": alarms, "any active alarms": alarms})

    async def main():
        r = router(world)
        want = {"plan": [{"tool": "status", "args": {}}, alarms]}
        a = (await call(r, "ask", {"text": "backlog and active alarms pls"}))["result"]
        assert a["resolved"] == want, a
        await call(r, "ask", {"text": "settler-4 silt now"})
        b = (await call(r, "ask", {"text": "backlog and active alarms pls"}))["result"]  # not "the point active"
        assert b["resolved"] == want, b
        c = (await call(r, "ask", {"text": "any active alarms, and hows the backlog"}))["result"]
        assert c["resolved"] == {"plan": [alarms, {"tool": "status", "args": {}}]}, c
    run(main())


def test_right_now_after_a_number_in_words_never_changes_the_number():
    """'sixty right now' once read as 68 ('right' one letter from 'eight'): the shipped model proposed 68, and the
    guard, reading the same numbers, let it through to a confirmation."""
    world = World(SETTLERS | {"vlv-21": {"enabled": True}},
                  {"set kiln-44 temperature to sixty right now": W("kiln-44", "temperature", 68),
                   "shut vlv-21": W("vlv-21", "enabled", False)})
    r = run(call(router(world), "ask", {"text": "set kiln-44 temperature to sixty right now"}))["result"]
    assert "confirm" not in r or r["confirm"]["write"]["value"] == 60, r
    r = run(call(router(world), "ask", {"text": "if kiln-44 pressure is greater than one point one right now shut "
                                                "vlv-21"}))["result"]
    assert r["resolved"]["plan"][1]["when"] == {"step": 1, "op": ">", "value": 1.1}, r
    assert world.writes == []


def test_a_negated_order_voids_its_step_but_its_device_is_still_what_its_means():
    world = World(SETTLERS, {"check kiln-44's temp": Q("kiln-44", "temperature")})
    r = run(call(router(world), "ask", {"text": "dont stop kiln-44 but check its temp"}))["result"]
    assert r["resolved"] == Q("kiln-44", "temperature") and world.writes == [], r


def test_its_after_a_read_is_the_value_just_read_even_unapostrophed():
    world = World(SETTLERS, {"turn kiln-44 off": W("kiln-44", "enabled", False),
                             "read kiln-44 temp": Q("kiln-44", "temperature")})
    r = run(call(router(world), "ask", {"text": "read kiln-44 temp and if its above 850 turn kiln-44 off"}))["result"]
    assert r["resolved"] == {"plan": [Q("kiln-44", "temperature"), {**W("kiln-44", "enabled", False), "when": {
        "step": 1, "op": ">", "value": 850}}]}, r
    assert [w["device"] for w in r["confirm"]["writes"]] == ["kiln-44"] and world.writes == []


def test_what_the_first_blind_run_on_p4_and_f3_showed_on_names_of_our_own():
    """The fourth sealed pair's misses, made general: a condition's number followed by "rn"; an order without a value
    the model read as a question; "current" before "rn" is the point; a what-if beside a read voids only itself;
    "the last day" is a window; "now" said fixes last over 60 s."""
    world = World({"bin-12": {"level": 92.0, "flow": 3.0}, "still-3": {"enabled": True, "setpoint": 72, "flow": 10.0},
                   "mill_8": {"temperature": 60.0, "current": 30.0}, "belt14": {"current": 12.0, "enabled": True}},
                  {"stop still-3": W("still-3", "enabled", False),
                   "set still-3 setpoint pls": Q("still-3", "setpoint", "avg", 3600),
                   "whats still-3's flow rn": Q("still-3", "flow", "avg", 3600)})

    async def main():
        r = router(world)
        a = (await call(r, "ask", {"text": "if bin-12 level is at least 90 rn stop still-3"}))["result"]
        assert a["resolved"] == {"plan": [Q("bin-12", "level"), {**W("still-3", "enabled", False),
                                                                 "when": {"step": 1, "op": ">=", "value": 90}}]}, a
        b = (await call(r, "ask", {"text": "set still-3 setpoint pls"}))["result"]
        assert b["outcome"] == "clarify" and b["reason"] == "which_value", b
        c = (await call(r, "ask", {"text": "mill_8 temp and belt14 current rn"}))["result"]
        assert c["resolved"] == {"plan": [Q("mill_8", "temperature"), Q("belt14", "current")]}, c
        d = (await call(r, "ask", {"text": "max flow bin-12 last hour and what would happen if i turned still-3 "
                                           "off"}))["result"]
        assert d["resolved"] == Q("bin-12", "flow", "max", 3600), d
        e = (await call(r, "ask", {"text": "compare belt14 and mill_8 current over the last day"}))["result"]
        assert e["resolved"] == {"plan": [Q("belt14", "current", "avg", 86400), Q("mill_8", "current", "avg", 86400)]}
        await call(r, "ask", {"text": "still-3 flow now"})
        f = (await call(r, "ask", {"text": "whats its flow rn"}))["result"]
        assert f["resolved"] == Q("still-3", "flow"), f
        assert world.writes == []
    run(main())


def test_a_possessive_with_nothing_remembered_asks_which_device():
    world = World({"still-3": {"flow": 10.0}}, {})
    r = run(call(router(world), "ask", {"text": "whats its flow rn"}))["result"]
    assert r["outcome"] == "clarify" and r["reason"] == "which_device", r


def test_a_point_the_device_lacks_is_asked_as_said_and_refused_never_swapped_for_one_it_has():
    world = World({"mill_8": {"current": 30.0}, "belt14": {"current": 12.0}}, {})
    r = run(call(router(world), "ask", {"text": "mill_8 temp and belt14 current rn"}))["result"]
    assert r["outcome"] == "clarify" and "mill_8" in r["answer"], r
    assert r["call"] == {"plan": [Q("mill_8", "temperature"), Q("belt14", "current")]}, r


def test_what_the_first_blind_run_on_p5_and_f4_showed_on_names_of_our_own():
    """The fifth sealed pair's misses, made general: an id's own parts are no keywords ("flush-loop-2" is no loop); a
    registered point said inside an id is none ("o2-sensor-4" says no o2); a mode's value as typed ("charge" was
    "corrected" into the verb "change" and proposed — a wrong write once confirmed); politeness is no condition; an
    order without a value the model gave up on; "all <word> <kind>s" where the ids hold the second word."""
    world = World({"flush-loop-2": {"temperature": 80.0, "level": 60.0, "enabled": True},
                   "o2-sensor-4": {"o2": 20.9, "enabled": True}, "kiln-44": {"temperature": 900.0, "o2": 3.0, "setpoint": 880},
                   "ess_9": {"soc": 15.0, "mode": "auto"}, "wash-7": {"enabled": False},
                   **{f"spray_bar{i}": {"enabled": False} for i in range(1, 11)}},
                  {"set ess_9 mode to charge": W("ess_9", "mode", "mode"), "turn on wash-7": W("wash-7", "enabled", True),
                   "change the kiln-44 setpoint pls": {"tool": "clarify", "args": {"reason": "nothing"}},
                   "start zz-0": W("zz-0", "enabled", True)})

    async def main():
        r = router(world)
        a = (await call(r, "ask", {"text": "if flush-loop-2 temperature is at most 85 right now then turn on wash-7"}))
        assert a["result"]["resolved"]["plan"][1]["when"] == {"step": 1, "op": "<=", "value": 85}, a
        b = (await call(r, "ask", {"text": "minimum level of flush-loop-2 today"}))["result"]
        assert b["resolved"] == Q("flush-loop-2", "level", "min", 86400), b
        c = (await call(r, "ask", {"text": "compare the temperature of kiln-44 and o2-sensor-4"}))["result"]
        assert c["call"] == {"plan": [Q("kiln-44", "temperature", "avg", 3600),
                                      Q("o2-sensor-4", "temperature", "avg", 3600)]}, c  # refused: o2-sensor-4 has none
        d = (await call(r, "ask", {"text": "set ess_9 mode to charge"}))["result"]
        assert d["resolved"] == W("ess_9", "mode", "charge") and d["confirm"]["write"]["value"] == "charge", d
        e = (await call(r, "ask", {"text": "turn on wash-7 if you dont mind"}))["result"]
        assert e["resolved"] == W("wash-7", "enabled", True), e
        f = (await call(r, "ask", {"text": "change the kiln-44 setpoint pls"}))["result"]
        assert f["outcome"] == "clarify" and f["reason"] == "which_value", f
        g = (await call(r, "ask", {"text": "start all spray bars"}))["result"]  # ten of them: over the cap
        assert g["outcome"] == "clarify" and g["reason"] == "too_complex", g
        assert world.writes == []
    run(main())


def test_what_the_first_blind_run_on_p6_and_f5_showed_on_names_of_our_own():
    """The sixth sealed pair's misses, made general: a registered point with a digit ("nh3") is no device id; a
    greeting, a polite frame and thanks around a request; "cmpare"; "devices that have a name that contains X"; "check
    whether ... and, if it is, ..."; a read asked, then "if its above N, ..."; an order whose point word names no point;
    a read of a point the device lacks asked as said."""
    world = World({"pit-4": {"nh3": 12.0, "temperature": 30.0, "enabled": True},
                   "pit-5": {"nh3": 9.0, "temperature": 28.0, "enabled": True},
                   "fan-31": {"enabled": True, "speed": 40}, "tank-9": {"level": 50.0}},
                  {"stop fan-31": W("fan-31", "enabled", False), "shut off fan-31": W("fan-31", "enabled", False),
                   "stop it": W("fan-31", "enabled", False), "set fan-31 blade to 2": W("fan-31", "speed", 2),
                   "set the speed of fan-31 to 38": W("fan-31", "speed", 38),
                   "whats pit-4 temperature rn": Q("pit-4", "temperature"),
                   "max nh3 on tank-9 today": Q("tank-9", "level", "max", 86400)})

    async def main():
        r = router(world)
        a = (await call(r, "ask", {"text": "compare the nh3 of pit-4 and pit-5 over the last 15 minutes"}))["result"]
        assert a["resolved"] == {"plan": [Q("pit-4", "nh3", "avg", 900), Q("pit-5", "nh3", "avg", 900)]}, a
        b = (await call(r, "ask", {"text": "cmpare the temperature of pit-4 and pit-5"}))["result"]
        assert b["resolved"] == {"plan": [Q("pit-4", "temperature", "avg", 3600),
                                          Q("pit-5", "temperature", "avg", 3600)]}, b
        c = (await call(r, "ask", {"text": "which devices have a name that contains pit"}))["result"]
        assert c["resolved"] == {"tool": "list_devices", "args": {"filter": "pit"}}, c
        d = (await call(r, "ask", {"text": "Good morning, would you kindly set the speed of fan-31 to 38, thank "
                                           "you"}))["result"]
        assert d["resolved"] == W("fan-31", "speed", 38), d
        e = (await call(r, "ask", {"text": "Hello, could you check whether pit-4 temperature is currently above 25 "
                                           "and, if it is, shut off fan-31 please"}))["result"]
        assert e["resolved"] == {"plan": [Q("pit-4", "temperature"), {**W("fan-31", "enabled", False), "when": {
            "step": 1, "op": ">", "value": 25}}]}, e
        f = (await call(r, "ask", {"text": "whats pit-4 temperature rn? if its above 25, stop fan-31"}))["result"]
        assert f["resolved"] == e["resolved"], f
        g = (await call(r, "ask", {"text": "set fan-31 blade to 2"}))["result"]  # the model guessed speed
        assert g["outcome"] == "clarify" and g["reason"] == "which_value" and "confirm" not in g, g
        h = (await call(r, "ask", {"text": "max nh3 on tank-9 today"}))["result"]  # the model guessed level
        assert h["call"] == Q("tank-9", "nh3", "max", 86400) and h["outcome"] == "clarify", h
        assert world.writes == []
    run(main())


def test_what_the_first_blind_run_on_p7_and_f6_showed_on_names_of_our_own():
    """The seventh sealed pair's misses, made general: an aggregate each ("min X today and max Y today"); "uh" before
    a condition; an unregistered id among parallel
    reads (the plan names it, the registry check refuses it); a plain read of a point the device lacks; an order said
    before a what-if stays; an aggregate over 60 s that no word asked; "list every <kind>"."""
    world = World({"silo-41": {"pressure": 3.0, "draft": 2.0, "level": 15.0, "enabled": True},
                   "silo-42": {"temperature": 30.0, "nox": 4.0}, "mill-8": {"power": 90.0},
                   "feed-3": {"enabled": False}, "feed-4": {"enabled": False}},
                  {"stop it": W("silo-41", "enabled", False), "turn off silo-41": W("silo-41", "enabled", False),
                   "start feed-3": W("feed-3", "enabled", True),
                   "min pressure on silo-41 today": Q("silo-41", "pressure", "max", 86400),
                   "max draft on silo-41 today": Q("silo-41", "draft", "max", 86400),
                   "minimum power mill-8": Q("mill-8", "power", "min", 60),
                   "list every feed": {"tool": "list_devices", "args": {"filter": None}}})

    async def main():
        r = router(world)
        a = (await call(r, "ask", {"text": "min pressure on silo-41 today and max draft on silo-41 today"}))["result"]
        assert a["resolved"] == {"plan": [Q("silo-41", "pressure", "min", 86400), Q("silo-41", "draft", "max", 86400)]}
        b = (await call(r, "ask", {"text": "uh if silo-41 pressure is more than 2 rn stop it"}))["result"]
        assert b["resolved"]["plan"][1] == {**W("silo-41", "enabled", False), "when": {"step": 1, "op": ">", "value": 2}}
        d = (await call(r, "ask", {"text": "silo-42 and silo-49 temp now"}))["result"]
        assert d["outcome"] == "clarify" and d["call"] == {"plan": [Q("silo-42", "temperature"),
                                                                    Q("silo-49", "temperature")]}, d
        e = (await call(r, "ask", {"text": "whats the nox on mill-8 now"}))["result"]
        assert e["outcome"] == "clarify" and e["call"] == Q("mill-8", "nox"), e
        f = (await call(r, "ask", {"text": "start feed-3, and what would happen if i also started feed-4?"}))["result"]
        assert f["resolved"] == W("feed-3", "enabled", True) and f["confirm"]["write"]["device"] == "feed-3", f
        g = (await call(r, "ask", {"text": "minimum power mill-8"}))["result"]
        assert g["resolved"] == Q("mill-8", "power", "min", 3600), g
        h = (await call(r, "ask", {"text": "list every feed"}))["result"]
        assert h["resolved"] == {"tool": "list_devices", "args": {"filter": "feed"}}, h
        assert world.writes == []
    run(main())


def test_a_what_if_before_an_order_keeps_nothing():
    world = World({"feed-3": {"enabled": False}, "feed-4": {"enabled": False}}, {})
    r = run(call(router(world), "ask", {"text": "what if i started feed-3 and feed-4"}))["result"]
    assert r["outcome"] == "clarify" and "confirm" not in r, r


def test_what_the_first_blind_run_on_p8_and_f7_showed_on_names_of_our_own():
    """The eighth sealed pair's misses, made general: a registered name said inside another named point ("wind
    speed" is wind_speed, not also speed); "after that" orders in sequence; a closing remark is nothing to do (a
    pending "ok thanks" still confirms); "coldest" is a temperature; a device, one of its settings and a number is
    an order with its verb left out (a measurement never is)."""
    world = World({"chair-4": {"wind_speed": 9.0, "speed": 3.0, "temperature": -5.0, "enabled": True},
                   "chair-6": {"wind_speed": 8.0, "speed": 3.0},
                   "vat-1": {"setpoint": 72.0, "temperature": 71.0, "level": 40.0},
                   "vat-2": {"setpoint": 72.0}},
                  {"stop chair-4": W("chair-4", "enabled", False),
                   "coldest chair-4 got in the last 2 hours": Q("chair-4", "speed", "min", 7200),
                   "vat-2 setpoint seventy three": Q("vat-2", "setpoint", "avg", 1800),
                   "vat-1 level 80": {"tool": "clarify", "args": {"reason": "nothing"}}})

    async def main():
        r = router(world)
        a = (await call(r, "ask", {"text": "chair-4 and chair-6 wind speed right now"}))["result"]
        assert a["resolved"] == {"plan": [Q("chair-4", "wind_speed"), Q("chair-6", "wind_speed")]}, a
        b = (await call(r, "ask", {"text": "whats the speed of chair-4 rn, after that stop chair-4"}))["result"]
        assert b["resolved"] == {"plan": [Q("chair-4", "speed"), W("chair-4", "enabled", False)]}, b
        c = (await call(r, "ask", {"text": "ok thanks"}))["result"]  # the pending stop: confirmed
        assert c["outcome"] == "done" and world.writes == [("chair-4", "enabled", False)], c
        d = (await call(r, "ask", {"text": "thanks, thats all for now"}))["result"]
        assert d["outcome"] == "clarify" and d["reason"] == "nothing", d
        e = (await call(r, "ask", {"text": "coldest chair-4 got in the last 2 hours"}))["result"]
        assert e["resolved"] == Q("chair-4", "temperature", "min", 7200), e
        f = (await call(r, "ask", {"text": "vat-1 sp 73 and vat-2 sp 73 pls"}))["result"]
        assert f["resolved"] == {"plan": [W("vat-1", "setpoint", 73), W("vat-2", "setpoint", 73)]}, f
        g = (await call(r, "ask", {"text": "vat-2 setpoint seventy three"}))["result"]
        assert g["resolved"] == W("vat-2", "setpoint", 73) and g["outcome"] == "confirm", g
        h = (await call(r, "ask", {"text": "vat-1 level 80"}))["result"]
        assert "confirm" not in h, h
        assert world.writes == [("chair-4", "enabled", False)]
    run(main())


def test_what_the_first_blind_run_on_p9_and_f8_showed_on_names_of_our_own():
    """The ninth sealed pair's misses, made general: a second condition is too complex, never dropped (it proposed
    "stop B when A > 90" for "if A > 90 and if then B > 7, stop B" — a write under a weaker condition than asked);
    plurals of point words; a device said first as the topic ("ahu-9: if co2 is over 800 ..."); a rate ("drops
    fast"); a plain read of a device the registry lacks names it."""
    world = World({"dh-14": {"supply_temp": 95.0}, "dh-pump3": {"pressure": 5.0, "enabled": True},
                   "tank-u1": {"level": 50.0}, "tank-u2": {"level": 40.0},
                   "ahu-9": {"co2": 900.0, "speed": 1200}, "heat-2": {"temperature": 15.0, "enabled": True}},
                  {"stop dh-pump3": W("dh-pump3", "enabled", False), "dh-pump3 pressure is above 7":
                   W("dh-pump3", "enabled", False), "set speed 1400 ahu-9": W("ahu-9", "speed", 1400),
                   "switch it off": W("heat-2", "enabled", False), "switch heat-2 off": W("heat-2", "enabled", False)})

    async def main():
        r = router(world)
        for text in ("if dh-14 supply_temp is above 90 now and if then dh-pump3 pressure is above 7, stop dh-pump3",
                     "if dh-14 supply_temp is above 90, then dh-pump3 pressure is above 7, stop dh-pump3"):
            a = (await call(r, "ask", {"text": text}))["result"]
            assert a["outcome"] == "clarify" and a["reason"] == "too_complex" and "confirm" not in a, (text, a)
        b = (await call(r, "ask", {"text": "compare tank-u1 and tank-u2 levels"}))["result"]
        assert b["resolved"] == {"plan": [Q("tank-u1", "level", "avg", 3600), Q("tank-u2", "level", "avg", 3600)]}, b
        c = (await call(r, "ask", {"text": "ahu-9: if co2 is over 800 currently set speed 1400"}))["result"]
        assert c["resolved"] == {"plan": [Q("ahu-9", "co2"), {**W("ahu-9", "speed", 1400), "when": {
            "step": 1, "op": ">", "value": 800}}]}, c
        d = (await call(r, "ask", {"text": "whenever tank-u1 level drops fast, alert me"}))["result"]
        assert d["outcome"] == "clarify" and d["reason"] == "too_complex", d
        e = (await call(r, "ask", {"text": "tank-u9 level now"}))["result"]
        assert e["outcome"] == "clarify" and e["call"] == Q("tank-u9", "level"), e
        assert world.writes == []
    run(main())


def test_registry_point_names_cannot_rename_the_request_words_and_a_large_registry_stays_bounded():
    """Any device on the local broker registers points. One named "stop" must not make "stop pump-1" name it; past
    MAX_REGISTERED names only those a request says join the composer's table (a 100,000-point registry must not
    cost every request a table of 100,000 words)."""
    from edge_agent.glm.points import MAX_REGISTERED

    hostile = {"pump-1": {"enabled": True, "temperature": 60.0}, "evil-1": {"stop": 1.0, "now": 2.0, "temperature": 1.0}}
    world = World(hostile, {"stop pump-1": {"tool": "clarify", "args": {"reason": "nothing"}}})
    r = run(call(router(world), "ask", {"text": "stop pump-1"}))["result"]
    assert r["resolved"] == W("pump-1", "enabled", False) and r["outcome"] == "confirm", r
    big = {f"cell-{i}": {f"zone{i}_temp": 20.0, "enabled": True} for i in range(MAX_REGISTERED + 10)}
    world = World(big, {})
    r = run(call(router(world), "ask", {"text": "cell-7 zone7_temp and cell-8 zone8_temp now"}))["result"]
    assert r["resolved"] == {"plan": [Q("cell-7", "zone7_temp"), Q("cell-8", "zone8_temp")]}, r
    assert world.writes == []
