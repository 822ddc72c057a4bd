"""Acceptance tests of the plugin contract on real sockets: a plugin module
dropped into a folder named in the config changes the replies on the wire."""

from __future__ import annotations

import uuid

import pytest_twisted

from tests.support import base_config, client, in_thread, queued, raw_session

PLUGIN = '''
"""{name}: a test plugin written the way the README tells plugin authors to."""

from dataclasses import dataclass

from twisted.internet import defer, task
from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from gateway.interfaces import IPluginFactory, IMailCheck, IRcptCheck, IMessageCheck
from gateway.verdict import CONTINUE, cont, reject


@dataclass(frozen=True)
class Options:
    blocked_sender: str = ""
    delay: float = 0.0
    explode_on: str = ""


@implementer(IMailCheck, IRcptCheck, IMessageCheck)
class Plugin:
    def __init__(self, options, context):
        self.options = options
        self.clock = context.clock

    def check_mail(self, session, transaction, sender):
        if sender is not None and str(sender) == self.options.blocked_sender:
            return reject(550, "5.7.1", "Sender blocked by {name}")
        return CONTINUE

    def check_rcpt(self, session, transaction, recipient):
        if recipient.mailbox.local == self.options.explode_on:
            raise RuntimeError("boom")
        if self.options.delay:
            return task.deferLater(self.clock, self.options.delay, lambda: CONTINUE)
        return CONTINUE

    def check_message(self, session, transaction, message):
        with message.open() as body:
            first = body.readline()
        return cont(add_headers=(("X-{name}", f"size={{message.size}} first={{len(first)}}"),))


@provider(IPlugin, IPluginFactory)
class factory:
    name = "{name}"
    options_type = Options
    description = "test plugin"

    @staticmethod
    def build(options, context):
        return Plugin(options, context)
'''


def drop_plugin(tmp_path):
    """Write a uniquely named plugin module into a fresh folder."""
    name = "dropped_" + uuid.uuid4().hex[:8]
    folder = tmp_path / "myplugins"
    folder.mkdir()
    (folder / f"{name}.py").write_text(PLUGIN.format(name=name))
    return name, folder


@pytest_twisted.ensureDeferred
async def test_dropped_plugin_changes_reply(start_gateway, tmp_path):
    """A plugin module in a folder from plugin_dirs, named in the listener's
    plugin list, rejects a sender on the wire and adds a header to the
    messages it lets through."""
    name, folder = drop_plugin(tmp_path)
    doc = base_config(tmp_path, server={"plugin_dirs": [str(folder)]})
    doc["listener"][0]["plugins"] = ["relay_guard", name]
    doc["plugins"] = {name: {"blocked_sender": "spammer@example.org"}}
    service = start_gateway(doc)
    port = service.port_of("mx")

    def talk():
        with client(port) as smtp:
            smtp.ehlo("c.example.org")
            refused = smtp.mail("spammer@example.org")
            smtp.rset()
            smtp.sendmail("friend@example.org", ["b@example.test"], b"Subject: hi\r\n\r\nbody\r\n")
            return refused

    code, text = await in_thread(talk)
    assert code == 550 and text == f"5.7.1 Sender blocked by {name}".encode()
    [(envelope, _)] = queued(tmp_path / "spool")
    assert envelope.sender == "friend@example.org"
    assert f"X-{name}: size=21 first=13" in envelope.prepend_headers


@pytest_twisted.ensureDeferred
async def test_raising_plugin_gives_451_and_connection_survives(start_gateway, tmp_path):
    """A plugin that raises gives 451 4.3.0; the same connection then sends
    a message that is queued."""
    name, folder = drop_plugin(tmp_path)
    doc = base_config(tmp_path, server={"plugin_dirs": [str(folder)]})
    doc["listener"][0]["plugins"] = ["relay_guard", name]
    doc["plugins"] = {name: {"explode_on": "boom"}}
    service = start_gateway(doc)
    port = service.port_of("mx")

    def talk():
        with client(port) as smtp:
            smtp.ehlo("c.example.org")
            smtp.mail("a@example.org")
            failed = smtp.rcpt("boom@example.test")
            smtp.rcpt("fine@example.test")
            smtp.data(b"Subject: hi\r\n\r\nbody\r\n")
            return failed

    code, text = await in_thread(talk)
    assert (code, text[:5]) == (451, b"4.3.0")
    [(envelope, _)] = queued(tmp_path / "spool")
    assert [r.address for r in envelope.recipients] == ["fine@example.test"]


@pytest_twisted.ensureDeferred
async def test_slow_plugin_keeps_pipelined_replies_in_order(start_gateway, tmp_path):
    """With a plugin that answers RCPT later (a Deferred), pipelined
    replies still come back in command order."""
    name, folder = drop_plugin(tmp_path)
    doc = base_config(tmp_path, server={"plugin_dirs": [str(folder)]})
    doc["listener"][0]["plugins"] = ["relay_guard", name]
    doc["plugins"] = {name: {"delay": 0.05}}
    service = start_gateway(doc)
    port = service.port_of("mx")
    payload = (b"EHLO c.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<one@example.test>\r\n"
               b"RCPT TO:<x@elsewhere.example>\r\nRCPT TO:<two@example.test>\r\nNOOP\r\nDATA\r\n"
               b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    out = await in_thread(raw_session, port, payload)
    replies = [l for l in out.split(b"\r\n") if l and not l.startswith(b"250-")]
    assert [r[:3] for r in replies] == [b"220", b"250", b"250", b"250", b"554", b"250", b"250", b"354", b"250", b"221"]
    [(envelope, _)] = queued(tmp_path / "spool")
    assert [r.address for r in envelope.recipients] == ["one@example.test", "two@example.test"]


@pytest_twisted.ensureDeferred
async def test_plugin_timeout_gives_451(start_gateway, tmp_path):
    """A plugin slower than its timeout gives 451 4.4.5, not a hung session."""
    name, folder = drop_plugin(tmp_path)
    doc = base_config(tmp_path, server={"plugin_dirs": [str(folder)]})
    doc["listener"][0]["plugins"] = ["relay_guard", name]
    doc["plugins"] = {name: {"delay": 5.0, "timeout": 0.2}}
    service = start_gateway(doc)
    port = service.port_of("mx")

    def talk():
        with client(port) as smtp:
            smtp.ehlo("c.example.org")
            smtp.mail("a@example.org")
            return smtp.rcpt("one@example.test")

    code, text = await in_thread(talk)
    assert (code, text[:5]) == (451, b"4.4.5")
