"""The `edge-agent` command."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from edge_agent import __version__, config, logs
from edge_agent.tls import TlsConfigError

DEFAULT_CONFIG = "/etc/edge-agent/config.toml"
EXIT_CONFIG = 2


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
    from edge_agent import tls
    try:
        cfg = config.load(args.config)
        if cfg.uplink.enabled:
            tls.client_context(cfg.uplink.ca_file, cfg.uplink.cert_file, cfg.uplink.key_file, prefix="uplink.")
        mq = cfg.southbound.mqtt
        if mq.enabled and mq.tls:
            f = mq.tls_files
            tls.client_context(f.ca_file, f.cert_file, f.key_file, prefix="southbound.mqtt.tls_files.")
    except (config.ConfigError, TlsConfigError) as e:
        return _fail(str(e))
    print(f"# effective configuration of {args.config} (secrets redacted)")
    print(config.to_toml(config.to_dict(cfg)).lstrip())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edge_agent.demo import run_demo
    logs.setup("warning" if not args.verbose else "info", "text")
    return run_demo(duration=args.duration, devices=args.devices, rate=args.rate)


def cmd_version(_args: argparse.Namespace) -> int:
    print(f"edge-agent {__version__}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="Open-AutoGLM Edge Agent")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the daemon")
    r.add_argument("--config", default=DEFAULT_CONFIG)
    r.set_defaults(fn=cmd_run)
    c = sub.add_parser("check", help="validate the config and print the effective one")
    c.add_argument("--config", default=DEFAULT_CONFIG)
    c.set_defaults(fn=cmd_check)
    d = sub.add_parser("demo", help="run the agent on loopback with a local and a mutual-TLS cloud broker")
    d.add_argument("--duration", type=float, default=0, help="seconds to run (0 = until Ctrl-C)")
    d.add_argument("--devices", type=int, default=5)
    d.add_argument("--rate", type=float, default=10.0, help="messages per second per device")
    d.add_argument("--verbose", action="store_true", help="show the agent's log lines")
    d.set_defaults(fn=cmd_demo)
    v = sub.add_parser("version", help="print the version")
    v.set_defaults(fn=cmd_version)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.captureWarnings(True)
    return args.fn(args)
