# -*- test-case-name: tests.test_greylist,tests.e2e.test_policy_state -*-
"""greylist: temporarily refuse mail from unknown (client, sender, recipient)
triplets; real mail servers retry, most spam engines do not.

At RCPT TO (after the relay guard permitted the recipient) the plugin
looks up the triplet of the client's network (the address cut to
C{ipv4_prefix} = 24 or C{ipv6_prefix} = 64 bits, because big senders retry
from another address of the same pool), the sender address (lower case,
BATV C{prvs=...=} tag removed, empty for C{<>}) and the recipient address:

  - first sight: the triplet is remembered for C{pending_lifetime}
    (default 1 day) and the recipient gets C{451 4.7.1 Greylisted, try
    again in N seconds};
  - a retry earlier than C{delay} (default 5 minutes) after first sight is
    refused the same way (the first-sight time is kept);
  - a retry after C{delay} passes: the triplet is now known for
    C{lifetime} (default 36 days), renewed each time it passes again.

A client network whose triplets passed C{auto_allow_after} times
(default 5; 0 turns it off) is allowed without greylisting for
C{auto_allow_lifetime} (default 7 days), renewed while it keeps sending.

Not greylisted: authenticated sessions, sessions marked trusted and
clients in C{[server] trusted_networks} (with C{exempt_trusted}, the
default), and clients in C{allow_networks}.

State lives in the shared store (C{[store]}), so gateways on one Redis
share what they learnt; time is the reactor's clock (C{context.clock}).
When the store cannot answer, C{on_store_error = "open"} (the default)
lets the recipient through with a log line, C{"closed"} answers
C{451 4.3.0}.

Example::

    [plugins.greylist]
    delay = "5m"
    lifetime = "36d"
    pending_lifetime = "1d"
    auto_allow_after = 5
    auto_allow_lifetime = "7d"
    allow_networks = ["192.0.2.0/24"]

Standards: RFC 6647 (email greylisting), RFC 5321 §4.5.4.1 (retries),
RFC 3463 (4.7.1).
See also: Postgrey; Postfix C{check_policy_service}; gateway.store.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from gateway.interfaces import IPluginFactory, IRcptCheck

STORE_ERROR_ACTIONS = ("open", "closed")
LOG_EVERY = 60.0

#: The record of a triplet that passed.
PASSED = b"pass"

_BATV = re.compile(r"^prvs=[0-9a-z]+=", re.IGNORECASE)


@dataclass(frozen=True)
class Options:
    """C{[plugins.greylist]}; durations are seconds or strings such as
    C{"5m"}, C{"36d"} (floats after validation).

    @ivar delay: how long a new triplet must wait before a retry passes.
    @ivar lifetime: how long a passed triplet is remembered (renewed on use).
    @ivar pending_lifetime: how long a first sight waits for its retry.
    @ivar auto_allow_after: passes after which the client network is
        allowed without greylisting; 0 is off.
    @ivar auto_allow_lifetime: how long that allowance lasts (renewed on use).
    @ivar ipv4_prefix: bits of an IPv4 address that make the client network.
    @ivar ipv6_prefix: bits of an IPv6 address that make the client network.
    @ivar exempt_trusted: never greylist authenticated or trusted clients.
    @ivar allow_networks: networks never greylisted (CIDR strings).
    @ivar on_store_error: C{"open"} or C{"closed"}.
    """

    delay: float | str = "5m"
    lifetime: float | str = "36d"
    pending_lifetime: float | str = "1d"
    auto_allow_after: int = 5
    auto_allow_lifetime: float | str = "7d"
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    exempt_trusted: bool = True
    allow_networks: tuple[str, ...] = ()
    on_store_error: str = "open"

    def __post_init__(self) -> None:
        from gateway.config import parse_duration

        for name in ("delay", "lifetime", "pending_lifetime", "auto_allow_lifetime"):
            object.__setattr__(self, name, parse_duration(getattr(self, name)))
        if self.pending_lifetime <= self.delay:
            raise ValueError(f"pending_lifetime ({self.pending_lifetime:g}s) must be longer than delay "
                             f"({self.delay:g}s)")
        if self.lifetime <= 0 or self.auto_allow_lifetime <= 0:
            raise ValueError("lifetime and auto_allow_lifetime must be positive")
        if isinstance(self.auto_allow_after, bool) or self.auto_allow_after < 0:
            raise ValueError(f"auto_allow_after must be a whole number, 0 for off; got {self.auto_allow_after!r}")
        if not 0 <= self.ipv4_prefix <= 32:
            raise ValueError(f"ipv4_prefix must be 0..32; got {self.ipv4_prefix!r}")
        if not 0 <= self.ipv6_prefix <= 128:
            raise ValueError(f"ipv6_prefix must be 0..128; got {self.ipv6_prefix!r}")
        networks = []
        for item in self.allow_networks:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError as exc:
                raise ValueError(f"allow_networks: bad network {item!r}: {exc}") from None
        object.__setattr__(self, "allow_networks", tuple(str(n) for n in networks))
        if self.on_store_error not in STORE_ERROR_ACTIONS:
            raise ValueError(f"on_store_error must be \"open\" or \"closed\"; got {self.on_store_error!r}")


def _client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip


def client_network(address: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The greylisting network of a client address, as CIDR text."""
    ip = _client_ip(address)
    prefix = ipv4_prefix if ip.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def normal_sender(sender: Any) -> str:
    """The sender part of a triplet: lower case, BATV tag removed, C{""}
    for the null sender."""
    if sender is None:
        return ""
    local = _BATV.sub("", sender.local)
    return f"{local}@{sender.domain}".lower()


def triplet_key(network: str, sender: str, recipient: str) -> str:
    """The store key of a triplet (hashed: bounded length, no separators
    to escape)."""
    digest = hashlib.sha256("\0".join((network, sender, recipient)).encode("utf-8")).hexdigest()[:32]
    return f"greylist:triplet:{digest}"


@implementer(IRcptCheck)
class Greylist:
    """The C{greylist} plugin (one per configuration, shared by listeners)."""

    log = Logger(namespace="plugins.greylist")

    def __init__(self, options: Options, context: Any) -> None:
        self.options = options
        self._name = context.name
        self._clock = context.clock
        self._store = context.store
        if self._store is None:
            from gateway.store import MemoryStore

            self._store = MemoryStore(context.clock)
        self._trusted = context.config.server.trusted_networks
        self._allowed = tuple(ipaddress.ip_network(n) for n in options.allow_networks)
        self._errors_unlogged = 0
        self._last_logged: float | None = None

    def exemption(self, session: Any) -> str | None:
        """Why C{session} is not greylisted, or None."""
        ip = _client_ip(session.peer)
        if any(ip in network for network in self._allowed if network.version == ip.version):
            return "allowed"
        if self.options.exempt_trusted:
            if session.auth_user is not None:
                return "authenticated"
            if session.trusted or any(ip in network for network in self._trusted if network.version == ip.version):
                return "trusted"
        return None

    def check_rcpt(self, session: Any, transaction: Any, recipient: Any) -> Any:
        from twisted.internet import defer

        from gateway.verdict import CONTINUE

        why = self.exemption(session)
        if why is not None:
            transaction.results.add(self._name, "skip", why)
            return CONTINUE
        d = defer.ensureDeferred(self._check(session, transaction, recipient))
        d.addErrback(self._eb_store, session, transaction)
        return d

    async def _check(self, session: Any, transaction: Any, recipient: Any) -> Any:
        from gateway.verdict import CONTINUE, tempfail

        options = self.options
        store = self._store
        network = client_network(session.peer, options.ipv4_prefix, options.ipv6_prefix)
        auto_key = f"greylist:auto:{network}"
        if options.auto_allow_after and await store.get(auto_key) is not None:
            await store.set(auto_key, b"1", options.auto_allow_lifetime)
            transaction.results.add(self._name, "pass", "auto-allowed")
            return CONTINUE
        key = triplet_key(network, normal_sender(transaction.sender), recipient.address.lower())
        record = await store.get(key)
        now = self._clock.seconds()
        if record == PASSED:
            await store.set(key, PASSED, options.lifetime)
            transaction.results.add(self._name, "pass", "known")
            return CONTINUE
        first_seen = _first_seen(record)
        if first_seen is None or first_seen > now:
            await store.set(key, repr(now).encode("ascii"), options.pending_lifetime)
            transaction.results.add(self._name, "greylisted", "new")
            return tempfail(451, "4.7.1", f"Greylisted, try again in {_seconds(options.delay)} seconds")
        waited = now - first_seen
        if waited < options.delay:
            transaction.results.add(self._name, "greylisted", "early")
            return tempfail(451, "4.7.1", f"Greylisted, try again in {_seconds(options.delay - waited)} seconds")
        await store.set(key, PASSED, options.lifetime)
        transaction.results.add(self._name, "pass", f"retried after {waited:.0f}s")
        self.log.info("{plugin}: {network} <{sender}> -> <{rcpt}> passed after {waited:.0f}s",
                      plugin=self._name, network=network, sender=transaction.sender_address,
                      rcpt=recipient.address, waited=waited)
        if options.auto_allow_after:
            passes = await store.incr(f"greylist:passes:{network}", 1, options.lifetime)
            if passes >= options.auto_allow_after:
                await store.set(auto_key, b"1", options.auto_allow_lifetime)
                await store.delete(f"greylist:passes:{network}")
                self.log.info("{plugin}: {network} auto-allowed for {lifetime:g}s after {passes} passes",
                              plugin=self._name, network=network, lifetime=options.auto_allow_lifetime,
                              passes=passes)
        return CONTINUE

    def _eb_store(self, failure: Any, session: Any, transaction: Any) -> Any:
        from gateway.verdict import CONTINUE, tempfail

        closed = self.options.on_store_error == "closed"
        now = self._clock.seconds()
        if self._last_logged is None or now - self._last_logged >= LOG_EVERY:
            self.log.warn("{plugin}: state store unavailable ({reason}); failing {how} for {client}"
                          " ({suppressed} more since the last report)",
                          plugin=self._name, reason=failure.getErrorMessage(),
                          how="closed" if closed else "open", client=session.peer,
                          suppressed=self._errors_unlogged)
            self._last_logged = now
            self._errors_unlogged = 0
        else:
            self._errors_unlogged += 1
        transaction.results.add(self._name, "error", "store unavailable")
        if closed:
            return tempfail(451, "4.3.0", "Greylisting state unavailable, try again later")
        return CONTINUE


def _first_seen(record: Any) -> float | None:
    """The first-sight time in a pending record, None when unreadable."""
    if record is None:
        return None
    try:
        return float(bytes(record).decode("ascii"))
    except (ValueError, UnicodeDecodeError, TypeError):
        return None


def _seconds(value: float) -> int:
    """Whole seconds, rounded up, at least 1."""
    whole = int(value)
    return max(1, whole + (1 if value > whole else 0))


@provider(IPlugin, IPluginFactory)
class _Factory:
    name = "greylist"
    options_type = Options
    description = "Greylisting (RFC 6647): 451 for unknown client/sender/recipient triplets until they retry."

    @staticmethod
    def build(options: Options, context: Any) -> Greylist:
        return Greylist(options, context)


factory = _Factory
