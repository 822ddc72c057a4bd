"""Acceptance tests of the policy plugins and the shared state store on
real sockets: the real gateway on loopback, stdlib smtplib in a thread,
and (for the Redis back end) a real redis-server started per test.

Real time is used where the wire is (a 2 s rate-limit window, a 1 s
greylisting delay); every wait is bounded (C{addTimeout}, socket
timeouts).  Clock-controlled greylisting is in tests/test_greylist.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.logger import LogLevel, capturedLogs

from tests import redisserver
from tests.support import base_config, client, in_thread, queued, raw_session, write_config

#: The real redis-server fixture (skips only when redis-server is missing).
redis_server = redisserver.redis_server

MESSAGE = b"Subject: policy test\r\n\r\nbody\r\n"


def attempt(port: int, count: int = 1, sender: str = "a@example.org",
            recipient: str = "b@example.test") -> list[tuple[str, int, bytes]]:
    """C{count} transactions on one connection (blocking; use in_thread).

    @return: per transaction, the last command answered and its reply:
        C{("mail", 451, b"4.7.1 ...")} or C{("data", 250, b"2.0.0 ...")}.
    """
    out = []
    with client(port) as smtp:
        smtp.ehlo("c.example.org")
        for _ in range(count):
            code, text = smtp.mail(sender)
            if code != 250:
                out.append(("mail", code, text))
                smtp.rset()
                continue
            code, text = smtp.rcpt(recipient)
            if code != 250:
                out.append(("rcpt", code, text))
                smtp.rset()
                continue
            code, text = smtp.data(MESSAGE)
            out.append(("data", code, text))
    return out


def sleep(seconds: float):
    """A bounded real-time wait on the reactor (no time.sleep)."""
    return task.deferLater(reactor, seconds, lambda: None)


def policy_config(tmp_path: Path, plugins: dict[str, dict[str, Any]], store: dict[str, Any] | None = None,
                  spool: str = "spool") -> dict[str, Any]:
    """base_config with the given plugins after relay_guard, trusted_networks
    empty (so limits apply to 127.0.0.1) and an optional [store]."""
    doc = base_config(tmp_path, queue={"path": str(tmp_path / spool)})
    doc["listener"][0]["plugins"] = ["relay_guard", *plugins]
    if store is not None:
        doc["store"] = store
    doc["plugins"] = plugins
    return doc


# -- ratelimit ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_message_rate_limit_hit_and_reset(start_gateway, tmp_path):
    """messages_per_ip = 2 per 2 s window: the third MAIL from 127.0.0.1 gets
    451 4.7.1 with the reason; after the window, mail is accepted again."""
    service = start_gateway(policy_config(tmp_path, {"ratelimit": {"messages_per_ip": 2, "window": "2s"}}))
    port = service.port_of("mx")
    first = await in_thread(attempt, port, 3)
    assert [(stage, code) for stage, code, _ in first] == [("data", 250), ("data", 250), ("mail", 451)]
    assert first[2][2] == (b"4.7.1 Rate limit exceeded: too many messages from 127.0.0.1 "
                           b"(limit 2 per 2s), try again later")
    await sleep(2.2)
    again = await in_thread(attempt, port)
    assert [(stage, code) for stage, code, _ in again] == [("data", 250)]
    assert len(queued(tmp_path / "spool")) == 3


@pytest_twisted.ensureDeferred
async def test_recipient_rate_limit_at_rcpt(start_gateway, tmp_path):
    """recipients_per_ip = 2: the third RCPT in the window gets 451 4.7.1
    and the message goes to the first two only."""
    service = start_gateway(policy_config(tmp_path, {"ratelimit": {"recipients_per_ip": 2, "window": "1h"}}))
    port = service.port_of("mx")

    def talk():
        with client(port) as smtp:
            smtp.ehlo("c.example.org")
            smtp.mail("a@example.org")
            replies = [smtp.rcpt(f"u{i}@example.test") for i in range(3)]
            smtp.data(MESSAGE)
            return replies

    replies = await in_thread(talk)
    assert [(code, text[:5]) for code, text in replies] == [(250, b"2.1.5"), (250, b"2.1.5"), (451, b"4.7.1")]
    [(envelope, _)] = queued(tmp_path / "spool")
    assert [r.address for r in envelope.recipients] == ["u0@example.test", "u1@example.test"]


@pytest_twisted.ensureDeferred
async def test_connection_rate_limit_gives_421(start_gateway, tmp_path):
    """connections_per_ip = 1 per window: the second connection is greeted
    with 421 4.7.0 and closed."""
    service = start_gateway(policy_config(tmp_path, {"ratelimit": {"connections_per_ip": 1, "window": "1h"}}))
    port = service.port_of("mx")
    first = await in_thread(raw_session, port, b"QUIT\r\n")
    assert first.startswith(b"220 ")
    second = await in_thread(raw_session, port, b"EHLO c.example.org\r\n")
    assert second.startswith(b"421 4.7.0 Rate limit exceeded: too many connections from 127.0.0.1")
    assert b"250" not in second


# -- greylist --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_greylisting_first_sight_then_retry(start_gateway, tmp_path):
    """A new (client, sender, recipient) triplet gets 451 4.7.1 at RCPT;
    the same triplet retried after the delay (1 s) is accepted and queued."""
    service = start_gateway(policy_config(tmp_path, {"greylist": {"delay": 1}}))
    port = service.port_of("mx")
    [(stage, code, text)] = await in_thread(attempt, port)
    assert (stage, code) == ("rcpt", 451)
    assert text == b"4.7.1 Greylisted, try again in 1 seconds"
    assert queued(tmp_path / "spool") == []
    await sleep(1.2)
    [(stage, code, _)] = await in_thread(attempt, port)
    assert (stage, code) == ("data", 250)
    [(envelope, _)] = queued(tmp_path / "spool")
    assert envelope.sender == "a@example.org"


# -- shared state: Redis ----------------------------------------------------------------------


def redis_store(server: Any, timeout: float = 2.0) -> dict[str, Any]:
    return {"backend": "redis", "redis_url": server.url, "timeout": timeout, "prefix": "e2e:"}


@pytest_twisted.ensureDeferred
async def test_two_gateways_share_one_rate_limit(start_gateway, tmp_path, redis_server):
    """Two gateway instances on different ports with the same Redis count
    one limit: messages_per_ip = 3 is reached across both."""
    plugins = {"ratelimit": {"messages_per_ip": 3, "window": "1h"}}
    one = start_gateway(policy_config(tmp_path, plugins, redis_store(redis_server), spool="spool1"))
    two = start_gateway(policy_config(tmp_path, plugins, redis_store(redis_server), spool="spool2"))
    assert one.port_of("mx") != two.port_of("mx")
    first = await in_thread(attempt, one.port_of("mx"), 2)
    second = await in_thread(attempt, two.port_of("mx"), 2)
    third = await in_thread(attempt, one.port_of("mx"))
    assert [code for _, code, _ in first + second + third] == [250, 250, 250, 451, 451]
    assert second[1][2].startswith(b"4.7.1 Rate limit exceeded")
    assert len(queued(tmp_path / "spool1")) == 2 and len(queued(tmp_path / "spool2")) == 1
    assert redis_server.command("GET", "e2e:ratelimit:msg:ip:127.0.0.1") == b"5"


@pytest_twisted.ensureDeferred
async def test_redis_down_fails_open_with_a_log_line(start_gateway, tmp_path, redis_server):
    """With on_store_error = "open" and Redis stopped, mail is accepted
    (no hung session: the store answers within [store] timeout = 0.5 s)
    and the gateway logs that it failed open."""
    plugins = {"ratelimit": {"messages_per_ip": 100, "on_store_error": "open"},
               "greylist": {"delay": 1, "on_store_error": "open"}}
    service = start_gateway(policy_config(tmp_path, plugins, redis_store(redis_server, timeout=0.5)))
    port = service.port_of("mx")
    [(stage, code, _)] = await in_thread(attempt, port)
    assert (stage, code) == ("rcpt", 451)  # Redis up: greylisted
    await in_thread(redis_server.stop)
    with capturedLogs() as events:
        results = await in_thread(attempt, port, 2, timeout=10)
    assert [(stage, code) for stage, code, _ in results] == [("data", 250), ("data", 250)]
    warnings = [e for e in events if e["log_level"] == LogLevel.warn and e.get("how") == "open"]
    assert {w["plugin"] for w in warnings} == {"ratelimit", "greylist"}
    assert len(queued(tmp_path / "spool")) == 2


@pytest_twisted.ensureDeferred
async def test_redis_down_fails_closed_then_recovers(start_gateway, tmp_path, redis_server):
    """With on_store_error = "closed" and Redis stopped, MAIL gets
    451 4.3.0 within the timeout; when Redis is back, the gateway
    reconnects by itself and accepts mail again."""
    plugins = {"ratelimit": {"messages_per_ip": 100, "on_store_error": "closed"}}
    service = start_gateway(policy_config(tmp_path, plugins, redis_store(redis_server, timeout=0.5)))
    port = service.port_of("mx")
    assert [code for _, code, _ in await in_thread(attempt, port)] == [250]
    await in_thread(redis_server.stop)
    [(stage, code, text)] = await in_thread(attempt, port, timeout=10)
    assert (stage, code) == ("mail", 451) and text.startswith(b"4.3.0 ")
    await in_thread(redis_server.start)
    for _ in range(100):  # bounded: at most ~20 s of reconnect back-off
        [(stage, code, _)] = await in_thread(attempt, port, timeout=10)
        if code == 250:
            break
        await sleep(0.2)
    assert (stage, code) == ("data", 250)


@pytest_twisted.ensureDeferred
async def test_redis_unreachable_from_the_start_does_not_hang(start_gateway, tmp_path):
    """A gateway whose Redis was never up answers every command within the
    store timeout: fail open lets the message through."""
    from tests.redisserver import free_port

    store = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{free_port()}/0", "timeout": 0.5}
    service = start_gateway(policy_config(tmp_path, {"ratelimit": {"messages_per_ip": 1}}, store))
    results = await in_thread(attempt, service.port_of("mx"), 2, timeout=10)
    assert [(stage, code) for stage, code, _ in results] == [("data", 250), ("data", 250)]


# -- shared state: file -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_file_store_state_survives_a_restart(start_gateway, tmp_path):
    """With [store] backend = "file", a rate-limit count made before a
    restart still counts after it (the store is closed, which writes its
    snapshot, and the next gateway loads it)."""
    plugins = {"ratelimit": {"messages_per_ip": 2, "window": "1h"}}
    doc = policy_config(tmp_path, plugins, {"backend": "file", "path": str(tmp_path / "state")})
    first = start_gateway(doc)
    assert [code for _, code, _ in await in_thread(attempt, first.port_of("mx"), 2)] == [250, 250]
    await first.stopService()
    await first.gateway.store.close().addTimeout(10, reactor)
    second = start_gateway(doc)
    try:
        [(stage, code, _)] = await in_thread(attempt, second.port_of("mx"))
        assert (stage, code) == ("mail", 451)
    finally:
        await second.gateway.store.close().addTimeout(10, reactor)


@pytest_twisted.ensureDeferred
async def test_stopping_the_gateway_closes_the_store(tmp_path):
    """Stopping the gateway service closes its state store: with the file
    back end the snapshot is on disk once stopService has fired."""
    from gateway.service import GatewayService, prepare

    plugins = {"ratelimit": {"messages_per_ip": 5, "window": "1h"}}
    doc = policy_config(tmp_path, plugins, {"backend": "file", "path": str(tmp_path / "state")})
    service = GatewayService(prepare(str(write_config(tmp_path, doc)), reactor), reactor)
    service.startService()
    try:
        await in_thread(attempt, service.port_of("mx"))
        await service.stopService().addTimeout(30, reactor)
        snapshot = tmp_path / "state" / "state.json"
        assert snapshot.exists()
        rows = json.loads(snapshot.read_bytes())["entries"]
        assert ["ratelimit:msg:ip:127.0.0.1", "i", 1] in [row[:3] for row in rows]
    finally:
        if service.running:
            await service.stopService().addTimeout(30, reactor)
        await service.gateway.store.close().addTimeout(10, reactor)


@pytest_twisted.ensureDeferred
async def test_reload_with_another_store_closes_the_old_one(start_gateway, tmp_path):
    """A reload that changes [store] closes the store it replaces, which
    for the file back end writes its last snapshot."""
    plugins = {"ratelimit": {"messages_per_ip": 5, "window": "1h"}}
    service = start_gateway(policy_config(tmp_path, plugins, {"backend": "file", "path": str(tmp_path / "a")}))
    old_store = service.gateway.store
    try:
        await in_thread(attempt, service.port_of("mx"))
        write_config(tmp_path, policy_config(tmp_path, plugins, {"backend": "file", "path": str(tmp_path / "b")}))
        assert service.reload() is None
        assert service.gateway.store is not old_store
        for _ in range(50):  # bounded: 5 s for the old store's closing snapshot
            if (tmp_path / "a" / "state.json").exists():
                break
            await sleep(0.1)
        assert (tmp_path / "a" / "state.json").exists()
    finally:
        await old_store.close().addTimeout(10, reactor)
