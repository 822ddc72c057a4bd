"""The openspf.org RFC 7208 test suite, run against L{gateway.spf.check_host}.

Every test case of C{tests/data/rfc7208-tests.yml} (release 2014.04, as
shipped with pyspf 2.0.14; licence in C{tests/data/README.md}) is one pytest
test with the case's id.  Its scenario's zone is served by the real test DNS
server (L{tests.dnsserver.TestDNS}) and asked through a real
C{twisted.names.client.Resolver}, built by L{gateway.dns.make_resolver} as
the gateway builds it, so NXDOMAIN, NODATA, CNAMEs and timeouts are what
twisted.names makes of them on the wire.

How the YAML zone data is served (the suite's own conventions, see the
header comment of the YAML file):

  - C{SPF} entries are published as type 99 records, and also as TXT
    records when the name has no C{TXT} entry at all: the suite relies on
    its drivers for this "auto-magic duplication" of SPF to TXT.  check_host
    only ever asks for TXT (RFC 7208 §3.1, §4.4);
  - C{TXT: NONE} publishes nothing, but stops the duplication;
  - a list value of TXT/SPF is one record of several character-strings;
  - C{TIMEOUT} makes the server never answer for that name, except for the
    types of the records listed before it (C{spftimeout.example.net}
    answers TXT but not type 99);
  - C{MX: [pref, ""]} is the null MX.

A case's C{result} may be a list of acceptable results; C{explanation}, when
given, must match exactly, C{DEFAULT} standing for the default explanation
(which the test passes as the literal text C{DEFAULT}).

Cases listed in L{DEVIATIONS} are deliberate departures, explained in
C{tests/data/README.md}, and marked C{xfail(strict=True)}.

Speed: one server and one resolver for the module, the zone replaced per
case, and a 0.25 s resolver timeout so that the C{TIMEOUT} cases cost a
quarter of a second each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.names import dns

from gateway.config import DNSConfig
from gateway.dns import make_resolver
from gateway.spf import check_host
from tests.dnsserver import TestDNS

SUITE = Path(__file__).parent / "data" / "rfc7208-tests.yml"

#: The resolver timeout for the suite: TIMEOUT cases wait this long.
RESOLVER_TIMEOUT = 0.25

#: The longest a single case may take (a bound, never expected).
WAIT = 20

#: Test id -> reason, for deliberate deviations (see tests/data/README.md).
DEVIATIONS: dict[str, str] = {}

#: The record types check_host asks for, plus the ones the zone may hold.
SERVED_TYPES = ("A", "AAAA", "MX", "TXT", "PTR", "CNAME", "SPF")


def load_suite(path: Path = SUITE) -> list[dict[str, Any]]:
    """The scenarios of the YAML file, in order."""
    with open(path, "rb") as stream:
        return list(yaml.safe_load_all(stream))


def _chunks(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)]


def serve_zone(server: TestDNS, zonedata: dict[str, list[Any]]) -> None:
    """Publish one scenario's C{zonedata} on C{server} (see the module
    docstring for the conventions)."""
    for name, entries in zonedata.items():
        has_txt = any(isinstance(e, dict) and "TXT" in e for e in entries)
        published: list[Any] = []
        copies: list[Any] = []
        for entry in entries:
            if entry == "TIMEOUT":
                published.append("TIMEOUT")
                continue
            [(rtype, value)] = entry.items()
            if rtype == "SPF":
                chunks = [c.encode("utf-8") for c in _chunks(value)]
                published.append(("SPF", dns.Record_SPF(*chunks, ttl=300)))
                if not has_txt:
                    copies.append(("TXT", _chunks(value)))
            elif rtype == "TXT":
                if value != "NONE":
                    published.append(("TXT", _chunks(value)))
            elif rtype == "MX":
                published.append(("MX", (int(value[0]), str(value[1]))))
            else:
                published.append((rtype, str(value)))
        answered: set[str] = set()
        timeout = False
        for item in published + copies:
            if item == "TIMEOUT":
                timeout = True
                break
            rtype, value = item
            server.add(name, rtype, value)
            answered.add(rtype)
        if timeout:
            for rtype in SERVED_TYPES:
                if rtype not in answered:
                    server.set_timeout(name, rtype)


def _cases() -> list[Any]:
    params = []
    for index, scenario in enumerate(load_suite()):
        for case_id, case in scenario["tests"].items():
            marks = []
            if case_id in DEVIATIONS:
                marks.append(pytest.mark.xfail(strict=True, reason=DEVIATIONS[case_id]))
            params.append(pytest.param(index, case, id=case_id, marks=marks))
    return params


@pytest.fixture(scope="module")
def suite_dns():
    """One test DNS server for the whole suite."""
    server = TestDNS()
    server.start()
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture(scope="module")
def scenarios() -> list[dict[str, Any]]:
    """The parsed YAML scenarios."""
    return load_suite()


@pytest.fixture(scope="module")
def suite_resolver(suite_dns: TestDNS):
    """A resolver as the gateway builds it, asking only the test server,
    with a short timeout."""
    return make_resolver(DNSConfig(servers=suite_dns.servers, timeout=RESOLVER_TIMEOUT), reactor)


def test_suite_file_is_complete(scenarios):
    """The copy of the suite holds all 16 scenarios and 203 uniquely named
    cases, so none is silently skipped by the parametrisation."""
    ids = [case_id for scenario in scenarios for case_id in scenario["tests"]]
    assert len(scenarios) == 16
    assert len(ids) == len(set(ids)) == 203


@pytest.mark.parametrize("scenario_index, case", _cases())
@pytest_twisted.ensureDeferred
async def test_rfc7208_case(scenario_index, case, scenarios, suite_dns, suite_resolver):
    """check_host() gives one of the case's accepted results (and its
    explanation, when the case names one) for the case's zone served by a
    real DNS server."""
    suite_dns.clear()
    serve_zone(suite_dns, scenarios[scenario_index]["zonedata"])
    mailfrom, helo = str(case["mailfrom"]), str(case["helo"])
    if mailfrom:
        domain = mailfrom.rpartition("@")[2]
        sender = mailfrom
    else:
        domain = helo
        sender = f"postmaster@{helo}"
    result = await Deferred.fromCoroutine(check_host(
        str(case["host"]), domain, sender, helo, suite_resolver,
        receiver="receiver.example.net", default_explanation="DEFAULT",
    )).addTimeout(WAIT, reactor)
    expected = case["result"] if isinstance(case["result"], list) else [case["result"]]
    assert result.result in expected, f"{result} ({case.get('spec')})"
    if "explanation" in case:
        assert result.explanation == case["explanation"]
