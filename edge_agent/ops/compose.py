"""From a request's words (and the requester's frame) to the resolved output: one call, a plan, a rule proposal, an
answer to a pending confirmation, or `clarify` — as `ask --dry-run` prints it (docs/agent-conventions.md).

Code carries the frame; the model emits short grammar-bound objects. The request is cut into clauses by code
(conditions now, standing conditions, "compare", fan-out over "all pumps", several orders joined by "and"/"then");
each clause that needs the model is put to the single-call engine as a sentence of its own (a pronoun replaced by
the one device it refers to), and code assembles the plan. Follow-ups ("and pump-4?", "what about the last hour?",
"the minimum?", "and the pressure?", "set it back", "yes") are applied by code to the requester's frame.

Nothing here runs anything: `ops.ask` validates and dry-runs what comes out (`ops.plans`), through the same checks
as any call. Every clause a step comes from is kept beside it (`Resolved.texts`): the write guard reads the words
that asked for each write.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from edge_agent.glm.points import MAX_REGISTERED, SHIPPED, PointTable
from edge_agent.glm.schema import MAX_WINDOW_S, _windows, numbers
from edge_agent.glm.words import NUMBER_WORDS
from edge_agent.ops.memory import Frame
from edge_agent.ops.plans import MAX_STEPS

AskFn = Callable[[str, Any], Awaitable[dict]]  # (text, registry or None) -> {"call": ..., model, provider, timings}

YES = {"yes", "y", "yeah", "yep", "yup", "ok", "okay", "sure", "confirm", "confirmed", "go ahead", "do it",
       "yes please", "please do", "go", "proceed", "affirmative", "yes do it", "ok do it", "ok go ahead",
       "yes go ahead", "go for it", "sounds good", "correct", "right", "please", "yes confirm", "confirm it"}
NO = {"no", "n", "nope", "nah", "cancel", "never mind", "nevermind", "forget it", "abort", "don't", "dont",
      "do not", "no thanks", "no thank you", "cancel that", "cancel it", "stop that", "negative", "no don't",
      "no cancel", "scrap that", "not now", "don't do it", "no dont"}
_UNDO = re.compile(r"^(?:please |pls |ok |okay |now |and |then |actually |no |sorry |hmm |wait |just |oh |oops |ah )*(?:undo(?: that| it| this| the last(?: write| change)?)?"
                   r"|(?:set|put|change|switch|turn|bring) (?:it|that|them|those|this|everything|things)"
                   r" back(?: (?:to )?(?:what|how|where) (?:it|they) (?:was|were))?(?: again)?"
                   r"|revert(?: that| it| this| the last(?: write| change)?)?|roll (?:it |that )?back"
                   r"|restore (?:it|that|them)|put back(?: the old value)?)(?: please| pls)?$")
_ALERT_WORDS = ("alert me", "notify me", "warn me", "let me know", "ping me", "message me", "email me", "page me",
                "send me an alert", "send an alert", "raise an alarm", "raise an alert", "tell me when", "tell me if",
                "want an alarm", "want an alert", "want a warning", "sound an alarm", "alarm me", "text me", "alert us",
                "notify us", "warn us", "give me a heads up", "heads up")
_STANDING = ("whenever", "every time", "each time", *_ALERT_WORDS, "from now on", "any time", "anytime",
             "as soon as", "once")
_SCHEDULE = re.compile(r"\bevery (?:\d+ |(?:a |one |two |three |four |five |six |ten |twelve |fifteen |twenty |thirty |forty |fifty |sixty |couple (?:of )?)|few |other )?(?:sec|second|min|minute|hour|hr|day|night|morning|evening|"
                       r"week|shift)s?\b|\beach (?:minute|hour|day|morning|night)\b|\bfor the next\b|\bkeep\b.*\b(?:at|"
                       r"below|above|under|over|between)\b|\bat \d{1,2}(?::\d\d)? ?(?:am|pm)\b|\b\d{1,2} ?(?:am|pm)\b|"
                       r"\bevery\b.*\bthen\b|\bloop\b|\brepeat(?:edly)?\b|\buntil\b")
# a length of time said ("10 minutes", "half an hour", "a few mins"): a delay or a duration, never a value
_SPAN = (r"(?:\d+|a|an|one|two|three|four|five|ten|fifteen|twenty|thirty|forty|forty[- ]five|sixty|half an?|"
         r"a couple of|a few) ?(?:secs?|seconds?|mins?|minutes?|hours?|hrs?|h|m|days?)\b")
# an order for later ("stop filler_3 at midnight", "start pump-2 in 10 minutes", "tonight"): a schedule, beyond a plan
_LATER = re.compile(r"\bat (?:midnight|noon|midday|dawn|dusk|sunrise|sunset|night|shift change|the end of (?:the )?"
                    r"(?:shift|day|hour))\b|\b(?:tonight|tomorrow|tmrw|tmr|later today|later on|overnight|this (?:evening|"
                    r"afternoon|night)|next (?:shift|week|hour|morning)|end of (?:the )?(?:shift|day))\b|\bat \d{1,2}(?::\d\d| ?o'?"
                    r"clock|h\d\d)\b|\bin " + _SPAN)
# a condition held for a time ("stays below 30 for 10 minutes"): a rule's duration, not one reading now
_HELD = re.compile(r"\b(?:stays?|stayed|remains?|remained|persists?|persisted|sustained|keeps? (?:being|reading|going))"
                   r"\b|\bfor (?:at least |more than |over |longer than |the next )?" + _SPAN)
# points that are settings, not measurements: a value said for "it" after a read of one of these sets it
_SETTING = re.compile(r"^(?:setpoint|speed|rpm|mode)$|setpoint|(?:^|_)sp(?:$|_)|target|limit|position|stage|duty|"
                      r"output|command|cmd", re.I)
# politeness, no condition: "..., if that's possible", "if you could, ..."
_POLITE = re.compile(r"[,\s]*\b(?:if (?:that'?s|that is|it'?s|it is) (?:possible|ok|okay|alright|fine|not too much "
                     r"trouble)|if possible|if you can|if you could|if you don'?t mind|if you please|if you would)\b"
                     r"[\s,.!?]*(?=$|[,.]|\s*(?:please|pls|thanks?|thx)?\s*[.!?]*$)|^\s*(?:if possible|if you can|"
                     r"if you could|if you don'?t mind)\b[,\s]+", re.I)
# a greeting, a request's polite frame and thanks around it: "Good morning, please ...", "Would you kindly set ...",
# "..., thank you"
_GREETING = re.compile(r"^\s*(?:(?:uh+|um+|er+|erm|hmm+|ah|well|so|right|alright|ok so|okay so)\b[,.\s]+)*"
                       r"(?:(?:hello|hi|hey|hiya|good (?:morning|afternoon|evening|day)|morning|evening|greetings)"
                       r"(?: there| team| all)?\b[,!.\s]*)?(?:(?:would|could|can|will) you(?: please| kindly| pls)?"
                       r"\s+(?=(?:please |kindly )?(?:set|stop|start|switch|turn|close|open|put|change|tell|show|check|"
                       r"give|read|list|get|compare|enable|disable|shut|raise|lower|let)\b)|please\s+kindly\s+|kindly\s+)?",
                       re.I)
_THANKS = re.compile(r"[,\s]+(?:thank you|thanks|thx|ty|cheers|much appreciated)(?: (?:very|so) much)?[.!]*\s*$", re.I)
# a closing remark: nothing to do ("thanks, that's all for now", "ok bye")
_CLOSING = re.compile(r"^(?:(?:thanks?|thank you|thx|ty|cheers|ok|okay|great|cool|nice|perfect|good)\b[,!. ]*)*"
                      r"(?:that'?s all|thats all|that is all|that will be all|that'?ll be all|nothing else|all good|"
                      r"bye|goodbye|see you|see ya|cheers|thanks?|thank you)\b[ a-z]*$")
_HYPOTHETICAL = ("what if", "what would happen", "what would", "what will happen", "if i had", "suppose", "imagine", "hypothetically", "how do i", "how can i",
                 "how to", "would it", "could it", "should i", "what happens if", "i wonder", "wonder if", "wondering",
                 "whether", "should we", "we should", "do you think", "would you", "is it safe", "is it ok")
# comparisons: the longest phrases first
_CMP = [("greater than or equal to", ">="), ("less than or equal to", "<="), ("at least", ">="), ("at most", "<="),
        ("no less than", ">="), ("no more than", "<="), ("not below", ">="), ("not above", "<="),
        ("more than", ">"), ("greater than", ">"), ("higher than", ">"), ("bigger than", ">"), ("larger than", ">"),
        ("climbs past", ">"), ("goes past", ">"), ("gets past", ">"), ("rises past", ">"), ("goes beyond", ">"),
        ("over", ">"), ("above", ">"), ("exceeds", ">"), ("exceeding", ">"), ("exceed", ">"), ("tops", ">"),
        ("beyond", ">"), ("hotter than", ">"), ("warmer than", ">"), ("faster than", ">"),
        ("less than", "<"), ("lower than", "<"), ("smaller than", "<"), ("fewer than", "<"), ("below", "<"),
        ("under", "<"), ("beneath", "<"), ("colder than", "<"), ("cooler than", "<"), ("slower than", "<"),
        ("isn't", "!="), ("is not", "!="), ("isnt", "!="), ("not equal to", "!="), ("doesn't equal", "!="),
        ("hits", ">="), ("reaches", ">="), ("gets to", ">="), ("climbs to", ">="), ("rises to", ">="),
        ("falls to", "<="), ("drops to", "<="), ("gets warmer than", ">"), ("gets colder than", "<"),
        ("equals", "=="), ("equal to", "=="), ("reads", "=="), ("is exactly", "=="), ("is at", "=="),
        (">=", ">="), ("<=", "<="), ("!=", "!="), ("==", "=="), (">", ">"), ("<", "<"), ("=", "==")]
# a comparison's own words, or the unit after its number, name the point where the operator names none
_IMPLIED = [(r"\b(?:humid|humider|more humid|damp|damper|drier|dryer than)\b", "humidity"),
            (r"\b(?:warmer|hotter|colder|cooler|overheats?|freez\w*|degrees?|°c|°f|deg|celsius)\b", "temperature"),
            (r"\b(?:amps?|amperes?)\b", "current"), (r"\b(?:psi|bar|kpa)\b", "pressure"), (r"\brpm\b", "rpm"),
            (r"\b(?:kw|kilowatts?|watts?)\b", "power"), (r"\bvolts?\b", "voltage"), (r"\b(?:faster|slower)\b", "speed"),
            (r"\b(?:fuller|emptier)\b", "level"), (r"\bppm\b", "co2")]
# words that make an order depend on something the clause cutter does not parse: never cut such a request
_DEPENDS = re.compile(r"\b(?:unless|until|while|whilst|once|after|before|provided|assuming|in case|as soon as|when|"
                      r"whenever|if|otherwise|else|then only|only if)\b")
_RATE = re.compile(r"\b(?:rate|per (?:second|minute|hour)|faster than .* per|rises by|drops by|jumps|changes by|"
                   r"(?:drops?|falls?|rises?|climbs?|goes (?:up|down)|changes?) (?:fast|quickly|rapidly|suddenly|sharply)|"
                   r"spikes?|plunges?|surges?|"
                   r"increases by|decreases by)\b")
_BACKLOG = re.compile(r"\b(?:backlog|backlogged|queue[ds]?|outbox|waiting to (?:be )?(?:sent|go|upload)|not (?:yet )?"
                      r"(?:been )?sent|unsent|pending (?:upload|send)|buffered|still to send|left to send|to the cloud|"
                      r"behind on (?:sending|uploads?))\b")
_CORRECTION = re.compile(r"^(?:no|nope|sorry|oops|wait|actually|correction)?[, ]*(?:i meant|i mean|make (?:that|it)|"
                         r"not that one|rather|instead)?[, ]*(?=\S)(?:(?<=no, )|(?<=no )|(?<=sorry, )|(?<=sorry )|(?<=oops )|(?<=oops, )|(?<=meant )|"
                         r"(?<=mean )|(?<=that )|(?<=rather )|(?<=actually, )|(?<=actually )|(?<=wait, )|"
                         r"(?<=instead ))")
_OPENER = re.compile(r"^(?:and|what about|how about|same for|same with|same thing for|and for|and what about|also|"
                     r"ok and|okay and|now|then|and now|and also|what of|and how about|and the|the same for)\b")
_AGG = [("minimum", "min"), ("min", "min"), ("lowest", "min"), ("coldest", "min"), ("smallest", "min"),
        ("least", "min"), ("maximum", "max"), ("max", "max"), ("highest", "max"), ("peak", "max"), ("hottest", "max"),
        ("top", "max"), ("largest", "max"), ("biggest", "max"), ("average", "avg"), ("avg", "avg"), ("mean", "avg"),
        ("typical", "avg"), ("how many", "count"), ("count", "count"), ("number of readings", "count"),
        ("latest", "last"), ("current", "last"), ("right now", "last"), ("now", "last"), ("last value", "last")]
# the words that say an aggregate plainly (superlatives are aggregates: docs/agent-conventions.md)
_SAID_AGG = [("hottest", "max"), ("highest", "max"), ("peak", "max"), ("maximum", "max"), ("max", "max"),
             ("warmest", "max"), ("coldest", "min"), ("lowest", "min"), ("minimum", "min"),
             ("coolest", "min"), ("average", "avg"), ("avg", "avg"), ("mean", "avg")]
_PRONOUN = re.compile(r"\b(?:that|this|the same|the) (?:one|device|pump|fan|valve|tank|motor|machine|unit|sensor|"
                      r"boiler|heater|compressor|mixer|chiller|press|plc|line)\b|\b(?:its|it|it's|them|their|they)\b")
_FANOUT = re.compile(r"\b(?:all(?: (?:of )?the)?|every|evry|evrey|eveyr|evey|eveery|each(?: of the)?|both)\s+"
                     r"([a-z][a-z_]*(?:-[a-z][a-z_]*)*)\b(?!-)")  # "all uv-reactors": a kind may hold a hyphen
# "the devices whose name contains pump", "pumps with 'line2' in the name": a filter on the ids
_NAMED_LIKE = re.compile(r"\b(?:all |every |the )?(?:[a-z_]+)\s+(?:whose (?:name|id)s? (?:contains?|includes?|has|"
                         r"have)|(?:with|have|has|having) (?:a |an |the )?(?:names?|ids?) (?:that |which )?(?:contains?|"
                         r"includes?|has|have|containing|including)|(?:named|called) like|matching|"
                         r"containing)\s+[\"']?([a-z0-9_-]+)[\"']?(?:\s+in (?:the|their|its) (?:name|id)s?)?|"
                         r"\b(?:have|has|with)\s+[\"']?([a-z0-9_-]+)[\"']?\s+in (?:the|their|its) (?:name|id)s?")
_NOT_KINDS = frozenset("off on of up down in out the a an my our it them these those at to for with by you right "
                       "together now day time way".split())
_NEG = re.compile(r"\b(?:don't|dont|do not|never|not|no|without|avoid|nor|skip|except|excluding|hold off|leave (?:\S+ )"
                  r"{0,3}alone|leave (?:it|them|that|this)\b|(?:keep|leave) (?:\S+ ){0,3}as (?:it|they) (?:is|are))\b")
_SPLIT = re.compile(r"\s*(?:;|,?\s+and then\s+|,?\s+then\s+|,\s*and\s+|,\s+but\s+|\s+but\s+|\s+and also\s+|"
                    r"\s+as well as\s+|\s+and\s+|,\s+|\s*&\s*|\s+\+\s+|\s+n\s+|\s+plus\s+)\s*")
_DEVICE = re.compile(r"^[a-z][a-z0-9_.:/-]*[0-9][a-z0-9_.:/-]*$|^[0-9]+[a-z_-][a-z0-9_.:/-]*$", re.I)
_STRIP = ",.;:!?()[]{}\"'`"
# a number said in words ("seven", "eighty five", "two hundred and forty"): where a condition's value ends
_NW = "|".join(sorted(NUMBER_WORDS, key=len, reverse=True))
_NUMBER_WORDS = rf"(?:{_NW})(?:(?:[- ]|\s+and\s+)(?:{_NW}))*(?:\s+point(?:\s+(?:{_NW}))+)?"  # "three point one"
# a read asked for with a wh-word or an imperative ("what's X", "check X"), not a yes/no question ("is X hot?")
_READ_ASKED = re.compile(r"^(?:ok |okay |so |hey |please |pls )*(?:what|what's|whats|wats|how|which|show|read|check|"
                         r"give|tell me|get|look at|report|list)\b")
# on/off orders: group 1 is "on", else "off"
_ONOFF = re.compile(r"^(?:please |pls |now |then |also |and |ok |okay )*(?:(start|open|enable|activate|resume|"
                    r"turn on|switch on|power on|power up|fire up|(?:turn|switch|power) \S+ on|run)|(?:stop|close|disable|"
                    r"deactivate|pause|halt|kill|turn off|switch off|power off|power down|shut(?: down| off)?|"
                    r"(?:turn|switch|power|shut) \S+ (?:off|down)))\b(?!.*\b(?:on|off)\b.*\b(?:on|off)\b)")
# "compare", and how fingers and ears slip on it ("compair", "cmopare", "comapre")
_COMPARE = re.compile(r"\bwhich(?: one)? (?:is|was|runs|ran|has|had|got)\b.*\b(?:hotter|colder|warmer|cooler|higher|"
                      r"lower|faster|slower|fuller|emptier|bigger|smaller|greater|drier|wetter|more|less)\b|"
                      r"\b(?:compare|compar|compair|compaire|comapre|cmopare|ocmpare|copmare|comprae|compre|cmpare|"
                      r"conpare|compere|comapare|compate|comoare|comparing|"
                      r"compared|comparison)\b|\bvs\.?(?!\w)|\bversus\b")
_NOW = re.compile(r"\b(?:now|right now|rn|currently|current|curent|at the moment|atm|at present|presently|latest|"
                  r"live)\b")
# the words of a plain read besides its device, point, aggregate and window: a question's fillers
_READ_WORDS = frozenset(
    "what what's whats wats wat wht whts is are was were the of on at for in from over during within show me give get "
    "read check tell please pls plz value reading readings current currently curent now rn right atm moment present "
    "presently latest live last past previous a an and so hey ok okay quick just again thx thanks ty whats' "
    "max maximum min minimum avg average mean highest lowest peak top hottest coldest warmest coolest typical "
    "count how many number of sec secs second seconds s min mins minute minutes m hour hours hr hrs h day days d "
    "week weeks today half quarter".split())
# "now" said as a time (not "current", which may be the point): a read's last value over the last minute
_NOW_SAID = re.compile(r"\b(?:now|right now|rn|currently|at the moment|atm|at present|presently|as we speak)\b")
# words that make a request more than reads: a condition, alerts, the device list, the backlog
_NOT_PARALLEL = re.compile(r"\b(?:don't|dont|do not|never|not|without|avoid|nor|if|when|whenever|unless|until|once|while|than|exceeds?|at least|at most|above|below|"
                           r"under|alerts?|alarms?|warnings?|devices|list|status|backlog|queue|what if|would|should|"
                           r"suppose|imagine)\b|\bover\s+-?[0-9]")
# the aggregate the words say: superlatives and "how hot ... get" are max/min, "how many", "count" are count
_SAID = [(r"\b(?:hottest|highest|peak|maximum|max|warmest|top|how (?:hot|high|warm|much) (?:did|has|have|had|was|were|"
          r"got|get|it)\b.*\b(?:get|got|been|reach|reached|go|went)\b)", "max"),
         (r"\b(?:coldest|lowest|minimum|min\b|coolest|how (?:cold|low|cool) (?:did|has|have|had|was|were|"
          r"got|get|it)\b.*\b(?:get|got|been|reach|reached|go|went)\b)", "min"),
         (r"\b(?:average|avg|mean|typical)\b", "avg"),
         (r"\b(?:count|how many|number of (?:readings|samples|values|points|reports))\b", "count")]


@dataclass
class Resolved:
    """The request resolved: `doc` as ask --dry-run prints it; `texts` the words each step (or the call) came from,
    for the write guard (None: derived by code from recorded facts, e.g. an undo); `meta` the engine's last answer's
    model, provider and timings; `followup` whether the frame was used."""
    doc: dict
    texts: list[str | None] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    followup: bool = False
    words: str = ""  # a clarify's answer in words, where code knows better than the generic one

    @property
    def kind(self) -> str:
        if "plan" in self.doc:
            return "plan"
        if "confirm" in self.doc:
            return "answer"
        return {"clarify": "clarify", "add_rule": "rule"}.get(self.doc["tool"], "call")


def clarify(reason: str, words: str = "") -> Resolved:
    return Resolved({"tool": "clarify", "args": {"reason": reason}}, words=words)


def _norm(text: str) -> str:
    t = text.lower().replace("\u2019", "'").strip()
    t = re.sub(r"[!?.]+$", "", t).strip()
    return re.sub(r"\s+", " ", t)


class _Index:
    """The registry (device -> its points) as the word rules look it up: ids by lower case, ids by their digits
    (for slips), the registered point names. Built once per registry snapshot, not per lookup: a registry holds up
    to store.max_devices ids and store.max_points points, and one request looks it up dozens of times."""

    def __init__(self, known: dict) -> None:
        self.names = {d.lower(): d for d in known}
        self.by_digits: dict[str, list[str]] = {}
        for k in self.names:
            self.by_digits.setdefault(re.sub(r"[^0-9]", "", k), []).append(k)
        self.points = frozenset(p for ps in known.values() for p in ps)
        self.points_lower = frozenset(p.lower() for p in self.points)


_LAST_INDEX: list = [object(), None]  # (the registry dict, its _Index): one request's lookups share it


def _index(known: dict | None) -> _Index:
    if _LAST_INDEX[0] is not known or _LAST_INDEX[1] is None:
        _LAST_INDEX[:] = [known, _Index(known or {})]
    return _LAST_INDEX[1]


def join_ids(text: str, known: dict | None) -> str:
    """ "pump 8", "tank 4": a kind and a number said apart, written as the registry's one such id ("pump-8")."""
    names = _index(known).names
    if not names:
        return text

    def joined(m: re.Match) -> str:
        kind, n = m.group(1).lower(), m.group(2)
        hits = [names[k] for k in (f"{kind}-{n}", f"{kind}_{n}", f"{kind}{n}") if k in names]
        return hits[0] if len(hits) == 1 else m.group(0)
    return re.sub(r"(?<![\w-])([a-z][a-z_]*[a-z]) #?([0-9]+)(?![\w.-])", joined, text, flags=re.I)


def fix_ids(text: str, known: dict | None) -> str:
    """"chiler-2" where the registry has chiller-2: an id with one slipped letter, written as the registry's one id
    it can be. Only letters slip: the digits must be the same ("pump-12" is never pump-1), the word must not be an id
    itself, and exactly one registered id may be that near; the confirmation names the id as registered."""
    if not known:
        return text
    from edge_agent.glm.words import one_edit

    idx = _index(known)

    def fixed(m: re.Match) -> str:
        w = m.group(0)
        low = w.lower()
        if low in idx.names or len(low) < 5 or not re.search(r"[0-9]", low):
            return w
        near = [idx.names[k] for k in idx.by_digits.get(re.sub(r"[^0-9]", "", low), ()) if _one_word_slipped(low, k)]
        return near[0] if len(near) == 1 else w
    return re.sub(r"(?<![\w-])[a-z][\w.:/-]*[0-9][\w.:/-]*(?<![.:/-])", fixed, text, flags=re.I)


def _one_word_slipped(typed: str, registered: str) -> bool:
    """The ids are the same runs of letters, digits and separators but one run of letters of 4 or more, which has
    one slipped letter ("chiler-2" / "chiller-2", "pmup-12" / "pump-12"); never a digit, a separator or a short run
    ("pump-1a" is not pump-1b, "fan-a1" not fan-b1: letters that tell devices apart)."""
    from edge_agent.glm.words import one_edit

    a, b = (re.findall(r"[a-z]+|[0-9]+|[^a-z0-9]+", x) for x in (typed, registered))
    diff = [(x, y) for x, y in zip(a, b) if x != y]
    return len(a) == len(b) and len(diff) == 1 and diff[0][1].isalpha() and len(diff[0][1]) >= 4 \
        and diff[0][0].isalpha() and one_edit(diff[0][0], diff[0][1])


def devices_in(text: str, known: dict | None) -> list[str]:
    """The device ids a text names, in order: registry names (any case), else words with a digit."""
    out: list[str] = []
    idx = _index(known)
    names, points = idx.names, idx.points_lower  # "h2s", "o2": registered points, no ids
    text = join_ids(text, known)
    for word in text.split():
        w = word.strip(_STRIP)
        if w.lower().endswith("'s"):
            w = w[:-2]
        if not w:
            continue
        hit = names.get(w.lower())
        if hit is None and _DEVICE.match(w) and not SHIPPED.named(w) and w.lower() not in points and not re.fullmatch(r"[0-9.:,/-]+(?:am|pm|s|m|h|d|st|nd|rd|th|%)?", w,
                                                                 re.I):
            hit = w
        if hit is not None and hit not in out:
            out.append(hit)
    return out


def _has(words: str, phrases) -> str | None:
    low = f" {re.sub(r'[,;:]', ' ', words)} "  # "from now on, if": the comma is no word
    return next((p for p in phrases if f" {p} " in low), None)


class Composer:
    def __init__(self, ask: AskFn, known: dict | None, points: PointTable | None = None) -> None:
        self.ask, self.known = ask, known
        # the registry's own point names are words the composer reads ("clarifier_1 turbidity and ph now")
        self._base = points or SHIPPED
        self.points = self._base.with_registered(_index(known).points)
        self.meta: dict = {}

    async def call(self, text: str) -> dict:
        """The single-call engine's call for one clause."""
        plan = await self.ask(text, self.known)
        self.meta = {k: v for k, v in plan.items() if k != "call"}
        return plan["call"]

    # ---- the entry point ----
    async def resolve(self, text: str, frame: Frame | None = None) -> Resolved:
        frame = frame or Frame()
        registered = _index(self.known).points
        if len(registered) > MAX_REGISTERED:  # a large registry: the names this request says (and frame's points)
            last = (frame.last or {}).get("plan") or ([frame.last] if frame.last else [])
            said = PointTable.said(registered, text) + [s["args"]["point"] for s in last
                                                        if isinstance(s.get("args", {}).get("point"), str)]
            self.points = self._base.with_registered(said)
        polite = _POLITE.sub(" ", _unslip_alert(fix_ids(join_ids(text, self.known), self.known)))
        polite = _THANKS.sub("", _GREETING.sub("", polite))
        polite = re.sub(r",?\s*(?:and\s+)?(?:after that|afterwards|after this|once that'?s done|once done)\b,?", ", then",
                        polite, flags=re.I)  # "read X rn, after that stop X": in order
        text = re.sub(r"\s+", " ", polite).strip(" ,") or text
        low = _norm(text)
        answer = _yes_no(low)
        if answer is not None:
            if frame.pending is None:
                return clarify("nothing", "nothing is waiting for your confirmation")
            return Resolved({"confirm": answer}, followup=True)
        if _CLOSING.match(low):
            return clarify("nothing", "nothing to do")  # "thanks, thats all for now"
        if _UNDO.match(low) or _UNDO.match(_unslip_words(low, _UNDO_WORDS)):
            return self._undo(frame)
        fix = _CORRECTION.match(low)
        if fix is not None and frame.last is not None and low[fix.end():].strip():
            # "no, pump-4" / "I meant pump-4": the last request with that changed (a new proposal replaces it)
            text = text.strip()[fix.end():].strip(" ,")
            low = _norm(text)
            r = await self._followup(text, low, frame, devices_in(text, self.known), force=True)
            if r is not None:
                return r
        named = devices_in(text, self.known)
        if frame.last is not None and not named and len(frame.devices()) == 1:
            one = frame.devices()[0]
            kind = next((k for k in re.finditer(r"\b(?:that|this|the same) ([a-z][a-z_]+)\b", low)
                         if _singular(k.group(1)) not in _NOT_KINDS and len(k.group(1)) >= 3
                         and _singular(k.group(1)) in one.lower()), None)
            if kind is not None:
                # "stop that charger" after a read of charger-3: the one device of its kind just named
                text = text[:kind.start()] + one + text[kind.end():]
                low, named = _norm(text), [one]
                r = await self._fresh(text, low)
                r.followup = True
                return r
        if frame.last is not None and named and self._bare(text, named):
            # "pump-8?", "and pump 8": only a device, the rest of the last request inherited
            f = await self._followup(text, low, frame, named, opener=True)
            if f is not None:
                return f
        if frame.last is not None and not named and _PRONOUN.search(low) is None:
            f = await self._followup(text, low, frame, named)
            if f is not None:
                return f
        if frame.last is not None and _OPENER.match(low):
            f = await self._followup(text, low, frame, named)
            if f is not None:
                return f
        if not named and _PRONOUN.search(low):
            devices = frame.devices()
            if frame.last is None:
                if re.search(r"\bits\b", low) or self._writes(low) and self._needs_device(low):
                    # "whats its humidity rn" with nothing remembered (never said, or expired): which device?
                    return clarify("which_device", "which device? nothing said before is remembered")
                # else the request as it stands (the model's own answer, then the guard and the registry)
            elif len(devices) != 1:
                if self._needs_device(low):
                    return clarify("which_device", "which device? the last request named "
                                   + (", ".join(devices[:4]) if devices else "no device by its id"))
            else:
                text = self._substitute(text, devices[0])
                low = _norm(text)
                last = frame.last.get("plan") or [frame.last]
                wrote = {s["args"]["point"] for s in last if s.get("tool") == "write_point"
                         and s["args"].get("device") == devices[0]}
                if not wrote:  # "chiller-2 setpoint now" ... "set it to 6": the one setting just read
                    wrote = {s["args"]["point"] for s in last if s.get("tool") == "query_stats"
                             and s["args"].get("device") == devices[0] and _SETTING.search(s["args"]["point"])}
                own = self._value_only(text, devices[0], next(iter(wrote))) if len(wrote) == 1 else None
                if own is not None:
                    # "set it to 6.5 then" after a write of chiller-3's setpoint: the same point, the new value
                    point = own["args"]["point"]
                    said = re.sub(rf"(?<![\w-]){re.escape(devices[0])}(?![\w-])", f"{devices[0]} {point}", text,
                                  count=1, flags=re.I)
                    return Resolved(own, [said], {}, followup=True)
                r = await self._fresh(text, low)
                r.followup = True
                return r
        return await self._fresh(text, low)

    def _masked(self, text: str, low: str) -> str:
        """The words with each device id said replaced by "dev": the ids' own parts are no keywords ("wfi-loop-1" is no
        loop, "keep-3" no "keep")."""
        for d in sorted(devices_in(text, self.known), key=len, reverse=True):
            low = re.sub(rf"(?<![\w-]){re.escape(d.lower())}(?:'s)?(?![\w-])", " dev ", low)
        return low

    def _needs_device(self, low: str) -> bool:
        """A pronoun that stands for a device ("stop it", "its temperature"), not "is it cold in here"."""
        return bool(re.search(r"\b(?:it|its|them|their|that one|this one|the same one|that pump|this pump|that "
                              r"device|this device)\b", low))

    @staticmethod
    def _substitute(text: str, device: str) -> str:
        t = re.sub(r"\b(?:that|this|the same|the) (?:one|device|pump|fan|valve|tank|motor|machine|unit|sensor|"
                   r"boiler|heater|compressor|mixer|chiller|press|plc|line)\b", device, text, flags=re.I)
        t = re.sub(r"\bits\b", f"{device}'s", t, flags=re.I)
        t = re.sub(r"\bit's\b", f"{device} is", t, flags=re.I)
        return re.sub(r"\b(?:it|them|they)\b", device, t, flags=re.I)

    # ---- a request of its own ----
    async def _fresh(self, text: str, low: str) -> Resolved:
        named = _NAMED_LIKE.search(low)
        if named is not None and not self._others(text, named) and _has(low, _HYPOTHETICAL) is None \
                and not _SCHEDULE.search(self._masked(text, low)) and _has(low, _STANDING) is None \
                and not re.search(r"\bif\b", low):
            # "list everything whose name contains line3", "stop the devices whose name has line2": a filter on the
            # ids (a listing, or a fan-out of the order over what it finds), whatever else the words hold
            return await self._clause_single(text, low)
        whether = re.match(r"^(?:please |pls )?(?:check|see|find out|look|tell me) (?:whether|if) (.+?),? and,? if (?:it is|"
                           r"it's|its|so|it does|yes|that's the case|true)\b[, ]+(?:then )?(.+)$", text, re.I | re.S)
        if whether is not None and self._states_condition(whether.group(1)):
            # "check whether flare1 temperature is currently above 700 and, if it is, shut off esp_pump4": if ..., then
            text = f"if {whether.group(1).strip()}, {whether.group(2).strip()}"
            return await self._condition_now(text, _norm(text))
        if _has(low, _HYPOTHETICAL) is not None:
            parts = self._clauses(text)
            kept = [c for c in parts if _has(_norm(c), _HYPOTHETICAL) is None]
            first = next(i for i, c in enumerate(parts) if _has(_norm(c), _HYPOTHETICAL) is not None)
            before = parts[:first]
            if before and all(self._writes(_norm(c)) and devices_in(c, self.known) and not re.search(r"\bif\b", c, re.I)
                              for c in before):
                # "start vap-4, and what would happen if I also started bog-comp2?": the order said before the what-if
                # stays (the what-if, and all after it, is its own)
                rest = ", ".join(before)
                return await self._fresh(rest, _norm(rest))
            if 0 < len(kept) < len(parts) and all(self.points.named(c) and not self._writes(_norm(c))
                                                  and not re.search(r"\bif\b", _norm(c)) for c in kept):
                # "avg gravity of fv-2 last hour and what would happen if I turned gc-1 off": the what-if voids its
                # own step; the reads asked beside it stay (only reads: anything else is the what-if's, nothing)
                rest = ", ".join(kept)
                r = await self._fresh(rest, _norm(rest))
                if all(st.get("tool") == "query_stats" for st in r.doc.get("plan", [r.doc])):
                    return r
            r = await self._single(text)
            # "what would happen if I stopped pump-1", "suppose I raised ...": nothing to do (a read stays a read)
            return clarify("nothing") if r.kind == "clarify" or r.doc.get("tool") == "write_point" else r
        topic = re.match(r"^([^\s:]+?)\s*(?::|\s-|\s–|\s—)\s+(if\s+)?(.+)$", text, re.I | re.S)
        if topic is not None and self.known and topic.group(1) in self.known \
                and not devices_in(topic.group(3), self.known):
            # "ahu-s4: if co2 is over 800 currently set speed 1400": the device said first is the topic of it all
            text = f"if {topic.group(1)} {topic.group(3)}" if topic.group(2) else f"{topic.group(1)} {topic.group(3)}"
            low = _norm(text)
        should = re.match(r"^(?:and |so |ok |okay )?should\s+(.+?)(?:,\s*|\s+then\s+)(.+)$", text, re.I | re.S)
        if should is not None and self._states_condition(should.group(1)):
            # "should tank-9 moisture exceed 45, start fan-2": the old conditional "should" is "if"
            text = f"if {should.group(1).strip()}, {should.group(2).strip()}"
            low = _norm(text)
        asked = re.match(r"^(.+?)\?\s*(if\b.+)$", text, re.I | re.S)
        if asked is not None and _READ_ASKED.match(_norm(asked.group(1))) and not self._states_condition(asked.group(1)):
            # "whats esp_pump3 temperature rn? if its above 95, stop it": the read, then a condition on it
            text = f"{asked.group(1).strip()}, and {asked.group(2).strip()}"
            return await self._condition_now(text, _norm(text))
        arrow = re.match(r"^(.+?)\s*(?:->|=>|→|-->)\s*(.+)$", text, re.S)
        if arrow is not None and self._states_condition(arrow.group(1)):
            # "kiln-2 temp at least 900 -> start fan-4": the arrow is "if ..., then"
            text = f"if {arrow.group(1).strip()}, {arrow.group(2).strip()}"
            return await self._condition_now(text, _norm(text))
        q = re.match(r"^(.+?)\?\s*(?:then|if so|if yes|if it is|if it does|and if so|in that case)\b[,\s]*(.+)$", text,
                     re.I | re.S)
        if q is None:
            q = re.match(r"^(.+?)\?\s*(.+)$", text, re.S)
            q = q if q is not None and self._states_condition(q.group(1)) and self._writes(_norm(q.group(2))) else None
        if q is not None and _READ_ASKED.match(_norm(q.group(1))) and not self._states_condition(q.group(1)):
            q = None  # "what's tank-2 level now? then stop pump-9": a read asked, then an order of its own
        if q is not None and "?" not in q.group(1):
            # "mixer_5 speed equals 0? then start mixer_5": a question that governs an order is a condition now
            text = f"if {q.group(1).strip()}, {q.group(2).strip()}"
            return await self._condition_now(text, _norm(text))
        if not self._writes(low) and not _NOT_PARALLEL.search(low) and not (numbers(low) and not _windows(low)[1]):
            # (a number that is no window is a value: "A sp 73 and B sp 73" are orders, not reads)
            r = await self._reads(text, low)  # several reads (devices or points), one aggregate and window for all
            if r is not None:
                return r
        mid = re.match(r"^([^?]+)\?\s*(?:and |also |then |,\s*)*([^?]+?)[?.!]?$", text, re.S)
        if mid is not None and _READ_ASKED.match(_norm(mid.group(1))) \
                and not self._writes(_norm(mid.group(1))) and self._writes(_norm(mid.group(2))) \
                and not self._states_condition(mid.group(1)) \
                and not _DEPENDS.search(_norm(mid.group(2))) and not _DEPENDS.search(_norm(mid.group(1))):
            # "what's boiler-7 pressure now? also set its setpoint to 68": a plain read, then an order of its own
            text = f"{mid.group(1).strip()}, and {mid.group(2).strip()}"
            low = _norm(text)
        elif re.search(r"\?\s*[^\s?]", text):
            # a question in the middle, an order after it: never cut into an unconditional write
            r = await self._single(text)
            return clarify("nothing") if r.kind == "call" and r.doc["tool"] == "write_point" else r
        words = self._masked(text, low)
        if _SCHEDULE.search(words) or self._writes(low) and _LATER.search(words) \
                and not re.search(r"\b(?:remind|remember)\b", low):  # a reminder is the model's (nothing to do)
            return clarify("too_complex")
        if _has(low, _STANDING) is not None:
            return await self._standing(text, low)
        if re.search(r"\bif\b|\bprovided\b|\bin case\b", low):
            if _HELD.search(self._masked(text, low)):
                return clarify("too_complex")  # "if X stays below 30 for 10 minutes ...": a duration, not now
            if len(re.findall(r"\bif\b", self._masked(text, low))) > 1:
                return clarify("too_complex")  # "if A is above 90 and if then B is above 7, stop B": two conditions
            return await self._condition_now(text, low)
        if re.search(r"\bwhen\b", low) and re.search(r"\bwhen (?:was|were|did|is|does)\b", low) is None \
                and any(f" {p} " in f" {low} " for p, _ in _CMP[:-6]):
            return await self._standing(text, low)  # "close valve-3 when tank-4 is above 95": standing
        if re.search(r"\bcompare\b|\bvs\.?\b|\bversus\b", low) or _COMPARE.search(low) and not low.startswith("which"):
            return await self._compare(text, low)
        return await self._compound(text, low)

    def _kind(self, low: str, device: str) -> str | None:
        """The kind of device an order names without its id ("the pump", "that valve") where it is not the kind of
        `device` (the one the sentence is about); None where it names no kind, or `device`'s own."""
        for m in re.finditer(r"\b(?:the|that|this|a|an)\s+([a-z][a-z_]+?)s?\b", low):
            word = m.group(1)
            if word in _NOT_KINDS or word in ("one", "same", "device", "unit", "value", "point", "setting", "rule",
                                              "alarm", "alert", "level", "mode", "speed", "temp", "moment"):
                continue
            if self.points.named(word) or self.points.named(m.group(0)):
                continue
            if device.lower().startswith(word) or _singular(word) and device.lower().startswith(_singular(word)):
                return None
            return word
        return None

    def _value_only(self, clause: str, device: str, point: str) -> dict | None:
        """"if pump-1 speed is not 1500, make it 1500": an order on the condition's device that states one number and
        no point of its own writes the condition's point."""
        low = _norm(clause)
        ds = devices_in(clause, self.known)
        vals = numbers(re.sub(rf"(?<![\w-]){re.escape(device.lower())}(?![\w-])", " ", low))
        if ds not in ([], [device]) or len(vals) != 1 or _NEG.search(low) or _windows(low)[1]:
            return None
        if self._said_points(re.sub(rf"(?<![\w-]){re.escape(device.lower())}(?![\w-])", " ", low),
                             (self.known or {}).get(device)) or not re.search(r"^(?:please |pls |then |and )*(?:set|"
                                                                              r"make|put|change|bring|get|adjust)\b",
                                                                              low):
            return None
        return {"tool": "write_point", "args": {"device": device, "point": point, "value": vals[0]}}

    def _states_condition(self, words: str) -> bool:
        """The words compare a value with a number ("pump-1 speed is not 1500", "kiln-2 temp at least 900")."""
        c = self._condition(words)
        return not isinstance(c, Resolved) and any(re.search(rf"(?<![a-z]){re.escape(p)}(?![a-z])", _norm(words))
                                                   for p, _ in _CMP if p not in ("is at", "reads", "="))

    async def _single(self, text: str) -> Resolved:
        fixed = _unslip_verbs(text, orders_only=True)
        if fixed != " ".join(text.split()):
            return await self._single(fixed)  # "stpo pump-1": the model and the guard read the verb as code reads it
        call = await self.call(text)
        if call["tool"] == "write_point":
            a = call["args"]
            points = {p for ps in (self.known or {}).values() for p in ps} | {a["point"]}
            others = [d for d in devices_in(text, self.known) if d != a["device"] and d not in points]
            if others:
                return clarify("which_device")  # one write for words that name several devices: which one is meant?
        if call["tool"] in ("query_stats", "clarify") and (mine := self._elliptic_setting(text)) is not None:
            return Resolved(mine, [text], self.meta)  # "pasteuriser_p2 setpoint seventy three": set it
        if call["tool"] in ("query_stats", "list_devices") and self._writes(_norm(text)) and "?" not in text \
                and not re.match(r"(?:is|are|was|were|does|did|do|has|have|what|whats|what's|how|which|why|when|who)\b",
                                 _norm(text)):
            mine = self._code_write(text)
            call = mine if mine is not None else call  # an order stated plainly that the model read as a question
            if mine is None and self._valueless_order(text):
                return clarify("which_value", "say the value to write")  # "set pasteur-1 setpoint pls": no value
        if call["tool"] in ("clarify", "write_point"):
            mine = self._code_write(text)
            if mine is not None and (mine == call or call["tool"] == "clarify" or self._misfit(call["args"], text)):
                call = mine  # the words say device, point and value plainly, and the model's answer does not fit them
            elif mine is None and call["tool"] == "clarify" and self._valueless_order(text):
                return clarify("which_value", "say the value to write")  # "change the pm2-dryer setpoint pls"
            elif mine is None and self._pointless_order(text):
                return clarify("which_value", "which point? the words name none this device has")  # "set X glide to 2"
        if call["tool"] == "clarify" or call["tool"] == "query_stats" \
                and call["args"].get("device") not in devices_in(text, self.known) \
                or call["tool"] == "write_point" and not self._writes(_norm(text)):
            mine = self._code_read(text)
            call = mine if mine is not None else call  # "kiln_3 power now", "whats the presure on ro-skid-1 rn"
        if call["tool"] == "write_point" and _ambiguous_value(text, call["args"]):
            return clarify("which_value", "say the value to write, once and as it should read "
                                          "(a change by an amount, or two values, is not written)")
        if call["tool"] not in ("status", "write_point") and _BACKLOG.search(text.lower()) \
                and not devices_in(text, self.known):
            return Resolved({"tool": "status", "args": {}}, [text], self.meta)  # the queue to the cloud is status
        if call["tool"] == "query_stats" and isinstance(call["args"].get("device"), str):
            low = _norm(text)
            have = (self.known or {}).get(call["args"]["device"]) or []
            literal = [p for p in have if re.search(rf"(?<![a-z_]){re.escape(p.lower())}(?![a-z_])", low)]
            if len(literal) == 1 and literal[0] != call["args"]["point"] and not re.search(
                    rf"(?<![a-z_]){re.escape(call['args']['point'].lower())}(?![a-z_])", low) \
                    and len(self.points.named(low)) <= 1:
                # "valve-3 position right now": the registry's own point, said as it is, over the model's guess
                call = {"tool": "query_stats", "args": {**call["args"], "point": literal[0]}}
            wins, stated = _windows(_unslip_words(low, ("today",), 4))
            if stated and len(wins) == 1 and call["args"]["agg"] != "last" and call["args"]["window_s"] != wins[0]:
                call = {"tool": "query_stats", "args": {**call["args"], "window_s": wins[0]}}  # "todya": today
            elif not stated and (call["args"]["window_s"] not in (60, 3600, 86400, 604800)
                                 or call["args"]["window_s"] == 60 and call["args"]["agg"] != "last"
                                 and not _NOW_SAID.search(low)) and not numbers(low) and not _timeish(low):
                # a window no word states ("highest turbidity clarifier_1" read over 900 s): the conventions' own
                call = {"tool": "query_stats", "args": {**call["args"],
                                                        "window_s": 60 if call["args"]["agg"] == "last" else 3600}}
            if _NOW_SAID.search(low) and _said_agg(low) is None and not stated \
                    and (call["args"]["agg"], call["args"]["window_s"]) != ("last", 60):
                call = {"tool": "query_stats", "args": {**call["args"], "agg": "last", "window_s": 60}}  # "its flow rn"
            named = self.points.named(self._masked(text, low))
            have_t = (self.known or {}).get(call["args"]["device"])
            if not named and re.search(r"\b(?:hottest|coldest|warmest|coolest)\b", low) \
                    and (have_t is None or "temperature" in have_t):
                named = ["temperature"]  # "coldest reefer-bank3 got in the last 2 hours": a temperature
            if len(named) == 1 and named[0] != call["args"]["point"]:
                # "max h2s on sep-2 today": the point the words name, even one the device lacks (the registry check
                # then refuses it), never another the model chose
                call = {"tool": "query_stats", "args": {**call["args"], "point": named[0]}}
            fit = self._fit_point(call["args"]["device"], call["args"]["point"], _norm(text))
            if fit != call["args"]["point"] and named != [call["args"]["point"]]:  # a point the device does not have, where the words or registry say which
                call = {"tool": "query_stats", "args": {**call["args"], "point": fit}}
        if call["tool"] == "list_devices" and call["args"].get("filter") is None and self.known:
            m = _FANOUT.search(_norm(text))
            kind = _singular(m.group(1)) if m is not None else ""
            if kind and kind not in _NOT_KINDS and len(kind) >= 3 and kind not in ("device", "devic", "machine", "unit",
                                                                                   "thing") \
                    and any(kind in d.lower() for d in self.known):
                call = {"tool": "list_devices", "args": {"filter": kind}}  # "list every pen": pen-07, pen-08 ...
        if call["tool"] == "list_alerts" and call["args"].get("device") is None and self.known:
            ds = [d for d in devices_in(text, self.known) if d in self.known]
            if len(ds) == 1:  # "any alarms on boiler_b?": the one registered device the words name, not every one
                call = {"tool": "list_alerts", "args": {"device": ds[0]}}
        if call["tool"] == "query_stats":
            words = re.sub(rf"(?<![a-z])(?:[0-9]+|{_NUMBER_WORDS}) ?mins?\b", " ", text.lower())  # "10 min": a window
            said = {a for w, a in _SAID_AGG if re.search(rf"(?<![a-z]){w}(?![a-z])", words)}
            said = said or ({x} if (x := _said_agg(_norm(text))) in ("max", "min") else set())  # "how cold did"
            if len(said) == 1 and call["args"]["agg"] not in said:
                # the operator's own word for the aggregate ("hottest" is max) wins over the model's choice
                call = {"tool": "query_stats", "args": {**call["args"], "agg": said.pop()}}
        return Resolved(call, [text], self.meta)

    def _code_read(self, text: str) -> dict | None:
        """One read the words state plainly and wholly, read by code, or None: one device by its id, one point of it
        (the point table's words, the registry's names, one slipped letter forgiven), and an aggregate and window the
        words decide ("now" -> last, 60; "peak ... today" -> max, 86400; an aggregate without a window -> 3600). Every
        other word must be a filler of a question ("what's", "the", "on", "pls"): a word this does not know (why,
        don't, if, a verb) leaves the request to the model."""
        low = _norm(text)
        ds = devices_in(text, self.known)
        if len(ds) != 1 or self._writes(low):
            return None  # (a device the registry lacks is read as said: the registry check refuses it, by name)
        device = ds[0]
        have = (self.known or {}).get(device)
        rest = re.sub(rf"(?<![\w-]){re.escape(device.lower())}(?:'s)?(?![\w-])", " ", low)
        pts = self._said_points(rest, have) or self.points.named(rest)  # "nox on raw-mill1", which has none: as said
        if len(pts) != 1:
            return None
        own = self.points.words_of(pts[0])
        for tok in re.findall(r"[a-z0-9_.'\u2082-]+", rest):
            if tok in _READ_WORDS or tok in own or numbers(tok) or self.points.named(tok) == pts \
                    or tok.rstrip("s") in _READ_WORDS:
                continue
            return None
        agg, (wins, stated), now = _said_agg(low), _windows(low), _NOW.search(low) is not None
        if agg is None and now and not stated:
            agg, window = "last", 60
        elif agg is not None and not (now and agg != "last"):
            window = wins[0] if stated and len(wins) == 1 else (60 if agg == "last" else 3600)
            if stated and len(wins) != 1:
                return None
        else:
            return None  # no aggregate said (nor "now"): the model's conventions decide
        return {"tool": "query_stats", "args": {"device": device, "point": pts[0], "agg": agg, "window_s": window}}

    def _valueless_order(self, text: str) -> bool:
        """An order to set a point of one registered device that states no value ("change the X setpoint pls")."""
        low = _norm(text)
        ds = devices_in(text, self.known)
        if len(ds) != 1 or numbers(low) or _NEG.search(low) or _has(low, _HYPOTHETICAL) is not None:
            return False
        rest = self._masked(text, low)
        return bool(re.match(r"(?:please |pls |ok |okay |now |then |can you |could you )*(?:set|change|adjust|make|"
                             r"raise|lower|increase|decrease|bump|update|modify|tweak)\b", low)) \
            and bool(self._said_points(rest, (self.known or {}).get(ds[0])))

    def _elliptic_setting(self, text: str) -> dict | None:
        """"pasteuriser_p1 sp 73", "lift-c4 speed to 4 pls": a device, one of its settings and one number, nothing else
        — an order with its verb left out (never a measurement: "tank-3 level 80" is left to the model)."""
        low = _norm(text)
        ds = devices_in(text, self.known)
        if len(ds) != 1 or len(numbers(low)) != 1 or _windows(low)[1] or "?" in text:
            return None
        rest = self._masked(text, low)
        pts = self._said_points(rest, (self.known or {}).get(ds[0]))
        if len(pts) != 1 or not _SETTING.search(pts[0]) or pts[0] in ("enabled", "mode"):
            return None
        own = self.points.words_of(pts[0])
        for tok in re.findall(r"[a-z0-9_.'-]+", rest):
            if tok not in ("dev", "to", "=", "pls", "please", "plz", "now", "rn", "at", "the", "its", "of", "on") \
                    and tok not in own and not numbers(tok) and tok not in ("and", "point", "minus"):
                return None
        return {"tool": "write_point", "args": {"device": ds[0], "point": pts[0], "value": numbers(low)[0]}}

    def _pointless_order(self, text: str) -> bool:
        """An order to set one registered device to one number whose words name no point of it ("set sorter_3 glide
        to 2"): the conventions ask which point, never guess one."""
        low = _norm(text)
        ds = devices_in(text, self.known)
        if len(ds) != 1 or ds[0] not in (self.known or {}) or len(numbers(low)) != 1 or _NEG.search(low) \
                or _has(low, _HYPOTHETICAL) is not None or _ONOFF.search(low):
            return False
        rest = self._masked(text, low)
        return bool(re.match(r"(?:please |pls |ok |okay |now |then )*(?:set|change|adjust|make|put|bring|raise|lower|"
                             r"increase|decrease|bump|update|modify|tweak)\b.*\b(?:to|at|=)\s*-?[0-9a-z]", rest)) \
            and not self._said_points(rest, (self.known or {}).get(ds[0])) and not self.points.named(rest)

    def _misfit(self, args: dict, text: str) -> bool:
        """A write whose point the words do not name, or the registry does not have on its device, or whose text value
        is a word of the request language ("mode to mode")."""
        have = (self.known or {}).get(args["device"])
        if have is not None and args["point"] not in have:
            return True
        if isinstance(args["value"], str) and (args["value"].lower() in ("mode", "setting", "value", "to", "the")
                                               or self.points.named(args["value"])):
            return True
        if isinstance(args["value"], bool) and numbers(_norm(text)) and not _ONOFF.search(_unslip_verbs(_norm(text))):
            return True  # on/off for words that state a number and no on/off order
        said = self._said_points(_norm(text), have)
        return bool(said) and args["point"] not in said and not (args["point"] == "enabled" and _ONOFF.search(
            _unslip_verbs(_norm(text))))

    def _said_points(self, low: str, have) -> list[str]:
        """The points the words name: the point table's words, kept to the device's registered points where the
        registry is known, else the registered names said as they are."""
        pts = self.points.named(low)
        if not have:
            return pts
        return [p for p in pts if p in have] or [p for p in have
                                                 if re.search(rf"(?<![a-z]){re.escape(p.lower())}s?(?![a-z])", low)]

    def _code_write(self, text: str, elliptic: bool = False) -> dict | None:
        """One write the words state plainly, read by code, or None: one device by its id; "start/stop/open/close/
        enable/disable/turn on/off X" -> enabled; "put X in eco mode", "X mode to eco" -> mode; "set X's P to N",
        "X P to N", "X to P N" -> P (a point the words name, on the device where the registry is known) with the one
        number stated. Anything else (a negation, two numbers, two points, no value) -> None."""
        typed = _norm(text)
        low = _unslip_verbs(typed)
        ds = devices_in(text, self.known)
        if len(ds) != 1 or _NEG.search(low) or _has(low, _HYPOTHETICAL) is not None:
            return None
        device = ds[0]
        have = (self.known or {}).get(device)
        rest = re.sub(rf"(?<![\w-]){re.escape(device.lower())}(?:'s)?(?![\w-])", " ", low)
        as_typed = re.sub(rf"(?<![\w-]){re.escape(device.lower())}(?:'s)?(?![\w-])", " ", typed)
        vals = numbers(rest)
        pts = self._said_points(rest, have)
        m = re.search(r"\b(?:in(?:to)?|to)\s+([a-z]+)\s+mode\b|\bmode\s+(?:to\s+|=\s*)?([a-z]+)\b", as_typed)
        if m is not None and not vals:
            word = m.group(1) or m.group(2)
            if have is not None and "mode" not in have or word in ("to", "the", "a"):
                return None
            return {"tool": "write_point", "args": {"device": device, "point": "mode", "value": word}}
        on = _ONOFF.search(rest)
        if on is not None and not vals and (not pts or pts == ["enabled"]):
            if have is not None and "enabled" not in have:
                return None
            value = on.group(1) is not None
            return {"tool": "write_point", "args": {"device": device, "point": "enabled", "value": value}}
        if not elliptic and not re.search(r"\b(?:set|change|make|put|adjust|bump|raise|lower|move|switch|to)\b", rest):
            return None
        if len(vals) != 1 or len(pts) != 1 or pts[0] == "enabled" or _windows(rest)[1]:
            return None
        return {"tool": "write_point", "args": {"device": device, "point": pts[0], "value": vals[0]}}

    # ---- compound: several clauses, each a call ----
    def _clauses(self, text: str) -> list[str]:
        parts = [p for p in _SPLIT.split(text.strip().rstrip("?.!")) if p.strip()]
        out: list[str] = []
        for p in parts:
            # numbers said in words ("two hundred and forty") are one number, not two clauses
            if out and (re.fullmatch(r"(?:[a-z]+ ?)*", p.split()[0] if p.split() else "")
                        and numbers(p.split()[0]) and numbers(out[-1].split()[-1])):
                out[-1] = f"{out[-1]} and {p}"
            else:
                out.append(p.strip())
        return out

    def _device_run(self, text: str) -> list[str] | None:
        """"put ahu-2 and ahu-3 in eco mode": the one order said once for a run of devices, as one sentence per
        device (the run replaced by each). None: not one run of two or more devices and nothing else named."""
        ds = devices_in(text, self.known)
        if len(ds) < 2 or self.known and any(d not in self.known for d in ds):
            return None
        spans = []
        for d in ds:
            m = re.search(rf"(?<![\w-]){re.escape(d)}(?:'s)?(?![\w-])", text, re.I)
            if m is None:
                return None
            spans.append((m.start(), m.end()))
        if [a for a, _ in spans] != sorted(a for a, _ in spans):
            return None
        for (_, e), (b, _) in zip(spans, spans[1:]):
            if not re.fullmatch(r"\s*(?:,|&|\+|/|and|,\s*and|as well as)?\s*", text[e:b], re.I):
                return None
        start, end = spans[0][0], spans[-1][1]
        if len(numbers(_norm(text[:start] + " " + text[end:]))) > 1:
            return None  # "set A, B setpoints to 61 and 62": a value each, not one for all
        return [f"{text[:start]}{d}{text[end:]}" for d in ds]

    async def _compound(self, text: str, low: str) -> Resolved:
        run_ = self._device_run(text) if self._writes(low) and not _DEPENDS.search(low) and not _NEG.search(low) \
            else None
        if run_ is not None:
            # one order for several devices: one write each, each from its own sentence
            if len(run_) > MAX_STEPS:
                return clarify("too_complex")
            steps, texts = [], []
            for sentence in run_:
                r = await self._clause_single(sentence, _norm(sentence))
                if r.kind != "call" or r.doc["tool"] != "write_point":
                    break
                steps.append(r.doc)
                texts.append(r.texts[0] if r.texts and r.texts[0] else sentence)  # "stpo": the words as code read them
            else:
                return Resolved({"plan": steps}, texts, self.meta)
        clauses = self._topics(self._clauses(text))
        if len(clauses) < 2 or not self._is_compound(clauses):
            if len(clauses) >= 2 and self._writes(_norm(clauses[0])) and not _DEPENDS.search(low) \
                    and any(self._unnamed(c) for c in clauses[1:]):
                return clarify("which_device")  # "stop pump-1 and the mixer": one more thing, not named by its id
            return await self._clause_single(text, low)
        if _DEPENDS.search(low):
            # a condition or a time this cutter does not parse ("unless", "until", "once"): cut, it would leave a
            # write without the words that govern it; whole, the model and the guard answer as before
            return await self._single(text)
        if len(clauses) > MAX_STEPS:
            return clarify("too_complex")
        steps: list[dict] = []
        texts: list[str | None] = []
        prev_text: str | None = None
        prev_devices: list[str] = []
        clauses = self._borrow(clauses)
        voided = False
        pronoun_to: list[str] = []
        for c in clauses:
            c_low = _norm(c)
            ds = devices_in(c, self.known)
            if _NEG.search(c_low) or voided and ds and self._bare(c, ds):
                voided = True  # a negation voids the step it governs, and the bare devices it runs on to
                pronoun_to = ds or pronoun_to  # "don't stop boiler-7 but check its temp": "its" is boiler-7
                continue
            voided = False
            if not ds and prev_devices and self._writes(c_low) and not _FANOUT.search(c_low) \
                    and not _NAMED_LIKE.search(c_low) and (self._kind(c_low, prev_devices[0]) or
                                                           not _PRONOUN.search(c_low)):
                # "check tank_4 level and close the valve", "open valve-3 and set the setpoint to 70": an order on
                # a device the words do not name by its id
                return clarify("which_device")
            if not ds and prev_text is not None and not self._has_verb(c_low) and not self.points.named(c):
                if self._unnamed(c):
                    return clarify("which_device")  # "stop pump-1 and the mixer": a device not named by its id
                continue
            own_words = re.sub("|".join(rf"(?<![\w-]){re.escape(d.lower())}(?![\w-])" for d in ds) or "^$", " ", c_low)
            elliptic = None
            if ds and steps and steps[-1]["tool"] == "write_point" and not self._has_verb(c_low) \
                    and numbers(own_words):
                # "chiller-b to stage 2, chiller-a stage 3": the order's words are elided, the values are its own
                elliptic = self._code_write(c, elliptic=True)
                if elliptic is None:
                    return clarify("which_value")
            if elliptic is None and ds and prev_text is not None and (self._bare(c, ds) or not (
                    self._has_verb(c_low) or self.points.named(c) or numbers(own_words)
                    or self._said_points(own_words, (self.known or {}).get(ds[0])))):
                # "stop pump-1 and pump-2": the bare device takes the previous clause's words
                c = self._swap(prev_text, prev_devices, ds[0]) if prev_devices else c
            elif not ds and (prev_devices or pronoun_to) and _PRONOUN.search(c_low):
                c = self._substitute(c, (prev_devices or pronoun_to)[0])
            elif not ds and prev_devices and self.points.named(c) and not self._has_verb(c_low):
                c = f"{c} of {prev_devices[0]}"
            r = Resolved(elliptic, [c], self.meta) if elliptic is not None else await self._clause(c, _norm(c))
            if r.kind == "clarify":
                return r
            if r.kind == "plan":
                base = len(steps)
                for s, t in zip(r.doc["plan"], r.texts):
                    steps.append(_shift(s, base))
                    texts.append(t)
            elif r.kind == "call":
                steps.append(r.doc)
                texts.append(r.texts[0] if r.texts else c)
            else:
                return clarify("too_complex")
            prev_text = c
            prev_devices = devices_in(c, self.known) or prev_devices
        if not steps:
            return clarify("nothing")
        if len(steps) > MAX_STEPS:
            return clarify("too_complex")
        if len(steps) == 1:
            return Resolved(steps[0], texts, self.meta)
        return Resolved({"plan": steps}, texts, self.meta)

    def _borrow(self, clauses: list[str]) -> list[str]:
        """A clause that names a point but no device ("what's the temperature and pressure of pump-3") reads the
        device of the next clause that names exactly one (else of the previous one)."""
        named = [devices_in(c, self.known) for c in clauses]
        out = list(clauses)
        for i, c in enumerate(clauses):
            low = _norm(c)
            if named[i] or not self.points.named(c) or _PRONOUN.search(low) or _NEG.search(low) or self._writes(low):
                continue  # an order never borrows a device: which one is asked back
            later = next((n for n in named[i + 1:] if n), None)
            earlier = next((n for n in reversed(named[:i]) if n), None)
            src = later if later is not None and len(later) == 1 else earlier
            if src is not None and len(src) == 1:
                out[i] = f"{c} of {src[0]}"
        return out

    def _unnamed(self, clause: str) -> bool:
        """A clause that names a thing but no device id, no verb and no point ("the mixer")."""
        low = _norm(clause)
        if devices_in(clause, self.known) or self._has_verb(low) or self.points.named(clause) or _NEG.search(low) \
                or _BACKLOG.search(low):
            return False
        rest = re.sub(r"\b(?:please|pls|thanks|thank you|now|too|also|as well|asap|ok|okay|right away|quickly|the|a|"
                      r"an|then|again|immediately|at once|first|both)\b|[^a-z]", "", low)
        return bool(rest)

    def _topics(self, clauses: list[str]) -> list[str]:
        """A leading clause that only names a device ("for pump-3, max power today") is the topic of the next."""
        out: list[str] = []
        carry = ""
        for i, c in enumerate(clauses):
            c_low = _norm(c)
            if i == 0 and len(clauses) > 1 and devices_in(c, self.known) and not self._has_verb(c_low) \
                    and not self.points.named(c) and not _FANOUT.search(c_low) and not numbers(c):
                carry = f"{carry}{c}, "
                continue
            out.append(carry + c)
            carry = ""
        return out

    def _is_compound(self, clauses: list[str]) -> bool:
        """At least two clauses that each ask something: a device, a verb, a point of their own."""
        asks = 0
        for c in clauses:
            c_low = _norm(c)
            if devices_in(c, self.known) or self._has_verb(c_low) or _FANOUT.search(c_low) or _BACKLOG.search(c_low):
                asks += 1  # "backlog and active alarms": the queue to the cloud is a question of its own
        return asks >= 2

    @staticmethod
    def _has_verb(low: str) -> bool:
        low = _unslip_verbs(low)
        return bool(re.search(r"\b(?:set|stop|start|turn|switch|shut|close|open|put|make|change|enable|disable|"
                              r"list|show|check|read|get|give|tell|what|what's|whats|how|how's|hows|which|is|are|any|restart|"
                              r"power|raise|lower|increase|decrease|adjust|halt|kill|activate|deactivate|run|pause|"
                              r"resume|fill|bump|report|status|alarms?|alerts?)\b", low))

    @staticmethod
    def _bare(clause: str, ds: list[str]) -> bool:
        rest = _norm(clause)
        for d in ds:
            rest = rest.replace(d.lower(), " ")
        return not re.sub(r"\b(?:the|also|too|as well|both|and|please|pls|then|one|ones|device|devices)\b|[^a-z]",
                          " ", rest).strip()

    @staticmethod
    def _swap(prev: str, prev_devices: list[str], device: str) -> str:
        return re.sub(re.escape(prev_devices[0]), device, prev, count=1, flags=re.I)

    async def _clause(self, c: str, c_low: str) -> Resolved:
        if _has(c_low, _HYPOTHETICAL) is not None:
            return await self._single(c)
        if _has(c_low, _STANDING) is not None or re.search(r"\bif\b", c_low):
            return clarify("too_complex")  # a condition inside one clause of several: beyond the grammar
        if re.search(r"\bcompare\b", c_low):
            return await self._compare(c, c_low)
        return await self._clause_single(c, c_low)

    def _others(self, text: str, named: re.Match) -> list[str]:
        """The devices the words name besides the name filter's own word ("whose name contains line3": line3 is a
        part of ids, not a device)."""
        part = named.group(1) or named.group(2)
        return [d for d in devices_in(text, self.known) if d.lower() != part]

    async def _clause_single(self, c: str, c_low: str) -> Resolved:
        named = _NAMED_LIKE.search(c_low)
        if named is not None and not self._others(c, named):
            if self._writes(c_low[:named.start()]):
                return await self._fanout(c, named)
            return Resolved({"tool": "list_devices", "args": {"filter": named.group(1) or named.group(2)}}, [c],
                            self.meta)
        m = _FANOUT.search(c_low)
        if m and devices_in(c, self.known) == [] and self._writes(c_low):
            return await self._fanout(c, m)
        return await self._single(c)

    @staticmethod
    def _writes(low: str) -> bool:
        low = _unslip_verbs(low)
        return bool(re.search(r"\b(?:set|stop|start|turn|switch|shut|close|open|put|make|change|enable|disable|"
                              r"restart|power (?:up|down|on|off)|halt|kill|activate|deactivate|pause|resume|run)\b",
                              low))

    async def _fanout(self, c: str, m: re.Match) -> Resolved:
        """"stop all pumps" -> list_devices {filter: pump}, then the write over each device it finds."""
        word = _singular(next(g for g in m.groups() if g))
        if word in _NOT_KINDS:
            return await self._single(c)
        start, end = m.start(), m.end()
        nxt = re.match(r"\s+([a-z][a-z_]*(?:-[a-z][a-z_]*)*)\b(?!-)", c[end:], re.I)
        second = _singular(nxt.group(1).lower()) if nxt is not None else ""
        if self.known and second and second not in _NOT_KINDS and any(second in d.lower() for d in self.known):
            ids = [d.lower() for d in self.known]
            joined = next((f"{word}{j}{second}" for j in ("_", "-", "") if any(f"{word}{j}{second}" in d for d in ids)),
                          None)
            if joined is not None:  # "all spray bars" over spray_bar1..: one kind said in two words
                word, end = joined, end + nxt.end()
            elif not any(word in d for d in ids):  # "all irrigation zones" over irrig_zone1..: the word the ids hold
                word, end = second, end + nxt.end()
        if self.known and not any(word in d.lower() for d in self.known):
            # "close all vlaves": the one kind of the registry's ids the word is a slip of
            from edge_agent.glm.words import one_edit
            kinds = {k.group() for d in self.known if (k := re.match(r"[a-z]+", d.lower()))}
            near = [k for k in kinds if one_edit(word, k)]
            word = near[0] if len(near) == 1 else word
        stand_in = "zz-0"
        if word in ("device", "devic", "machine", "unit", "thing", "one"):
            word = None  # "stop all devices": every device (the cap decides)
        sentence = c[:start] + stand_in + c[end:]
        call = await self.call(sentence)
        if call["tool"] != "write_point" or call["args"].get("device") != stand_in:
            return clarify(call["args"]["reason"]) if call["tool"] == "clarify" else clarify("which_device")
        args = {"device": {"each": 1}, "point": call["args"]["point"], "value": call["args"]["value"]}
        steps = [{"tool": "list_devices", "args": {"filter": word}}, {"tool": "write_point", "args": args}]
        return Resolved({"plan": steps}, [c, sentence.replace(stand_in, "{each}")], self.meta)

    # ---- several reads ----
    async def _reads(self, text: str, low: str) -> Resolved | None:
        """A read-only request that names several devices ("pump-1 and pump-2 temps right now") or several points of
        one device ("boiler-7 pressure and temperature now"), or says "compare": one `query_stats` per (device, point)
        in the order named, all with the one aggregate and window the words state (code reads those words; the model
        answers the read of the first device alone, for what the words leave open). None: not such a request."""
        ds = devices_in(text, self.known)
        pts = self.points.named(text)
        if len(pts) > 1 and "current" in pts and re.search(r"\b(?:current|curent|currnet|curren)\b(?!\s*(?:and|&|\+|,|or|"
                                                           r"draw|of|on|for|in|rn|now|right|atm|pls|please|plz|too|"
                                                           r"also|then)\b)(?!\s*$)", low):
            pts.remove("current")  # "current speed of fan-2": now, not the point current
        if self.known:
            have = {p for d in ds for p in self.known.get(d, [])}
            if len(pts) > 1:
                # "current" that none of these devices has is "now", not the point; any other point word is asked
                # as said (a read of a point the device lacks is refused by the registry check, never swapped)
                pts = [p for p in pts if p in have or p != "current"] or pts
            said = self._masked(text, low)  # "co2-doser-2" says no co2
            own = sorted((m.start(), p) for p in have
                         for m in [re.search(rf"(?<![a-z]){re.escape(p.lower())}s?(?![a-z])", said)] if m)
            if own and any(p not in have for p in pts) and len(own) >= len(pts):
                pts = [p for _, p in own]  # the registry's own name for the point, said as it is registered
            plural = sorted((m.start(), p) for p in have
                            for m in [re.search(rf"(?<![a-z]){re.escape(p.lower())}s?(?![a-z])", said)] if m)
            extra = [p for _, p in plural if p not in pts
                     and not any(p != q and p in self.points.words_of(q) for q in pts)]
            if pts and extra:
                pts = pts + extra  # "temps and levels": every registered point said, plurals too
        comparing = _COMPARE.search(low) is not None
        if not ds or (len(ds) < 2 and len(pts) < 2):
            return clarify("which_device") if comparing and not ds else None
        pairs = self._pairs(text, ds, pts)
        if pairs is None:
            return None
        if len(pairs) > MAX_STEPS:
            return clarify("too_complex")  # 5 reads or more: beyond a plan
        first = ds[0]
        reduced = text
        for d in ds[1:]:
            reduced = re.sub(rf"\s*(?:,|\+|&|\band\b|\bor\b|\bvs\.?|\bversus\b|-)?\s*(?<![\w-]){re.escape(d)}(?:'s)?"
                             rf"(?![\w-])", " ", reduced, flags=re.I)
        if not pts:
            pts = [p for rx, p in _IMPLIED if re.search(rx, low)][:1]  # "which is more humid": humidity
            pairs = [(d, pts[0]) for d, _ in pairs] if pts else pairs
        if comparing and not pts:
            return clarify("which_value")  # "compare A and B" without a point
        windows, stated = _windows(text)
        if stated and len(windows) > 1 or len(_said_aggs(low)) > 1:
            return None  # a window or an aggregate each ("min X today and max Y today"): not one read copied
        window = windows[0] if stated and windows else None
        agg = _said_agg(low)
        if comparing:
            agg, window = agg or "avg", window or 3600
        elif agg is None and window is None and _NOW.search(low):
            agg, window = "last", 60
        if pts and agg is not None and window is not None:  # the words say it all: no model
            return Resolved({"plan": [{"tool": "query_stats", "args": {"device": d, "point": p, "agg": agg,
                                                                       "window_s": window}} for d, p in pairs]},
                            [text] * len(pairs), self.meta)
        call = await self.call(re.sub(r"\s+", " ", reduced).strip())
        if call["tool"] != "query_stats":
            return None
        a = call["args"]
        if agg is None and window is not None:
            agg = a["agg"] if a["agg"] != "last" else "avg"
        elif agg is not None and window is None:
            window = a["window_s"] if a["agg"] == agg or a["window_s"] != 60 else 3600
            window = 60 if agg == "last" else window
        agg, window = agg or a["agg"], window or a["window_s"]
        if not pts:
            pts = [self._fit_point(first, a["point"], low)]
            pairs = [(d, pts[0]) for d, _ in pairs]
        steps = [{"tool": "query_stats", "args": {"device": d, "point": p, "agg": agg, "window_s": window}}
                 for d, p in pairs]
        if len(steps) == 1:
            return None
        return Resolved({"plan": steps}, [text] * len(steps), self.meta)

    def _fit_point(self, device: str, point: str, low: str) -> str:
        """The model's point, unless the registry says the device has no such point and the words or the registry
        leave only one ("whats the current level in tank_4": level, not current)."""
        have = (self.known or {}).get(device)
        if not have or point in have:
            return point
        said = [p for p in have if re.search(rf"(?<![a-z]){re.escape(p.lower())}(?![a-z])", low)]
        if len(said) == 1:
            return said[0]
        return list(have)[0] if len(have) == 1 else point

    def _pairs(self, text: str, ds: list[str], pts: list[str]) -> list[tuple[str, str | None]] | None:
        """Which point goes with which device: every device the same point(s) ("the pressure of A and B", "A and B
        pressure and temperature"), or each its own ("A humidity + B temperature"). None where it is not clear."""
        if len(pts) <= 1:
            return [(d, pts[0] if pts else None) for d in ds]
        if len(ds) == 1:
            return [(ds[0], p) for p in pts]
        low = text.lower()
        starts = [low.find(d.lower()) for d in ds]
        if any(x < 0 for x in starts) or starts != sorted(starts):
            return None
        table = self.points
        own = [table.named(low[s:(starts[i + 1] if i + 1 < len(starts) else len(low))]) for i, s in enumerate(starts)]
        if not table.named(low[:starts[0]]) and all(len(o) == 1 for o in own):
            return [(d, o[0]) for d, o in zip(ds, own)]
        before = table.named(low[:starts[0]])
        if not any(own[:-1]) and not (before and own[-1]):  # "A and B temps and levels": every point, every device
            return [(d, p) for d in ds for p in pts]
        return None

    # ---- compare ----
    async def _compare(self, text: str, low: str) -> Resolved:
        ds = devices_in(text, self.known)
        pts = self.points.named(text)
        if len(ds) < 2:
            return clarify("which_device") if not ds else await self._single(text)
        if not pts:
            return clarify("which_value")
        windows, stated = _windows(text)
        window = windows[0] if stated and windows else 3600
        agg = next((a for w, a in _AGG if f" {w} " in f" {low} " and a not in ("last",)), "avg")
        steps = [{"tool": "query_stats", "args": {"device": d, "point": p, "agg": agg, "window_s": window}}
                 for p in pts for d in ds]
        if len(steps) > MAX_STEPS:
            return clarify("too_complex")
        return Resolved({"plan": steps}, [text] * len(steps), self.meta)

    # ---- conditions ----
    def _condition(self, cond: str) -> tuple[str, str, str, float] | Resolved:
        """(device, point, op, value) of a condition's words, or the clarify it needs."""
        low = _unslip(_norm(cond))
        if _RATE.search(low) or re.search(r"\b(?:between|from \S+ to|outside|within|in the range)\b", low):
            return clarify("too_complex")  # a rate, or two thresholds
        hits = []
        for phrase, op in sorted(_CMP, key=lambda c: -len(c[0])):  # "not equal to" before "is not", "equal to"
            for m in re.finditer(r"(?<![a-z])" + re.escape(phrase) + r"(?![a-z])", low):
                if not any(s < m.end() and m.start() < e for s, e, _ in hits):  # "is at least": one comparison
                    hits.append((m.start(), m.end(), op))
        hits.sort()
        if not hits:
            hits = [(m.start(), m.end(), "==") for m in re.finditer(r"\b(?:is|at|reads|hits|reaches)\b", low)][:1]
        if len(hits) > 1 and len({h[2] for h in hits}) > 1 or re.search(r"\b(?:and|or)\b.*\b(?:above|below|over|"
                                                                         r"under|than)\b", low[hits[0][1]:] if hits
                                                                         else ""):
            return clarify("too_complex")
        if not hits:
            return clarify("which_value")
        start, end, op = hits[0]
        vals = numbers(cond[end - 0:] if False else low[end:])
        if not vals:
            return clarify("which_value")
        ds = devices_in(cond, self.known)
        if len(ds) > 1:
            return clarify("too_complex")
        device = ds[0] if ds else ""
        pts = self.points.named(low[:start]) or self.points.named(low)
        if not pts:
            pts = [p for rx, p in _IMPLIED if re.search(rx, low)][:1]
            pts = pts if not self.known or not device or pts and pts[0] in self.known.get(device, pts) else []
        if not pts:
            extra = [p for p in (self.known or {}).get(device, []) if re.search(rf"\b{re.escape(p.lower())}\b", low)]
            pts = extra
        if len(pts) != 1:
            return clarify("which_value")
        return device, pts[0], op, vals[0]

    def _split_condition(self, text: str, low: str, words: str) -> tuple[str, str] | None:
        """(condition, action) around a condition word ("if", "whenever", ...)."""
        m = re.search(rf"\b{words}\b", text, re.I)
        if m is None:
            return None
        before, after = text[:m.start()].strip(" ,"), text[m.end():].strip(" ,")
        if before and not re.fullmatch(r"(?:please|pls|ok|okay|hey|now|and|so|then|right now)?", before.lower()):
            return after, before  # "stop pump-3 if its temperature is above 80"
        parts = re.split(r",\s*(?:then\s+)?|\s+then\s+", after, maxsplit=1)
        if len(parts) == 2:
            return parts[0], parts[1]
        # no comma: the condition ends after its number ("if pump-3 is above 80 stop it")
        m2 = re.search(r"(?<![\w-])(-?[0-9][0-9.,]*|" + _NUMBER_WORDS + r")\s*(?:%|°c|°f|c|f|degrees|percent|bar|psi|"
                       r"rpm|kw|a|v)?(?:\s+(?:now|right now|rn|atm|currently|at the moment|at present|presently))?\s+(?!(?:sec|min|hour|hr|day|"
                       r"week|for|in|over|during|and|or)\w*\b)", after, re.I)
        if m2 is None:
            return after, ""
        return after[:m2.end()].strip(), after[m2.end():].strip()

    async def _condition_now(self, text: str, low: str) -> Resolved:
        m = re.search(r"^(.*?)(?:,\s*(?:and\s+)?|\s+and\s+)(?:then\s+)?(if\b.*)$", text, re.I | re.S)
        if m is not None and m.group(1).strip() and not re.search(r"\bif\b", m.group(1), re.I):
            # "read pump-1 pressure and if it is above 3 stop pump-1": the lead clauses, then the condition
            lead = await self._compound(m.group(1), _norm(m.group(1)))
            if lead.kind == "clarify":
                return lead
            if lead.kind not in ("call", "plan"):
                return clarify("too_complex")
            lead_steps = lead.doc["plan"] if lead.kind == "plan" else [lead.doc]
            rest_text = m.group(2)
            ds = Frame(last=lead.doc).devices()
            reads = [s for s in lead_steps if s["tool"] == "query_stats"]
            cond_words = (self._split_condition(rest_text, _norm(rest_text), r"if") or ("", ""))[0]
            if len(ds) == 1 and not devices_in(cond_words, self.known):
                if len(reads) == 1 and not self.points.named(cond_words):
                    # "read pump-1 pressure and if it is above 3 ...": "it" is the value just read
                    rest_text = re.sub(r"\b(?:its value|the value|it's|its|it is|it|that)\b",
                                       f"{ds[0]} {reads[0]['args']['point']}", rest_text, count=1, flags=re.I)
                rest_text = self._substitute(rest_text, ds[0])
            rest = await self._condition_now(rest_text, _norm(rest_text))
            if rest.kind != "plan":
                return rest
            first, tail = rest.doc["plan"][0], rest.doc["plan"][1:]
            same = next((i for i, s in enumerate(lead_steps, 1) if s["tool"] == "query_stats"
                         and s["args"]["device"] == first["args"]["device"]
                         and s["args"]["point"] == first["args"]["point"]), None)
            if same is not None:  # the condition is on a read the lead already makes: no second read
                tail = [dict(json.loads(json.dumps(s)), when={**s["when"], "step": same}) if "when" in s else s
                        for s in tail]
                steps = lead_steps + [_shift(s, len(lead_steps) - 1) if "when" not in s else
                                      {**_shift({k: v for k, v in s.items() if k != "when"}, len(lead_steps) - 1),
                                       "when": s["when"]} for s in tail]
                texts = list(lead.texts) + list(rest.texts[1:])
                if len(steps) > MAX_STEPS:
                    return clarify("too_complex")
                return Resolved({"plan": steps}, texts, self.meta)
            steps = lead_steps + [_shift(s, len(lead_steps)) for s in rest.doc["plan"]]
            if len(steps) > MAX_STEPS:
                return clarify("too_complex")
            return Resolved({"plan": steps}, list(lead.texts) + list(rest.texts), self.meta)
        split = self._split_condition(text, low, r"(?:if|provided(?: that)?|in case)")
        if split is None:
            return await self._single(text)
        cond, action = split
        if not action and self._writes(_norm(cond)) and not numbers(cond) and not _windows(cond)[1]:
            return clarify("which_value")  # "if chiller-b temp is too high shut comp-12": no value to compare with
        if not action:
            return await self._single(text)  # "is pump-3 above 80?" read as a question: the engine's
        c = self._condition(cond)
        if isinstance(c, Resolved):
            return c
        device, point, op, value = c
        acts = self._clauses(action)
        if not device:
            ds = devices_in(action, self.known)
            if len(ds) != 1:
                return clarify("which_device")
            device = ds[0]
        read = {"tool": "query_stats", "args": {"device": device, "point": point, "agg": "last", "window_s": 60}}
        steps: list[dict] = [read]
        texts: list[str | None] = [cond]
        prev: list[str] = [device]
        for a in acts:
            a_low = _norm(a)
            if _DEPENDS.search(a_low) or _has(a_low, _STANDING) is not None:
                return clarify("too_complex")  # a condition on a condition
            if _NEG.search(a_low):
                continue
            if self._states_condition(a):
                return clarify("too_complex")  # "..., then B pressure is above 7, stop B": a second condition
            ds = devices_in(a, self.known)
            if not ds and self._kind(a_low, prev[0]):
                return clarify("which_device")  # "if tank_5 level is under 20, stop the pump": which pump?
            if not ds:
                a = self._substitute(a, prev[0]) if _PRONOUN.search(a_low) else f"{a} {prev[0]}"
            elif self._bare(a, ds) and len(steps) > 1:
                a = self._swap(texts[-1] or "", prev, ds[0])
            own = self._value_only(a, device, point)
            # the guard reads the order with the point its condition named ("make pump-1 speed 1500")
            said = re.sub(rf"(?<![\w-]){re.escape(device)}(?![\w-])", f"{device} {point}", a, count=1, flags=re.I)
            r = Resolved(own, [said], self.meta) if own is not None else await self._clause_single(a, _norm(a))
            if r.kind == "clarify":
                return r
            if self._writes(a_low) and not any(s["tool"] == "write_point" for s in r.doc.get("plan", [r.doc])):
                return clarify("which_value")  # an order read as something else: never a conditional read instead
            for s, t in (zip(r.doc["plan"], r.texts) if r.kind == "plan" else [(r.doc, r.texts[0])]):
                s = _shift(s, len(steps) - 0) if r.kind == "plan" else dict(s)
                if s["tool"] == "write_point" or r.kind == "call":
                    s["when"] = {"step": 1, "op": op, "value": value}
                steps.append(s)
                texts.append(t)
            prev = devices_in(a, self.known) or prev
        if len(steps) < 2:
            return clarify("nothing")
        if len(steps) > MAX_STEPS:
            return clarify("too_complex")
        return Resolved({"plan": steps}, texts, self.meta)

    async def _standing(self, text: str, low: str) -> Resolved:
        """A standing condition -> a rule proposal (add_rule): one device's point against one threshold, or silence."""
        word = _has(low, _ALERT_WORDS) or _has(low, (*_STANDING, "when")) or "when"
        if word in _ALERT_WORDS:  # "ping me whenever ...": an alert, whatever the condition word
            m = re.search(r"\b(?:when(?:ever)?|if|once|as soon as|in case|each time|every time|any ?time)\b", text,
                          re.I)
            if m is None:
                return clarify("which_value")
            cond, action = text[m.end():].strip(" ,?.!"), ""
            tail = re.search(r"\s*,?\s*\b(?:and|then|and then)\s+(.+)$", cond, re.I)
            if tail is not None and self._writes(_norm(tail.group(1))):
                # "notify me whenever pump-9 flow is below 1 and stop pump-9": the order is the rule's action
                cond, action = cond[:tail.start()].strip(" ,"), tail.group(1).strip(" ,")
            lead = text[:m.start()]
            if re.search(r"\band\b", lead, re.I) and self._writes(_norm(lead)):
                action = re.sub(r"\s*(?:and\s+)?(?:alert|notify|warn|let|ping|message|email|page|send|raise)\b.*$",
                                "", lead, flags=re.I).strip(" ,")
        else:
            split = self._split_condition(text, low, r"(?:whenever|every time|each time|from now on,? if|from now "
                                                     r"on|any ?time|as soon as|once|when|tell me (?:when|if))")
            if split is None:
                return clarify("too_complex")
            cond, action = split
        cond = re.sub(r"^(?:if|when(?:ever)?)\s+", "", cond.strip(" ,?.!"), flags=re.I)
        action = re.sub(r"\s*,?\s*(?:and\s+)?(?:alert|notify|warn|tell|let) (?:me|us)\b.*$", "", action,
                        flags=re.I).strip(" ,")
        c_low = _norm(cond)
        silent = re.search(r"\b(?:silent|quiet|stops? (?:reporting|sending)|goes? offline|no data|nothing|dead|"
                           r"doesn't report|does not report|stops talking|(?:hasn't|hasnt|has not|haven't|havent|not|"
                           r"never) (?:reported|sent|been heard|updated|reported anything|sent anything)|no (?:new )?"
                           r"(?:readings?|reports?|values?|updates?|messages?)|stopped (?:reporting|sending))\b", c_low)
        if silent:
            ds = devices_in(cond, self.known)
            if len(ds) != 1:
                return clarify("which_device")
            device = ds[0]
            wins, stated = _windows(cond)
            if not stated:
                return clarify("which_value")
            pts = self.points.named(cond)
            if not pts and self.known and len(self.known.get(device, [])) == 1:
                pts = list(self.known[device])
            if len(pts) != 1:
                return clarify("which_value")
            args: dict[str, Any] = {"kind": "nodata", "device": device, "point": pts[0], "seconds": wins[0]}
        else:
            if _windows(cond)[1]:
                return clarify("too_complex")  # "over 80 for 10 minutes": a duration, not one threshold
            c = self._condition(cond)
            if isinstance(c, Resolved):
                return c
            device, point, op, value = c
            if not device and re.search(r"\b(?:its|it|it's)\b", c_low):
                ds = devices_in(action, self.known)  # "stop drive-5 whenever its current is over 40"
                device = ds[0] if len(ds) == 1 else ""
                if device:
                    c = self._condition(self._substitute(cond, device))
                    if isinstance(c, Resolved):
                        return c
                    device, point, op, value = c
            if not device:
                return clarify("which_device")
            if op not in (">", ">=", "<", "<="):
                return clarify("too_complex")
            args = {"kind": "above" if op in (">", ">=") else "below", "device": device, "point": point,
                    "threshold": value}
        texts: list[str | None] = [cond]
        if action and not re.fullmatch(r"(?:please|pls|ok|okay|hey|and)?", action.strip().lower()):
            a_low = _norm(action)
            if _NEG.search(a_low):
                return clarify("nothing")
            if _DEPENDS.search(a_low) or _has(a_low, _STANDING) is not None:
                return clarify("too_complex")
            if not devices_in(action, self.known):
                action = self._substitute(action, device) if _PRONOUN.search(a_low) else f"{action} {device}"
            call = (await self._single(action)).doc
            if call["tool"] == "clarify":
                return clarify(call["args"]["reason"])
            if call["tool"] != "write_point":
                return clarify("too_complex")
            a = call["args"]
            args.update(action_device=a["device"], action_point=a["point"], action_value=json.dumps(a["value"]))
            texts.append(action)
        return Resolved({"tool": "add_rule", "args": args}, texts, self.meta)

    # ---- follow-ups on the frame ----
    async def _followup(self, text: str, low: str, frame: Frame, named: list[str],
                        force: bool = False, opener: bool = False) -> Resolved | None:
        """The frame's last call or plan with only what the follow-up names changed, or None (not a follow-up)."""
        last = frame.last
        assert last is not None
        rest = _OPENER.sub("", low).strip()
        pts = self.points.named(rest)
        windows, stated = _windows(rest)
        said_rest = re.sub(r"(?<![a-z])[0-9]+ ?min\b", " ", rest)  # "last 10 min": a window, not the minimum
        agg = next((a for w, a in _AGG if re.search(rf"(?<![a-z]){re.escape(w)}(?![a-z])", said_rest)
                    and not (w == "current" and "current" in pts)), None)  # "and the current draw": the point
        opener = opener or _OPENER.match(low) is not None or force
        if not (named or pts or stated or agg or (force and numbers(rest))):
            return None
        if _BACKLOG.search(rest) or re.search(r"\b(?:alarms?|alerts?|alarms|list|devices|status|health)\b", rest):
            return None  # "backlog and active alarms": a question of its own, not a read with its point changed
        words = len(rest.split())
        if not opener and words > 6:
            return None
        if not opener and named:
            return None
        if not opener and self._writes(rest) and not (pts or stated or agg):
            return None
        if not (named or pts or stated or agg) and not (force and numbers(rest)):
            return None
        steps = [dict(s, args=dict(s["args"])) for s in (last.get("plan") or [last])]
        old_devices = frame.devices()
        texts = list(frame.texts) if frame.texts else [None] * len(steps)
        if named:
            if len(old_devices) != 1:
                return clarify("which_device")
            if len(named) > 1:
                if len(steps) != 1 or len(named) > MAX_STEPS:
                    return clarify("too_complex")
                base, t0 = steps[0], texts[0] if texts else None
                steps = [dict(base, args=dict(base["args"], device=d)) for d in named]
                texts = [(t0 or "").replace(old_devices[0], d) if t0 else None for d in named]
            else:
                for s in steps:
                    if s["args"].get("device") == old_devices[0]:
                        s["args"]["device"] = named[0]
                texts = [t.replace(old_devices[0], named[0]) if isinstance(t, str) else t for t in texts]
        changed = bool(named)
        said = numbers(rest)
        if force and len(steps) == 1 and steps[0]["tool"] == "write_point" and len(said) == 1 and not stated \
                and isinstance(steps[0]["args"]["value"], (int, float)) \
                and not isinstance(steps[0]["args"]["value"], bool):
            # "make that 45": the write's value, in the words the guard reads
            old = steps[0]["args"]["value"]
            steps[0]["args"]["value"], changed = said[0], True
            texts = [re.sub(rf"(?<![\w.-]){re.escape(_num(old))}(?![\w.])", _num(said[0]), t) if isinstance(t, str)
                     else t for t in texts]
        for s in steps:
            if s["tool"] != "query_stats":
                continue
            if len(pts) == 1:
                s["args"]["point"], changed = pts[0], True
            if agg is not None:
                s["args"]["agg"], changed = agg, True
                if agg == "last" and not stated:
                    s["args"]["window_s"] = 60
            if stated and windows and 1 <= windows[0] <= MAX_WINDOW_S:
                s["args"]["window_s"], changed = windows[0], True
                if s["args"]["agg"] == "last" and agg is None:
                    s["args"]["agg"] = "avg"
        if not changed:
            return None
        doc = steps[0] if len(steps) == 1 else {"plan": steps}
        return Resolved(doc, texts, {}, followup=True)

    def _undo(self, frame: Frame) -> Resolved:
        if not frame.writes:
            return clarify("nothing", "nothing was written in this conversation to set back")
        steps = [{"tool": "write_point", "args": {"device": w["device"], "point": w["point"], "value": w["old"]}}
                 for w in frame.writes if w.get("old") is not None]
        if not steps:
            return clarify("nothing")
        if len(steps) > MAX_STEPS:
            return clarify("too_complex")
        doc = steps[0] if len(steps) == 1 else {"plan": steps}
        return Resolved(doc, [None] * len(steps), followup=True)


_YES_WORDS = frozenset(w for p in YES for w in p.split()) | {"yes", "pls", "plz", "then", "now", "thanks", "thx"}
_NO_WORDS = frozenset(w for p in NO for w in p.split()) | {"pls", "plz", "then", "thanks", "thx", "it", "that", "mind"}
_UNDO_WORDS = ("back", "undo", "revert", "restore", "please")


def _yes_no(low: str) -> bool | None:
    """True: every word says yes ("yes", "ok go ahead", "yse"); False: every word says no ("nah cancel"); else None."""
    words = [w.strip(",.!") for w in low.split()]
    if not words or len(words) > 5:
        return None
    if low in YES or low in NO:
        return low in YES
    if all(w in _NO_WORDS for w in words) and any(w in {"no", "nope", "nah", "cancel", "abort", "don't", "dont",
                                                        "never", "negative", "scrap", "forget"} for w in words):
        return False
    strong = {"yes", "y", "yeah", "yep", "yup", "ok", "okay", "sure", "confirm", "confirmed", "proceed", "affirmative",
              "go", "do"}
    if all(w in _YES_WORDS or _swapped(w, "yes") or _swapped(w, "confirm") for w in words) \
            and any(w in strong or _swapped(w, "yes") or _swapped(w, "confirm") for w in words) \
            and not any(w in _NO_WORDS and w not in _YES_WORDS for w in words):
        return True
    return None


def _unslip_alert(text: str) -> str:
    """"notfy me", "alret me", "wran me": an alert verb before "me"/"us" with one slipped letter, read as the verb."""
    from edge_agent.glm.words import one_edit

    def fix(m: re.Match) -> str:
        w = m.group(1).lower()
        hit = next((v for v in ("notify", "alert", "message", "email") if w != v and len(w) >= 4 and one_edit(w, v)),
                   None) or next((v for v in ("warn", "ping") if _swapped(w, v)), None)
        return f"{hit} {m.group(2)}" if hit else m.group(0)
    return re.sub(r"\b([a-z]+) (me|us)\b", fix, text, flags=re.I)


_TIME_WORDS = ("hour", "hours", "minute", "minutes", "mins", "second", "seconds", "secs", "days", "week", "weeks",
               "half", "quarter", "shift", "today", "yesterday", "morning", "night", "evening", "fortnight", "month")


def _timeish(low: str) -> bool:
    """A word that is, or may be a slip of, a time word ("half horu"): a window may be meant that the parser missed."""
    from edge_agent.glm.words import one_edit

    return any(w in _TIME_WORDS or w in ("hr", "hrs", "min", "sec", "day", "h", "m", "d") or len(w) >= 4
               and any(one_edit(w, t) for t in _TIME_WORDS) for w in re.findall(r"[a-z]+", low))


def _swapped(a: str, b: str) -> bool:
    """a is b with two neighbouring letters swapped ("yse" for "yes"): the one slip short words are read through."""
    if len(a) != len(b) or a == b:
        return False
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]


def _unslip_words(low: str, vocab, shortest: int = 3) -> str:
    """Words of `vocab` with one slipped letter ("bakc", "bak") read as the word."""
    from edge_agent.glm.words import one_edit

    return " ".join(next((v for v in vocab if len(w) >= shortest and w not in vocab and one_edit(w, v)), w)
                    for w in low.split())


_RELATIVE = re.compile(r"\bby\s+(?:-?[0-9]|[a-z]+\b(?<!the)(?<!a))|[0-9]\s*(?:[a-z%°]+\s+)?(?:higher|lower|hotter|colder|"
                       r"warmer|cooler|more|less|up|down|above|below|over|under)\b|\b(?:up|down)\s+(?:by\s+)?-?[0-9]|"
                       r"\b(?:increase|decrease|raise|lower|bump|reduce|drop|add|subtract)\b(?!.*\b(?:to|at|=)\s+-?[0-9])"
                       r".*[0-9]")


def _ambiguous_value(text: str, args: dict) -> bool:
    """A numeric write whose words state a change by an amount ("raise X by 5", "5 degrees hotter") or more than one
    value ("to 70 or 72"): the value to write is not what the words say plainly."""
    value = args.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    low = _norm(text)
    for d in {args.get("device", "")} | set(re.findall(r"(?<![\w-])[a-z][\w.:/-]*[0-9][\w.:/-]*", low)):
        if d:
            low = re.sub(rf"(?<![\w-]){re.escape(str(d).lower())}(?![\w-])", " ", low)
    return bool(_RELATIVE.search(low)) or len(numbers(low)) > 1 and not _windows(low)[1]  # a time: the guard's


def _said_aggs(low: str) -> set[str]:
    """The aggregates a request's words say ("15 min" is a window, not the minimum)."""
    low = re.sub(rf"(?<![a-z])(?:[0-9]+|{_NUMBER_WORDS}) ?mins?\b", " ", low)
    return {a for rx, a in _SAID if re.search(rx, low)}


def _said_agg(low: str) -> str | None:
    """The one aggregate a request's words say, or None (none, or several)."""
    said = _said_aggs(low)
    return said.pop() if len(said) == 1 else None


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def _singular(word: str) -> str:
    """"pumps" -> "pump", "valves" -> "valve", "buses" -> "bus", "switches" -> "switch"; "press" stays."""
    if word.endswith(("ses", "xes", "zes", "ches", "shes")) and len(word) > 4:
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


_CMP_WORDS = ("above", "below", "under", "over", "exceeds", "greater", "higher", "lower", "less", "more", "least",
              "most", "beneath", "hotter", "colder", "warmer", "cooler")


def _unslip(low: str) -> str:
    """A comparison word with one slipped letter ("abve", "bellow", "udner") read as the word."""
    from edge_agent.glm.words import one_edit

    out = []
    for w in low.split():
        if len(w) >= 4 and w not in _CMP_WORDS and not re.search(r"[0-9]", w):
            w = next((c for c in _CMP_WORDS if one_edit(w, c)), w)
        out.append(w)
    return " ".join(out)


_VERBS = ("switch", "start", "close", "change", "enable", "disable", "activate", "deactivate", "restart", "check",
          "adjust", "increase", "decrease", "resume", "pause", "report", "status", "alarms", "alerts", "whats")


_ORDER_VERBS = ("switch", "start", "close", "change", "enable", "disable", "activate", "deactivate", "restart",
                "adjust", "increase", "decrease", "resume", "pause")  # what the model and the guard are given as read
_SHORT_VERBS = ("stop", "open", "shut", "turn", "halt", "start")  # read through two swapped letters only ("stpo")


def _unslip_verbs(text: str, orders_only: bool = False) -> str:
    """Order and question words with one slipped letter ("swtich", "strat", "chekc", "stpo") read as the word, where a
    verb stands: first, or after a joiner ("and", "then", "pls", a comma). "charge" in "mode to charge" is a value,
    never "change". Other words, case and punctuation are kept."""
    from edge_agent.glm.words import one_edit

    out: list[str] = []
    for word in text.split():
        if not out or out[-1].lower().rstrip(",;") in _VERB_BEFORE or out[-1].endswith((",", ";")):
            w = word.lower().strip(_STRIP)
            if w and w not in _VERBS and "'" not in w:
                v = next((v for v in (_ORDER_VERBS if orders_only else _VERBS) if len(w) >= 5 and one_edit(w, v)),
                         None) \
                    or next((v for v in _SHORT_VERBS if _swapped(w, v)), None)
                if v is not None:
                    word = word.lower().replace(w, v, 1)
        out.append(word)
    return " ".join(out)


_VERB_BEFORE = frozenset("and then also but please pls plz ok okay now so just can could you".split())


def _shift(step: dict, base: int) -> dict:
    """A step of a sub-plan moved `base` places later (its references with it)."""
    s = json.loads(json.dumps(step))
    if isinstance(s["args"].get("device"), dict):
        s["args"]["device"]["each"] += base
    if "when" in s:
        s["when"]["step"] += base
    return s
