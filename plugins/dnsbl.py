# -*- test-case-name: tests.test_dnsbl,tests.e2e.test_policy_filters -*-
"""dnsbl: refuse clients listed in DNS block lists, weighed against allow lists.

For each client the listed zones are asked, in parallel, for the A record
of the client's reversed address: C{2.0.0.127.zen.example} for
127.0.0.2, and the 32 reversed nibbles for IPv6 (C{b.a.9.8.7.6.5.0.4.0.
0.0.3.0.0.0.2.0.0.0.1.0.0.0.0.0.0.0.1.2.8.b.d.0.1.0.0.2.zone} for
2001:db8::567:89ab; RFC 5782 §2.4).  An IPv4 client on an IPv6 socket
(C{::ffff:192.0.2.1}) is looked up as IPv4.

Each entry of C{sites} is C{zone[=filter][*weight]}, as Postfix's
C{postscreen_dnsbl_sites}:

  - C{filter} selects the answers that count, one pattern per octet: a
    number, a range C{[2..11]}, or a list C{[2;4;9..11]}, e.g.
    C{zen.example=127.0.0.[2..11]}.  Without a filter, any answer in
    127.0.0.0/8 counts except 127.255.255.0/24 (the error codes some lists
    return to over-quota or open-resolver queries); answers outside
    127.0.0.0/8 never count without a filter, since they come from
    resolvers that rewrite NXDOMAIN.
  - C{weight} (default 1) is added to the client's score when the zone
    lists it with a counted answer, once per entry.  A negative weight
    makes an allow list (DNSWL): C{list.dnswl.example=127.0.[0..255].
    [2;3]*-5}.  The same zone may appear in several entries (with
    different filters and weights); it is asked once.

When the score reaches C{threshold} (default 1) the client is refused with
C{554 5.7.1 Service unavailable; client [192.0.2.1] blocked using
zen.example} (the listing zones with a positive weight).  With C{stage =
"rcpt"} (the default) every RCPT TO gets that reply, so that the client
reads the reason; the lists are asked once per connection.  With
C{stage = "connect"} the reply replaces the 220 greeting and the
connection is closed.

Lists never block mail by failing: a zone that does not answer within
C{query_timeout} seconds (or the C{[dns] timeout}, whichever comes first)
or answers with an error (SERVFAIL, REFUSED) counts as "not listed" and
is logged.  Keep C{query_timeout} below the plugin's C{timeout} (default
C{[limits] plugin_timeout}), or a slow list turns into C{451 4.4.5}.

Answers ("listed with these codes" or "not listed", never a failure) are
cached for C{cache_ttl} seconds in the shared store (C{[store]}), so that
several gateways behind one MX share them; where there is no store, in
memory.  A store that fails is logged and skipped: the lists are asked.

Clients the relay guard trusts are not looked up: sessions marked
trusted, clients in C{[server] trusted_networks} and (at RCPT)
authenticated sessions.  They are recorded as C{dnsbl=skip}.  The score
and listings are left for later plugins in C{session.notes["dnsbl"]}
(C{score}, C{listed}: [(zone, weight, codes)], C{failed}: [zone]).

Options (C{[plugins.dnsbl]}):

  - C{sites}: the lists, as above (required).
  - C{threshold = 1}: the score at which a client is refused.
  - C{stage = "rcpt"}: C{"rcpt"} or C{"connect"}.
  - C{query_timeout = 5.0}: seconds per zone.
  - C{cache_ttl = 300.0}: seconds an answer is reused; 0 turns the cache off.
  - C{cache_size = 100000}: entries in the in-memory cache (when no store).

Example::

    [plugins.dnsbl]
    sites = ["zen.spamhaus.org=127.0.0.[2..11]*3",
             "bl.spamcop.net*2",
             "b.barracudacentral.org=127.0.0.2*2",
             "list.dnswl.org=127.0.[0..255].[2;3]*-5"]
    threshold = 3
    query_timeout = 3

Beware that a public list may refuse queries sent through a large public
resolver (C{[dns] servers}); and that a zone name carrying an access key
appears in the reply text.

Standards: RFC 5782 (DNS blacklists and whitelists) §2.1, §2.3, §2.4, §5;
RFC 3463 (5.7.1).
See also: Postfix postscreen_dnsbl_sites, postscreen_dnsbl_threshold,
reject_rbl_client; plugins/access.py (static client lists).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import alsoProvides, provider

from gateway.interfaces import IConnectCheck, IPluginFactory, IRcptCheck
from gateway.reply import Reply
from gateway.verdict import CONTINUE, Action, Verdict

#: Where the plugin can refuse.
STAGES = ("rcpt", "connect")

_SITE = re.compile(r"^(?P<zone>[^=*\s]+)(?:=(?P<filter>[^*\s]+))?(?:\*(?P<weight>[+-]?\d+))?$")
_OCTET = r"(?:\d{1,3}|\[[0-9.;]+\])"
_FILTER = re.compile(rf"^({_OCTET})\.({_OCTET})\.({_OCTET})\.({_OCTET})$")


def _octet_values(text: str) -> frozenset[int]:
    """The values an octet pattern (C{7}, C{[2..11]}, C{[2;4;9..11]}) allows.

    @raise ValueError: for a malformed pattern or a value above 255.
    """
    items = text[1:-1].split(";") if text.startswith("[") else [text]
    values: set[int] = set()
    for item in items:
        low, dots, high = item.partition("..")
        if not low.isdigit() or (dots and not high.isdigit()) or (not dots and high):
            raise ValueError(f"bad octet pattern {text!r}")
        first, last = int(low), int(high) if dots else int(low)
        if last > 255 or first > last:
            raise ValueError(f"bad octet range {item!r}")
        values.update(range(first, last + 1))
    return frozenset(values)


@dataclass(frozen=True)
class Site:
    """One C{zone[=filter][*weight]} entry.

    @ivar zone: the zone, lower case, without a trailing dot.
    @ivar filter: the allowed values of each answer octet, or None.
    @ivar weight: added to the score when the zone lists the client.
    @ivar text: the entry as written.
    """

    zone: str
    filter: tuple[frozenset[int], ...] | None
    weight: int
    text: str

    def counts(self, answer: str) -> bool:
        """True when the answer address C{answer} is one this entry counts."""
        try:
            address = ipaddress.IPv4Address(answer)
        except ValueError:
            return False
        if self.filter is None:
            return address in _LOOPBACK and address not in _ERROR_CODES
        return all(octet in allowed for octet, allowed in zip(address.packed, self.filter))


_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
_ERROR_CODES = ipaddress.IPv4Network("127.255.255.0/24")


def parse_site(text: str) -> Site:
    """Parse C{zone[=filter][*weight]}.

    @raise ValueError: naming what is wrong.
    """
    from gateway.address import canonical_domain

    match = _SITE.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r}: expected zone[=filter][*weight]")
    zone = match["zone"].rstrip(".")
    try:
        zone = canonical_domain(zone)
    except ValueError as exc:
        raise ValueError(f"{text!r}: bad zone: {exc}") from None
    if zone.startswith("["):
        raise ValueError(f"{text!r}: a zone is a domain name")
    octets = None
    if match["filter"] is not None:
        parts = _FILTER.match(match["filter"])
        if parts is None:
            raise ValueError(f"{text!r}: a filter has four octet patterns, e.g. 127.0.0.[2..11]")
        try:
            octets = tuple(_octet_values(part) for part in parts.groups())
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
    weight = int(match["weight"]) if match["weight"] is not None else 1
    return Site(zone, octets, weight, text.strip())


def query_name(ip: str, zone: str) -> str:
    """The name to look up for C{ip} in C{zone} (RFC 5782 §2.1, §2.4)."""
    address = ipaddress.ip_address(ip)
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    reverse = address.reverse_pointer
    suffix = ".in-addr.arpa" if address.version == 4 else ".ip6.arpa"
    return f"{reverse[:-len(suffix)]}.{zone}"


@dataclass(frozen=True)
class Options:
    """C{[plugins.dnsbl]}.

    @ivar sites: C{zone[=filter][*weight]} entries.
    @ivar threshold: the score that refuses a client.
    @ivar stage: C{"rcpt"} or C{"connect"}.
    @ivar query_timeout: seconds a zone has to answer.
    @ivar cache_ttl: seconds an answer is reused (0: no cache).
    @ivar cache_size: entries of the in-memory cache used without a store.
    """

    sites: tuple[str, ...] = ()
    threshold: int = 1
    stage: str = "rcpt"
    query_timeout: float = 5.0
    cache_ttl: float = 300.0
    cache_size: int = 100000

    def __post_init__(self) -> None:
        if not self.sites:
            raise ValueError("sites must name at least one list, e.g. \"zen.example=127.0.0.[2..11]*3\"")
        for text in self.sites:
            try:
                parse_site(text)
            except ValueError as exc:
                raise ValueError(f"sites: {exc}") from None
        if self.threshold < 1:
            raise ValueError(f"threshold must be at least 1 (0 would refuse every client); got {self.threshold!r}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be \"rcpt\" or \"connect\"; got {self.stage!r}")
        if self.query_timeout <= 0:
            raise ValueError(f"query_timeout must be positive; got {self.query_timeout!r}")
        if self.cache_ttl < 0:
            raise ValueError(f"cache_ttl must not be negative; got {self.cache_ttl!r}")
        if self.cache_size < 1:
            raise ValueError(f"cache_size must be at least 1; got {self.cache_size!r}")


@dataclass(frozen=True)
class Score:
    """What the lists said about one client.

    @ivar score: the sum of the weights of the entries that count.
    @ivar listed: (zone, weight, answer codes) per counting entry.
    @ivar failed: zones that timed out or failed (counted as not listed).
    """

    score: int
    listed: tuple[tuple[str, int, tuple[str, ...]], ...]
    failed: tuple[str, ...]


class _NotListed(Exception):
    """The zone has no A record for the name (NXDOMAIN or NODATA)."""


class DNSBLCheck:
    """The C{dnsbl} plugin.  L{build} declares the one stage it answers in
    on the object: L{IRcptCheck} or L{IConnectCheck}."""

    log = Logger()

    def __init__(self, options: Options, context: Any) -> None:
        self.options = options
        self.sites = tuple(parse_site(text) for text in options.sites)
        self.zones = tuple(dict.fromkeys(site.zone for site in self.sites))
        self._name = context.name
        self._clock = context.clock
        self._resolver = context.resolver
        self._networks = tuple(context.config.server.trusted_networks)
        self._timeout = options.query_timeout
        store = getattr(context, "store", None)
        if store is None and options.cache_ttl > 0:
            from gateway.store import MemoryStore

            store = MemoryStore(context.clock, max_keys=options.cache_size)
        self._store = store if options.cache_ttl > 0 else None
        self._warn_about_timeouts(context)

    def _warn_about_timeouts(self, context: Any) -> None:
        from gateway.config import parse_duration

        table = context.config.plugin_tables.get(self._name, {})
        try:
            plugin_timeout = parse_duration(table["timeout"]) if "timeout" in table else None
        except ValueError:
            plugin_timeout = None
        if plugin_timeout is None:
            plugin_timeout = context.config.limits.plugin_timeout
        if self._timeout >= plugin_timeout:
            self.log.warn("dnsbl query_timeout {query_timeout}s is not below the plugin timeout {timeout}s: "
                          "a slow list will give 451 instead of counting as not listed",
                          query_timeout=self._timeout, timeout=plugin_timeout)

    # -- trust ---------------------------------------------------------------

    def is_trusted(self, session: Any) -> bool:
        """The relay guard's notion: authenticated, marked trusted, or in
        C{trusted_networks}."""
        if session.auth_user is not None or session.trusted:
            return True
        address = session.peer_ip
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks if network.version == address.version)

    # -- look-ups -------------------------------------------------------------

    async def score(self, ip: str) -> Score:
        """Ask every zone about C{ip} in parallel and add up the weights.

        Never raises for a list's failure: it is counted as not listed and
        logged.
        """
        from twisted.internet import defer

        lookups = [defer.Deferred.fromCoroutine(self._answers(zone, query_name(ip, zone)))
                   .addTimeout(self._timeout, self._clock) for zone in self.zones]
        outcomes = await defer.DeferredList(lookups, consumeErrors=True)
        answers: dict[str, tuple[str, ...]] = {}
        failed = []
        for zone, (ok, value) in zip(self.zones, outcomes):
            if ok:
                answers[zone] = value
                continue
            failed.append(zone)
            reason = "timed out" if value.check(defer.TimeoutError, TimeoutError) else value.getErrorMessage()
            self.log.warn("dnsbl {zone} failed for {client} ({reason}); counted as not listed",
                          zone=zone, client=ip, reason=reason)
        listed = []
        total = 0
        for site in self.sites:
            codes = tuple(code for code in answers.get(site.zone, ()) if site.counts(code))
            if codes:
                listed.append((site.zone, site.weight, codes))
                total += site.weight
        return Score(total, tuple(listed), tuple(failed))

    async def _answers(self, zone: str, name: str) -> tuple[str, ...]:
        """The A records of C{name}, () when there are none; through the cache."""
        key = f"dnsbl:{name}"
        cached = await self._cache_get(key)
        if cached is not None:
            return tuple(cached.decode("ascii").split()) if cached else ()
        if self._resolver is None:
            raise RuntimeError("no DNS resolver configured")
        try:
            found = await self._lookup(name)
        except _NotListed:
            found = ()
        self._cache_set(key, " ".join(found).encode("ascii"))
        return found

    async def _lookup(self, name: str) -> tuple[str, ...]:
        import socket

        from twisted.names import dns, error

        try:
            answers, _authority, _additional = await self._resolver.lookupAddress(name)
        except (error.DNSNameError, error.AuthoritativeDomainError):
            raise _NotListed() from None
        found = tuple(socket.inet_ntop(socket.AF_INET, rr.payload.address)
                      for rr in answers if rr.type == dns.A)
        if not found:
            raise _NotListed()
        return found

    async def _cache_get(self, key: str) -> bytes | None:
        if self._store is None:
            return None
        try:
            value = await self._store.get(key)
        except Exception as exc:  # a store error must not stop the look-up
            self.log.warn("dnsbl cache read failed: {reason}", reason=str(exc))
            return None
        return bytes(value) if value is not None else None

    def _cache_set(self, key: str, value: bytes) -> None:
        if self._store is None:
            return
        try:
            d = self._store.set(key, value, self.options.cache_ttl)
        except Exception as exc:
            self.log.warn("dnsbl cache write failed: {reason}", reason=str(exc))
            return
        d.addErrback(lambda failure: self.log.warn("dnsbl cache write failed: {reason}",
                                                   reason=failure.getErrorMessage()))

    # -- verdicts ---------------------------------------------------------------

    def verdict(self, ip: str, score: Score) -> Verdict:
        """Refuse when C{score} reaches the threshold."""
        if score.score < self.options.threshold:
            return CONTINUE
        zones = list(dict.fromkeys(zone for zone, weight, _ in score.listed if weight > 0))
        text = f"Service unavailable; client [{ip}] blocked using {', '.join(zones) or 'DNSBL'}"
        return Verdict(Action.REJECT, Reply(554, "5.7.1", text))

    def _judged(self, session: Any, results: Any) -> Any:
        """The session's score (computed once), then the verdict."""
        notes = session.notes[self._name]
        if "score" in notes:
            return self._conclude(session, results, notes["result"])
        from twisted.internet import defer

        d = defer.Deferred.fromCoroutine(self.score(session.peer))
        d.addCallback(self._remember, session)
        d.addCallback(lambda score: self._conclude(session, results, score))
        return d

    def _remember(self, score: Score, session: Any) -> Score:
        notes = session.notes[self._name]
        notes.update({"score": score.score, "listed": list(score.listed), "failed": list(score.failed),
                      "result": score})
        return score

    def _conclude(self, session: Any, results: Any, score: Score) -> Verdict:
        verdict = self.verdict(session.peer, score)
        result = "listed" if verdict.is_final else "pass"
        detail = f"score={score.score}"
        if score.listed:
            detail += " " + ",".join(f"{zone}{weight:+d}" for zone, weight, _ in score.listed)
        if score.failed:
            detail += " failed=" + ",".join(score.failed)
        if not any(r.plugin == self._name for r in results):
            results.add(self._name, result, detail)
        return verdict

    def _skip(self, session: Any, results: Any) -> Verdict:
        if not any(r.plugin == self._name for r in results):
            results.add(self._name, "skip", "authenticated" if session.auth_user is not None else "trusted")
        return CONTINUE

    def check_connect(self, session: Any) -> Any:
        if self.is_trusted(session):
            return self._skip(session, session.results)
        return self._judged(session, session.results)

    def check_rcpt(self, session: Any, transaction: Any, recipient: Any) -> Any:
        if self.is_trusted(session):
            return self._skip(session, transaction.results)
        return self._judged(session, transaction.results)


@provider(IPlugin, IPluginFactory)
class _Factory:
    name = "dnsbl"
    options_type = Options
    description = "DNS block and allow lists (RFC 5782) with weights and a threshold."

    @staticmethod
    def build(options: Options, context: Any) -> DNSBLCheck:
        plugin = DNSBLCheck(options, context)
        alsoProvides(plugin, IConnectCheck if options.stage == "connect" else IRcptCheck)
        return plugin


factory = _Factory
