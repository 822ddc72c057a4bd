"""Acceptance tests of the ESMTP server on real sockets, with the stdlib
smtplib (and raw sockets where smtplib would hide the bytes) as the peer."""

from __future__ import annotations

import re
import smtplib
import socket

import pytest
import pytest_twisted

from tests.support import base_config, client, in_thread, insecure_tls, queued, raw_session

ENHANCED = re.compile(rb"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3} ")


def message(subject: str = "test", body: str = "hello\r\n") -> bytes:
    return (f"From: a@example.org\r\nTo: b@example.test\r\nSubject: {subject}\r\n\r\n{body}").encode()


@pytest_twisted.ensureDeferred
async def test_ehlo_advertises_extensions(start_gateway, tmp_path):
    """EHLO lists PIPELINING, SIZE with the configured limit, 8BITMIME,
    ENHANCEDSTATUSCODES, SMTPUTF8 and STARTTLS on a starttls listener."""
    service = start_gateway(server={"max_message_size": 123456})
    port = service.port_of("mx")

    def talk():
        with client(port) as smtp:
            code, _ = smtp.ehlo("client.example.org")
            return code, dict(smtp.esmtp_features)

    code, features = await in_thread(talk)
    assert code == 250
    for keyword in ("pipelining", "8bitmime", "enhancedstatuscodes", "smtputf8", "starttls"):
        assert keyword in features
    assert features["size"] == "123456"


@pytest_twisted.ensureDeferred
async def test_message_is_queued_with_envelope_and_trace(start_gateway, tmp_path):
    """A message accepted with 250 is in the spool: envelope, content byte
    for byte, and a Received header naming HELO, client, protocol and id."""
    service = start_gateway()
    port = service.port_of("mx")
    content = message(body="line one\r\n.starts with a dot\r\n..two dots\r\n")

    def talk():
        with client(port) as smtp:
            smtp.ehlo("client.example.org")
            smtp.mail("sender@example.org")
            smtp.rcpt("rcpt@example.test")
            return smtp.data(content)

    code, text = await in_thread(talk)
    assert code == 250
    match = re.match(rb"2\.0\.0 Ok: queued as (\S+)", text)
    assert match, text
    queue_id = match.group(1).decode()
    entries = queued(tmp_path / "spool")
    assert len(entries) == 1
    envelope, stored = entries[0]
    assert envelope.queue_id == queue_id
    assert envelope.sender == "sender@example.org"
    assert [r.address for r in envelope.recipients] == ["rcpt@example.test"]
    assert stored == content
    received = envelope.prepend_headers[0]
    assert received.startswith("Received: from client.example.org (unknown [127.0.0.1])")
    assert f"with ESMTP id {queue_id}" in received
    assert "for <rcpt@example.test>" in received


@pytest_twisted.ensureDeferred
async def test_several_transactions_per_connection(start_gateway, tmp_path):
    """One connection can carry several transactions, each queued once."""
    service = start_gateway()
    port = service.port_of("mx")

    def talk():
        with client(port) as smtp:
            for n in range(3):
                smtp.sendmail("a@example.org", [f"u{n}@example.test"], message(f"n{n}"))

    await in_thread(talk)
    entries = queued(tmp_path / "spool")
    assert sorted(e.recipients[0].address for e, _ in entries) == ["u0@example.test", "u1@example.test", "u2@example.test"]


@pytest_twisted.ensureDeferred
async def test_fifty_recipients_store_one_copy(start_gateway, tmp_path):
    """A transaction with 50 recipients writes its content once: one data
    file and one envelope listing all 50 recipients."""
    service = start_gateway()
    port = service.port_of("mx")
    recipients = [f"user{n}@example.test" for n in range(50)]

    def talk():
        with client(port) as smtp:
            return smtp.sendmail("a@example.org", recipients, message())

    refused = await in_thread(talk)
    assert refused == {}
    assert len(list((tmp_path / "spool" / "data").iterdir())) == 1
    entries = queued(tmp_path / "spool")
    assert len(entries) == 1
    assert [r.address for r in entries[0][0].recipients] == recipients


@pytest_twisted.ensureDeferred
async def test_simple_commands_and_enhanced_codes(start_gateway):
    """VRFY answers 252, EXPN 502, HELP 214, NOOP/RSET 250, an unknown
    command 500; every reply but greeting and EHLO carries an enhanced code."""
    service = start_gateway()
    port = service.port_of("mx")
    commands = [b"EHLO c.example.org", b"VRFY root", b"EXPN staff", b"HELP", b"NOOP", b"RSET",
                b"FROB", b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.test>", b"RSET", b"QUIT"]
    out = await in_thread(raw_session, port, b"".join(c + b"\r\n" for c in commands))
    lines = out.split(b"\r\n")
    assert lines[0].startswith(b"220 ")
    replies = [l for l in lines[1:] if l and not l.startswith(b"250-") and l != b"250 STARTTLS"]
    assert [r[:3] for r in replies] == [b"252", b"502", b"214", b"250", b"250", b"500", b"250", b"250", b"250", b"221"]
    for reply in replies:
        assert ENHANCED.match(reply), reply
    assert b"252 2.5.0" in out and b"502 5.5.1" in out and b"500 5.5.2" in out


@pytest_twisted.ensureDeferred
async def test_relay_denied_for_untrusted_client(start_gateway, tmp_path):
    """A recipient outside local/relay domains from an untrusted client gets
    554 5.7.1 at RCPT, and nothing is queued."""
    service = start_gateway()
    port = service.port_of("mx")

    def talk():
        with client(port) as smtp:
            smtp.ehlo("c.example.org")
            smtp.mail("a@example.org")
            return smtp.rcpt("victim@elsewhere.example")

    code, text = await in_thread(talk)
    assert (code, text[:5]) == (554, b"5.7.1")
    assert queued(tmp_path / "spool") == []


@pytest_twisted.ensureDeferred
async def test_relay_allowed_from_trusted_network(start_gateway, tmp_path):
    """A client in trusted_networks may relay to any domain."""
    service = start_gateway(server={"trusted_networks": ["127.0.0.0/8"]})
    port = service.port_of("mx")

    def talk():
        with client(port) as smtp:
            return smtp.sendmail("a@example.org", ["someone@elsewhere.example"], message())

    assert await in_thread(talk) == {}
    assert [e.recipients[0].address for e, _ in queued(tmp_path / "spool")] == ["someone@elsewhere.example"]


@pytest_twisted.ensureDeferred
async def test_pipelined_replies_in_order(start_gateway, tmp_path):
    """A whole pipelined transaction in one packet gets its replies in
    command order, with the relay denial in the right place."""
    service = start_gateway()
    port = service.port_of("mx")
    payload = (b"EHLO c.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<x@elsewhere.example>\r\n"
               b"RCPT TO:<b@example.test>\r\nDATA\r\n" + message() + b".\r\nQUIT\r\n")
    out = await in_thread(raw_session, port, payload)
    codes = [l[:3] for l in out.split(b"\r\n") if l and not l.startswith(b"250-")]
    assert codes == [b"220", b"250", b"250", b"554", b"250", b"354", b"250", b"221"]
    assert len(queued(tmp_path / "spool")) == 1


@pytest_twisted.ensureDeferred
async def test_starttls_discards_pipelined_plaintext(start_gateway, tmp_path):
    """Commands sent in plaintext behind STARTTLS are never executed, and
    the session is reset: after the handshake MAIL needs a new EHLO."""
    service = start_gateway()
    port = service.port_of("mx")

    def talk():
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"EHLO c.example.org\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        sock.sendall(b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<b@example.test>\r\n")
        answer = reader.readline()
        tls = insecure_tls().wrap_socket(sock, server_hostname="mx.example.test")
        tls_reader = tls.makefile("rb")
        tls.sendall(b"MAIL FROM:<a@example.org>\r\n")
        after = tls_reader.readline()
        tls.sendall(b"EHLO c.example.org\r\n")
        ehlo = []
        while True:
            line = tls_reader.readline()
            ehlo.append(line)
            if line.startswith(b"250 "):
                break
        tls.sendall(b"MAIL FROM:<a@example.org>\r\n")
        mail = tls_reader.readline()
        tls.close()
        return answer, after, ehlo, mail

    answer, after, ehlo, mail = await in_thread(talk)
    assert answer.startswith(b"220 2.0.0")
    assert after.startswith(b"503 5.5.1"), after
    assert not any(b"STARTTLS" in line for line in ehlo)
    assert mail.startswith(b"250 2.1.0")


@pytest_twisted.ensureDeferred
async def test_starttls_required_refuses_mail_in_plaintext(start_gateway, tmp_path):
    """On a starttls-required listener MAIL before STARTTLS gets 530 5.7.0,
    and after STARTTLS the transaction goes through as ESMTPS."""
    doc = base_config(tmp_path)
    doc["listener"][0]["tls"] = "starttls-required"
    service = start_gateway(doc)
    port = service.port_of("mx")

    def talk():
        with client(port) as smtp:
            smtp.ehlo("c.example.org")
            refused = smtp.mail("a@example.org")
            smtp.rset()
            smtp.starttls(context=insecure_tls())
            smtp.ehlo("c.example.org")
            smtp.sendmail("a@example.org", ["b@example.test"], message())
            return refused

    code, text = await in_thread(talk)
    assert (code, text[:5]) == (530, b"5.7.0")
    [(envelope, _)] = queued(tmp_path / "spool")
    assert envelope.protocol == "ESMTPS"
    assert "using TLSv1." in envelope.prepend_headers[0]


@pytest_twisted.ensureDeferred
async def test_implicit_tls_listener(start_gateway, tmp_path):
    """An implicit-TLS listener (RFC 8314) speaks TLS from the first byte;
    smtplib.SMTP_SSL delivers a message through it."""
    doc = base_config(tmp_path)
    doc["listener"] = [{"name": "smtps", "address": "127.0.0.1", "port": 0, "tls": "implicit",
                        "plugins": ["relay_guard"]}]
    service = start_gateway(doc)
    port = service.port_of("smtps")

    def talk():
        with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=insecure_tls()) as smtp:
            smtp.ehlo("c.example.org")
            features = dict(smtp.esmtp_features)
            smtp.sendmail("a@example.org", ["b@example.test"], message())
            return features

    features = await in_thread(talk)
    assert "starttls" not in features
    [(envelope, _)] = queued(tmp_path / "spool")
    assert envelope.protocol == "ESMTPS"


@pytest_twisted.ensureDeferred
async def test_ipv6_listener(start_gateway, tmp_path):
    """A listener on ::1 accepts mail over IPv6, and the Received header
    carries an IPv6 address literal."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("::1 is not configured on this machine")
    doc = base_config(tmp_path)
    doc["listener"][0]["address"] = "::1"
    doc["server"]["trusted_networks"] = []
    service = start_gateway(doc)
    port = service.port_of("mx")

    def talk():
        with smtplib.SMTP("::1", port, timeout=10) as smtp:
            smtp.sendmail("a@example.org", ["b@example.test"], message())

    await in_thread(talk)
    [(envelope, _)] = queued(tmp_path / "spool")
    assert "[IPv6:::1]" in envelope.prepend_headers[0]


SMUGGLING = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r"]


@pytest.mark.parametrize("separator", SMUGGLING, ids=[repr(s) for s in SMUGGLING])
@pytest_twisted.ensureDeferred
async def test_smuggling_variants_never_end_data(start_gateway, tmp_path, separator):
    """A bare-LF/CR end-of-data look-alike never ends DATA: the smuggled
    transaction is not executed, the message is refused with 550 5.5.2, and
    exactly one message (the honest one after it) is queued."""
    service = start_gateway()
    port = service.port_of("mx")
    smuggled = (b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nsmuggled\r\n")
    payload = (b"EHLO c.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
               b"Subject: first\r\n\r\nfirst" + separator + smuggled + b"\r\n.\r\n"
               b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
               b"Subject: honest\r\n\r\nhonest\r\n.\r\nQUIT\r\n")
    out = await in_thread(raw_session, port, payload)
    codes = [l[:3] for l in out.split(b"\r\n") if l and not l.startswith(b"250-")]
    assert codes == [b"220", b"250", b"250", b"250", b"354", b"550", b"250", b"250", b"354", b"250", b"221"]
    assert b"550 5.5.2" in out
    entries = queued(tmp_path / "spool")
    assert len(entries) == 1
    assert b"Subject: honest" in entries[0][1]
    assert all(b"smuggled" not in content for _, content in entries)


@pytest_twisted.ensureDeferred
async def test_limits_on_the_wire(start_gateway, tmp_path):
    """Over-long command and text lines, SIZE over the limit, a message
    growing past SIZE while streaming and too many recipients each get
    their reply, and nothing of them is queued."""
    service = start_gateway(server={"max_message_size": 20000, "max_recipients": 3})
    port = service.port_of("mx")

    def talk():
        results = {}
        with client(port) as smtp:
            smtp.ehlo("c.example.org")
            results["command"] = smtp.docmd("NOOP " + "x" * 600)
            results["size_param"] = smtp.mail("a@example.org", ["SIZE=999999"])
            smtp.rset()
            smtp.mail("a@example.org")
            for n in range(3):
                smtp.rcpt(f"u{n}@example.test")
            results["rcpt"] = smtp.rcpt("u9@example.test")
            results["long_line"] = smtp.data(b"Subject: x\r\n\r\n" + b"y" * 1200 + b"\r\n")
            smtp.mail("a@example.org")
            smtp.rcpt("u@example.test")
            results["too_big"] = smtp.data(b"Subject: x\r\n\r\n" + (b"z" * 900 + b"\r\n") * 40)
            results["after"] = smtp.noop()
        return results

    results = await in_thread(talk)
    assert results["command"][0] == 500 and results["command"][1].startswith(b"5.5.2")
    assert results["size_param"][0] == 552 and results["size_param"][1].startswith(b"5.3.4")
    assert results["rcpt"][0] == 452 and results["rcpt"][1].startswith(b"4.5.3")
    assert results["long_line"][0] == 500 and results["long_line"][1].startswith(b"5.5.2")
    assert results["too_big"][0] == 552 and results["too_big"][1].startswith(b"5.3.4")
    assert results["after"][0] == 250
    assert queued(tmp_path / "spool") == []
    assert list((tmp_path / "spool" / "data").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_too_many_bad_commands_closes(start_gateway):
    """After max_bad_commands errors the server says 421 4.7.0 and closes."""
    service = start_gateway(limits={"max_bad_commands": 3})
    port = service.port_of("mx")
    out = await in_thread(raw_session, port, b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert out.rstrip().endswith(b"421 4.7.0 Too many errors, closing connection")
    assert b"250" not in out


@pytest_twisted.ensureDeferred
async def test_idle_timeout_closes_with_421(start_gateway):
    """A client idle longer than command_timeout gets 421 4.4.2 and is closed."""
    service = start_gateway(limits={"command_timeout": 0.3})
    port = service.port_of("mx")
    out = await in_thread(raw_session, port, b"EHLO c.example.org\r\n")
    assert out.rstrip().endswith(b"421 4.4.2 Timeout exceeded, closing connection")


@pytest_twisted.ensureDeferred
async def test_connection_limit_per_ip(start_gateway):
    """Connections beyond max_connections_per_ip get 421 4.7.0 at once."""
    service = start_gateway(limits={"max_connections_per_ip": 2})
    port = service.port_of("mx")

    def talk():
        first, second = client(port), client(port)
        third = socket.create_connection(("127.0.0.1", port), timeout=10)
        greeting = third.makefile("rb").readline()
        third.close()
        first.quit()
        second.quit()
        return greeting

    assert (await in_thread(talk)).startswith(b"421 4.7.0")


@pytest_twisted.ensureDeferred
async def test_unwritable_spool_gives_452(start_gateway, tmp_path):
    """When the spool cannot be written, the message gets 452 4.3.1 (after
    its final dot: small messages are written by the commit) and nothing is
    half-accepted."""
    service = start_gateway()
    port = service.port_of("mx")
    tmp_dir = tmp_path / "spool" / "tmp"
    tmp_dir.rmdir()
    tmp_dir.write_text("not a directory")

    def talk():
        with client(port) as smtp:
            smtp.ehlo("c.example.org")
            smtp.mail("a@example.org")
            smtp.rcpt("b@example.test")
            return smtp.data(b"Subject: x\r\n\r\nbody\r\n")

    code, text = await in_thread(talk)
    assert (code, text[:5]) == (452, b"4.3.1")
    assert queued(tmp_path / "spool") == []


@pytest_twisted.ensureDeferred
async def test_submission_listener_adds_date_and_message_id(start_gateway, tmp_path):
    """On a submission listener a message without Date: and Message-ID:
    gets both (RFC 6409 §8); one that has them keeps its own."""
    doc = base_config(tmp_path, server={"trusted_networks": ["127.0.0.0/8"]})
    doc["listener"][0]["submission"] = True
    service = start_gateway(doc)
    port = service.port_of("mx")

    def talk():
        with client(port) as smtp:
            smtp.sendmail("a@example.org", ["b@example.test"], b"Subject: bare\r\n\r\nbody\r\n")
            smtp.sendmail("a@example.org", ["b@example.test"],
                          b"Subject: full\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
                          b"Message-ID: <own@example.org>\r\n\r\nbody\r\n")

    await in_thread(talk)
    entries = sorted(queued(tmp_path / "spool"), key=lambda e: e[0].received_at)
    bare, full = (e[0].prepend_headers for e in entries)
    assert any(h.startswith("Date: ") for h in bare)
    assert any(re.match(r"Message-ID: <[^@>]+@mx\.example\.test>$", h) for h in bare)
    assert not any(h.startswith(("Date:", "Message-ID:")) for h in full)


@pytest_twisted.ensureDeferred
async def test_received_header_names_forward_confirmed_client(start_gateway, tmp_path):
    """With reverse_lookup on, the Received header carries the client's PTR
    name when it resolves back to the client's address, and "unknown"
    when it does not (a forged PTR)."""
    from tests.dnsserver import TestDNS

    dns_server = TestDNS()
    dns_server.start()
    try:
        dns_server.add("7.0.0.127.in-addr.arpa", "PTR", "client7.example.org")
        dns_server.add("client7.example.org", "A", "127.0.0.7")
        dns_server.add("8.0.0.127.in-addr.arpa", "PTR", "liar.example.org")
        dns_server.add("liar.example.org", "A", "192.0.2.1")
        service = start_gateway(dns={"servers": [dns_server.address], "timeout": 2, "reverse_lookup": True})
        port = service.port_of("mx")

        def talk(source):
            with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0)) as smtp:
                smtp.sendmail("a@example.org", ["b@example.test"], message(source))

        await in_thread(talk, "127.0.0.7")
        await in_thread(talk, "127.0.0.8")
    finally:
        await dns_server.stop()
    received = sorted(e.prepend_headers[0] for e, _ in queued(tmp_path / "spool"))
    assert any("(client7.example.org [127.0.0.7])" in r for r in received), received
    assert any("(unknown [127.0.0.8])" in r for r in received), received


@pytest_twisted.ensureDeferred
async def test_forged_authentication_results_removed(start_gateway, tmp_path):
    """On the MX listener an incoming Authentication-Results that claims our
    authserv-id (the hostname) is removed, one for another authserv-id is
    kept, and exactly one of ours is added."""
    service = start_gateway()
    port = service.port_of("mx")
    content = (b"Authentication-Results: MX.example.test; spf=pass smtp.mailfrom=evil.example;\r\n"
               b"\tdkim=pass header.d=bank.example\r\n"
               b"Authentication-Results: other.example; spf=fail smtp.mailfrom=x.example\r\n"
               b"Subject: forged\r\n\r\nbody\r\n")

    def talk():
        with client(port) as smtp:
            smtp.sendmail("a@example.org", ["b@example.test"], content)

    await in_thread(talk)
    [(envelope, stored)] = queued(tmp_path / "spool")
    assert b"bank.example" not in stored and b"MX.example.test" not in stored
    assert stored == (b"Authentication-Results: other.example; spf=fail smtp.mailfrom=x.example\r\n"
                      b"Subject: forged\r\n\r\nbody\r\n")
    ours = [h for h in envelope.prepend_headers if h.startswith("Authentication-Results:")]
    assert ours == ["Authentication-Results: mx.example.test; none"]
