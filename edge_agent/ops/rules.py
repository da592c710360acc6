"""rules.list, rules.add, rules.remove: the rules added by command (those of the config file are read-only here)."""
from __future__ import annotations

import logging

from edge_agent.ops.base import CommandError, Field, Gateway, Operation, Request

audit = logging.getLogger("edge_agent.audit")


async def _list(gw: Gateway, req: Request) -> list[dict]:
    return gw.rules_list()


async def _add(gw: Gateway, req: Request) -> dict:
    doc = req.fields["rule"]
    try:
        rule = await gw.rules_add(doc)
    except (ValueError, PermissionError) as e:
        audit.warning("rule add refused", extra={"who": req.who, "rule": str(doc)[:200], "reason": str(e)})
        raise CommandError("bad_request" if isinstance(e, ValueError) else "refused", str(e)) from None
    audit.info("rule added", extra={"who": req.who, "rule": rule["id"], "kind": rule["kind"],
                                    "device": rule["device"], "point": rule["point"]})
    return {"added": rule}


async def _remove(gw: Gateway, req: Request) -> dict:
    rule_id = req.fields["rule_id"]
    try:
        removed = await gw.rules_remove(rule_id)
    except PermissionError as e:
        audit.warning("rule remove refused", extra={"who": req.who, "rule": rule_id, "reason": str(e)})
        raise CommandError("refused", str(e)) from None
    if not removed:
        raise CommandError("not_found", f"no rule {rule_id!r}")
    audit.info("rule removed", extra={"who": req.who, "rule": rule_id})
    return {"removed": rule_id}


OPERATIONS = (
    Operation("rules.list", "the rules, with where each comes from and whether it is firing", {}, changes=False,
              run=_list),
    Operation("rules.add", "add or replace a rule (a [[rules.rule]] table as JSON)", {"rule": Field((dict,))},
              changes=True, run=_add),
    Operation("rules.remove", "remove a rule added by command", {"rule_id": Field((str,))}, changes=True,
              run=_remove),
)
