"""The model's whole output language: one JSON tool call, and the prompt around the operator's text.

Shared by the recipe that trains the model and the runtime that constrains it, so the two never drift.
"""
from __future__ import annotations

import enum
import functools
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from edge_agent.glm.points import SHIPPED, PointTable
from edge_agent.glm.words import (LONG_UNITS, NUMBER_WORDS, PARTS, REAL_WORDS, TABLES, TOKEN, UNIT_SECONDS,
                                  UNIT_WORDS, one_edit)

USER = "<|user|>"
ASSISTANT = "<|assistant|>"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [PAD, EOS, USER, ASSISTANT]

MAX_TEXT_CHARS = 256  # an operator's question beyond this is refused before tokenization
MAX_NAME_CHARS = 48  # device / point / filter / string value bound inside the grammar
AGGS = ("last", "min", "max", "avg", "count")
MAX_WINDOW_S = 366 * 86400
MAX_KNOWN_POINTS = 64  # a registered device's points offered to the grammar
_STRIP = ",.;:!?()[]{}\"'`"
# words that never name a device or a filter: articles, prepositions, pronouns, question and list words
FUNCTION_WORDS = frozenset("""a an the this that these those it its all any every each some of on in at to for from with
by about over under into onto via per and or not no is are was were be been do does did have has had can could would
will should may might must you your i me my we our us they them their what which who whom whose when where why how
list show find give get tell see know say please pls thanks ok hey hi whole entire online connected device devices
there here now""".split())

# the words that say on or off (the guard's and the second look's)
ON_WORDS = ("on", "start", "enable", "activate", "resume", "open", "up", "true", "run", "engage")
OFF_WORDS = ("off", "stop", "disable", "deactivate", "halt", "close", "down", "shut", "false", "kill", "pause")

_NAME = {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS}
_NUMBER = {"type": "number", "minimum": -1e9, "maximum": 1e9}


class Arg(enum.Enum):
    """What a tool's argument is, which says how it is spelt, narrowed to a question and checked."""
    DEVICE = "device"                  # a device id, copied from the question
    DEVICE_OR_NULL = "device_or_null"  # a device id, or null for all
    POINT = "point"                    # a canonical point, or a word of the question
    AGG = "agg"                        # one of AGGS
    WINDOW = "window"                  # seconds: a number the question says times a unit, or a convention
    VALUE = "value"                    # a number the question says, a boolean, or a word of the question
    FILTER = "filter"                  # a word of the question (a plural's singular), or null
    REASON = "reason"                  # why no action: one of CLARIFY_REASONS


# the model's "no action" answer: nothing the gateway can do was asked; which device?; which value?; it depends on a
# condition (a rule's job, not a write now)
CLARIFY_REASONS = ("nothing", "which_device", "which_value", "use_a_rule")
NAMED = (Arg.DEVICE, Arg.POINT, Arg.VALUE)  # a tool with one of these needs a word of the question


@dataclass(frozen=True)
class ToolSpec:
    """One tool the model may call: its name, its arguments in the order the model writes them, an example call's
    arguments (where lookahead drafts an answer's keys from). Declared by the operation that runs it."""
    name: str
    args: tuple[tuple[str, Arg], ...]
    example: dict[str, Any]


# the tool that runs nothing: the model's way to say that a question asks for no action, or not enough to act on
CLARIFY = ToolSpec("clarify", (("reason", Arg.REASON),), {"reason": "which_device"})


def _arg_schema(kind: Arg) -> dict[str, Any]:
    if kind in (Arg.DEVICE, Arg.POINT):
        return dict(_NAME)
    if kind in (Arg.DEVICE_OR_NULL, Arg.FILTER):
        return {"anyOf": [dict(_NAME), {"type": "null"}]}
    if kind is Arg.AGG:
        return {"enum": list(AGGS)}
    if kind is Arg.WINDOW:
        return {"type": "integer", "minimum": 1, "maximum": MAX_WINDOW_S}
    if kind is Arg.VALUE:
        return {"anyOf": [dict(_NUMBER), {"type": "boolean"}, dict(_NAME)]}
    if kind is Arg.REASON:
        return {"enum": list(CLARIFY_REASONS)}
    raise AssertionError(kind)  # pragma: no cover - Arg is a closed set


def _args(args: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": args, "required": list(args), "additionalProperties": False}


def _tool(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """{"tool": name, "args": {...}} with exactly these args, in this order (the order the model writes them
    and the grammar enforces)."""
    return _tool_branches(name, [args])


def _tool_branches(name: str, branches: list[dict[str, Any]]) -> dict[str, Any]:
    """A tool whose args are one of several sets (one per registered device, each with its own points)."""
    body = _args(branches[0]) if len(branches) == 1 else {"anyOf": [_args(b) for b in branches]}
    return {"type": "object", "additionalProperties": False, "required": ["tool", "args"],
            "properties": {"tool": {"const": name}, "args": body}}


FORMAT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def _sibilant_singular(word: str) -> str:
    """"buses" -> "bus", "boxes" -> "box", "switches" -> "switch" ('' for any other word)."""
    return word[:-2] if word.endswith(("ses", "xes", "zes", "ches", "shes")) and len(word) > 4 else ""


def candidates(text: str) -> list[str]:
    """The words of a question that may name a device, a point, a filter or a string value."""
    out: list[str] = []
    for word in text.split():
        w = word.strip(_STRIP)
        if w.endswith("'s"):
            w = w[:-2]
        for c in (w, w[:-1] if w.endswith("s") and len(w) > 2 else "", _sibilant_singular(w)):
            if c and len(c) <= MAX_NAME_CHARS and c not in out and '"' not in c and "\\" not in c:
                out.append(c)
    return out[:64]


CONVENTIONAL_WINDOWS = (60, 900, 1800, 3600, 86400, 604800)  # now, quarter hour, half hour, hour, day, week
MAX_NUMBERS = 16


def lookup(word: str, table: dict[str, int], fuzzy_from: int = 5) -> int | None:
    """table[word], forgiving one slipped letter in a word of `fuzzy_from` letters or more ("fivve", "huors"); short
    words collide ("hour" is one letter from "four", "says" from "days")."""
    if word in table:
        return table[word]
    return _fuzzy(word, id(table)) if len(word) >= fuzzy_from and word not in REAL_WORDS else None


@functools.lru_cache(maxsize=4096)  # operators repeat their words; bounded all the same
def _fuzzy(word: str, table_id: int) -> int | None:
    table = TABLES[table_id]
    return next((v for w, v in table.items() if len(w) >= 4 and one_edit(word, w)), None)


def tokens(text: str) -> list[str | float]:
    """Words (lower case), punctuation and numbers written in digits ("-23", "67.44", "1,500", the 23 of "23m").
    Digits glued into a name ("pump-7", "line1_boiler2") are the name's, not a number: they are left out."""
    toks: list[str | float] = []
    for m in TOKEN.finditer(text):
        t, i = m.group(), m.start()
        if "0" <= t[0] <= "9":
            before = text[i - 1] if i else " "
            if before.isalnum() or before == "_":
                continue
            sign = 1.0
            if before == "-":
                if i >= 2 and (text[i - 2].isalnum() or text[i - 2] == "_"):
                    continue
                sign = -1.0
                if toks and toks[-1] == "-":
                    toks.pop()
            toks.append(sign * float(t.replace(",", "")))
        else:
            toks.append(t.lower())
    return toks


def _is_minus(toks: list[str | float], i: int) -> bool:
    """'minus' or 'negative', or one slip of a finger from either ("minnus 40", "mins 40") right before a number and
    not right after one ("40 mins" is a unit): a sign lost to a typo would write the opposite value."""
    tok = toks[i]
    if tok in ("minus", "negative"):
        return True
    if not isinstance(tok, str) or len(tok) < 4 or not (one_edit(tok, "minus") or one_edit(tok, "negative")):
        return False
    nxt = toks[i + 1] if i + 1 < len(toks) else "."
    number_next = isinstance(nxt, float) or (isinstance(nxt, str) and lookup(nxt, NUMBER_WORDS) is not None)
    return number_next and not (i and isinstance(toks[i - 1], float))


def quantities(toks: list[str | float]) -> list[tuple[float, str]]:
    """(number, the word after it) for every number in the tokens, in digits or in English words ("forty-nine",
    "two hundred and forty", "sixty two point five", "minus twelve")."""
    toks = [*toks, "."]
    out: list[tuple[float, str]] = []
    sign, i = 1.0, 0
    while i < len(toks):
        tok = toks[i]
        if isinstance(tok, float):
            after = next((t for t in toks[i + 1:] if t != "-"), ".")
            out.append((sign * tok, after if isinstance(after, str) else "."))
            sign, i = 1.0, i + 1
            continue
        if _is_minus(toks, i):
            sign, i = -1.0, i + 1
            continue
        total: float | None = None
        part, last = 0.0, ""  # the number being read: total so far, current group, the last word's kind
        while isinstance(toks[i], str):
            v = lookup(toks[i], NUMBER_WORDS)
            if v is None:
                if toks[i] in ("and", "-") and total is not None:
                    i += 1
                    continue
                break
            if total is None:
                total = 0.0
            if v == 100:
                part, last = (part or 1) * 100, "scale"
            elif v == 1000:
                total, part, last = total + (part or 1) * 1000, 0.0, "scale"
            else:
                if last == "ones" or (last == "tens" and v >= 10):  # "one two", "twenty thirty": two numbers
                    out.append((sign * (total + part), toks[i]))
                    sign, total, part = 1.0, 0.0, 0.0
                part += v
                last = "tens" if v >= 20 else "ones"
            i += 1
        if total is None:
            sign, i = 1.0, i + 1
            continue
        value = total + part
        if toks[i] == "point":  # decimals, one digit word each: "point two five"
            digits = ""
            while isinstance(toks[i + 1], str) and (lookup(toks[i + 1], NUMBER_WORDS) or 10) < 10:
                digits += str(lookup(toks[i + 1], NUMBER_WORDS))
                i += 1
            if digits:
                value = float(f"{int(value)}.{digits}")
                i += 1
        out.append((sign * value, toks[i] if isinstance(toks[i], str) else "."))
        sign = 1.0
    return out


def _plain(v: float) -> int | float:
    return int(v) if float(v).is_integer() else v


def numbers(text: str) -> list[int | float]:
    """The numbers an operator wrote (see quantities), in order, without repeats."""
    return _numbers(quantities(tokens(text)))


def _numbers(said: list[tuple[float, str]]) -> list[int | float]:
    return list(dict.fromkeys(_plain(v) for v, _ in said if abs(v) <= 1e9))[:MAX_NUMBERS]


def windows(text: str) -> list[int]:
    return _windows(text)[0]


def _windows(text: str) -> tuple[list[int], bool]:
    """The time windows a question states, in seconds: a number with a unit ("19 days", "forty nine m", "23m"),
    a unit alone ("the last hour"), a quarter or half hour, today. None stated: the conventional windows and every
    number times every unit, for the model to choose from."""
    toks = tokens(text)
    said_quantities = quantities(toks)
    stated = []
    for v, u in said_quantities:
        unit = lookup(u, UNIT_WORDS)
        if v > 0 and unit and float(v * unit).is_integer():
            stated.append(int(v * unit))
    for i, w in enumerate(toks):
        if not isinstance(w, str):
            continue
        prev = next((t for t in reversed(toks[:i]) if t not in ("-", "an")), "")
        if isinstance(prev, float) or lookup(prev, NUMBER_WORDS) is not None:
            continue  # "19 days" was read above
        unit = lookup(w, LONG_UNITS)
        if unit is None and w in ("day", "min", "sec", "hr", "wk") and prev in ("last", "past", "previous", "prior"):
            unit = UNIT_WORDS[w]  # "over the last day", "in the past min": a short unit said alone after "last"
        part = lookup(prev, PARTS, fuzzy_from=3) if unit == 3600 else None
        if w == "today":
            stated.append(86400)
        elif part:
            stated.append(part)
        elif unit:
            stated.append(unit)
    stated = [w for w in stated if 1 <= w <= MAX_WINDOW_S]
    if stated:
        return list(dict.fromkeys(stated)), True
    said = [v for v in _numbers(said_quantities) if v > 0]
    return sorted({*CONVENTIONAL_WINDOWS, *(int(n * u) for n in said for u in UNIT_SECONDS.values()
                                            if float(n * u).is_integer() and 1 <= n * u <= MAX_WINDOW_S)}), False


# a yes/no question about a value ("is tank-22 level above 80?"): about the value now, unless it names an aggregate
# or a window
_YES_NO = frozenset("is are was were does do did has have".split())
_AGG_WORDS = frozenset("max maximum min minimum avg average mean highest lowest peak top smallest typical count "
                       "many readings samples".split())


def is_yes_no_now(text: str) -> bool:
    toks = [t for t in tokens(text) if isinstance(t, str)]
    if not toks or toks[0] not in _YES_NO or any(t in _AGG_WORDS for t in toks):
        return False
    return not _windows(text)[1]


def prompt(text: str) -> str:
    """The exact string the model sees before it writes the call (GLM-Edge chat layout)."""
    return f"{USER}\n{text.strip()}{ASSISTANT}\n"


def format_call(call: dict[str, Any]) -> str:
    """The canonical spelling of a call: the one the model is trained to write."""
    return json.dumps(call, separators=(",", ":"), ensure_ascii=False)


class InvalidCall(ValueError):
    pass


def _name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME_CHARS:
        raise InvalidCall(f"{key} must be a string of 1..{MAX_NAME_CHARS} characters")
    return value


def _check(kind: Arg, key: str, v: Any) -> None:
    if kind in (Arg.DEVICE, Arg.POINT):
        _name(v, key)
    elif kind in (Arg.DEVICE_OR_NULL, Arg.FILTER):
        if v is not None:
            _name(v, key)
    elif kind is Arg.AGG:
        if v not in AGGS:
            raise InvalidCall(f"{key} must be one of {', '.join(AGGS)}")
    elif kind is Arg.WINDOW:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_WINDOW_S:
            raise InvalidCall(f"{key} must be an integer in 1..{MAX_WINDOW_S}")
    elif kind is Arg.REASON:
        if v not in CLARIFY_REASONS:
            raise InvalidCall(f"{key} must be one of {', '.join(CLARIFY_REASONS)}")
    elif kind is Arg.VALUE:
        if isinstance(v, str):
            _name(v, key)
        elif not isinstance(v, bool) and (not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > 1e9):
            raise InvalidCall(f"{key} must be a finite number, a boolean or a short string")
    else:  # pragma: no cover - Arg is a closed set
        raise AssertionError(kind)


class Toolset:
    """The tools the model may call (declared by the operations that run them): the grammar of every answer, the
    grammar narrowed to one question, and the hand check of a call (the second lock)."""

    def __init__(self, specs: Iterable[ToolSpec]) -> None:
        self.specs = {s.name: s for s in specs}
        self.names = tuple(self.specs)
        # tools that need no word of the question: what a question without a usable word may still get
        self.nameless = tuple(n for n, s in self.specs.items() if not any(k in NAMED for _, k in s.args))
        self.schema: dict[str, Any] = {"x-guidance": FORMAT, "anyOf": [
            _tool(s.name, {a: _arg_schema(k) for a, k in s.args}) for s in self.specs.values()]}
        self.example_calls = tuple({"tool": s.name, "args": dict(s.example)} for s in self.specs.values())
        for call in self.example_calls:
            self.validate(call)

    def subset(self, names: Iterable[str]) -> dict[str, Any]:
        keep = set(names)
        return {**self.schema, "anyOf": [b for b in self.schema["anyOf"] if b["properties"]["tool"]["const"] in keep]}

    def narrowed(self, text: str, points: PointTable = SHIPPED,
                 known: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
        """The schema narrowed to one question, every tool (see Narrowing; ask builds only the tool the answer
        names, with Narrowing.tool)."""
        n = Narrowing(self, text, points, known)
        return {"x-guidance": FORMAT, "anyOf": [n.tool(name) for name in n.names]}

    def validate(self, call: Any) -> dict[str, Any]:
        """Check a call against the schema by hand (the grammar already enforces it; this is the second lock)."""
        if not isinstance(call, dict) or set(call) != {"tool", "args"} or not isinstance(call["args"], dict):
            raise InvalidCall('a call is {"tool": NAME, "args": {...}}')
        tool, args = call["tool"], call["args"]
        spec = self.specs.get(tool) if isinstance(tool, str) else None
        if spec is None:
            raise InvalidCall(f"unknown tool {str(tool)[:48]!r}; tools: {', '.join(self.names)}")
        expected = [a for a, _ in spec.args]
        if set(args) != set(expected):
            raise InvalidCall(f"{tool} takes exactly {sorted(expected)}")
        for a, k in spec.args:
            _check(k, a, args[a])
        return call


class Narrowing:
    """A tool set narrowed to one question, built lazily: what a tool's arguments need is worked out from the question
    only when that tool is asked for (an answer names one tool; its grammar is the only one built).

    Names must be spelt as they are in the question (or be a point of the table), so the model can neither invent a
    device nor garble one it copies; numbers must be ones the question says (a written value as it is, a window as
    a number times a unit), so it cannot garble a setpoint either. Where the question's words name one point (the
    point table: "how hot" -> temperature), that point is the one offered. A filter is the singular of a plural
    word ("all pumps" -> "pump", "buses" -> "bus"; "press" stays): a substring that finds at least as much.

    `known` (the gateway's registry: device -> its points), where the question names devices it has: only those
    are offered, each with its own points (a point the question names that the device lacks stays offered, so the
    answer says "no such point" rather than picking another)."""

    def __init__(self, tools: Toolset, text: str, points: PointTable = SHIPPED,
                 known: Mapping[str, Sequence[str]] | None = None) -> None:
        self.tools, self.text, self.points, self.known = tools, text, points, known
        self.words = candidates(text)
        # nothing in the question can name a device or a point: only the nameless calls remain
        self.names = tools.names if self.words else tools.nameless
        self._narrow: dict[Arg, Any] = {}

    def tool(self, name: str) -> dict[str, Any]:
        spec = self.tools.specs[name]
        if not self.words:
            return _tool(name, {a: ({"type": "null"} if k in (Arg.FILTER, Arg.DEVICE_OR_NULL) else _arg_schema(k))
                                for a, k in spec.args})
        args = {a: self._arg(k) for a, k in spec.args}
        kinds = [k for _, k in spec.args]
        registered = self._registered
        if registered and Arg.DEVICE in kinds and Arg.POINT in kinds:  # each device with its own points
            dev = next(a for a, k in spec.args if k is Arg.DEVICE)
            pt = next(a for a, k in spec.args if k is Arg.POINT)
            return _tool_branches(name, [{**args, dev: {"const": d}, pt: self._point_of(d)} for d in registered])
        return _tool(name, args)

    @functools.cached_property
    def _registered(self) -> list[str]:
        return [w for w in self.words if self.known and w in self.known][:8]

    @functools.cached_property
    def _now(self) -> bool:
        """A yes/no question about a value now: its read is the last value (the corpus's convention)."""
        return is_yes_no_now(self.text)

    @functools.cached_property
    def _hint(self) -> str | None:
        return self.points.hint(self.text)

    def _point_of(self, d: str) -> dict[str, Any]:
        has = list(self.known[d])[:MAX_KNOWN_POINTS] if self.known and d in self.known else []
        if self._hint or not has:
            return self._arg(Arg.POINT)
        return {"enum": list(dict.fromkeys([*has, *(w for w in self.words if w != d)]))}

    def _arg(self, kind: Arg) -> Any:
        if kind not in self._narrow:
            self._narrow[kind] = self._build(kind)
        return self._narrow[kind]

    def _build(self, kind: Arg) -> Any:
        words = self.words
        if kind in (Arg.DEVICE, Arg.DEVICE_OR_NULL):
            # device ids carry a digit (0-9) and are not a plain number nor a point's name ("co2"): prefer such words
            numbered = [w for w in words if re.search(r"[0-9]", w) and not re.fullmatch(r"-?[0-9.,]+", w)
                        and w.lower() not in self.points.names]
            named = [w for w in words if w.lower() not in FUNCTION_WORDS] or words
            device = {"enum": self._registered or numbered or named}
            return device if kind is Arg.DEVICE else {"anyOf": [device, {"type": "null"}]}
        if kind is Arg.POINT:
            return {"enum": [self._hint]} if self._hint else {"enum": list(dict.fromkeys([*self.points.names,
                                                                                         *words]))}
        if kind is Arg.AGG:
            return {"enum": ["last"]} if self._now else {"enum": list(AGGS)}
        if kind is Arg.WINDOW:
            return {"enum": [60]} if self._now else {"enum": windows(self.text)}
        if kind is Arg.VALUE:
            said = numbers(self.text)
            return {"anyOf": [*([{"enum": said}] if said else []), {"type": "boolean"}, {"enum": words}]}
        if kind is Arg.FILTER:
            plurals = {w for w in words if w.endswith("s") and not w.endswith("ss") and w[:-1] in words}
            plurals |= {w[:-1] for w in words if _sibilant_singular(w) in words and _sibilant_singular(w)}
            filters = [w for w in words if w not in plurals and w.lower() not in FUNCTION_WORDS]
            return {"anyOf": [{"enum": filters}, {"type": "null"}]} if filters else {"type": "null"}
        if kind is Arg.REASON:
            return {"enum": list(CLARIFY_REASONS)}
        raise AssertionError(kind)  # pragma: no cover - Arg is a closed set
