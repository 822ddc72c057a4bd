"""Tests for plugins/helo.py: classifying HELO names, the three checks and
their replies, the trust exemption, and when the plugin answers
(delay_reject).  Pure units plus the real Pipeline; no reactor needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from gateway.address import Mailbox
from gateway.config import ConfigError, parse_config
from gateway.interfaces import IHeloCheck, IRcptCheck
from gateway.pipeline import Pipeline, PluginSlot
from gateway.registry import PluginContext, build_options
from gateway.session import Recipient, Session, Transaction
from gateway.verdict import CONTINUE, Action
from plugins import helo as helo_plugin
from tests.support import base_config


def make(tmp_path: Path, *, trusted: list[str] | None = None, listeners: list[dict[str, Any]] | None = None,
         **options: Any) -> Any:
    """The plugin built as the registry builds it (hostname mx.example.test,
    listener "mx" on 127.0.0.1 unless given)."""
    doc = base_config(tmp_path, server={"trusted_networks": trusted or []})
    if listeners is not None:
        doc["listener"] = listeners
    config = parse_config(doc, str(tmp_path / "gateway.toml"))
    settings = build_options(helo_plugin.factory, options, config.path)
    context = PluginContext("helo", Clock(), None, config, lambda f, *a: f(*a))
    return helo_plugin.factory.build(settings.options, context)


def session(helo: str | None = None, peer: str = "192.0.2.10", **kwargs: Any) -> Session:
    return Session(id="s1", listener=kwargs.pop("listener", "mx"), peer=peer, helo=helo, **kwargs)


def at_helo(plugin: Any, name: str, **kwargs: Any) -> Any:
    """The verdict at HELO for C{name} (plugin built with delay_reject=False)."""
    return plugin.check_helo(session(**kwargs), name)


def at_rcpt(plugin: Any, name: str, **kwargs: Any) -> Any:
    txn = Transaction(sender=Mailbox("a", "example.org"))
    return plugin.check_rcpt(session(helo=name, **kwargs), txn, Recipient(Mailbox("b", "example.test")))


# -- classify ------------------------------------------------------------------------


@pytest.mark.parametrize("argument, kind, name", [
    ("mail.example.com", "domain", "mail.example.com"),
    ("Mail.Example.COM.", "domain", "mail.example.com"),
    ("localhost", "domain", "localhost"),
    ("bücher.example", "domain", "xn--bcher-kva.example"),
    ("[192.0.2.1]", "literal", "[192.0.2.1]"),
    ("[IPv6:2001:DB8::1]", "literal", "[IPv6:2001:db8::1]"),
    ("192.0.2.1", "address", "192.0.2.1"),
    ("2001:db8::1", "address", "2001:db8::1"),
])
def test_classify_valid_names(argument: str, kind: str, name: str):
    """Domains (one trailing dot ignored, Unicode as A-labels), address
    literals and bare addresses are recognised and canonicalised."""
    helo = helo_plugin.classify(argument)
    assert (helo.kind, helo.name) == (kind, name)


@pytest.mark.parametrize("argument", [
    "my_pc.example.com", "a..example.com", "-a.example.com", "a-.example.com", "example.com..",
    "[1.2.3]", "[300.1.1.1]", "[192.0.2.01]", "[foo:bar]", "1.2.3", "host.123", "a" * 64 + ".example",
    "x@example.com", "[]",
])
def test_classify_refuses_invalid_names(argument: str):
    """Underscores, empty or hyphen-edged labels, bad literals, numeric
    top-level labels and over-long labels are not RFC 5321 names."""
    with pytest.raises(ValueError):
        helo_plugin.classify(argument)


@pytest.mark.parametrize("argument, fqdn", [
    ("mail.example.com", True), ("localhost", False), ("[192.0.2.1]", True), ("192.0.2.1", False),
])
def test_fqdn_means_dotted_name_or_literal(argument: str, fqdn: bool):
    """A dotted domain or an address literal is fully qualified; a single
    label or a bare address is not (Postfix's rule)."""
    assert helo_plugin.classify(argument).is_fqdn is fqdn


# -- the checks ------------------------------------------------------------------------


def test_invalid_name_is_501_552(tmp_path: Path):
    """An invalid name gets 501 5.5.2 naming it; with reject_invalid off it passes."""
    plugin = make(tmp_path, delay_reject=False)
    verdict = at_helo(plugin, "my_pc")
    assert (verdict.action, verdict.reply.code, verdict.reply.status) == (Action.REJECT, 501, "5.5.2")
    assert verdict.reply.text == "<my_pc>: Helo command rejected: Invalid name"
    assert at_helo(make(tmp_path, delay_reject=False, reject_invalid=False), "my_pc") is CONTINUE


def test_non_fqdn_only_when_required(tmp_path: Path):
    """A single-label name passes by default; with require_fqdn it gets
    504 5.5.2, as does a bare address, while a literal passes."""
    assert at_helo(make(tmp_path, delay_reject=False), "localhost") is CONTINUE
    plugin = make(tmp_path, delay_reject=False, require_fqdn=True)
    for name in ("localhost", "192.0.2.9"):
        verdict = at_helo(plugin, name)
        assert (verdict.reply.code, verdict.reply.status) == (504, "5.5.2")
        assert verdict.reply.text.endswith("need fully-qualified hostname")
    assert at_helo(plugin, "[192.0.2.9]") is CONTINUE
    assert at_helo(plugin, "mail.example.org") is CONTINUE


@pytest.mark.parametrize("name", ["mx.example.test", "MX.Example.Test.", "own.example", "pc.inner.example"])
def test_own_name_is_550_571(tmp_path: Path, name: str):
    """Our hostname (any case, trailing dot) and names in own_names (with
    .domain for the names below) get 550 5.7.1."""
    plugin = make(tmp_path, delay_reject=False, own_names=["own.example", ".inner.example"])
    verdict = at_helo(plugin, name)
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.7.1")
    assert "my own name" in verdict.reply.text


def test_names_near_our_own_pass(tmp_path: Path):
    """Names that only resemble ours pass: a subdomain of the hostname,
    inner.example itself when only .inner.example is listed."""
    plugin = make(tmp_path, delay_reject=False, own_names=[".inner.example"])
    for name in ("a.mx.example.test", "inner.example", "example.test"):
        assert at_helo(plugin, name) is CONTINUE


@pytest.mark.parametrize("name", ["[127.0.0.1]", "127.0.0.1", "[198.51.100.25]", "[IPv6:2001:db8::25]",
                                  "[IPv6:::ffff:127.0.0.1]"])
def test_own_address_is_550_571(tmp_path: Path, name: str):
    """The listener's address and own_addresses, as a literal or a bare
    address (IPv4-mapped too), get 550 5.7.1."""
    plugin = make(tmp_path, delay_reject=False, own_addresses=["198.51.100.0/24", "2001:db8::25"])
    verdict = at_helo(plugin, name)
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.7.1")
    assert "my own address" in verdict.reply.text


def test_wildcard_listener_has_no_own_address(tmp_path: Path):
    """A listener on 0.0.0.0 gives no address to compare; another
    listener's address is not this listener's."""
    listeners = [{"name": "mx", "address": "0.0.0.0", "port": 0, "plugins": ["relay_guard"]},
                 {"name": "sub", "address": "127.0.0.1", "port": 0, "plugins": ["relay_guard"]}]
    plugin = make(tmp_path, delay_reject=False, listeners=listeners)
    assert at_helo(plugin, "[0.0.0.0]") is CONTINUE
    assert at_helo(plugin, "[127.0.0.1]") is CONTINUE
    assert at_helo(plugin, "[127.0.0.1]", listener="sub").action is Action.REJECT


def test_reject_own_off(tmp_path: Path):
    """With reject_own off our own name passes."""
    assert at_helo(make(tmp_path, delay_reject=False, reject_own=False), "mx.example.test") is CONTINUE


def test_unprintable_name_is_not_echoed(tmp_path: Path):
    """The reply never echoes control or non-ASCII characters."""
    verdict = at_helo(make(tmp_path, delay_reject=False), "bad\x1b_name")
    assert verdict.reply.text == "<bad?_name>: Helo command rejected: Invalid name"


# -- trust and stages ------------------------------------------------------------------------


def test_trusted_clients_are_not_checked(tmp_path: Path):
    """Clients in trusted_networks, sessions marked trusted and (at RCPT)
    authenticated sessions skip every check, recorded as skip."""
    plugin = make(tmp_path, delay_reject=False, trusted=["192.0.2.0/24"])
    sess = session()
    assert plugin.check_helo(sess, "mx.example.test") is CONTINUE
    assert [(r.result, r.detail) for r in sess.results] == [("skip", "trusted")]
    plugin = make(tmp_path, delay_reject=False)
    assert plugin.check_helo(session(trusted=True), "my_pc") is CONTINUE
    assert at_rcpt(make(tmp_path), "my_pc", auth_user="alice") is CONTINUE
    assert at_rcpt(make(tmp_path), "my_pc").action is Action.REJECT


def test_delay_reject_answers_at_rcpt(tmp_path: Path):
    """By default the plugin takes part in RCPT only and checks the HELO
    name the session recorded; with delay_reject off, HELO only."""
    delayed = make(tmp_path)
    assert IRcptCheck.providedBy(delayed) and not IHeloCheck.providedBy(delayed)
    verdict = at_rcpt(delayed, "mx.example.test")
    assert (verdict.reply.code, verdict.reply.text) == (550, "<mx.example.test>: Helo command rejected: "
                                                              "that is my own name, not yours")
    early = make(tmp_path, delay_reject=False)
    assert IHeloCheck.providedBy(early) and not IRcptCheck.providedBy(early)


def test_through_the_pipeline_and_results(tmp_path: Path):
    """In the real Pipeline the HELO stage answers with the plugin's reply;
    a passing name is recorded once as pass."""
    plugin = make(tmp_path, delay_reject=False)
    pipe = Pipeline("mx", [PluginSlot("helo", plugin)], Clock())
    outcome = pipe.run("helo", session(), "[127.0.0.1]")
    assert (outcome.action, outcome.reply.code, outcome.plugin) == (Action.REJECT, 550, "helo")
    sess = session()
    assert pipe.run("helo", sess, "client.example.org").action is Action.CONTINUE
    assert [(r.plugin, r.result) for r in sess.results] == [("helo", "pass")]


def test_bad_options_are_config_errors(tmp_path: Path):
    """own_names must be domains and own_addresses addresses or networks."""
    config = parse_config(base_config(tmp_path), str(tmp_path / "gateway.toml"))
    with pytest.raises(ConfigError, match="own_names"):
        build_options(helo_plugin.factory, {"own_names": ["bad_name"]}, config.path)
    with pytest.raises(ConfigError, match="own_addresses"):
        build_options(helo_plugin.factory, {"own_addresses": ["mx.example"]}, config.path)
