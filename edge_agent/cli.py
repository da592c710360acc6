"""The `edge-agent` command."""
from __future__ import annotations

import argparse
import json
import asyncio
import logging
import sys
from pathlib import Path

from edge_agent import __version__, config, logs
from edge_agent.tls import TlsConfigError

DEFAULT_CONFIG = "/etc/edge-agent/config.toml"
EXIT_CONFIG = 2
EXIT_NO_DAEMON = 3


def _fail(msg: str) -> int:
    print(f"edge-agent: {msg}", file=sys.stderr)
    return EXIT_CONFIG


def cmd_run(args: argparse.Namespace) -> int:
    import faulthandler
    import signal

    from edge_agent.app import App
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: stacks to the journal
    try:
        cfg = config.load(args.config)
        logs.setup(cfg.log.level, cfg.log.format)
        app = App(cfg)
        app.build()
    except (config.ConfigError, TlsConfigError) as e:
        return _fail(str(e))
    try:
        asyncio.run(app.run())
    except KeyboardInterrupt:
        pass
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import shutil

    from edge_agent import ops, tls
    from edge_agent.ops.signing import parse_keys
    try:
        cfg = config.load(args.config)
        ops.allowed(ops.TABLE, cfg.commands.allow)
        keys = parse_keys(cfg.commands.operator_keys)
        if cfg.uplink.enabled:
            tls.client_context(cfg.uplink.ca_file, cfg.uplink.cert_file, cfg.uplink.key_file, prefix="uplink.")
        mq = cfg.southbound.mqtt
        if mq.enabled and mq.tls:
            f = mq.tls_files
            tls.client_context(f.ca_file, f.cert_file, f.key_file, prefix="southbound.mqtt.tls_files.")
    except (config.ConfigError, TlsConfigError) as e:
        return _fail(str(e))
    if cfg.model.enabled:  # a bad model never stops the daemon (ask answers 'unavailable'), but say so here
        from edge_agent.glm.engine import shipped_model_dir
        from edge_agent.glm.models import ModelError, load_verified
        try:
            m = load_verified(Path(cfg.model.dir) if cfg.model.dir else shipped_model_dir(), cfg.model.public_key)
            print(f"# model {m.name}: signature and files verified")
            smoke_ok = _smoke(cfg.model, cfg.ask)
        except ModelError as e:
            print(f"# model NOT usable, ask will answer 'unavailable': {e}")
            smoke_ok = True
    if cfg.uplink.enabled and cfg.commands.enabled and not keys:
        print("# warning: no operator keys (commands.operator_keys): operations that change the gateway trust the "
              "cloud broker's ACL alone")
    where = Path(cfg.gateway.state_dir)
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if cfg.store.quota_bytes > free:
        print(f"# warning: store.quota_bytes ({cfg.store.quota_bytes} B) is more than the free space on {where} "
              f"({free} B): the disk fills before the quota applies")
    if cfg.model.enabled and not smoke_ok:
        return 1
    if args.connect:
        verdicts = asyncio.run(_probe(cfg))
        for line in verdicts:
            print(line)
        if any(not v.startswith("# ok") for v in verdicts):
            return 1
    print(f"# effective configuration of {args.config} (secrets redacted)")
    print(config.to_toml(config.to_dict(cfg)).lstrip())
    return 0


def _smoke(mcfg, acfg) -> bool:
    """The model's smoke set (its manifest: questions with the calls the fp32 model made at build time) run on this
    machine's provider: a CPU whose kernels round differently, or a provider that quantizes differently, shows here
    before an operator sees it. Prints the verdict; False on any disagreement."""
    import onnxruntime as ort

    from edge_agent import ops
    from edge_agent.glm.engine import Engine
    from edge_agent.glm.points import PointTable

    engine = Engine(mcfg, ops.TOOLSET, points=PointTable({p.name: p.words for p in acfg.points}))
    engine.load()
    try:
        info = engine.info()
        print(f"# onnxruntime {ort.__version__} offers {', '.join(ort.get_available_providers())}; the model runs "
              f"on {info['provider']} ({info['file']})" + "".join(f"; passed over: {r}" for r in info["passed_over"]))
        smoke = engine.model.manifest.get("smoke") or []
        if not smoke:
            print("# model: no smoke set in its manifest; answers on this machine not checked")
            return True
        wrong, _slowest = engine.smoke()
    finally:
        engine.close()
    if not wrong:
        print(f"# model: smoke set {len(smoke)}/{len(smoke)} answers equal the build's fp32 reference on this machine")
        return True
    print(f"# model DISAGREES on this machine: {len(wrong)} of {len(smoke)} smoke answers differ from the build's "
          "fp32 reference (a CPU or provider that computes differently); ask may answer differently here")
    for text, got, want in wrong[:5]:
        print(f"#   {text!r}: got {json.dumps(got)}, reference {json.dumps(want)}")
    return False


async def _probe(cfg) -> list[str]:
    """One verdict line per endpoint: `# ok …` or `# FAILED …` with the reason."""
    import time
    import uuid

    from edge_agent import tls
    from edge_agent.mqttio import ConnectError, MqttConnection, PublishError

    out = []
    up = cfg.uplink
    if up.enabled:
        where = f"cloud broker {up.host}:{up.port}"
        got: asyncio.Future = asyncio.get_running_loop().create_future()
        topic = f"{up.topic_prefix}/{cfg.gateway.id}/res/check-{uuid.uuid4().hex[:8]}"
        conn = MqttConnection(client_id=f"{cfg.gateway.id}-check", host=up.host, port=up.port, protocol=up.protocol,
                              keepalive=up.keepalive_s, server_hostname=up.server_hostname,
                              ssl_context=tls.client_context(up.ca_file, up.cert_file, up.key_file, prefix="uplink."),
                              on_message=lambda m: got.done() or got.set_result(time.perf_counter()))
        try:
            await conn.connect(timeout=10)
            version, peer = conn.tls_info() or ("?", {})
            subject = ",".join(f"{k}={v}" for rdn in peer.get("subject", ()) for k, v in rdn)
            await conn.subscribe([(topic, 1)], timeout=10)
            t0 = time.perf_counter()
            await asyncio.wait_for(conn.publish(topic, b"check", qos=1), 10)
            rtt = (await asyncio.wait_for(got, 10) - t0) * 1000
            out.append(f"# ok {where}: {version}, broker certificate {subject} valid until {peer.get('notAfter')}, "
                       f"client certificate accepted, round trip {rtt:.1f} ms")
        except ConnectError as e:
            why = {"tls_verification": "the broker's certificate is not trusted (uplink.ca_file) or not for this name",
                   "tls": "the TLS handshake failed (the broker refused the client certificate?)",
                   "closed": "the broker closed the connection while connecting: it refused the client certificate "
                             "(not signed by a CA it trusts?) or the client",
                   "refused": "the broker refused the connection"}.get(e.kind, e.kind)
            out.append(f"# FAILED {where}: {why}: {e}")
        except (PublishError, asyncio.TimeoutError, TimeoutError) as e:
            out.append(f"# FAILED {where}: connected, but no round trip (the broker's ACL?): {e or 'timed out'}")
        finally:
            await conn.disconnect()
            conn.close()
    mq = cfg.southbound.mqtt
    if mq.enabled:
        where = f"local broker {mq.host}:{mq.port}"
        ctx = tls.client_context(mq.tls_files.ca_file, mq.tls_files.cert_file, mq.tls_files.key_file,
                                 prefix="southbound.mqtt.tls_files.") if mq.tls else None
        conn = MqttConnection(client_id=f"{cfg.gateway.id}-check-local", host=mq.host, port=mq.port,
                              protocol=mq.protocol, ssl_context=ctx, username=mq.username, password=mq.password)
        try:
            await conn.connect(timeout=10)
            out.append(f"# ok {where}: connected")
        except ConnectError as e:
            out.append(f"# FAILED {where}: {e}")
        finally:
            await conn.disconnect()
            conn.close()
    if cfg.southbound.opcua.enabled:
        from edge_agent.southbound import opcua
        out += await opcua.probe(cfg.southbound.opcua)
    if cfg.southbound.coap.enabled:
        from edge_agent.southbound import coap
        out += await coap.probe(cfg.southbound.coap)
    return out or ["# ok nothing to connect to (uplink and southbound disabled)"]


def cmd_demo(args: argparse.Namespace) -> int:
    from edge_agent.devkit.demo import run_demo
    logs.setup("warning" if not args.verbose else "info", "text")
    logging.getLogger("asyncua").setLevel(logging.WARNING)  # its per-node info lines would drown the agent's
    logging.getLogger("asyncua.server").setLevel(logging.ERROR)  # the PLC simulator's, not the agent's
    return run_demo(duration=args.duration, devices=args.devices, rate=args.rate)


def _model_config(args: argparse.Namespace):
    """The [model] section of --config (defaults without one), with the command line's overrides."""
    import dataclasses
    import os

    cfg = config.load(args.config) if args.config and os.path.exists(args.config) else config.Config()
    m = cfg.model
    if args.model_dir:
        m = dataclasses.replace(m, dir=args.model_dir)
    if args.providers:
        m = dataclasses.replace(m, providers=args.providers.split(","))
    if args.threads:
        m = dataclasses.replace(m, threads=args.threads)
    return cfg, m


def _print_json(doc) -> None:
    import json
    print(json.dumps(doc, separators=(",", ":"), default=str, allow_nan=False))


def _state_dir(args: argparse.Namespace) -> str:
    """The running daemon's state directory (where its control socket is): from --config, or the default."""
    import os
    if args.config and os.path.exists(args.config):
        return config.load(args.config).gateway.state_dir
    if args.config != DEFAULT_CONFIG:
        raise config.ConfigError(f"{args.config}: config file not found (pass --config PATH)")
    return config.Config().gateway.state_dir


def _call_daemon(args: argparse.Namespace, name: str, request: dict) -> int:
    """One operation through the running daemon's control socket; prints its reply as one line of JSON."""
    from edge_agent.control import NoDaemon, call
    try:
        reply = call(_state_dir(args), name, request, timeout=args.timeout)
    except config.ConfigError as e:
        return _fail(str(e))
    except NoDaemon as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return EXIT_NO_DAEMON
    _print_json(reply)
    if not reply.get("ok"):
        return 1
    if name == "ask" and reply["result"].get("answer"):
        print(reply["result"]["answer"])
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    if not args.dry_run:
        return _call_daemon(args, "ask", {"text": args.text})
    return _plan_locally(args, [args.text])


def _plan_locally(args: argparse.Namespace, lines) -> int:
    """Plan here with the model and the orchestrator's composer (no daemon, no registry, nothing runs): one JSON
    line per request, the resolved call, plan, rule proposal, yes/no or clarify; a conversation's follow-ups are
    applied to its frame as the daemon would (a proposal is taken as pending until a yes or no answers it)."""
    import asyncio

    from edge_agent import ops
    from edge_agent.glm.engine import Engine
    from edge_agent.glm.models import ModelError
    from edge_agent.glm.points import PointTable
    from edge_agent.glm.tokenizer import PromptError
    from edge_agent.ops.compose import Composer
    from edge_agent.ops.memory import Frame

    logs.setup("warning", "text")
    try:
        cfg, mcfg = _model_config(args)
        points = PointTable({p.name: p.words for p in cfg.ask.points})
        engine = Engine(mcfg, ops.TOOLSET, points=points)
        engine.load()
    except (config.ConfigError, ModelError, RuntimeError) as e:
        return _fail(str(e))

    async def ask(text: str, known) -> dict:
        return {"call": (await engine.ask(text, known=known)).call}

    async def conversation() -> int:
        composer, frame = Composer(ask, None, points), Frame()
        for line in lines:
            text = line.strip()
            if not text:
                continue
            try:
                r = await composer.resolve(text, frame)
            except PromptError as e:
                print(f"edge-agent: {e}", file=sys.stderr)
                _print_json({"tool": "clarify", "args": {"reason": "nothing"}})
                continue
            _print_json(r.doc)
            if r.kind in ("call", "plan"):
                frame.last, frame.texts = r.doc, list(r.texts)
            writes = r.kind == "rule" or any(s.get("tool") == "write_point" for s in r.doc.get("plan", [r.doc]))
            if r.kind == "answer":
                frame.pending = None
            elif r.kind != "clarify":
                frame.pending = "proposed" if writes else None
        return 0
    try:
        return asyncio.run(conversation())
    finally:
        engine.close()


def cmd_chat(args: argparse.Namespace) -> int:
    """One conversation: a line in, the reply out. With the daemon (its memory keeps the conversation, one id for
    this session), or --dry-run: planned here, one JSON line per request."""
    if args.dry_run:
        return _plan_locally(args, sys.stdin)
    import secrets

    from edge_agent.control import NoDaemon, call
    conversation = "chat-" + secrets.token_hex(6)
    try:
        state = _state_dir(args)
    except config.ConfigError as e:
        return _fail(str(e))
    for line in sys.stdin:
        text = line.strip()
        if not text:
            continue
        try:
            reply = call(state, "ask", {"text": text, "conversation": conversation}, timeout=args.timeout)
        except NoDaemon as e:
            print(f"edge-agent: {e}", file=sys.stderr)
            return EXIT_NO_DAEMON
        if reply.get("ok"):
            print(reply["result"].get("answer") or json.dumps(reply["result"].get("resolved")), flush=True)
        else:
            print(f"error {reply['error']['code']}: {reply['error']['message']}", flush=True)
    return 0


def _fields(items: list[str]) -> dict:
    """NAME=VALUE arguments as a request's fields: a value is JSON where it parses (numbers, true, null, objects),
    else the text as a string. Raises ConfigError for an item without '='."""
    import json
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise config.ConfigError(f"field {item!r}: expected NAME=VALUE")
        try:
            out[key] = json.loads(text, parse_constant=lambda c: text)
        except ValueError:
            out[key] = text
    return out


def cmd_op(args: argparse.Namespace) -> int:
    try:
        request = _fields(args.fields)
    except config.ConfigError as e:
        return _fail(str(e))
    return _call_daemon(args, args.name, request)


def _signing_key(path: str):
    """An operator's or publisher's Ed25519 private key (unencrypted PEM); ConfigError says what is wrong."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).read_bytes(), None)
    except (OSError, ValueError, TypeError) as e:
        raise config.ConfigError(f"--key {path}: not a readable unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise config.ConfigError(f"--key {path}: not an Ed25519 key (make one: openssl genpkey -algorithm ed25519)")
    return key


def cmd_sign(args: argparse.Namespace) -> int:
    """An operator's signed request, as JSON to publish on <prefix>/<gateway>/cmd/<name>."""
    import uuid

    from edge_agent.ops.signing import sign
    try:
        key = _signing_key(args.key)
    except config.ConfigError as e:
        return _fail(str(e))
    try:
        fields = _fields(args.fields)
    except config.ConfigError as e:
        return _fail(str(e))
    _print_json(sign(key, args.key_id, args.name, args.id or uuid.uuid4().hex[:16], fields, gateway=args.gateway))
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    if args.action == "pack":
        return _model_pack(args)
    if args.action in ("list", "rollback", "cancel"):
        return _call_daemon(args, f"model.{args.action}", {})
    if args.action == "keys":
        return _model_keys(args)
    return _model_install(args)


def _model_keys(args: argparse.Namespace) -> int:
    """A key rotation's request (model.keys): the new set and its serial, signed by a key of the current set."""
    import base64

    from edge_agent.ota import key_set_message

    keys = [k.strip() for k in args.source.split(",") if k.strip()]
    if not keys or not args.key or args.serial <= 0:
        return _fail("model keys KEY[,KEY...] --key CURRENT.pem --serial N: the new public keys (base64), a key of "
                     "the current set and a serial above the last rotation's")
    try:
        key = _signing_key(args.key)
    except config.ConfigError as e:
        return _fail(str(e))
    sig = base64.b64encode(key.sign(key_set_message(keys, args.serial))).decode()
    _print_json({"keys": ",".join(keys), "serial": args.serial, "sig": sig})
    return 0


def _model_pack(args: argparse.Namespace) -> int:
    if not args.source or not args.key:
        return _fail("model pack DIR --key KEY: the folder and the signing key are needed")
    args.dir = args.source
    return _pack(args)


def _pack(args: argparse.Namespace) -> int:
    """Sign a model folder for publishing: its manifest (name, version, every file with size and sha256, minimum
    agent version, expiry, smoke set) and the manifest's Ed25519 signature. Needs no recipe and no torch."""
    import json
    import time

    from edge_agent.glm.models import ModelError, check_manifest, sign_folder
    from edge_agent.ota import semver

    folder = Path(args.dir)
    try:
        key = _signing_key(args.key)
    except config.ConfigError as e:
        return _fail(str(e))
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return _fail(f"{folder}/manifest.json: the model's manifest (architecture, providers, tokenizer) is needed: "
                     f"{e}")
    for p in folder.iterdir():
        if p.is_symlink() or not (p.is_file() or p.name.startswith(".")):
            return _fail(f"{p}: only regular files may be in a bundle")
    if args.version:
        manifest["version"] = args.version
    if semver(manifest.get("version", "")) == (-1,):
        return _fail(f"version {manifest.get('version')!r} is not semver (--version X.Y.Z)")
    if args.min_agent:
        manifest["min_agent_version"] = args.min_agent
    manifest.pop("rollback", None)
    manifest.pop("rollback_from", None)
    if args.rollback:  # a rollback permission: bound to the version it rolls back from, short-lived, used once
        if not args.rollback_from:
            return _fail("--rollback needs --rollback-from VERSION: the version (the gateway's floor) it rolls back "
                         "from")
        if not 0 < (args.expires_days or 1) <= 7:
            return _fail("--rollback: --expires-days must be at most 7 (a rollback permission is short-lived)")
        manifest["rollback"], manifest["rollback_from"] = True, args.rollback_from
        args.expires_days = args.expires_days or 1
    if args.expires_days:
        manifest["expires"] = int(time.time() + args.expires_days * 86400)
    for field, given in (("gateways", args.for_gateway), ("hardware", args.hardware)):
        manifest.pop(field, None)
        if given:  # a bundle for these gateways / hardware kinds only
            manifest[field] = sorted(set(given))
    try:
        body = sign_folder(folder, manifest, key)
        check_manifest(json.loads(body))
    except ModelError as e:
        return _fail(str(e))
    total = sum(f["size"] for f in manifest["files"].values())
    print(f"packed {manifest['name']} {manifest['version']}: {len(manifest['files'])} files, {total} bytes; "
          f"publish the folder's files under one URL and send model.update with it")
    return 0


def _model_install(args: argparse.Namespace) -> int:
    """model.update through the running daemon, with the download's progress and each step as it happens."""
    import time

    from edge_agent.control import NoDaemon, call

    src = args.source
    request = {"url": src} if "://" in src else {"dir": str(Path(src).resolve())}
    try:
        state = _state_dir(args)
        reply = call(state, "model.update", request, timeout=args.timeout)
    except config.ConfigError as e:
        return _fail(str(e))
    except NoDaemon as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return EXIT_NO_DAEMON
    if not reply.get("ok"):
        _print_json(reply)
        return 1
    from tqdm import tqdm

    bar, shown = None, 0
    deadline = time.monotonic() + args.timeout
    try:
        while True:
            res = call(state, "model.list", {}, timeout=10)["result"]
            u = res.get("updating")
            steps = res.get("steps") or []
            for step in steps[shown:]:
                if bar is not None:
                    bar.write(f"model update: {step}", file=sys.stderr)
                else:
                    print(f"model update: {step}", file=sys.stderr)
            shown = len(steps)
            if u is not None and u.get("total") and bar is None:
                bar = tqdm(total=u["total"], unit="B", unit_scale=True, desc="download", file=sys.stderr)
            if bar is not None and u is not None:
                bar.update(u["done"] - bar.n)
            if u is None:
                break
            if time.monotonic() > deadline:
                return _fail(f"the update did not finish within --timeout {args.timeout:g} s (it goes on; see "
                             "edge-agent model list)")
            time.sleep(0.2)
    finally:
        if bar is not None:
            bar.close()
    last = res.get("last") or {}
    _print_json(last)
    return 0 if last.get("outcome") == "active" else 1


def cmd_certs(args: argparse.Namespace) -> int:
    """Onboarding: the first key (made here, mode 0600) and its CSR, with the subject the cloud broker's ACL expects
    (CN = the gateway id). Send the CSR to your CA; install the certificate as uplink.cert_file."""
    import os

    from edge_agent.certs import make_key_and_csr

    if not config._ID_RE.match(args.gateway):
        return _fail(f"--gateway {args.gateway!r}: letters, digits, '_', '.', '-' (it becomes the certificate's CN "
                     "and an MQTT topic segment)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key_path, csr_path = out / f"{args.gateway}.key", out / f"{args.gateway}.csr"
    if key_path.exists() and not args.force:
        return _fail(f"{key_path} exists (--force replaces it)")
    key_pem, csr_pem = make_key_and_csr(args.gateway)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    os.chmod(key_path, 0o600)
    csr_path.write_bytes(csr_pem)
    print(f"{key_path} (the private key, mode 0600: it stays on this gateway)\n{csr_path} (send it to your CA; "
          f"install the certificate it signs as uplink.cert_file, this key as uplink.key_file)")
    return 0


def cmd_ops(_args: argparse.Namespace) -> int:
    from edge_agent import ops
    for op in ops.TABLE.values():
        fields = " ".join(f"{k}{'' if f.required else '?'}:{f.describe()}" for k, f in op.fields.items())
        kind = "changes" if op.changes else "read-only"
        tool = f"  [GLM tool {op.tool.name}]" if op.tool else ""
        print(f"{op.name:<15} {kind:<9} {op.doc}{tool}")
        if fields:
            print(f"{'':<26}fields: {fields}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from edge_agent.devkit.bench_model import run
    from edge_agent.glm.models import ModelError

    logs.setup("warning", "text")
    try:
        _cfg, mcfg = _model_config(args)
        if args.agent:
            from edge_agent import ops
            from edge_agent.devkit.bench_agent import run_agent
            from edge_agent.glm.engine import Engine
            engine = Engine(mcfg, ops.TOOLSET)
            engine.load()
            try:
                res = run_agent(engine, reps=min(args.reps, 3))
            finally:
                engine.close()
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(res, f, indent=2, default=str)
            return 0
        if args.scale:
            mcfg = _scale_model(args.scale, mcfg)
        evals = args.eval if not args.scale else None
        if evals is not None and not evals:
            from edge_agent.devkit.bench_model import shipped_eval_sets
            evals = shipped_eval_sets()
        res = run(mcfg, evals, n_ask=args.n, reps=args.reps, scale=bool(args.scale))
    except (config.ConfigError, ModelError, RuntimeError) as e:
        return _fail(str(e))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
    return 0


def _scale_model(layout: str, mcfg):
    """The benchmark model of real shape for `bench model --scale`: built once by the recipe
    (models/recipe/scale_model.py: random weights, exported and quantized as a user's checkpoint), kept under the
    user's cache folder; its own key signs it."""
    import dataclasses
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "models" / "recipe" / "scale_model.py"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-agent" / "bench-models"
    out = cache / layout
    if not (out / "manifest.json").exists():
        if not recipe.exists():
            raise RuntimeError("--scale builds its model with the recipe of a source checkout (models/recipe)")
        print(f"building the {layout} benchmark model into {out} (once; minutes) ...", flush=True)
        r = subprocess.run([sys.executable, str(recipe), "--layout", layout, "--out", str(out)])
        if r.returncode != 0:
            raise RuntimeError(f"building the {layout} benchmark model failed (exit {r.returncode}); it needs "
                               "the recipe's extra: pip install -e '.[recipe]'")
    key = json.loads((out / "manifest.json").read_text())["public_key"]
    return dataclasses.replace(mcfg, dir=str(out), public_key=key)


def cmd_decode(args: argparse.Namespace) -> int:
    """A captured telemetry payload (either encoding) as the JSON message: what the cloud side runs."""
    from edge_agent.store.encoding import DecodeError, decode
    try:
        raw = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
        doc = decode(raw)
    except (OSError, DecodeError) as e:
        return _fail(f"cannot decode {args.file}: {e}")
    if args.readings:
        for r in doc["readings"]:
            print(json.dumps(r, ensure_ascii=False, separators=(",", ":")))
    else:
        print(json.dumps(doc, ensure_ascii=False, separators=(",", ":")))
    return 0


def cmd_version(_args: argparse.Namespace) -> int:
    print(f"edge-agent {__version__}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="Open-AutoGLM Edge Agent")
    import functools
    # every option's help ends with its default
    sub = p.add_subparsers(dest="command", required=True, parser_class=functools.partial(
        argparse.ArgumentParser, formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    r = sub.add_parser("run", help="run the daemon")
    r.add_argument("--config", default=DEFAULT_CONFIG, help="the config file")
    r.set_defaults(fn=cmd_run)
    c = sub.add_parser("check", help="validate the config and print the effective one")
    c.add_argument("--config", default=DEFAULT_CONFIG, help="the config file to check")
    c.add_argument("--connect", action="store_true", help="also connect: to the cloud broker with the configured "
                   "certificates (TLS version, the broker's certificate, a round trip) and to the local broker")
    c.set_defaults(fn=cmd_check)
    d = sub.add_parser("demo", help="run the agent on loopback with a local and a mutual-TLS cloud broker")
    d.add_argument("--duration", type=float, default=0, help="seconds to run (0 = until Ctrl-C)")
    d.add_argument("--devices", type=int, default=5, help="simulated MQTT devices")
    d.add_argument("--rate", type=float, default=10.0, help="messages per second per device")
    d.add_argument("--verbose", action="store_true", help="show the agent's log lines")
    d.set_defaults(fn=cmd_demo)
    def model_args(x: argparse.ArgumentParser) -> None:
        x.add_argument("--config", default=DEFAULT_CONFIG, help="its [model] section (defaults when absent)")
        x.add_argument("--model-dir", default="", help="a model folder instead of model.dir")
        x.add_argument("--providers", default="", help="e.g. cpu or cuda,cpu (default: model.providers)")
        x.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (default: model.threads)")

    a = sub.add_parser("ask", help="ask the running agent a question (its GLM plans a call, the agent runs it)")
    a.add_argument("text")
    a.add_argument("--dry-run", action="store_true", help="plan with the model here and print the tool call only; "
                   "needs no running agent, executes nothing")
    a.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the agent's reply")
    model_args(a)
    a.set_defaults(fn=cmd_ask)
    c = sub.add_parser("chat", help="a conversation with the running agent: a line in, its reply out (follow-ups, "
                       "yes/no to its proposals)")
    c.add_argument("--dry-run", action="store_true", help="plan here, one request per stdin line, and print each "
                   "resolved call or plan as one JSON line; needs no running agent, executes nothing")
    c.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each reply")
    model_args(c)
    c.set_defaults(fn=cmd_chat)
    o = sub.add_parser("op", help="run one operation on the running agent (edge-agent ops lists them)")
    o.add_argument("name", help="e.g. status, alerts.list, query")
    o.add_argument("fields", nargs="*", metavar="NAME=VALUE", help="the request's fields; values are JSON where "
                   "they parse (42, true, null), else text")
    o.add_argument("--config", default=DEFAULT_CONFIG, help="where the agent's state directory is said")
    o.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the agent's reply")
    o.set_defaults(fn=cmd_op)
    sg = sub.add_parser("sign", help="print an operator-signed request (for gateways with commands.operator_keys)")
    sg.add_argument("name", help="the operation, e.g. write")
    sg.add_argument("fields", nargs="*", metavar="NAME=VALUE")
    sg.add_argument("--key", required=True, help="the operator's Ed25519 private key (PEM)")
    sg.add_argument("--key-id", required=True, help="its id in the gateway's commands.operator_keys")
    sg.add_argument("--gateway", required=True, help="the id of the gateway the request is for (gateway.id): the "
                    "signature binds it, so no other gateway runs it")
    sg.add_argument("--id", default="", help="the request id (default: a random one)")
    sg.set_defaults(fn=cmd_sign)
    mo = sub.add_parser("model", help="model versions: install (URL or folder, through the running agent), list, "
                        "rollback; cancel (the update in progress); pack (sign a folder for publishing); keys (sign a "
                        "key rotation)")
    mo.add_argument("action", choices=["install", "list", "rollback", "cancel", "pack", "keys"])
    mo.add_argument("source", nargs="?", default="", help="install: a bundle URL (https://...) or a model folder; "
                    "pack: the folder to sign; keys: the new public keys, comma-separated")
    mo.add_argument("--key", default="", help="pack: the Ed25519 private key (PEM) that signs the manifest; keys: a "
                    "key of the current set, that signs the new one")
    mo.add_argument("--version", default="", help="pack: set the version (semver)")
    mo.add_argument("--min-agent", default="", help="pack: the oldest agent version that may run it")
    mo.add_argument("--expires-days", type=float, default=0, help="pack: the manifest expires after this many days "
                    "(0: never)")
    mo.add_argument("--rollback", action="store_true", help="pack: a rollback permission: allow installing below "
                    "the highest version, once, on gateways whose floor is --rollback-from, for --expires-days (1 by "
                    "default, 7 at most)")
    mo.add_argument("--rollback-from", default="", help="pack --rollback: the version it rolls back from")
    mo.add_argument("--for-gateway", action="append", default=[], metavar="ID", help="pack: the bundle installs only "
                    "on this gateway (repeat for several)")
    mo.add_argument("--hardware", action="append", default=[], metavar="KIND", help="pack: the bundle installs only "
                    "on this hardware kind, gateway.hardware (repeat for several)")
    mo.add_argument("--serial", type=int, default=0, help="keys: the rotation's serial (above the last one's)")
    mo.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the agent")
    mo.add_argument("--config", default=DEFAULT_CONFIG, help="where the running agent's state directory is")
    mo.set_defaults(fn=cmd_model)
    ce = sub.add_parser("certs", help="certs request: the first key and CSR of a gateway (onboarding)")
    ce.add_argument("action", choices=["request"])
    ce.add_argument("--gateway", required=True, help="the gateway id (the certificate's CN)")
    ce.add_argument("--out", default=".", help="where the key and CSR are written")
    ce.add_argument("--force", action="store_true", help="replace an existing key")
    ce.set_defaults(fn=cmd_certs)
    ls = sub.add_parser("ops", help="list the operations: what each takes, whether it changes anything")
    ls.set_defaults(fn=cmd_ops)
    b = sub.add_parser("bench", help="benchmarks: 'bench model' times the GLM against its peers")
    b.add_argument("what", choices=["model"])
    b.add_argument("--eval", nargs="*", default=None, metavar="JSONL",
                   help="evaluation sets of {text, call} (none named: the shipped held-out and hand-written sets): "
                        "exact match, writes where none was asked, wrong writes, INT8/fp32 agreement")
    b.add_argument("--n", type=int, default=100, help="questions timed for ask latency")
    b.add_argument("--reps", type=int, default=5, help="repetitions of each timed run")
    b.add_argument("--scale", choices=("tiny", "0.5b", "1.5b"), default=None,
                   help="a benchmark model of real shape (random weights at a GLM-Edge layout, built once by the "
                        "recipe, then cached): speed per pass against genai, the roofline, peak memory")
    b.add_argument("--agent", action="store_true", help="the agent's speed instead: plan + static dry-run and end to "
                   "end with the reads from a real store over the plan set P, a requester's memory over F")
    b.add_argument("--json", default="", help="also write the figures to this file")
    model_args(b)
    b.set_defaults(fn=cmd_bench)
    de = sub.add_parser("decode", help="print a captured telemetry payload (json or columns, zstd or gzip) as the "
                        "JSON message")
    de.add_argument("file", help="the payload's bytes as received (- = stdin)")
    de.add_argument("--readings", action="store_true", help="one JSON line a reading instead of the whole message")
    de.set_defaults(fn=cmd_decode)
    v = sub.add_parser("version", help="print the version")
    v.set_defaults(fn=cmd_version)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.captureWarnings(True)
    return args.fn(args)
