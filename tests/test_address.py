"""Tests for L{gateway.address}: SMTP path parsing and canonical mailboxes.

The relay-trick table at the centre of this file is the contract the relay
guard relies on: every address trick either fails to parse or comes out with
its canonical domain and the C{routed} / C{is_literal} flags set.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.address import (
    AddressError,
    Mailbox,
    canonical_domain,
    domain_matches,
    parse_path,
)

# -- valid paths ---------------------------------------------------------------

VALID = [
    # (argument, local, domain, quoted, source_route)
    ("<user@example.com>", "user", "example.com", False, ()),
    (" <user@example.com>", "user", "example.com", False, ()),
    ("\t <user@example.com>", "user", "example.com", False, ()),
    ("<user@example.com>  ", "user", "example.com", False, ()),
    ("<USER@EXAMPLE.COM>", "USER", "example.com", False, ()),
    ("<first.last+tag@sub.example.com>", "first.last+tag", "sub.example.com", False, ()),
    ("<!#$&'*+-/=?^_`{|}~@example.com>", "!#$&'*+-/=?^_`{|}~", "example.com", False, ()),
    ('<"john doe"@example.com>', "john doe", "example.com", True, ()),
    ('<"a\\"b\\\\c"@example.com>', 'a"b\\c', "example.com", True, ()),
    ('<"user"@example.com>', "user", "example.com", True, ()),
    ('<""@example.com>', "", "example.com", True, ()),
    ('<"a>b c"@example.com>', "a>b c", "example.com", True, ()),
    ("<user@localhost>", "user", "localhost", False, ()),
    ("<user@a-b.x1.example>", "user", "a-b.x1.example", False, ()),
    ("<user@123.example>", "user", "123.example", False, ()),
    ("<user@xn--bcher-kva.example>", "user", "xn--bcher-kva.example", False, ()),
    ("<user@XN--BCHER-KVA.example>", "user", "xn--bcher-kva.example", False, ()),
    ("<user@[192.0.2.1]>", "user", "[192.0.2.1]", False, ()),
    ("<user@[IPv6:2001:DB8::1]>", "user", "[IPv6:2001:db8::1]", False, ()),
    ("<user@[ipv6:2001:db8:0:0:0:0:0:1]>", "user", "[IPv6:2001:db8::1]", False, ()),
    (
        "<@a.example,@B.example:user@c.example>",
        "user",
        "c.example",
        False,
        ("a.example", "b.example"),
    ),
    ("<" + "l" * 64 + "@example.com>", "l" * 64, "example.com", False, ()),
]


@pytest.mark.parametrize(("argument", "local", "domain", "quoted", "route"), VALID)
def test_valid_paths(
    argument: str, local: str, domain: str, quoted: bool, route: tuple[str, ...]
) -> None:
    """Well-formed paths parse into the expected local part, canonical domain and flags."""
    mailbox, params = parse_path(argument)
    assert mailbox is not None
    assert (mailbox.local, mailbox.domain, mailbox.quoted, mailbox.source_route) == (
        local,
        domain,
        quoted,
        route,
    )
    assert params == {}


@pytest.mark.parametrize(
    ("argument", "text"),
    [
        ("<user@example.com>", "user@example.com"),
        ('<"user"@example.com>', "user@example.com"),
        ('<"john doe"@example.com>', '"john doe"@example.com'),
        ('<"a\\"b"@example.com>', '"a\\"b"@example.com'),
        ('<"a..b"@example.com>', '"a..b"@example.com'),
        ('<""@example.com>', '""@example.com'),
        ("<@a.example:user@c.example>", "user@c.example"),
        ("<User@[IPv6:2001:DB8::1]>", "User@[IPv6:2001:db8::1]"),
    ],
)
def test_str_requotes_only_when_needed(argument: str, text: str) -> None:
    """C{str()} gives the canonical C{local@domain}, quoting the local part only when it must."""
    mailbox, _ = parse_path(argument)
    assert str(mailbox) == text


def test_quoted_and_unquoted_mailboxes_are_equal() -> None:
    """Needless quoting does not make a different mailbox (duplicate recipients compare equal)."""
    plain, _ = parse_path("<user@example.com>")
    quoted, _ = parse_path('<"user"@Example.com>')
    assert plain == quoted
    assert hash(plain) == hash(quoted)
    routed, _ = parse_path("<@relay.example:user@example.com>")
    assert routed != plain


def test_mailbox_is_immutable() -> None:
    """A checked mailbox cannot be changed before it is routed."""
    mailbox, _ = parse_path("<user@example.com>")
    with pytest.raises(AttributeError):
        mailbox.domain = "elsewhere.example"  # type: ignore[misc]


# -- null path and parameters -------------------------------------------------


def test_null_sender() -> None:
    """C{<>} is the null reverse-path when allowed, and its parameters are still parsed."""
    assert parse_path("<>", allow_null=True, sender=True) == (None, {})
    assert parse_path(" <> SIZE=100 body=8bitmime", allow_null=True, sender=True) == (
        None,
        {"SIZE": "100", "BODY": "8bitmime"},
    )


@pytest.mark.parametrize(("sender", "status"), [(True, "5.1.7"), (False, "5.1.3")])
def test_null_path_refused_unless_allowed(sender: bool, status: str) -> None:
    """C{<>} is refused where no null path is allowed (RCPT), with the address status."""
    with pytest.raises(AddressError) as caught:
        parse_path("<>", sender=sender)
    assert caught.value.status == status


def test_parameters_are_parsed_with_upper_case_keys() -> None:
    """Keywords match case-insensitively and come back upper-cased; bare keywords map to None."""
    _, params = parse_path(
        "<a@example.com> size=1000 Body=8BITMIME smtputf8 ENVID=QQ+2B314 X-Vendor-1=a:b"
    )
    assert params == {
        "SIZE": "1000",
        "BODY": "8BITMIME",
        "SMTPUTF8": None,
        "ENVID": "QQ+2B314",
        "X-VENDOR-1": "a:b",
    }


@pytest.mark.parametrize(
    "argument",
    [
        "<a@example.com>SIZE=1",  # no space before the parameters
        "<a@example.com>>",
        "<a@example.com>  SIZE=1",  # empty parameter between two spaces
        "<a@example.com> SIZE=1  BODY=7BIT",
        "<a@example.com> SIZE=",  # empty value
        "<a@example.com> =1",  # empty keyword
        "<a@example.com> -X=1",  # keyword must start with a letter or digit
        "<a@example.com> X_Y=1",
        "<a@example.com> A=b=c",  # "=" is not allowed in a value
        "<a@example.com> A=\x01",
        "<a@example.com> A=b\x7f",
        "<a@example.com> A=\u00e9",  # non-ASCII value without SMTPUTF8
        "<a@example.com> SIZE=1 size=2",  # duplicate keyword
        "<a@example.com> SIZE=1\tBODY=7BIT",
        "<> SIZE=1 SIZE=2",
    ],
)
def test_bad_parameters(argument: str) -> None:
    """Empty, malformed or repeated parameters are refused with 5.5.4."""
    with pytest.raises(AddressError) as caught:
        parse_path(argument, allow_null=True)
    assert caught.value.status == "5.5.4"


def test_non_ascii_parameter_value_with_smtputf8() -> None:
    """RFC 6531 allows UTF-8 in parameter values when SMTPUTF8 is in use."""
    _, params = parse_path("<a@example.com> X-NOTE=\u00e9t\u00e9", smtputf8=True)
    assert params == {"X-NOTE": "\u00e9t\u00e9"}


# -- invalid paths --------------------------------------------------------------


@pytest.mark.parametrize(
    "argument",
    [
        "<user@example.com",
        "<user@@example.com>",
        "<user@other.example@example.com>",
        "<@example.com>",
        "<user@>",
        "<user>",
        "<Postmaster>",
        "<user@example.com.>",
        "<user@.example.com>",
        "<user@example..com>",
        "<.user@example.com>",
        "<user.@example.com>",
        "<us..er@example.com>",
        "<us er@example.com>",
        "<user @example.com>",
        "<user@ example.com>",
        "<user@example.com >",
        "< user@example.com>",
        "<user@-example.com>",
        "<user@example-.com>",
        "<user@exa_mple.com>",
        "<user@exa%mple.com>",
        "<user@example.com%other.example>",
        "<user@127.0.0.1>",
        "<user@0x7f.1>",
        "<user@[300.1.1.1]>",
        "<user@[1.2.3]>",
        "<user@[01.2.3.4]>",
        "<user@[IPv6:::1%eth0]>",
        "<user@[IPv6:1.2.3.4]>",
        "<user@[IPv6:gggg::1]>",
        "<user@[x-tag:content]>",
        "<user@[local]>",
        "<user@[]>",
        "<user@[1.2.3.4>",
        '<"unterminated@example.com>',
        '<"a"b@example.com>',
        '<a"b"@example.com>',
        '<"a\\\u00e9"@example.com>',
        '<"tab\there"@example.com>',
        "<user\x00@example.com>",
        "<user@exam\x00ple.com>",
        "<user@xn--zz.example>",
        "<user@xn--.example>",
        "<@:user@example.com>",
        "<@a.example,b.example:user@example.com>",
        "<@[192.0.2.1]:user@example.com>",
        "<@a.example.:user@example.com>",
        "<" + "l" * 65 + "@example.com>",
        "<user@" + "a" * 64 + ".example>",
        "<user@" + ".".join(["abcdefghi"] * 26) + ".example>",
        "<" + "l" * 60 + "@" + ".".join(["abcdefghi"] * 20) + ".com>",  # path 266 octets
    ],
)
@pytest.mark.parametrize(("sender", "status"), [(True, "5.1.7"), (False, "5.1.3")])
def test_invalid_paths(argument: str, sender: bool, status: str) -> None:
    """Paths outside the RFC 5321 §4.1.2 grammar or its limits get the address status."""
    with pytest.raises(AddressError) as caught:
        parse_path(argument, sender=sender, smtputf8=True)
    assert caught.value.status == status


@pytest.mark.parametrize(
    "argument", ["", "   ", "user@example.com", "user@example.com>", "MAIL FROM:<a@b.c>"]
)
def test_missing_path_is_a_generic_syntax_error(argument: str) -> None:
    """Without angle brackets there is no path at all: 5.5.2, no leniency."""
    with pytest.raises(AddressError) as caught:
        parse_path(argument)
    assert caught.value.status == "5.5.2"


def test_address_error_is_a_value_error() -> None:
    """Callers that only know ValueError still catch address errors."""
    with pytest.raises(ValueError):
        parse_path("<bad")


def test_length_limits_at_the_boundary() -> None:
    """A 64-octet local part, 63-octet label and 256-octet path are accepted; one more is not."""
    local = "l" * 64
    label = "a" * 63
    parse_path(f"<{local}@{label}.example>")
    # "<" + 64 + "@" + domain + ">" == 256 with a 189-octet domain.
    domain = ".".join([label, label, "a" * 57, "com"])
    assert len(domain) == 189
    parse_path(f"<{local}@{domain}>")
    with pytest.raises(AddressError):
        parse_path(f"<{local}@{domain}x>")


# -- SMTPUTF8 -------------------------------------------------------------------


def test_unicode_address_with_smtputf8() -> None:
    """With SMTPUTF8, U-labels become lower-case A-labels and the UTF-8 local part is kept."""
    mailbox, params = parse_path(
        "<Pel\u00e9@B\u00dcCHER.example> SMTPUTF8", smtputf8=True, sender=True
    )
    assert mailbox == Mailbox("Pel\u00e9", "xn--bcher-kva.example")
    assert params == {"SMTPUTF8": None}
    assert str(mailbox) == "Pel\u00e9@xn--bcher-kva.example"


@pytest.mark.parametrize(
    "argument",
    ["<pel\u00e9@example.com>", "<user@b\u00fccher.example>", '<"pel\u00e9"@example.com>'],
)
def test_non_ascii_without_smtputf8(argument: str) -> None:
    """Without SMTPUTF8, any non-ASCII in the path is refused with 5.6.7 (RFC 6531 §3.5)."""
    with pytest.raises(AddressError) as caught:
        parse_path(argument)
    assert caught.value.status == "5.6.7"


def test_non_ascii_sender_needs_smtputf8_parameter() -> None:
    """A UTF-8 sender needs the SMTPUTF8 parameter on MAIL, even when the extension is offered."""
    with pytest.raises(AddressError) as caught:
        parse_path("<pel\u00e9@example.com> BODY=8BITMIME", smtputf8=True, sender=True)
    assert caught.value.status == "5.6.7"
    mailbox, _ = parse_path("<pel\u00e9@example.com>", smtputf8=True, sender=False)
    assert mailbox is not None


@pytest.mark.parametrize(
    "domain",
    [
        "\uff4c\uff4f\uff43\uff41\uff4c.example",  # full-width letters
        "local\u3002example",  # ideographic full stop
        "\u212aelvin.example",  # KELVIN SIGN lower-cases to ASCII "k"
        "a\u200db.example",  # ZERO WIDTH JOINER in a bad context
        "\u0080abc.example",  # C1 control
    ],
)
def test_unicode_domains_needing_mapping_are_refused(domain: str) -> None:
    """Only real U-labels are converted; spellings that need a mapping are refused, not equated."""
    with pytest.raises(AddressError):
        parse_path(f"<user@{domain}>", smtputf8=True)


# -- the relay-trick table --------------------------------------------------------

LOCAL = "local.example"
OTHER = "other.example"

# (argument, expected): expected is None for "must not parse", else
# (canonical domain, routed, is_literal).
RELAY_TRICKS: list[tuple[str, tuple[str, bool, bool] | None]] = [
    # the percent hack: local domain, but a local forwarder sends it on
    (f"<user%{OTHER}@{LOCAL}>", (LOCAL, True, False)),
    (f"<user%{OTHER}%{LOCAL}@{LOCAL}>", (LOCAL, True, False)),
    # UUCP bang path
    (f"<{OTHER}!user@{LOCAL}>", (LOCAL, True, False)),
    # obsolete source route: the destination is the mailbox's domain
    (f"<@{LOCAL}:user@{OTHER}>", (OTHER, True, False)),
    (f"<@{LOCAL},@{LOCAL}:user@{LOCAL}>", (LOCAL, True, False)),
    (f"<@{LOCAL}:user@[192.0.2.1]>", ("[192.0.2.1]", True, True)),
    # quoted local part hiding an address or a routing character
    (f'<"user@{OTHER}"@{LOCAL}>', (LOCAL, True, False)),
    (f'<"user\\@{OTHER}"@{LOCAL}>', (LOCAL, True, False)),
    (f'<"user%{OTHER}"@{LOCAL}>', (LOCAL, True, False)),
    (f'<"{OTHER}!user"@{LOCAL}>', (LOCAL, True, False)),
    (f'<"@{LOCAL}:user@{OTHER}"@{LOCAL}>', (LOCAL, True, False)),
    # a plain quoted local part is not routed
    (f'<"user"@{LOCAL}>', (LOCAL, False, False)),
    # two @: not a mailbox at all
    (f"<user@{OTHER}@{LOCAL}>", None),
    (f"<user@{LOCAL}@{OTHER}>", None),
    # address literals
    ("<user@[192.0.2.1]>", ("[192.0.2.1]", False, True)),
    ("<user@[IPv6:::FFFF:192.0.2.1]>", ("[IPv6:::ffff:c000:201]", False, True)),
    (f"<user%{OTHER}@[192.0.2.1]>", ("[192.0.2.1]", True, True)),
    ("<user@[127.000.000.001]>", None),
    ("<user@127.0.0.1>", None),
    ("<user@[IPv6:fe80::1%eth0]>", None),
    # trailing dot and other domain spellings
    (f"<user@{LOCAL}.>", None),
    (f"<user@{LOCAL}..>", None),
    (f"<user%{OTHER}.@{LOCAL}>", None),
    (f"<user@.{LOCAL}>", None),
    # case: canonical lower-case domain, local part kept
    ("<USER@LOCAL.EXAMPLE>", (LOCAL, False, False)),
    ("<User@Local.Example>", (LOCAL, False, False)),
    ("<USER%OTHER.EXAMPLE@LOCAL.EXAMPLE>", (LOCAL, True, False)),
    ('<"USER@OTHER.EXAMPLE"@LOCAL.EXAMPLE.>', None),
    ("<@LOCAL.EXAMPLE:USER@OTHER.EXAMPLE>", (OTHER, True, False)),
    # mixes
    (f"<@{LOCAL}:{OTHER}!user%x@{LOCAL}>", (LOCAL, True, False)),
    (f"<@{LOCAL}:user@{OTHER}.>", None),
    (f'<@{LOCAL}:"user@x"@[192.0.2.1]>', ("[192.0.2.1]", True, True)),
    (f"<user@{LOCAL} >", None),
    (f"<user@{LOCAL}\r\n>", None),
    (f"<user@{LOCAL}\x00.{OTHER}>", None),
]


@pytest.mark.parametrize(("argument", "expected"), RELAY_TRICKS)
def test_relay_tricks(argument: str, expected: tuple[str, bool, bool] | None) -> None:
    """
    Address tricks either fail to parse or carry the flags a relay guard needs.

    The guard may then rely on: C{domain} is the real destination in canonical
    form, C{routed} says a local server could forward it elsewhere, and
    C{is_literal} says the domain lists do not apply.
    """
    if expected is None:
        with pytest.raises(AddressError):
            parse_path(argument)
        return
    mailbox, _ = parse_path(argument)
    assert mailbox is not None
    assert (mailbox.domain, mailbox.routed, mailbox.is_literal) == expected


def test_unicode_spelling_of_local_domain_canonicalises_to_a_label() -> None:
    """A U-label spelling of a listed domain reaches the same canonical form as the listing."""
    listed = frozenset({canonical_domain("b\u00fccher.example")})
    spellings = (
        "b\u00fccher.example",
        "B\u00dcCHER.EXAMPLE",
        "xn--bcher-kva.example",
        "XN--BCHER-KVA.EXAMPLE",
    )
    for spelling in spellings:
        mailbox, _ = parse_path(f"<user@{spelling}>", smtputf8=True)
        assert mailbox is not None
        assert domain_matches(mailbox.domain, listed)


# -- canonical_domain and domain_matches ---------------------------------------------


@pytest.mark.parametrize(
    ("domain", "canonical"),
    [
        ("Example.COM", "example.com"),
        ("b\u00fccher.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("localhost", "localhost"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[ipv6:2001:DB8:0::1]", "[IPv6:2001:db8::1]"),
    ],
)
def test_canonical_domain(domain: str, canonical: str) -> None:
    """Config domains reach exactly the spelling L{parse_path} produces."""
    assert canonical_domain(domain) == canonical


@pytest.mark.parametrize(
    "domain",
    [
        "",
        "example.com.",
        ".example.com",
        "exa mple.com",
        "a..b",
        "-a.com",
        "1.2.3.4",
        "[1.2.3]",
        "xn--zz",
    ],
)
def test_canonical_domain_rejects(domain: str) -> None:
    """Invalid config domains, trailing dot included, raise ValueError."""
    with pytest.raises(ValueError):
        canonical_domain(domain)


PATTERNS = frozenset({"example.com", ".corp.example", "[192.0.2.1]"})


@pytest.mark.parametrize(
    ("domain", "matches"),
    [
        ("example.com", True),
        ("sub.example.com", False),
        ("corp.example", False),
        ("a.corp.example", True),
        ("a.b.corp.example", True),
        ("evilcorp.example", False),
        ("corp.example.evil", False),
        ("[192.0.2.1]", True),
        ("[192.0.2.2]", False),
        ("com", False),
        ("", False),
    ],
)
def test_domain_matches(domain: str, matches: bool) -> None:
    """Exact names match themselves; ".d" matches subdomains of d only, never d or look-alikes."""
    assert domain_matches(domain, PATTERNS) is matches


# -- properties ------------------------------------------------------------------------

label = st.from_regex(r"\A[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?\Z").filter(
    lambda text: not text.lower().startswith("xn--")
)
domains = st.lists(label, min_size=1, max_size=4).map(".".join).filter(
    lambda domain: not domain.rsplit(".", 1)[-1].isdigit()
)
atoms = st.text(alphabet="abcXYZ019!#$%&'*+-/=?^_`{|}~", min_size=1, max_size=8)
dot_strings = st.lists(atoms, min_size=1, max_size=3).map(".".join)
quoted_content = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20
)


@settings(max_examples=300)
@given(local=st.one_of(dot_strings, quoted_content), domain=domains)
def test_str_round_trip(local: str, domain: str) -> None:
    """Formatting a mailbox and parsing it again gives the same mailbox."""
    original = Mailbox(local, domain.lower())
    parsed, params = parse_path(f"<{original}>")
    assert parsed == original
    assert params == {}
    assert str(parsed) == str(original)


@settings(max_examples=300)
@given(local=st.one_of(dot_strings, quoted_content), domain=domains)
def test_parse_is_idempotent(local: str, domain: str) -> None:
    """Parsing the canonical text of a parsed mailbox changes nothing, flags included."""
    first, _ = parse_path(f"<{Mailbox(local, domain)}>")
    assert first is not None
    second, _ = parse_path(f"<{first}>")
    assert second == first
    assert (second.routed, second.is_literal) == (first.routed, first.is_literal)


@settings(max_examples=500)
@given(
    argument=st.text(alphabet='<>@"\\.:,[] %!=aZ09-\u00e9\t', max_size=40),
    smtputf8=st.booleans(),
)
def test_fuzz_only_address_error(argument: str, smtputf8: bool) -> None:
    """Arbitrary input either parses into canonical form or raises AddressError, nothing else."""
    try:
        mailbox, params = parse_path(argument, smtputf8=smtputf8, allow_null=True)
    except AddressError as error:
        assert error.status in {"5.1.3", "5.5.2", "5.5.4", "5.6.7"}
        return
    assert all(key == key.upper() for key in params)
    if mailbox is not None:
        assert canonical_domain(mailbox.domain) == mailbox.domain
        assert parse_path(f"<{mailbox}>", smtputf8=smtputf8)[0] == Mailbox(
            mailbox.local, mailbox.domain
        )
