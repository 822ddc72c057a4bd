# -*- test-case-name: tests.test_ratelimit,tests.e2e.test_policy_state -*-
"""ratelimit: limit connections, messages and recipients per time window.

Counts, per window of C{window} seconds, in the shared state store
(C{[store]}), so that several gateways on one Redis share one limit:

  - C{connections_per_ip}: new connections per client network, counted
    when the connection is accepted.  Over the limit the client gets
    C{421 4.7.0} instead of the greeting and is disconnected.  This is a
    connection *rate*: the pipeline has no hook for a closing connection,
    so the plugin cannot count connections that are open at once.
    Concurrent connections per IP are already capped by C{[limits]
    max_connections_per_ip} (and all of them by C{max_connections}).
  - C{messages_per_ip}, C{messages_per_user}, C{messages_per_sender_domain}:
    counted at MAIL FROM, so a client over its limit is refused early
    (C{451 4.7.1}) before it sends a body.  A MAIL command counts as one
    message even when the transaction is later given up.
  - C{recipients_per_ip}, C{recipients_per_user},
    C{recipients_per_sender_domain}: counted at RCPT TO (after the relay
    guard permitted the recipient), refused with C{451 4.7.1}.

A limit of 0 (the default) is off.  "ip" means the client's network:
the address cut to C{ipv4_prefix} bits (default 32, one address) or
C{ipv6_prefix} bits (default 64, one IPv6 subnet); "user" is the SMTP
AUTH user name (sessions without AUTH are not counted per user); "sender
domain" is the MAIL FROM domain (the null sender C{<>} is not counted per
domain).  A refused command is counted too, so a client that keeps
hammering stays refused until its window ends.

Windows are *fixed* and start with the first event: the first count
creates the counter with an expiry of C{window} seconds (the store's
C{incr} with C{ttl}), and the counter disappears when that expires.  A
client can therefore send up to twice the limit across the end of one
window and the start of the next, never more.  Sliding windows would
need one store entry per event.

Clients in C{[server] trusted_networks} (and sessions marked trusted) are
not counted when C{exempt_trusted} is true (the default).  Authenticated
clients are counted: per-user limits exist to catch a stolen password.

When the store cannot answer (Redis down or slower than C{[store]
timeout}), C{on_store_error = "open"} (the default) lets the command
through and logs it; C{"closed"} answers C{451 4.3.0} (C{421 4.3.0} and a
disconnect for a new connection).  The log line is written for the first
failure and then at most once a minute, with a count.

Example::

    [plugins.ratelimit]
    window = "1h"
    connections_per_ip = 60
    messages_per_ip = 100
    recipients_per_ip = 500
    messages_per_user = 200
    recipients_per_user = 1000
    on_store_error = "open"

Standards: RFC 5321 §4.2.2 (421, 451), RFC 3463 (4.7.0, 4.7.1, 4.3.0).
See also: Postfix anvil(8) C{smtpd_client_connection_rate_limit},
C{smtpd_client_message_rate_limit}, C{smtpd_client_recipient_rate_limit};
Haraka C{rate_limit}; gateway.store.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from gateway.interfaces import IConnectCheck, IMailCheck, IPluginFactory, IRcptCheck

#: What C{on_store_error} may say.
STORE_ERROR_ACTIONS = ("open", "closed")

#: Seconds between two "store unavailable" log lines (the first is at once).
LOG_EVERY = 60.0


@dataclass(frozen=True)
class Options:
    """C{[plugins.ratelimit]}.

    @ivar window: the window length: seconds or a duration such as
        C{"90s"}, C{"5m"}, C{"1h"} (a float after validation).
    @ivar connections_per_ip: new connections per client network per window.
    @ivar messages_per_ip: MAIL commands per client network per window.
    @ivar recipients_per_ip: accepted-by-relay RCPTs per client network.
    @ivar messages_per_user: MAIL commands per AUTH user.
    @ivar recipients_per_user: RCPTs per AUTH user.
    @ivar messages_per_sender_domain: MAIL commands per MAIL FROM domain.
    @ivar recipients_per_sender_domain: RCPTs per MAIL FROM domain.
    @ivar ipv4_prefix: bits of an IPv4 client address that make its network.
    @ivar ipv6_prefix: bits of an IPv6 client address that make its network.
    @ivar exempt_trusted: do not count trusted_networks clients.
    @ivar on_store_error: C{"open"} or C{"closed"}.
    """

    window: float | str = "1h"
    connections_per_ip: int = 0
    messages_per_ip: int = 0
    recipients_per_ip: int = 0
    messages_per_user: int = 0
    recipients_per_user: int = 0
    messages_per_sender_domain: int = 0
    recipients_per_sender_domain: int = 0
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64
    exempt_trusted: bool = True
    on_store_error: str = "open"

    def __post_init__(self) -> None:
        from gateway.config import parse_duration

        window = parse_duration(self.window)
        if window <= 0:
            raise ValueError(f"window must be positive; got {self.window!r}")
        object.__setattr__(self, "window", window)
        for name in LIMITS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number, 0 for off; got {value!r}")
        if not 0 <= self.ipv4_prefix <= 32:
            raise ValueError(f"ipv4_prefix must be 0..32; got {self.ipv4_prefix!r}")
        if not 0 <= self.ipv6_prefix <= 128:
            raise ValueError(f"ipv6_prefix must be 0..128; got {self.ipv6_prefix!r}")
        if self.on_store_error not in STORE_ERROR_ACTIONS:
            raise ValueError(f"on_store_error must be \"open\" or \"closed\"; got {self.on_store_error!r}")


#: Every limit option, as (event, subject): the store key is
#: C{ratelimit:<event>:<subject>:<value>}.
LIMITS = {
    "connections_per_ip": ("conn", "ip"),
    "messages_per_ip": ("msg", "ip"),
    "recipients_per_ip": ("rcpt", "ip"),
    "messages_per_user": ("msg", "user"),
    "recipients_per_user": ("rcpt", "user"),
    "messages_per_sender_domain": ("msg", "domain"),
    "recipients_per_sender_domain": ("rcpt", "domain"),
}

_NOUNS = {"conn": "connections", "msg": "messages", "rcpt": "recipients"}
_SUBJECTS = {"ip": "from", "user": "for user", "domain": "from sender domain"}


def format_duration(seconds: float) -> str:
    """C{3600} -> C{"1h"}, C{90} -> C{"90s"}, C{2.5} -> C{"2.5s"}."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def client_network(address: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The client's network as text (C{"192.0.2.1"} at /32, else
    C{"192.0.2.0/24"}); an IPv4-mapped IPv6 address counts as IPv4."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = ipv4_prefix if ip.version == 4 else ipv6_prefix
    if prefix == ip.max_prefixlen:
        return str(ip)
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def _printable(text: str, limit: int = 100) -> str:
    cleaned = "".join(c if " " <= c < "\x7f" else "?" for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[:limit - 3] + "..."


@implementer(IConnectCheck, IMailCheck, IRcptCheck)
class RateLimit:
    """The C{ratelimit} plugin (one per configuration, shared by listeners)."""

    log = Logger(namespace="plugins.ratelimit")

    def __init__(self, options: Options, context: Any) -> None:
        self.options = options
        self._name = context.name
        self._clock = context.clock
        self._store = context.store
        if self._store is None:
            from gateway.store import MemoryStore

            self._store = MemoryStore(context.clock)
        self._networks = context.config.server.trusted_networks
        self._by_event: dict[str, tuple[tuple[str, str, int], ...]] = {}
        for option, (event, subject) in LIMITS.items():
            limit = getattr(options, option)
            if limit:
                self._by_event.setdefault(event, ())
                self._by_event[event] += ((option, subject, limit),)
        self._errors_unlogged = 0
        self._last_logged: float | None = None

    # -- who is counted ----------------------------------------------------

    def is_exempt(self, session: Any) -> bool:
        """True for trusted clients when C{exempt_trusted} is on."""
        if not self.options.exempt_trusted:
            return False
        if session.trusted:
            return True
        address = session.peer_ip
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks if network.version == address.version)

    def _subjects(self, session: Any, sender: Any) -> dict[str, str]:
        out = {"ip": client_network(session.peer, self.options.ipv4_prefix, self.options.ipv6_prefix)}
        if session.auth_user is not None:
            out["user"] = session.auth_user
        if sender is not None and sender.domain:
            out["domain"] = sender.domain.lower()
        return out

    # -- stages ------------------------------------------------------------

    def check_connect(self, session: Any) -> Any:
        return self._check("conn", session, None, session.results)

    def check_mail(self, session: Any, transaction: Any, sender: Any) -> Any:
        return self._check("msg", session, sender, transaction.results)

    def check_rcpt(self, session: Any, transaction: Any, recipient: Any) -> Any:
        return self._check("rcpt", session, transaction.sender, transaction.results)

    def _check(self, event: str, session: Any, sender: Any, results: Any) -> Any:
        from twisted.internet import defer

        from gateway.verdict import CONTINUE

        limits = self._by_event.get(event)
        if not limits:
            return CONTINUE
        if self.is_exempt(session):
            results.add(self._name, "skip", "trusted")
            return CONTINUE
        subjects = self._subjects(session, sender)
        counted = [(option, subject, limit, subjects[subject]) for option, subject, limit in limits
                   if subject in subjects]
        if not counted:
            return CONTINUE
        # One counter per subject, all at once: the stage waits for one
        # store round trip (bounded by [store] timeout), not one per limit.
        calls = [defer.maybeDeferred(self._store.incr, f"ratelimit:{event}:{subject}:{value}", 1,
                                     self.options.window)
                 for option, subject, limit, value in counted]
        d = defer.gatherResults(calls, consumeErrors=True)
        d.addCallbacks(self._cb_counted, self._eb_store, callbackArgs=(event, counted, results),
                       errbackArgs=(event, session, results))
        return d

    def _cb_counted(self, counts: list[int], event: str, counted: list, results: Any) -> Any:
        from gateway.verdict import CONTINUE, tempfail

        for count, (option, subject, limit, value) in zip(counts, counted):
            if count > limit:
                noun = _NOUNS[event]
                text = (f"Rate limit exceeded: too many {noun} {_SUBJECTS[subject]} {_printable(value)} "
                        f"(limit {limit} per {format_duration(self.options.window)}), try again later")
                results.add(self._name, "fail", f"{option}={count}/{limit}")
                self.log.info("{plugin}: {option} exceeded for {subject} {value}: {count} > {limit}",
                              plugin=self._name, option=option, subject=subject, value=value,
                              count=count, limit=limit)
                if event == "conn":
                    return tempfail(421, "4.7.0", text, disconnect=True)
                return tempfail(451, "4.7.1", text)
        results.add(self._name, "pass")
        return CONTINUE

    def _eb_store(self, failure: Any, event: str, session: Any, results: Any) -> Any:
        from twisted.internet import defer

        from gateway.verdict import CONTINUE, tempfail

        if failure.check(defer.FirstError):
            failure = failure.value.subFailure
        closed = self.options.on_store_error == "closed"
        self._log_store_error(failure, session, "closed" if closed else "open")
        results.add(self._name, "error", "store unavailable")
        if not closed:
            return CONTINUE
        text = "Rate limit state unavailable, try again later"
        if event == "conn":
            return tempfail(421, "4.3.0", text, disconnect=True)
        return tempfail(451, "4.3.0", text)

    def _log_store_error(self, failure: Any, session: Any, how: str) -> None:
        now = self._clock.seconds()
        if self._last_logged is not None and now - self._last_logged < LOG_EVERY:
            self._errors_unlogged += 1
            return
        self.log.warn("{plugin}: state store unavailable ({reason}); failing {how} for {client}"
                      " ({suppressed} more since the last report)",
                      plugin=self._name, reason=failure.getErrorMessage(), how=how, client=session.peer,
                      suppressed=self._errors_unlogged)
        self._last_logged = now
        self._errors_unlogged = 0


@provider(IPlugin, IPluginFactory)
class _Factory:
    name = "ratelimit"
    options_type = Options
    description = "Rate limits: connections, messages and recipients per window, per client network, user and sender domain."

    @staticmethod
    def build(options: Options, context: Any) -> RateLimit:
        return RateLimit(options, context)


factory = _Factory
