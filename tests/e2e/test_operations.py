"""Operations on a running gateway: Prometheus metrics, live reload, JSON
logs, and gatewayctl status/reload/log through the control socket."""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
import sys
import urllib.request
import uuid

import pytest_twisted

from tests.e2e.test_plugins import PLUGIN
from tests.sink import Sink
from tests.support import base_config, client, in_thread, queued, subprocess_env, write_config


def scrape(service) -> dict[str, float]:
    """Read the metrics endpoint over HTTP (blocking): name{labels} -> value."""
    port = service.metrics_port.getHost().port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def gatewayctl(config, *args):
    result = subprocess.run([sys.executable, "-m", "gateway.ctl", *args, "-c", str(config)],
                            capture_output=True, text=True, timeout=30, env=subprocess_env())
    return result.returncode, result.stdout, result.stderr


@pytest_twisted.ensureDeferred
async def test_metrics_count_transactions_and_deliveries(start_gateway, tmp_path):
    """After two accepted messages, one relay denial and one delivery, the
    scraped counters moved by exactly those amounts, with bounded labels."""
    sink = Sink().start()
    try:
        doc = base_config(tmp_path, metrics={"listen": "127.0.0.1:0"})
        doc["relay"] = {"enabled": True, "tls": "none", "connection_idle": 0.2}
        doc["routes"] = {"example.test": f"[127.0.0.1]:{sink.port}"}
        doc["queue"]["scan_interval"] = 0.2
        service = start_gateway(doc)
        port = service.port_of("mx")
        before = await in_thread(scrape, service)

        def talk():
            with client(port) as smtp:
                smtp.sendmail("a@example.org", ["b@example.test"], b"Subject: 1\r\n\r\nbody\r\n")
                smtp.sendmail("a@example.org", ["c@example.test"], b"Subject: 2\r\n\r\nbody!\r\n")
                smtp.mail("a@example.org")
                return smtp.rcpt("x@elsewhere.example")

        assert (await in_thread(talk))[0] == 554
        await in_thread(sink.wait_for, 2)
        after = before
        for _ in range(100):
            after = await in_thread(scrape, service)
            if after.get('mailgateway_deliveries_total{result="sent",tls="none"}', 0) >= 2:
                break
    finally:
        sink.stop()

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    assert delta('mailgateway_messages_accepted_total{listener="mx"}') == 2
    assert delta('mailgateway_bytes_accepted_total{listener="mx"}') == 20 + 21
    assert delta('mailgateway_transactions_total{listener="mx",outcome="accepted"}') == 2
    assert delta('mailgateway_connections_total{listener="mx"}') == 1
    assert delta('mailgateway_replies_total{class="5xx",listener="mx"}') == 1
    assert delta('mailgateway_plugin_verdicts_total{action="accept",plugin="relay_guard"}') == 2
    assert delta('mailgateway_plugin_verdicts_total{action="continue",plugin="relay_guard"}') == 1
    assert delta('mailgateway_deliveries_total{result="sent",tls="none"}') == 2
    assert delta("mailgateway_commit_seconds_count") == 2
    assert after["mailgateway_connections_open{listener=\"mx\"}"] == 0
    assert 'mailgateway_queue_messages{state="incoming"}' in after
    assert not any("example.org" in name or "127.0.0.1" in name for name in after)


@pytest_twisted.ensureDeferred
async def test_reload_changes_plugins_for_new_sessions_only(start_gateway, tmp_path):
    """A reload that adds a plugin applies to the next session; a session
    open during the reload keeps the old plugin list."""
    name = "reload_" + uuid.uuid4().hex[:8]
    folder = tmp_path / "myplugins"
    folder.mkdir()
    (folder / f"{name}.py").write_text(PLUGIN.format(name=name))
    doc = base_config(tmp_path, server={"plugin_dirs": [str(folder)]})
    service = start_gateway(doc)
    port = service.port_of("mx")
    old = await in_thread(lambda: client(port))
    await in_thread(old.ehlo, "old.example.org")

    doc["listener"][0]["plugins"] = ["relay_guard", name]
    doc["plugins"] = {name: {"blocked_sender": "spammer@example.org"}}
    write_config(tmp_path, doc)
    assert service.reload() is None

    def new_session():
        with client(port) as smtp:
            smtp.ehlo("new.example.org")
            return smtp.mail("spammer@example.org")

    assert (await in_thread(new_session))[0] == 550
    assert (await in_thread(old.mail, "spammer@example.org"))[0] == 250
    await in_thread(old.quit)


@pytest_twisted.ensureDeferred
async def test_reload_adds_and_removes_listeners(start_gateway, tmp_path):
    """A listener added by a reload accepts mail; one removed stops
    listening while its session in flight finishes."""
    doc = base_config(tmp_path)
    service = start_gateway(doc)
    first = service.port_of("mx")
    session = await in_thread(lambda: client(first))
    doc["listener"] = [{"name": "second", "address": "127.0.0.1", "port": 0, "tls": "none",
                        "plugins": ["relay_guard"]}]
    write_config(tmp_path, doc)
    assert service.reload() is None
    second = service.port_of("second")
    assert "mx" not in service.ports

    def use_second():
        with client(second) as smtp:
            smtp.sendmail("a@example.org", ["b@example.test"], b"Subject: new\r\n\r\nx\r\n")

    await in_thread(use_second)
    # The session opened on the removed listener still works.
    assert (await in_thread(session.sendmail, "a@example.org", ["b@example.test"], b"Subject: old\r\n\r\nx\r\n")) == {}
    await in_thread(session.quit)

    def refused():
        try:
            smtplib.SMTP("127.0.0.1", first, timeout=5)
        except OSError:
            return True
        return False

    assert await in_thread(refused)
    assert sorted(e.listener for e, _ in queued(tmp_path / "spool")) == ["mx", "second"]


@pytest_twisted.ensureDeferred
async def test_broken_config_on_reload_is_refused(start_gateway, tmp_path):
    """A config that does not validate is refused with one line naming the
    file and key (from reload() and from gatewayctl reload, exit 1); the
    gateway keeps serving with the old one."""
    doc = base_config(tmp_path)
    service = start_gateway(doc)
    path = write_config(tmp_path, doc)
    doc["server"]["max_recipients"] = "many"
    write_config(tmp_path, doc)
    error = service.reload()
    assert error is not None and str(path) in error and "[server] max_recipients" in error
    code, out, err = await in_thread(gatewayctl, path, "reload")
    assert code == 1 and "[server] max_recipients" in err and "Traceback" not in err

    def still_serving():
        with client(service.port_of("mx")) as smtp:
            return smtp.sendmail("a@example.org", ["b@example.test"], b"Subject: x\r\n\r\ny\r\n")

    assert await in_thread(still_serving) == {}


@pytest_twisted.ensureDeferred
async def test_json_log_lines_carry_the_queue_id(start_gateway, tmp_path):
    """With [log] format = "json", every line of the log file is a JSON
    object, and the transaction's line carries its queue ID and fields;
    gatewayctl log ID prints that message's story."""
    log_file = tmp_path / "gateway.log"
    doc = base_config(tmp_path, log={"format": "json", "file": str(log_file)})
    service = start_gateway(doc)
    path = tmp_path / "gateway.toml"

    def talk():
        with client(service.port_of("mx")) as smtp:
            smtp.ehlo("c.example.org")
            smtp.mail("a@example.org")
            smtp.rcpt("b@example.test")
            return smtp.data(b"Subject: x\r\n\r\ny\r\n")

    code, text = await in_thread(talk)
    queue_id = re.search(rb"queued as (\S+)", text).group(1).decode()
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    mine = [r for r in records if r.get("queue_id") == queue_id]
    assert mine and mine[0]["sender"] == "a@example.org" and mine[0]["client"] == "127.0.0.1"
    assert mine[0]["reply"].startswith("250 2.0.0")
    code, out, _ = await in_thread(gatewayctl, path, "log", queue_id)
    assert code == 0 and queue_id in out


@pytest_twisted.ensureDeferred
async def test_gatewayctl_status_json(start_gateway, tmp_path):
    """gatewayctl status --json reaches the running gateway through its
    0600 control socket: version, uptime, listeners with their bound
    ports, queue counts."""
    import os
    import stat

    service = start_gateway()
    path = tmp_path / "gateway.toml"
    code, out, _ = await in_thread(gatewayctl, path, "status", "--json")
    assert code == 0
    status = json.loads(out)
    assert status["running"] and status["version"]
    assert status["listeners"][0]["name"] == "mx" and status["listeners"][0]["port"] == service.port_of("mx")
    assert set(status["queue"]) >= {"incoming", "deferred", "hold"}
    mode = os.stat(tmp_path / "spool" / "control.sock").st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_gatewayctl_status_when_stopped(tmp_path):
    """gatewayctl status says the gateway is not running, with exit 3."""
    path = write_config(tmp_path, base_config(tmp_path))
    code, out, err = gatewayctl(path, "status")
    assert code == 3 and "no gateway is running" in err


def test_sighup_reloads_a_twistd_gateway(tmp_path):
    """SIGHUP makes a gateway run by twistd reread its config: a listener
    added to the file starts listening, and the process keeps running."""
    import signal
    import time

    from tests.support import twistd_command

    doc = base_config(tmp_path)
    path = write_config(tmp_path, doc)
    out = open(tmp_path / "twistd.out", "wb")
    process = subprocess.Popen(twistd_command(path), stdout=out, stderr=subprocess.STDOUT,
                               env=subprocess_env(), cwd=tmp_path)

    def wait_for(pattern, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = (tmp_path / "twistd.out").read_text(errors="replace")
            match = re.search(pattern, text)
            if match:
                return match
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in:\n{text}")

    try:
        wait_for(r"mailgateway started")
        doc["listener"].append({"name": "extra", "address": "127.0.0.1", "port": 0, "tls": "none",
                                "plugins": ["relay_guard"]})
        write_config(tmp_path, doc)
        process.send_signal(signal.SIGHUP)
        port = int(wait_for(r"listener extra on 127\.0\.0\.1:(\d+)").group(1))
        wait_for(r"reloaded ")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            assert smtp.noop()[0] == 250
        assert process.poll() is None
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        out.close()
