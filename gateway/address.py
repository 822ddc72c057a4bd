# -*- test-case-name: tests.test_address -*-
"""Parse SMTP paths into canonical mailboxes that a relay guard can trust.

Everything that decides where mail goes (the relay guard, routing, policy
lookups) compares domains.  They must all see one canonical spelling, or a
client finds a spelling that one check reads as "local" and the router reads
as "elsewhere": upper case, a trailing dot, a U-label next to its A-label, an
IP literal, or an address that hides a second destination (C{%}, C{!},
a quoted C{@}, a source route).  This module parses strictly by the RFC 5321
grammar, canonicalises the domain, and marks the hiding forms with
L{Mailbox.routed} instead of guessing what they mean; the relay guard decides.

Standards:
    RFC 5321 §4.1.2 (command argument syntax), §4.1.1.2-3 (MAIL, RCPT and
    their parameters), §4.1.3 (address literals), §4.5.3.1.1-3 (local part,
    domain and path length limits), §3.6.1 and appendix C (source routes),
    RFC 1123 §5.2.16 (the % hack), RFC 6531 §3.3 and §3.5 (SMTPUTF8 syntax and
    the X.6.7 status), RFC 5890-5891 (IDNA2008 A-labels and U-labels),
    RFC 3463 (enhanced status codes), RFC 3696 §2 (no all-numeric TLD).

See also:
    L{gateway.smtpstate} (calls L{parse_path}), plugins/relay_guard.py (uses
    L{Mailbox.routed}, L{Mailbox.is_literal} and L{domain_matches}), Postfix
    RESOLVE_FLAG_ROUTED and allow_percent_hack, Twisted
    C{twisted.mail.smtp.Address} (the lenient parser this replaces).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

__all__ = [
    "AddressError",
    "Mailbox",
    "canonical_domain",
    "domain_matches",
    "parse_path",
]

try:  # IDNA2008; installed with Twisted (hyperlink depends on it).
    import idna as _idna
except ImportError:  # pragma: no cover - exercised only without Twisted's deps
    _idna = None  # type: ignore[assignment]
    import encodings.idna as _stdlib_idna


MAX_LOCAL_PART = 64  # octets, RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255  # octets, RFC 5321 §4.5.3.1.2
MAX_LABEL = 63  # octets, RFC 1035 §2.3.4
MAX_PATH = 256  # octets including the angle brackets, RFC 5321 §4.5.3.1.3

STATUS_BAD_SENDER = "5.1.7"
STATUS_BAD_RECIPIENT = "5.1.3"
STATUS_BAD_PARAMETERS = "5.5.4"
STATUS_SYNTAX = "5.5.2"
STATUS_NON_ASCII = "5.6.7"

# Characters allowed in addresses beyond ASCII under SMTPUTF8 (RFC 6531
# UTF8-non-ascii).  C1 controls and lone surrogates (what a surrogateescape
# decode leaves for invalid UTF-8) are excluded: they are never text.
_NON_ASCII = "\u00a0-\ud7ff\ue000-\U0010ffff"
# RFC 5322 atext.
_ATEXT = "A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~"
_DOT_STRING = f"[{_ATEXT}{_NON_ASCII}]+(?:\\.[{_ATEXT}{_NON_ASCII}]+)*"
# RFC 5321 Quoted-string: qtextSMTP and quoted-pairSMTP.
_QUOTED_STRING = f'"(?:[\\x20\\x21\\x23-\\x5b\\x5d-\\x7e{_NON_ASCII}]|\\\\[\\x20-\\x7e])*"'

_PATH_RE = re.compile(
    "<"
    "(?:(?P<route>@[^:<>]*):)?"
    f"(?P<local>{_DOT_STRING}|{_QUOTED_STRING})"
    "@"
    # Loose on purpose: the domain is validated separately, with a precise
    # error message, by _canonical_domain.
    r"(?P<domain>\[[^\[\]\\<>]*\]|[^\s<>@\[\]\\\",:;()]*)"
    ">"
)
_DOT_STRING_RE = re.compile(_DOT_STRING)
_QUOTED_PAIR_RE = re.compile(r"\\(.)", re.DOTALL)
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_NUMERIC_RE = re.compile(r"[0-9]+")
_IPV4_RE = re.compile(r"[0-9.]+")
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.]+")
_GENERAL_LITERAL_RE = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")
_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE_RE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
_UTF8_VALUE_RE = re.compile(f"[\\x21-\\x3c\\x3e-\\x7e{_NON_ASCII}]+")
# Local-part characters that make a mailbox name another destination:
# the RFC 1123 §5.2.16 "%" hack, UUCP bang paths, and an "@" (only possible in a
# quoted local part).
_ROUTING_CHARACTERS = frozenset("%!@")


class AddressError(ValueError):
    """
    A path or its parameters are syntactically unacceptable.

    Why it carries a status: the caller turns it into a reply without having
    to re-classify the mistake.  C{"5.1.7"} is a bad sender, C{"5.1.3"} a bad
    recipient, C{"5.5.4"} bad parameters, C{"5.6.7"} a non-ASCII address
    without SMTPUTF8 (RFC 6531 §3.5), and C{"5.5.2"} a generic syntax error
    (no path at all).  The message is short, ASCII-safe reply text.

    @ivar status: the RFC 3463 enhanced status code.
    """

    def __init__(self, message: str, status: str = STATUS_SYNTAX) -> None:
        """
        @param message: reply text explaining the problem.
        @param status: the enhanced status code for the reply.
        """
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Mailbox:
    """
    A parsed, canonical mailbox from a MAIL or RCPT command.

    Why frozen: a transaction records the mailbox that was checked, and the
    same object is later routed; nothing may change it in between.

    Equality and hashing ignore L{quoted}: C{"user"@example.com} and
    C{user@example.com} are the same mailbox (RFC 5321 §4.1.2), so duplicate
    recipients compare equal.  L{source_route} does take part, so a routed
    mailbox never equals its unrouted twin.

    @ivar local: the local part, unquoted: for a quoted-string the content
        with quoted-pairs resolved.  Case is preserved (RFC 5321 §2.4).
    @ivar domain: the canonical domain: lower case, A-labels (C{xn--...}) for
        internationalised labels, no trailing dot; or a normalised address
        literal, C{"[192.0.2.1]"} or C{"[IPv6:2001:db8::1]"}.
    @ivar quoted: the local part was given as a quoted-string.
    @ivar source_route: canonical domains of an obsolete source route
        (C{<@a,@b:user@c>}), in the order given; empty when there was none.
    """

    local: str
    domain: str
    quoted: bool = field(default=False, compare=False)
    source_route: tuple[str, ...] = ()

    @property
    def is_literal(self) -> bool:
        """
        Whether the domain is an address literal rather than a name.

        Why it matters: a literal names a host directly and bypasses the
        domain lists, so a relay guard must treat it on its own terms
        (usually: only literals of the gateway's own addresses are local).
        """
        return self.domain.startswith("[")

    @property
    def routed(self) -> bool:
        """
        Whether this mailbox hides another destination.

        True when the local part contains C{%}, C{!} or C{@} (the percent hack,
        a bang path, a quoted address) or a source route was given.  A local
        server may forward such a mailbox to the hidden destination, so a
        relay guard must not treat it as local mail merely because the domain
        is local (Postfix RESOLVE_FLAG_ROUTED).
        """
        return bool(self.source_route) or not _ROUTING_CHARACTERS.isdisjoint(self.local)

    def __str__(self) -> str:
        """
        Format as C{local@domain}, quoting the local part only when needed.

        The source route is left out: RFC 5321 §3.6.1 says to ignore it, and a
        canonical string is what gets logged, compared and relayed.

        @return: the canonical mailbox text, without angle brackets.
        """
        local = self.local
        if not _DOT_STRING_RE.fullmatch(local):
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{local}@{self.domain}"


def parse_path(
    argument: str,
    *,
    smtputf8: bool = False,
    allow_null: bool = False,
    sender: bool = False,
) -> tuple[Mailbox | None, dict[str, str | None]]:
    """
    Parse the argument of C{MAIL FROM:} or C{RCPT TO:}.

    Why so strict: every lenient reading is a reading some other MTA does not
    share, and the differences are where relay tricks live.  The only
    leniencies are whitespace before the path (many clients send
    C{MAIL FROM: <a@b>}) and at the end of the line.

    Not handled here: RFC 5321 §4.1.1.3 requires accepting the domain-less
    C{RCPT TO:<Postmaster>}; the caller should recognise it and substitute
    its own name before calling, e.g. C{"<Postmaster@" + hostname + ">"}.

    @param argument: everything after the colon, without the CRLF.
    @param smtputf8: non-ASCII characters are allowed in this path.  For MAIL,
        pass whether SMTPUTF8 was advertised: a non-ASCII sender then also
        needs the C{SMTPUTF8} parameter in the same command.  For RCPT, pass
        whether the transaction's MAIL carried C{SMTPUTF8}.
    @param allow_null: accept the null reverse-path C{<>} (MAIL only).
    @param sender: this is a MAIL command; selects the status code of
        address errors (C{5.1.7} instead of C{5.1.3}).
    @return: C{(mailbox, params)}: the mailbox, or C{None} for C{<>}; and the
        ESMTP parameters with upper-cased keywords, mapped to their value or
        to C{None} for a keyword without C{=}.  Values are returned as given;
        checking them (and rejecting unknown keywords) is the caller's job.
    @raise AddressError: for any syntax error; see its status codes.
    """
    address_status = STATUS_BAD_SENDER if sender else STATUS_BAD_RECIPIENT
    what = "sender" if sender else "recipient"
    text = argument.lstrip(" \t").rstrip(" \t")
    if not text.startswith("<"):
        raise AddressError(
            f"Syntax: {'MAIL FROM' if sender else 'RCPT TO'}:<address>", STATUS_SYNTAX
        )

    if text.startswith("<>"):
        if not allow_null:
            raise AddressError(f"Null {what} address not allowed", address_status)
        path_length = 2
        mailbox = None
    else:
        match = _PATH_RE.match(text)
        if match is None:
            raise AddressError(f"Bad {what} address syntax", address_status)
        path_length = match.end()
        path = text[:path_length]
        if not path.isascii() and not smtputf8:
            raise AddressError(
                f"Non-ASCII {what} address not permitted without SMTPUTF8",
                STATUS_NON_ASCII,
            )
        if len(path.encode("utf-8")) > MAX_PATH:
            raise AddressError(f"Bad {what} address syntax: path too long", address_status)
        try:
            mailbox = _mailbox(match, smtputf8)
        except ValueError as error:
            raise AddressError(f"Bad {what} address syntax: {error}", address_status) from None

    params = _parameters(text[path_length:], smtputf8)
    if (
        sender
        and mailbox is not None
        and "SMTPUTF8" not in params
        and not text[:path_length].isascii()
    ):
        raise AddressError(
            "Non-ASCII sender address needs the SMTPUTF8 parameter", STATUS_NON_ASCII
        )
    return mailbox, params


def canonical_domain(domain: str) -> str:
    """
    Canonicalise a domain from the configuration (local_domains and the like).

    Why a separate entry point: configuration is trusted to use U-labels
    without SMTPUTF8, but must reach exactly the form L{parse_path} produces,
    or a listed domain would never match.

    @param domain: a domain name (A-labels or U-labels, any case) or an
        address literal such as C{"[192.0.2.1]"}.
    @return: the canonical form used in L{Mailbox.domain}.
    @raise ValueError: if the domain is invalid, including a trailing dot.
    """
    if domain.startswith("["):
        return _canonical_literal(domain)
    return _canonical_domain(domain, allow_unicode=True)


def domain_matches(domain: str, patterns: frozenset[str]) -> bool:
    """
    Whether a canonical domain is listed in C{patterns}.

    Why no other wildcard forms: an exact name or "every subdomain of" covers
    what a gateway needs, and anything looser (suffix strings without a dot,
    globs) matches C{evil-example.com} for C{example.com}.

    @param domain: a canonical domain, as in L{Mailbox.domain}.
    @param patterns: canonical domains, each matching itself only, and
        patterns C{".example.com"} (build them as C{"." +
        canonical_domain("example.com")}) matching every subdomain of
        example.com but not example.com itself.  Address literals match
        exactly only.
    @return: C{True} if some pattern matches.  Nothing is canonicalised here:
        a non-canonical argument simply does not match.
    """
    if domain in patterns:
        return True
    if domain.startswith("["):
        return False
    dot = domain.find(".")
    while dot >= 0:
        if domain[dot:] in patterns:
            return True
        dot = domain.find(".", dot + 1)
    return False


def _mailbox(match: re.Match[str], smtputf8: bool) -> Mailbox:
    """
    Build the L{Mailbox} from a syntactically matched path.

    @raise ValueError: with reply text, for a limit or domain error.
    """
    local_text = match["local"]
    if len(local_text.encode("utf-8")) > MAX_LOCAL_PART:
        raise ValueError(f"local part longer than {MAX_LOCAL_PART} octets")
    quoted = local_text.startswith('"')
    local = _QUOTED_PAIR_RE.sub(r"\1", local_text[1:-1]) if quoted else local_text

    domain_text = match["domain"]
    if domain_text.startswith("["):
        domain = _canonical_literal(domain_text)
    else:
        domain = _canonical_domain(domain_text, allow_unicode=smtputf8)

    route: tuple[str, ...] = ()
    if match["route"] is not None:
        hops = []
        for hop in match["route"].split(","):
            if not hop.startswith("@"):
                raise ValueError("malformed source route")
            # At-domain is a Domain only; RFC 5321 allows no literal there.
            hops.append(_canonical_domain(hop[1:], allow_unicode=smtputf8))
        route = tuple(hops)
    return Mailbox(local=local, domain=domain, quoted=quoted, source_route=route)


def _canonical_domain(domain: str, *, allow_unicode: bool) -> str:
    """
    Validate a domain name and return its canonical spelling.

    ASCII labels must be LDH labels (RFC 5321 sub-domain); C{xn--} labels
    must be valid A-labels.  Non-ASCII labels are lower-cased with
    C{str.lower} and must then be valid IDNA2008 U-labels; no other mapping
    (width, NFKC, ideographic full stops) is applied, so a spelling that only
    a mapping would make valid is refused rather than silently equated.

    @param domain: the domain as given.
    @param allow_unicode: whether U-labels are acceptable.
    @return: lower-case A-label form, without trailing dot.
    @raise ValueError: with reply text, if the domain is unacceptable.
    """
    if not domain:
        raise ValueError("empty domain")
    if domain.endswith("."):
        raise ValueError("domain must not end with a dot")
    labels = []
    for label in domain.split("."):
        if not label:
            raise ValueError("empty domain label")
        if label.isascii():
            label = label.lower()
            if not _LABEL_RE.fullmatch(label):
                raise ValueError(f"invalid domain label {ascii(label)}")
            if label.startswith("xn--"):
                _check_a_label(label)
        else:
            if not allow_unicode:
                raise ValueError("non-ASCII domain without SMTPUTF8")
            label = _to_a_label(label.lower())
        if len(label) > MAX_LABEL:
            raise ValueError(f"domain label longer than {MAX_LABEL} octets")
        labels.append(label)
    if _NUMERIC_RE.fullmatch(labels[-1]):
        # RFC 3696 §2: no top-level domain is all-numeric.  An IP address
        # must be written as an address literal in brackets.
        raise ValueError("numeric top-level domain; use an address literal")
    canonical = ".".join(labels)
    if len(canonical) > MAX_DOMAIN:
        raise ValueError(f"domain longer than {MAX_DOMAIN} octets")
    return canonical


def _to_a_label(label: str) -> str:
    """
    Convert a lower-cased U-label to its A-label, refusing any mapping.

    @raise ValueError: if C{label} is not a valid U-label.
    """
    try:
        if _idna is not None:
            a_label = _idna.alabel(label).decode("ascii")
            round_trip = _idna.ulabel(a_label)
        else:  # pragma: no cover - see the import
            a_label = _stdlib_idna.ToASCII(label).decode("ascii")
            round_trip = _stdlib_idna.ToUnicode(a_label)
    except (UnicodeError, ValueError):
        raise ValueError(f"invalid internationalised domain label {ascii(label)}") from None
    if round_trip != label or not a_label.startswith("xn--") or not _LABEL_RE.fullmatch(a_label):
        raise ValueError(f"invalid internationalised domain label {ascii(label)}")
    return a_label


def _check_a_label(label: str) -> None:
    """
    Check that an C{xn--} label is a real A-label, the one its U-label encodes to.

    Why: a bogus or non-canonical Punycode label could decode, somewhere else,
    to a name that the domain lists spell differently.

    @raise ValueError: if the label is not a valid A-label.
    """
    try:
        if _idna is not None:
            u_label = _idna.ulabel(label)
            round_trip = _idna.alabel(u_label).decode("ascii")
        else:  # pragma: no cover - see the import
            u_label = _stdlib_idna.ToUnicode(label)
            round_trip = _stdlib_idna.ToASCII(u_label).decode("ascii").lower()
    except (UnicodeError, ValueError):
        raise ValueError(f"invalid A-label {ascii(label)}") from None
    if round_trip != label or u_label == label:
        raise ValueError(f"invalid A-label {ascii(label)}")


def _canonical_literal(literal: str) -> str:
    """
    Validate an address literal and return its normalised spelling.

    IPv4 literals with leading zeros are refused: some stacks read them as
    octal, others as decimal, so they name different hosts to different
    programs.  General (tagged) literals other than C{IPv6:} name no
    registered address family and are refused too.

    @param literal: the literal including its brackets.
    @return: C{"[a.b.c.d]"} or C{"[IPv6:<compressed lower-case form>]"}.
    @raise ValueError: with reply text, if the literal is unacceptable.
    """
    inner = literal[1:-1] if literal.startswith("[") and literal.endswith("]") else ""
    if inner[:5].lower() == "ipv6:":
        address = inner[5:]
        if not _IPV6_RE.fullmatch(address):
            raise ValueError("invalid IPv6 address literal")
        try:
            return f"[IPv6:{ipaddress.IPv6Address(address).compressed}]"
        except ValueError:
            raise ValueError("invalid IPv6 address literal") from None
    if _IPV4_RE.fullmatch(inner):
        try:
            return f"[{ipaddress.IPv4Address(inner)}]"
        except ValueError:
            raise ValueError("invalid IPv4 address literal") from None
    if _GENERAL_LITERAL_RE.fullmatch(inner):
        raise ValueError("unsupported address literal")
    raise ValueError("invalid address literal")


def _parameters(text: str, smtputf8: bool) -> dict[str, str | None]:
    """
    Parse C{SP esmtp-param *(SP esmtp-param)} after the path.

    Why duplicates are refused: a parameter given twice (C{SIZE=1 SIZE=10**9})
    has no defined meaning, and whichever copy a later stage reads, an earlier
    check may have read the other.

    @param text: what follows the closing bracket, right-stripped.
    @param smtputf8: whether values may contain non-ASCII (RFC 6531 §3.3).
    @return: the parameters with upper-cased keywords.
    @raise AddressError: status C{5.5.4} for anything malformed.
    """
    params: dict[str, str | None] = {}
    if not text:
        return params
    if not text.startswith(" "):
        raise AddressError("Malformed parameters after the address", STATUS_BAD_PARAMETERS)
    value_re = _UTF8_VALUE_RE if smtputf8 else _VALUE_RE
    for item in text[1:].split(" "):
        keyword, equals, value = item.partition("=")
        if not _KEYWORD_RE.fullmatch(keyword):
            raise AddressError("Malformed parameter keyword", STATUS_BAD_PARAMETERS)
        if equals and not value_re.fullmatch(value):
            raise AddressError(
                f"Malformed value for parameter {keyword.upper()}", STATUS_BAD_PARAMETERS
            )
        keyword = keyword.upper()
        if keyword in params:
            raise AddressError(f"Parameter {keyword} given twice", STATUS_BAD_PARAMETERS)
        params[keyword] = value if equals else None
    return params
