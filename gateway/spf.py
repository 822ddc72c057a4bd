# -*- test-case-name: tests.test_spf,tests.test_spf_suite -*-
"""SPF: the RFC 7208 check_host() function on twisted.names.

Why it is written here rather than taken from a library: the SPF libraries
for Python query DNS synchronously, and a blocked reactor stops every SMTP
session at once.  Here every DNS question goes through an injected
C{IResolver} (C{twisted.names.client.Resolver} in the gateway), each one
bounded by the resolver's own timeout, so an evaluation is a chain of
Deferreds and never blocks.

The module has a pure half and an I/O half:

  - L{parse_record} (terms, qualifiers, CIDR lengths, modifiers) and
    L{parse_macro_string} / L{expand_macros} (RFC 7208 §7) touch no
    network and raise L{SPFSyntaxError} on anything the ABNF does not
    allow.  A syntax error anywhere in a record is a C{permerror} before
    any mechanism is tried (§4.6).
  - L{check_host} fetches the record, evaluates its mechanisms in order,
    follows C{include:} and C{redirect=}, enforces the processing limits
    and, for C{fail}, builds the explanation (C{exp=}).

Limits (§4.6.4): at most 10 terms that query DNS (C{a}, C{mx}, C{ptr},
C{include}, C{exists}, C{redirect}) per evaluation, including nested ones;
at most 2 "void" look-ups (NXDOMAIN or an empty answer) for them; an
C{mx} with more than 10 exchanges is a C{permerror}; only the first 10
names of a PTR answer are validated.  DNS errors other than NXDOMAIN, and
timeouts, give C{temperror} (§5), except where the RFC says a mechanism
simply does not match (C{ptr}, §5.5) or the explanation is dropped
(C{exp=}, §6.2).  An overall time limit is the caller's: cancelling the
Deferred of L{check_host} cancels the DNS query in flight.

Deliberate choices where RFC 7208 leaves room:

  - a target name that expands to something that cannot be a DNS name
    (an empty label, a label over 63 octets) does not match, as a
    non-existent name would (the "undefined" case of §4.8 and §5);
  - SPF (type 99) records are never asked for (§3.1, §4.4: TXT only);
  - the C{%{p}} macro's PTR and address look-ups are not counted against
    the 10-term limit, but the PTR answer is cut at 10 names like C{ptr}.

Standards: RFC 7208 (SPF), in particular §2.3 (HELO identity), §4
(check_host), §4.6.4 (limits), §5 (mechanisms), §6 (modifiers), §7
(macros), §8 (results); RFC 1035 §2.3.4 (name and label lengths); RFC 5952
(the text form of IPv6 addresses for C{%{c}}).
See also: plugins/spf.py (the SMTP side); tests/test_spf_suite.py (the
openspf.org RFC 7208 test suite, run against a real test DNS server);
gateway.dns (the resolver).
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass, replace
from typing import Any, Iterable
from urllib.parse import quote

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.names import dns, error

__all__ = [
    "RESULTS", "DEFAULT_EXPLANATION", "MAX_DNS_TERMS", "MAX_VOID_LOOKUPS",
    "SPFResult", "SPFSyntaxError", "Macro", "MacroValues", "Mechanism", "Record",
    "check_host", "parse_record", "parse_macro_string", "parse_domain_spec",
    "expand_macros", "is_spf_record", "truncate_domain",
]

#: Every result check_host() may give (RFC 7208 §2.6).
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

#: Used for C{fail} when the record has no usable C{exp=}; a macro-string
#: in the explain-string syntax (RFC 7208 §6.2), so C{c}, C{r}, C{t} work.
DEFAULT_EXPLANATION = "%{o} does not designate %{c} as a permitted sender"

#: Terms that query DNS, per evaluation (RFC 7208 §4.6.4).
MAX_DNS_TERMS = 10
#: Look-ups answering NXDOMAIN or nothing, per evaluation (RFC 7208 §4.6.4).
MAX_VOID_LOOKUPS = 2
#: Exchanges an C{mx} may name before it is a permerror (RFC 7208 §4.6.4).
MAX_MX_NAMES = 10
#: PTR names validated by C{ptr} and C{%{p}}; the rest are ignored.
MAX_PTR_NAMES = 10
#: The longest domain name queried, in octets without the final dot (RFC 7208 §7.3).
MAX_NAME_LENGTH = 253
#: The longest label (RFC 1035 §2.3.4).
MAX_LABEL_LENGTH = 63
#: CNAME links followed when a server did not chase them itself.
MAX_CNAME_CHAIN = 8

_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MECHANISMS = frozenset({"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"})
_DNS_MECHANISMS = frozenset({"include", "a", "mx", "ptr", "exists"})
_DOMAIN_LETTERS = frozenset("slodiphv")
_EXPLANATION_LETTERS = _DOMAIN_LETTERS | frozenset("crt")

_MACRO = re.compile(r"%\{([A-Za-z])([0-9]*)([rR]?)([.\-+,/_=]*)\}")
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.\-]*)=(.*)\Z", re.S)
_MECHANISM = re.compile(r"([+\-~?]?)([A-Za-z][A-Za-z0-9]*)(.*)\Z", re.S)
_DUAL_CIDR = re.compile(r"(?:/(0|[1-9][0-9]*))?(?://(0|[1-9][0-9]*))?\Z")
_IP4_NETWORK = re.compile(r"((?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                          r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9]))(?:/(0|[1-9][0-9]*))?\Z")
_CIDR = re.compile(r"0|[1-9][0-9]*")
_TOPLABEL = re.compile(r"[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9\-]*[A-Za-z0-9]")
_VERSION = re.compile(rb"v=spf1(?: |\Z)", re.I)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class SPFSyntaxError(ValueError):
    """A record, domain-spec or macro-string breaks the RFC 7208 ABNF.

    In a record this is a C{permerror} (§4.6); in an explanation text it
    only means that the explanation is not used (§6.2).
    """


class _PermanentError(Exception):
    """Ends the evaluation with C{permerror} (limits, include of nothing)."""


class _TemporaryError(Exception):
    """Ends the evaluation with C{temperror} (timeout, SERVFAIL, ...)."""


# -- Results -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SPFResult:
    """What L{check_host} decided.

    @ivar result: one of L{RESULTS}.
    @ivar explanation: for C{fail} only: the domain's C{exp=} text, or the
        default explanation; None otherwise.
    @ivar mechanism: the term that decided, as written in the record
        (C{"-all"}, C{"ip4:192.0.2.0/24"}, C{"include:_spf.example.com"});
        None when no mechanism matched (the default C{neutral}) or nothing
        was evaluated.
    @ivar domain: the domain whose policy was checked (the argument).
    @ivar detail: why, for C{none}, C{temperror} and C{permerror}: a short
        text for logs and the C{Received-SPF} comment.
    """

    result: str
    explanation: str | None = None
    mechanism: str | None = None
    domain: str = ""
    detail: str = ""

    def __post_init__(self) -> None:
        if self.result not in RESULTS:
            raise ValueError(f"not an SPF result: {self.result!r}")


# -- Macros (RFC 7208 §7) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Macro:
    """One C{%{...}} macro-expand.

    @ivar letter: the macro letter, lower case (C{"s"}, C{"l"}, ...).
    @ivar digits: keep only this many right-hand parts; None for all.
    @ivar reverse: the C{r} transformer.
    @ivar delimiters: the characters to split on (C{"."} when none given).
    @ivar escape: the letter was upper case: URL-escape the value (§7.3).
    """

    letter: str
    digits: int | None = None
    reverse: bool = False
    delimiters: str = "."
    escape: bool = False


MacroString = tuple["str | Macro", ...]


@dataclass(frozen=True, slots=True)
class MacroValues:
    """The values macros expand to, for one check_host() call.

    @ivar sender: the <sender> identity, C{local@domain} (§4.3: the local
        part is C{postmaster} when there is none).
    @ivar domain: the current <domain> (changes with include and redirect).
    @ivar ip: the client address (an IPv4-mapped IPv6 address already
        turned into IPv4, §5).
    @ivar helo: the HELO/EHLO argument.
    @ivar validated_name: C{%{p}}: a validated reverse name of C{ip}, or
        C{"unknown"}.
    @ivar receiver: C{%{r}}: the checking host's name.
    @ivar timestamp: C{%{t}}: seconds since the epoch.
    """

    sender: str
    domain: str
    ip: IPAddress
    helo: str = ""
    validated_name: str = "unknown"
    receiver: str = "unknown"
    timestamp: int = 0

    def value(self, letter: str) -> str:
        """The unsplit value of macro C{letter} (lower case)."""
        if letter == "s":
            return self.sender
        if letter == "l":
            return self.sender.rpartition("@")[0] or "postmaster"
        if letter == "o":
            return self.sender.rpartition("@")[2]
        if letter == "d":
            return self.domain
        if letter == "i":
            if self.ip.version == 4:
                return str(self.ip)
            return ".".join(format(int(self.ip), "032X"))
        if letter == "p":
            return self.validated_name
        if letter == "v":
            return "in-addr" if self.ip.version == 4 else "ip6"
        if letter == "h":
            return self.helo
        if letter == "c":
            return str(self.ip)
        if letter == "r":
            return self.receiver
        if letter == "t":
            return str(self.timestamp)
        raise KeyError(letter)


def _scan(text: str, explanation: bool) -> tuple[MacroString, str]:
    """Tokenise a macro-string.

    @return: the tokens (literal text and L{Macro}s) and the literal text
        after the last macro-expand (C{""} when the string ends with one),
        which L{parse_domain_spec} checks for the C{domain-end} rule.
    """
    letters = _EXPLANATION_LETTERS if explanation else _DOMAIN_LETTERS
    tokens: list[str | Macro] = []
    literal: list[str] = []
    tail: list[str] = []
    index, length = 0, len(text)
    while index < length:
        char = text[index]
        if char == "%":
            follower = text[index + 1:index + 2]
            escapes = {"%": "%", "_": " ", "-": "%20"}
            if follower in escapes:
                literal.append(escapes[follower])
                tail = []
                index += 2
                continue
            match = _MACRO.match(text, index) if follower == "{" else None
            if match is None:
                raise SPFSyntaxError(f"'%' must start a macro, '%%', '%_' or '%-': {text[index:index + 8]!r}")
            letter, digits, reverse, delimiters = match.groups()
            if letter.lower() not in letters:
                where = "an explanation" if explanation else "a domain-spec"
                raise SPFSyntaxError(f"macro letter {letter!r} is not allowed in {where}")
            if digits and int(digits) == 0:
                raise SPFSyntaxError("a macro's digit transformer must not be zero")
            if literal:
                tokens.append("".join(literal))
                literal = []
            tokens.append(Macro(letter.lower(), int(digits) if digits else None, bool(reverse),
                                delimiters or ".", letter.isupper()))
            tail = []
            index = match.end()
            continue
        if "\x21" <= char <= "\x7e" or (explanation and char == " "):
            literal.append(char)
            tail.append(char)
            index += 1
            continue
        raise SPFSyntaxError(f"character {char!r} is not allowed in a macro-string")
    if literal:
        tokens.append("".join(literal))
    return tuple(tokens), "".join(tail)


def parse_macro_string(text: str, *, explanation: bool = False) -> MacroString:
    """Parse a macro-string (RFC 7208 §7.1) into literal text and L{Macro}s.

    C{%%}, C{%_} and C{%-} become the literal text C{%}, a space and
    C{%20}.

    @param explanation: parse an explain-string: spaces and the letters
        C{c}, C{r} and C{t} are allowed.
    @raise SPFSyntaxError: a lone C{%}, an unknown or misplaced macro
        letter, a zero digit transformer, a character outside %x21-7E.
    """
    return _scan(text, explanation)[0]


def parse_domain_spec(text: str) -> MacroString:
    """Parse a domain-spec: a macro-string that ends in a macro-expand or
    in C{"." toplabel [ "." ]} (RFC 7208 §7.1).

    The end is checked before expansion, on the text as written (a HELO
    name expanded by C{%{h}} is never syntax checked).

    @raise SPFSyntaxError: empty, not a macro-string, or a bad ending
        (C{museum}, C{example.-com}, C{1.2.3.4}, C{example.com:8080}).
    """
    if not text:
        raise SPFSyntaxError("empty domain-spec")
    tokens, tail = _scan(text, False)
    if tail:
        end = tail[:-1] if tail.endswith(".") else tail
        _, dot, toplabel = end.rpartition(".")
        if not dot or _TOPLABEL.fullmatch(toplabel) is None:
            raise SPFSyntaxError(f"domain-spec {text!r} does not end in a macro or a valid top label")
    return tokens


def expand_macros(tokens: Iterable[str | Macro], values: MacroValues) -> str:
    """Expand parsed macros (RFC 7208 §7.3).

    Each value is split on the macro's delimiters, reversed with C{r},
    cut to its right-hand C{digits} parts, joined with dots, and
    URL-escaped when the letter was upper case.
    """
    out = []
    for token in tokens:
        if isinstance(token, str):
            out.append(token)
            continue
        value = values.value(token.letter)
        parts = re.split("[" + re.escape(token.delimiters) + "]", value)
        if token.reverse:
            parts.reverse()
        if token.digits is not None:
            parts = parts[-token.digits:]
        text = ".".join(parts)
        out.append(quote(text, safe="") if token.escape else text)
    return "".join(out)


def truncate_domain(name: str) -> str:
    """Drop a final dot, then whole labels from the left until the name
    is at most 253 characters (RFC 7208 §7.3)."""
    if name.endswith("."):
        name = name[:-1]
    while len(name) > MAX_NAME_LENGTH and "." in name:
        name = name.split(".", 1)[1]
    return name


# -- Records (RFC 7208 §4.5, §4.6, §5, §6) ------------------------------------------


@dataclass(frozen=True, slots=True)
class Mechanism:
    """One mechanism of a record.

    @ivar qualifier: C{"+"}, C{"-"}, C{"~"} or C{"?"}.
    @ivar name: C{all}, C{include}, C{a}, C{mx}, C{ptr}, C{ip4}, C{ip6}
        or C{exists} (lower case).
    @ivar target: the parsed domain-spec, or None for the current domain.
    @ivar network: for C{ip4}/C{ip6}, the network (host bits allowed).
    @ivar cidr4: for C{a}/C{mx}, the IPv4 prefix length (32 if not given).
    @ivar cidr6: for C{a}/C{mx}, the IPv6 prefix length (128 if not given).
    @ivar text: the term as written, for results and headers.
    """

    qualifier: str
    name: str
    target: MacroString | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    cidr4: int = 32
    cidr6: int = 128
    text: str = ""

    @property
    def result(self) -> str:
        """The result this mechanism gives when it matches."""
        return _QUALIFIERS[self.qualifier]


@dataclass(frozen=True, slots=True)
class Record:
    """A parsed SPF record.

    @ivar mechanisms: in record order.
    @ivar redirect: the C{redirect=} domain-spec, or None.
    @ivar explanation: the C{exp=} domain-spec, or None.
    @ivar modifiers: unknown modifiers as (name, value); ignored (§6).
    """

    mechanisms: tuple[Mechanism, ...] = ()
    redirect: MacroString | None = None
    explanation: MacroString | None = None
    modifiers: tuple[tuple[str, str], ...] = ()


def is_spf_record(text: bytes | str) -> bool:
    """True when a TXT record's joined strings start with C{v=spf1} and a
    space or the end (case-insensitively, RFC 7208 §4.5)."""
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogateescape")
    return _VERSION.match(text) is not None


def _cidr(text: str | None, maximum: int, default: int) -> int:
    if text is None:
        return default
    value = int(text)
    if value > maximum:
        raise SPFSyntaxError(f"prefix length /{value} is longer than {maximum}")
    return value


def _parse_mechanism(term: str) -> Mechanism:
    match = _MECHANISM.match(term)
    if match is None:
        raise SPFSyntaxError(f"unknown term {term!r}")
    qualifier, name, rest = match.groups()
    name = name.lower()
    qualifier = qualifier or "+"
    if name not in _MECHANISMS:
        raise SPFSyntaxError(f"unknown mechanism {name!r} in {term!r}")
    if name == "all":
        if rest:
            raise SPFSyntaxError(f"'all' takes no argument: {term!r}")
        return Mechanism(qualifier, name, text=term)
    if name in ("include", "exists"):
        if not rest.startswith(":"):
            raise SPFSyntaxError(f"{name!r} needs ':' and a domain: {term!r}")
        return Mechanism(qualifier, name, parse_domain_spec(rest[1:]), text=term)
    if name == "ptr":
        if rest and not rest.startswith(":"):
            raise SPFSyntaxError(f"bad 'ptr' argument: {term!r}")
        target = parse_domain_spec(rest[1:]) if rest else None
        return Mechanism(qualifier, name, target, text=term)
    if name in ("a", "mx"):
        cidr = _DUAL_CIDR.search(rest)
        assert cidr is not None  # the pattern always matches at the end
        spec = rest[:cidr.start()]
        if spec and not spec.startswith(":"):
            raise SPFSyntaxError(f"bad {name!r} argument: {term!r}")
        target = parse_domain_spec(spec[1:]) if spec else None
        return Mechanism(qualifier, name, target, cidr4=_cidr(cidr.group(1), 32, 32),
                         cidr6=_cidr(cidr.group(2), 128, 128), text=term)
    if not rest.startswith(":"):
        raise SPFSyntaxError(f"{name!r} needs ':' and a network: {term!r}")
    if name == "ip4":
        network = _IP4_NETWORK.match(rest, 1)
        if network is None:
            raise SPFSyntaxError(f"bad ip4 network: {term!r}")
        prefix = _cidr(network.group(2), 32, 32)
        return Mechanism(qualifier, name, network=ipaddress.IPv4Network((network.group(1), prefix), strict=False),
                         text=term)
    address, slash, prefix_text = rest[1:].partition("/")
    if slash and _CIDR.fullmatch(prefix_text) is None:
        raise SPFSyntaxError(f"bad ip6 prefix length: {term!r}")
    if "%" in address or not address.isascii():
        raise SPFSyntaxError(f"bad ip6 network: {term!r}")
    try:
        ip6 = ipaddress.IPv6Address(address)
    except ValueError:
        raise SPFSyntaxError(f"bad ip6 network: {term!r}") from None
    prefix = _cidr(prefix_text if slash else None, 128, 128)
    return Mechanism(qualifier, name, network=ipaddress.IPv6Network((ip6, prefix), strict=False), text=term)


def parse_record(text: str) -> Record:
    """Parse an SPF record (RFC 7208 §4.6, §5, §6, §7.1).

    Terms are separated by one or more spaces (and nothing else); names of
    mechanisms and modifiers are case-insensitive.  C{redirect=} and
    C{exp=} may each appear once; unknown modifiers must still be valid
    (a name, C{=}, a macro-string) and are then ignored.

    @param text: the record, starting with C{v=spf1}.
    @raise SPFSyntaxError: on any syntax error anywhere in the record.
    """
    if not is_spf_record(text):
        raise SPFSyntaxError("not an SPF record (no 'v=spf1')")
    mechanisms: list[Mechanism] = []
    redirect = explanation = None
    modifiers: list[tuple[str, str]] = []
    seen: set[str] = set()
    for term in text[len("v=spf1"):].split(" "):
        if not term:
            continue
        modifier = _MODIFIER.match(term)
        if modifier is None:
            mechanisms.append(_parse_mechanism(term))
            continue
        name, value = modifier.group(1).lower(), modifier.group(2)
        if name in ("redirect", "exp"):
            if name in seen:
                raise SPFSyntaxError(f"{name}= appears more than once")
            seen.add(name)
            if name == "redirect":
                redirect = parse_domain_spec(value)
            else:
                explanation = parse_domain_spec(value)
        else:
            parse_macro_string(value)
            modifiers.append((modifier.group(1), value))
    return Record(tuple(mechanisms), redirect, explanation, tuple(modifiers))


# -- Evaluation (RFC 7208 §4, §5) ----------------------------------------------------


def _client_address(ip: str | IPAddress) -> IPAddress:
    """The client address; IPv4-mapped IPv6 is IPv4 (RFC 7208 §5)."""
    address = ip if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else ipaddress.ip_address(ip)
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _wire_name(name: str) -> bytes | None:
    """The name as query bytes, or None when it cannot be a DNS name
    (an empty or too long label, too long, not encodable)."""
    if name.endswith("."):
        name = name[:-1]
    try:
        wire = name.encode("ascii")
    except UnicodeEncodeError:
        try:
            wire = name.encode("idna")
        except UnicodeError:
            return None
    if not wire or len(wire) > MAX_NAME_LENGTH:
        return None
    if any(not label or len(label) > MAX_LABEL_LENGTH for label in wire.split(b".")):
        return None
    return wire


def _valid_identity_domain(domain: str) -> bool:
    """RFC 7208 §4.3: a multi-label domain name, not an address literal."""
    if not domain or domain.startswith("[") or _wire_name(domain) is None:
        return False
    try:
        ipaddress.ip_address(domain)
        return False
    except ValueError:
        pass
    return len(domain.rstrip(".").split(".")) >= 2


def _text(name: bytes | str) -> str:
    """A comparable domain name: text, lower case, no final dot."""
    if isinstance(name, bytes):
        name = name.decode("ascii", "backslashreplace")
    return name.rstrip(".").lower()


def _in_network(ip: IPAddress, address: IPAddress, prefix: int) -> bool:
    if ip.version != address.version:
        return False
    shift = ip.max_prefixlen - prefix
    return int(ip) >> shift == int(address) >> shift


def _describe(exc: BaseException) -> str:
    if isinstance(exc, error.DNSServerError):
        return "server failure (SERVFAIL)"
    if isinstance(exc, error.DNSQueryRefusedError):
        return "query refused (REFUSED)"
    if isinstance(exc, (defer.TimeoutError, TimeoutError, error.DNSQueryTimeoutError)):
        return "DNS timeout"
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True, slots=True)
class _Outcome:
    """A record's result, with what the explanation needs."""

    result: str
    mechanism: str | None
    domain: str
    record: Record | None
    detail: str = ""


class _Evaluation:
    """One check_host() call: its identity, its counters, its DNS."""

    def __init__(self, ip: IPAddress, sender: str, helo: str, resolver: IResolver,
                 receiver: str, timestamp: int) -> None:
        self.ip = ip
        self.resolver = resolver
        self.values = MacroValues(sender=sender, domain="", ip=ip, helo=helo,
                                  receiver=receiver, timestamp=timestamp)
        self.dns_terms = 0
        self.void_lookups = 0
        self._ptr: tuple[list[str], bool] | None = None
        self._validated: list[str] | None = None

    # DNS

    async def query(self, name: str, rtype: int) -> list[Any] | None:
        """The payloads of type C{rtype} for C{name} (CNAMEs followed);
        C{[]} for NODATA, None for NXDOMAIN or a name that cannot exist.

        @raise _TemporaryError: timeout, SERVFAIL, any other failure.
        """
        method = {
            dns.A: self.resolver.lookupAddress,
            dns.AAAA: self.resolver.lookupIPV6Address,
            dns.MX: self.resolver.lookupMailExchange,
            dns.TXT: self.resolver.lookupText,
            dns.PTR: self.resolver.lookupPointer,
        }[rtype]
        wire = _wire_name(name)
        if wire is None:
            return None
        target, seen = wire, {_text(wire)}
        for _ in range(MAX_CNAME_CHAIN + 1):
            try:
                answers, _authority, _additional = await method(target)
            except defer.CancelledError:
                raise
            except (error.DNSNameError, error.AuthoritativeDomainError):
                return None
            except Exception as exc:
                raise _TemporaryError(f"{name} {dns.QUERY_TYPES.get(rtype, rtype)}: {_describe(exc)}") from exc
            records, end = self._follow(answers, _text(target), rtype)
            if records or end == _text(target):
                return records
            if end in seen:
                raise _TemporaryError(f"{name}: CNAME loop at {end}")
            seen.add(end)
            target = end.encode("ascii", "ignore")
        raise _TemporaryError(f"{name}: CNAME chain longer than {MAX_CNAME_CHAIN}")

    @staticmethod
    def _follow(answers: list[dns.RRHeader], name: str, rtype: int) -> tuple[list[Any], str]:
        aliases: dict[str, str] = {}
        for rr in answers:
            if rr.type == dns.CNAME:
                aliases.setdefault(_text(rr.name.name), _text(rr.payload.name.name))
        current, seen = name, {name}
        while current in aliases:
            current = aliases[current]
            if current in seen:
                raise _TemporaryError(f"{name}: CNAME loop at {current}")
            seen.add(current)
        return [rr.payload for rr in answers if rr.type == rtype and _text(rr.name.name) == current], current

    async def addresses(self, name: str) -> list[IPAddress] | None:
        """The A (IPv4 client) or AAAA (IPv6 client) addresses of C{name}."""
        rtype = dns.A if self.ip.version == 4 else dns.AAAA
        records = await self.query(name, rtype)
        if records is None:
            return None
        if rtype == dns.A:
            return [ipaddress.IPv4Address(r.address) for r in records]
        return [ipaddress.IPv6Address(r.address) for r in records]

    async def _gather(self, coroutines: list[Any]) -> list[tuple[bool, Any]]:
        """Run coroutines concurrently; (succeeded, value or Failure) each."""
        results = await defer.DeferredList(
            [defer.Deferred.fromCoroutine(c) for c in coroutines], consumeErrors=True)
        for succeeded, value in results:
            if not succeeded and value.check(defer.CancelledError):
                value.raiseException()
        return results

    # Counters (RFC 7208 §4.6.4)

    def count_term(self, term: str) -> None:
        self.dns_terms += 1
        if self.dns_terms > MAX_DNS_TERMS:
            raise _PermanentError(f"more than {MAX_DNS_TERMS} DNS-querying terms (at {term!r})")

    def count_void(self, name: str) -> None:
        self.void_lookups += 1
        if self.void_lookups > MAX_VOID_LOOKUPS:
            raise _PermanentError(f"more than {MAX_VOID_LOOKUPS} void look-ups (at {name})")

    # Names

    def target_name(self, tokens: MacroString | None, domain: str) -> str:
        """The expanded target-name (RFC 7208 §4.8); the current domain when
        the mechanism has none.  May need %{p}: call L{prepare} first."""
        if tokens is None:
            return domain
        return truncate_domain(expand_macros(tokens, replace(self.values, domain=domain)))

    async def prepare(self, tokens: MacroString | None, domain: str) -> None:
        """Look up %{p} if C{tokens} use it (not counted as a term)."""
        if tokens and any(isinstance(t, Macro) and t.letter == "p" for t in tokens):
            validated = await self.validated_names()
            name = _text(domain)
            choice = "unknown"
            for candidate in validated:
                if candidate == name:
                    choice = candidate
                    break
                if candidate.endswith("." + name) and choice == "unknown":
                    choice = candidate
            if choice == "unknown" and validated:
                choice = validated[0]
            self.values = replace(self.values, validated_name=choice)

    async def ptr_names(self) -> tuple[list[str], bool]:
        """The first 10 PTR names of the client (lower case), and whether
        the look-up was void.  A DNS error gives no names (RFC 7208 §5.5)."""
        if self._ptr is None:
            try:
                records = await self.query(self.ip.reverse_pointer, dns.PTR)
            except _TemporaryError:
                self._ptr = ([], False)
            else:
                names = [_text(r.name.name) for r in records or []]
                self._ptr = (names[:MAX_PTR_NAMES], not names)
        return self._ptr

    async def validated_names(self) -> list[str]:
        """The client's PTR names whose addresses include it (RFC 7208
        §5.5); a name whose look-up fails is skipped."""
        if self._validated is None:
            names, _void = await self.ptr_names()
            results = await self._gather([self.addresses(name) for name in names])
            self._validated = [name for name, (ok, addresses) in zip(names, results)
                               if ok and addresses and self.ip in addresses]
        return self._validated

    # check_host()

    async def evaluate(self, domain: str) -> _Outcome:
        """check_host() for one domain: fetch, parse, run the terms."""
        domain = domain[:-1] if domain.endswith(".") else domain
        if not _valid_identity_domain(domain):
            return _Outcome("none", None, domain, None, f"{domain!r} is not a valid domain name")
        records = await self.query(domain, dns.TXT)
        if records is None:
            return _Outcome("none", None, domain, None, f"{domain} does not exist")
        texts = [b"".join(r.data) for r in records]
        candidates = [t for t in texts if is_spf_record(t)]
        if not candidates:
            return _Outcome("none", None, domain, None, f"{domain} publishes no SPF record")
        if len(candidates) > 1:
            raise _PermanentError(f"{domain} publishes {len(candidates)} SPF records")
        try:
            text = candidates[0].decode("ascii")
            record = parse_record(text)
        except UnicodeDecodeError:
            raise _PermanentError(f"the SPF record of {domain} is not ASCII") from None
        except SPFSyntaxError as exc:
            raise _PermanentError(f"{domain}: {exc}") from None
        for mechanism in record.mechanisms:
            if mechanism.name in _DNS_MECHANISMS:
                self.count_term(mechanism.text)
            if await self.matches(mechanism, domain):
                return _Outcome(mechanism.result, mechanism.text, domain, record)
        if record.redirect is not None:
            self.count_term("redirect")
            await self.prepare(record.redirect, domain)
            target = self.target_name(record.redirect, domain)
            outcome = await self.evaluate(target)
            if outcome.result == "none":
                raise _PermanentError(f"redirect={target}: {outcome.detail}")
            return outcome
        return _Outcome("neutral", None, domain, record)

    async def matches(self, mechanism: Mechanism, domain: str) -> bool:
        """Whether C{mechanism} matches the client (RFC 7208 §5)."""
        name = mechanism.name
        if name == "all":
            return True
        if name in ("ip4", "ip6"):
            network = mechanism.network
            assert network is not None
            return self.ip.version == network.version and self.ip in network
        await self.prepare(mechanism.target, domain)
        target = self.target_name(mechanism.target, domain)
        if name == "include":
            outcome = await self.evaluate(target)
            if outcome.result == "none":
                raise _PermanentError(f"include:{target}: {outcome.detail}")
            return outcome.result == "pass"
        if name == "a":
            addresses = await self.addresses(target)
            if not addresses:
                self.count_void(target)
                return False
            return self._any_in(addresses, mechanism)
        if name == "mx":
            return await self._mx(target, mechanism)
        if name == "ptr":
            names, void = await self.ptr_names()
            if void:
                self.count_void(self.ip.reverse_pointer)
            wanted = _text(target)
            return any(n == wanted or n.endswith("." + wanted) for n in await self.validated_names())
        if name == "exists":
            records = await self.query(target, dns.A)
            if not records:
                self.count_void(target)
                return False
            return True
        raise AssertionError(name)

    def _any_in(self, addresses: list[IPAddress], mechanism: Mechanism) -> bool:
        prefix = mechanism.cidr4 if self.ip.version == 4 else mechanism.cidr6
        return any(_in_network(self.ip, address, prefix) for address in addresses)

    async def _mx(self, target: str, mechanism: Mechanism) -> bool:
        records = await self.query(target, dns.MX)
        if not records:
            self.count_void(target)
            return False
        if len(records) > MAX_MX_NAMES:
            raise _PermanentError(f"mx:{target} has {len(records)} exchanges (more than {MAX_MX_NAMES})")
        exchanges = [_text(r.name.name) for r in records]
        exchanges = [e for e in exchanges if e]  # the null MX "." names no host (RFC 7505)
        results = await self._gather([self.addresses(e) for e in exchanges])
        failures = []
        for succeeded, value in results:
            if succeeded:
                if value and self._any_in(value, mechanism):
                    return True
            else:
                failures.append(value)
        for failure in failures:
            failure.raiseException()
        return False

    async def explain(self, outcome: _Outcome, default: str | None) -> str | None:
        """The explanation for a C{fail} (RFC 7208 §6.2): the C{exp=} TXT of
        the record that failed, expanded; the default when there is none,
        or when it cannot be fetched, is not exactly one record, is not
        ASCII or is not a valid explain-string."""
        record = outcome.record
        if record is not None and record.explanation is not None:
            try:
                await self.prepare(record.explanation, outcome.domain)
                name = self.target_name(record.explanation, outcome.domain)
                records = await self.query(name, dns.TXT)
            except _TemporaryError:
                records = None
            if records and len(records) == 1:
                try:
                    tokens = parse_macro_string(b"".join(records[0].data).decode("ascii"), explanation=True)
                except (UnicodeDecodeError, SPFSyntaxError):
                    pass
                else:
                    return await self._expand_text(tokens, outcome.domain)
        if default is None:
            return None
        return await self._expand_text(parse_macro_string(default, explanation=True), outcome.domain)

    async def _expand_text(self, tokens: MacroString, domain: str) -> str:
        try:
            await self.prepare(tokens, domain)
        except _TemporaryError:
            pass
        return expand_macros(tokens, replace(self.values, domain=domain))


async def check_host(ip: str | IPAddress, domain: str, sender: str, helo: str, resolver: IResolver, *,
                     receiver: str = "unknown", default_explanation: str | None = DEFAULT_EXPLANATION,
                     clock: IReactorTime | None = None) -> SPFResult:
    """Evaluate the SPF policy of C{domain} for mail from C{ip} (RFC 7208 §4).

    Never blocks: every DNS question goes through C{resolver} and is
    bounded by its timeout.  Use with C{Deferred.fromCoroutine} (or await
    it from another coroutine); cancelling that Deferred cancels the query
    in flight, which is how a caller imposes an overall time limit.

    Example::

        result = await check_host("192.0.2.1", "example.com",
                                  "alice@example.com", "mail.example.com",
                                  resolver)
        if result.result == "fail":
            print(result.explanation)

    @param ip: the SMTP client's address (text or C{ipaddress}); an
        IPv4-mapped IPv6 address is treated as IPv4.
    @param domain: the domain whose policy is checked: the MAIL FROM
        domain, or the HELO name for the HELO identity (§2.3, §2.4).
    @param sender: the identity, C{local@domain}; with no local part (or
        no C{@}) the local part is C{postmaster} (§4.3).  For the HELO
        identity pass C{"postmaster@" + helo}.
    @param helo: the HELO/EHLO argument (for C{%{h}}).
    @param resolver: a twisted.names C{IResolver}.
    @param receiver: this host's name, for C{%{r}} in explanations.
    @param default_explanation: an explain-string (macros allowed) used for
        C{fail} when the record has no usable C{exp=}; None for none.
    @param clock: supplies C{%{t}}; the wall clock when None.
    @return: an L{SPFResult}.  DNS failures and syntax errors are results
        (C{temperror}, C{permerror}), never exceptions.
    @raise ValueError: C{ip} is not an IP address.
    """
    address = _client_address(ip)
    local, at, sender_domain = sender.rpartition("@")
    if not at:
        local, sender_domain = "", sender or domain
    sender = f"{local or 'postmaster'}@{sender_domain}"
    now = clock.seconds() if clock is not None else time.time()
    evaluation = _Evaluation(address, sender, helo or "", resolver, receiver or "unknown", int(now))
    try:
        outcome = await evaluation.evaluate(domain)
    except _TemporaryError as exc:
        return SPFResult("temperror", domain=domain, detail=str(exc))
    except _PermanentError as exc:
        return SPFResult("permerror", domain=domain, detail=str(exc))
    explanation = None
    if outcome.result == "fail":
        explanation = await evaluation.explain(outcome, default_explanation)
    return SPFResult(outcome.result, explanation, outcome.mechanism, domain, outcome.detail)
