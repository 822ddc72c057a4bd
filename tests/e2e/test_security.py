"""Acceptance tests of "Submission security" on real sockets: the relay
guard against every address trick, SMTP AUTH (only over TLS, its edge
cases, throttling, sender authorisation, users file edits taking effect
live), implicit TLS, SNI certificate choice and TLS handshake failures.

The gateway runs in-process on 127.0.0.1 port 0 (as with the
C{start_gateway} fixture); the client side is a small blocking line client
on a raw socket (so the exact bytes of AUTH exchanges and odd RCPT paths
reach the server unchanged), or smtplib, always in a thread with a bounded
wait.  Sockets have timeouts; log waits poll a bounded number of times.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.logger import formatEvent, globalLogPublisher

from gateway.credentials import UsersFile
from gateway.tls import ensure_certificate
from tests.support import (
    REPO,
    base_config,
    in_thread,
    insecure_tls,
    queued,
    render_toml,
    subprocess_env,
    toml_value,
)

USER, PASSWORD = "alice@example.test", "secret"
BOB, BOB_PASSWORD = "bob@example.test", "bob-secret"
WRONG = "Wr0ng-Passw0rd!"
SOCKET_TIMEOUT = 10.0
# The largest AUTH response RFC 4954 section 4 obliges a server to take.
AUTH_RESPONSE_LIMIT = 12288

DENIED = (554, "5.7.1")
BAD_RECIPIENT = (501, "5.1.3")
NON_ASCII = (553, "5.6.7")
RCPT_OK = (250, "2.1.5")


# -- a line-level SMTP client -------------------------------------------------


class Answer(NamedTuple):
    """One SMTP reply: its code (0 when the server closed instead) and lines."""

    code: int
    lines: tuple[bytes, ...]

    @property
    def status(self) -> str:
        """The enhanced status code of the last line, or ""."""
        if not self.lines:
            return ""
        match = re.match(rb"^\d{3}[ -](\d\.\d{1,3}\.\d{1,3}) ", self.lines[-1] + b" ")
        return match.group(1).decode() if match else ""

    @property
    def text(self) -> bytes:
        """The last line after the code and separator."""
        return self.lines[-1][4:] if self.lines else b""

    @property
    def pair(self) -> tuple[int, str]:
        return self.code, self.status


class Wire:
    """A blocking SMTP client that sends exactly the lines it is given.

    Use from a thread only (in_thread).  Every read is bounded by the
    socket timeout.
    """

    def __init__(self, port: int, *, implicit: bool = False, source: str | None = None,
                 server_hostname: str | None = "mx.example.test",
                 context: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=SOCKET_TIMEOUT,
            source_address=(source, 0) if source else None)
        if implicit:
            self.sock = (context or insecure_tls()).wrap_socket(self.sock, server_hostname=server_hostname)
        self.reader = self.sock.makefile("rb")
        self.greeting = self.reply()

    def __enter__(self) -> "Wire":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def reply(self) -> Answer:
        lines = []
        while True:
            line = self.reader.readline(100_000)
            if not line:
                return Answer(0, tuple(lines))
            line = line.rstrip(b"\r\n")
            lines.append(line)
            if len(line) < 4 or line[3:4] == b" ":
                return Answer(int(line[:3]), tuple(lines))

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode("utf-8") if isinstance(data, str) else data)

    def cmd(self, line: bytes | str) -> Answer:
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.send(line + b"\r\n")
        return self.reply()

    def ehlo(self, name: str = "client.example.org") -> Answer:
        answer = self.cmd(f"EHLO {name}")
        assert answer.code == 250, answer
        return answer

    def starttls(self, server_hostname: str | None = "mx.example.test",
                 context: ssl.SSLContext | None = None) -> None:
        answer = self.cmd("STARTTLS")
        assert answer.pair == (220, "2.0.0"), answer
        self.sock = (context or insecure_tls()).wrap_socket(self.sock, server_hostname=server_hostname)
        self.reader = self.sock.makefile("rb")

    def tls_ready(self) -> "Wire":
        """EHLO, STARTTLS, EHLO again."""
        self.ehlo()
        self.starttls()
        self.ehlo()
        return self

    def auth_plain(self, user: str = USER, password: str = PASSWORD, authzid: str = "") -> Answer:
        return self.cmd("AUTH PLAIN " + plain(user, password, authzid))

    def message(self, subject: str, body: str = "hello") -> Answer:
        """DATA with a small message; returns the reply to the final dot
        (or the refusal of DATA)."""
        answer = self.cmd("DATA")
        if answer.code != 354:
            return answer
        return self.cmd(f"Subject: {subject}\r\nFrom: <{USER}>\r\n\r\n{body}\r\n.")


def b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def plain(user: str, password: str, authzid: str = "") -> str:
    """An RFC 4616 PLAIN message, base64."""
    return b64(f"{authzid}\0{user}\0{password}")


def ehlo_keywords(answer: Answer) -> list[bytes]:
    return [line[4:] for line in answer.lines[1:]]


# -- starting the gateway ----------------------------------------------------


def render(doc: dict[str, Any]) -> str:
    """tests.support.render_toml plus the two nested tables it cannot
    write: [auth.senders] (keys are addresses) and [tls.sni."name"]."""
    doc = copy.deepcopy(doc)
    senders = doc.get("auth", {}).pop("senders", None)
    sni = doc.get("tls", {}).pop("sni", None)
    out = [render_toml(doc)]
    if senders:
        out.append("[auth.senders]")
        out.extend(f"{toml_value(user)} = {toml_value(allowed)}" for user, allowed in senders.items())
        out.append("")
    for name, pair in (sni or {}).items():
        out.append(f"[tls.sni.{toml_value(name)}]")
        out.extend(f"{key} = {toml_value(value)}" for key, value in pair.items())
        out.append("")
    return "\n".join(out)


@pytest.fixture
def run_gateway(tmp_path: Path) -> Callable[..., Any]:
    """Like conftest's start_gateway, but the config may carry
    [auth.senders] and [tls.sni.NAME]; the file is tmp_path/gateway.toml.
    Services are stopped after the test."""
    from gateway.service import GatewayService, prepare

    services = []

    def start(doc: dict[str, Any]):
        path = tmp_path / "gateway.toml"
        path.write_text(render(doc))
        service = GatewayService(prepare(str(path), reactor), reactor)
        service.startService()
        services.append(service)
        return service

    yield start
    for service in services:
        pytest_twisted.blockon(service.stopService())


def auth_config(tmp_path: Path, *, listeners: list[dict[str, Any]] | None = None,
                auth: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """A config with a users file (alice and bob) and one STARTTLS listener
    "submission" with auth = true, no trusted networks."""
    users_path = tmp_path / "users"
    users = UsersFile(str(users_path))
    if not users_path.exists():
        users.set(USER, PASSWORD, must_exist=False)
        users.set(BOB, BOB_PASSWORD, must_exist=False)
    doc = base_config(tmp_path, **sections)
    doc["auth"] = {"users_file": str(users_path), **(auth or {})}
    doc["listener"] = listeners or [
        {"name": "submission", "address": "127.0.0.1", "port": 0, "tls": "starttls",
         "auth": True, "require_auth": False, "plugins": ["relay_guard"]},
    ]
    return doc


# Throttling off, for tests that fail AUTH on purpose many times.
NO_THROTTLE = {"max_failures": 1000, "delay_after": 1000}


class LogCapture:
    """Collects twisted.logger events while active (remove() in finally)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)

    def remove(self) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def texts(self) -> list[str]:
        out = []
        for event in list(self.events):
            try:
                out.append(formatEvent(event))
            except Exception:  # pragma: no cover - a broken event is not ours to judge
                out.append(repr(event))
        return out

    def matching(self, needle: str) -> list[dict[str, Any]]:
        return [e for e, t in zip(list(self.events), self.texts()) if needle in t]


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll C{predicate} on the reactor every 50 ms, at most C{timeout} s."""
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return True
        await task.deferLater(reactor, 0.05, lambda: None)
    return predicate()


# -- 1. the relay matrix -----------------------------------------------------


@dataclass(frozen=True)
class Trick:
    """One RCPT path: what an untrusted client must get, and the canonical
    recipient a trusted or authenticated client gets queued (None: the path
    is refused as syntax for everyone, with the same reply)."""

    name: str
    path: str
    refusal: tuple[int, str]
    canonical: str | None
    smtputf8: bool = False


TRICKS = [
    Trick("percent hack", "<user%other.example@example.test>", DENIED, "user%other.example@example.test"),
    Trick("bang path", "<other.example!user@example.test>", DENIED, "other.example!user@example.test"),
    Trick("source route", "<@example.test:user@other.example>", DENIED, "user@other.example"),
    Trick("source route via a foreign host to a local box", "<@other.example:user@example.test>",
          DENIED, "user@example.test"),
    Trick("two-hop source route", "<@EXAMPLE.TEST,@other.example:user@example.test>", DENIED,
          "user@example.test"),
    Trick("quoted at", '<"user@other.example"@example.test>', DENIED, '"user@other.example"@example.test'),
    Trick("quoted-pair at", '<"user\\@other.example"@example.test>', DENIED, '"user@other.example"@example.test'),
    Trick("quoted percent", '<"user%other.example"@example.test>', DENIED, "user%other.example@example.test"),
    Trick("quoted bang, upper-case local domain", '<"other.example!user"@EXAMPLE.TEST>', DENIED,
          "other.example!user@example.test"),
    Trick("upper-case percent hack", "<USER%OTHER.EXAMPLE@EXAMPLE.TEST>", DENIED,
          "USER%OTHER.EXAMPLE@example.test"),
    Trick("two at signs", "<user@other.example@example.test>", BAD_RECIPIENT, None),
    Trick("IPv4 literal", "<user@[192.0.2.1]>", DENIED, "user@[192.0.2.1]"),
    Trick("loopback literal", "<user@[127.0.0.1]>", DENIED, "user@[127.0.0.1]"),
    Trick("IPv6 loopback literal", "<user@[IPv6:0:0:0:0:0:0:0:1]>", DENIED, "user@[IPv6:::1]"),
    Trick("percent hack at a literal", "<user%other.example@[127.0.0.1]>", DENIED,
          "user%other.example@[127.0.0.1]"),
    Trick("bare IP address", "<user@127.0.0.1>", BAD_RECIPIENT, None),
    Trick("zero-padded IPv4 literal", "<user@[127.000.000.001]>", BAD_RECIPIENT, None),
    Trick("trailing dot", "<user@example.test.>", BAD_RECIPIENT, None),
    Trick("space inside the brackets", "<user@example.test >", BAD_RECIPIENT, None),
    Trick("upper-case foreign", "<USER@OTHER.EXAMPLE>", DENIED, "USER@other.example"),
    Trick("local domain as a prefix", "<user@example.test.other.example>", DENIED,
          "user@example.test.other.example"),
    Trick("local domain as a suffix", "<user@evil-example.test>", DENIED, "user@evil-example.test"),
    Trick("subdomain of a local domain", "<user@sub.example.test>", DENIED, "user@sub.example.test"),
    Trick("U-label with SMTPUTF8", "<user@bücher.example>", DENIED, "user@xn--bcher-kva.example",
          smtputf8=True),
    Trick("upper-case U-label with SMTPUTF8", "<user@BÜCHER.EXAMPLE>", DENIED,
          "user@xn--bcher-kva.example", smtputf8=True),
    Trick("A-label", "<user@xn--bcher-kva.example>", DENIED, "user@xn--bcher-kva.example"),
    Trick("upper-case A-label", "<user@XN--BCHER-KVA.EXAMPLE>", DENIED, "user@xn--bcher-kva.example"),
    Trick("U-label without SMTPUTF8", "<user@bücher.example>", NON_ASCII, None),
    Trick("bogus A-label", "<user@xn--zz.example>", BAD_RECIPIENT, None),
    Trick("full-width dot in the local domain", "<user@example\uff0etest>", BAD_RECIPIENT, None,
          smtputf8=True),
]


def run_tricks(wire: Wire, sender: str) -> dict[str, tuple[int, str, int]]:
    """Each trick in its own transaction: MAIL, RCPT, then DATA (with a
    message "trick N" when RCPT was accepted), RSET.

    @return: name -> (RCPT code, RCPT status, code of the DATA outcome).
    """
    replies = {}
    for index, trick in enumerate(TRICKS):
        mail = wire.cmd(f"MAIL FROM:<{sender}>" + (" SMTPUTF8" if trick.smtputf8 else ""))
        assert mail.code == 250, (trick.name, mail)
        rcpt = wire.cmd(f"RCPT TO:{trick.path}")
        data = wire.message(f"trick {index}", trick.name)
        replies[trick.name] = (rcpt.code, rcpt.status, data.code)
        assert wire.cmd("RSET").code == 250
    return replies


def queued_tricks(spool: Path) -> dict[str, list[str]]:
    """Trick name -> queued recipients, from the "trick N" subjects; also
    checks that the Received header names the same recipient."""
    out = {}
    for envelope, content in queued(spool):
        index = int(re.search(rb"Subject: trick (\d+)", content).group(1))
        recipients = [r.address for r in envelope.recipients]
        assert f"for <{recipients[0]}>" in envelope.prepend_headers[0], envelope.prepend_headers[0]
        out[TRICKS[index].name] = recipients
    return out


def expected_relayed() -> tuple[dict[str, tuple[int, str, int]], dict[str, list[str]]]:
    replies = {t.name: (*RCPT_OK, 250) if t.canonical else (*t.refusal, 503) for t in TRICKS}
    spool = {t.name: [t.canonical] for t in TRICKS if t.canonical}
    return replies, spool


@pytest_twisted.ensureDeferred
async def test_relay_tricks_refused_for_untrusted_client(run_gateway, tmp_path):
    """From an untrusted client every address trick (percent hack, bang
    path, source routes, quoted @, two @, literals including loopback,
    trailing dot, case, IDN U-label and A-label, mixes) is refused at RCPT
    with 554 5.7.1 or a 501/553 syntax reply, DATA is then refused, and
    nothing reaches the spool; user@example.test and User@EXAMPLE.TEST
    are accepted and queued in canonical form."""
    service = run_gateway(base_config(tmp_path, limits={"max_bad_commands": 1000}))
    port = service.port_of("mx")

    def tricks():
        with Wire(port) as wire:
            wire.ehlo()
            return run_tricks(wire, "a@example.org")

    replies = await in_thread(tricks)
    assert replies == {t.name: (*t.refusal, 503) for t in TRICKS}
    spool = tmp_path / "spool"
    assert queued(spool) == []
    assert list((spool / "incoming").iterdir()) == []
    assert list((spool / "data").iterdir()) == []

    def local():
        with Wire(port) as wire:
            wire.ehlo()
            mail = wire.cmd("MAIL FROM:<a@example.org>")
            plain_rcpt = wire.cmd("RCPT TO:<user@example.test>")
            mixed_rcpt = wire.cmd("RCPT TO:<User@EXAMPLE.TEST>")
            end = wire.message("local")
            return mail.code, plain_rcpt.pair, mixed_rcpt.pair, end.code

    assert await in_thread(local) == (250, RCPT_OK, RCPT_OK, 250)
    [(envelope, _)] = queued(spool)
    assert [r.address for r in envelope.recipients] == ["user@example.test", "User@example.test"]


@pytest_twisted.ensureDeferred
async def test_relay_tricks_accepted_from_trusted_network(run_gateway, tmp_path):
    """From trusted_networks the same recipients are relayed: each
    syntactically valid one is accepted and queued as the canonical form
    the relay guard checked (also in the Received "for" clause); the
    syntax errors get the same 501/553 as from anywhere."""
    service = run_gateway(base_config(tmp_path, server={"trusted_networks": ["127.0.0.0/8"]},
                                      limits={"max_bad_commands": 1000}))
    port = service.port_of("mx")

    def talk():
        with Wire(port) as wire:
            wire.ehlo()
            return run_tricks(wire, "a@example.org")

    replies = await in_thread(talk)
    want_replies, want_spool = expected_relayed()
    assert replies == want_replies
    assert queued_tricks(tmp_path / "spool") == want_spool


@pytest_twisted.ensureDeferred
async def test_relay_tricks_accepted_after_auth(run_gateway, tmp_path):
    """With no trusted networks, a session authenticated over STARTTLS
    relays the same recipients: accepted and queued in canonical form,
    with auth_user on each envelope; an unauthenticated session on the
    same listener is still refused."""
    doc = auth_config(tmp_path, limits={"max_bad_commands": 1000})
    service = run_gateway(doc)
    port = service.port_of("submission")

    def talk():
        with Wire(port) as wire:
            wire.tls_ready()
            unauthenticated = (wire.cmd(f"MAIL FROM:<{USER}>").code,
                               wire.cmd("RCPT TO:<user@other.example>").pair)
            wire.cmd("RSET")
            assert wire.auth_plain().pair == (235, "2.7.0")
            return unauthenticated, run_tricks(wire, USER)

    unauthenticated, replies = await in_thread(talk)
    assert unauthenticated == (250, DENIED)
    want_replies, want_spool = expected_relayed()
    assert replies == want_replies
    assert queued_tricks(tmp_path / "spool") == want_spool
    assert {e.auth_user for e, _ in queued(tmp_path / "spool")} == {USER}


# -- 2. AUTH only over TLS ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_auth_offered_and_accepted_only_after_starttls(run_gateway, tmp_path):
    """Before STARTTLS, EHLO has no AUTH keyword and AUTH PLAIN/LOGIN get
    530 5.7.0 without the password being checked (no failure counted);
    after STARTTLS, EHLO lists "AUTH PLAIN LOGIN" and AUTH works; once
    authenticated AUTH is no longer offered."""
    service = run_gateway(auth_config(tmp_path))
    port = service.port_of("submission")

    def talk():
        out = {}
        with Wire(port) as wire:
            out["plain ehlo"] = ehlo_keywords(wire.ehlo())
            out["plain AUTH PLAIN"] = wire.auth_plain().pair
            out["plain AUTH PLAIN wrong"] = wire.auth_plain(password=WRONG).pair
            out["plain AUTH LOGIN"] = wire.cmd("AUTH LOGIN").pair
            wire.starttls()
            out["tls ehlo"] = ehlo_keywords(wire.ehlo())
            out["tls AUTH"] = wire.auth_plain().pair
            out["authenticated ehlo"] = ehlo_keywords(wire.ehlo())
        return out

    out = await in_thread(talk)
    assert b"STARTTLS" in out["plain ehlo"]
    assert not any(k.upper().startswith(b"AUTH") for k in out["plain ehlo"])
    assert out["plain AUTH PLAIN"] == (530, "5.7.0")
    assert out["plain AUTH PLAIN wrong"] == (530, "5.7.0")
    assert out["plain AUTH LOGIN"] == (530, "5.7.0")
    assert b"AUTH PLAIN LOGIN" in out["tls ehlo"]
    assert b"STARTTLS" not in out["tls ehlo"]
    assert out["tls AUTH"] == (235, "2.7.0")
    assert not any(k.upper().startswith(b"AUTH") for k in out["authenticated ehlo"])
    assert service.auth_failures.failures("127.0.0.1", USER) == 0


@pytest_twisted.ensureDeferred
async def test_listener_without_auth_never_offers_it(run_gateway, tmp_path):
    """A listener with auth = false (next to one with auth, so a users file
    is configured) never lists AUTH, before or after STARTTLS, and answers
    AUTH with 502 5.5.1 even with good credentials."""
    doc = auth_config(tmp_path, listeners=[
        {"name": "submission", "address": "127.0.0.1", "port": 0, "tls": "starttls", "auth": True,
         "plugins": ["relay_guard"]},
        {"name": "mx", "address": "127.0.0.1", "port": 0, "tls": "starttls", "auth": False,
         "plugins": ["relay_guard"]},
    ])
    service = run_gateway(doc)
    port = service.port_of("mx")

    def talk():
        with Wire(port) as wire:
            before = ehlo_keywords(wire.ehlo())
            plain_auth = wire.auth_plain().pair
            wire.starttls()
            after = ehlo_keywords(wire.ehlo())
            tls_auth = wire.auth_plain().pair
            login = wire.cmd("AUTH LOGIN").pair
            relay = (wire.cmd(f"MAIL FROM:<{USER}>").code, wire.cmd("RCPT TO:<x@other.example>").pair)
            return before, plain_auth, after, tls_auth, login, relay

    before, plain_auth, after, tls_auth, login, relay = await in_thread(talk)
    for keywords in (before, after):
        assert not any(k.upper().startswith(b"AUTH") for k in keywords), keywords
    assert plain_auth == tls_auth == login == (502, "5.5.1")
    assert relay == (250, DENIED)


# -- 3. AUTH edge cases ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_auth_exchanges_and_their_replies(run_gateway, tmp_path):
    """AUTH over STARTTLS: PLAIN with an initial response and after a 334
    continuation, LOGIN (both prompts, and with an initial user name),
    authzid equal to authcid -> 235 2.7.0; wrong password, unknown user,
    authzid other than authcid, "=" (empty) answers -> 535 5.7.8; bad
    base64 -> 501 5.5.2; "*" -> 501 5.0.0; unknown mechanism -> 504 5.5.4;
    AUTH twice or inside a transaction or before EHLO -> 503 5.5.1.
    After every refusal the session goes on (a later AUTH succeeds), and no
    password reaches the log."""
    service = run_gateway(auth_config(tmp_path, auth=NO_THROTTLE))
    port = service.port_of("submission")

    def session(steps: Callable[[Wire], Any], ehlo_after_tls: bool = True) -> Any:
        with Wire(port) as wire:
            wire.ehlo()
            wire.starttls()
            if ehlo_after_tls:
                wire.ehlo()
            return steps(wire)

    def then_ok(wire: Wire, *answers: Answer) -> tuple:
        """The answers' (code, status), then whether a correct AUTH works."""
        return tuple(a.pair for a in answers) + (wire.auth_plain().pair,)

    def talk():
        r: dict[str, Any] = {}
        r["PLAIN initial response"] = session(lambda w: w.auth_plain().pair)
        r["PLAIN lower-case mechanism"] = session(lambda w: w.cmd("auth plain " + plain(USER, PASSWORD)).pair)
        r["PLAIN continuation"] = session(lambda w: (w.cmd("AUTH PLAIN").lines, w.cmd(plain(USER, PASSWORD)).pair))
        r["PLAIN authzid = authcid"] = session(lambda w: w.auth_plain(authzid=USER).pair)
        r["LOGIN"] = session(lambda w: (w.cmd("AUTH LOGIN").lines, w.cmd(b64(USER)).lines,
                                        w.cmd(b64(PASSWORD)).pair))
        r["LOGIN initial user"] = session(lambda w: (w.cmd("AUTH LOGIN " + b64(USER)).lines,
                                                     w.cmd(b64(PASSWORD)).pair))
        r["wrong password"] = session(lambda w: then_ok(w, w.auth_plain(password=WRONG)))
        r["LOGIN wrong password"] = session(lambda w: then_ok(
            w, w.cmd("AUTH LOGIN " + b64(USER)), w.cmd(b64(WRONG))))
        r["unknown user"] = session(lambda w: then_ok(w, w.auth_plain(user="nobody@example.test")))
        r["authzid differs"] = session(lambda w: then_ok(w, w.auth_plain(authzid=BOB)))
        r["bad base64 initial"] = session(lambda w: then_ok(w, w.cmd("AUTH PLAIN not*base64!")))
        r["bad base64 continuation"] = session(lambda w: then_ok(w, w.cmd("AUTH PLAIN"), w.cmd("%%%%")))
        r["bad base64 LOGIN user"] = session(lambda w: then_ok(w, w.cmd("AUTH LOGIN"), w.cmd("a")))
        r["cancel PLAIN"] = session(lambda w: then_ok(w, w.cmd("AUTH PLAIN"), w.cmd("*")))
        r["cancel LOGIN password"] = session(lambda w: then_ok(
            w, w.cmd("AUTH LOGIN"), w.cmd(b64(USER)), w.cmd("*")))
        r["empty LOGIN user and password"] = session(lambda w: then_ok(
            w, w.cmd("AUTH LOGIN"), w.cmd("="), w.cmd("=")))
        r["empty LOGIN password"] = session(lambda w: then_ok(w, w.cmd("AUTH LOGIN " + b64(USER)), w.cmd("=")))
        r["empty PLAIN password"] = session(lambda w: then_ok(w, w.auth_plain(password="")))
        r["unknown mechanism"] = session(lambda w: then_ok(w, w.cmd("AUTH CRAM-MD5")))
        r["second AUTH"] = session(lambda w: (w.auth_plain().pair, w.auth_plain().pair,
                                              w.cmd("AUTH LOGIN").pair))
        r["AUTH in a transaction"] = session(lambda w: (
            w.cmd("MAIL FROM:<a@example.org>").code, w.auth_plain().pair, w.cmd("RSET").code,
            w.auth_plain().pair))
        r["AUTH before EHLO"] = session(lambda w: then_ok(w, w.auth_plain(), w.ehlo()),
                                        ehlo_after_tls=False)
        return r

    logs = LogCapture()
    try:
        r = await in_thread(talk, timeout=60)
    finally:
        logs.remove()
    ok = (235, "2.7.0")
    assert r["PLAIN initial response"] == ok
    assert r["PLAIN lower-case mechanism"] == ok
    assert r["PLAIN continuation"] == ((b"334 ",), ok)
    assert r["PLAIN authzid = authcid"] == ok
    assert r["LOGIN"] == ((b"334 VXNlcm5hbWU6",), (b"334 UGFzc3dvcmQ6",), ok)
    assert r["LOGIN initial user"] == ((b"334 UGFzc3dvcmQ6",), ok)
    invalid = (535, "5.7.8")
    assert r["wrong password"] == (invalid, ok)
    assert r["LOGIN wrong password"] == ((334, ""), invalid, ok)
    assert r["unknown user"] == (invalid, ok)
    assert r["authzid differs"] == (invalid, ok)
    assert r["bad base64 initial"] == ((501, "5.5.2"), ok)
    assert r["bad base64 continuation"] == ((334, ""), (501, "5.5.2"), ok)
    assert r["bad base64 LOGIN user"] == ((334, ""), (501, "5.5.2"), ok)
    assert r["cancel PLAIN"] == ((334, ""), (501, "5.0.0"), ok)
    assert r["cancel LOGIN password"] == ((334, ""), (334, ""), (501, "5.0.0"), ok)
    assert r["empty LOGIN user and password"] == ((334, ""), (334, ""), invalid, ok)
    assert r["empty LOGIN password"] == ((334, ""), invalid, ok)
    assert r["empty PLAIN password"] == (invalid, ok)
    assert r["unknown mechanism"] == ((504, "5.5.4"), ok)
    assert r["second AUTH"] == (ok, (503, "5.5.1"), (503, "5.5.1"))
    assert r["AUTH in a transaction"] == (250, (503, "5.5.1"), 250, ok)
    assert r["AUTH before EHLO"] == ((503, "5.5.1"), (250, ""), ok)
    leaked = [t for t in logs.texts() if PASSWORD in t.replace(USER, "") or WRONG in t]
    assert leaked == []


@pytest_twisted.ensureDeferred
async def test_auth_empty_plain_response(run_gateway, tmp_path):
    """AUTH PLAIN with the empty response "=" (initial or after 334) is
    refused with 535 5.7.8 (RFC 4954 section 4: "=" is an empty response,
    a failed authentication, not a syntax error), and nobody is logged in."""
    service = run_gateway(auth_config(tmp_path, auth=NO_THROTTLE))
    port = service.port_of("submission")

    def talk():
        with Wire(port) as wire:
            wire.tls_ready()
            initial = wire.cmd("AUTH PLAIN =").pair
            continued = (wire.cmd("AUTH PLAIN").code, wire.cmd("=").pair)
            relay = (wire.cmd(f"MAIL FROM:<{USER}>").code, wire.cmd("RCPT TO:<x@other.example>").pair)
            return initial, continued, relay

    initial, continued, relay = await in_thread(talk)
    assert relay == (250, DENIED)
    assert (initial, continued) == ((535, "5.7.8"), (334, (535, "5.7.8")))


@pytest_twisted.ensureDeferred
async def test_auth_response_length_limit(run_gateway, tmp_path):
    """An AUTH response of exactly 12288 octets is still read and checked
    (535); one longer, as a PLAIN or LOGIN continuation, gets 500 5.5.6
    (RFC 4954 section 4), in one write or split across writes; the session
    survives and a normal AUTH then succeeds."""
    service = run_gateway(auth_config(tmp_path, auth=NO_THROTTLE))
    port = service.port_of("submission")
    # A valid PLAIN message whose base64 is exactly the limit.
    at_limit = b64(b"\0" + USER.encode() + b"\0" + b"x" * (AUTH_RESPONSE_LIMIT * 3 // 4 - len(USER) - 2))
    assert len(at_limit) == AUTH_RESPONSE_LIMIT
    over = "A" * (AUTH_RESPONSE_LIMIT + 4)

    def talk():
        out = {}
        with Wire(port) as wire:
            wire.tls_ready()
            out["at limit"] = (wire.cmd("AUTH PLAIN").code, wire.cmd(at_limit).pair)
            out["PLAIN over"] = (wire.cmd("AUTH PLAIN").code, wire.cmd(over).pair)
            wire.cmd("AUTH LOGIN")
            out["LOGIN over"] = wire.cmd(b64(USER)).code, wire.cmd("QUFB" * 4000).pair
            assert wire.cmd("AUTH PLAIN").code == 334
            for start in range(0, len(over), 1000):
                wire.send(over[start:start + 1000])
                time.sleep(0.002)
            out["split over"] = wire.cmd("").pair
            out["after"] = wire.auth_plain().pair
        return out

    out = await in_thread(talk)
    assert out == {
        "at limit": (334, (535, "5.7.8")),
        "PLAIN over": (334, (500, "5.5.6")),
        "LOGIN over": (334, (500, "5.5.6")),
        "split over": (500, "5.5.6"),
        "after": (235, "2.7.0"),
    }


@pytest_twisted.ensureDeferred
async def test_auth_oversized_initial_response(run_gateway, tmp_path):
    """An AUTH command whose initial response is longer than 12288 octets
    is refused with 500 (5.5.6, or 5.5.2 as an over-long command line) and
    nobody is logged in; the session goes on."""
    service = run_gateway(auth_config(tmp_path, auth=NO_THROTTLE))
    port = service.port_of("submission")

    def talk():
        with Wire(port) as wire:
            wire.tls_ready()
            refused = wire.cmd("AUTH PLAIN " + "A" * (AUTH_RESPONSE_LIMIT + 8)).pair
            after = wire.cmd("NOOP").code, wire.auth_plain().pair
            return refused, after

    refused, after = await in_thread(talk)
    assert refused in ((500, "5.5.6"), (500, "5.5.2"))
    assert after == (250, (235, "2.7.0"))


@pytest_twisted.ensureDeferred
async def test_authenticated_message_is_traced(run_gateway, tmp_path):
    """A message sent after AUTH is queued with auth_user set, protocol
    ESMTPSA, and a Received header saying "with ESMTPSA" and the TLS
    version; the AUTH password is not in the stored message or envelope."""
    service = run_gateway(auth_config(tmp_path))
    port = service.port_of("submission")

    def talk():
        with Wire(port) as wire:
            wire.tls_ready()
            assert wire.auth_plain().code == 235
            assert wire.cmd(f"MAIL FROM:<{USER}>").code == 250
            assert wire.cmd("RCPT TO:<friend@elsewhere.example>").pair == RCPT_OK
            return wire.message("authenticated")

    end = await in_thread(talk)
    assert end.pair == (250, "2.0.0")
    [(envelope, content)] = queued(tmp_path / "spool")
    assert envelope.auth_user == USER
    assert envelope.protocol == "ESMTPSA"
    received = envelope.prepend_headers[0]
    assert re.search(r"with ESMTPSA id \S+", received), received
    assert "(using TLSv1." in received
    assert PASSWORD not in repr(envelope) and PASSWORD.encode() not in content


# -- 4. sender authorisation ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_authenticated_user_may_only_send_as_herself(run_gateway, tmp_path):
    """Without [auth.senders], alice may use alice@example.test (any case)
    and <>, and gets 553 5.7.1 for bob@example.test, another domain, or
    her own address hidden behind a route or quotes."""
    service = run_gateway(auth_config(tmp_path))
    port = service.port_of("submission")
    senders = [USER, "Alice@EXAMPLE.TEST", "", BOB, "alice@other.example", "alice@sales.example.test",
               "@example.test:bob@example.test", '"alice@example.test"@other.example',
               "bob%example.test@example.test"]

    def talk():
        out = {}
        with Wire(port) as wire:
            wire.tls_ready()
            assert wire.auth_plain().code == 235
            for sender in senders:
                out[sender] = wire.cmd(f"MAIL FROM:<{sender}>").pair
                wire.cmd("RSET")
        return out

    out = await in_thread(talk)
    ok, refused = (250, "2.1.0"), (553, "5.7.1")
    assert out == {USER: ok, "Alice@EXAMPLE.TEST": ok, "": ok, BOB: refused,
                   "alice@other.example": refused, "alice@sales.example.test": refused,
                   "@example.test:bob@example.test": refused,
                   '"alice@example.test"@other.example': refused,
                   "bob%example.test@example.test": refused}


@pytest_twisted.ensureDeferred
async def test_auth_senders_grants_addresses_and_domains(run_gateway, tmp_path):
    """With [auth.senders] "alice@example.test" = ["alice@example.test",
    "@sales.example.test"] alice may send as herself, as anyone at
    sales.example.test (any case) and as <>, but not as bob, a subdomain
    of sales.example.test or a look-alike domain; a message from
    x@sales.example.test is queued with that sender and auth_user alice."""
    doc = auth_config(tmp_path, auth={"senders": {USER: [USER, "@sales.example.test"]}})
    service = run_gateway(doc)
    port = service.port_of("submission")
    senders = [USER, "x@sales.example.test", "X@SALES.EXAMPLE.TEST", "", BOB,
               "x@sub.sales.example.test", "x@sales.example.test.evil.example", "x@evilsales.example.test"]

    def talk():
        out = {}
        with Wire(port) as wire:
            wire.tls_ready()
            assert wire.auth_plain().code == 235
            for sender in senders:
                out[sender] = wire.cmd(f"MAIL FROM:<{sender}>").pair
                wire.cmd("RSET")
            wire.cmd("MAIL FROM:<x@sales.example.test>")
            wire.cmd("RCPT TO:<customer@elsewhere.example>")
            out["message"] = wire.message("from sales").code
        return out

    out = await in_thread(talk)
    ok, refused = (250, "2.1.0"), (553, "5.7.1")
    assert out == {USER: ok, "x@sales.example.test": ok, "X@SALES.EXAMPLE.TEST": ok, "": ok,
                   BOB: refused, "x@sub.sales.example.test": refused,
                   "x@sales.example.test.evil.example": refused, "x@evilsales.example.test": refused,
                   "message": 250}
    [(envelope, _)] = queued(tmp_path / "spool")
    assert (envelope.sender, envelope.auth_user) == ("x@sales.example.test", USER)


@pytest_twisted.ensureDeferred
async def test_null_sender_allowed_after_auth(run_gateway, tmp_path):
    """An authenticated session may send with the null reverse-path <>
    (bounces, read receipts); the message is queued with sender ""."""
    service = run_gateway(auth_config(tmp_path))
    port = service.port_of("submission")

    def talk():
        with Wire(port) as wire:
            wire.tls_ready()
            assert wire.auth_plain().code == 235
            return (wire.cmd("MAIL FROM:<>").pair, wire.cmd("RCPT TO:<x@elsewhere.example>").pair,
                    wire.message("bounce").code)

    assert await in_thread(talk) == ((250, "2.1.0"), RCPT_OK, 250)
    [(envelope, _)] = queued(tmp_path / "spool")
    assert (envelope.sender, envelope.auth_user) == ("", USER)


# -- 5. throttling -------------------------------------------------------------

THROTTLE = {"max_failures": 4, "delay_after": 2, "failure_delay": "0.2s"}


@pytest_twisted.ensureDeferred
async def test_auth_failures_are_delayed_then_refused(run_gateway, tmp_path):
    """delay_after = 2, failure_delay = 0.2 s, max_failures = 4: failures 3
    and 4 are answered (535) only after a delay (>= 0.15 s, growing);
    then AUTH gets 454 4.7.0 even with the right password, the third
    refusal in the session is 421 4.7.0 and the connection closes; a new
    connection from the same IP is refused too, while another IP may
    still log in."""
    service = run_gateway(auth_config(tmp_path, auth=THROTTLE))
    port = service.port_of("submission")

    def talk():
        out: dict[str, Any] = {"failures": [], "times": []}
        with Wire(port) as wire:
            wire.tls_ready()
            for _ in range(4):
                started = time.monotonic()
                out["failures"].append(wire.auth_plain(user="mallory@example.test", password=WRONG).pair)
                out["times"].append(time.monotonic() - started)
            out["refusals"] = [wire.auth_plain().pair for _ in range(3)]
            out["after close"] = wire.reply().code
        with Wire(port) as wire:
            wire.tls_ready()
            out["new connection"] = wire.auth_plain().pair
        with Wire(port, source="127.0.0.2") as wire:
            wire.tls_ready()
            out["other IP"] = wire.auth_plain().pair
        return out

    out = await in_thread(talk)
    assert out["failures"] == [(535, "5.7.8")] * 4
    third, fourth = out["times"][2], out["times"][3]
    assert third >= 0.15, out["times"]
    assert fourth >= 0.15 and fourth >= 0.3, out["times"]
    assert out["refusals"] == [(454, "4.7.0"), (454, "4.7.0"), (421, "4.7.0")]
    assert out["after close"] == 0
    assert out["new connection"] == (454, "4.7.0")
    assert out["other IP"] == (235, "2.7.0")


@pytest_twisted.ensureDeferred
async def test_auth_failures_count_per_user_across_connections(run_gateway, tmp_path):
    """Failures for one user name from different connections and client
    addresses add up: after max_failures wrong passwords for alice (one
    per connection, each from a new loopback IP), alice is refused with
    454 4.7.0 even with the right password from yet another IP, while bob
    logs in from that IP."""
    service = run_gateway(auth_config(tmp_path, auth=THROTTLE))
    port = service.port_of("submission")

    def talk():
        failures = []
        for n in range(4):
            with Wire(port, source=f"127.0.0.{10 + n}") as wire:
                wire.tls_ready()
                failures.append(wire.auth_plain(password=WRONG).pair)
        with Wire(port, source="127.0.0.20") as wire:
            wire.tls_ready()
            alice = wire.auth_plain().pair
            bob = wire.auth_plain(BOB, BOB_PASSWORD).pair
        return failures, alice, bob

    failures, alice, bob = await in_thread(talk)
    assert failures == [(535, "5.7.8")] * 4
    assert alice == (454, "4.7.0")
    assert bob == (235, "2.7.0")


@pytest_twisted.ensureDeferred
async def test_auth_failures_expire_after_the_window(run_gateway, tmp_path):
    """Once failure_window has passed since the failures, AUTH is accepted
    again from the same IP (the block is not permanent)."""
    service = run_gateway(auth_config(tmp_path, auth={"max_failures": 2, "delay_after": 100,
                                                      "failure_window": "0.5s"}))
    port = service.port_of("submission")

    def talk():
        with Wire(port) as wire:
            wire.tls_ready()
            failures = [wire.auth_plain(password=WRONG).pair for _ in range(2)]
            blocked = wire.auth_plain().pair
        time.sleep(0.8)
        with Wire(port) as wire:
            wire.tls_ready()
            later = wire.auth_plain().pair
        return failures, blocked, later

    failures, blocked, later = await in_thread(talk)
    assert failures == [(535, "5.7.8")] * 2
    assert blocked == (454, "4.7.0")
    assert later == (235, "2.7.0")


# -- 6. users file edits take effect live ------------------------------------


@pytest_twisted.ensureDeferred
async def test_gatewayctl_user_changes_apply_without_restart(run_gateway, tmp_path):
    """`gatewayctl user add carol --password-stdin` lets carol log in to the
    running gateway; `user passwd` replaces her password (the old one
    fails); `user del` locks her out again; `user list --json` lists the
    names at each step."""
    service = run_gateway(auth_config(tmp_path, auth=NO_THROTTLE))
    port = service.port_of("submission")
    config = tmp_path / "gateway.toml"
    carol = "carol@example.test"

    def ctl(*args: str, password: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "gateway.ctl", "user", *args, "-c", str(config)],
            input=None if password is None else password + "\n", capture_output=True, text=True,
            env=subprocess_env(), cwd=str(REPO), timeout=60)

    def login(password: str) -> tuple[int, str]:
        with Wire(port) as wire:
            wire.tls_ready()
            return wire.auth_plain(carol, password).pair

    def names() -> list[str]:
        done = ctl("list", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def talk():
        out: dict[str, Any] = {"before": login("carol-1")}
        add = ctl("add", carol, "--password-stdin", password="carol-1")
        out["add"] = (add.returncode, add.stderr)
        out["after add"] = login("carol-1")
        out["list after add"] = names()
        passwd = ctl("passwd", carol, "--password-stdin", password="carol-2")
        out["passwd"] = (passwd.returncode, passwd.stderr)
        out["old password"] = login("carol-1")
        out["new password"] = login("carol-2")
        delete = ctl("del", carol)
        out["del"] = (delete.returncode, delete.stderr)
        out["after del"] = login("carol-2")
        out["list after del"] = names()
        return out

    out = await in_thread(talk, timeout=120)
    invalid, ok = (535, "5.7.8"), (235, "2.7.0")
    assert out == {
        "before": invalid,
        "add": (0, ""), "after add": ok, "list after add": sorted([USER, BOB, carol]),
        "passwd": (0, ""), "old password": invalid, "new password": ok,
        "del": (0, ""), "after del": invalid, "list after del": sorted([USER, BOB]),
    }


# -- 7. implicit TLS -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_implicit_tls_listener_with_auth(run_gateway, tmp_path):
    """On an implicit-TLS listener (RFC 8314) with auth, smtplib.SMTP_SSL
    sees AUTH PLAIN LOGIN at once (and no STARTTLS), logs in with PLAIN and
    with LOGIN, a wrong password raises SMTPAuthenticationError 535, and an
    authenticated message to a foreign domain is queued as ESMTPSA."""
    doc = auth_config(tmp_path, listeners=[
        {"name": "smtps", "address": "127.0.0.1", "port": 0, "tls": "implicit", "auth": True,
         "plugins": ["relay_guard"]}])
    service = run_gateway(doc)
    port = service.port_of("smtps")

    def connect() -> smtplib.SMTP_SSL:
        return smtplib.SMTP_SSL("127.0.0.1", port, timeout=SOCKET_TIMEOUT, context=insecure_tls())

    def talk():
        out = {}
        with connect() as smtp:
            smtp.ehlo("c.example.org")
            out["features"] = dict(smtp.esmtp_features)
            out["login"] = smtp.login(USER, PASSWORD)
            out["refused"] = smtp.sendmail(USER, ["friend@elsewhere.example"],
                                           b"Subject: implicit\r\n\r\nhello\r\n")
        with connect() as smtp:
            smtp.ehlo("c.example.org")
            smtp.user, smtp.password = USER, PASSWORD
            out["LOGIN"] = smtp.auth("LOGIN", smtp.auth_login)
        with connect() as smtp:
            smtp.ehlo("c.example.org")
            try:
                smtp.login(USER, WRONG)
            except smtplib.SMTPAuthenticationError as exc:
                out["wrong"] = (exc.smtp_code, exc.smtp_error[:5])
        return out

    out = await in_thread(talk)
    assert out["features"]["auth"].split() == ["PLAIN", "LOGIN"]
    assert "starttls" not in out["features"]
    assert out["login"][0] == 235
    assert out["LOGIN"][0] == 235
    assert out["wrong"] == (535, b"5.7.8")
    assert out["refused"] == {}
    [(envelope, _)] = queued(tmp_path / "spool")
    assert (envelope.protocol, envelope.auth_user) == ("ESMTPSA", USER)
    assert [r.address for r in envelope.recipients] == ["friend@elsewhere.example"]


# -- 8. SNI --------------------------------------------------------------------


def pem_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


@pytest_twisted.ensureDeferred
async def test_sni_picks_the_certificate(run_gateway, tmp_path):
    """With [tls.sni] pairs for a.example.test and b.example.test, a client
    asking for b.example.test (any case) gets b's certificate and one
    asking for a gets a's, over STARTTLS and implicit TLS; a client
    without SNI, or naming an unknown host, gets the default certificate."""
    certs = {}
    for name in ("a.example.test", "b.example.test"):
        cert, key = tmp_path / "sni" / f"{name}.crt", tmp_path / "sni" / f"{name}.key"
        ensure_certificate(str(cert), str(key), name)
        certs[name] = (cert, key)
    doc = base_config(tmp_path)
    doc["listener"].append({"name": "smtps", "address": "127.0.0.1", "port": 0, "tls": "implicit",
                            "plugins": ["relay_guard"]})
    doc["tls"]["sni"] = {name: {"cert": str(c), "key": str(k)} for name, (c, k) in certs.items()}
    service = run_gateway(doc)
    starttls_port, implicit_port = service.port_of("mx"), service.port_of("smtps")

    def over_starttls(server_hostname: str | None) -> bytes:
        with Wire(starttls_port) as wire:
            wire.ehlo()
            wire.starttls(server_hostname=server_hostname)
            der = wire.sock.getpeercert(binary_form=True)
            assert wire.ehlo().code == 250
            return der

    def over_implicit(server_hostname: str | None) -> bytes:
        with Wire(implicit_port, implicit=True, server_hostname=server_hostname) as wire:
            der = wire.sock.getpeercert(binary_form=True)
            assert wire.ehlo().code == 250
            return der

    names = [None, "a.example.test", "b.example.test", "B.Example.Test", "c.example.test"]

    def talk():
        return ({name: over_starttls(name) for name in names},
                {name: over_implicit(name) for name in names})

    starttls, implicit = await in_thread(talk)
    default = pem_der(tmp_path / "tls" / "cert.pem")
    a, b = pem_der(certs["a.example.test"][0]), pem_der(certs["b.example.test"][0])
    assert len({default, a, b}) == 3
    want = {None: default, "a.example.test": a, "b.example.test": b, "B.Example.Test": b,
            "c.example.test": default}
    assert starttls == want
    assert implicit == want


# -- 9. TLS handshake failures -------------------------------------------------


def tls_failure_logged(logs: LogCapture) -> Callable[[], list[dict[str, Any]]]:
    return lambda: [e for e in logs.matching("TLS handshake or session failed")
                    if e.get("client") == "127.0.0.1"]


def full_session(port: int) -> dict[Any, Any]:
    """A normal STARTTLS session that queues one message (smtplib)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=SOCKET_TIMEOUT) as smtp:
        smtp.ehlo("c.example.org")
        smtp.starttls(context=insecure_tls())
        smtp.ehlo("c.example.org")
        return smtp.sendmail("a@example.org", ["b@example.test"], b"Subject: after\r\n\r\nok\r\n")


def read_to_close(sock: socket.socket) -> bytes:
    received = b""
    deadline = time.monotonic() + SOCKET_TIMEOUT
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except (socket.timeout, ConnectionResetError):
            break
        if not chunk:
            break
        received += chunk
    return received


@pytest_twisted.ensureDeferred
async def test_tls_handshake_garbage_is_survived_and_logged(run_gateway, tmp_path):
    """A client that sends garbage instead of a ClientHello (after
    STARTTLS, and on an implicit-TLS listener) is disconnected; the
    failure is logged with the client address; the listener goes on (a
    new STARTTLS session queues a message) and no connection slot leaks."""
    doc = base_config(tmp_path)
    doc["listener"].append({"name": "smtps", "address": "127.0.0.1", "port": 0, "tls": "implicit",
                            "plugins": ["relay_guard"]})
    service = run_gateway(doc)
    port, implicit_port = service.port_of("mx"), service.port_of("smtps")
    garbage = b"this is not a TLS ClientHello\r\n" * 8

    def after_starttls():
        sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
        try:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(b"EHLO c.example.org\r\n")
            while not reader.readline().startswith(b"250 "):
                pass
            sock.sendall(b"STARTTLS\r\n")
            answer = reader.readline()
            sock.sendall(garbage)
            return answer, read_to_close(sock)
        finally:
            sock.close()

    def implicit():
        sock = socket.create_connection(("127.0.0.1", implicit_port), timeout=SOCKET_TIMEOUT)
        try:
            sock.sendall(garbage)
            return read_to_close(sock)
        finally:
            sock.close()

    logs = LogCapture()
    try:
        answer, rest = await in_thread(after_starttls)
        assert answer.startswith(b"220 2.0.0")
        assert b"250" not in rest
        assert await eventually(lambda: len(tls_failure_logged(logs)()) >= 1)
        rest = await in_thread(implicit)
        assert b"220" not in rest
        assert await eventually(lambda: len(tls_failure_logged(logs)()) >= 2)
    finally:
        logs.remove()
    assert await in_thread(full_session, port) == {}
    assert len(queued(tmp_path / "spool")) == 1
    assert await eventually(lambda: service.limiter.total == 0)


@pytest_twisted.ensureDeferred
async def test_tls_1_0_client_is_refused_and_logged(run_gateway, tmp_path):
    """A client offering only TLS 1.0 fails the handshake (the server
    allows TLS 1.2 and later, RFC 8996); the failure is logged with the
    client address and the listener keeps serving."""
    service = run_gateway(base_config(tmp_path))
    port = service.port_of("mx")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError) as exc:
        pytest.skip(f"the local OpenSSL cannot make a TLS 1.0 client: {exc}")

    def talk():
        with Wire(port) as wire:
            wire.ehlo()
            try:
                wire.starttls(context=context)
            except ssl.SSLError as exc:
                return str(exc)
            return None

    logs = LogCapture()
    try:
        error = await in_thread(talk)
        if error is not None and "NO_PROTOCOLS_AVAILABLE" in error.upper().replace(" ", "_"):
            pytest.skip(f"the local OpenSSL will not offer TLS 1.0: {error}")
        assert error is not None, "a TLS 1.0 handshake succeeded"
        assert await eventually(lambda: len(tls_failure_logged(logs)()) >= 1), logs.texts()[-5:]
    finally:
        logs.remove()
    assert await in_thread(full_session, port) == {}


# -- found while writing these tests ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_auth_senders_idn_domain_matches_both_forms(run_gateway, tmp_path):
    """An [auth.senders] grant "@bücher.example" (U-label, as local_domains
    may be written) covers the sender in either form: the U-label with
    SMTPUTF8 and the A-label xn--bcher-kva.example, since MAIL canonicalises
    the sender domain to the A-label."""
    doc = auth_config(tmp_path, auth={"senders": {USER: [USER, "@bücher.example"]}})
    service = run_gateway(doc)
    port = service.port_of("submission")

    def talk():
        out = {}
        with Wire(port) as wire:
            wire.tls_ready()
            assert wire.auth_plain().code == 235
            for command in ("MAIL FROM:<x@bücher.example> SMTPUTF8", "MAIL FROM:<x@xn--bcher-kva.example>",
                            "MAIL FROM:<x@other.example>"):
                out[command] = wire.cmd(command).pair
                wire.cmd("RSET")
        return out

    out = await in_thread(talk)
    assert out == {"MAIL FROM:<x@bücher.example> SMTPUTF8": (250, "2.1.0"),
                   "MAIL FROM:<x@xn--bcher-kva.example>": (250, "2.1.0"),
                   "MAIL FROM:<x@other.example>": (553, "5.7.1")}


@pytest_twisted.ensureDeferred
async def test_broken_users_file_is_a_temporary_failure(run_gateway, tmp_path):
    """When the users file becomes unreadable while running (an admin's
    typo), AUTH with correct credentials gets 454 4.7.0 (RFC 4954 section 6,
    temporary authentication failure), not 535 "credentials invalid", and
    no failure is counted against the user; once the file is fixed the
    user logs in; the problem is logged with the file's name."""
    service = run_gateway(auth_config(tmp_path))
    port = service.port_of("submission")
    users = tmp_path / "users"
    good = users.read_text()

    def talk():
        with Wire(port) as wire:
            wire.tls_ready()
            users.write_text(good + "a line without the separator\n")
            broken = wire.auth_plain().pair
        users.write_text(good + "\n# fixed\n")
        with Wire(port) as wire:
            wire.tls_ready()
            fixed = wire.auth_plain().pair
        return broken, fixed

    logs = LogCapture()
    try:
        broken, fixed = await in_thread(talk)
    finally:
        logs.remove()
    assert fixed == (235, "2.7.0")
    assert broken == (454, "4.7.0")
    assert service.auth_failures.failures("127.0.0.1", USER) == 0
    assert logs.matching(str(users)), "the users file error is not logged"


@pytest_twisted.ensureDeferred
async def test_require_auth_refuses_mail_before_login(run_gateway, tmp_path):
    """On an auth listener (require_auth defaults to auth) MAIL before AUTH
    gets 530 5.7.0 Authentication required; after AUTH it is accepted; a
    client in trusted_networks may send without AUTH."""
    doc = auth_config(tmp_path, limits={"max_bad_commands": 1000})
    doc["listener"][0].pop("require_auth")
    service = run_gateway(doc)
    port = service.port_of("submission")

    def talk():
        with Wire(port) as wire:
            wire.tls_ready()
            before = wire.cmd(f"MAIL FROM:<{USER}>").pair
            assert wire.auth_plain().pair == (235, "2.7.0")
            after = wire.cmd(f"MAIL FROM:<{USER}>").code
            return before, after

    before, after = await in_thread(talk)
    assert before == (530, "5.7.0") and after == 250
