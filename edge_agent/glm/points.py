"""Operators' words for points: one table, shared by the corpus that trains the model and the runtime that
constrains it ("how hot" -> temperature, "fill" -> level, "amps" -> current).

A gateway adds its own point names and words in config (`ask.points`): `{"fan_speed": ["fan", "blower"]}` makes
`fan_speed` a point the grammar offers and "fan" a word that names it.

At run time the table narrows a question's point: where the question's words name exactly one point, that point is
the one the grammar offers (two or more, or none: the model chooses, as before).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from edge_agent.glm.words import one_edit

# canonical point -> the words operators use for it. Phrases are matched on whole words; the first spelling is the
# canonical name itself.
POINT_WORDS: dict[str, tuple[str, ...]] = {
    "temperature": ("temperature", "temp", "tmp", "temperatures", "temps", "how hot", "how warm", "how cold",
                    "tempreture", "tempurature"),
    "pressure": ("pressure", "pres", "press.", "psi"),
    "humidity": ("humidity", "hum", "rh", "relative humidity", "how humid", "moisture"),
    "speed": ("speed", "spd", "how fast"),
    "flow": ("flow", "flow rate", "flowrate", "throughput"),
    "level": ("level", "lvl", "fill level", "fill", "how full", "fullness"),
    "voltage": ("voltage", "volts", "volt"),
    "current": ("current", "amps", "amperage", "current draw", "amp"),
    "power": ("power", "kw", "power draw", "wattage", "watts", "kilowatts"),
    "vibration": ("vibration", "vib", "vibe", "vibrations", "shaking"),
    "setpoint": ("setpoint", "set point", "sp", "target"),
    "co2": ("co2", "carbon dioxide"),
    "rpm": ("rpm", "revs", "revolutions"),
    "enabled": ("enabled", "on or off", "switched on", "turned on", "switched off", "turned off", "active", "stopped"),
    "mode": ("mode", "operating mode"),
}
# phrases that are questions about a point ("how hot is boiler-2"): the corpus writes them in their own templates
QUESTION_FORMS = frozenset(p for ws in POINT_WORDS.values() for p in ws if p.startswith("how "))
# words that name a point on their own but qualify a neighbour: "co2 level" is co2, "current temperature" is
# temperature
_GENERIC_AFTER = frozenset({"level"})
_ADJECTIVE_BEFORE = frozenset({"current"})
# verbs that start with a point's word: "power up pump-3" names no point
_VERBS = frozenset({("power", "up"), ("power", "down"), ("power", "on"), ("power", "off"), ("power", "cycle")})
_DETERMINERS = frozenset({"the", "its", "their", "of", "what", "what's", "whats", "and", "at", "on", "for", "current"})
# after a number these are its unit, not the point ("to 245 rpm", "5 kw", "-46 degrees")
_UNITS = frozenset({"rpm", "kw", "psi", "amps", "amp", "volts", "volt", "watts", "degrees", "revs", "kilowatts"})
# registered point names that are words of requests, not points ("count of readings", "the status", "stop"): a
# device that registers a point called "stop" must not make "stop pump-1" name it
_RESERVED = frozenset("count min max avg mean last status state alarm alarms alert alerts now today hour day all value "
                      "it on off set is of the and or to in at if when then yes no stop start open close shut turn "
                      "switch enable disable run halt restart pause resume put make change adjust raise lower read "
                      "check show list compare what whats how which please pls every each both undo back".split())
# at most this many registry names join the composer's table: past it, only those the request says as they are
MAX_REGISTERED = 512
_NUMBER = re.compile(r"-?[0-9][0-9.,]*")
_WORD = re.compile(r"[a-z0-9_\-\u2082]+")


def _adjective(word: str) -> bool:
    """"current" or one slip of it ("curent level" is the level, now)."""
    return word in _ADJECTIVE_BEFORE or len(word) >= 6 and any(one_edit(word, a) for a in _ADJECTIVE_BEFORE)


def _split(phrase: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(phrase.lower()))


class PointTable:
    """The point names the grammar offers and the phrases that name each (the shipped table plus a gateway's)."""

    def __init__(self, extra: Mapping[str, list[str]] | None = None) -> None:
        self._extra = {k: list(v) for k, v in (extra or {}).items()}
        self._with: dict[frozenset, PointTable] = {}
        words: dict[str, list[str]] = {k: list(v) for k, v in POINT_WORDS.items()}
        for name, said in (extra or {}).items():
            words.setdefault(name, [name])
            words[name].extend(s for s in said if s not in words[name])
        self.names: tuple[str, ...] = tuple(words)
        self._phrases: dict[tuple[str, ...], str] = {}
        for name, said in words.items():
            for s in [name, *said]:
                key = _split(s)
                if key:
                    self._phrases.setdefault(key, name)
        self._longest = max(len(k) for k in self._phrases)
        self._seen: dict[str, str | None] = {}
        self._single = {k[0]: p for k, p in self._phrases.items() if len(k) == 1 and len(k[0]) >= 6}

    def named(self, text: str) -> list[str]:
        """The points a question's words name, in order, without repeats ("how hot is boiler-2" -> [temperature])."""
        toks = _WORD.findall(text.lower())
        found: list[tuple[str, str, int, int]] = []  # (point, phrase's last word, start, end)
        i = 0
        while i < len(toks):
            if tuple(toks[i:i + 2]) in _VERBS and (i == 0 or toks[i - 1] not in _DETERMINERS):
                i += 2
                continue
            if i and _NUMBER.fullmatch(toks[i - 1]) and toks[i] in _UNITS:  # "245 rpm", "20 psi": a unit
                i += 1
                continue
            for n in range(min(self._longest, len(toks) - i), 0, -1):
                hit = self._phrases.get(tuple(toks[i:i + n]))
                if hit is None and n == 1 and len(toks[i]) >= 4 and toks[i].endswith("s") \
                        and len(toks[i][:-1]) >= 4:  # a plural: "levels", "flows", "speeds"
                    hit = self._phrases.get((toks[i][:-1],))
                if hit is None and n == 1 and len(toks[i]) >= 6:  # a slipped finger: "setpoitn", "temprature"
                    hit = self._fuzzy(toks[i])
                if hit is not None:
                    found.append((hit, toks[i + n - 1], i, i + n))
                    i += n
                    break
            else:
                i += 1
        keep = []
        for j, (point, word, start, end) in enumerate(found):
            before = found[j - 1] if j else None
            after = found[j + 1] if j + 1 < len(found) else None
            if word in _GENERIC_AFTER and end - start == 1 and before is not None and before[3] == start \
                    and before[0] != point and not _adjective(before[1]):  # "current level" is the level
                continue
            if _adjective(word) and end - start == 1 and after is not None and after[2] == end \
                    and after[0] != point:
                continue
            keep.append(point)
        return list(dict.fromkeys(keep))

    def _fuzzy(self, word: str) -> str | None:
        if word not in self._seen:
            if len(self._seen) >= 4096:  # operators repeat their words; bounded all the same
                self._seen.clear()
            self._seen[word] = next((p for k, p in self._single.items() if one_edit(word, k)), None)
        return self._seen[word]

    def with_registered(self, names) -> PointTable:
        """This table plus the registry's own point names ("turbidity", "uv_intensity", said "uv intensity" too), for
        the composer's reading of words (the model's grammar is not widened by it). A registered name that is a word of
        the request language ("count", "status", "max"...) is not added. At most 16 such tables are kept."""
        new = frozenset(n for n in names if isinstance(n, str) and 2 <= len(n) <= 64 and n not in self.names
                        and n.lower() not in _RESERVED and _WORD.fullmatch(n.lower()))
        if len(new) > MAX_REGISTERED:
            return self  # a registry this large: Composer narrows it to the names a request says (said())
        if not new:
            return self
        if new not in self._with:
            if len(self._with) >= 16:
                self._with.clear()
            extra = {k: list(v) for k, v in self._extra.items()}
            for n in sorted(new):
                extra[n] = [n.lower().replace("_", " ")] if "_" in n else []
            table = PointTable(extra)
            for n in new:  # a registered name said as it is names that point ("moisture", not humidity's word)
                for key in {_split(n), _split(n.replace("_", " "))}:
                    table._phrases[key] = n
                if len(n) >= 6 and len(_split(n)) == 1:
                    table._single[_split(n)[0]] = n
            self._with[new] = table
        return self._with[new]

    @staticmethod
    def said(names, text: str) -> list[str]:
        """The registered names a text says as they are ("uv_intensity", "uv intensity"): for a registry too large
        to join the table whole."""
        toks = set(_WORD.findall(text.lower()))
        return [n for n in names if isinstance(n, str) and (n.lower() in toks or set(_split(n.replace("_", " "))) <= toks)]

    def words_of(self, point: str) -> frozenset[str]:
        """Every word of every phrase that names `point` ("how", "hot", "temp", ... for temperature)."""
        return frozenset(w for key, p in self._phrases.items() if p == point for w in key)

    def hint(self, text: str) -> str | None:
        """The one point a question names, or None (none, or more than one)."""
        named = self.named(text)
        return named[0] if len(named) == 1 else None


SHIPPED = PointTable()
