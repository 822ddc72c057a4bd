"""Acceptance tests of DKIM signing, DKIM verification and DMARC on real
sockets: the gateway runs in-process on 127.0.0.1 (port 0), its resolver
points at the twisted.names test DNS server, which serves the DKIM key
records and DMARC policies; clients are the stdlib smtplib in a thread.

Signatures made by the gateway (dkimpy) are checked by Mail::DKIM, a
verifier the gateway does not use (tests/dkim_verify.pl, Debian
libmail-dkim-perl and libnet-dns-perl), which fetches the keys from the
same test DNS server.  Mail::DKIM 1.20230212 (Debian 12) does not know
ed25519-sha256 (it reports such a signature "invalid (unsupported
algorithm ed25519-sha256)"), so Ed25519 signatures are verified with dkimpy instead, its
key fetched from the test DNS server with dnspython.
"""

from __future__ import annotations

import json
import shutil
import smtplib
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from gateway.credentials import UsersFile
from gateway.dkimkeys import write_key
from tests.dnsserver import TestDNS
from tests.support import REPO, base_config, client, in_thread, insecure_tls, queued
from tests.test_dkim import dns_server  # noqa: F401 (fixture)

USER, PASSWORD = "alice@example.org", "secret"
PERL_SCRIPT = REPO / "tests" / "dkim_verify.pl"


def _mail_dkim_missing() -> str | None:
    """Why Mail::DKIM cannot run here, or None when it can."""
    if shutil.which("perl") is None:
        return "perl is not installed"
    probe = subprocess.run(["perl", "-MMail::DKIM::Verifier", "-MNet::DNS", "-MJSON::PP", "-e", "1"],
                           capture_output=True, timeout=30)
    if probe.returncode != 0:
        return ("Mail::DKIM or Net::DNS is missing (apt-get install libmail-dkim-perl libnet-dns-perl): "
                + probe.stderr.decode(errors="replace").splitlines()[0])
    return None


MAIL_DKIM_MISSING = _mail_dkim_missing()
needs_mail_dkim = pytest.mark.skipif(MAIL_DKIM_MISSING is not None, reason=str(MAIL_DKIM_MISSING))

PLAIN = (b"From: Alice <alice@{domain}>\r\n"
         b"To: bob@example.net\r\n"
         b"Subject: Plain message\r\n"
         b"Date: Mon, 02 Feb 2026 10:00:00 +0000\r\n"
         b"Message-ID: <plain@example.org>\r\n"
         b"\r\n"
         b"Hello Bob,\r\n\r\nsee you at noon.\r\n")

LONG_LINES = (b"From: alice@{domain}\r\n"
              b"To: bob@example.net\r\n"
              b"Subject:   Long    lines\t and  spaces  \r\n"
              b"Date: Mon, 02 Feb 2026 10:00:00 +0000\r\n"
              b"Message-ID: <long@example.org>\r\n"
              b"\r\n"
              + (b"x" * 990 + b"   \r\n")
              + b"words  separated \t by   runs of white space   \t\r\n"
              + (b"y " * 498 + b"\r\n")
              + b"trailing blank lines follow\r\n\r\n\r\n\r\n")

EIGHT_BIT = ("From: Jörg <alice@{domain}>\r\n"
             "To: bob@example.net\r\n"
             "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
             "Date: Mon, 02 Feb 2026 10:00:00 +0000\r\n"
             "Message-ID: <8bit@example.org>\r\n"
             "MIME-Version: 1.0\r\n"
             "Content-Type: text/plain; charset=utf-8\r\n"
             "Content-Transfer-Encoding: 8bit\r\n"
             "\r\n"
             "Grüße aus Köln — ½ € für alle.  \r\n"
             "日本語のテキスト\r\n").encode("utf-8")

MESSAGES = {"plain": PLAIN, "long lines and trailing spaces": LONG_LINES, "8-bit UTF-8 body": EIGHT_BIT}


@pytest.fixture
def world(tmp_path: Path, dns_server: TestDNS):
    """Keys made the way gatewayctl makes them and published in the test
    DNS server: RSA for rsa.example, Ed25519 for ed.example, both for
    example.org (dual); DMARC policies for example.org (reject),
    example.net (none); none for example.com.  A users file with alice."""
    keys_dir = tmp_path / "dkim"
    keys = {
        "rsa": write_key(str(keys_dir), "rsa.example", "r1", "rsa"),
        "ed25519": write_key(str(keys_dir), "ed.example", "e1", "ed25519"),
        "dual-rsa": write_key(str(keys_dir), "example.org", "r2026", "rsa"),
        "dual-ed25519": write_key(str(keys_dir), "example.org", "e2026", "ed25519"),
    }
    for key in keys.values():
        dns_server.add(key.record_name, "TXT", key.record)
    dns_server.add("_dmarc.example.org", "TXT", "v=DMARC1; p=reject; rua=mailto:dmarc@example.org")
    dns_server.add("_dmarc.example.net", "TXT", "v=DMARC1; p=none")
    users = UsersFile(str(tmp_path / "users"))
    users.set(USER, PASSWORD, must_exist=False)
    return keys


def gateway_config(tmp_path: Path, dns_server: TestDNS, *, plugin_dirs: tuple[str, ...] = (),
                   mx_plugins: tuple[str, ...] = ("relay_guard", "dkim_verify", "dmarc"),
                   trusted: tuple[str, ...] = ()) -> dict[str, Any]:
    """Two listeners: "submission" (STARTTLS, AUTH, dkim_sign) and "mx"
    (dkim_verify, dmarc); DNS from the test server."""
    doc = base_config(tmp_path, server={"trusted_networks": list(trusted), "plugin_dirs": list(plugin_dirs)},
                      dns={"servers": [dns_server.address], "timeout": 2})
    doc["auth"] = {"users_file": str(tmp_path / "users")}
    doc["listener"] = [
        {"name": "submission", "address": "127.0.0.1", "port": 0, "tls": "starttls", "auth": True,
         "plugins": ["relay_guard", "dkim_sign"]},
        {"name": "mx", "address": "127.0.0.1", "port": 0, "tls": "starttls", "plugins": list(mx_plugins)},
    ]
    doc["plugins"] = {"dkim_sign": {"keys_dir": str(tmp_path / "dkim")}}
    return doc


def submit(port: int, content: bytes, eight_bit: bool = False):
    """Send over STARTTLS with AUTH; return the DATA reply (blocking)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.starttls(context=insecure_tls())
        smtp.login(USER, PASSWORD)
        smtp.mail(USER, ["BODY=8BITMIME"] if eight_bit else [])
        smtp.rcpt("bob@example.net")
        return smtp.data(content)


def deliver(port: int, sender: str, content: bytes):
    """Send to the MX listener as an untrusted client; the DATA reply."""
    with client(port) as smtp:
        smtp.ehlo("mx.sender.example")
        smtp.mail(sender, ["BODY=8BITMIME"])
        smtp.rcpt("bob@example.test")
        return smtp.data(content)


def relayed(envelope: Any, content: bytes) -> bytes:
    """The message as the gateway relays it (prepended fields, content)."""
    return "".join(h + "\r\n" for h in envelope.prepend_headers).encode("utf-8") + content


def mail_dkim(dns_server: TestDNS, message: bytes) -> dict[str, Any]:
    """Mail::DKIM's verdict (blocking; keys from the test DNS server)."""
    done = subprocess.run(["perl", str(PERL_SCRIPT), str(dns_server.port)], input=message,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return json.loads(done.stdout)


def dkimpy_over_dns(dns_server: TestDNS, message: bytes) -> list[bool]:
    """dkimpy's verdict on every signature, keys fetched from the test DNS
    server with dnspython (blocking)."""
    import dkim
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = dns_server.port
    resolver.lifetime = 5

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode("ascii"), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)

    verifier = dkim.DKIM(message)
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    return [verifier.verify(index, dnsfunc=dnsfunc) for index in range(count)]


def signature_fields(envelope: Any) -> list[str]:
    return [h for h in envelope.prepend_headers if h.startswith("DKIM-Signature:")]


# -- signing ------------------------------------------------------------------


@needs_mail_dkim
@pytest.mark.parametrize("kind", list(MESSAGES))
@pytest_twisted.ensureDeferred
async def test_rsa_signature_verified_by_mail_dkim(start_gateway, tmp_path, dns_server, world, kind):
    """An authenticated submission is signed rsa-sha256 (relaxed/relaxed);
    Mail::DKIM, fetching the key from DNS, says pass, for a plain message,
    one with 990-octet lines and trailing white space, and an 8-bit UTF-8
    body sent with BODY=8BITMIME; and fail once a line is added."""
    service = start_gateway(gateway_config(tmp_path, dns_server))
    content = MESSAGES[kind].replace(b"{domain}", b"rsa.example")
    code, text = await in_thread(submit, service.port_of("submission"), content, kind == "8-bit UTF-8 body")
    assert code == 250, text
    [(envelope, spooled)] = queued(tmp_path / "spool")
    assert spooled == content
    [field] = signature_fields(envelope)
    assert "a=rsa-sha256" in field and "c=relaxed/relaxed" in field and "s=r1" in field
    verdict = await in_thread(mail_dkim, dns_server, relayed(envelope, spooled))
    assert verdict["result"] == "pass", verdict
    assert [(s["result"], s["domain"], s["selector"], s["algorithm"]) for s in verdict["signatures"]] == [
        ("pass", "rsa.example", "r1", "rsa-sha256")]
    assert ("r1._domainkey.rsa.example", "TXT") in dns_server.queries
    tampered = await in_thread(mail_dkim, dns_server, relayed(envelope, spooled) + b"P.S. added later\r\n")
    assert tampered["result"] == "fail", tampered


@pytest.mark.parametrize("kind", list(MESSAGES))
@pytest_twisted.ensureDeferred
async def test_ed25519_signature_verifies(start_gateway, tmp_path, dns_server, world, kind):
    """An Ed25519 key signs ed25519-sha256; dkimpy, fetching the key from
    the test DNS server, verifies it.  Mail::DKIM (when present) must not
    call it a failure: it passes it or reports the algorithm unsupported."""
    service = start_gateway(gateway_config(tmp_path, dns_server))
    content = MESSAGES[kind].replace(b"{domain}", b"ed.example")
    code, text = await in_thread(submit, service.port_of("submission"), content, kind == "8-bit UTF-8 body")
    assert code == 250, text
    [(envelope, spooled)] = queued(tmp_path / "spool")
    [field] = signature_fields(envelope)
    assert "a=ed25519-sha256" in field
    message = relayed(envelope, spooled)
    assert await in_thread(dkimpy_over_dns, dns_server, message) == [True]
    if MAIL_DKIM_MISSING is None:
        [signature] = (await in_thread(mail_dkim, dns_server, message))["signatures"]
        assert signature["result"] == "pass" or signature["detail"] == "invalid (unsupported algorithm ed25519-sha256)", signature


@pytest_twisted.ensureDeferred
async def test_dual_signing_puts_two_signatures_on(start_gateway, tmp_path, dns_server, world):
    """A domain with an RSA and an Ed25519 key gets both signatures; dkimpy
    verifies both; Mail::DKIM passes the message on the RSA one.  Date:
    and Message-ID:, missing from the client's message, are added by the
    submission listener below the signatures and are not signed."""
    service = start_gateway(gateway_config(tmp_path, dns_server))
    content = (b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: dual\r\n\r\n"
               b"Two signatures, one message.\r\n")
    code, text = await in_thread(submit, service.port_of("submission"), content)
    assert code == 250, text
    [(envelope, spooled)] = queued(tmp_path / "spool")
    fields = signature_fields(envelope)
    assert sorted("a=ed25519-sha256" in f for f in fields) == [False, True]
    names = [h.split(":", 1)[0] for h in envelope.prepend_headers]
    assert names == ["Received", "DKIM-Signature", "DKIM-Signature", "Date", "Message-ID"]
    assert all("date" not in f.split("h=")[1].split(";")[0] for f in fields)
    message = relayed(envelope, spooled)
    assert await in_thread(dkimpy_over_dns, dns_server, message) == [True, True]
    if MAIL_DKIM_MISSING is None:
        verdict = await in_thread(mail_dkim, dns_server, message)
        assert verdict["result"] == "pass"
        assert {s["algorithm"]: s["result"] for s in verdict["signatures"]}["rsa-sha256"] == "pass"


@pytest.mark.parametrize("header, text", [
    (b"To: bob@example.net\r\n", b"5.6.0 Message must have exactly one From: header"),
    (b"From: alice@example.org\r\nFrom: ceo@example.org\r\n", b"5.6.0 Message must have exactly one From: header"),
])
@pytest_twisted.ensureDeferred
async def test_submission_without_one_from_is_refused(start_gateway, tmp_path, dns_server, world, header, text):
    """On submission, a message with no From: or two is refused with
    550 5.6.0 and not queued (the connection goes on)."""
    service = start_gateway(gateway_config(tmp_path, dns_server))
    code, reply = await in_thread(submit, service.port_of("submission"), header + b"Subject: x\r\n\r\nbody\r\n")
    assert (code, reply) == (550, text)
    assert queued(tmp_path / "spool") == []


@pytest_twisted.ensureDeferred
async def test_trusted_network_is_signed_and_others_are_not(start_gateway, tmp_path, dns_server, world):
    """A client in trusted_networks is signed without AUTH; the same message
    from an untrusted client to the MX listener is not."""
    service = start_gateway(gateway_config(tmp_path, dns_server, trusted=("127.0.0.0/8",),
                                           mx_plugins=("relay_guard", "dkim_sign")))
    content = PLAIN.replace(b"{domain}", b"rsa.example")
    await in_thread(deliver, service.port_of("mx"), "alice@rsa.example", content)
    [(envelope, spooled)] = queued(tmp_path / "spool")
    assert len(signature_fields(envelope)) == 1
    if MAIL_DKIM_MISSING is None:
        assert (await in_thread(mail_dkim, dns_server, relayed(envelope, spooled)))["result"] == "pass"


# -- verification and DMARC on the MX listener ---------------------------------


@pytest_twisted.ensureDeferred
async def test_signed_submission_passes_dmarc_reject_on_the_mx(start_gateway, tmp_path, dns_server, world):
    """Signed on submission, then sent (as relayed) to the MX listener:
    dkim_verify passes both signatures and DMARC p=reject passes, so it is
    queued untagged; the same message with its signatures removed is
    refused with 550 5.7.1 and not queued."""
    service = start_gateway(gateway_config(tmp_path, dns_server))
    content = PLAIN.replace(b"{domain}", b"example.org")
    await in_thread(submit, service.port_of("submission"), content)
    [(envelope, spooled)] = queued(tmp_path / "spool")
    signed = relayed(envelope, spooled)
    code, text = await in_thread(deliver, service.port_of("mx"), "bounces@example.org", signed)
    assert code == 250, text
    assert len(queued(tmp_path / "spool")) == 2
    arrived = [e for e, _ in queued(tmp_path / "spool") if e.listener == "mx"][0]
    assert not any(h.startswith("X-DMARC-Result") for h in arrived.prepend_headers)
    code, text = await in_thread(deliver, service.port_of("mx"), "bounces@example.org", content)
    assert (code, text) == (550, b"5.7.1 Message rejected by the DMARC policy of example.org: "
                                 b"no aligned DKIM signature or SPF pass for example.org")
    assert len(queued(tmp_path / "spool")) == 2


@pytest_twisted.ensureDeferred
async def test_dmarc_reject_with_a_foreign_signature(start_gateway, tmp_path, dns_server, world):
    """A valid signature of another domain (d=rsa.example) does not align
    with From: example.org: p=reject refuses it, nothing is queued."""
    service = start_gateway(gateway_config(tmp_path, dns_server))
    await in_thread(submit, service.port_of("submission"), PLAIN.replace(b"{domain}", b"rsa.example"))
    [(envelope, spooled)] = queued(tmp_path / "spool")
    spoofed = relayed(envelope, spooled).replace(b"From: Alice <alice@rsa.example>", b"From: ceo@example.org")
    code, text = await in_thread(deliver, service.port_of("mx"), "x@rsa.example", spoofed)
    assert (code, text[:5]) == (550, b"5.7.1")
    assert len(queued(tmp_path / "spool")) == 1


@pytest_twisted.ensureDeferred
async def test_dmarc_none_is_tagged_and_no_record_is_not(start_gateway, tmp_path, dns_server, world):
    """An unsigned message from a p=none domain is queued with the
    X-DMARC-Result tag; one from a domain without a DMARC record is
    queued untagged."""
    service = start_gateway(gateway_config(tmp_path, dns_server))
    port = service.port_of("mx")
    for domain in (b"example.net", b"example.com"):
        code, _ = await in_thread(deliver, port, "x@" + domain.decode(), PLAIN.replace(b"{domain}", domain))
        assert code == 250
    tags = {e.sender: [h for h in e.prepend_headers if h.startswith("X-DMARC-Result")]
            for e, _ in queued(tmp_path / "spool")}
    assert tags == {"x@example.net": ["X-DMARC-Result: fail (p=none dis=none) header.from=example.net"],
                    "x@example.com": []}
    assert ("_dmarc.example.com", "TXT") in dns_server.queries


SPF_STUB = '''
"""spf_stub: stands in for the spf plugin; records an SPF pass for the
MAIL FROM domain in transaction.notes["spf"], as the spf plugin does."""

from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from gateway.interfaces import IMailCheck, IPluginFactory
from gateway.verdict import CONTINUE


@implementer(IMailCheck)
class Stub:
    def check_mail(self, session, transaction, sender):
        if sender is not None:
            transaction.notes["spf"] = {"result": "pass", "domain": sender.domain}
        return CONTINUE


@provider(IPlugin, IPluginFactory)
class factory:
    name = "spf_stub"
    options_type = None
    description = "test stand-in for spf"

    @staticmethod
    def build(options, context):
        return Stub()
'''


@pytest_twisted.ensureDeferred
async def test_dmarc_passes_on_aligned_spf(start_gateway, tmp_path, dns_server, world):
    """With an SPF pass for a MAIL FROM domain in the same organisation
    (transaction.notes["spf"]), an unsigned message passes p=reject; an SPF
    pass for another organisation does not."""
    folder = tmp_path / "stubs"
    folder.mkdir()
    (folder / "spf_stub.py").write_text(SPF_STUB)
    service = start_gateway(gateway_config(tmp_path, dns_server, plugin_dirs=(str(folder),),
                                           mx_plugins=("relay_guard", "spf_stub", "dkim_verify", "dmarc")))
    content = PLAIN.replace(b"{domain}", b"example.org")
    code, _ = await in_thread(deliver, service.port_of("mx"), "bounces@mail.example.org", content)
    assert code == 250
    code, text = await in_thread(deliver, service.port_of("mx"), "bounces@example.net", content)
    assert (code, text[:5]) == (550, b"5.7.1")
    assert [e.sender for e, _ in queued(tmp_path / "spool")] == ["bounces@mail.example.org"]
