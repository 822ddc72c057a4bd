"""Tests for L{gateway.config}: TOML to frozen dataclasses, and error
messages that name the file and the key.

Pure units.  Most tests go through L{parse_config} with a dict; the file
handling (missing file, TOML syntax) goes through L{load_config}.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import os
from typing import Any

import pytest

from gateway import config as C
from gateway.config import (
    ConfigError,
    DNSConfig,
    GatewayConfig,
    LimitsConfig,
    ListenerConfig,
    NextHop,
    RelayConfig,
    ServerConfig,
    load_config,
    parse_config,
    parse_duration,
    parse_host_port,
    parse_size,
)

PATH = "/etc/mailgateway/gateway.toml"

SERVER = {"hostname": "mx.example.test"}
# An auth listener needs somewhere to check passwords.
AUTH = {"users_file": "/etc/mailgateway/users"}


def doc(**sections: Any) -> dict[str, Any]:
    """A valid config document; sections given here are merged in (dicts)
    or replace the default (anything else)."""
    base: dict[str, Any] = {
        "server": dict(SERVER),
        "listener": [{"name": "mx", "port": 25}],
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(name), dict):
            base[name] = {**base[name], **value}
        else:
            base[name] = value
    return base


def parse(**sections: Any) -> GatewayConfig:
    return parse_config(doc(**sections), PATH)


def error(**sections: Any) -> str:
    """The message of the ConfigError that the document raises."""
    with pytest.raises(ConfigError) as info:
        parse(**sections)
    text = str(info.value)
    assert text.startswith(PATH + ": "), text
    return text


# -- defaults -----------------------------------------------------------------


def test_minimal_config_gets_defaults():
    """A config with only a hostname and one listener parses, and every
    [server] limit and the [dns] timeout get their documented defaults
    (regression: slots=True class attributes are descriptors, not defaults)."""
    config = parse_config({"server": {"hostname": "mx.example.test"},
                           "listener": [{"name": "mx", "port": 25}]}, PATH)
    assert config.server.max_message_size == 10 * 1024 * 1024
    assert config.server.max_recipients == 1000
    assert config.server.max_received_headers == 30
    assert config.dns.timeout == 10.0
    assert config.listeners == (ListenerConfig(name="mx", address="127.0.0.1", port=25),)


def test_defaults_of_every_other_section(tmp_path, monkeypatch):
    """Sections left out get their defaults; relative default paths are
    made absolute against the working directory."""
    monkeypatch.chdir(tmp_path)
    config = parse()
    assert config.path == PATH
    assert config.server == ServerConfig(hostname="mx.example.test")
    assert config.listeners == (ListenerConfig(name="mx", address="127.0.0.1", port=25),)
    assert config.listeners[0].tls == "none"
    assert config.listeners[0].plugins == ("relay_guard",)
    assert config.tls.cert == str(tmp_path / "var" / "tls" / "cert.pem")
    assert config.tls.key == str(tmp_path / "var" / "tls" / "key.pem")
    assert config.queue.path == str(tmp_path / "var" / "spool")
    assert config.dns == DNSConfig(servers=(), timeout=10.0)
    assert config.relay == RelayConfig(port=25, ca_file=None, smarthost=None)
    assert dict(config.routes) == {}
    assert config.auth.users_file is None
    assert config.limits == LimitsConfig()
    assert config.limits.max_command_line == 512
    assert config.limits.command_timeout == 300.0
    assert dict(config.plugin_tables) == {}


def test_hostname_defaults_to_fqdn(monkeypatch):
    """Without [server] hostname the host's FQDN is used."""
    monkeypatch.setattr(C.socket, "getfqdn", lambda: "gw.example.net")
    config = parse_config({"listener": [{"name": "mx", "port": 25}]}, PATH)
    assert config.server.hostname == "gw.example.net"


def test_config_is_frozen():
    """The validated config cannot be changed afterwards."""
    config = parse()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.hostname = "other"  # type: ignore[misc]


def test_to_dict_is_plain():
    """to_dict() gives only plain values (for check-config output)."""
    config = parse(server={"trusted_networks": ["10.0.0.0/8"], "local_domains": ["b.example", "a.example"]},
                   routes={"a.example": "[relay.example.net]:2525"})
    plain = config.to_dict()
    assert plain["server"]["trusted_networks"] == ["10.0.0.0/8"]
    assert plain["server"]["local_domains"] == ["a.example", "b.example"]
    assert plain["routes"] == {"a.example": "[relay.example.net]:2525"}
    assert plain["listeners"][0]["plugins"] == ["relay_guard"]


# -- every section's keys -----------------------------------------------------


def test_server_keys(tmp_path):
    """Every [server] key is read into ServerConfig, domains canonical."""
    plugin_dir = tmp_path / "myplugins"
    plugin_dir.mkdir()
    config = parse(server={
        "hostname": "MX.Example.Test",
        "local_domains": ["Example.TEST", ".sub.example.test"],
        "relay_domains": ["relay.example", "b\u00fccher.example"],
        "trusted_networks": ["10.0.0.0/8", "192.0.2.1", "2001:db8::/32"],
        "max_message_size": "20M",
        "max_recipients": 50,
        "max_received_headers": 40,
        "plugin_dirs": [str(plugin_dir)],
        "soft_bounce": True,
    })
    server = config.server
    assert server.hostname == "MX.Example.Test"
    assert server.local_domains == frozenset({"example.test", ".sub.example.test"})
    assert server.relay_domains == frozenset({"relay.example", "xn--bcher-kva.example"})
    assert server.trusted_networks == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.1/32"),
        ipaddress.ip_network("2001:db8::/32"))
    assert server.max_message_size == 20 * 1024 * 1024
    assert server.max_recipients == 50
    assert server.max_received_headers == 40
    assert server.plugin_dirs == (str(plugin_dir),)
    assert server.soft_bounce is True


def test_trusted_network_host_bits_allowed():
    """A network written with host bits set is taken as its network."""
    config = parse(server={"trusted_networks": ["10.1.2.3/8"]})
    assert config.server.trusted_networks == (ipaddress.ip_network("10.0.0.0/8"),)


def test_listener_keys():
    """Every [[listener]] key is read, in order, one ListenerConfig each."""
    config = parse(listener=[
        {"name": "mx", "address": "0.0.0.0", "port": 25, "tls": "starttls",
         "plugins": ["relay_guard", "spf"]},
        {"name": "submission", "address": "::", "port": 587, "tls": "starttls-required",
         "auth": True},
        {"name": "smtps", "address": "*", "port": 465, "tls": "implicit", "auth": True,
         "submission": False},
        {"name": "test", "port": 0},
    ], auth=AUTH)
    mx, sub, smtps, test = config.listeners
    assert mx == ListenerConfig("mx", "0.0.0.0", 25, "starttls", False, False, False, ("relay_guard", "spf"))
    assert sub == ListenerConfig("submission", "::", 587, "starttls-required", True, True, True, ("relay_guard",))
    assert smtps.address == "0.0.0.0"
    assert smtps.tls == "implicit"
    assert smtps.submission is False
    assert test.port == 0
    assert config.listener("submission") is sub
    with pytest.raises(KeyError):
        config.listener("nope")


def test_tls_queue_auth_keys(tmp_path):
    """[tls], [queue] and [auth] paths are read (absolute kept as is)."""
    config = parse(tls={"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem")},
                   queue={"path": str(tmp_path / "spool")},
                   auth={"users_file": str(tmp_path / "users")})
    assert config.tls.cert == str(tmp_path / "c.pem")
    assert config.tls.key == str(tmp_path / "k.pem")
    assert config.queue.path == str(tmp_path / "spool")
    assert config.auth.users_file == str(tmp_path / "users")


def test_dns_keys():
    """[dns] servers become (ip, port) pairs, IPv6 in brackets; timeout is
    a duration."""
    config = parse(dns={"servers": ["192.0.2.53", "127.0.0.1:5353", "[::1]", "[2001:db8::53]:5300"],
                        "timeout": "2s"})
    assert config.dns.servers == (("192.0.2.53", 53), ("127.0.0.1", 5353), ("::1", 53),
                                  ("2001:db8::53", 5300))
    assert config.dns.timeout == 2.0


def test_relay_keys(tmp_path):
    """[relay] port, ca_file and smarthost are read; the smarthost uses the
    relay port when it names none."""
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    config = parse(relay={"port": 2525, "ca_file": str(ca), "smarthost": "smtp.example.net"})
    assert config.relay == RelayConfig(port=2525, ca_file=str(ca),
                                       smarthost=NextHop("smtp.example.net", 2525, True))


def test_smarthost_bracketed_means_no_mx():
    """A bracketed smarthost is used as is, without an MX lookup."""
    config = parse(relay={"smarthost": "[smtp.example.net]:587"})
    assert config.relay.smarthost == NextHop("smtp.example.net", 587, False)


def test_limits_keys():
    """Every [limits] key is read, with durations and sizes converted."""
    config = parse(limits={
        "max_command_line": 1024, "max_text_line": 2000, "max_header_size": "64K",
        "max_bad_commands": 5, "command_timeout": "5m", "data_timeout": 30,
        "max_connections": 10, "max_connections_per_ip": 2, "plugin_timeout": "1.5s",
        "input_buffer": 1024,
    })
    assert config.limits == LimitsConfig(
        max_command_line=1024, max_text_line=2000, max_header_size=64 * 1024,
        max_bad_commands=5, command_timeout=300.0, data_timeout=30.0, max_connections=10,
        max_connections_per_ip=2, plugin_timeout=1.5, input_buffer=1024)


def test_plugin_tables_kept_raw():
    """[plugins.NAME] tables are kept as data for the registry."""
    config = parse(plugins={"spf": {"mode": "warn", "timeout": "5s"}, "relay_guard": {}})
    assert dict(config.plugin_tables) == {"spf": {"mode": "warn", "timeout": "5s"}, "relay_guard": {}}


# -- unknown keys -------------------------------------------------------------


@pytest.mark.parametrize("section, where", [
    ("server", "[server] bogus"),
    ("tls", "[tls] bogus"),
    ("queue", "[queue] bogus"),
    ("dns", "[dns] bogus"),
    ("relay", "[relay] bogus"),
    ("auth", "[auth] bogus"),
    ("limits", "[limits] bogus"),
])
def test_unknown_key_in_section(section, where):
    """An unknown key in any table names the file, table and key."""
    assert error(**{section: {"bogus": 1}}) == f"{PATH}: {where}: unknown key"


def test_unknown_key_in_listener():
    """An unknown key in a listener names the listener."""
    text = error(listener=[{"name": "mx", "port": 25, "bogus": 1}])
    assert text == f"{PATH}: [[listener]] 'mx' bogus: unknown key"


def test_unknown_top_level_table():
    """An unknown top-level table is an error naming it."""
    assert error(bogus={"x": 1}) == f"{PATH}: bogus: unknown key"


def test_misspelt_key_is_not_ignored():
    """A typo of a real key (max_recipient) is refused, never ignored."""
    assert "[server] max_recipient: unknown key" in error(server={"max_recipient": 5})


def test_config_error_fields():
    """ConfigError keeps path, key and message apart for callers."""
    with pytest.raises(ConfigError) as info:
        parse(limits={"bogus": 1})
    assert (info.value.path, info.value.key, info.value.message) == (PATH, "[limits] bogus", "unknown key")


# -- wrong types and bad values -------------------------------------------------


@pytest.mark.parametrize("sections, expected", [
    ({"server": {"hostname": 5}}, "[server] hostname: expected a string, got int 5"),
    ({"server": {"soft_bounce": "yes"}}, "[server] soft_bounce: expected true or false"),
    ({"server": {"max_recipients": True}}, "[server] max_recipients: expected an integer, got a boolean"),
    ({"server": {"max_recipients": 0}}, "[server] max_recipients: must be a positive integer"),
    ({"server": {"max_recipients": "10"}}, "[server] max_recipients: expected an integer"),
    ({"server": {"local_domains": "example.com"}}, "[server] local_domains: expected a list"),
    ({"server": {"local_domains": [5]}}, "[server] local_domains: expected a list of strings"),
    ({"server": {"max_message_size": "huge"}}, "[server] max_message_size: expected a size"),
    ({"server": {"max_message_size": 1.5}}, "[server] max_message_size: expected a size"),
    ({"server": "nope"}, "server: expected a table, got str"),
    ({"listener": [{"name": "mx", "port": "25"}]}, "[[listener]] 'mx' port: expected an integer"),
    ({"listener": [{"name": "mx", "port": 70000}]}, "[[listener]] 'mx' port: port must be 0..65535"),
    ({"listener": [{"name": "mx", "port": -1}]}, "[[listener]] 'mx' port: port must be 0..65535"),
    ({"listener": [{"name": "mx"}]}, "[[listener]] 'mx' port: is required"),
    ({"listener": [{"port": 25}]}, "[[listener]] #1 name: is required"),
    ({"listener": [{"name": "a b", "port": 25}]}, "[[listener]] #1 name: use letters"),
    ({"listener": [{"name": "mx", "port": 25, "auth": "yes"}]}, "[[listener]] 'mx' auth: expected true or false"),
    ({"listener": [{"name": "mx", "port": 25, "address": "localhost"}]},
     "[[listener]] 'mx' address: not an IP address"),
    ({"listener": []}, "[[listener]]: at least one listener is required"),
    ({"tls": {"cert": 1}}, "[tls] cert: expected a string"),
    ({"queue": {"path": ["a"]}}, "[queue] path: expected a string"),
    ({"dns": {"servers": ["ns.example.net"]}}, "[dns] servers: a DNS server must be an IP address"),
    ({"dns": {"servers": "192.0.2.53"}}, "[dns] servers: expected a list"),
    ({"relay": {"port": 0}}, "[relay] port: port must be 1..65535"),
    ({"relay": {"smarthost": "[smtp.example.net"}}, "[relay] smarthost: unbalanced '['"),
    ({"limits": {"max_bad_commands": 0}}, "[limits] max_bad_commands: must be a positive integer"),
    ({"limits": {"input_buffer": "lots"}}, "[limits] input_buffer: expected a size"),
    ({"plugins": {"spf": 1}}, "[plugins.spf]: expected a table"),
])
def test_wrong_types_and_values(sections, expected):
    """Wrong types and out-of-range values name the key and say what was
    expected."""
    text = error(**sections)
    assert text.startswith(f"{PATH}: {expected}"), text


@pytest.mark.parametrize("network", ["10.0.0.0/33", "nonsense", "300.1.2.3", "2001:db8::/129"])
def test_bad_cidr(network):
    """A bad trusted network is refused and quoted."""
    text = error(server={"trusted_networks": [network]})
    assert f"[server] trusted_networks: bad network {network!r}" in text


@pytest.mark.parametrize("key", ["local_domains", "relay_domains"])
@pytest.mark.parametrize("domain", ["ex ample.com", "example.com.", "-bad.example", "a..example"])
def test_bad_domain(key, domain):
    """A malformed local or relay domain is refused and quoted."""
    assert f"[server] {key}: bad domain {domain!r}" in error(server={key: [domain]})


def test_bad_hostname():
    """A malformed hostname is refused."""
    assert "[server] hostname: bad host name 'bad host'" in error(server={"hostname": "bad host"})


@pytest.mark.parametrize("mode", ["ssl", "tls", "STARTTLS", ""])
def test_bad_tls_mode(mode):
    """Only none, starttls, starttls-required and implicit are TLS modes."""
    text = error(listener=[{"name": "mx", "port": 25, "tls": mode}])
    assert f"[[listener]] 'mx' tls: must be one of none, starttls, starttls-required, implicit; got {mode!r}" in text


def test_duplicate_listener_names():
    """Two listeners with one name are refused."""
    text = error(listener=[{"name": "mx", "port": 25}, {"name": "mx", "port": 26}])
    assert text == f"{PATH}: [[listener]] 'mx' name: used twice"


def test_listener_without_relay_guard():
    """A listener whose plugin list lacks relay_guard is refused."""
    text = error(listener=[{"name": "mx", "port": 25, "plugins": ["spf"]}])
    assert f"{PATH}: [[listener]] 'mx' plugins: must include \"relay_guard\"" in text


def test_listener_with_empty_plugin_list():
    """An empty plugin list has no relay_guard either."""
    assert "must include \"relay_guard\"" in error(listener=[{"name": "mx", "port": 25, "plugins": []}])


def test_plugin_named_twice():
    """A plugin listed twice on one listener is refused."""
    text = error(listener=[{"name": "mx", "port": 25, "plugins": ["relay_guard", "relay_guard"]}])
    assert "[[listener]] 'mx' plugins: a plugin is named twice" in text


def test_auth_without_tls_refused():
    """auth = true on a listener with tls = "none" is refused: no AUTH in
    plaintext."""
    text = error(listener=[{"name": "sub", "port": 587, "auth": True, "tls": "none"}], auth=AUTH)
    assert text.startswith(f"{PATH}: [[listener]] 'sub' auth: AUTH is offered only over TLS")


@pytest.mark.parametrize("tls", ["starttls", "starttls-required", "implicit"])
def test_auth_with_tls_accepted(tls):
    """auth = true with any TLS mode is accepted, and implies submission."""
    listener = parse(listener=[{"name": "sub", "port": 587, "auth": True, "tls": tls}],
                     auth=AUTH).listeners[0]
    assert listener.auth is True
    assert listener.submission is True


def test_plugin_dir_must_exist(tmp_path):
    """A plugin folder that does not exist is refused."""
    missing = tmp_path / "missing"
    assert f"[server] plugin_dirs: not a directory: {missing}" in error(server={"plugin_dirs": [str(missing)]})


def test_ca_file_must_exist(tmp_path):
    """A [relay] ca_file that does not exist is refused."""
    missing = tmp_path / "ca.pem"
    assert f"[relay] ca_file: no such file: {missing}" in error(relay={"ca_file": str(missing)})


# -- routes -------------------------------------------------------------------


@pytest.mark.parametrize("value, hop", [
    ("relay.example.net:2525", NextHop("relay.example.net", 2525, True)),
    ("relay.example.net", NextHop("relay.example.net", 25, True)),
    ("[relay.example.net]:2526", NextHop("relay.example.net", 2526, False)),
    ("[relay.example.net]", NextHop("relay.example.net", 25, False)),
    ("192.0.2.7", NextHop("192.0.2.7", 25, False)),
    ("192.0.2.7:26", NextHop("192.0.2.7", 26, False)),
    ("[2001:db8::1]:587", NextHop("2001:db8::1", 587, False)),
    ("[2001:db8::1]", NextHop("2001:db8::1", 25, False)),
    ("[IPv6:2001:db8::2]:25", NextHop("2001:db8::2", 25, False)),
])
def test_route_values(value, hop):
    """Route values: host[:port] looks up MX; [host][:port] and IP
    addresses do not; IPv6 is written in brackets."""
    assert parse(routes={"example.com": value}).routes == {"example.com": hop}


def test_route_keys_canonical_and_parent_suffix():
    """Route keys are canonical domains; a leading dot means subdomains."""
    routes = parse(routes={"Example.COM": "a.example.net", ".example.org": "b.example.net"}).routes
    assert routes == {"example.com": NextHop("a.example.net", 25, True),
                      ".example.org": NextHop("b.example.net", 25, True)}


def test_route_default_port_is_relay_port():
    """A route without a port uses [relay] port."""
    routes = parse(relay={"port": 2500}, routes={"example.com": "[hub.example.net]"}).routes
    assert routes["example.com"] == NextHop("hub.example.net", 2500, False)


def test_nexthop_str():
    """NextHop prints in the [routes] syntax."""
    assert str(NextHop("hub.example.net", 25, True)) == "hub.example.net:25"
    assert str(NextHop("hub.example.net", 2525, False)) == "[hub.example.net]:2525"


@pytest.mark.parametrize("value, message", [
    ("2001:db8::1", "an IPv6 address must be written in brackets"),
    ("hub.example.net:0", "bad port"),
    ("hub.example.net:99999", "bad port"),
    ("hub.example.net:http", "bad port"),
    ("[hub.example.net", "unbalanced '['"),
    ("[hub.example.net]x", "unexpected text after ']'"),
    ("", "empty host"),
    (":25", "empty host"),
])
def test_bad_route_values(value, message):
    """Bad route values are refused with the route's domain as key."""
    text = error(routes={"example.com": value})
    assert f"{PATH}: [routes] 'example.com': {message}" in text


def test_bad_route_domain():
    """A route key that is not a domain is refused."""
    assert "[routes] 'bad domain':" in error(routes={"bad domain": "hub.example.net"})


def test_route_value_must_be_string():
    """A route value must be a string."""
    assert "[routes] example.com: expected a string" in error(routes={"example.com": 25})


def test_parse_host_port_directly():
    """parse_host_port() reports whether brackets were used."""
    assert parse_host_port(" [mx.example.net]:2525 ", 25) == ("mx.example.net", 2525, True)
    assert parse_host_port("mx.example.net", 587) == ("mx.example.net", 587, False)


# -- durations and sizes ------------------------------------------------------


@pytest.mark.parametrize("value, seconds", [
    (30, 30.0), (1.5, 1.5), (0, 0.0), ("30", 30.0), ("90s", 90.0), ("5m", 300.0),
    ("2h", 7200.0), ("5d", 432000.0), ("1w", 604800.0), (" 5M ", 300.0), ("0.5s", 0.5),
])
def test_parse_duration(value, seconds):
    """Durations are seconds, or a number with s, m, h, d or w."""
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [True, -1, "5x", "5 minutes", "", "m", "-5m", None, [5]])
def test_parse_duration_refuses(value):
    """Booleans, negatives, unknown units and other types are refused."""
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("value, size", [
    (1024, 1024), (0, 0), ("1024", 1024), ("10M", 10 * 1024**2), ("10m", 10 * 1024**2),
    ("512K", 512 * 1024), ("512KiB", 512 * 1024), ("1G", 1024**3), ("10MB", 10 * 1024**2),
])
def test_parse_size(value, size):
    """Sizes are bytes, or a number with K, M or G (binary multiples)."""
    assert parse_size(value) == size


@pytest.mark.parametrize("value", [True, -1, 1.5, "10X", "ten", "", "1.5M", None])
def test_parse_size_refuses(value):
    """Booleans, negatives, fractions and unknown units are refused."""
    with pytest.raises(ValueError):
        parse_size(value)


def test_duration_error_names_key():
    """A bad duration in the config names its key and quotes the value."""
    text = error(limits={"command_timeout": "5x"})
    assert text == (f"{PATH}: [limits] command_timeout: expected a duration such as 30, "
                    "\"90s\", \"5m\", \"5d\"; got '5x'")


def test_negative_duration_names_key():
    """A negative timeout is refused."""
    assert error(limits={"data_timeout": -5}) == f"{PATH}: [limits] data_timeout: must not be negative"


def test_dns_timeout_duration():
    """[dns] timeout accepts duration strings."""
    assert parse(dns={"timeout": "1m"}).dns.timeout == 60.0


# -- paths --------------------------------------------------------------------


def test_relative_paths_resolved_against_working_directory(tmp_path, monkeypatch):
    """Relative paths in [tls], [queue], [auth], [relay] and plugin_dirs are
    made absolute against the working directory at load time."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plugins.d").mkdir()
    (tmp_path / "ca.pem").write_text("x")
    config = parse(
        server={"plugin_dirs": ["plugins.d"]},
        tls={"cert": "tls/cert.pem", "key": "./tls/key.pem"},
        queue={"path": "spool"},
        auth={"users_file": "etc/../users"},
        relay={"ca_file": "ca.pem"},
    )
    assert config.server.plugin_dirs == (str(tmp_path / "plugins.d"),)
    assert config.tls.cert == str(tmp_path / "tls" / "cert.pem")
    assert config.tls.key == str(tmp_path / "tls" / "key.pem")
    assert config.queue.path == str(tmp_path / "spool")
    assert config.auth.users_file == str(tmp_path / "users")
    assert config.relay.ca_file == str(tmp_path / "ca.pem")
    for value in (config.tls.cert, config.queue.path, config.auth.users_file):
        assert os.path.isabs(value)


def test_home_directory_expanded(monkeypatch, tmp_path):
    """A path starting with ~ is expanded to the home directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse(queue={"path": "~/spool"}).queue.path == str(tmp_path / "spool")


# -- protocol limits ----------------------------------------------------------


def test_max_command_line_below_512_refused():
    """RFC 5321 needs command lines of 512 octets; less is refused."""
    text = error(limits={"max_command_line": 511})
    assert text == f"{PATH}: [limits] max_command_line: RFC 5321 §4.5.3.1.4 requires at least 512"


def test_max_command_line_512_accepted():
    """Exactly 512 is allowed."""
    assert parse(limits={"max_command_line": 512}).limits.max_command_line == 512


def test_max_text_line_below_1000_refused():
    """RFC 5321 needs text lines of 1000 octets; less is refused."""
    assert "[limits] max_text_line: RFC 5321 §4.5.3.1.6 requires at least 1000" in error(
        limits={"max_text_line": 999})


# -- load_config: files ---------------------------------------------------------


def test_load_config_reads_toml(tmp_path, monkeypatch):
    """load_config() reads a TOML file and remembers its path."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[server]\n'
        'hostname = "mx.example.test"\n'
        'max_message_size = "1M"\n'
        'local_domains = ["example.test"]\n'
        '\n'
        '[[listener]]\n'
        'name = "mx"\n'
        'port = 2525\n'
        'plugins = ["relay_guard"]\n'
        '\n'
        '[dns]\n'
        'timeout = "3s"\n'
        '\n'
        '[routes]\n'
        '"example.org" = "[hub.example.net]:2526"\n'
        '\n'
        '[plugins.relay_guard]\n'
    )
    config = load_config(str(path))
    assert config.path == str(path)
    assert config.server.max_message_size == 1024 * 1024
    assert config.listeners[0].port == 2525
    assert config.routes == {"example.org": NextHop("hub.example.net", 2526, False)}
    assert dict(config.plugin_tables) == {"relay_guard": {}}
    assert config.queue.path == str(tmp_path / "var" / "spool")


def test_load_config_error_names_file(tmp_path):
    """Errors from a file name that file."""
    path = tmp_path / "gateway.toml"
    path.write_text('[server]\nhostname = "mx.example.test"\nbogus = 1\n'
                    '[[listener]]\nname = "mx"\nport = 25\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: [server] bogus: unknown key"


def test_missing_file(tmp_path):
    """A missing file gives "<path>: file: not found"."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: file: not found"


def test_unreadable_path(tmp_path):
    """A directory instead of a file is reported against "file"."""
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value).startswith(f"{tmp_path}: file: ")


def test_toml_syntax_error(tmp_path):
    """A TOML syntax error names the file and gives the line and column."""
    path = tmp_path / "gateway.toml"
    path.write_text('[server\nhostname = "x"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    text = str(info.value)
    assert text.startswith(f"{path}: syntax: ")
    assert "line 1" in text


def test_parse_config_does_not_modify_input():
    """parse_config() leaves the document it was given unchanged."""
    document = doc(routes={"example.com": "hub.example.net"}, plugins={"spf": {"mode": "warn"}})
    before = copy.deepcopy(document)
    parse_config(document, PATH)
    assert document == before


def test_every_limit_field_is_configurable():
    """Every LimitsConfig field is a [limits] key (no field without a key)."""
    values = {f.name: getattr(LimitsConfig(), f.name) for f in dataclasses.fields(LimitsConfig)}
    values["command_timeout"] = 12
    assert parse(limits=values).limits.command_timeout == 12.0


def test_unknown_key_in_second_listener():
    """The error for the second listener names that listener."""
    text = error(listener=[{"name": "mx", "port": 25}, {"name": "sub", "port": 587, "tls": "starttls",
                                                          "auth": True, "sasl": "yes"}], auth=AUTH)
    assert text == f"{PATH}: [[listener]] 'sub' sasl: unknown key"
