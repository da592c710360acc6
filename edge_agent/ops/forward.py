"""forward.list, forward.set, forward.remove: what of the readings goes to the cloud (store/forward.py decides).

The rules sent by command match first, in the order they were added, then the config's `[[forward.rule]]` (read-only
here); a series no rule matches is forwarded whole. A change decides from the next commit on and is kept across
restarts; an open interval whose rule changed is sent at once.
"""
from __future__ import annotations

import logging

from edge_agent.config import ConfigError, forward_rule_from_dict
from edge_agent.ops.base import CommandError, Field, Gateway, Operation, Request

audit = logging.getLogger("edge_agent.audit")


async def _list(gw: Gateway, req: Request) -> dict:
    return {"rules": gw.forward_list(), "unmatched": "forwarded whole"}


async def _set(gw: Gateway, req: Request) -> dict:
    doc = req.fields["rule"]
    try:
        rule = await gw.forward_set(forward_rule_from_dict(doc))
    except (ConfigError, PermissionError) as e:
        audit.warning("forwarding rule refused", extra={"who": req.who, "rule": str(doc)[:200], "reason": str(e)})
        raise CommandError("bad_request" if isinstance(e, ConfigError) else "refused", str(e)) from None
    audit.info("forwarding rule set", extra={"who": req.who, "rule": rule["id"], "device": rule["device"],
                                             "point": rule["point"]})
    return {"set": rule}


async def _remove(gw: Gateway, req: Request) -> dict:
    rule_id = req.fields["rule_id"]
    try:
        removed = await gw.forward_remove(rule_id)
    except PermissionError as e:
        audit.warning("forwarding rule remove refused", extra={"who": req.who, "rule": rule_id, "reason": str(e)})
        raise CommandError("refused", str(e)) from None
    if not removed:
        raise CommandError("not_found", f"no forwarding rule {rule_id!r} sent by command")
    audit.info("forwarding rule removed", extra={"who": req.who, "rule": rule_id})
    return {"removed": rule_id}


OPERATIONS = (
    Operation("forward.list", "the forwarding rules in the order they match (command ones first), with where each "
              "comes from", {}, changes=False, run=_list),
    Operation("forward.set", "add or replace a forwarding rule (a [[forward.rule]] table as JSON: id, device, point, "
              "deadband | deadband_pct, max_silence_s, min_interval_s + mode, drop)", {"rule": Field((dict,))},
              changes=True, run=_set,
              examples=('{"rule": {"id": "temps", "point": "temperature", "deadband": 0.2, "max_silence_s": 300}}',)),
    Operation("forward.remove", "remove a forwarding rule sent by command", {"rule_id": Field((str,))},
              changes=True, run=_remove),
)
