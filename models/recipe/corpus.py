"""The IoT-operations corpus: operators' questions and commands in many phrasings, each with its tool call.

Deterministic for a seed. The held-out split uses sentence templates and device names the training split never
sees (its device stems are disjoint, and every held-out name is checked against the training names), so held-out
accuracy measures generalisation, not recall.
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from edge_agent.glm.points import POINT_WORDS, QUESTION_FORMS
from edge_agent.glm.schema import format_call

# canonical point -> how operators write it (typos are added on top): the table the runtime narrows with too
# (edge_agent.glm.points), less the words that read as something else in a template ("current temp", "fill it")
_SKIP = {"current", "amp", "degrees", "fill", "enabled", "mode", "operating mode", "on or off", "switched on",
         "turned on"}
POINTS = {canon: [w for w in said if w not in QUESTION_FORMS and w not in _SKIP]
          for canon, said in POINT_WORDS.items() if canon not in ("enabled", "mode")}
HOW = {canon: [w for w in said if w in QUESTION_FORMS] for canon, said in POINT_WORDS.items()}
HOW = {k: v for k, v in HOW.items() if v}
WRITABLE = ["setpoint", "speed", "rpm", "level", "power", "flow", "temperature", "pressure"]
MODES = ["auto", "manual", "eco", "standby", "high", "low", "boost", "off-peak"]

TRAIN_STEMS = ["pump", "boiler", "chiller", "compressor", "fan", "motor", "valve", "tank", "conveyor", "mixer",
               "oven", "heater", "press", "sensor", "meter", "plc", "robot", "cooler", "hvac", "gate", "line"]
HELDOUT_STEMS = ["extruder", "dryer", "furnace", "turbine", "blower", "crusher", "kiln", "agitator"]
ONSETS = ["", "", "b", "bl", "br", "c", "ch", "cr", "d", "dr", "f", "fl", "fr", "g", "gr", "h", "j", "k", "kl", "l",
          "m", "n", "p", "pl", "pr", "qu", "r", "s", "sh", "sk", "sl", "sp", "st", "str", "t", "th", "tr", "v", "w",
          "x", "z"]
NUCLEI = ["a", "e", "i", "o", "u", "y", "ai", "ea", "ee", "oo", "ou", "io"]
CODAS = ["b", "ck", "d", "g", "k", "l", "ld", "lt", "m", "n", "nd", "ng", "nt", "p", "r", "rd", "rk", "rt", "s",
         "sh", "st", "t", "x", "z", "ss", "ll"]

AGG_WORDS = {
    "min": ["minimum", "lowest", "min", "smallest", "min."],
    "max": ["maximum", "highest", "max", "peak", "top"],
    "avg": ["average", "mean", "avg", "typical"],
}
NOW_WORDS = ["now", "right now", "currently", "at the moment", "atm", "", "", "just now"]
LAST_ADJ = ["current", "latest", "live", "present", "most recent", "last"]

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def words(n: int) -> str:
    """0..999 in English words."""
    if n < 20:
        return ONES[n]
    if n < 100:
        t, o = divmod(n, 10)
        return TENS[t] + ("" if o == 0 else random.choice(["-", " "]) + ONES[o])
    h, rest = divmod(n, 100)
    return ONES[h] + " hundred" + ("" if rest == 0 else random.choice([" and ", " "]) + words(rest))


UNITS = {  # unit -> (seconds, spellings)
    "s": (1, ["seconds", "second", "secs", "sec", "s"]),
    "m": (60, ["minutes", "minute", "mins", "min", "m"]),
    "h": (3600, ["hours", "hour", "hrs", "hr", "h"]),
    "d": (86400, ["days", "day", "d"]),
}


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 4 or not word.isalpha():
        return word
    i = rng.randrange(1, len(word) - 1)
    op = rng.randrange(3)
    if op == 0:
        return word[:i] + word[i + 1:]  # drop
    if op == 1:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]  # swap
    return word[:i] + word[i] + word[i:]  # double


class Gen:
    def __init__(self, rng: random.Random, heldout: bool, forbidden: set[str] | None = None):
        self.rng = rng
        self.heldout = heldout
        self.forbidden = forbidden or set()
        self.stems = HELDOUT_STEMS if heldout else TRAIN_STEMS

    # ---- names ----
    def syllables(self) -> str:
        """A pronounceable made-up word: the model must copy names, not recall them."""
        r = self.rng
        out = ""
        for _ in range(r.choice([1, 2, 2, 2, 3])):
            out += r.choice(ONSETS) + r.choice(NUCLEI) + (r.choice(CODAS) if r.random() < 0.5 else "")
        return out[:12]

    def stem(self) -> str:
        return self.rng.choice(self.stems) if self.rng.random() < 0.25 else self.syllables()

    def device(self, stem: str | None = None) -> str:
        r = self.rng
        while True:
            s = stem or self.stem()
            form = r.randrange(7)
            if form == 0:
                name = f"{s}-{r.randint(1, 99)}"
            elif form == 1:
                name = f"{s}_{r.randint(1, 99)}"
            elif form == 2:
                name = f"{s}{r.randint(1, 999)}"
            elif form == 3:
                name = f"{s.upper()}-{r.randint(1, 999)}"
            elif form == 4:
                name = f"line{r.randint(1, 9)}_{s}{r.randint(1, 9)}"
            elif form == 5:
                name = f"{s}-{r.choice('abcdefgh')}{r.randint(1, 9)}"
            else:
                name = f"{s[:2]}{r.randint(100, 999)}"
            if name not in self.forbidden:
                return name

    def point(self) -> tuple[str, str]:
        """(canonical, as written)"""
        r = self.rng
        if r.random() < 0.12:
            custom = f"{self.syllables()}_{r.choice(['a', 'b', 'x', 'in', 'out', str(r.randint(1, 9))])}"
            return custom, custom
        canon = r.choice(list(POINTS))
        said = r.choice(POINTS[canon])
        if r.random() < 0.08:
            said = _typo(said, r)
        return canon, said

    def number_text(self, n: int) -> str:
        return words(n) if self.rng.random() < 0.2 and 0 <= n < 1000 else str(n)

    def window(self) -> tuple[int, str]:
        r = self.rng
        k = r.random()
        if k < 0.10:
            return 86400, r.choice(["today", "the last day", "over the last day", "in the past day", "for today"])
        if k < 0.16:
            return 900, r.choice(["in the last quarter hour", "over the past quarter hour", "last quarter hour",
                                  "the last quarter-hour"])
        if k < 0.21:
            return 1800, r.choice(["in the last half hour", "over the past half an hour", "last half hour"])
        if k < 0.27:
            return 3600, r.choice(["in the last hour", "over the past hour", "this past hour", "last hour"])
        if k < 0.31:
            return 604800, r.choice(["this week", "over the last week", "in the past week"])
        if k < 0.37:
            return 3600, ""  # no window given: one hour by convention
        unit = r.choice("smhd" if r.random() < 0.2 else "mmhh")
        n = {"s": r.choice([10, 15, 30, 45, 90]), "m": r.randint(1, 59), "h": r.randint(1, 48), "d": r.randint(1, 30)}[unit]
        secs, spell = UNITS[unit]
        sp = r.choice(spell)
        num = self.number_text(n)
        glue = "" if (len(sp) <= 1 and num.isdigit() and r.random() < 0.6) else " "
        lead = r.choice(["in the last", "over the last", "over the past", "in the past", "for the last", "last",
                         "during the last", "within the last"])
        return n * secs, f"{lead} {num}{glue}{sp}"

    def value(self) -> tuple[float | int, str]:
        r = self.rng
        k = r.random()
        if k < 0.45:
            v: float | int = r.randint(0, 3000)
            text = self.number_text(v) if v < 1000 else str(v)
        elif k < 0.8:
            v = round(r.uniform(-50, 500), r.choice([1, 1, 2]))
            if v == int(v):
                v = int(v)
            text = str(v)
        else:
            v = -r.randint(1, 60)
            text = str(v) if r.random() < 0.8 else "minus " + self.number_text(-v)
        if r.random() < 0.25:
            text += r.choice([" %", "%", " degrees", " °C", " rpm", " bar", " kw", " l/min", " units"])
        return v, text

    # ---- intents ----
    def query(self) -> tuple[str, dict]:
        r = self.rng
        dev = self.device()
        canon, said = self.point()
        if r.random() < 0.35:
            agg, window = "last", 60
            adj, now = r.choice(LAST_ADJ), r.choice(NOW_WORDS)
            t = r.choice(QUERY_LAST_HELDOUT if self.heldout else QUERY_LAST)
            text = t.format(d=dev, p=said, adj=adj, now=now)
        elif r.random() < 0.15:
            agg = "count"
            window, wtext = self.window()
            t = r.choice(QUERY_COUNT_HELDOUT if self.heldout else QUERY_COUNT)
            text = t.format(d=dev, p=said, w=wtext)
        else:
            agg = r.choice(["min", "max", "avg"])
            window, wtext = self.window()
            t = r.choice(QUERY_AGG_HELDOUT if self.heldout else QUERY_AGG)
            text = t.format(d=dev, p=said, a=r.choice(AGG_WORDS[agg]), w=wtext)
        return text, {"tool": "query_stats", "args": {"device": dev, "point": canon, "agg": agg, "window_s": window}}

    def write(self) -> tuple[str, dict]:
        r = self.rng
        dev = self.device()
        k = r.random()
        if k < 0.35:
            on = r.random() < 0.5
            verb = r.choice(ON_VERBS if on else OFF_VERBS)
            t = r.choice(ONOFF_HELDOUT if self.heldout else ONOFF)
            return t.format(d=dev, v=verb), {"tool": "write_point", "args": {"device": dev, "point": "enabled", "value": on}}
        if k < 0.45:
            mode = r.choice(MODES)
            t = r.choice(MODE_HELDOUT if self.heldout else MODE)
            return t.format(d=dev, m=mode), {"tool": "write_point", "args": {"device": dev, "point": "mode", "value": mode}}
        if r.random() < 0.15:
            canon = said = f"{self.syllables()}_{r.choice(['sp', 'out', '1', '2'])}"
        else:
            canon = r.choice(WRITABLE)
            said = r.choice(POINTS[canon])
        v, vtext = self.value()
        t = r.choice(SET_HELDOUT if self.heldout else SET)
        return t.format(d=dev, p=said, v=vtext), {"tool": "write_point", "args": {"device": dev, "point": canon, "value": v}}

    def list_devices(self) -> tuple[str, dict]:
        r = self.rng
        if r.random() < 0.4:
            t = r.choice(LIST_ALL_HELDOUT if self.heldout else LIST_ALL)
            return t, {"tool": "list_devices", "args": {"filter": None}}
        s = self.stem()
        t = r.choice(LIST_HELDOUT if self.heldout else LIST)
        return t.format(s=s), {"tool": "list_devices", "args": {"filter": s}}

    def status(self) -> tuple[str, dict]:
        t = self.rng.choice(STATUS_HELDOUT if self.heldout else STATUS)
        return t, {"tool": "status", "args": {}}

    def alerts(self) -> tuple[str, dict]:
        r = self.rng
        if r.random() < 0.6:
            t = r.choice(ALERTS_ALL_HELDOUT if self.heldout else ALERTS_ALL)
            return t, {"tool": "list_alerts", "args": {"device": None}}
        dev = self.device()
        t = r.choice(ALERTS_DEVICE_HELDOUT if self.heldout else ALERTS_DEVICE)
        return t.format(d=dev), {"tool": "list_alerts", "args": {"device": dev}}

    def how(self) -> tuple[str, dict]:
        """A question in a point's own words: "how hot is boiler-2" -> its last temperature."""
        r = self.rng
        dev = self.device()
        canon = r.choice(list(HOW))
        t = r.choice(HOW_HELDOUT if self.heldout else HOW_Q)
        text = t.format(d=dev, q=r.choice(HOW[canon]), now=r.choice(NOW_WORDS))
        return text, {"tool": "query_stats", "args": {"device": dev, "point": canon, "agg": "last", "window_s": 60}}

    def is_question(self) -> tuple[str, dict]:
        """A yes/no question about a value, a state or a mode: a read of its last value, never a write."""
        r = self.rng
        dev = self.device()
        k = r.random()
        if k < 0.3:
            t = r.choice(IS_ON_HELDOUT if self.heldout else IS_ON)
            return t.format(d=dev, now=r.choice(NOW_WORDS)), _last(dev, "enabled")
        if k < 0.45:
            t = r.choice(IS_MODE_HELDOUT if self.heldout else IS_MODE)
            return t.format(d=dev, m=r.choice(MODES)), _last(dev, "mode")
        canon = r.choice(WRITABLE)
        _v, vtext = self.value()
        t = r.choice(IS_VALUE_HELDOUT if self.heldout else IS_VALUE)
        return t.format(d=dev, p=r.choice(POINTS[canon]), v=vtext), _last(dev, canon)

    def clarify(self) -> tuple[str, dict]:
        """Asks for no action (a negation, a how-to, a what-if, why/who, a reminder, small talk), only on a
        condition (a rule's job), or a write without its device or its value: no call that does anything."""
        r = self.rng
        dev, dev2 = self.device(), self.device()
        canon = r.choice(WRITABLE)
        p = r.choice(POINTS[canon])
        _v, val = self.value()
        on = r.random() < 0.5
        verb = r.choice(ON_VERBS if on else OFF_VERBS)
        fill = dict(d=dev, d2=dev2, p=p, p2=r.choice(POINTS[r.choice(list(POINTS))]), v=val, verb=verb,
                    n=self.number_text(r.randint(0, 200)), m=r.choice(MODES), t=r.choice(LATER),
                    s=r.choice(TRAIN_STEMS if not self.heldout else HELDOUT_STEMS),
                    city=r.choice(CITIES) if r.random() < 0.5 else self.syllables())
        k = r.random()
        if k < 0.36:
            reason, pool = "nothing", (NOTHING_HELDOUT if self.heldout else NOTHING)
            t = r.choice(pool)
            if not self.heldout and r.random() < 0.3 and t.split(" ")[0] in ("don't", "do", "never", "please"):
                return t.format(**fill) + r.choice(NEVER_TAILS), {"tool": "clarify", "args": {"reason": reason}}
        elif k < 0.50:
            if self.heldout or r.random() < 0.4:
                reason, pool = "nothing", (SMALL_TALK_HELDOUT if self.heldout else SMALL_TALK)
            else:
                return self.chat(), {"tool": "clarify", "args": {"reason": "nothing"}}
        elif k < 0.70:
            reason, pool = "use_a_rule", (RULE_HELDOUT if self.heldout else RULE)
            if not self.heldout and r.random() < 0.45:
                return self.rule(fill), {"tool": "clarify", "args": {"reason": "use_a_rule"}}
        elif k < 0.84:
            reason, pool = "which_device", (WHICH_DEVICE_HELDOUT if self.heldout else WHICH_DEVICE)
        else:
            reason, pool = "which_value", (WHICH_VALUE_HELDOUT if self.heldout else WHICH_VALUE)
            if not self.heldout and r.random() < 0.4:
                t = r.choice(MORE_LESS)
                return t.format(x=r.choice(MORE_LESS_VERBS), d=dev, p=p) + r.choice(MORE_LESS_TAILS), \
                    {"tool": "clarify", "args": {"reason": "which_value"}}
        return r.choice(pool).format(**fill), {"tool": "clarify", "args": {"reason": reason}}

    def chat(self) -> str:
        """Talk that asks the gateway nothing, composed so that no one phrasing is learnt by heart: greetings,
        remarks about the assistant, errands it cannot run, questions about the world."""
        r = self.rng
        k = r.random()
        if k < 0.2:
            return r.choice(CHAT_HELLO) + r.choice(["", "", "?", "!", " there", " again", "??", "..."])
        if k < 0.4:
            return r.choice(CHAT_ABOUT_YOU).format(adj=r.choice(CHAT_ADJ))
        if k < 0.75:
            lead = r.choice(["", "", "can you ", "could you ", "please ", "i want you to ", "would you ", "go "])
            verb, things = r.choice(CHAT_ERRANDS)
            return lead + verb + " " + r.choice(things).format(city=r.choice(CITIES))
        # real places only: a made-up word is what a device's stem looks like ("what's the weather in fooblak"
        # taught 1.4.0's first build to answer "what's the temperature on dryer-14" with `nothing`)
        return r.choice(CHAT_WORLD).format(city=r.choice(CITIES), n=r.randint(2, 99))

    def rule(self, fill: dict) -> str:
        """An alert or an action on a condition, composed: a lead, a connective, a condition (no phrasing of
        RULE_HELDOUT's: the held-out set stays unseen)."""
        r = self.rng
        cond = r.choice(RULE_CONDITIONS).format(cmp=r.choice(RULE_CMP), state=r.choice(RULE_STATES), **fill)
        if r.random() < 0.5:
            return f"{r.choice(ALERT_LEADS)} {r.choice(RULE_WHEN)} {cond}"
        act = r.choice(["{verb} {d2}", "set {d2} {p} to {v}", "{verb} the {s}", "put {d2} in {m} mode"])
        act = act.format(**{**fill, "d2": fill["d2"] if r.random() < 0.5 else fill["d"]})
        return (f"{r.choice(RULE_WHEN)} {cond}, {act}" if r.random() < 0.5 else
                f"{act} {r.choice(RULE_WHEN)} {cond}")

    def example(self) -> tuple[str, dict]:
        r = self.rng
        k = r.random()
        text, call = (self.query() if k < 0.34 else self.how() if k < 0.37 else self.write() if k < 0.62 else
                      self.list_devices() if k < 0.71 else self.alerts() if k < 0.77 else
                      self.status() if k < 0.82 else self.is_question() if k < 0.88 else self.clarify())
        return self.noise(text, order=call["tool"] == "write_point"), call

    def noise(self, text: str, order: bool = False) -> str:
        r = self.rng
        text = " ".join(text.split())
        if r.random() < 0.15:
            parts = text.split(" ")
            i = r.randrange(len(parts))
            if parts[i].isalpha() and parts[i].islower():  # template words only: names carry digits
                parts[i] = _typo(parts[i], r)
            text = " ".join(parts)
        if r.random() < 0.1 and text.split(" ")[0].isalpha():  # never a name's first letter
            text = text[:1].upper() + text[1:]
        if r.random() < 0.15:  # an order ends in no question mark: "set x to 5?" asks, and ask will not write it
            text += r.choice(["!", ".", " pls", " please", " thanks", " asap"] if order else
                             ["?", "!", ".", " pls", " please", " thanks", " asap", "??"])
        if r.random() < 0.05:
            text = r.choice(["hey ", "hi, ", "ok ", "yo "]) + text
        return text


QUERY_LAST = [
    "what is the {adj} {p} of {d} {now}", "{adj} {p} for {d}", "show me the {p} on {d} {now}",
    "{d} {p} {now}", "give me {d}'s {adj} {p}", "how is the {p} at {d} {now}", "{p} of {d} {now}?",
    "tell me the {adj} {p} of {d}", "what's {d} {p} reading {now}", "check {p} on {d} {now}",
    "{adj} {p} {d}", "read {d} {p}", "get {p} from {d} {now}", "i want the {p} of {d} {now}",
    "what does {d} read for {p} {now}", "{d}: {p}?", "could you read the {p} of {d}", "need {d} {p} {now}",
    "report the {adj} {p} of {d}", "what {p} is {d} at {now}", "{p} at {d} please", "look up {d} {p}",
    "what is {d} showing for {p} {now}", "status of {p} on {d}", "can i get the {adj} {p} for {d}",
    "what's the {p} in {d} {now}", "{p} in {d}", "{adj} {p} in {d}?", "how much {p} is in {d} {now}",
    "{p} level in {d}", "what {p} do we have in {d}", "{p} inside {d} {now}",
    "what's the {p} on {d} {now}", "what's {d} {p} {now}", "what's the {adj} {p} of {d}", "what's the {p} at {d}",
    "what {p} is {d} giving {now}", "what's {d}'s {p} {now}",
]
QUERY_LAST_HELDOUT = [
    "i need the {adj} {p} of {d}", "what does {d} say for {p} {now}", "{d}: {adj} {p}?", "report {p} for {d} {now}",
    "could you look up the {p} at {d} {now}",
]
QUERY_AGG = [
    "what is the {a} {p} of {d} {w}", "{a} {p} for {d} {w}", "show me the {a} {p} on {d} {w}",
    "{d} {p} {a} {w}", "give me {d}'s {a} {p} {w}", "{w}, what was the {a} {p} of {d}",
    "tell me the {a} {p} of {d} {w} please", "can you get the {a} {p} reading from {d} {w}",
    "{a} {p} {d} {w}", "what was the {a} {p} at {d} {w}", "{d} {a} {p} {w}", "i want the {a} {p} of {d} {w}",
    "report the {a} {p} on {d} {w}", "could you check the {a} {p} at {d} {w}", "{d}: {a} {p} {w}?",
    "need {a} {p} for {d} {w}", "look up the {a} {p} of {d} {w}", "{w} {a} {p} of {d}", "{p} ({a}) {d} {w}",
    "get me the {a} {p} from {d} {w}", "on {d}, what was the {a} {p} {w}", "what {a} {p} did {d} have {w}",
]
QUERY_AGG_HELDOUT = [
    "i need the {a} {p} of {d} {w}", "report {d} {p} ({a}) {w}", "could you check {a} {p} for {d} {w}",
    "{a} {p} @ {d} {w}", "for {d}, {a} {p} {w}",
]
QUERY_COUNT = [
    "how many {p} readings did {d} send {w}", "count of {p} samples from {d} {w}",
    "number of {p} readings for {d} {w}", "count {d} {p} readings {w}", "how many {p} samples from {d} {w}",
    "{w}, how many {p} readings came in from {d}", "how many {p} values did we get from {d} {w}",
    "count the {p} samples of {d} {w}", "{d} {p} readings count {w}", "number of {p} values from {d} {w}",
]
QUERY_COUNT_HELDOUT = ["{w}, how many {p} values came from {d}", "count up the {p} readings of {d} {w}"]

ON_VERBS = ["turn on", "switch on", "start", "enable", "power up", "activate", "start up", "turn on", "start",
            "switch on", "resume", "open"]
OFF_VERBS = ["turn off", "switch off", "stop", "disable", "shut down", "deactivate", "power down", "turn off", "stop",
             "switch off", "kill", "halt", "pause", "close"]
ONOFF = ["{v} {d}", "please {v} {d}", "{v} the {d}", "can you {v} {d}", "{v} {d} now", "i want you to {v} {d}",
         "{d}: {v}", "need to {v} {d}", "could you {v} {d} right away", "go {v} {d}", "{v} {d} immediately",
         "we must {v} {d}", "{d} - {v} it", "let's {v} {d}", "{v} {d} asap", "time to {v} {d}", "{v} {d} right now",
         "{v} {d} now please", "please {v} {d} now"]
ONOFF_HELDOUT = ["{d}: {v} it now", "go ahead and {v} {d}", "we need to {v} {d}", "could you {v} the {d} now"]
MODE = ["set {d} mode to {m}", "put {d} in {m} mode", "switch {d} to {m} mode", "change the mode of {d} to {m}",
        "{d} mode {m}", "{d}: mode = {m}", "set the mode for {d} to {m}", "i want {d} in {m} mode",
        "make {d} run in {m} mode", "{d} to {m} mode please", "mode {m} for {d}"]
MODE_HELDOUT = ["mode of {d} should be {m}", "{d} -> {m} mode", "could you put {d} into {m} mode"]
SET = ["set {d} {p} to {v}", "change {p} on {d} to {v}", "{d}: {p} = {v}", "put {d} {p} at {v}",
       "please set the {p} of {d} to {v}", "adjust {d} {p} to {v}", "set the {p} for {d} to {v}",
       "{d} {p} to {v}", "change {d}'s {p} to {v}", "write {v} to {d} {p}", "{d} {p} should be {v}",
       "make the {p} of {d} {v}", "i want {d} {p} at {v}", "update {d} {p} to {v}", "{p} on {d} -> {v}",
       "could you set {d} {p} to {v}", "need {d} {p} set to {v}", "bring the {p} of {d} to {v}",
       "{d}: set {p} {v}", "set {p} = {v} on {d}", "move {d} {p} to {v}", "set the {p} in {d} to {v}",
       "set {d} {p} {v}", "{d} set {p} to {v}"]
SET_HELDOUT = ["make {d} {p} {v}", "update {p} for {d} -> {v}", "{p} of {d} should be {v}", "bring {d} {p} to {v}",
               "could you change the {p} on {d} to {v}"]
LIST_ALL = ["list devices", "show all devices", "what devices are connected", "which devices do you see",
            "devices?", "list all devices", "show me the devices", "what devices do you know", "enumerate devices",
            "give me the device list", "list every device", "what is connected", "which devices are there",
            "all devices please", "show me every device you have", "what do you have connected",
            "what devices can you see", "which devices are online"]
LIST_ALL_HELDOUT = ["give me every device", "what is connected to you", "device list please", "enumerate every device"]
LIST = ["list all {s}s", "show {s} devices", "which {s}s are there", "devices with {s} in the name", "find {s}",
        "list {s} devices", "show me all the {s}s", "what {s}s do you see", "any {s} devices?", "find all {s}s",
        "enumerate {s}s", "give me the {s} list", "which {s} units are connected", "list the {s}s",
        "do you have any {s}s", "show every {s}", "any {s}s?", "got any {s}s", "{s}s?", "list {s}s please",
        "which {s}s do you know", "are there {s}s"]
LIST_HELDOUT = ["any {s}s around?", "what {s} units do you have", "enumerate the {s}s", "find every {s}"]
STATUS = ["status", "how are you", "gateway status", "health check", "are you ok?", "is everything running",
          "system health", "show status", "what is your status", "how is the system", "diagnostics",
          "report status", "gateway health", "are you alive", "how is the gateway", "status report",
          "give me your health", "is the system ok", "how are things", "are you online?", "are you connected",
          "is the uplink up", "is the uplink ok", "uplink status", "are we connected to the cloud",
          "is the connection to the cloud working", "is the cloud connected", "are you working?",
          "are you still working", "is the mqtt connection up", "is the uplink down?", "you online",
          "are you functioning", "is the gateway online", "cloud connection status", "are you still there",
          "is the broker connected", "do you have a connection", "is the link ok"]
STATUS_HELDOUT = ["how is the gateway doing", "report your health", "give me a status report", "you alive?",
                  "health of the system"]
ALERTS_ALL = ["which alarms are active?", "any active alerts", "show alerts", "list alarms", "what alarms are firing",
              "are there any alarms", "show me the active alarms", "what is alarming", "any alerts right now?",
              "open alarms", "current alerts", "list active alerts", "what's in alarm", "alarm list",
              "show firing alerts", "which rules are firing", "anything in alarm?", "any warnings", "recent alerts",
              "what went off", "alerts?", "show me the alarm list", "are any alerts firing", "list the alerts"]
ALERTS_ALL_HELDOUT = ["which alarms are active right now", "anything firing?", "give me the alarm summary",
                      "what alerts are open", "are any alarms raised"]
ALERTS_DEVICE = ["any alarms on {d}?", "alerts for {d}", "is {d} in alarm", "show {d} alarms", "what alerts does {d} have",
                 "list alarms of {d}", "active alerts on {d}", "is anything alarming on {d}", "{d} alarms",
                 "did {d} raise an alert", "alarms for {d} please", "show me the alerts of {d}"]
ALERTS_DEVICE_HELDOUT = ["does {d} have any active alarms", "alarm status of {d}", "what is {d} alarming about",
                         "alerts raised by {d}"]


def _last(dev: str, point: str) -> dict:
    return {"tool": "query_stats", "args": {"device": dev, "point": point, "agg": "last", "window_s": 60}}


HOW_Q = ["{q} is {d} {now}", "{q} is {d}?", "{d}: {q} is it {now}", "tell me {q} {d} is", "{q} is it at {d} {now}",
         "so {q} is {d} {now}", "{q} is {d} running {now}", "check {q} {d} is"]
HOW_HELDOUT = ["any idea {q} {d} is {now}", "{q} does {d} get {now}"]
IS_ON = ["is {d} running", "is {d} on?", "is {d} switched off", "is {d} enabled?", "is {d} still running",
         "is {d} stopped?", "did {d} stop", "is {d} turned on", "{d} running?", "is {d} off right now",
         "are we running {d}?", "is {d} up", "is {d} on {now}", "is {d} on or off", "is {d} off?",
         "{d} on?", "is {d} running {now}", "is {d} turned off {now}", "is {d} on at the moment", "{d} on or off?"]
IS_ON_HELDOUT = ["has {d} been switched on?", "is {d} active at the moment"]
IS_MODE = ["is {d} in {m} mode?", "is {d} set to {m} mode", "what mode is {d} in", "{d} mode?",
           "is {d} running in {m}?", "which mode is {d} using"]
IS_MODE_HELDOUT = ["does {d} run in {m} mode now", "is the mode of {d} {m}?"]
IS_VALUE = ["is {d} {p} {v}?", "is the {p} of {d} {v}", "is {d} {p} above {v}?", "is {d} {p} below {v}",
            "is {d} at {v} {p}?", "is {d} {p} set to {v}?", "was {d} {p} {v}?", "is {d} {p} still {v}",
            "has {d} {p} reached {v}?", "is the {p} on {d} over {v}", "did {d} {p} go above {v}?",
            "{d} {p} is {v}, right?"]
IS_VALUE_HELDOUT = ["is the {p} at {d} higher than {v}?", "does {d} {p} read {v}"]
CITIES = ["paris", "tokyo", "munich", "chicago", "lyon", "madrid", "oslo", "dallas", "seoul", "lagos"]
LATER = ["tomorrow", "tonight", "at 6pm", "in an hour", "later", "on monday", "at midnight", "next shift",
         "in 10 minutes", "after lunch", "every morning", "at 5"]
NOTHING = [
    "don't {verb} {d}", "do not {verb} {d}", "never {verb} {d}", "no need to {verb} {d}", "please don't {verb} {d}",
    "do not set {d} {p} to {v}", "don't change {d} {p}", "don't touch {d}", "leave {d} {p} as it is",
    "do not write {v} to {d} {p}", "we should not {verb} {d}", "nobody {verb} {d}", "{d} must not be changed",
    "how do i {verb} {d}", "how can i set {d} {p} to {v}", "how to change the {p} of {d}",
    "how would i {verb} {d}", "what happens if i {verb} {d}", "what if we set {d} {p} to {v}",
    "what would happen if {d} {p} was {v}", "suppose we {verb} {d}", "should i {verb} {d}?",
    "should we set {d} {p} to {v}?", "would it be safe to {verb} {d}", "hypothetically, {verb} {d}",
    "why did {d} stop", "why is {d} off", "who turned off {d}", "who changed {d} {p}", "who set {d} {p} to {v}",
    "why was {d} {p} set to {v}", "when did someone {verb} {d}", "remind me to {verb} {d} {t}",
    "{verb} {d} {t}", "set {d} {p} to {v} {t}", "schedule {d} to {verb} {t}", "{t}, {verb} {d}",
    "remind me {t} to set {d} {p} to {v}", "plan to {verb} {d} {t}", "{verb} {d} every day at 6",
    "i was going to {verb} {d}", "i think someone should {verb} {d}", "i already told them to {verb} {d}",
    "what is the best {p} for {d}", "explain what {p} means on {d}", "what does {verb} do on {d}",
    "don't put {d} in {m} mode", "do not switch {d} to {m} mode", "never put {d} into {m} mode",
    "how do i put {d} in {m} mode", "how to switch {d} to {m} mode", "how can we run {d} in {m} mode",
    "could we run {d} in {m} mode?", "can {d} run in {m} mode?", "should we switch {d} to {m} mode",
    "is it ok to put {d} in {m} mode?", "what does {m} mode do on {d}", "why is {d} in {m} mode",
    "who put {d} in {m} mode", "what command would {verb} {d}",
    "what command do i use to {verb} {d}", "when was {d} last started", "when did {d} last stop",
    "when was {d} switched off", "how long has {d} been running", "when was the last time {d} ran",
    "is it safe to set {d} {p} to {v}?", "what should {d} {p} be",
]
NOTHING_HELDOUT = ["don't you dare {verb} {d}", "could i {verb} {d} safely?", "who decided to {verb} {d}",
                   "remember to {verb} {d} {t}", "imagine we {verb} {d}", "i wonder if we should set {d} {p} to {v}"]
SMALL_TALK = ["thanks", "thank you", "good morning", "hello there", "tell me a joke", "who are you",
              "what can you do", "what's the weather like", "nice work", "hmm", "what time is it", "bye",
              "you are great", "help", "what is your name", "i am bored", "good night", "how old are you",
              "sing a song", "what is the meaning of life", "lol", "never mind", "cancel", "forget it", "stop talking",
              "ok thanks", "cool", "no", "yes", "what's the weather in {city}", "how is the traffic in {city}",
              "what time is it in {city}", "book me a flight to {city}", "what's the news", "play some music",
              "order lunch", "who won the game", "translate hello to german", "write me a poem",
              "what's 2 plus 2", "call my boss", "how far is {city}", "weather tomorrow?", "set an alarm for 7",
              "what day is it", "are you a robot", "do you like {city}", "send an email to {city} office"]
SMALL_TALK_HELDOUT = ["cheers mate", "what's up", "you there", "tell me something funny"]
RULE = [
    "{verb} {d} if {d2} {p2} goes above {n}", "if {d2} {p2} drops below {n}, {verb} {d}",
    "when {d2} {p2} is over {n} {verb} {d}", "{verb} {d} when {d2} {p2} reaches {n}",
    "if {d} {p} is above {n} set it to {v}", "set {d} {p} to {v} if {d2} stops", "whenever {d2} stops, {verb} {d}",
    "once {d2} {p2} hits {n}, set {d} {p} to {v}", "{verb} {d} as soon as {d2} {p2} passes {n}",
    "unless {d2} is running, {verb} {d}", "{verb} {d} until {d2} {p2} is {n}",
    "alert me when {d} {p} is above {n}", "notify me if {d} {p} drops below {n}", "let me know when {d} stops",
    "tell me when {d} {p} goes over {n}", "warn me if {d} {p} is under {n}", "ping me when {d} {p} reaches {n}",
    "alert me if {d} goes offline", "send an alert when {d} {p} exceeds {n}", "raise an alarm if {d} {p} > {n}",
    "if {d} {p} > {n} then {verb} {d2}", "keep {d} {p} at {v} whenever {d2} runs",
    "if the {p2} in {d2} is over {n} {verb} {d}", "if the {p2} of {d2} goes above {n}, {verb} {d}",
    "when the {p2} at {d2} drops under {n} {verb} {d}", "{verb} {d} as soon as {d2} {p2} is below {n}",
    "{verb} {d} once the {p2} in {d2} reaches {n}", "send an alert if {d} {p} is more than {n}",
    "send an alert if {d} draws more than {n} amps", "alert if {d} {p} is higher than {n}",
    "email me if {d} {p} goes over {n}", "raise an alert when {d} stops", "tell me if {d} {p} is above {n}",
    "{verb} {d} if the {p2} goes over {n}", "if {d2} stops running, {verb} {d}",
    "as soon as {d2} is off, {verb} {d}", "after {d2} stops, {verb} {d}",
]
RULE_HELDOUT = ["in case {d2} {p2} climbs past {n}, {verb} {d}", "give me a heads up when {d} {p} falls under {n}",
                "should {d2} {p2} exceed {n}, {verb} {d}"]
WHICH_DEVICE = ["{verb} it", "{verb} it now", "please {verb} it", "set the {p} to {v}", "set {p} to {v}",
                "change the {p} to {v}", "{verb} that", "{verb} the {s}", "{verb} this one", "put it in {m} mode",
                "set it to {v}", "make it {v}", "{verb} them all", "can you {verb} the {s}", "{p} to {v}",
                "{verb} the other one", "set mode to {m}", "{verb} everything", "turn the {s} off", "switch it on",
                "{verb} the {s} now", "please {verb} the {s}", "{verb} that {s}", "{verb} the {s} please"]
WHICH_DEVICE_HELDOUT = ["go {verb} that thing", "adjust the {p} there to {v}", "{verb} the {s} over there"]
WHICH_VALUE = ["set {d} {p}", "change {d} {p}", "adjust the {p} on {d}", "set {d} mode", "put {d} in a mode",
               "change the setpoint of {d}", "set {d} to", "update {d} {p}", "write to {d} {p}", "{d} {p} =",
               "set a new {p} for {d}", "modify {d} {p}", "change {d}'s mode", "set {d}", "raise {d} {p}",
               "lower the {p} of {d}", "increase {d} {p} a bit", "turn {d} {p} down"]
WHICH_VALUE_HELDOUT = ["tweak the {p} of {d}", "bump up {d} {p}", "set {d} {p} to something sensible"]


NEVER_TAILS = [" under any circumstances", " no matter what", " ever", " today", " until i say so", " for now",
               " whatever happens"]
MORE_LESS_VERBS = ["increase", "decrease", "raise", "lower", "reduce", "turn up", "turn down", "boost", "drop",
                   "push up", "bring down", "crank up", "dial down"]
MORE_LESS = ["{x} {d} {p}", "{x} the {p} of {d}", "{x} the {p} on {d}", "{x} {d}'s {p}", "{x} {p} on {d}",
             "{x} {p} for {d}"]
MORE_LESS_TAILS = ["", "", "", " a bit", " slightly", " a little", " more", " please", " now"]
CHAT_HELLO = ["hello", "hi", "hey", "hiya", "howdy", "yo", "good morning", "good afternoon", "good evening",
              "morning", "anyone there", "is anybody there", "hey you", "hi bot", "hello gateway",
              "greetings", "sup", "oi", "ping"]
CHAT_ADJ = ["great", "awesome", "amazing", "useless", "slow", "smart", "funny", "annoying", "helpful", "the best",
            "brilliant", "terrible", "clever", "weird", "fast", "lovely"]
CHAT_ABOUT_YOU = ["you're {adj}", "you are {adj}", "you are so {adj}", "you're doing {adj}", "you're really {adj}",
                  "that was {adj}", "what a {adj} bot", "i think you are {adj}", "you seem {adj} today",
                  "are you {adj}?", "how {adj} are you", "do you feel {adj}", "i love you", "i hate you",
                  "do you sleep", "are you human", "do you dream", "what are you", "where do you live",
                  "who made you", "how do you feel", "are you happy", "good job", "well done", "nice one",
                  "thanks a lot", "thank you so much", "much appreciated", "sorry", "my bad", "oops",
                  "never mind that", "ignore me", "just testing", "testing 1 2 3", "test"]
CHAT_ERRANDS = [
    ("order", ["pizza", "a pizza", "lunch", "some food", "coffee", "a taxi", "new boots", "pizza for the team"]),
    ("buy", ["me a coffee", "some milk", "a ticket to {city}", "groceries", "flowers"]),
    ("book", ["a table", "a hotel in {city}", "a meeting room", "a flight to {city}", "a doctor's appointment"]),
    ("tell me", ["a story", "a riddle", "a fun fact", "a secret", "about {city}",
                 "about yourself", "a poem"]),
    ("sing", ["a song", "happy birthday", "something"]),
    ("play", ["music", "a game", "some jazz", "the radio", "chess with me"]),
    ("write", ["a poem", "an essay", "a letter to my boss", "a story about {city}", "my report"]),
    ("call", ["my wife", "a plumber", "the office in {city}", "an ambulance", "mom"]),
    ("translate", ["this to french", "good morning to spanish", "thank you into japanese"]),
    ("find", ["me a restaurant", "a hotel in {city}", "my keys", "a good movie", "cheap flights to {city}"]),
    ("send", ["flowers to my mother", "a text to bob", "an email to the {city} team", "a postcard"]),
    ("recommend", ["a movie", "a book", "a restaurant in {city}", "a song"]),
    ("remind me to", ["buy milk", "call bob", "drink water", "pick up the kids"]),
    ("set", ["a timer for {city}", "an alarm for 6", "a reminder to call bob"]),
]
CHAT_WORLD = ["what's the weather in {city}", "will it rain in {city}", "how hot is it in {city}",
              "what time is it in {city}", "who is the president of {city}", "how far is {city} from here",
              "what is {n} times {n}", "what's {n} plus {n}", "how many days until christmas",
              "who won the match", "what's the score", "what is the capital of {city}", "what day is today",
              "what's for lunch", "where is {city}", "how do i get to {city}", "is it going to snow",
              "what's the meaning of life", "why is the sky blue", "what's trending", "any news from {city}",
              "how old is the universe", "what's the stock price of {city}", "how tall is mount everest"]
ALERT_LEADS = ["alert me", "notify me", "let me know", "tell me", "warn me", "ping me", "message me", "text me",
               "email me", "page me", "send me a notification", "raise an alarm",
               "sound the alarm", "send an alert", "flag it", "shout", "call me", "send a warning", "beep me"]
RULE_WHEN = ["when", "if", "once", "as soon as", "whenever", "the moment", "if ever", "every time"]
RULE_CMP = ["goes above", "exceeds", "is over", "drops below", "sinks below", "reaches", "hits", "rises above",
            "is more than", "is less than", "gets to", "goes under", "is higher than", "is lower than", "tops"]
RULE_STATES = ["full", "empty", "nearly empty", "almost full", "too hot", "too cold", "overheating", "offline",
               "down", "back online", "stopped", "running", "idle", "in alarm", "low", "high", "done"]
RULE_CONDITIONS = ["{d} {p} {cmp} {n}", "the {p} of {d} {cmp} {n}", "the {p} at {d} {cmp} {n}",
                   "{d} is {state}", "{d} gets {state}", "{d} becomes {state}", "{d}'s {p} {cmp} {n}",
                   "{d} stops", "{d} starts", "{d} trips", "{d} goes offline", "{d} {p} is {state}"]


EVAL_DIR = Path(__file__).resolve().parents[1] / "eval"


def _key(text: str) -> str:
    return " ".join(text.lower().strip(" ?!.").split())


def handwritten_texts() -> set[str]:
    """Every hand-written evaluation question, as compared with a generated one (case, spacing and end
    punctuation aside): none of them is ever trained on."""
    out = set()
    for f in sorted(EVAL_DIR.glob("handwritten*.jsonl")):
        out |= {_key(json.loads(line)["text"]) for line in f.read_text().splitlines() if line.strip()}
    return out


def split(seed: int, n_train: int, n_heldout: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    random.seed(seed)  # words() joins numbers with a random separator
    train_gen = Gen(rng, heldout=False)
    train = []
    names: set[str] = set()
    sealed = handwritten_texts()
    while len(train) < n_train:
        text, call = train_gen.example()
        if _key(text) in sealed:
            continue
        train.append({"text": text, "call": call})
        for key in ("device", "filter"):
            if isinstance(call["args"].get(key), str):
                names.add(call["args"][key])
    held_gen = Gen(random.Random(seed + 1), heldout=True, forbidden=names)
    heldout = [dict(zip(("text", "call"), held_gen.example())) for _ in range(n_heldout)]
    return train, heldout


def names(row: dict) -> list[str]:
    """The strings in a row that the model copies from the question (devices, custom points, filters, modes)."""
    args = row["call"]["args"]
    out = [v for k, v in args.items() if k in ("device", "filter") and isinstance(v, str)]
    if row["call"]["tool"] == "clarify":  # the devices it names are in the question only
        out += [w.strip(",.?!:;") for w in row["text"].split() if any(c.isdigit() for c in w) and not
                w.strip(",.?!:;-").replace(".", "").isdigit()]
    if isinstance(args.get("point"), str) and args["point"] not in POINTS and args["point"] not in ("enabled", "mode"):
        out.append(args["point"])
    return out


def tokenizer_text(row: dict) -> str:
    """A row with its names cut out: the tokenizer learns merges of template words and JSON only, so every name,
    seen or not, is spelt in the same small pieces and the model learns to copy pieces, not to recall names."""
    from edge_agent.glm.schema import EOS, prompt
    text = prompt(row["text"]) + format_call(row["call"]) + EOS
    for name in sorted(names(row), key=len, reverse=True):
        text = text.replace(name, " ")
    return text


def iter_jsonl(rows: list[dict]) -> Iterator[str]:
    for row in rows:
        yield json.dumps(row, ensure_ascii=False)


def sample_text(row: dict) -> str:
    """A row exactly as the model is trained on it: prompt, canonical call, end token."""
    from edge_agent.glm.schema import EOS, prompt
    return prompt(row["text"]) + format_call(row["call"]) + EOS
