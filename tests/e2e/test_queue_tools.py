"""gatewayctl queue tools against a live gateway (in-process, real
sockets), run as the real command-line program in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest_twisted
from twisted.internet import reactor, task

from tests.sink import Sink, free_port
from tests.support import base_config, client, in_thread, queued, subprocess_env


def gatewayctl(config, *args):
    """Run gatewayctl; return (exit status, parsed JSON or text)."""
    result = subprocess.run([sys.executable, "-m", "gateway.ctl", *args, "-c", str(config), "--json"],
                            capture_output=True, text=True, timeout=30, env=subprocess_env())
    try:
        return result.returncode, json.loads(result.stdout)
    except json.JSONDecodeError:
        return result.returncode, result.stdout + result.stderr


async def until(predicate, timeout=15.0):
    """Poll (bounded) until predicate() is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await task.deferLater(reactor, 0.05, lambda: None)
    return predicate()


@pytest_twisted.ensureDeferred
async def test_queue_tools_on_live_gateway(start_gateway, tmp_path):
    """list shows a deferred message with its last error; hold and release
    move it; flush makes it go out once the next hop is back; delete
    removes a message; all while the gateway runs."""
    sink_port = free_port()
    doc = base_config(tmp_path, server={"trusted_networks": ["127.0.0.0/8"]})
    doc["relay"] = {"enabled": True, "tls": "none", "connect_timeout": 2, "connection_idle": 0.2}
    doc["routes"] = {"example.net": f"[127.0.0.1]:{sink_port}"}
    doc["queue"]["scan_interval"] = 0.2
    service = start_gateway(doc)
    config = tmp_path / "gateway.toml"
    spool = tmp_path / "spool"

    def send(n):
        with client(service.port_of("mx")) as smtp:
            for i in range(n):
                smtp.sendmail("a@example.org", [f"u{i}@example.net"], f"Subject: {i}\r\n\r\nbody\r\n")

    await in_thread(send, 2)
    assert await until(lambda: len(queued(spool, "deferred")) == 2)

    code, rows = await in_thread(gatewayctl, config, "queue", "list")
    assert code == 0
    assert {r["state"] for r in rows} == {"deferred"}
    assert set(rows[0]) >= {"id", "sender", "recipients", "size", "age", "next_attempt", "last_error", "state"}
    assert "connect to" in rows[0]["last_error"] and rows[0]["next_attempt"] > time.time()
    first, second = sorted(r["id"] for r in rows)

    code, result = await in_thread(gatewayctl, config, "queue", "hold", first)
    assert code == 0 and result["done"] == [first]
    code, result = await in_thread(gatewayctl, config, "queue", "delete", second)
    assert code == 0 and result["done"] == [second]
    code, rows = await in_thread(gatewayctl, config, "queue", "list")
    assert [(r["id"], r["state"]) for r in rows] == [(first, "hold")]

    sink = Sink()
    sink.port = sink_port
    from tests.sink import CountingController
    sink.controller = CountingController(sink.handler, hostname="127.0.0.1", port=sink_port, ready_timeout=10)
    sink.start()
    try:
        code, result = await in_thread(gatewayctl, config, "queue", "release", first)
        assert code == 0 and result["done"] == [first]
        got = await in_thread(sink.wait_for, 1)
        assert [m.recipients for m in got] == [["u0@example.net"]]
        assert await until(lambda: not any(queued(spool, s) for s in ("incoming", "active", "deferred", "hold")))
    finally:
        sink.stop()

    code, result = await in_thread(gatewayctl, config, "queue", "show", second)
    assert code == 1


@pytest_twisted.ensureDeferred
async def test_queue_flush_retries_now(start_gateway, tmp_path):
    """A deferred message waits for its next attempt; queue flush sends it
    at once when the next hop is back."""
    sink_port = free_port()
    doc = base_config(tmp_path, server={"trusted_networks": ["127.0.0.0/8"]})
    doc["relay"] = {"enabled": True, "tls": "none", "connect_timeout": 2, "connection_idle": 0.2}
    doc["routes"] = {"example.net": f"[127.0.0.1]:{sink_port}"}
    doc["queue"]["scan_interval"] = 0.2
    service = start_gateway(doc)
    config = tmp_path / "gateway.toml"

    def send():
        with client(service.port_of("mx")) as smtp:
            smtp.sendmail("a@example.org", ["u@example.net"], "Subject: x\r\n\r\nbody\r\n")

    await in_thread(send)
    assert await until(lambda: len(queued(tmp_path / "spool", "deferred")) == 1)
    from tests.sink import CountingController
    sink = Sink()
    sink.port = sink_port
    sink.controller = CountingController(sink.handler, hostname="127.0.0.1", port=sink_port, ready_timeout=10)
    sink.start()
    try:
        code, result = await in_thread(gatewayctl, config, "queue", "flush")
        assert code == 0 and len(result["done"]) == 1
        got = await in_thread(sink.wait_for, 1)
        assert len(got) == 1
    finally:
        sink.stop()
