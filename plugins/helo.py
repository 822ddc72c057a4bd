# -*- test-case-name: tests.test_helo,tests.e2e.test_policy_filters -*-
"""helo: refuse malformed HELO/EHLO names and clients that claim to be us.

Checks the HELO/EHLO argument, in this order:

  1. C{reject_invalid} (default on): the name must be an RFC 5321 domain
     (letters, digits and hyphens in labels of at most 63 octets, no
     all-numeric top-level label; Unicode names are accepted when they
     have an IDNA A-label form) or an address literal (C{[192.0.2.1]},
     C{[IPv6:2001:db8::1]}).  As in Postfix, one trailing dot is ignored
     and a bare address (C{192.0.2.1}) is accepted here.  Unlike Postfix,
     an underscore is invalid.  Refused with C{501 5.5.2 <name>: Helo
     command rejected: Invalid name}.
  2. C{require_fqdn} (default off): the name must be a domain with at
     least one dot, or an address literal; C{localhost}, C{MYPC} and a bare
     address are refused with C{504 5.5.2 <name>: Helo command rejected:
     need fully-qualified hostname}.
  3. C{reject_own} (default on): the name must not be ours: C{[server]
     hostname}, a name in C{own_names} (C{.example.com} covers the names
     under example.com), the address of the listener the client connected
     to (unless it listens on all addresses), or an address in
     C{own_addresses}, given as a literal or a bare address.  Refused with
     C{550 5.7.1 <name>: Helo command rejected: ...}.

Clients the relay guard trusts are never checked: sessions marked
trusted, clients in C{[server] trusted_networks}, and (with
C{delay_reject}) authenticated sessions.  They are recorded as
C{helo=skip}.

When the checks run (C{delay_reject}, as Postfix's C{smtpd_delay_reject}):
C{true} (the default) answers HELO/EHLO with 250 and refuses every RCPT
TO instead, with the same reply, so that a client which logs in after
EHLO (AUTH comes after EHLO) is exempt and the client reads the reason
where it acts on it; C{false} refuses the HELO/EHLO command itself (the
client may send another one).

Options (C{[plugins.helo]}):

  - C{reject_invalid = true}
  - C{require_fqdn = false}
  - C{reject_own = true}
  - C{own_names = []}: more names that are ours, e.g. the local domains.
  - C{own_addresses = []}: more addresses or networks that are ours
    (needed when a listener binds all addresses, or behind NAT).
  - C{delay_reject = true}

Example::

    [plugins.helo]
    require_fqdn = true
    own_names = ["example.com", ".example.com"]
    own_addresses = ["198.51.100.25", "2001:db8::25"]

Standards: RFC 5321 §4.1.1.1 (HELO/EHLO), §4.1.2 (Domain, address-literal),
§4.1.3 (address literals), §2.3.5 (fully-qualified names); RFC 3696 §2 (no
all-numeric top-level label); RFC 5890 (IDNA).
See also: Postfix reject_invalid_helo_hostname,
reject_non_fqdn_helo_hostname, check_helo_access and smtpd_delay_reject;
plugins/access.py (HELO allow and deny lists).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import alsoProvides, provider

from gateway.interfaces import IHeloCheck, IPluginFactory, IRcptCheck
from gateway.reply import Reply
from gateway.verdict import CONTINUE, Action, Verdict


@dataclass(frozen=True)
class Options:
    """C{[plugins.helo]}.

    @ivar reject_invalid: refuse a name that is neither an RFC 5321 domain
        nor an address literal (501 5.5.2).
    @ivar require_fqdn: refuse a name without a dot, or a bare address
        (504 5.5.2).
    @ivar reject_own: refuse our own names and addresses (550 5.7.1).
    @ivar own_names: more names that are ours (C{.example.com} for every
        name under it).
    @ivar own_addresses: more addresses or networks that are ours.
    @ivar delay_reject: answer at RCPT TO instead of at HELO/EHLO.
    """

    reject_invalid: bool = True
    require_fqdn: bool = False
    reject_own: bool = True
    own_names: tuple[str, ...] = ()
    own_addresses: tuple[str, ...] = ()
    delay_reject: bool = True

    def __post_init__(self) -> None:
        from gateway.address import canonical_domain

        for name in self.own_names:
            try:
                canonical_domain(name[1:] if name.startswith(".") else name)
            except ValueError as exc:
                raise ValueError(f"own_names: {name!r} is not a domain: {exc}") from None
        for address in self.own_addresses:
            try:
                ipaddress.ip_network(address, strict=False)
            except ValueError:
                raise ValueError(f"own_addresses: {address!r} is not an address or network") from None


@dataclass(frozen=True)
class HeloName:
    """A HELO argument, classified.

    @ivar kind: C{"domain"}, C{"literal"} (C{[192.0.2.1]}) or C{"address"}
        (a bare IP address).
    @ivar name: the canonical domain (A-labels, lower case, no trailing
        dot), or the address's normal text.
    @ivar address: the IP address of a literal or bare address, else None.
    """

    kind: str
    name: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None

    @property
    def is_fqdn(self) -> bool:
        """A dotted domain, or an address literal (what RFC 5321 §4.1.1.1
        asks for); a bare address is not."""
        return self.kind == "literal" or (self.kind == "domain" and "." in self.name)


def classify(argument: str) -> HeloName:
    """Parse a HELO/EHLO argument.

    @raise ValueError: when it is neither a domain nor an address literal
        nor a bare address.
    """
    from gateway.address import canonical_domain

    if argument.startswith("["):
        literal = canonical_domain(argument)
        inner = literal[1:-1]
        if inner[:5].lower() == "ipv6:":
            inner = inner[5:]
        return HeloName("literal", literal, _unmapped(ipaddress.ip_address(inner)))
    text = argument[:-1] if argument.endswith(".") else argument
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return HeloName("domain", canonical_domain(text))
    return HeloName("address", str(address), _unmapped(address))


def _unmapped(address: Any) -> Any:
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _record(results: Any, plugin: str, result: str, detail: str = "") -> None:
    """Add a result once (RCPT checks repeat for every recipient)."""
    for seen in results:
        if (seen.plugin, seen.result, seen.detail) == (plugin, result, detail):
            return
    results.add(plugin, result, detail)


def _printable(text: str, limit: int = 100) -> str:
    cleaned = "".join(c if " " <= c < "\x7f" else "?" for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[:limit - 3] + "..."


class HeloCheck:
    """The C{helo} plugin.

    L{build} declares on the object the one stage it answers in:
    L{IRcptCheck} with C{delay_reject}, else L{IHeloCheck}.
    """

    def __init__(self, options: Options, context: Any) -> None:
        from gateway.address import canonical_domain

        self.options = options
        self._name = context.name
        server = context.config.server
        self._networks = tuple(server.trusted_networks)
        names = {canonical_domain(server.hostname.rstrip("."))}
        for name in options.own_names:
            if name.startswith("."):
                names.add("." + canonical_domain(name[1:]))
            else:
                names.add(canonical_domain(name))
        self._own_names = frozenset(names)
        self._own_networks = tuple(ipaddress.ip_network(a, strict=False) for a in options.own_addresses)
        self._listener_addresses: dict[str, Any] = {}
        for listener in context.config.listeners:
            try:
                address = _unmapped(ipaddress.ip_address(listener.address))
            except ValueError:
                continue
            if not address.is_unspecified:
                self._listener_addresses[listener.name] = address

    def is_trusted(self, session: Any) -> bool:
        """The relay guard's notion: authenticated, marked trusted, or in
        C{trusted_networks}."""
        if session.auth_user is not None or session.trusted:
            return True
        address = _unmapped(session.peer_ip)
        return any(address in network for network in self._networks if network.version == address.version)

    def is_own_name(self, name: str) -> bool:
        """C{name} (canonical) is our host name or in C{own_names}."""
        from gateway.address import domain_matches

        return domain_matches(name, self._own_names)

    def is_own_address(self, address: Any, listener: str) -> bool:
        """C{address} is the listener's or in C{own_addresses}."""
        if address is None:
            return False
        if self._listener_addresses.get(listener) == address:
            return True
        return any(address in network for network in self._own_networks if network.version == address.version)

    def judge(self, argument: str, listener: str) -> tuple[str, Reply] | None:
        """The failed check and its reply for C{argument}, or None when it
        passes every enabled check."""
        shown = f"<{_printable(argument)}>: Helo command rejected"
        try:
            helo = classify(argument)
        except ValueError:
            if self.options.reject_invalid:
                return "invalid", Reply(501, "5.5.2", f"{shown}: Invalid name")
            return None
        if self.options.require_fqdn and not helo.is_fqdn:
            return "non-fqdn", Reply(504, "5.5.2", f"{shown}: need fully-qualified hostname")
        if self.options.reject_own:
            if helo.kind == "domain" and self.is_own_name(helo.name):
                return "own-name", Reply(550, "5.7.1", f"{shown}: that is my own name, not yours")
            if self.is_own_address(helo.address, listener):
                return "own-address", Reply(550, "5.7.1", f"{shown}: that is my own address, not yours")
        return None

    def _check(self, session: Any, results: Any, argument: str | None) -> Verdict:
        if self.is_trusted(session):
            _record(results, self._name, "skip", "authenticated" if session.auth_user is not None else "trusted")
            return CONTINUE
        if argument is None:
            return CONTINUE
        found = self.judge(argument, session.listener)
        if found is None:
            _record(results, self._name, "pass")
            return CONTINUE
        check, reply = found
        _record(results, self._name, "fail", check)
        return Verdict(Action.REJECT, reply)

    def check_helo(self, session: Any, name: str) -> Verdict:
        return self._check(session, session.results, name)

    def check_rcpt(self, session: Any, transaction: Any, recipient: Any) -> Verdict:
        return self._check(session, transaction.results, session.helo)


@provider(IPlugin, IPluginFactory)
class _Factory:
    name = "helo"
    options_type = Options
    description = "HELO/EHLO checks: invalid, non-FQDN, or our own name or address."

    @staticmethod
    def build(options: Options, context: Any) -> HeloCheck:
        plugin = HeloCheck(options, context)
        alsoProvides(plugin, IRcptCheck if options.delay_reject else IHeloCheck)
        return plugin


factory = _Factory
