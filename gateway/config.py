"""The gateway's TOML configuration, validated once into frozen dataclasses.

Everything an admin can set is read here and nowhere else.  Unknown keys,
wrong types and bad values stop start-up with one line that names the file
and the key, so a typo never silently turns a check off.  Relative paths
are resolved against the working directory at load time, so the effective
config (C{gatewayctl check-config}) always shows absolute paths.

Plugin tables (C{[plugins.NAME]}) are kept as data here and validated
against each plugin's own options type by L{gateway.registry}.

Standards: TOML 1.0 (read with the stdlib C{tomllib}).
See also: etc/gateway.toml (every key, commented); README "Configuration".
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any, Mapping

from gateway.address import canonical_domain

TLS_MODES = ("none", "starttls", "starttls-required", "implicit")
CLIENT_TLS_LEVELS = ("none", "may", "encrypt", "verify")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A configuration problem; C{str()} is the one line to show the admin."""

    def __init__(self, path: str, key: str, message: str) -> None:
        self.path = path
        self.key = key
        self.message = message
        super().__init__(f"{path}: {key}: {message}")


@dataclass(frozen=True, slots=True)
class NextHop:
    """Where to send mail for a domain (a C{[routes]} value or the smarthost).

    @ivar host: a host name or IP address.
    @ivar port: the TCP port.
    @ivar mx: look up MX records for C{host} (False for C{[host]} and IPs).
    """

    host: str
    port: int
    mx: bool

    def __str__(self) -> str:
        host = f"[{self.host}]" if not self.mx else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """C{[server]}: identity, domains and message limits."""

    hostname: str
    local_domains: frozenset[str] = frozenset()
    relay_domains: frozenset[str] = frozenset()
    trusted_networks: tuple[IPNetwork, ...] = ()
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 1000
    max_received_headers: int = 30
    plugin_dirs: tuple[str, ...] = ()
    soft_bounce: bool = False


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One C{[[listener]]} table."""

    name: str
    address: str
    port: int
    tls: str = "none"
    auth: bool = False
    submission: bool = False
    require_auth: bool = False
    plugins: tuple[str, ...] = ("relay_guard",)


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """C{[tls]}: the server certificate (PEM, chain allowed) and key, and
    more pairs chosen by the name the client asks for (SNI).

    @ivar sni: server name (lower case) -> (cert, key).
    """

    cert: str
    key: str
    sni: Mapping[str, tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """C{[queue]}: where the spool lives and how long mail may wait in it."""

    path: str
    max_age: float = 5 * 86400.0
    retry_initial: float = 300.0
    retry_max: float = 3600.0
    scan_interval: float = 1.0
    double_bounce_to: str = ""


@dataclass(frozen=True, slots=True)
class DNSConfig:
    """C{[dns]}: resolvers as (host, port); empty means the system's."""

    servers: tuple[tuple[str, int], ...] = ()
    timeout: float = 10.0
    reverse_lookup: bool = True


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """C{[relay]}: the outbound side (delivery client and scheduler)."""

    port: int = 25
    ca_file: str | None = None
    smarthost: NextHop | None = None
    smarthost_username: str | None = None
    smarthost_password: str | None = None
    smarthost_tls: str = "encrypt"
    tls: str = "may"
    helo_name: str | None = None
    enabled: bool = True
    max_concurrent: int = 20
    max_per_destination: int = 4
    max_messages_per_connection: int = 100
    connection_idle: float = 2.0
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    shutdown_grace: float = 10.0


@dataclass(frozen=True, slots=True)
class MTASTSConfig:
    """C{[mta_sts]}: MTA-STS (RFC 8461) on outbound MX delivery and TLS
    reporting (RFC 8460)."""

    enabled: bool = True
    cache: str = ""
    ca_file: str | None = None
    port: int = 443
    fetch_timeout: float = 30.0
    report: bool = True
    report_organization: str = ""
    report_contact: str = ""
    report_interval: float = 86400.0


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """C{[store]}: the shared-state back end used by rate limits,
    greylisting and DNSBL caching: C{memory} (default), C{file} (survives a
    restart) or C{redis} (shared by several gateways)."""

    backend: str = "memory"
    path: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    timeout: float = 2.0
    prefix: str = "mailgateway:"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """C{[metrics]}: the Prometheus endpoint; off when C{listen} is empty."""

    listen: str = ""
    path: str = "/metrics"


@dataclass(frozen=True, slots=True)
class LogConfig:
    """C{[log]}: format (C{text} or C{json}), level and an optional file."""

    format: str = "text"
    level: str = "info"
    file: str = ""


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """C{[auth]}: where SMTP AUTH checks passwords, who may send as whom,
    and how password guessing is throttled."""

    users_file: str | None = None
    checker: str | None = None
    senders: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    max_failures: int = 10
    delay_after: int = 3
    failure_delay: float = 1.0
    failure_window: float = 600.0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """C{[limits]}: timeouts (seconds) and protocol limits."""

    max_command_line: int = 512
    max_text_line: int = 1000
    max_header_size: int = 256 * 1024
    max_bad_commands: int = 20
    command_timeout: float = 300.0
    data_timeout: float = 180.0
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    plugin_timeout: float = 30.0
    input_buffer: int = 256 * 1024


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The whole validated configuration.

    @ivar path: the file it was read from (for error messages).
    @ivar plugin_tables: the raw C{[plugins.NAME]} tables; only
        L{gateway.registry} reads them, into each plugin's options type.
    """

    path: str
    server: ServerConfig
    listeners: tuple[ListenerConfig, ...]
    tls: TLSConfig
    queue: QueueConfig
    dns: DNSConfig = DNSConfig()
    relay: RelayConfig = RelayConfig()
    routes: Mapping[str, NextHop] = field(default_factory=dict)
    route_tls: Mapping[str, str] = field(default_factory=dict)
    auth: AuthConfig = AuthConfig()
    mta_sts: MTASTSConfig = MTASTSConfig()
    store: StoreConfig = StoreConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    limits: LimitsConfig = LimitsConfig()
    plugin_tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def listener(self, name: str) -> ListenerConfig:
        """The listener called C{name}; raises KeyError."""
        for listener in self.listeners:
            if listener.name == name:
                return listener
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A plain, printable form of the effective config (for check-config)."""
        return _plain(self)


def _plain(value: Any) -> Any:
    if isinstance(value, NextHop):
        return str(value)
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (frozenset, set)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as C{"30s"}, C{"5m"}, C{"5d"}."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value.lower())
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ValueError(f"expected a duration such as 30, \"90s\", \"5m\", \"5d\"; got {value!r}")


def parse_size(value: Any) -> int:
    """Bytes from an integer or a string such as C{"10M"} or C{"512KiB"}."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    raise ValueError(f"expected a size in bytes such as 10485760 or \"10M\"; got {value!r}")


def parse_host_port(value: str, default_port: int, allow_zero: bool = False) -> tuple[str, int, bool]:
    """Split C{host}, C{host:port}, C{[host]} or C{[host]:port}.

    @return: (host, port, bracketed); brackets mean "no MX lookup", as in
        Postfix transport(5), and also enclose IPv6 addresses.
    """
    text = value.strip()
    if not text:
        raise ValueError("empty host")
    bracketed = text.startswith("[")
    if bracketed:
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unbalanced '[' in {value!r}")
        host, rest = text[1:end], text[end + 1:]
        if host.lower().startswith("ipv6:"):
            host = host[5:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected text after ']' in {value!r}")
        port_text = rest[1:] if rest else ""
    elif text.count(":") > 1:
        raise ValueError(f"an IPv6 address must be written in brackets: {value!r}")
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"empty host in {value!r}")
    if port_text:
        if not port_text.isdigit() or not (0 if allow_zero else 1) <= int(port_text) < 65536:
            raise ValueError(f"bad port in {value!r}")
        port = int(port_text)
    else:
        port = default_port
    return host, port, bracketed


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class _Table:
    """Reads one TOML table, remembering which keys were used, so that
    unknown keys can be reported with their full name."""

    def __init__(self, path: str, where: str, data: Any) -> None:
        self.path = path
        self.where = where
        if not isinstance(data, dict):
            raise ConfigError(path, where, f"expected a table, got {type(data).__name__}")
        self.data = data
        self.used: set[str] = set()

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.path, f"{self.where} {key}".strip(), message)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise self.error(key, "is required")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"expected {_kind_name(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.error(key, f"expected {_kind_name(kinds)}, got {type(value).__name__} {value!r}")
        return value

    def convert(self, key: str, parser, default: Any) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        try:
            return parser(self.data[key])
        except (ValueError, TypeError) as exc:
            raise self.error(key, str(exc)) from None

    def positive_int(self, key: str, default: int) -> int:
        value = self.get(key, int, default)
        if value <= 0:
            raise self.error(key, f"must be a positive integer, got {value}")
        return value

    def string_list(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(key, list, None)
        if value is None:
            return default
        for item in value:
            if not isinstance(item, str):
                raise self.error(key, f"expected a list of strings, found {item!r}")
        return tuple(value)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _path(base: str, value: str) -> str:
    return os.path.abspath(os.path.join(base, os.path.expanduser(value)))


def _domains(table: _Table, key: str) -> frozenset[str]:
    out = set()
    for item in table.string_list(key):
        suffix = item.startswith(".")
        try:
            name = canonical_domain(item[1:] if suffix else item)
        except ValueError as exc:
            raise table.error(key, f"bad domain {item!r}: {exc}") from None
        out.add("." + name if suffix else name)
    return frozenset(out)


def _networks(table: _Table, key: str) -> tuple[IPNetwork, ...]:
    out = []
    for item in table.string_list(key):
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise table.error(key, f"bad network {item!r}: {exc}") from None
    return tuple(out)


def _port(table: _Table, key: str, default: int | None, allow_zero: bool = False) -> int:
    value = table.get(key, int, default, required=default is None)
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise table.error(key, f"port must be {low}..65535, got {value}")
    return value


def _bind_address(table: _Table, key: str) -> str:
    value = table.get(key, str, "127.0.0.1")
    if value in ("", "*"):
        return "0.0.0.0"
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise table.error(key, f"not an IP address: {value!r}") from None


def _server(path: str, raw: Any) -> ServerConfig:
    t = _Table(path, "[server]", raw)
    hostname = t.get("hostname", str, None) or socket.getfqdn()
    try:
        canonical_domain(hostname)
    except ValueError as exc:
        raise t.error("hostname", f"bad host name {hostname!r}: {exc}") from None
    d = ServerConfig(hostname=hostname)
    cfg = ServerConfig(
        hostname=hostname,
        local_domains=_domains(t, "local_domains"),
        relay_domains=_domains(t, "relay_domains"),
        trusted_networks=_networks(t, "trusted_networks"),
        max_message_size=t.convert("max_message_size", parse_size, d.max_message_size),
        max_recipients=t.positive_int("max_recipients", d.max_recipients),
        max_received_headers=t.positive_int("max_received_headers", d.max_received_headers),
        plugin_dirs=tuple(_path(os.getcwd(), d) for d in t.string_list("plugin_dirs")),
        soft_bounce=t.get("soft_bounce", bool, False),
    )
    for directory in cfg.plugin_dirs:
        if not os.path.isdir(directory):
            raise t.error("plugin_dirs", f"not a directory: {directory}")
    t.finish()
    return cfg


def _listener(path: str, index: int, raw: Any) -> ListenerConfig:
    t = _Table(path, f"[[listener]] #{index + 1}", raw)
    name = t.get("name", str, required=True)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise t.error("name", f"use letters, digits, '.', '_' or '-': {name!r}")
    t.where = f"[[listener]] {name!r}"
    tls = t.get("tls", str, "none")
    if tls not in TLS_MODES:
        raise t.error("tls", f"must be one of {', '.join(TLS_MODES)}; got {tls!r}")
    auth = t.get("auth", bool, False)
    cfg = ListenerConfig(
        name=name,
        address=_bind_address(t, "address"),
        port=_port(t, "port", None, allow_zero=True),
        tls=tls,
        auth=auth,
        submission=t.get("submission", bool, auth),
        require_auth=t.get("require_auth", bool, auth),
        plugins=t.string_list("plugins", ("relay_guard",)),
    )
    if len(set(cfg.plugins)) != len(cfg.plugins):
        raise t.error("plugins", "a plugin is named twice")
    if "relay_guard" not in cfg.plugins:
        raise t.error("plugins", "must include \"relay_guard\" (the open-relay guard)")
    t.finish()
    return cfg


def _routes(path: str, raw: Any, default_port: int) -> tuple[dict[str, NextHop], dict[str, str]]:
    """C{[routes]}: C{domain = "host:port"} or
    C{domain = { next_hop = "host:port", tls = "verify" }}."""
    t = _Table(path, "[routes]", raw)
    routes: dict[str, NextHop] = {}
    levels: dict[str, str] = {}
    for key in list(raw):
        value = t.get(key, (str, dict), required=True)
        tls = None
        if isinstance(value, dict):
            sub = _Table(path, f"[routes] {key!r}", value)
            value = sub.get("next_hop", str, required=True)
            tls = sub.get("tls", str, None)
            if tls is not None and tls not in CLIENT_TLS_LEVELS:
                raise sub.error("tls", f"must be one of {', '.join(CLIENT_TLS_LEVELS)}; got {tls!r}")
            sub.finish()
        suffix = key.startswith(".")
        try:
            domain = canonical_domain(key[1:] if suffix else key)
            host, port, bracketed = parse_host_port(value, default_port)
        except ValueError as exc:
            raise t.error(repr(key), str(exc)) from None
        name = "." + domain if suffix else domain
        routes[name] = NextHop(host, port, not bracketed and not _is_ip(host))
        if tls is not None:
            levels[name] = tls
    return routes, levels


def load_config(path: str) -> GatewayConfig:
    """Read and validate C{path}.

    @raise ConfigError: with the one line that names file and key.
    """
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(path, "file", "not found") from None
    except OSError as exc:
        raise ConfigError(path, "file", exc.strerror or str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "syntax", str(exc)) from None
    return parse_config(raw, path)


def parse_config(raw: dict[str, Any], path: str = "<config>") -> GatewayConfig:
    """Validate an already parsed TOML document (see L{load_config})."""
    top = _Table(path, "", raw)
    base = os.getcwd()
    server = _server(path, top.get("server", dict, {}))

    listeners_raw = top.get("listener", list, None)
    if not listeners_raw:
        raise ConfigError(path, "[[listener]]", "at least one listener is required")
    listeners = tuple(_listener(path, i, item) for i, item in enumerate(listeners_raw))
    seen: dict[str, int] = {}
    for listener in listeners:
        if listener.name in seen:
            raise ConfigError(path, f"[[listener]] {listener.name!r} name", "used twice")
        seen[listener.name] = 1

    t = _Table(path, "[tls]", top.get("tls", dict, {}))
    sni: dict[str, tuple[str, str]] = {}
    for name, pair in t.get("sni", dict, {}).items():
        sub = _Table(path, f"[tls.sni.{name!r}]", pair)
        cert = _path(base, sub.get("cert", str, required=True))
        key = _path(base, sub.get("key", str, required=True))
        for key_name, file in (("cert", cert), ("key", key)):
            if not os.path.isfile(file):
                raise sub.error(key_name, f"no such file: {file}")
        sub.finish()
        sni[name.lower().rstrip(".")] = (cert, key)
    tls = TLSConfig(
        cert=_path(base, t.get("cert", str, "var/tls/cert.pem")),
        key=_path(base, t.get("key", str, "var/tls/key.pem")),
        sni=sni,
    )
    t.finish()

    t = _Table(path, "[queue]", top.get("queue", dict, {}))
    dq = QueueConfig(path="")
    queue = QueueConfig(
        path=_path(base, t.get("path", str, "var/spool")),
        max_age=t.convert("max_age", parse_duration, dq.max_age),
        retry_initial=t.convert("retry_initial", parse_duration, dq.retry_initial),
        retry_max=t.convert("retry_max", parse_duration, dq.retry_max),
        scan_interval=t.convert("scan_interval", parse_duration, dq.scan_interval),
        double_bounce_to=t.get("double_bounce_to", str, ""),
    )
    if queue.retry_initial <= 0 or queue.retry_max < queue.retry_initial:
        raise t.error("retry_max", "must be at least retry_initial, which must be positive")
    if queue.max_age <= 0:
        raise t.error("max_age", "must be positive")
    if queue.scan_interval <= 0:
        raise t.error("scan_interval", "must be positive")
    if queue.double_bounce_to and "@" not in queue.double_bounce_to:
        raise t.error("double_bounce_to", "must be an address like postmaster@example.com")
    t.finish()

    t = _Table(path, "[dns]", top.get("dns", dict, {}))
    servers = []
    for item in t.string_list("servers"):
        try:
            host, port, _ = parse_host_port(item, 53)
        except ValueError as exc:
            raise t.error("servers", str(exc)) from None
        if not _is_ip(host):
            raise t.error("servers", f"a DNS server must be an IP address: {item!r}")
        servers.append((host, port))
    dns = DNSConfig(servers=tuple(servers), timeout=t.convert("timeout", parse_duration, DNSConfig().timeout),
                    reverse_lookup=t.get("reverse_lookup", bool, True))
    t.finish()

    t = _Table(path, "[relay]", top.get("relay", dict, {}))
    relay_port = _port(t, "port", 25)
    ca_file = t.get("ca_file", str, None)
    if ca_file:
        ca_file = _path(base, ca_file)
        if not os.path.isfile(ca_file):
            raise t.error("ca_file", f"no such file: {ca_file}")
    smarthost = None
    smarthost_text = t.get("smarthost", str, "")
    if smarthost_text:
        try:
            host, port, bracketed = parse_host_port(smarthost_text, relay_port)
        except ValueError as exc:
            raise t.error("smarthost", str(exc)) from None
        smarthost = NextHop(host, port, not bracketed and not _is_ip(host))
    dr = RelayConfig()

    def level(key: str, default: str) -> str:
        value = t.get(key, str, default)
        if value not in CLIENT_TLS_LEVELS:
            raise t.error(key, f"must be one of {', '.join(CLIENT_TLS_LEVELS)}; got {value!r}")
        return value

    relay = RelayConfig(
        port=relay_port, ca_file=ca_file or None, smarthost=smarthost,
        smarthost_username=t.get("smarthost_username", str, None),
        smarthost_password=t.get("smarthost_password", str, None),
        smarthost_tls=level("smarthost_tls", dr.smarthost_tls),
        tls=level("tls", dr.tls),
        helo_name=t.get("helo_name", str, None),
        enabled=t.get("enabled", bool, True),
        max_concurrent=t.positive_int("max_concurrent", dr.max_concurrent),
        max_per_destination=t.positive_int("max_per_destination", dr.max_per_destination),
        max_messages_per_connection=t.positive_int("max_messages_per_connection", dr.max_messages_per_connection),
        connection_idle=t.convert("connection_idle", parse_duration, dr.connection_idle),
        connect_timeout=t.convert("connect_timeout", parse_duration, dr.connect_timeout),
        command_timeout=t.convert("command_timeout", parse_duration, dr.command_timeout),
        data_timeout=t.convert("data_timeout", parse_duration, dr.data_timeout),
        shutdown_grace=t.convert("shutdown_grace", parse_duration, dr.shutdown_grace),
    )
    if (relay.smarthost_username is None) != (relay.smarthost_password is None):
        raise t.error("smarthost_password", "smarthost_username and smarthost_password go together")
    if relay.smarthost_username is not None and relay.smarthost_tls in ("none", "may"):
        raise t.error("smarthost_tls", "a password is only sent over TLS: use encrypt or verify")
    t.finish()

    routes, route_tls = _routes(path, top.get("routes", dict, {}), relay_port)

    t = _Table(path, "[auth]", top.get("auth", dict, {}))
    users_file = t.get("users_file", str, None)
    checker = t.get("checker", str, None)
    if users_file and checker:
        raise t.error("checker", "use either users_file or checker, not both")
    senders_raw = t.get("senders", dict, {})
    senders: dict[str, tuple[str, ...]] = {}
    for user, allowed in senders_raw.items():
        if not isinstance(allowed, list) or not all(isinstance(a, str) and "@" in a for a in allowed):
            raise ConfigError(path, f"[auth.senders] {user!r}",
                              "expected a list of addresses or \"@domain\" entries")
        granted = []
        for entry in allowed:
            local, _, domain = entry.rpartition("@")
            try:
                granted.append(f"{local.lower()}@{canonical_domain(domain)}")
            except ValueError as exc:
                raise ConfigError(path, f"[auth.senders] {user!r}", f"bad domain in {entry!r}: {exc}") from None
        senders[user] = tuple(granted)
    da = AuthConfig()
    auth = AuthConfig(
        users_file=_path(base, users_file) if users_file else None, checker=checker, senders=senders,
        max_failures=t.positive_int("max_failures", da.max_failures),
        delay_after=t.positive_int("delay_after", da.delay_after),
        failure_delay=t.convert("failure_delay", parse_duration, da.failure_delay),
        failure_window=t.convert("failure_window", parse_duration, da.failure_window),
    )
    t.finish()

    t = _Table(path, "[mta_sts]", top.get("mta_sts", dict, {}))
    sts_ca = t.get("ca_file", str, None)
    if sts_ca:
        sts_ca = _path(base, sts_ca)
        if not os.path.isfile(sts_ca):
            raise t.error("ca_file", f"no such file: {sts_ca}")
    mta_sts = MTASTSConfig(
        enabled=t.get("enabled", bool, True),
        cache=_path(base, t.get("cache", str, "var/mta-sts")),
        ca_file=sts_ca or relay.ca_file,
        port=_port(t, "port", 443),
        fetch_timeout=t.convert("fetch_timeout", parse_duration, 30.0),
        report=t.get("report", bool, True),
        report_organization=t.get("report_organization", str, "") or server.hostname,
        report_contact=t.get("report_contact", str, "") or f"postmaster@{server.hostname}",
        report_interval=t.convert("report_interval", parse_duration, 86400.0),
    )
    if mta_sts.report_interval < 60:
        raise t.error("report_interval", "must be at least 60 seconds")
    t.finish()

    t = _Table(path, "[store]", top.get("store", dict, {}))
    backend = t.get("backend", str, "memory")
    if backend not in ("memory", "file", "redis"):
        raise t.error("backend", f"must be memory, file or redis; got {backend!r}")
    store = StoreConfig(
        backend=backend,
        path=_path(base, t.get("path", str, "var/state")),
        redis_url=t.get("redis_url", str, StoreConfig().redis_url),
        timeout=t.convert("timeout", parse_duration, 2.0),
        prefix=t.get("prefix", str, "mailgateway:"),
    )
    if backend == "redis" and not store.redis_url.startswith(("redis://", "unix://")):
        raise t.error("redis_url", "expected redis://host:port/db or unix:///path")
    t.finish()

    t = _Table(path, "[metrics]", top.get("metrics", dict, {}))
    listen = t.get("listen", str, "")
    if listen:
        try:
            host, port, _ = parse_host_port(listen, 9464, allow_zero=True)
            ipaddress.ip_address(host)
        except ValueError as exc:
            raise t.error("listen", f"expected ip:port: {exc}") from None
    metrics = MetricsConfig(listen=listen, path=t.get("path", str, "/metrics"))
    t.finish()

    t = _Table(path, "[log]", top.get("log", dict, {}))
    log_format = t.get("format", str, "text")
    if log_format not in ("text", "json"):
        raise t.error("format", f"must be text or json; got {log_format!r}")
    level = t.get("level", str, "info")
    if level not in ("debug", "info", "warn", "error", "critical"):
        raise t.error("level", f"must be debug, info, warn, error or critical; got {level!r}")
    log_file = t.get("file", str, "")
    if log_format == "json" and not log_file:
        raise t.error("file", "format = \"json\" writes its lines to a file: set [log] file")
    log_config = LogConfig(format=log_format, level=level, file=_path(base, log_file) if log_file else "")
    t.finish()

    t = _Table(path, "[limits]", top.get("limits", dict, {}))
    d = LimitsConfig()
    limits = LimitsConfig(
        max_command_line=t.positive_int("max_command_line", d.max_command_line),
        max_text_line=t.positive_int("max_text_line", d.max_text_line),
        max_header_size=t.convert("max_header_size", parse_size, d.max_header_size),
        max_bad_commands=t.positive_int("max_bad_commands", d.max_bad_commands),
        command_timeout=t.convert("command_timeout", parse_duration, d.command_timeout),
        data_timeout=t.convert("data_timeout", parse_duration, d.data_timeout),
        max_connections=t.positive_int("max_connections", d.max_connections),
        max_connections_per_ip=t.positive_int("max_connections_per_ip", d.max_connections_per_ip),
        plugin_timeout=t.convert("plugin_timeout", parse_duration, d.plugin_timeout),
        input_buffer=t.convert("input_buffer", parse_size, d.input_buffer),
    )
    if limits.max_command_line < 512:
        raise t.error("max_command_line", "RFC 5321 §4.5.3.1.4 requires at least 512")
    if limits.max_text_line < 1000:
        raise t.error("max_text_line", "RFC 5321 §4.5.3.1.6 requires at least 1000")
    t.finish()

    plugin_tables = top.get("plugins", dict, {})
    for name, table in plugin_tables.items():
        if not isinstance(table, dict):
            raise ConfigError(path, f"[plugins.{name}]", "expected a table")

    for listener in listeners:
        if listener.auth and not (auth.users_file or auth.checker):
            raise ConfigError(path, f"[[listener]] {listener.name!r} auth",
                              "needs [auth] users_file (or [auth] checker)")
        if listener.auth and listener.tls == "none":
            raise ConfigError(path, f"[[listener]] {listener.name!r} auth",
                              "AUTH is offered only over TLS: set tls to starttls, starttls-required or implicit")
    top.finish()
    return GatewayConfig(
        path=path, server=server, listeners=listeners, tls=tls, queue=queue, dns=dns,
        relay=relay, routes=routes, route_tls=route_tls, auth=auth, mta_sts=mta_sts,
        store=store, metrics=metrics, log=log_config, limits=limits, plugin_tables=plugin_tables,
    )
