"""A real authoritative DNS server on loopback for tests, fed from a Python dict.

Why a real server rather than a fake resolver: the gateway's DNS code runs
on C{twisted.names.client.Resolver}, whose behaviour on NXDOMAIN, NODATA,
SERVFAIL, timeouts, CNAME chains and truncation (TC bit, then TCP) is part
of what we test.  A stub C{IResolver} would test our assumptions about
twisted.names instead of twisted.names itself.  Routing, SPF, DKIM, DMARC
and MTA-STS tests all share this one server.

The zone is a plain dict that a test may change while the server runs;
every query reads it afresh, so no restart or cache flush is needed.

Semantics (what a real authoritative server does):

  - a name with no records at all answers NXDOMAIN (RFC 2308 §2.1);
  - a name with records, but none of the asked type, answers NOERROR with
    an empty answer section, "NODATA" (RFC 2308 §2.2);
  - a name with a CNAME answers the CNAME and, when C{chase_cnames} is
    true, the records of the target found in the zone, as an authoritative
    server does for in-zone targets (RFC 1034 §3.6.2, §4.3.2);
  - a UDP answer larger than C{udp_size} (512 bytes, RFC 1035 §4.2.1; the
    twisted.names client sends no EDNS0) is replaced by an empty answer with
    the TC bit set, so the client retries over TCP on the same port, as it
    must for e.g. 2048-bit DKIM keys;
  - L{TestDNS.set_servfail} and L{TestDNS.set_timeout} inject failures for
    one name (optionally one type).

Names are compared case-insensitively and without a trailing dot.

Example, a fixture for a test module (no conftest.py needed)::

    import pytest
    import pytest_twisted
    from twisted.internet import reactor

    from gateway.config import DNSConfig
    from gateway.dns import make_resolver
    from tests.dnsserver import TestDNS

    @pytest.fixture
    def test_dns():
        server = TestDNS()
        server.start()
        yield server
        pytest_twisted.blockon(server.stop())

    @pytest.fixture
    def resolver(test_dns):
        return make_resolver(DNSConfig(servers=(("127.0.0.1", test_dns.port),), timeout=2), reactor)

    @pytest_twisted.ensureDeferred
    async def test_mx(test_dns, resolver):
        test_dns.add("example.test", "MX", (10, "mx.example.test"))
        test_dns.add("mx.example.test", "A", "192.0.2.1")
        ...
        assert ("example.test", "MX") in test_dns.queries

Standards: RFC 1034 §3.6.2, §4.3.2 (CNAME, authoritative answers); RFC 1035
§4.2 (UDP 512 bytes, TCP); RFC 2308 §2 (NXDOMAIN and NODATA); RFC 3596
(AAAA); RFC 7505 (null MX, C{add(name, "MX", (0, "."))}).
See also: twisted.names.server.DNSServerFactory; twisted/names/test/test_names.py
(the same idea on a FileAuthority); tests/test_dns.py and tests/test_routing.py.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.names import dns, server

#: Record types L{TestDNS.add} understands by name.
RECORD_TYPES = {
    "A": dns.A,
    "AAAA": dns.AAAA,
    "MX": dns.MX,
    "TXT": dns.TXT,
    "PTR": dns.PTR,
    "CNAME": dns.CNAME,
    "NS": dns.NS,
}
_TYPE_NAMES = {code: name for name, code in RECORD_TYPES.items()}

#: How many CNAME links the server follows inside its own zone.
MAX_CHASE = 8


def _norm(name: str | bytes) -> str:
    """The zone key for a name: lower case, no trailing dot ("." is "")."""
    if isinstance(name, bytes):
        name = name.decode("ascii", "backslashreplace")
    return name.strip().rstrip(".").lower()


def type_name(code: int) -> str:
    """C{"MX"} for C{dns.MX}; the twisted.names name for other types."""
    return _TYPE_NAMES.get(code) or dns.QUERY_TYPES.get(code) or str(code)


def reverse_name(address: str) -> str:
    """The PTR owner name of an IP address (C{"1.2.0.192.in-addr.arpa"}),
    for C{add(reverse_name(ip), "PTR", host)} and DNSBL-style zones."""
    return ipaddress.ip_address(address).reverse_pointer


def _txt_chunks(value: Any) -> list[bytes]:
    """TXT character-strings: a str is split into 255-octet chunks (as zone
    tools do for DKIM keys); a list is kept chunk by chunk."""
    if isinstance(value, (list, tuple)):
        chunks = [c.encode("utf-8") if isinstance(c, str) else bytes(c) for c in value]
    else:
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        chunks = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
    for chunk in chunks:
        if len(chunk) > 255:
            raise ValueError("a TXT character-string is at most 255 octets")
    return chunks


def _payload(rtype: str, value: Any, ttl: int) -> Any:
    """Build the twisted.names record for C{add}."""
    if not isinstance(value, (str, bytes, tuple, list)) and hasattr(value, "TYPE"):
        return value  # an already built dns.Record_* instance
    if rtype == "A":
        return dns.Record_A(str(ipaddress.IPv4Address(value)), ttl=ttl)
    if rtype == "AAAA":
        return dns.Record_AAAA(str(ipaddress.IPv6Address(value)), ttl=ttl)
    if rtype == "MX":
        preference, exchange = value
        return dns.Record_MX(int(preference), _norm(exchange), ttl=ttl)
    if rtype == "TXT":
        return dns.Record_TXT(*_txt_chunks(value), ttl=ttl)
    if rtype == "PTR":
        return dns.Record_PTR(_norm(value), ttl=ttl)
    if rtype == "CNAME":
        return dns.Record_CNAME(_norm(value), ttl=ttl)
    if rtype == "NS":
        return dns.Record_NS(_norm(value), ttl=ttl)
    raise ValueError(f"unsupported record type {rtype!r}; use one of {', '.join(RECORD_TYPES)}")


class _ZoneServerFactory(server.DNSServerFactory):
    """Answers every query from the L{TestDNS} zone.

    Why C{handleQuery} is overridden instead of passing an authority
    resolver: the stock path logs every SERVFAIL as an error and cannot
    "never answer"; building the response here keeps the rcodes exact.
    """

    def __init__(self, zone: TestDNS) -> None:
        super().__init__()
        self._zone = zone

    def handleQuery(self, message: dns.Message, protocol: Any, address: Any) -> None:
        query = message.queries[0]
        outcome = self._zone._answer(query.name.name, query.type)
        if outcome is None:
            return  # set_timeout: the client must give up on its own
        rcode, answers = outcome
        response = dns.Message(
            id=message.id, answer=1, opCode=message.opCode, recDes=message.recDes,
            recAv=0, auth=1, rCode=rcode,
        )
        response.queries = message.queries
        response.answers = answers
        response.maxSize = 0
        response.timeReceived = getattr(message, "timeReceived", 0.0)  # read by sendReply
        if address is not None and len(response.toStr()) > self._zone.udp_size:
            response.answers = []
            response.trunc = 1
        self.sendReply(protocol, response, address)


class TestDNS:
    """An authoritative DNS server on 127.0.0.1 (UDP and TCP, one port).

    @ivar records: name -> list of (type name, twisted.names record); change
        it through L{add}, L{remove} and L{clear}.
    @ivar queries: every (name, type name) received, in order, e.g.
        C{("example.test", "MX")}; tests assert on it and may clear it.
    @ivar chase_cnames: include in-zone CNAME targets' records in answers
        (True, like BIND for its own zone); False makes the client re-query.
    @ivar udp_size: larger UDP answers are truncated (TC bit) to force TCP.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, reactor: Any = None, *, chase_cnames: bool = True, udp_size: int = 512) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self._reactor = reactor
        self.records: dict[str, list[tuple[str, Any]]] = {}
        self.queries: list[tuple[str, str]] = []
        self.chase_cnames = chase_cnames
        self.udp_size = udp_size
        self._servfail: set[tuple[str, str | None]] = set()
        self._timeout: set[tuple[str, str | None]] = set()
        self._factory = _ZoneServerFactory(self)
        self._udp_port: Any = None
        self._tcp_port: Any = None
        self.port = 0

    # Zone editing

    def add(self, name: str, rtype: str, value: Any, ttl: int = 300) -> None:
        """Add one record.

        @param rtype: C{A}, C{AAAA}, C{MX}, C{TXT}, C{PTR}, C{CNAME} or C{NS}.
        @param value: an address for A/AAAA; C{(preference, exchange)} for MX
            (exchange C{"."} is the RFC 7505 null MX); a str (split into
            255-octet chunks) or a list of chunks for TXT; a name for PTR,
            CNAME and NS.  A ready C{dns.Record_*} is accepted as is.
        """
        rtype = rtype.upper()
        self.records.setdefault(_norm(name), []).append((rtype, _payload(rtype, value, ttl)))

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Remove a name's records (of one type only, if given).

        Removing the last record makes the name NXDOMAIN again.
        """
        key = _norm(name)
        if rtype is None:
            self.records.pop(key, None)
            return
        kept = [r for r in self.records.get(key, []) if r[0] != rtype.upper()]
        if kept:
            self.records[key] = kept
        else:
            self.records.pop(key, None)

    def clear(self) -> None:
        """Forget every record, injected failure and recorded query."""
        self.records.clear()
        self._servfail.clear()
        self._timeout.clear()
        self.queries.clear()

    def set_servfail(self, name: str, rtype: str | None = None) -> None:
        """Answer SERVFAIL for C{name} (only for type C{rtype}, if given)."""
        self._servfail.add((_norm(name), rtype.upper() if rtype else None))

    def set_timeout(self, name: str, rtype: str | None = None) -> None:
        """Never answer queries for C{name} (only for type C{rtype}, if given)."""
        self._timeout.add((_norm(name), rtype.upper() if rtype else None))

    def clear_failure(self, name: str) -> None:
        """Undo L{set_servfail} and L{set_timeout} for C{name} (all types)."""
        key = _norm(name)
        self._servfail = {f for f in self._servfail if f[0] != key}
        self._timeout = {f for f in self._timeout if f[0] != key}

    # Answering

    def _answer(self, raw_name: bytes, qtype: int) -> tuple[int, list[dns.RRHeader]] | None:
        """(rcode, answer records) for one question, or None for no answer."""
        name = _norm(raw_name)
        tname = type_name(qtype)
        self.queries.append((name, tname))
        if (name, None) in self._timeout or (name, tname) in self._timeout:
            return None
        if (name, None) in self._servfail or (name, tname) in self._servfail:
            return dns.ESERVER, []
        if name not in self.records:
            return dns.ENAME, []
        answers: list[dns.RRHeader] = []
        current = name
        for _ in range(MAX_CHASE):
            owned = self.records.get(current, [])
            matching = [p for _, p in owned if qtype in (dns.ALL_RECORDS, p.TYPE)]
            cnames = [p for _, p in owned if p.TYPE == dns.CNAME]
            if matching or not cnames:
                answers.extend(self._rr(current, p) for p in matching)
                break
            answers.append(self._rr(current, cnames[0]))
            current = _norm(cnames[0].name.name)
            if not self.chase_cnames:
                break
        return dns.OK, answers

    @staticmethod
    def _rr(owner: str, payload: Any) -> dns.RRHeader:
        return dns.RRHeader(owner, payload.TYPE, dns.IN, payload.ttl or 0, payload, auth=True)

    # Life cycle

    def start(self) -> int:
        """Listen on 127.0.0.1: UDP on a free port, then TCP on the same one.

        @return: the port number (also L{port}).
        """
        for _ in range(20):
            udp = self._reactor.listenUDP(0, dns.DNSDatagramProtocol(self._factory), interface="127.0.0.1")
            port = udp.getHost().port
            try:
                tcp = self._reactor.listenTCP(port, self._factory, interface="127.0.0.1")
            except CannotListenError:
                udp.stopListening()
                continue
            self._udp_port, self._tcp_port, self.port = udp, tcp, port
            return port
        raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")

    def stop(self) -> defer.Deferred[Any]:
        """Stop listening and close open TCP connections."""
        waits = []
        for listening in (self._udp_port, self._tcp_port):
            if listening is not None:
                waits.append(defer.maybeDeferred(listening.stopListening))
        for protocol in list(self._factory.connections):
            protocol.transport.loseConnection()
        self._udp_port = self._tcp_port = None
        return defer.gatherResults(waits)

    @property
    def address(self) -> str:
        """C{"127.0.0.1:PORT"}, the form C{[dns] servers} takes."""
        return f"127.0.0.1:{self.port}"

    @property
    def servers(self) -> tuple[tuple[str, int], ...]:
        """The C{DNSConfig.servers} value pointing at this server."""
        return (("127.0.0.1", self.port),)
