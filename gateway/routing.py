# -*- test-case-name: tests.test_routing -*-
"""Where mail for a recipient domain goes: a route, the smarthost, or its MX hosts.

Two steps, kept apart on purpose.  L{Router.destination} is synchronous and
pure: it reads the configuration only, so the scheduler can group queued
recipients by destination (and count connections per destination) without
touching DNS.  L{Router.hosts} then turns one destination into the ordered
list of addresses to try, at delivery time, so DNS answers are never older
than the attempt that uses them.

The order of choice is Postfix's transport(5) order: C{[routes]} for the
exact domain, then C{".parent"} entries from the most specific, then the
C{[relay] smarthost}, else the domain's own MX records.

Failures are typed: a L{RoutingError} says whether it is permanent (bounce
now) or temporary (defer), with the RFC 3463 status for the DSN.  A
next hop the admin configured (a route or the smarthost) that does not
resolve is always temporary: it is the admin's mistake, not the sender's,
and must not bounce mail while it is being fixed (Postfix defers such
mail too).

Standards: RFC 5321 §5.1 (MX order, equal preferences shuffled, implicit
MX); RFC 7505 (null MX, 5.1.10); RFC 3463 (5.1.2, 4.4.3); RFC 8461 §4
(MTA-STS applies to the policy domain's MX delivery, not to a smarthost).
See also: gateway.dns; Postfix transport(5), relayhost, smtp(8);
twisted.mail.relaymanager.MXCalculator; KumoMTA's "queue per
destination and TLS policy" (why the TLS level and the policy domain are
part of L{Destination.key}).
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IResolver
from twisted.logger import Logger

from gateway.config import GatewayConfig, NextHop
from gateway.dns import DNSPermanentError, DNSTemporaryError, lookup_addresses, lookup_mx

#: Outbound TLS levels, weakest first (Postfix smtp_tls_security_level).
TLS_LEVELS = ("none", "may", "encrypt", "verify")

#: The C{route_tls} key for the smarthost.
SMARTHOST = "smarthost"


@dataclass(frozen=True, slots=True)
class Host:
    """One connect target, in the order to try.

    @ivar name: the host name it came from (the MX exchange, the route or
        smarthost host, or the domain for an implicit MX); the name to
        check a certificate against.
    @ivar address: an IPv4 or IPv6 address.
    @ivar preference: the MX preference; 0 when no MX was involved.
    """

    name: str
    address: str
    port: int
    preference: int


@dataclass(frozen=True, slots=True)
class Destination:
    """The routing decision for one recipient domain, made without DNS.

    @ivar key: the connection-reuse key: messages with equal keys may share
        a connection (and count against the same per-destination limits).
        It is built from the route kind, the next hop with its port, the
        TLS level and the policy domain, so two domains that share an MX
        but differ in TLS policy never share a connection.  The policy
        domain is empty for the smarthost, so all smarthost mail at one TLS
        level shares.
    @ivar domain: the recipient domain; the MTA-STS policy domain unless
        C{smarthost}.
    @ivar next_hop: where to connect: the C{[routes]} value, the smarthost,
        or C{NextHop(domain, relay.port, mx=True)}.
    @ivar tls: C{"none"}, C{"may"}, C{"encrypt"} or C{"verify"}.
    @ivar smarthost: sent through the C{[relay] smarthost}, which is outside
        MTA-STS (RFC 8461 §4 applies to the MX hosts of the policy domain).
    @ivar route: the C{[routes]} key that matched (C{"example.com"} or
        C{".example.com"}), else None.
    """

    key: str
    domain: str
    next_hop: NextHop
    tls: str
    smarthost: bool
    route: str | None = None

    @property
    def kind(self) -> str:
        """C{"route"}, C{"smarthost"}, C{"literal"} (an address-literal
        domain) or C{"mx"}: the first part of L{key}."""
        return _kind(self.domain, self.smarthost, self.route)

    @property
    def configured(self) -> bool:
        """Whether the admin chose the next hop (a route or the smarthost)."""
        return self.route is not None or self.smarthost


class RoutingError(Exception):
    """No connect target for a destination.

    @ivar permanent: bounce now (5xx) rather than retry later (4xx).
    @ivar status: the RFC 3463 enhanced status code, e.g. C{"5.1.10"}.
    @ivar text: the human-readable reason, for the log and the DSN.
    """

    def __init__(self, permanent: bool, status: str, text: str) -> None:
        super().__init__(f"{status} {text}")
        self.permanent = permanent
        self.status = status
        self.text = text


def _kind(domain: str, smarthost: bool, route: str | None) -> str:
    if route is not None:
        return "route"
    if smarthost:
        return SMARTHOST
    if domain.startswith("["):
        return "literal"
    return "mx"


def _check_tls(level: str, where: str) -> str:
    if level not in TLS_LEVELS:
        raise ValueError(f"{where}: TLS level must be one of {', '.join(TLS_LEVELS)}; got {level!r}")
    return level


def _literal_host(domain: str) -> str | None:
    """The IP address inside an address-literal domain (C{"[192.0.2.1]"},
    C{"[IPv6:2001:db8::1]"}), or None for a domain name."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


class Router:
    """Maps recipient domains to destinations and destinations to hosts.

    @param config: the validated configuration (C{[routes]}, C{[relay]}).
    @param resolver: an C{IResolver}, normally L{gateway.dns.make_resolver}'s.
    @param rng: shuffles MX hosts of equal preference; inject a seeded one
        in tests.
    @param tls_default: the TLS level when nothing more specific applies.
    @param route_tls: TLS levels keyed like C{[routes]} (C{"example.com"},
        C{".example.com"}), plus C{"smarthost"}.  A matched route uses its
        own key; MX delivery looks the domain up the same way as routes
        (exact, then C{".parent"}), so a domain can require TLS without a
        route.
    @raise ValueError: an unknown TLS level.
    """

    log = Logger()

    def __init__(
        self,
        config: GatewayConfig,
        resolver: IResolver,
        *,
        rng: random.Random | None = None,
        tls_default: str = "may",
        route_tls: Mapping[str, str] = MappingProxyType({}),
    ) -> None:
        self._routes = config.routes
        self._smarthost = config.relay.smarthost
        self._port = config.relay.port
        self._resolver = resolver
        self._rng = rng if rng is not None else random.Random()
        self._tls_default = _check_tls(tls_default, "tls_default")
        self._route_tls = {key.lower(): _check_tls(level, f"route_tls[{key!r}]") for key, level in route_tls.items()}

    # Destination: configuration only

    def destination(self, domain: str) -> Destination:
        """The destination for a recipient domain (canonical form, as in
        C{Mailbox.domain}).  No DNS: the answer depends on the config only."""
        domain = domain.rstrip(".").lower() if not domain.startswith("[") else domain
        route = _match(self._routes, domain)
        if route is not None:
            next_hop = self._routes[route]
            tls = self._route_tls.get(route, self._tls_default)
            return self._make(domain, next_hop, tls, smarthost=False, route=route)
        if self._smarthost is not None:
            tls = self._route_tls.get(SMARTHOST, self._tls_default)
            return self._make(domain, self._smarthost, tls, smarthost=True, route=None)
        literal = _literal_host(domain)
        if literal is not None:
            next_hop = NextHop(literal, self._port, False)
        else:
            next_hop = NextHop(domain, self._port, True)
        tls_key = _match(self._route_tls, domain)
        tls = self._route_tls[tls_key] if tls_key is not None else self._tls_default
        return self._make(domain, next_hop, tls, smarthost=False, route=None)

    @staticmethod
    def _make(domain: str, next_hop: NextHop, tls: str, *, smarthost: bool, route: str | None) -> Destination:
        policy = "" if smarthost else domain
        key = f"{_kind(domain, smarthost, route)}|{next_hop}|{tls}|{policy}"
        return Destination(key, domain, next_hop, tls, smarthost, route)

    # Hosts: DNS, at delivery time

    async def hosts(self, destination: Destination) -> list[Host]:
        """The ordered connect targets for C{destination}.

        @raise RoutingError: null MX (permanent, 5.1.10), no such domain or
            no address at all (permanent, 5.1.2), a DNS failure (temporary,
            4.4.3).  For a configured next hop every failure is temporary.
        """
        hop = destination.next_hop
        try:
            if not hop.mx:
                return await self._direct(destination)
            return await self._via_mx(destination)
        except RoutingError as exc:
            if destination.configured and exc.permanent:
                exc = RoutingError(False, "4.4.3", f"configured next hop {hop}: {exc.text}")
            self.log.info(
                "no route for {domain} via {next_hop}: {status} {text}",
                domain=destination.domain, next_hop=str(hop), destination=destination.key,
                status=exc.status, text=exc.text,
            )
            raise exc from None

    async def _direct(self, destination: Destination) -> list[Host]:
        """A next hop without MX look-up: the host's own addresses."""
        hop = destination.next_hop
        addresses = await self._addresses(hop.host)
        if not addresses:
            raise RoutingError(True, "5.1.2", f"{hop.host} has no address")
        return [Host(hop.host, address, hop.port, 0) for address in addresses]

    async def _via_mx(self, destination: Destination) -> list[Host]:
        hop = destination.next_hop
        try:
            records = await lookup_mx(self._resolver, hop.host)
        except DNSPermanentError:
            raise RoutingError(True, "5.1.2", f"Domain {hop.host} does not exist") from None
        except DNSTemporaryError as exc:
            raise RoutingError(False, "4.4.3", f"DNS failure looking up MX of {hop.host}: {exc}") from None

        if not records:
            # RFC 5321 §5.1: no MX, so the domain itself is the one host.
            addresses = await self._addresses(hop.host)
            if not addresses:
                raise RoutingError(True, "5.1.2", f"Domain {hop.host} has no MX and no address")
            return [Host(hop.host, address, hop.port, 0) for address in addresses]

        exchanges = [(preference, exchange) for preference, exchange in records if exchange]
        if not exchanges:
            raise RoutingError(True, "5.1.10", f"Domain {hop.host} does not accept mail (null MX)")
        if len(exchanges) < len(records):
            self.log.warn("ignoring null MX among other MX records of {domain}", domain=hop.host)

        ordered = self._order(exchanges)
        unique = list(dict.fromkeys(exchange for _, exchange in ordered))
        results = await defer.DeferredList(
            [defer.Deferred.fromCoroutine(lookup_addresses(self._resolver, exchange)) for exchange in unique],
            consumeErrors=True,
        )
        resolved = dict(zip(unique, results))

        hosts: list[Host] = []
        seen: set[str] = set()
        temporary = False
        for preference, exchange in ordered:
            succeeded, value = resolved[exchange]
            if not succeeded:
                temporary = temporary or not value.check(DNSPermanentError)
                self.log.info("skipping MX {exchange} of {domain}: {error}",
                              exchange=exchange, domain=hop.host, error=value.getErrorMessage())
                continue
            if not value:
                self.log.info("skipping MX {exchange} of {domain}: no address",
                              exchange=exchange, domain=hop.host)
            for address in value:
                if address not in seen:
                    seen.add(address)
                    hosts.append(Host(exchange, address, hop.port, preference))
        if hosts:
            return hosts
        if temporary:
            raise RoutingError(False, "4.4.3", f"DNS failure resolving the MX hosts of {hop.host}")
        raise RoutingError(True, "5.1.2", f"No MX host of {hop.host} has an address")

    def _order(self, records: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """Lowest preference first; equal preferences in random order
        (RFC 5321 §5.1), so load spreads as the domain's owner intended."""
        groups: dict[int, list[tuple[int, str]]] = {}
        for record in records:
            groups.setdefault(record[0], []).append(record)
        ordered: list[tuple[int, str]] = []
        for preference in sorted(groups):
            group = groups[preference]
            self._rng.shuffle(group)
            ordered.extend(group)
        return ordered

    async def _addresses(self, host: str) -> list[str]:
        """L{lookup_addresses} with errors as L{RoutingError}s."""
        try:
            return await lookup_addresses(self._resolver, host)
        except DNSPermanentError:
            raise RoutingError(True, "5.1.2", f"Domain {host} does not exist") from None
        except DNSTemporaryError as exc:
            raise RoutingError(False, "4.4.3", f"DNS failure looking up {host}: {exc}") from None


def _match(table: Mapping[str, Any], domain: str) -> str | None:
    """The key of C{table} for C{domain}: the exact domain, else the most
    specific C{".parent"} entry.  C{".example.com"} matches subdomains of
    example.com, never example.com itself (as in L{gateway.address.domain_matches})."""
    if domain in table:
        return domain
    if domain.startswith("["):
        return None
    labels = domain.split(".")
    for i in range(1, len(labels)):
        key = "." + ".".join(labels[i:])
        if key in table:
            return key
    return None
