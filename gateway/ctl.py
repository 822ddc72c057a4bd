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
  - C{gatewayctl queue flush [ID]}, C{hold ID}, C{release ID}, C{delete ID}:
    safe while the gateway runs (atomic renames; a message being delivered
    is refused with "try again").
  - C{gatewayctl user add|passwd|del|list}: the SMTP AUTH users file.
  - C{gatewayctl mta-sts check DOMAIN}: TXT record, fetched policy, MX hosts,
    which the policy allows and whether each presents a valid certificate;
    C{gatewayctl mta-sts cache}: the cached policies.
  - C{gatewayctl dkim keygen DOMAIN SELECTOR [--algorithm rsa|ed25519]
    [--bits N] [-c FILE]}: make a signing key (mode 0600) and print its
    TXT record.
  - C{gatewayctl dkim show [DOMAIN] [-c FILE]}: the keys in use and their records.
  - C{gatewayctl status [--json]}, C{gatewayctl reload}: the running
    gateway, through its control socket (C{<queue path>/control.sock}).
  - C{gatewayctl log ID}: every line of C{[log] file} that names ID.

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
    if data["relay"].get("smarthost_password"):
        data["relay"]["smarthost_password"] = "********"
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


def _row(queue_id: str, state: str, envelope: Any, now: float) -> dict[str, Any]:
    """One queue entry in the documented C{--json} shape."""
    pending = [r for r in envelope.recipients if r.status in ("pending", "deferred")]
    errors = [r.last_reply for r in (pending or envelope.recipients) if r.last_reply]
    return {
        "id": queue_id, "state": state, "sender": envelope.sender,
        "recipients": [r.address for r in pending] or [r.address for r in envelope.recipients],
        "size": envelope.size, "age": round(now - envelope.received_at, 1),
        "next_attempt": envelope.next_attempt if state == "deferred" else None,
        "last_error": errors[-1] if errors else None, "attempts": envelope.attempts,
    }


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def cmd_queue_list(args: argparse.Namespace) -> int:
    from gateway.queue import STATES

    spool = _spool(args.config)
    states = [args.state] if args.state else list(STATES)
    now = time.time()
    rows = []
    for state in states:
        for queue_id in spool.list(state):
            try:
                _, envelope = spool.load(queue_id)
            except Exception as exc:
                rows.append({"id": queue_id, "state": state, "sender": None, "recipients": [],
                             "size": None, "age": None, "next_attempt": None,
                             "last_error": f"unreadable envelope: {exc}", "attempts": None})
                continue
            rows.append(_row(queue_id, state, envelope, now))
    lines = []
    for r in rows:
        nxt = ""
        if r["next_attempt"]:
            nxt = " next " + time.strftime("%H:%M:%S", time.localtime(r["next_attempt"]))
        lines.append(f"{r['id']}  {r['state']:9} {r['size'] or 0:>9}  {_age(r['age'] or 0):>4}  "
                     f"<{r['sender'] or ''}> -> {', '.join(r['recipients'])}{nxt}")
        if r["last_error"]:
            lines.append(f"    ({r['last_error']})")
    _print(rows, args.json, "\n".join(lines) or "queue is empty")
    return 0


def cmd_queue_show(args: argparse.Namespace) -> int:
    import dataclasses

    spool = _spool(args.config)
    try:
        state, envelope = spool.load(args.queue_id)
    except KeyError:
        print(f"gatewayctl: no message {args.queue_id} in the queue", file=sys.stderr)
        return 1
    data = _row(args.queue_id, state, envelope, time.time())
    data["envelope"] = dataclasses.asdict(envelope)
    data["data_path"] = spool.data_path(args.queue_id)
    if args.json:
        _print(data, True, "")
    else:
        for key, value in data.items():
            if key != "envelope":
                print(f"{key}: {value}")
        for recipient in envelope.recipients:
            print(f"recipient: {recipient.address} status={recipient.status} attempts={recipient.attempts}"
                  + (f" last_reply={recipient.last_reply!r}" if recipient.last_reply else ""))
        for header in envelope.prepend_headers:
            print("prepend: " + header.replace("\r\n", "\n          "))
    return 0


def _state_of(spool: Any, queue_id: str) -> str | None:
    try:
        return spool.load(queue_id)[0]
    except KeyError:
        return None


def _change(args: argparse.Namespace, verb: str) -> int:
    """flush / hold / release / delete one message (or, for flush, all
    deferred ones).  Every change is one atomic rename out of a state the
    scheduler may be leasing from; if the scheduler won the race, the
    message is being delivered and the admin is told to try again."""
    spool = _spool(args.config)
    ids = [args.queue_id] if getattr(args, "queue_id", None) else spool.list("deferred")
    moves = {"flush": (("deferred",), "incoming"), "hold": (("incoming", "deferred"), "hold"),
             "release": (("hold",), "incoming"), "delete": (("incoming", "deferred", "hold", "corrupt"), "hold")}
    sources, target = moves[verb]
    done, failed = [], []
    for queue_id in ids:
        state = _state_of(spool, queue_id)
        if state is None:
            failed.append((queue_id, "no such message"))
            continue
        if state == "active":
            failed.append((queue_id, "being delivered right now; try again in a moment"))
            continue
        if state not in sources:
            failed.append((queue_id, f"is in {state}/, not in {' or '.join(sources)}/"))
            continue
        try:
            if state != target:
                spool.move(queue_id, state, target, sync=True)
            if verb == "delete":
                spool.remove(queue_id)
        except KeyError:
            failed.append((queue_id, "being delivered right now; try again in a moment"))
            continue
        done.append(queue_id)
    result = {"verb": verb, "done": done, "failed": [{"id": i, "reason": r} for i, r in failed]}
    text = "\n".join([f"{verb}: {i}" for i in done] + [f"gatewayctl: {i}: {r}" for i, r in failed])
    _print(result, args.json, text or f"{verb}: nothing to do")
    return 1 if failed else 0


def _users(args: argparse.Namespace):
    from gateway.credentials import UsersFile

    config = _load(args.config)
    if not config.auth.users_file:
        raise ConfigError(config.path, "[auth] users_file", "not set: there is no users file to manage")
    return UsersFile(config.auth.users_file)


def _read_password(args: argparse.Namespace) -> str:
    """The new password: --password-stdin reads one line; else ask twice."""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        import getpass
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise SystemExit("gatewayctl: passwords differ")
    if not password:
        raise SystemExit("gatewayctl: empty password")
    return password


def cmd_user(args: argparse.Namespace) -> int:
    """user add|passwd|del|list: edits the users file atomically; the
    running gateway notices the change on the next AUTH (no restart)."""
    users = _users(args)
    try:
        if args.verb == "list":
            names = sorted(users.users())
            _print(names, args.json, "\n".join(names) or "no users")
            return 0
        if args.verb == "add":
            users.set(args.name, _read_password(args), must_exist=False)
        elif args.verb == "passwd":
            users.set(args.name, _read_password(args), must_exist=True)
        elif args.verb == "del":
            users.delete(args.name)
    except KeyError:
        print(f"gatewayctl: no user {args.name}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"gatewayctl: {exc}", file=sys.stderr)
        return 1
    _print({"user": args.name, "done": args.verb}, args.json, f"{args.verb}: {args.name}")
    return 0


def cmd_mta_sts_check(args: argparse.Namespace) -> int:
    """The TXT record, the fetched policy, the MX hosts, which of them the
    policy allows, and whether each presents a valid certificate."""
    from twisted.internet import defer, task

    from gateway.delivery import Connection, DeliveryError, Timeouts
    from gateway.dns import make_resolver
    from gateway.mtasts import Policy, check_domain
    from gateway.routing import Router, RoutingError
    from gateway.stsservice import make_fetcher
    from gateway.tls import client_context_factory, trust_root

    config = _load(args.config)
    result: dict[str, Any] = {}

    async def run(reactor: Any) -> None:
        resolver = make_resolver(config.dns, reactor)
        result.update(await check_domain(args.domain, resolver, make_fetcher(config, reactor, resolver)))
        policy = Policy.from_dict(result["policy"]) if result["policy"] else None
        router = Router(config, resolver)
        destination = router.destination(result["domain"] or args.domain)
        hosts_out = []
        try:
            hosts = await router.hosts(destination)
        except RoutingError as exc:
            result["mx_error"] = str(exc)
            hosts = []
        trust = trust_root(config.relay.ca_file)
        for host in hosts:
            row = {"host": host.name, "address": host.address, "port": host.port,
                   "in_policy": policy.matches(host.name) if policy else None}
            try:
                connection = await Connection.open(
                    reactor, reactor, host.name, host.address, host.port,
                    helo=config.relay.helo_name or config.server.hostname, tls="verify",
                    tls_context=lambda level, name=host.name: client_context_factory(level, name, trust),
                    timeouts=Timeouts(connect=10, greeting=30, command=30, data_end=30))
            except DeliveryError as exc:
                row.update(certificate="invalid", tls_failure=exc.tls_failure, error=str(exc.reply))
            else:
                row.update(certificate="valid", tls=connection.tls_version)
                await connection.close()
            hosts_out.append(row)
        result["mx"] = hosts_out
        _print(result, args.json, _sts_text(result))

    # task.react runs the reactor and exits the process with status 0.
    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    return 0


def _sts_text(result: dict[str, Any]) -> str:
    lines = [f"domain:  {result['domain']}",
             f"TXT:     {result['txt_name']}: {result['txt_records'] or '-'}"
             + (f" ({result['txt_error']})" if result["txt_error"] else f" id={result['policy_id']}"),
             f"policy:  {result['policy_url']}"]
    if result["policy"]:
        policy = result["policy"]
        lines.append(f"         mode={policy['mode']} max_age={policy['max_age']} mx={', '.join(policy['mx'])}")
    else:
        lines.append(f"         not usable: {result['error']} ({result['result_type']})")
    if result.get("mx_error"):
        lines.append(f"MX:      {result['mx_error']}")
    for row in result.get("mx", []):
        allowed = {True: "in policy", False: "NOT in policy", None: "no policy"}[row["in_policy"]]
        cert = row["certificate"] + (f" ({row.get('tls_failure')}: {row.get('error')})" if row["certificate"] != "valid" else "")
        lines.append(f"MX:      {row['host']} [{row['address']}]:{row['port']}  {allowed}, certificate {cert}")
    return "\n".join(lines)


def cmd_mta_sts_cache(args: argparse.Namespace) -> int:
    """The cached MTA-STS policies (what the gateway enforces now)."""
    import os

    from gateway.mtasts import FilePolicyCache

    config = _load(args.config)
    cache = FilePolicyCache(os.path.join(config.mta_sts.cache, "policies"))
    rows = []
    now = time.time()
    for entry in sorted(cache.all(), key=lambda e: e.domain):
        rows.append({"domain": entry.domain, "id": entry.policy_id, "mode": entry.policy.mode.value,
                     "mx": list(entry.policy.mx), "max_age": entry.policy.max_age,
                     "fetched_at": entry.fetched_at, "expires_at": entry.expires_at,
                     "expired": entry.expires_at <= now})
    text = "\n".join(f"{r['domain']:30} {r['mode']:8} id={r['id']} mx={','.join(r['mx'])} "
                     f"expires {time.strftime('%Y-%m-%d %H:%M', time.localtime(r['expires_at']))}"
                     for r in rows) or "no cached policies"
    _print(rows, args.json, text)
    return 0


def _control(args: argparse.Namespace, command: str) -> dict[str, Any] | None:
    """Ask the running gateway (control socket beside its queue)."""
    from gateway import control

    config = _load(args.config)
    try:
        return control.request(control.socket_path(config.queue.path), command)
    except ConnectionError as exc:
        print(f"gatewayctl: {exc}", file=sys.stderr)
        return None


def cmd_status(args: argparse.Namespace) -> int:
    """Whether the gateway runs, its version, uptime, listeners, queue and
    last delivery errors.  Exit status 3 when it is not running (LSB)."""
    status = _control(args, "status")
    if status is None:
        if args.json:
            print(json.dumps({"running": False}))
        return 3
    lines = [f"mailgateway {status['version']} running, pid {status['pid']}, up {_age(status['uptime'])}, "
             f"config {status['config']} (reloaded {status['reloads']} times)"]
    for listener in status["listeners"]:
        lines.append(f"  listener {listener['name']:12} {listener['address']}:{listener['port']} "
                     f"tls={listener['tls']} auth={'yes' if listener['auth'] else 'no'} "
                     f"open={listener['open_connections']} plugins={','.join(listener['plugins'])}")
    lines.append("  queue: " + ", ".join(f"{k}={v}" for k, v in sorted(status["queue"].items())))
    for error in status["last_delivery_errors"][-5:]:
        lines.append(f"  error {time.strftime('%H:%M:%S', time.localtime(error['time']))} {error['queue_id']} "
                     f"<{error['rcpt']}> {error['relay']}: {error['reply']}")
    _print(status, args.json, "\n".join(lines))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running gateway to reread its config (like SIGHUP); a config
    that does not validate is refused and printed, exit status 1."""
    result = _control(args, "reload")
    if result is None:
        return 3
    if result.get("ok"):
        _print(result, args.json, "reloaded")
        return 0
    if args.json:
        _print(result, True, "")
    else:
        print(f"gatewayctl: reload refused: {result.get('error')}", file=sys.stderr)
    return 1


def cmd_log(args: argparse.Namespace) -> int:
    """One message's story from [log] file: every line that names its queue
    id (the same as: grep QUEUEID LOGFILE)."""
    config = _load(args.config)
    if not config.log.file:
        print("gatewayctl: [log] file is not set; with twistd's own log use: grep QUEUEID twistd.log",
              file=sys.stderr)
        return 1
    found = []
    try:
        with open(config.log.file, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if args.queue_id in line:
                    found.append(line.rstrip("\n"))
    except FileNotFoundError:
        print(f"gatewayctl: no log file {config.log.file}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([json.loads(l) if l.startswith("{") else l for l in found], indent=2))
    else:
        print("\n".join(found) if found else f"nothing logged for {args.queue_id}")
    return 0 if found else 1


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
    p = queue.add_parser("flush", help="try deferred messages now (one, or all)")
    p.add_argument("queue_id", nargs="?")
    p.set_defaults(func=lambda a: _change(a, "flush"))
    for verb, text in (("hold", "put a message on hold (no delivery)"),
                       ("release", "release a held message"),
                       ("delete", "delete a message (not while it is being delivered)")):
        p = queue.add_parser(verb, help=text)
        p.add_argument("queue_id")
        p.set_defaults(func=lambda a, verb=verb: _change(a, verb))
    for p in queue.choices.values():
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
        p.add_argument("--json", action="store_true", help="print JSON")

    user = sub.add_parser("user", help="manage the SMTP AUTH users file").add_subparsers(dest="verb", required=True)
    for verb, text in (("add", "add a user"), ("passwd", "change a user's password"),
                       ("del", "delete a user"), ("list", "list users")):
        p = user.add_parser(verb, help=text)
        if verb != "list":
            p.add_argument("name")
        if verb in ("add", "passwd"):
            p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=cmd_user)

    sts = sub.add_parser("mta-sts", help="MTA-STS policies").add_subparsers(dest="verb", required=True)
    p = sts.add_parser("check", help="TXT, policy, MX hosts and their certificates for a domain")
    p.add_argument("domain")
    p.set_defaults(func=cmd_mta_sts_check)
    p = sts.add_parser("cache", help="list the cached policies")
    p.set_defaults(func=cmd_mta_sts_cache)
    for p in sts.choices.values():
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
        p.add_argument("--json", action="store_true", help="print JSON")

    from gateway.dkimkeys import add_dkim_commands
    add_dkim_commands(sub)

    for name, func, text in (("status", cmd_status, "is the gateway running; listeners, queue, last errors"),
                             ("reload", cmd_reload, "reread the config of the running gateway")):
        p = sub.add_parser(name, help=text)
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=func)
    p = sub.add_parser("log", help="one message's story from [log] file")
    p.add_argument("queue_id")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_log)
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
