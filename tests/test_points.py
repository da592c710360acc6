"""Operators' words for points (one table for the corpus and the runtime, extended by a gateway's config) and the
grammar narrowed to the gateway's registry."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edge_agent import ops
from edge_agent.config import ConfigError, from_dict
from edge_agent.glm.points import POINT_WORDS, SHIPPED, PointTable


@pytest.mark.parametrize("text,points", [
    ("how hot is boiler_2", ["temperature"]),
    ("how full is silo-4", ["level"]),
    ("amps on drive-5", ["current"]),
    ("co2 level in hall-2", ["co2"]),                       # "level" qualifies its neighbour
    ("current level and temperature of tank-2", ["level", "temperature"]),  # "current" qualifies "level"
    ("vibration level of motor-7", ["vibration"]),
    ("what is the current temperature of x-1", ["temperature"]),  # "current" as an adjective
    ("current draw of m-3", ["current"]),
    ("power up pump-3", []),                                 # a verb, not the point
    ("could you change the power on m-59 to 2311", ["power"]),
    ("bring x-44 pump_out to 245 rpm", []),                  # a unit after a number
    ("make laimdai_33 setpoitn 465.9", ["setpoint"]),        # one slipped letter, in a long word
    ("set pump-3 target temperature to 50", ["setpoint", "temperature"]),
    ("list all presses", []),
])
def test_the_table_names_the_points_an_operator_means(text, points):
    assert SHIPPED.named(text) == points
    assert SHIPPED.hint(text) == (points[0] if len(points) == 1 else None)


def test_the_corpus_and_the_runtime_share_one_table():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models" / "recipe"))
    import corpus

    for canon, said in corpus.POINTS.items():
        assert set(said) <= set(POINT_WORDS[canon]), canon
        for s in said:
            assert SHIPPED.named(f"what is the {s} of pump-3") == [canon], s
    for canon, forms in corpus.HOW.items():
        for f in forms:
            assert SHIPPED.hint(f"{f} is pump-3") == canon


def test_one_point_named_is_the_one_the_grammar_offers():
    narrowed = ops.TOOLSET.narrowed("how hot is boiler_2 right now")
    q = next(b for b in narrowed["anyOf"] if b["properties"]["tool"]["const"] == "query_stats")
    assert q["properties"]["args"]["properties"]["point"] == {"enum": ["temperature"]}
    narrowed = ops.TOOLSET.narrowed("boiler_2 numbers please")  # none named: every point and the words
    q = next(b for b in narrowed["anyOf"] if b["properties"]["tool"]["const"] == "query_stats")
    assert {"temperature", "level", "numbers"} <= set(q["properties"]["args"]["properties"]["point"]["enum"])


def test_a_gateway_adds_its_own_points_and_words():
    table = PointTable({"fan_speed": ["blower", "how loud"], "temperature": ["boiler heat"]})
    assert table.hint("how loud is ahu-2") == "fan_speed"
    assert table.hint("the blower of ahu-2") == "fan_speed"
    assert table.hint("boiler heat on b-1") == "temperature"
    assert "fan_speed" in table.names and SHIPPED.hint("how loud is ahu-2") is None
    narrowed = ops.TOOLSET.narrowed("how loud is ahu-2", table)
    q = next(b for b in narrowed["anyOf"] if b["properties"]["tool"]["const"] == "query_stats")
    assert q["properties"]["args"]["properties"]["point"] == {"enum": ["fan_speed"]}


def test_config_points_are_bounded_and_checked():
    cfg = loads('[[ask.points]]\nname = "fan_speed"\nwords = ["blower"]\n')
    assert cfg.ask.points[0].name == "fan_speed" and cfg.ask.points[0].words == ["blower"]
    for bad, msg in (('name = "fan speed"', r"ask.points\[0\].name"),
                     ('name = "x"\nwords = ["' + "w" * 49 + '"]', r"ask.points\[0\].words"),
                     ('name = "x"\nwords = [' + ",".join(['"w"'] * 17) + "]", r"at most 16")):
        with pytest.raises(ConfigError, match=msg):
            loads("[[ask.points]]\n" + bad + "\n")
    with pytest.raises(ConfigError, match="at most 64 points"):
        loads("".join(f'[[ask.points]]\nname = "p{i}"\n' for i in range(65)))


def loads(text: str):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return from_dict(tomllib.loads(text))


def _args_of(narrowed: dict, tool: str) -> dict:
    return next(b for b in narrowed["anyOf"] if b["properties"]["tool"]["const"] == tool)["properties"]["args"]


def test_with_a_registry_the_grammar_offers_its_devices_and_their_points():
    known = {"pump-3": ["speed", "temperature", "pump_out"], "tank-1": ["level"]}
    args = _args_of(ops.TOOLSET.narrowed("what is pump-3 doing, and tank-1", known=known), "query_stats")
    branches = {b["properties"]["device"]["const"]: b["properties"]["point"]["enum"] for b in args["anyOf"]}
    assert set(branches) == {"pump-3", "tank-1"}
    assert branches["pump-3"][:3] == ["speed", "temperature", "pump_out"] and branches["tank-1"][0] == "level"
    # a point the question names that the device lacks stays the point: the answer says so, nothing is invented
    args = _args_of(ops.TOOLSET.narrowed("vibration of pump-3", known=known), "query_stats")
    assert args["properties"]["point"] == {"enum": ["vibration"]} and args["properties"]["device"] == {
        "const": "pump-3"}
    # names the registry does not have: the question's words, as without a registry (ask then clarifies)
    args = _args_of(ops.TOOLSET.narrowed("speed of pump-33", known=known), "query_stats")
    assert args["properties"]["device"] == {"enum": ["pump-33"]}


def test_the_model_under_a_registry_grammar_names_only_what_the_gateway_has():
    from edge_agent.config import ModelConfig
    from edge_agent.glm.engine import Engine

    known = {"pump-3": ["speed", "temperature"], "tank-1": ["level"]}
    e = Engine(ModelConfig(providers=["cpu"]), ops.TOOLSET)
    e.load()
    try:
        for text in ("what is the speed of pump-3", "pump-3 temperature now?", "how full is tank-1",
                     "max speed of pump-3 in the last hour"):
            call = e.plan(text, known=known).call
            assert call["tool"] == "query_stats", (text, call)
            assert call["args"]["device"] in known and call["args"]["point"] in known[call["args"]["device"]]
    finally:
        e.close()


def test_a_yes_no_question_about_a_value_reads_its_last_value():
    from edge_agent.glm.schema import is_yes_no_now

    for text in ("is the humidity in greenhouse-2 higher than 60", "is tank-22 level above 80?", "is pump-30 running?"):
        assert is_yes_no_now(text), text
        q = _args_of(ops.TOOLSET.narrowed(text), "query_stats")["properties"]
        assert q["agg"] == {"enum": ["last"]} and q["window_s"] == {"enum": [60]}
    for text in ("is the average temperature of pump-3 above 20 today", "was the max pressure above 5?",
                 "what is the temperature of x-1", "is x-1 temp above 20 in the last hour"):
        assert not is_yes_no_now(text), text


def test_the_registrys_own_names_extend_the_composers_table_but_never_the_request_words():
    t = SHIPPED.with_registered({"turbidity", "uv_intensity", "moisture", "count", "status", "temperature"})
    assert t.named("clarifier_1 turbidity and ph now") == ["turbidity"]
    assert t.named("uv intensity of uv-2") == ["uv_intensity"] and t.named("turbdity") == ["turbidity"]
    assert t.named("moisture of bin-4") == ["moisture"]  # said as registered: the registry's point
    assert SHIPPED.named("moisture of bin-4") == ["humidity"]  # the shipped table itself is unchanged
    assert t.named("count of readings on pump-1") == [] and t.named("status please") == []
    assert SHIPPED.with_registered({"temperature", "count"}) is SHIPPED  # nothing new: the same table
    assert SHIPPED.with_registered({"turbidity"}) is SHIPPED.with_registered({"turbidity"})  # kept, bounded
