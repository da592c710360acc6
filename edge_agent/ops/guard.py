"""The operator's words against the model's write: defence in depth outside the model.

The GLM only proposes. A `write_point` it proposes runs only when the question is a plain imperative that states
what to write: the value in the operator's own words (a number for a numeric point; on/off, start/stop,
enable/disable words for `enabled`, their direction agreeing with the value; a stated mode word for `mode`), a
device named by its id, and nothing that makes it a question, a negation, a condition, a reminder, a request to be
alerted or a how-to. Anything else becomes `clarify` with the reason — an answer, not an error, and nothing is
written. The checks read the words; they do not need the model to be right.
"""
from __future__ import annotations

import functools
import re
from typing import NamedTuple

from edge_agent.glm.points import POINT_WORDS, SHIPPED, PointTable
from edge_agent.glm.schema import FUNCTION_WORDS, OFF_WORDS, ON_WORDS, candidates, lookup, numbers, quantities, tokens
from edge_agent.glm.words import UNIT_WORDS, one_edit

_WORD = re.compile(r"[a-z0-9_'-]+")
_QUESTION_OPENERS = {"is", "are", "was", "were", "does", "do", "did", "has", "have", "had", "what", "why", "who",
                     "whom", "whose", "when", "where", "how", "which", "should", "shall", "might", "may", "isn't",
                     "aren't", "wasn't", "doesn't", "didn't", "what's", "who's", "how's", "where's", "when's", "why's",
                     "which's", "explain", "describe"}
_REQUESTS = {"can", "could", "would", "will", "please", "pls", "kindly"}  # "could you set ..." is an order
_POLITE = _REQUESTS | {"you", "u", "hey", "hi", "ok", "okay", "yo", "now", "then", "so", "and", "just"}
_NEGATIONS = {"not", "don't", "dont", "never", "no", "without", "nor", "cannot", "avoid", "neither", "nothing"}
_CONDITIONS = {"if", "when", "whenever", "once", "unless", "until", "in case", "as soon as", "while", "provided",
               "assuming"}
_TIMES = {"after", "before", "later", "tomorrow", "tonight", "remind", "remember", "schedule", "every", "daily",
          "hourly", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "midnight", "noon",
          "morning", "evening", "afternoon", "weekend", "o'clock", "next", "soon", "eventually", "overnight"}
# a clock time ("at 6", "6pm", "18:30") or a delay ("in an hour", "in 10 minutes"): an order for later
_CLOCK = re.compile(r"\bat \d|\d\s*(?:am|pm)\b|\b\d{1,2}:\d{2}\b|\bin (?:an?|\d+|a few|some|[a-z]+) (?:sec|min|hour|hr|day)")
_ASKING = {"we", "i", "us"}  # "could we ...?", "can i ...?": a question about a possibility, not a request
_ALERTS = ("alert me", "notify me", "warn me", "let me know", "tell me when", "tell me if", "ping me",
           "message me", "email me", "page me", "heads up", "send an alert", "raise an alarm", "alarm me")
_HOWTO = ("how do i", "how can i", "how to", "how would i", "how should i", "what happens if", "what would happen",
          "what if", "suppose", "imagine", "hypothetically", "would it", "could it")
_NUMERIC = frozenset(POINT_WORDS) - {"enabled", "mode"}  # the shipped points that take numbers
_NOT_VALUES = {"different", "new", "another", "other", "something", "value", "number", "mode", "setting", "bit",
               "more", "less", "higher", "lower", "up", "down", "sensible", "right", "correct", "same"}
# words of a question about readings: an order to write never needs them
_READ_WORDS = ("highest", "lowest", "average", "mean", "peak", "readings", "samples", "how many", "trend", "history")
# words that shape an order, never a point's name (nor one slip of a finger away from one: "shoould")
_ORDER_WORDS = frozenset("should would could shall must be set make change update bring put write adjust move turn "
                         "switch please".split())


def _like_order_word(word: str) -> bool:
    return word in _ORDER_WORDS or (len(word) >= 5 and any(one_edit(word, w) for w in _ORDER_WORDS if len(w) >= 4))


def _durations(text: str) -> set:
    """Numbers the question says with a unit of time after them in a window ("the last 56 minutes"): lengths of
    time, not values ("set the delay of timer-1 to 30 seconds" is a value)."""
    toks = tokens(text)
    if not any(w in toks for w in ("last", "past", "previous", "within", "ago", "since")):
        return set()
    return {v for v, unit in quantities(toks) if lookup(unit, UNIT_WORDS) is not None}


_PRONOUNS = {"it", "this", "that", "them", "they", "these", "those", "one", "thing", "device", "the"}


def _words(text: str) -> list[str]:
    """The question's words, a slipped finger undone on the guard's own words ("imagien" -> "imagine", "nevr" ->
    "never"): a typo must not hide a negation, a condition, a later or a what-if. Only drops, additions and swaps
    of neighbours, in words of five letters or more, so no plain word turns into one ("water" is no "later")."""
    return [_unslipped(w) for w in _WORD.findall(text.lower().replace("\u2019", "'"))]


def _slip(a: str, b: str) -> bool:
    """a is b with one letter dropped or added, or two neighbours swapped."""
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
    if abs(len(a) - len(b)) != 1:
        return False
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


_GUARD_WORDS = tuple(sorted({w for group in (_NEGATIONS, _CONDITIONS, _TIMES, _QUESTION_OPENERS, _HOWTO, _ALERTS)
                             for phrase in group for w in phrase.split() if len(w) >= 5}))


_REAL_WORDS = {"alter"}  # words that are a slip away from a guard word and mean something else ("later")


@functools.lru_cache(maxsize=4096)  # bounded: operators repeat their words
def _unslipped(word: str) -> str:
    if len(word) < 5 or word in _GUARD_WORDS or word in _REAL_WORDS:
        return word
    return next((g for g in _GUARD_WORDS if _slip(word, g)), word)


class Refusal(NamedTuple):
    """Why a write is not made: the clarify reason (a code, one of schema.CLARIFY_REASONS) and the same in words."""
    code: str
    why: str


def check_write(text: str, args: dict, points: PointTable = SHIPPED) -> Refusal | None:
    """None when the question plainly asks for exactly this write; else the Refusal that says why.
    `points`: the gateway's point table (the shipped one and its own words, ask.points)."""
    low = " " + " ".join(_words(text)) + " "
    words = low.split()
    if not words:
        return Refusal("nothing", "the question asks nothing the gateway can do")
    opener = next((w for w in words if w not in _POLITE), "")
    asked = text.rstrip().endswith("?") and (words[0] not in _REQUESTS or (len(words) > 1 and words[1] in _ASKING))
    if opener in _QUESTION_OPENERS or asked:
        return Refusal("nothing", "that reads as a question, not an order to write; say it as a command to change "
                                  "anything")
    if any(p in low for p in _HOWTO):
        return Refusal("nothing", "that asks how or what if, not for a write; say the change itself to make it")
    read = next((w for w in _READ_WORDS if f" {w} " in low), None)
    if read is not None:
        return Refusal("nothing", f"that asks about readings ({read!r}), not for a write; say the change itself to "
                                  "make it")
    if any(p in low for p in _ALERTS):
        return Refusal("use_a_rule", "to be alerted, add a rule (rules.add); nothing was written")
    neg = next((w for w in words if w in _NEGATIONS or w.endswith("n't")), None)
    if neg is not None:
        return Refusal("nothing", f"the order is negated ({neg!r}); nothing was written — say plainly what to change")
    cond = next((c for c in _CONDITIONS if f" {c} " in low), None)
    if cond is not None:
        return Refusal("use_a_rule", f"the order depends on a condition ({cond!r}); the gateway writes only now and "
                                     "unconditionally — a rule (rules.add) acts on conditions")
    when = next((c for c in _TIMES if f" {c} " in low), None) or (m.group() if (m := _CLOCK.search(low)) else None)
    if when is not None:
        return Refusal("nothing", f"the order is for another time ({when!r}); the gateway writes only now — send "
                                  "it when it is due")
    device = str(args.get("device", ""))
    id_shaped = bool(re.fullmatch(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)+", device.lower())) and re.search(
        rf"(?<![\w-]){re.escape(device.lower())}(?![\w-])", text.lower()) is not None  # "chiller-b", said as it is
    if device.lower() in _PRONOUNS or not (re.search(r"[0-9]", device) or id_shaped):
        named = [w for w in candidates(text) if re.search(r"[0-9]", w)]
        return Refusal("which_device", f"which device? {device!r} is not a device id"
                       + (f" (the question names {named[0]!r})" if named else ""))
    point, value = str(args.get("point", "")), args.get("value")
    if point.lower() in FUNCTION_WORDS or point == device or _like_order_word(point.lower()):
        return Refusal("which_value", f"which point? {point!r} is not a point")
    if point in points.names and not (point == "enabled" and isinstance(value, bool)):
        if point not in points.named(text):
            return Refusal("which_value", f"which point? the question does not name {point}")
    elif point not in points.names and point not in candidates(text):
        return Refusal("which_value", f"which point? {point!r} is not in the question")
    if isinstance(value, bool):
        if point in _NUMERIC:
            return Refusal("which_value", f"which value? {point} takes a number and the question states none for it")
        on = any(w in ON_WORDS for w in words)
        off = any(w in OFF_WORDS for w in words)
        if not on and not off:
            return Refusal("which_value", "which value? the question says no on/off, start/stop or enable/disable "
                                          f"for {point}")
        if on and off or (value and not on) or (not value and not off):
            return Refusal("which_value", f"the question's on/off words do not say {str(value).lower()} for {point} "
                                          "unambiguously")
        return None
    if isinstance(value, (int, float)):
        if point in ("enabled",):
            return Refusal("which_value", "enabled takes on or off; say which")
        if value not in numbers(text):
            return Refusal("which_value", f"which value? {value!r} is not a number the question states")
        if value in _durations(text):
            return Refusal("which_value", f"which value? {value!r} is a length of time in the question, not a value "
                                          "to write")
        return None
    if isinstance(value, str):
        if point in _NUMERIC or re.fullmatch(r"[-+]?[0-9][0-9.,]*", value.strip()):
            # "40" in place of -40
            return Refusal("which_value", f"which value? {point} takes a number, not the text {value!r}")
        if value.lower() not in words and value not in text:
            return Refusal("which_value", f"which value? {value!r} is not in the question")
        if value.lower() in FUNCTION_WORDS or value.lower() in _NOT_VALUES or SHIPPED.named(value):
            return Refusal("which_value", f"which value? {value!r} names no value to write")
        if point == "enabled":
            return Refusal("which_value", "enabled takes on or off; say which")
        return None
    return Refusal("which_value", "which value? the question states none")
