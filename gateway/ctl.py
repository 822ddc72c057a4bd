"""gatewayctl: the operator's command line.

Subcommands read the same config file as the service, so what they show is
what the gateway uses.  Every subcommand takes C{--json} where its output
is meant for scripts.

  - C{gatewayctl check-config FILE}: validate and print the effective config.
  - C{gatewayctl plugins list [-c FILE]}: the plugins that can be named.
  - C{gatewayctl plugins order [-c FILE] [--listener NAME]}: each
    listener's effective plugin list per stage.
  - C{gatewayctl queue list [-c FILE] [--state S]}: queued messages.
  - C{gatewayctl queue show ID [-c FILE]}: one message's envelope.

See also: postconf(1), postqueue(1), haraka -o.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from gateway.config import ConfigError, GatewayConfig, load_config

DEFAULT_CONFIG = "etc/gateway.toml"


def _load(path: str) -> GatewayConfig:
    return load_config(path)


def _print(data: Any, as_json: bool, text: str) -> None:
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(text)


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.registry import PluginRegistry

    config = _load(args.file)
    PluginRegistry(config)
    data = config.to_dict()
    data.pop("plugin_tables", None)
    data["plugins"] = {k: dict(v) for k, v in config.plugin_tables.items()}
    if args.json:
        _print(data, True, "")
    else:
        print(f"{args.file}: OK")
        for section, values in data.items():
            if isinstance(values, dict):
                for key, value in values.items():
                    print(f"{section}.{key} = {json.dumps(value)}")
            else:
                print(f"{section} = {json.dumps(values)}")
    return 0


def _registry(path: str):
    from gateway.registry import PluginRegistry
    return PluginRegistry(_load(path))


def cmd_plugins_list(args: argparse.Namespace) -> int:
    registry = _registry(args.config)
    rows = {name: registry.describe(name) for name in sorted(registry.factories)}
    _print(rows, args.json, "\n".join(f"{name:16} {text}" for name, text in rows.items()))
    return 0


def cmd_plugins_order(args: argparse.Namespace) -> int:
    from twisted.internet.task import Clock

    from gateway.interfaces import STAGE_INTERFACES

    registry = _registry(args.config)
    out: dict[str, dict[str, list[str]]] = {}
    built: dict[str, Any] = {}
    for listener in registry.config.listeners:
        if args.listener and listener.name != args.listener:
            continue
        pipeline = registry.build_pipeline(listener, Clock(), None, lambda f, *a: f(*a), built)
        out[listener.name] = {stage: list(pipeline.plugins_for(stage)) for stage in STAGE_INTERFACES}
    if args.listener and not out:
        print(f"gatewayctl: no listener named {args.listener!r}", file=sys.stderr)
        return 1
    lines = []
    for name, stages in out.items():
        lines.append(f"listener {name}:")
        for stage, plugins in stages.items():
            if plugins:
                lines.append(f"  {stage:8} {' -> '.join(plugins)}")
    _print(out, args.json, "\n".join(lines))
    return 0


def _spool(path: str):
    from gateway.queue import Spool
    config = _load(path)
    return Spool(config.queue.path, run_in_thread=lambda f, *a: f(*a), clock=None)


def cmd_queue_list(args: argparse.Namespace) -> int:
    from gateway.queue import STATES

    spool = _spool(args.config)
    states = [args.state] if args.state else list(STATES)
    rows = []
    for state in states:
        for queue_id in spool.list(state):
            try:
                _, envelope = spool.load(queue_id)
            except Exception as exc:
                rows.append({"queue_id": queue_id, "state": state, "error": str(exc)})
                continue
            rows.append({
                "queue_id": queue_id, "state": state, "size": envelope.size,
                "received_at": envelope.received_at, "sender": envelope.sender,
                "recipients": [r.address for r in envelope.recipients],
                "attempts": envelope.attempts,
            })
    text = "\n".join(
        f"{r['queue_id']}  {r['state']:9} {r.get('size', 0):>9}  "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.get('received_at', 0)))}  "
        f"<{r.get('sender', '')}> -> {', '.join(r.get('recipients', []))}"
        for r in rows) or "queue is empty"
    _print(rows, args.json, text)
    return 0


def cmd_queue_show(args: argparse.Namespace) -> int:
    import dataclasses

    spool = _spool(args.config)
    try:
        state, envelope = spool.load(args.queue_id)
    except KeyError:
        print(f"gatewayctl: no message {args.queue_id} in the queue", file=sys.stderr)
        return 1
    data = dataclasses.asdict(envelope)
    data["state"] = state
    data["data_path"] = spool.data_path(args.queue_id)
    _print(data, args.json, "\n".join(f"{k}: {v}" for k, v in data.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatewayctl", description="Operate a mailgateway.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate a config file and print the effective config")
    p.add_argument("file", nargs="?", default=DEFAULT_CONFIG)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_check_config)

    plugins = sub.add_parser("plugins", help="plugin discovery and order").add_subparsers(dest="verb", required=True)
    p = plugins.add_parser("list", help="plugins that can be named in the config")
    p.set_defaults(func=cmd_plugins_list)
    p = plugins.add_parser("order", help="each listener's plugins per stage, in order")
    p.add_argument("--listener", help="only this listener")
    p.set_defaults(func=cmd_plugins_order)
    for p in plugins.choices.values():
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
        p.add_argument("--json", action="store_true", help="print JSON")

    queue = sub.add_parser("queue", help="inspect the queue").add_subparsers(dest="verb", required=True)
    p = queue.add_parser("list", help="list queued messages")
    p.add_argument("--state", choices=["incoming", "active", "deferred", "hold", "corrupt"])
    p.set_defaults(func=cmd_queue_list)
    p = queue.add_parser("show", help="show one message's envelope")
    p.add_argument("queue_id")
    p.set_defaults(func=cmd_queue_show)
    for p in queue.choices.values():
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
        p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the C{gatewayctl} console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"gatewayctl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
