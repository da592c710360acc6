"""The memory engine: per requester (channel, operator key, conversation), bounded, expiring, ≤ 4 KB a frame;
follow-ups change only what they name; pronouns resolve to one device or are asked back; "set it back" proposes the
recorded old value; "yes"/"no" answer the same requester's pending confirmation and nothing else."""
from __future__ import annotations

import asyncio

from edge_agent.ops.memory import MAX_FRAME_BYTES, Frame, Memory, size

from test_plans import Q, W, World, call, router

WORLD = {"pump-3": {"temperature": 85.2, "enabled": True, "pressure": 4.0},
         "pump-4": {"temperature": 60.0, "enabled": True, "pressure": 2.0},
         "pump-5": {"temperature": 55.0, "enabled": False}}
CALLS = {"max temperature of pump-3 today": Q("pump-3", "temperature", "max", 86400),
         "stop pump-3": W("pump-3", "enabled", False), "stop pump-4": W("pump-4", "enabled", False),
         "set pump-3 speed to 40": W("pump-3", "speed", 40),
         "what is the pressure of pump-4": Q("pump-4", "pressure")}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_dialogue_of_follow_ups_changes_only_what_each_turn_names():
    world = World(WORLD, CALLS)

    async def main():
        r = router(world)
        turns = [("max temperature of pump-3 today", Q("pump-3", "temperature", "max", 86400)),
                 ("and pump-4?", Q("pump-4", "temperature", "max", 86400)),
                 ("what about the last hour?", Q("pump-4", "temperature", "max", 3600)),
                 ("the minimum?", Q("pump-4", "temperature", "min", 3600)),
                 ("and the pressure?", Q("pump-4", "pressure", "min", 3600))]
        for text, want in turns:
            got = (await call(r, "ask", {"text": text}))["result"]
            assert got["resolved"] == want, (text, got)
            assert got["outcome"] == "done"
        assert world.asked == ["max temperature of pump-3 today"]  # the follow-ups needed no model
    asyncio.run(main())


def test_two_requesters_never_share_a_frame_nor_a_confirmation():
    world = World(WORLD, CALLS)

    async def main():
        r = router(world)
        await call(r, "ask", {"text": "max temperature of pump-3 today"}, who="mqtt op-a")
        other = (await call(r, "ask", {"text": "and pump-4?"}, who="mqtt op-b"))["result"]
        assert other["outcome"] == "clarify" and other["resolved"]["tool"] == "clarify"  # op-b said nothing before
        mine = (await call(r, "ask", {"text": "and pump-4?"}, who="mqtt op-a"))["result"]
        assert mine["resolved"] == Q("pump-4", "temperature", "max", 86400)
        # the same channel, another conversation id: another frame
        conv = (await call(r, "ask", {"text": "and pump-4?", "conversation": "c2"}, who="mqtt op-a"))["result"]
        assert conv["outcome"] == "clarify"
        p = (await call(r, "ask", {"text": "stop pump-3"}, who="mqtt op-a"))["result"]
        assert p["outcome"] == "confirm"
        b = (await call(r, "ask", {"text": "yes"}, who="mqtt op-b"))["result"]
        assert b["resolved"] == {"tool": "clarify", "args": {"reason": "nothing"}} and world.writes == []
        a = (await call(r, "ask", {"text": "yes"}, who="mqtt op-a"))["result"]
        assert a["resolved"] == {"confirm": True} and world.writes == [("pump-3", "enabled", False)]
    asyncio.run(main())


def test_yes_with_nothing_pending_and_no_declines():
    world = World(WORLD, CALLS)

    async def main():
        r = router(world)
        y = (await call(r, "ask", {"text": "yes"}))["result"]
        assert y["resolved"] == {"tool": "clarify", "args": {"reason": "nothing"}}
        await call(r, "ask", {"text": "stop pump-3"})
        n = (await call(r, "ask", {"text": "no"}))["result"]
        assert n["resolved"] == {"confirm": False} and n["outcome"] == "declined"
        again = (await call(r, "ask", {"text": "yes"}))["result"]  # already answered: nothing pending
        assert again["resolved"]["tool"] == "clarify" and world.writes == []
    asyncio.run(main())


def test_a_yes_after_the_confirmation_expired_runs_nothing():
    world = World(WORLD, CALLS)
    clock = Clock()

    async def main():
        r = router(world, clock=clock)
        await call(r, "ask", {"text": "stop pump-3"})
        clock.t += 31  # past ask.confirm_ttl_s (30 here), within the memory's ttl
        late = (await call(r, "ask", {"text": "yes"}))["result"]
        assert late["resolved"] == {"tool": "clarify", "args": {"reason": "nothing"}} and world.writes == []
    asyncio.run(main())


def test_the_frame_expires_after_the_ttl():
    world = World(WORLD, CALLS)
    clock = Clock()

    async def main():
        r = router(world, clock=clock)
        await call(r, "ask", {"text": "max temperature of pump-3 today"})
        clock.t += 299
        assert (await call(r, "ask", {"text": "and pump-4?"}))["result"]["outcome"] == "done"
        clock.t += 301  # past ask.memory_ttl_s (300) of silence
        gone = (await call(r, "ask", {"text": "and pump-5?"}))["result"]
        assert gone["outcome"] == "clarify"
        assert r.metrics.value("edge_agent_agent_events_total", {"event": "memory_expired"}) == 1
    asyncio.run(main())


def test_pronouns_resolve_to_the_one_device_or_are_asked_back():
    world = World(WORLD, CALLS)

    async def main():
        r = router(world)
        await call(r, "ask", {"text": "max temperature of pump-3 today"})
        it = (await call(r, "ask", {"text": "stop it"}))["result"]
        assert it["resolved"] == W("pump-3", "enabled", False) and it["outcome"] == "confirm"
        assert world.asked[-1] == "stop pump-3"
        r2 = router(world)
        await call(r2, "ask", {"text": "compare the temperature of pump-3 and pump-4"})
        two = (await call(r2, "ask", {"text": "stop it"}))["result"]
        assert two["resolved"] == {"tool": "clarify", "args": {"reason": "which_device"}}
        assert world.writes == []
    asyncio.run(main())


def test_set_it_back_proposes_the_recorded_old_value_and_nothing_to_undo_is_asked_back():
    world = World(WORLD, CALLS)

    async def main():
        r = router(world)
        nothing = (await call(r, "ask", {"text": "set it back"}))["result"]
        assert nothing["resolved"] == {"tool": "clarify", "args": {"reason": "nothing"}}
        await call(r, "ask", {"text": "stop pump-3"})
        await call(r, "ask", {"text": "yes"})
        assert world.values["pump-3"]["enabled"] is False
        back = (await call(r, "ask", {"text": "set it back"}))["result"]
        assert back["resolved"] == W("pump-3", "enabled", True) and back["outcome"] == "confirm"
        assert world.values["pump-3"]["enabled"] is False  # confirmed like any write
        await call(r, "confirm", {"token": back["confirm"]["token"]})
        assert world.values["pump-3"]["enabled"] is True
    asyncio.run(main())


def test_a_new_topic_inherits_nothing():
    world = World(WORLD, CALLS)

    async def main():
        r = router(world)
        await call(r, "ask", {"text": "max temperature of pump-3 today"})
        new = (await call(r, "ask", {"text": "what is the pressure of pump-4"}))["result"]
        assert new["resolved"] == Q("pump-4", "pressure")
    asyncio.run(main())


def test_the_memory_is_bounded_lru_and_counted():
    events: list[str] = []
    clock = Clock()
    m = Memory(300, 2, events.append, clock=clock)
    for who in ("a", "b", "c"):
        m.put((who,), Frame(last=Q(f"pump-{who}", "temperature")))
    assert len(m) == 2 and events == ["memory_evicted"]
    assert m.get(("a",)).last is None and m.get(("c",)).last == Q("pump-c", "temperature")


def test_a_frame_over_4_kb_is_not_kept_and_counted():
    events: list[str] = []
    m = Memory(300, 8, events.append)
    big = Frame(last={"plan": [W(f"pump-{i}", "mode", "x" * 40) for i in range(4)]},
                writes=[{"device": "d" * 48, "point": "p" * 48, "value": "v" * 48, "old": "o" * 48}] * 20)
    assert size(big) > MAX_FRAME_BYTES
    assert m.put(("a",), big) is False and events == ["frame_too_large"] and m.get(("a",)).last is None
    small = Frame(last=Q("pump-3", "temperature"))
    assert size(small) <= MAX_FRAME_BYTES and m.put(("a",), small) is True


def test_chat_dry_run_prints_each_resolved_request_with_the_shipped_model():
    """`edge-agent chat --dry-run`: one request per stdin line, the resolved call or plan per line, the follow-up
    applied; `ask --dry-run` prints a plan as one JSON line."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "-m", "edge_agent", "chat", "--dry-run"], input="max temperature of pump-3 "
                       "today\nand pump-4?\nstop it\nyes\nyes\n", capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in r.stdout.splitlines()] == [
        Q("pump-3", "temperature", "max", 86400), Q("pump-4", "temperature", "max", 86400),
        W("pump-4", "enabled", False), {"confirm": True}, {"tool": "clarify", "args": {"reason": "nothing"}}]
    r = subprocess.run([sys.executable, "-m", "edge_agent", "ask", "--dry-run", "if pump-3 temperature is above 80, "
                        "stop it"], capture_output=True, text=True, timeout=120, env=env)
    assert json.loads(r.stdout) == {"plan": [Q("pump-3", "temperature"), {**W("pump-3", "enabled", False),
                                                                           "when": {"step": 1, "op": ">", "value": 80}}]}


def test_a_correction_before_confirming_replaces_the_proposal():
    world = World(WORLD, CALLS)

    async def main():
        r = router(world)
        first = (await call(r, "ask", {"text": "stop pump-3"}))["result"]
        fixed = (await call(r, "ask", {"text": "no, pump-4"}))["result"]
        assert fixed["resolved"] == W("pump-4", "enabled", False) and fixed["outcome"] == "confirm"
        old = await call(r, "confirm", {"token": first["confirm"]["token"]})
        assert old["error"]["code"] == "refused" and world.writes == []  # the replaced proposal is gone
        yes = (await call(r, "ask", {"text": "yes"}))["result"]
        assert yes["resolved"] == {"confirm": True} and world.writes == [("pump-4", "enabled", False)]
    asyncio.run(main())


def test_slipped_and_chatty_answers_to_a_pending_confirmation():
    """"yse" is yes; "nah cancel" is no; a message of yes words with a no word in it is neither."""
    for words, want in (("yse", True), ("ok yse", True), ("nah cancel", False), ("nope, cancel it", False),
                        ("yes no", None), ("yes stop pump-4", None)):
        world = World(WORLD, CALLS)

        async def main():
            r = router(world)
            await call(r, "ask", {"text": "stop pump-3"})
            got = (await call(r, "ask", {"text": words}))["result"]
            if want is None:
                assert "confirm" not in got["resolved"], (words, got)
            else:
                assert got["resolved"] == {"confirm": want}, (words, got)
                assert world.writes == ([("pump-3", "enabled", False)] if want else [])
        asyncio.run(main())


def test_a_bare_device_a_window_and_a_slipped_undo_are_follow_ups():
    world = World({**WORLD, "pump-6": {"temperature": 50.0, "enabled": True}}, CALLS)

    async def main():
        r = router(world)
        await call(r, "ask", {"text": "max temperature of pump-3 today"})
        for text, want in (("pump-4?", Q("pump-4", "temperature", "max", 86400)),
                           ("pump 6", Q("pump-6", "temperature", "max", 86400)),     # the id said apart
                           ("last 20 min", Q("pump-6", "temperature", "max", 1200))):  # a window, not the minimum
            got = (await call(r, "ask", {"text": text}))["result"]
            assert got["resolved"] == want, (text, got)
        await call(r, "ask", {"text": "stop pump-3"})
        await call(r, "ask", {"text": "yes"})
        got = (await call(r, "ask", {"text": "put it bakc please"}))["result"]
        assert got["resolved"] == W("pump-3", "enabled", True) and got["outcome"] == "confirm"
        got = (await call(r, "ask", {"text": "set it bak"}))["result"]
        assert got["resolved"] == W("pump-3", "enabled", True)
    asyncio.run(main())


def test_sorry_and_a_number_corrects_the_proposed_value():
    world = World({"oven-2": {"setpoint": 180.0}}, {"set oven-2 setpoint to 200": W("oven-2", "setpoint", 200)})

    async def main():
        r = router(world)
        await call(r, "ask", {"text": "set oven-2 setpoint to 200"})
        got = (await call(r, "ask", {"text": "sorry 190"}))["result"]
        assert got["resolved"] == W("oven-2", "setpoint", 190) and world.writes == []
    asyncio.run(main())


def test_a_new_value_for_it_after_a_declined_write_writes_the_same_point():
    world = World({"oven-2": {"setpoint": 180.0, "temperature": 175.0}},
                  {"set oven-2 setpoint to 200": W("oven-2", "setpoint", 200)})

    async def main():
        r = router(world)
        await call(r, "ask", {"text": "set oven-2 setpoint to 200"})
        assert (await call(r, "ask", {"text": "no"}))["result"]["resolved"] == {"confirm": False}
        got = (await call(r, "ask", {"text": "make it 190 then"}))["result"]
        assert got["resolved"] == W("oven-2", "setpoint", 190) and got["outcome"] == "confirm" and world.writes == []
    asyncio.run(main())


def test_swapped_letters_in_an_on_off_order_and_a_registered_point_said_as_it_is():
    world = World({"pump-3": {"temperature": 85.2, "enabled": True, "position": 3.0}},
                  {"temperature of pump-3 now": Q("pump-3", "temperature"), "stpo pump-3": W("pump-3", "enabled", False),
                   "pump-3 position now": Q("pump-3", "enabled"),
                   "lowest temperature pump-3 tody": Q("pump-3", "temperature", "min", 3600)})

    async def main():
        r = router(world)
        await call(r, "ask", {"text": "temperature of pump-3 now"})
        got = (await call(r, "ask", {"text": "stpo that pump"}))["result"]
        assert got["resolved"] == W("pump-3", "enabled", False) and got["outcome"] == "confirm"
        got = (await call(r, "ask", {"text": "pump-3 position now"}))["result"]
        assert got["resolved"] == Q("pump-3", "position")
        got = (await call(r, "ask", {"text": "lowest temperature pump-3 tody"}))["result"]
        assert got["resolved"] == Q("pump-3", "temperature", "min", 86400)
    asyncio.run(main())
    assert world.writes == []


def test_a_value_for_it_after_a_read_of_a_setting_sets_that_setting_and_never_a_measurement():
    world = World({"still-6": {"setpoint": 78.0, "temperature": 77.5, "enabled": True}},
                  {"still-6 setpoint now": Q("still-6", "setpoint"), "still-6 temperature now": Q("still-6", "temperature"),
                   "set still-6 to 74": {"tool": "clarify", "args": {"reason": "which_value"}}})

    async def main():
        r = router(world)
        await call(r, "ask", {"text": "still-6 setpoint now"})
        a = (await call(r, "ask", {"text": "set it to 74"}))["result"]
        assert a["resolved"] == W("still-6", "setpoint", 74) and a["outcome"] == "confirm", a
        await call(r, "ask", {"text": "still-6 temperature now"})
        b = (await call(r, "ask", {"text": "set it to 74"}))["result"]  # a temperature is measured, not set
        assert b["outcome"] == "clarify" and "confirm" not in b, b
        assert world.writes == []
    asyncio.run(main())


def test_that_and_a_kind_is_the_one_device_of_that_kind_just_named_and_actually_put_it_back_undoes():
    world = World({"charger-3": {"current": 45.0, "enabled": True}, "freezer-12": {"enabled": True}},
                  {"max current charger-3 today": Q("charger-3", "current", "max", 86400),
                   "stop charger-3": W("charger-3", "enabled", False)})

    async def main():
        r = router(world)
        await call(r, "ask", {"text": "max current charger-3 today"})
        a = (await call(r, "ask", {"text": "stop that charger"}))["result"]
        assert a["resolved"] == W("charger-3", "enabled", False), a
        b = (await call(r, "ask", {"text": "stop that freezer"}))["result"]  # not the kind just named
        assert b["outcome"] == "clarify" and "confirm" not in b, b
        await call(r, "ask", {"text": "stop that charger"})
        assert (await call(r, "ask", {"text": "yes"}))["result"]["outcome"] == "done"
        c = (await call(r, "ask", {"text": "actually put it back"}))["result"]
        assert c["resolved"] == W("charger-3", "enabled", True) and c["outcome"] == "confirm", c
        assert world.writes == [("charger-3", "enabled", False)]
    asyncio.run(main())


def test_the_current_draw_after_a_windowed_read_is_the_point_current_not_now():
    world = World({"arc-2": {"oxygen": 30.0, "current": 900.0}}, {"max oxygen arc-2 last hour": Q("arc-2", "oxygen", "max",
                                                                                                   3600)})

    async def main():
        r = router(world)
        await call(r, "ask", {"text": "max oxygen arc-2 last hour"})
        a = (await call(r, "ask", {"text": "and the current draw"}))["result"]
        assert a["resolved"] == Q("arc-2", "current", "max", 3600), a
    asyncio.run(main())
