# -*- test-case-name: tests.test_dns -*-
"""DNS for the relay: the resolver built from C{[dns]}, and MX and address look-ups.

Why a module of its own: twisted.names answers with raw
C{(answers, authority, additional)} tuples and one exception class per
rcode.  The relay needs typed answers and exactly two kinds of failure,
because that is the difference between deferring a message (4xx) and
bouncing it (5xx).  Only an authoritative "no such name" (NXDOMAIN) is
permanent; a timeout, SERVFAIL, REFUSED, a malformed answer or a network
error may all heal, so they are temporary.

Every query uses the resolver's own timeout (C{[dns] timeout}), so every
wait here is bounded.  Identical queries in flight are de-duplicated by
C{twisted.names.client.Resolver} itself (its C{_waiting} map): one packet,
every caller gets the answer.

Standards: RFC 1034 §3.6.2 (CNAME); RFC 1035 §4.1.1 (rcodes); RFC 2308 §2
(NXDOMAIN versus NODATA); RFC 3596 (AAAA); RFC 5321 §5.1 (MX look-up,
IPv4 before IPv6 is our choice, not the RFC's).
See also: twisted.names.client.Resolver; gateway.routing (the only user so
far); Postfix dns_lookup(3).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.logger import Logger
from twisted.names import client, dns, error

from gateway.config import DNSConfig

_log = Logger(namespace="gateway.dns")

#: The longest CNAME chain followed before giving up (temporarily).
MAX_CNAME_CHAIN = 8

#: The system resolver configuration read when C{[dns] servers} is empty.
RESOLV_CONF = "/etc/resolv.conf"


class DNSTemporaryError(Exception):
    """A look-up failed in a way that may heal: timeout, SERVFAIL, REFUSED,
    a malformed answer, a network error, a CNAME loop.  Defer the message."""


class DNSPermanentError(Exception):
    """The name does not exist (an authoritative NXDOMAIN).  Bounce."""


def make_resolver(dns_config: DNSConfig, reactor: IReactorTime, *, resolv_conf: str = RESOLV_CONF) -> IResolver:
    """A twisted.names resolver for C{[dns]}: its servers, else the system's.

    Why one timeout value rather than twisted's default C{(1, 3, 11, 45)}:
    a single, configured bound per query is what an admin can reason about;
    with several servers each is still tried once within it.

    @param dns_config: the validated C{[dns]} table.
    @param reactor: the reactor used for sockets and timeouts (injected,
        never the global one).
    @param resolv_conf: the resolv.conf(5) file read when no servers are
        configured; re-read by twisted.names when it changes.
    """
    timeout = (dns_config.timeout,)
    if dns_config.servers:
        return client.Resolver(servers=list(dns_config.servers), reactor=reactor, timeout=timeout)
    return client.Resolver(resolv=resolv_conf, reactor=reactor, timeout=timeout)


async def lookup_mx(resolver: IResolver, name: str) -> list[tuple[int, str]]:
    """The MX records of C{name} as (preference, exchange), sorted.

    Exchanges are lower case without the trailing dot; the null MX of
    RFC 7505 appears as C{(0, "")} so the caller can recognise it.

    @return: the records, lowest preference first; C{[]} for NODATA (the
        name exists but has no MX: the caller applies the implicit MX).
    @raise DNSPermanentError: NXDOMAIN.
    @raise DNSTemporaryError: any other failure.
    """
    records = await _lookup(resolver, name, dns.MX)
    return sorted((int(r.preference), _name_text(r.name.name)) for r in records)


async def lookup_addresses(resolver: IResolver, host: str) -> list[str]:
    """The IPv4 then IPv6 addresses of C{host}.

    The A and AAAA queries run concurrently.  If one family answers with
    addresses while the other fails temporarily, the addresses found are
    returned (and the failure logged): a broken AAAA server must not stop
    delivery over IPv4, the same choice as Postfix's.

    @param host: a host name, or an IP address (returned as is, in its
        normal spelling, without a query).
    @return: addresses as strings; C{[]} when the name has neither.
    @raise DNSPermanentError: NXDOMAIN and no addresses.
    @raise DNSTemporaryError: no addresses and a look-up failed otherwise.
    """
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    results = await defer.DeferredList(
        [defer.Deferred.fromCoroutine(_lookup(resolver, host, rtype)) for rtype in (dns.A, dns.AAAA)],
        consumeErrors=True,
    )
    addresses: list[str] = []
    failures = []
    for succeeded, value in results:
        if succeeded:
            addresses.extend(_address_text(record) for record in value)
        else:
            failures.append(value)
    if addresses:
        for failure in failures:
            _log.info("partial address look-up for {host}: {error}", host=host, error=failure.getErrorMessage())
        return addresses
    for failure in failures:
        if failure.check(DNSPermanentError):
            failure.raiseException()
    for failure in failures:
        failure.raiseException()
    return []


async def lookup_txt(resolver: IResolver, name: str) -> list[bytes]:
    """The TXT records of C{name}, each one's character-strings joined
    (RFC 7208 §3.3, RFC 6376 §3.6.2.2, RFC 8461 §3.1), following CNAMEs.

    @return: the records; C{[]} when the name exists without TXT (NODATA).
    @raise DNSPermanentError: NXDOMAIN.
    @raise DNSTemporaryError: any other failure.
    """
    records = await _lookup(resolver, name, dns.TXT)
    return [b"".join(record.data) for record in records]


def reverse_pointer(ip: str) -> str:
    """The in-addr.arpa / ip6.arpa name of an address (RFC 1035 §3.5, RFC 3596 §2.5)."""
    import ipaddress

    return ipaddress.ip_address(ip).reverse_pointer


async def reverse_name(resolver: IResolver, ip: str) -> str | None:
    """The client's verified reverse name, or None.

    A PTR name counts only when it resolves forward to the same address
    (forward-confirmed reverse DNS, as Postfix's C{reverse_client_name}
    check): anyone can publish any PTR for their own addresses.  Every
    failure gives None, never an exception: a missing name is normal.
    """
    try:
        names = await _lookup(resolver, reverse_pointer(ip), dns.PTR)
    except (DNSTemporaryError, DNSPermanentError, ValueError):
        return None
    for record in names[:5]:
        name = _name_text(record.name.name)
        try:
            addresses = await lookup_addresses(resolver, name)
        except (DNSTemporaryError, DNSPermanentError):
            continue
        if ip in addresses:
            return name
    return None


async def _lookup(resolver: IResolver, name: str, rtype: int) -> list[Any]:
    """The payloads of type C{rtype} for C{name}, following CNAMEs.

    twisted.names returns the answer section as sent: an authoritative
    server puts the CNAME chain and the target's records there; a server
    that did not chase the chain leaves us to ask for the target.
    """
    method = {
        dns.A: resolver.lookupAddress,
        dns.AAAA: resolver.lookupIPV6Address,
        dns.MX: resolver.lookupMailExchange,
        dns.PTR: resolver.lookupPointer,
        dns.TXT: resolver.lookupText,
    }[rtype]
    target = _name_text(name)
    seen = {target}
    for _ in range(MAX_CNAME_CHAIN + 1):
        try:
            answers, _authority, _additional = await method(target)
        except defer.CancelledError:
            raise
        except (error.DNSNameError, error.AuthoritativeDomainError) as exc:
            raise DNSPermanentError(f"{target}: no such domain (NXDOMAIN)") from exc
        except Exception as exc:
            raise DNSTemporaryError(f"{target} {dns.QUERY_TYPES.get(rtype, rtype)}: {_describe(exc)}") from exc
        records, end = _follow(answers, target, rtype)
        if records or end == target:
            return records
        if end in seen:
            raise DNSTemporaryError(f"{name}: CNAME loop at {end}")
        seen.add(end)
        target = end
    raise DNSTemporaryError(f"{name}: CNAME chain longer than {MAX_CNAME_CHAIN}")


def _follow(answers: list[dns.RRHeader], name: str, rtype: int) -> tuple[list[Any], str]:
    """Walk the CNAMEs in C{answers} from C{name}.

    @return: the C{rtype} payloads owned by the end of the chain, and that
        end (C{name} itself when there is no CNAME).
    @raise DNSTemporaryError: on a loop inside the answer.
    """
    aliases = {}
    for rr in answers:
        if rr.type == dns.CNAME:
            aliases.setdefault(_name_text(rr.name.name), _name_text(rr.payload.name.name))
    current, seen = name, {name}
    while current in aliases:
        current = aliases[current]
        if current in seen:
            raise DNSTemporaryError(f"{name}: CNAME loop at {current}")
        seen.add(current)
    records = [rr.payload for rr in answers if rr.type == rtype and _name_text(rr.name.name) == current]
    return records, current


def _name_text(name: str | bytes) -> str:
    """A comparable domain name: text, lower case, no trailing dot."""
    if isinstance(name, bytes):
        name = name.decode("ascii", "backslashreplace")
    return name.rstrip(".").lower()


def _address_text(record: Any) -> str:
    if isinstance(record, dns.Record_AAAA):
        return socket.inet_ntop(socket.AF_INET6, record.address)
    return socket.inet_ntop(socket.AF_INET, record.address)


def _describe(exc: BaseException) -> str:
    """A short reason for logs and replies (twisted's messages are Message
    reprs)."""
    if isinstance(exc, error.DNSServerError):
        return "server failure (SERVFAIL)"
    if isinstance(exc, error.DNSQueryRefusedError):
        return "query refused (REFUSED)"
    if isinstance(exc, error.DNSFormatError):
        return "format error (FORMERR)"
    if isinstance(exc, error.DNSNotImplementedError):
        return "not implemented (NOTIMP)"
    if isinstance(exc, (defer.TimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(exc, error.DNSUnknownError):
        return "unknown DNS error"
    return f"{type(exc).__name__}: {exc}"
