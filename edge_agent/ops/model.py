"""The model's versions: model.update (a signed bundle from an HTTPS URL or a local folder), model.list,
model.rollback, model.cancel. The work is ota.Updater's; these say who may start it and how it answers."""
from __future__ import annotations

from edge_agent.ops.base import CommandError, Field, Gateway, Operation, Request


def _updater(gw: Gateway):
    if gw.models is None:
        raise CommandError("unavailable", "this gateway has no model update path")
    return gw.models


def _error(e) -> CommandError:
    code = "busy" if e.reason == "busy" else "forbidden" if e.reason == "disabled" else "refused"
    return CommandError(code, f"{e.reason}: {e.message}")


async def _update(gw: Gateway, req: Request) -> dict:
    from edge_agent.ota import UpdateError

    f = req.fields
    url, folder, wait = f.get("url"), f.get("dir"), f.get("wait", False)
    if bool(url) == bool(folder):
        raise CommandError("bad_request", "model.update: give url (a bundle on an HTTPS server) or dir (a local "
                                          "folder), one of them")
    if folder and not req.who.startswith("local uid="):
        raise CommandError("forbidden", "model.update: dir is for the local CLI (edge-agent model install); over "
                                        "MQTT give url")
    try:
        return await _updater(gw).update(url=url, folder=folder, wait=bool(wait))
    except UpdateError as e:
        raise _error(e) from None


async def _list(gw: Gateway, req: Request) -> dict:
    return _updater(gw).list()


async def _rollback(gw: Gateway, req: Request) -> dict:
    from edge_agent.ota import UpdateError

    try:
        return await _updater(gw).rollback()
    except UpdateError as e:
        raise _error(e) from None


async def _cancel(gw: Gateway, req: Request) -> dict:
    return {"cancelled": _updater(gw).abort()}


async def _keys(gw: Gateway, req: Request) -> dict:
    from edge_agent.ota import UpdateError

    f = req.fields
    keys = [k.strip() for k in f["keys"].split(",") if k.strip()]
    try:
        return await _updater(gw).rotate_keys(keys, f["serial"], f["sig"])
    except UpdateError as e:
        raise _error(e) from None


OPERATIONS = (
    Operation("model.update", "install a signed model bundle (url: HTTPS, mutual TLS; dir: local, CLI only); "
              "wait: reply with the outcome instead of on acceptance (steps are events on <prefix>/<gw>/ota)",
              {"url": Field((str,), False), "dir": Field((str,), False), "wait": Field((bool,), False)},
              changes=True, run=_update),
    Operation("model.cancel", "stop the model update in progress (it fails with reason cancelled); cancelled: "
              "false when none is", {}, changes=True, run=_cancel),
    Operation("model.list", "the model versions: serving, installed, good, bad (with why), on trial, the floor",
              {}, changes=False, run=_list),
    Operation("model.rollback", "serve the previous good model version again; the current one is marked bad", {},
              changes=True, run=_rollback),
    Operation("model.keys", "replace the keys that may sign models (keys: comma-separated base64 Ed25519), signed by "
              "a key of the current set over the new set and a serial above the last (edge-agent model keys)",
              {"keys": Field((str,)), "serial": Field((int,)), "sig": Field((str,))}, changes=True, run=_keys),
)
