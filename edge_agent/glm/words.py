"""Operators' words that are not names: numbers spelt out, units of time, and how a finger slips (one letter
dropped, added, changed or two swapped). Shared by the schema (narrowing numbers and windows), the point table and the
write guard: a module of its own, below all three, so none of them imports another for a word."""
from __future__ import annotations

import re

ONES = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
SCALES = {"hundred": 100, "thousand": 1000}
NUMBER_WORDS = {**ONES, **TENS, **SCALES}
TOKEN = re.compile(r"[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?|[0-9]+(?:\.[0-9]+)?|[A-Za-z]+|[^\sA-Za-z0-9]")
UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800}
UNIT_WORDS = {w: UNIT_SECONDS[u] for u, ws in {
    "second": "s sec secs second seconds", "minute": "m min mins minute minutes", "hour": "h hr hrs hour hours",
    "day": "d day days", "week": "w wk wks week weeks"}.items() for w in ws.split()}
LONG_UNITS = {k: v for k, v in UNIT_WORDS.items() if len(k) >= 4 and k not in ("secs", "mins")}  # said alone
PARTS = {"half": 1800, "quarter": 900}  # of an hour
TABLES = {id(t): t for t in (NUMBER_WORDS, UNIT_WORDS, LONG_UNITS, PARTS)}
# English words one letter from a number or unit word: words of their own, never read as a slip of one ("right now"
# is not "eight now", "is there" not "is three", "sixty right" not 68, "the fifth pump" not 50)
REAL_WORDS = frozenset(
    "right night light fight might sight tight bight wight weight height weighty eighth there threw throe forth fourth "
    "fifth sixth seventh ninth tenth third flour thirsty hundreds thousands fours fives nines sevens eights "
    "minus mines mints dates ways says".split())


def one_edit(a: str, b: str) -> bool:
    """a is b with one letter dropped, added, changed or two neighbours swapped (how fingers slip)."""
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
                                  and a[diff[1]] == b[diff[0]])
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))
