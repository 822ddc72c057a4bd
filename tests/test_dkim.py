"""Tests for DKIM keys and records (L{gateway.dkimkeys}), signing
(C{plugins.dkim_sign}) and verification (C{plugins.dkim_verify}).

Signatures are checked with dkimpy's own verifier, handed the published
record through its C{dnsfunc}; the plugin-level verification tests look
keys up in the real test DNS server (L{tests.dnsserver}).  Mail::DKIM, the
independent verifier, runs in tests/e2e/test_dkim_dmarc.py.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import dkim
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gateway.config import ConfigError, DNSConfig, parse_config
from gateway.dkimkeys import (
    AmbiguousAuthorError,
    AuthorError,
    DKIMKeyError,
    KeyStore,
    add_dkim_commands,
    author_domain,
    key_path,
    load_key,
    lookup_txt,
    read_for_dkim,
    txt_chunks,
    write_key,
    zone_line,
)
from gateway.dns import DNSTemporaryError, make_resolver
from gateway.pipeline import MessageView
from gateway.registry import PluginContext, build_options
from gateway.session import Session, Transaction
from gateway.verdict import Action
from plugins import dkim_sign, dkim_verify
from plugins.dkim_sign import DKIMSigner, Options, sign_message
from plugins.dkim_verify import DKIMVerifier
from tests.dnsserver import TestDNS
from tests.support import base_config, write_config

WAIT = 10

#: Parses a header block the way the server does for MessageView.headers.
_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)

MESSAGE = (b"From: Alice <alice@example.org>\r\n"
           b"To: bob@example.net\r\n"
           b"Subject: Quarterly   numbers \r\n"
           b"Date: Mon, 02 Feb 2026 10:00:00 +0000\r\n"
           b"Message-ID: <1@example.org>\r\n"
           b"Received: from somewhere by here; Mon, 02 Feb 2026 10:00:00 +0000\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n"
           b"\r\n"
           b"Hello Bob,  \r\n"
           b"\tthe numbers are in.\r\n"
           b"\r\n"
           b"\r\n")


# -- helpers shared with tests/test_dmarc.py and the e2e tests ---------------


@pytest.fixture
def dns_server():
    """A running test DNS server, stopped after the test."""
    server = TestDNS()
    server.start()
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture
def resolver(dns_server: TestDNS):
    """A twisted.names resolver, built as the gateway builds it, that asks
    only the test server."""
    return make_resolver(DNSConfig(servers=dns_server.servers, timeout=2), reactor)


def run_now(f, *args):
    """A synchronous run_in_thread."""
    return defer.maybeDeferred(f, *args)


def plugin_context(tmp_path: Path, name: str, resolver: Any = None, run_in_thread: Any = run_now,
                   submission: bool = False, **server: Any) -> PluginContext:
    """A PluginContext over a parsed base config (C{server} overrides;
    C{submission} makes its listener "mx" a submission listener)."""
    doc = base_config(tmp_path, server=server)
    doc["listener"][0]["submission"] = submission
    return PluginContext(name, Clock(), resolver, parse_config(doc, str(tmp_path / "gateway.toml")),
                         run_in_thread)


def session(peer: str = "198.51.100.10", auth_user: str | None = None) -> Session:
    """A session from C{peer} (not in any trusted network by default)."""
    return Session(id="s1", listener="mx", peer=peer, auth_user=auth_user)


def spooled(tmp_path: Path, content: bytes) -> MessageView:
    """The view an IMessageCheck gets of C{content} spooled in C{tmp_path}."""
    path = tmp_path / f"msg{len(list(tmp_path.glob('msg*')))}.eml"
    path.write_bytes(content)
    header_block = content.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    return MessageView(_HEADER_PARSER.parsebytes(header_block), len(content), lambda: open(path, "rb"))


def with_fields(fields: tuple[tuple[str, str], ...], content: bytes) -> bytes:
    """The message as the gateway relays it: prepended fields, then content."""
    return "".join(f"{name}: {value}\r\n" for name, value in fields).encode("ascii") + content


def publish(dns: TestDNS, key: Any) -> None:
    """Serve a key's record from the test DNS server."""
    dns.add(key.record_name, "TXT", key.record)


def dnsfunc_for(*keys: Any):
    """A dkimpy dnsfunc answering the records of C{keys}."""
    records = {key.record_name: key.record.encode("ascii") for key in keys}

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name.decode("ascii").rstrip(".").lower())

    return dnsfunc


def dkimpy_results(message: bytes, *keys: Any) -> list[bool]:
    """dkimpy's verdict on every signature of C{message} (a body hash
    mismatch, which dkimpy raises, is False too)."""
    verifier = dkim.DKIM(message)
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    results = []
    for index in range(count):
        try:
            results.append(verifier.verify(index, dnsfunc=dnsfunc_for(*keys)))
        except dkim.ValidationError:
            results.append(False)
    return results


def result_of(d: Any) -> Any:
    """The result of a Deferred that has already fired (a synchronous
    run_in_thread makes the plugins answer at once), or a plain value."""
    if not isinstance(d, defer.Deferred):
        return d
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def tags(value: str) -> dict[str, str]:
    """A DKIM-Signature value's tags, white space removed."""
    return {k.decode(): "".join(v.decode().split()) for k, v in
            dkim.util.parse_tag_value(value.encode()).items()}


@pytest.fixture
def keys(tmp_path: Path):
    """An RSA and an Ed25519 key for example.org under tmp_path/keys."""
    keys_dir = tmp_path / "keys"
    rsa_key = write_key(str(keys_dir), "example.org", "r2026", "rsa")
    ed_key = write_key(str(keys_dir), "example.org", "e2026", "ed25519")
    return keys_dir, rsa_key, ed_key


# -- keys and records ---------------------------------------------------------


def test_rsa_record_is_the_spki_of_the_private_key(tmp_path: Path):
    """An RSA key's record is v=DKIM1; k=rsa; p=<base64 SubjectPublicKeyInfo>
    of the key written (2048 bits by default), named <s>._domainkey.<d>."""
    key = write_key(str(tmp_path), "Example.ORG", "Sel1", "rsa")
    assert (key.domain, key.selector, key.bits) == ("example.org", "sel1", 2048)
    assert key.record_name == "sel1._domainkey.example.org"
    prefix = "v=DKIM1; k=rsa; p="
    assert key.record.startswith(prefix)
    published = serialization.load_der_public_key(base64.b64decode(key.record[len(prefix):]))
    private = serialization.load_pem_private_key(Path(key.path).read_bytes(), None)
    assert published.public_numbers() == private.public_key().public_numbers()


def test_ed25519_record_is_the_raw_public_key(tmp_path: Path):
    """An Ed25519 record carries the 32-octet raw public key (RFC 8463 §4.2)."""
    key = write_key(str(tmp_path), "example.org", "ed", "ed25519")
    prefix = "v=DKIM1; k=ed25519; p="
    assert key.record.startswith(prefix) and key.bits == 256
    raw = base64.b64decode(key.record[len(prefix):])
    private = serialization.load_pem_private_key(Path(key.path).read_bytes(), None)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    assert raw == private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_zone_line_splits_into_character_strings(tmp_path: Path):
    """The zone line splits a 2048-bit record into quoted strings of at
    most 255 octets that join back to the record; a short record stays one
    string."""
    key = write_key(str(tmp_path), "example.org", "big", "rsa")
    chunks = txt_chunks(key.record)
    assert len(chunks) == 2 and all(len(c) <= 255 for c in chunks) and "".join(chunks) == key.record
    line = zone_line(key.record_name, key.record)
    assert line.startswith("big._domainkey.example.org. IN TXT ( \"")
    assert "".join(part for part in line.split('"')[1::2]) == key.record
    assert zone_line("e._domainkey.example.org", "v=DKIM1; k=ed25519; p=AAAA") == \
        'e._domainkey.example.org. IN TXT "v=DKIM1; k=ed25519; p=AAAA"'


def test_keygen_writes_mode_0600_and_never_overwrites(tmp_path: Path):
    """A key file is created 0600 in a 0700 domain folder, under the naming
    convention; making the same selector again is refused."""
    key = write_key(str(tmp_path), "example.org", "s1", "ed25519")
    assert key.path == str(tmp_path / "example.org" / "s1.ed25519.key")
    assert stat.S_IMODE(os.stat(key.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "example.org").st_mode) == 0o700
    before = Path(key.path).read_bytes()
    with pytest.raises(DKIMKeyError, match="exists"):
        write_key(str(tmp_path), "example.org", "s1", "ed25519")
    assert Path(key.path).read_bytes() == before


@pytest.mark.parametrize("selector", ["../evil", "a/b", "", "-x", "x-", "a..b", "sel ector", "s_1"])
def test_bad_selectors_are_refused(tmp_path: Path, selector: str):
    """Selectors must be DNS labels, so no selector names a path outside
    the domain's folder."""
    with pytest.raises(DKIMKeyError, match="bad selector"):
        key_path(str(tmp_path), "example.org", selector, "rsa")


def test_domains_are_canonical_and_literals_refused(tmp_path: Path):
    """An IDN domain's folder is its A-label form; an address literal or a
    malformed name is refused; an unknown algorithm too."""
    path = key_path(str(tmp_path), "bücher.example", "s", "ed25519")
    assert Path(path).parent.name == "xn--bcher-kva.example"
    for domain in ("[192.0.2.1]", "../etc", "example.org."):
        with pytest.raises(DKIMKeyError, match="bad domain"):
            key_path(str(tmp_path), domain, "s", "rsa")
    with pytest.raises(DKIMKeyError, match="unknown algorithm"):
        key_path(str(tmp_path), "example.org", "s", "dsa")


def test_keystore_sees_new_and_retired_keys(tmp_path: Path):
    """The store finds keys by file name alone, ignores other files, and
    sees a key added or removed at the next call (no reload)."""
    store = KeyStore(str(tmp_path))
    assert store.keys_for("example.org") == ()
    first = write_key(str(tmp_path), "example.org", "a", "rsa")
    (tmp_path / "example.org" / "README").write_text("notes")
    (tmp_path / "example.org" / "a.rsa.key.bak").write_text("old")
    assert [k.selector for k in store.keys_for("example.org")] == ["a"]
    write_key(str(tmp_path), "example.org", "b", "ed25519")
    assert [(k.selector, k.algorithm) for k in store.keys_for("example.org")] == [("a", "rsa"), ("b", "ed25519")]
    os.rename(first.path, first.path + ".retired")
    assert [k.selector for k in store.keys_for("example.org")] == ["b"]
    assert store.domains() == ["example.org"]


def test_key_files_from_other_tools_are_read(tmp_path: Path):
    """A PKCS#1 RSA PEM (openssl genrsa, opendkim-genkey) and a base64
    Ed25519 seed (dkimpy's dknewkey) are read; their records match."""
    folder = tmp_path / "example.org"
    folder.mkdir()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (folder / "old.rsa.key").write_bytes(rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    ed_key = ed25519.Ed25519PrivateKey.generate()
    seed = ed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    (folder / "dk.ed25519.key").write_bytes(base64.b64encode(seed) + b"\n")
    loaded = {k.selector: k for k in KeyStore(str(tmp_path)).keys_for("example.org")}
    assert loaded["old"].bits == 2048
    assert loaded["dk"].record.endswith(base64.b64encode(ed_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode())


def test_key_of_the_wrong_type_is_refused(tmp_path: Path):
    """A file whose name says rsa but which holds an Ed25519 key (or no
    key) is an error naming the file, not a silently skipped key."""
    key = write_key(str(tmp_path), "example.org", "x", "ed25519")
    wrong = Path(key.path).with_name("x.rsa.key")
    os.rename(key.path, wrong)
    with pytest.raises(DKIMKeyError, match="x.rsa.key: the file name says rsa"):
        load_key(str(wrong))
    wrong.write_text("not a key")
    with pytest.raises(DKIMKeyError, match="not a PEM private key"):
        KeyStore(str(tmp_path)).keys_for("example.org")


# -- the author domain --------------------------------------------------------


def headers_of(block: bytes):
    return _HEADER_PARSER.parsebytes(block + b"\r\n")


@pytest.mark.parametrize("block, domain", [
    (b"From: Alice <alice@Example.ORG>\r\n", "example.org"),
    (b"From: alice@example.org (Alice)\r\n", "example.org"),
    (b'From: "Smith, Alice" <alice@mail.example.org>\r\n', "mail.example.org"),
    (b"From: =?utf-8?q?J=C3=B6rg?= <j@example.org>\r\n", "example.org"),
    ("From: Jörg <jörg@bücher.example>\r\n".encode("utf-8"), "xn--bcher-kva.example"),
])
def test_author_domain(block: bytes, domain: str):
    """The author domain is the one From: address's domain, canonical
    (lower case, A-labels), whatever the display name."""
    assert author_domain(headers_of(block)) == domain


@pytest.mark.parametrize("block, error, text", [
    (b"To: b@example.net\r\n", AuthorError, "Message must have exactly one From: header"),
    (b"From: a@example.org\r\nFrom: a@evil.example\r\n", AmbiguousAuthorError,
     "Message must have exactly one From: header"),
    (b"From: a@example.org, b@evil.example\r\n", AmbiguousAuthorError, "From: header must hold exactly one address"),
    (b"From: undisclosed\r\n", AuthorError, "From: address has no domain"),
    (b"From: <>\r\n", AuthorError, "From: header holds no address"),
    (b"From: a@[192.0.2.1]\r\n", AuthorError, "address literal"),
])
def test_author_domain_refuses_ambiguity(block: bytes, error: type, text: str):
    """No From:, several From: fields or addresses, or no usable domain
    give an error whose text is the reply."""
    with pytest.raises(error) as info:
        author_domain(headers_of(block))
    assert text in str(info.value)


# -- signing ------------------------------------------------------------------


def test_dual_signature_round_trip(keys):
    """An RSA and an Ed25519 key give two signatures (rsa-sha256 and
    ed25519-sha256, relaxed/relaxed), each verified by dkimpy against the
    published record; From is oversigned and Received is not signed."""
    keys_dir, rsa_key, ed_key = keys
    message = read_for_dkim(io.BytesIO(MESSAGE))
    fields = sign_message(message, KeyStore(str(keys_dir)).keys_for("example.org"), Options())
    assert [name for name, _ in fields] == ["DKIM-Signature", "DKIM-Signature"]
    signed = [tags(value) for _, value in fields]
    assert sorted((t["a"], t["s"], t["d"], t["c"]) for t in signed) == [
        ("ed25519-sha256", "e2026", "example.org", "relaxed/relaxed"),
        ("rsa-sha256", "r2026", "example.org", "relaxed/relaxed")]
    assert signed[0]["h"] == "from:to:subject:date:message-id:mime-version:content-type:from"
    assert dkimpy_results(with_fields(fields, MESSAGE), rsa_key, ed_key) == [True, True]


def test_changes_after_signing_break_the_signature(keys):
    """A changed Subject, a changed body or a second From: added below
    (oversigning) make the signature fail; trailing white space and blank
    lines at the end do not (relaxed body canonicalization)."""
    keys_dir, rsa_key, _ = keys
    fields = sign_message(read_for_dkim(io.BytesIO(MESSAGE)), (rsa_key,), Options())
    signed = with_fields(fields, MESSAGE)
    assert dkimpy_results(signed, rsa_key) == [True]
    assert dkimpy_results(signed.replace(b"Quarterly", b"Monthly"), rsa_key) == [False]
    assert dkimpy_results(signed.replace(b"Hello Bob", b"Hello Eve"), rsa_key) == [False]
    extra_from = signed.replace(b"MIME-Version", b"From: mallory@evil.example\r\nMIME-Version")
    assert dkimpy_results(extra_from, rsa_key) == [False]
    assert dkimpy_results(signed.replace(b"Bob,  \r\n", b"Bob,\r\n") + b"\r\n", rsa_key) == [True]


def test_simple_canonicalization_survives_the_envelope(keys):
    """With c=simple/simple the signature field must reach the receiver
    byte for byte: the folded value the plugin returns, rendered as the
    gateway prepends it, verifies."""
    _, rsa_key, ed_key = keys
    options = Options(canonicalization="simple/simple")
    fields = sign_message(read_for_dkim(io.BytesIO(MESSAGE)), (rsa_key, ed_key), options)
    assert {tags(v)["c"] for _, v in fields} == {"simple/simple"}
    assert dkimpy_results(with_fields(fields, MESSAGE), rsa_key, ed_key) == [True, True]


def test_header_list_and_oversigning_options(keys):
    """Only configured fields present are signed, each instance once, in
    the configured order; oversign_from = false signs From once."""
    _, rsa_key, _ = keys
    content = b"From: a@example.org\r\nTo: x@example.net\r\nTo: y@example.net\r\nX-Other: 1\r\n\r\nhi\r\n"
    options = Options(headers=("To", "From", "Subject"), oversign_from=False)
    fields = sign_message(read_for_dkim(io.BytesIO(content)), (rsa_key,), options)
    assert tags(fields[0][1])["h"] == "to:to:from"
    assert dkimpy_results(with_fields(fields, content), rsa_key) == [True]


@pytest.mark.parametrize("table, message", [
    ({"headers": ["To", "Subject"]}, "must contain From"),
    ({"headers": ["From", "Received"]}, "received must not be signed"),
    ({"headers": ["From", "Bad Name"]}, "not a header field name"),
    ({"canonicalization": "relaxed"}, "canonicalization"),
    ({"canonicalization": "loose/simple"}, "canonicalization"),
    ({"oversign": True}, "unknown key"),
])
def test_bad_options_stop_startup(table: dict, message: str):
    """Option mistakes are config errors naming [plugins.dkim_sign]."""
    with pytest.raises(ConfigError, match=r"\[plugins.dkim_sign\]") as info:
        build_options(dkim_sign.factory, table, "gw.toml")
    assert message in str(info.value)


def test_large_message_with_long_lines_and_8bit_body(keys):
    """A 2 MB 8-bit body with 998-octet lines and trailing white space
    signs and verifies (the body is read in one piece, the header section
    through dkimpy's parser)."""
    _, rsa_key, _ = keys
    line = ("ü" * 400 + "x" * 190 + " \t ").encode("utf-8")
    assert len(line) == 993
    content = b"From: a@example.org\r\nSubject: big\r\n\r\n" + (line + b"\r\n") * 2100
    fields = sign_message(read_for_dkim(io.BytesIO(content)), (rsa_key,), Options())
    assert dkimpy_results(with_fields(fields, content), rsa_key) == [True]


# -- the dkim_sign plugin ------------------------------------------------------


def signer(tmp_path: Path, keys_dir: Path, submission: bool = False, **options: Any) -> DKIMSigner:
    context = plugin_context(tmp_path, "dkim_sign", submission=submission, trusted_networks=["192.0.2.0/30"])
    return dkim_sign.factory.build(Options(keys_dir=str(keys_dir), **options), context)


def test_signer_signs_for_trusted_and_authenticated_clients_only(tmp_path: Path, keys):
    """A trusted or authenticated client's message is signed with every key
    of the From: domain; anyone else's passes unsigned (skip)."""
    keys_dir, rsa_key, ed_key = keys
    plugin = signer(tmp_path, keys_dir)
    for client in (session("192.0.2.1"), session("198.51.100.7", auth_user="alice@example.org")):
        transaction = Transaction(sender=None)
        verdict = result_of(plugin.check_message(client, transaction, spooled(tmp_path, MESSAGE)))
        assert verdict.action is Action.CONTINUE and len(verdict.add_headers) == 2
        assert dkimpy_results(with_fields(verdict.add_headers, MESSAGE), rsa_key, ed_key) == [True, True]
        assert [(r.plugin, r.result) for r in transaction.results] == [("dkim_sign", "pass")]
    transaction = Transaction(sender=None)
    verdict = plugin.check_message(session("198.51.100.7"), transaction, spooled(tmp_path, MESSAGE))
    assert verdict.add_headers == () and [r.result for r in transaction.results] == ["skip"]


@pytest.mark.parametrize("block, text", [
    (b"To: b@example.net\r\nSubject: x\r\n", "Message must have exactly one From: header"),
    (b"From: a@example.org\r\nFrom: b@example.org\r\n", "Message must have exactly one From: header"),
    (b"From: a@example.org, b@example.net\r\n", "From: header must hold exactly one address"),
])
def test_signer_refuses_messages_without_one_author(tmp_path: Path, keys, block: bytes, text: str):
    """On a submission listener, from a client whose mail is signed, no
    From: or several give 550 5.6.0 with the reason; on another listener
    (trusted servers relaying) the message passes unsigned."""
    plugin = signer(tmp_path, keys[0], submission=True)
    verdict = plugin.check_message(session("192.0.2.1"), Transaction(sender=None),
                                   spooled(tmp_path, block + b"\r\nbody\r\n"))
    assert verdict.action is Action.REJECT
    assert (verdict.reply.code, verdict.reply.status, verdict.reply.text) == (550, "5.6.0", text)
    relaying = signer(tmp_path, keys[0])
    transaction = Transaction(sender=None)
    verdict = relaying.check_message(session("192.0.2.1"), transaction, spooled(tmp_path, block + b"\r\nbody\r\n"))
    assert verdict.action is Action.CONTINUE and verdict.add_headers == ()
    assert [r.result for r in transaction.results] == ["skip"]


def test_signer_without_key_and_with_subdomains(tmp_path: Path, keys):
    """A domain without keys passes unsigned; with subdomains = true a
    subdomain is signed with its parent's keys (d=example.org)."""
    content = MESSAGE.replace(b"alice@example.org", b"alice@news.example.org")
    transaction = Transaction(sender=None)
    verdict = result_of(signer(tmp_path, keys[0]).check_message(session("192.0.2.1"), transaction, spooled(tmp_path, content)))
    assert verdict.add_headers == ()
    assert [(r.result, r.detail) for r in transaction.results] == [("skip", "no key for news.example.org")]
    verdict = result_of(signer(tmp_path, keys[0], subdomains=True).check_message(
        session("192.0.2.1"), Transaction(sender=None), spooled(tmp_path, content)))
    assert {tags(v)["d"] for _, v in verdict.add_headers} == {"example.org"}


def test_signing_runs_in_the_thread_runner(tmp_path: Path, keys):
    """Reading the keys and the message and signing happen only inside
    context.run_in_thread, never on the caller's (the reactor's) thread."""
    calls = []

    def recording(f, *args):
        calls.append(f.__name__)
        return defer.maybeDeferred(f, *args)

    context = plugin_context(tmp_path, "dkim_sign", run_in_thread=recording, trusted_networks=["192.0.2.0/30"])
    store = KeyStore(str(keys[0]))
    original = store.keys_for
    store.keys_for = lambda domain: calls.append("keys_for") or original(domain)
    plugin = DKIMSigner(Options(keys_dir=str(keys[0])), context, store)
    result_of(plugin.check_message(session("192.0.2.1"), Transaction(sender=None),
                                                spooled(tmp_path, MESSAGE)))
    assert calls == ["sign_spooled", "keys_for"]


# -- gatewayctl dkim ------------------------------------------------------------


def ctl(config: Path, *argv: str) -> int:
    """Run a gatewayctl dkim command through add_dkim_commands."""
    import argparse

    parser = argparse.ArgumentParser(prog="gatewayctl")
    add_dkim_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["dkim", *argv, "-c", str(config)])
    return args.func(args)


def test_gatewayctl_keygen_and_show(tmp_path: Path, capsys):
    """keygen writes under [plugins.dkim_sign] keys_dir (mode 0600) and
    prints the zone line and the one-line record; show lists every key
    with its record; --json gives the same as data."""
    doc = base_config(tmp_path)
    doc["plugins"] = {"dkim_sign": {"keys_dir": str(tmp_path / "dkim")}}
    config = write_config(tmp_path, doc)
    assert ctl(config, "keygen", "example.org", "s2026") == 0
    out = capsys.readouterr().out
    path = tmp_path / "dkim" / "example.org" / "s2026.rsa.key"
    assert f"wrote {path} (rsa, 2048 bits, mode 0600)" in out
    assert 's2026._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=' in out
    key = load_key(str(path))
    assert key.record in out.splitlines()
    assert "once dkim_sign is in a listener's plugins" in out
    assert ctl(config, "keygen", "example.org", "e2026", "--algorithm", "ed25519", "--json") == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["algorithm"], row["mode"], row["name"]) == ("ed25519", "0600", "e2026._domainkey.example.org")
    assert ctl(config, "keygen", "example.org", "s2026") == 1
    assert "exists" in capsys.readouterr().err
    assert ctl(config, "show", "example.org") == 0
    out = capsys.readouterr().out
    assert "example.org selector s2026: rsa-sha256, 2048 bits" in out
    assert "example.org selector e2026: ed25519-sha256, 256 bits" in out
    assert ctl(config, "show", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert sorted(k["selector"] for k in data["keys"]) == ["e2026", "s2026"] and data["errors"] == []


def test_gatewayctl_validates_the_plugin_table(tmp_path: Path):
    """keys_dir is read through the plugin's own options type, so a typo
    in [plugins.dkim_sign] is the same config error as at start-up."""
    doc = base_config(tmp_path)
    doc["plugins"] = {"dkim_sign": {"key_dir": "x"}}
    with pytest.raises(ConfigError, match=r"\[plugins.dkim_sign\] key_dir: unknown key"):
        ctl(write_config(tmp_path, doc), "show")


# -- TXT look-ups ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lookup_txt_joins_strings_and_follows_cnames(dns_server: TestDNS, resolver):
    """Character-strings are joined without spaces; a CNAME (a key hosted
    by a provider) is followed; NXDOMAIN and NODATA are both []; SERVFAIL
    is temporary."""
    dns_server.add("s._domainkey.example.org", "CNAME", "s.keys.provider.example")
    dns_server.add("s.keys.provider.example", "TXT", ["v=DKIM1; k=ed25519; ", "p=AAAA"])
    dns_server.add("nodata.example.org", "A", "192.0.2.1")
    dns_server.set_servfail("broken.example.org")
    found = await defer.Deferred.fromCoroutine(lookup_txt(resolver, "S._domainkey.Example.ORG")).addTimeout(WAIT, reactor)
    assert found == [b"v=DKIM1; k=ed25519; p=AAAA"]
    assert await defer.Deferred.fromCoroutine(lookup_txt(resolver, "nowhere.example.org")) == []
    assert await defer.Deferred.fromCoroutine(lookup_txt(resolver, "nodata.example.org")) == []
    with pytest.raises(DNSTemporaryError):
        await defer.Deferred.fromCoroutine(lookup_txt(resolver, "broken.example.org"))


# -- the dkim_verify plugin ----------------------------------------------------


def verifier(tmp_path: Path, resolver, **options: Any) -> DKIMVerifier:
    return dkim_verify.factory.build(dkim_verify.Options(**options), plugin_context(tmp_path, "dkim_verify", resolver))


async def verify(plugin: DKIMVerifier, tmp_path: Path, content: bytes) -> tuple[Transaction, Any]:
    transaction = Transaction(sender=None)
    verdict = await defer.maybeDeferred(plugin.check_message, session(), transaction,
                                        spooled(tmp_path, content)).addTimeout(WAIT, reactor)
    return transaction, verdict


@pytest_twisted.ensureDeferred
async def test_verify_records_every_signature(tmp_path: Path, keys, dns_server: TestDNS, resolver):
    """Both signatures of a dual-signed message pass against keys served by
    DNS; the notes list result, d=, s=, a= per signature; the keys were
    asked of the gateway's resolver (the test server); no reply."""
    _, rsa_key, ed_key = keys
    publish(dns_server, rsa_key)
    publish(dns_server, ed_key)
    signed = with_fields(sign_message(read_for_dkim(io.BytesIO(MESSAGE)), (rsa_key, ed_key), Options()), MESSAGE)
    transaction, verdict = await verify(verifier(tmp_path, resolver), tmp_path, signed)
    assert verdict.action is Action.CONTINUE and verdict.add_headers == ()
    assert [(r["result"], r["domain"], r["selector"], r["algorithm"]) for r in transaction.notes["dkim"]] == [
        ("pass", "example.org", "r2026", "rsa-sha256"), ("pass", "example.org", "e2026", "ed25519-sha256")]
    assert all(len(r["header_b"]) == 12 for r in transaction.notes["dkim"])
    assert [(r.plugin, r.result) for r in transaction.results] == [("dkim_verify", "pass")]
    assert ("r2026._domainkey.example.org", "TXT") in dns_server.queries


@pytest_twisted.ensureDeferred
async def test_verify_failures_are_told_apart(tmp_path: Path, keys, dns_server: TestDNS, resolver):
    """A changed body fails; a missing key record, a revoked key (p=), a
    key of the other type, and rsa-sha1 are permerror; a SERVFAIL for the
    key is temperror; an unsigned message has no results."""
    keys_dir, rsa_key, ed_key = keys
    plugin = verifier(tmp_path, resolver)

    async def results_for(content: bytes) -> list[tuple[str, str]]:
        transaction, _ = await verify(plugin, tmp_path, content)
        return [(r["result"], r["reason"]) for r in transaction.notes["dkim"]]

    def signed_with(key, algorithm=None) -> bytes:
        message = read_for_dkim(io.BytesIO(MESSAGE))
        if algorithm:
            raw = message.sign(key.selector.encode(), key.domain.encode(), key.private,
                               signature_algorithm=algorithm, include_headers=[b"from"])
            return raw + MESSAGE
        return with_fields(sign_message(message, (key,), Options()), MESSAGE)

    publish(dns_server, rsa_key)
    assert await results_for(signed_with(rsa_key).replace(b"Hello Bob", b"Hello Eve")) == \
        [("fail", "body hash mismatch")]
    assert await results_for(signed_with(ed_key)) == [("permerror", "no key record at e2026._domainkey.example.org")]
    dns_server.add(ed_key.record_name, "TXT", "v=DKIM1; k=ed25519; p=")
    assert (await results_for(signed_with(ed_key)))[0][0] == "permerror"
    dns_server.remove(ed_key.record_name)
    dns_server.add(ed_key.record_name, "TXT", rsa_key.record)
    assert await results_for(signed_with(ed_key)) == [("permerror", "rsa key for a=ed25519-sha256")]
    assert await results_for(signed_with(rsa_key, b"rsa-sha1")) == [("permerror", "rsa-sha1 is not accepted (RFC 8301)")]
    dns_server.set_servfail(rsa_key.record_name)
    assert await results_for(signed_with(rsa_key)) == [
        ("temperror", "key record r2026._domainkey.example.org could not be fetched")]
    transaction, _ = await verify(plugin, tmp_path, MESSAGE)
    assert transaction.notes["dkim"] == [] and [r.result for r in transaction.results] == ["none"]


@pytest_twisted.ensureDeferred
async def test_verify_malformed_and_too_many_signatures(tmp_path: Path, keys, dns_server: TestDNS, resolver):
    """A signature missing tags is permerror (and nothing is looked up for
    it); only the first max_signatures are checked."""
    _, rsa_key, _ = keys
    publish(dns_server, rsa_key)
    good = sign_message(read_for_dkim(io.BytesIO(MESSAGE)), (rsa_key,), Options())
    broken = (("DKIM-Signature", "v=1; a=rsa-sha256; d=example.org; b=abc"),)
    transaction, _ = await verify(verifier(tmp_path, resolver, max_signatures=2), tmp_path,
                                  with_fields(broken + good + good, MESSAGE))
    assert [r["result"] for r in transaction.notes["dkim"]] == ["permerror", "pass"]
    assert transaction.notes["dkim"][0]["reason"].startswith("bad signature")
    assert [q for q in dns_server.queries if q[0].startswith("._domainkey")] == []
