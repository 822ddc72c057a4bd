"""Tests for the deployment files under etc/: the production config, the
systemd unit, the logrotate snippet and the Grafana dashboard.

The production config names paths that exist only on a real host
(certificates, the CA bundle under /etc, the spool and state under /var).
The tests copy it with every such path moved under a temporary folder,
make the /etc files there (a self-signed pair from
L{gateway.tls.ensure_certificate}), and validate the copy with
C{python -m gateway.ctl check-config}, as an admin would.

See also: docs/operators-guide.md.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest

from gateway.config import load_config
from gateway.tls import ensure_certificate

REPO = Path(__file__).resolve().parent.parent
ETC = REPO / "etc"
PRODUCTION = ETC / "production.toml"
UNIT = ETC / "systemd" / "mailgateway.service"
LOGROTATE = ETC / "logrotate.d" / "mailgateway"
DASHBOARD = ETC / "grafana" / "mailgateway-dashboard.json"

#: Every plugin the production config must name (issue: Operations, item 5).
PRODUCTION_PLUGINS = {"relay_guard", "spf", "dkim_sign", "dkim_verify", "dmarc",
                      "access", "helo", "dnsbl", "greylist", "ratelimit", "content"}

#: The metrics the gateway exports, as the dashboard may name them.
METRICS = {
    "mailgateway_connections_open",
    "mailgateway_connections_total",
    "mailgateway_transactions_total",
    "mailgateway_replies_total",
    "mailgateway_plugin_verdicts_total",
    "mailgateway_messages_accepted_total",
    "mailgateway_bytes_accepted_total",
    "mailgateway_queue_messages",
    "mailgateway_queue_oldest_age_seconds",
    "mailgateway_deliveries_total",
    "mailgateway_tls_sessions_total",
    "mailgateway_auth_total",
    "mailgateway_auth_results_total",
    "mailgateway_dkim_signatures_total",
    "mailgateway_mta_sts_decisions_total",
}
HISTOGRAMS = {"mailgateway_transaction_seconds", "mailgateway_commit_seconds", "mailgateway_delivery_seconds"}
SERIES = METRICS | {f"{name}_{suffix}" for name in HISTOGRAMS for suffix in ("bucket", "sum", "count")}

#: PromQL words that are not metric names.
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "rate", "irate", "increase", "delta", "idelta",
    "deriv", "histogram_quantile", "abs", "ceil", "floor", "round", "clamp_min", "clamp_max",
    "clamp", "label_replace", "label_join", "vector", "scalar", "time", "timestamp",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "count_over_time",
    "last_over_time", "absent", "absent_over_time", "changes", "resets", "sort", "sort_desc",
    "predict_linear", "label_values", "inf", "nan",
}

#: Where the unit lets the service write (ReadWritePaths= plus LogsDirectory=).
UNIT_WRITABLE = ("/var/spool/mailgateway", "/var/lib/mailgateway", "/var/log/mailgateway")

_HOST_PATH = re.compile(r'"(/(?:etc|var)/[^"]*)"')


# -- helpers -----------------------------------------------------------------


def _strings(value: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """Every (key, string) in a parsed TOML document, depth first."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, str(k))
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, key)
    elif isinstance(value, str):
        yield key, value


def _named_plugins() -> list[str]:
    """The plugin names of every listener in the production config, in order."""
    doc = tomllib.loads(PRODUCTION.read_text(encoding="utf-8"))
    names: list[str] = []
    for listener in doc["listener"]:
        for name in listener.get("plugins", []):
            if name not in names:
                names.append(name)
    return names


def _check_config(path: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run C{python -m gateway.ctl check-config PATH} from the repository root."""
    return subprocess.run([sys.executable, "-m", "gateway.ctl", "check-config", str(path), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def _unit() -> dict[str, dict[str, list[str]]]:
    """The unit file as section -> key -> values (systemd allows repeats)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{UNIT}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{UNIT}: not key=value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _metric_names(expr: str) -> set[str]:
    """The names in a PromQL expression that are not PromQL words, label
    names, label values, durations or numbers: the metric names."""
    text = re.sub(r"label_values\((.*),\s*[A-Za-z_]\w*\s*\)", r"\1", expr)  # Grafana: keep the series
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", text)              # label values, strings
    text = re.sub(r"\{[^}]*\}", " ", text)                       # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)                      # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)                     # Grafana variables
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {name for name in names if name.lower() not in PROMQL_WORDS}


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every query target of every panel."""
    out = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            out.append((panel.get("title", "?"), target.get("expr", "")))
    return out


# -- the production config ---------------------------------------------------


@pytest.fixture
def production_copy(tmp_path: Path) -> Path:
    """etc/production.toml with every /etc/... and /var/... path moved under
    C{tmp_path/host}, and the /etc files it names made there: certificates
    and keys from one self-signed pair, the CA bundles a copy of that
    certificate, plugin folders as folders, other files (rules) empty."""
    text = PRODUCTION.read_text(encoding="utf-8")
    root = tmp_path / "host"
    cert, key = tmp_path / "self-signed.pem", tmp_path / "self-signed.key"
    ensure_certificate(str(cert), str(key), "mx1.example.com")
    for name, value in _strings(tomllib.loads(text)):
        if not value.startswith("/etc/"):
            continue
        target = root / value.lstrip("/")
        if name == "plugin_dirs":
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if name == "key":
            shutil.copyfile(key, target)
        elif name in ("cert", "ca_file"):
            shutil.copyfile(cert, target)
        else:
            target.write_text("")
    moved = _HOST_PATH.sub(lambda m: json.dumps(str(root) + m.group(1)), text)
    path = tmp_path / "gateway.toml"
    path.write_text(moved, encoding="utf-8")
    return path


def test_production_names_every_plugin() -> None:
    """The production config puts every built-in and policy plugin on some
    listener, and relay_guard first on every listener."""
    named = set(_named_plugins())
    assert PRODUCTION_PLUGINS <= named, f"not named: {sorted(PRODUCTION_PLUGINS - named)}"
    doc = tomllib.loads(PRODUCTION.read_text(encoding="utf-8"))
    for listener in doc["listener"]:
        assert listener["plugins"][0] == "relay_guard", listener["name"]


def test_production_validates(production_copy: Path) -> None:
    """gatewayctl check-config accepts the production config once the files
    that exist only on a real host are there, and gatewayctl plugins order
    builds every listener's pipeline from it; a plugin it names that has no
    module yet fails with a message naming it."""
    missing = [name for name in _named_plugins() if not (REPO / "plugins" / f"{name}.py").is_file()]
    if missing:
        pytest.fail("etc/production.toml names plugins that have no module yet: "
                    + ", ".join(f"{name} (plugins/{name}.py)" for name in missing))
    result = _check_config(production_copy, "--json")
    assert result.returncode == 0, f"check-config failed:\n{result.stderr}{result.stdout}"
    effective = json.loads(result.stdout)
    assert {listener["port"] for listener in effective["listeners"]} == {25, 465, 587}
    assert effective["metrics"]["listen"] == "127.0.0.1:9464"
    # Building every listener's pipeline runs each plugin's build() too.
    order = subprocess.run([sys.executable, "-m", "gateway.ctl", "plugins", "order", "--json",
                            "-c", str(production_copy)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert order.returncode == 0, f"plugins order failed:\n{order.stderr}{order.stdout}"
    stages = json.loads(order.stdout)
    assert set(stages) == {listener["name"] for listener in effective["listeners"]}
    for listener in effective["listeners"]:
        if listener["auth"]:
            assert stages[listener["name"]]["message"][-1] == "dkim_sign", listener["name"]


def test_production_fails_only_on_host_files() -> None:
    """Unchanged, etc/production.toml either validates (on a host that has
    the files) or fails only because a file under /etc does not exist here:
    never on a key, a type or a value."""
    result = _check_config(PRODUCTION)
    if result.returncode != 0:
        assert "no such file: /etc/" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_production_edge_layout(production_copy: Path) -> None:
    """The production config is the edge the guide describes: MX on 25
    without AUTH, submission on 587 (STARTTLS required) and 465 (implicit)
    with AUTH and signing, a verified route for the internal domain,
    MTA-STS, JSON logs to a file, and metrics on loopback."""
    config = load_config(str(production_copy))
    by_port: dict[int, list[Any]] = {}
    for listener in config.listeners:
        by_port.setdefault(listener.port, []).append(listener)
    mx = [l for l in by_port[25] if not l.auth and "spf" in l.plugins]
    assert mx and all(l.tls == "starttls" for l in mx)
    for listener in mx:
        assert {"dkim_verify", "dmarc"} <= set(listener.plugins)
        assert listener.plugins.index("dmarc") > listener.plugins.index("dkim_verify")
        assert listener.plugins.index("dmarc") > listener.plugins.index("spf")
    (submission,) = by_port[587]
    (submissions,) = by_port[465]
    assert (submission.tls, submission.auth) == ("starttls-required", True)
    assert (submissions.tls, submissions.auth) == ("implicit", True)
    for listener in (submission, submissions):
        assert listener.submission and listener.plugins[-1] == "dkim_sign"
    assert config.server.local_domains and all(d in config.routes for d in config.server.local_domains)
    assert all(config.route_tls.get(d) == "verify" for d in config.server.local_domains)
    assert config.relay.ca_file and config.mta_sts.enabled
    assert config.log.format == "json" and config.log.file
    assert config.metrics.listen == "127.0.0.1:9464" and config.metrics.path == "/metrics"


def test_production_writes_only_where_the_unit_allows() -> None:
    """Every path the gateway or gatewayctl writes (spool, state, users,
    DKIM keys, MTA-STS cache, log) lies in a folder the systemd unit makes
    writable; everything under /etc is read-only to the service."""
    doc = tomllib.loads(PRODUCTION.read_text(encoding="utf-8"))
    written = {
        "[queue] path": doc["queue"]["path"],
        "[store] path": doc["store"]["path"],
        "[auth] users_file": doc["auth"]["users_file"],
        "[mta_sts] cache": doc["mta_sts"]["cache"],
        "[log] file": doc["log"]["file"],
        "[plugins.dkim_sign] keys_dir": doc["plugins"]["dkim_sign"]["keys_dir"],
    }
    for key, path in written.items():
        assert any(path == d or path.startswith(d + "/") for d in UNIT_WRITABLE), f"{key} = {path}"
    service = _unit()["Service"]
    writable = " ".join(service["ReadWritePaths"]).split()
    assert set(UNIT_WRITABLE[:2]) <= set(writable)
    assert service["LogsDirectory"] == ["mailgateway"]


# -- the systemd unit ----------------------------------------------------------


def test_unit_runs_twistd_unprivileged_and_reloads_on_hup() -> None:
    """The unit runs twistd in the foreground as the mailgateway user, with
    the production config path, and reloads with SIGHUP."""
    service = _unit()["Service"]
    (exec_start,) = service["ExecStart"]
    assert exec_start.endswith("/twistd --nodaemon --pidfile= mailgateway -c /etc/mailgateway/gateway.toml")
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["User"] == ["mailgateway"]
    assert service["Restart"] == ["on-failure"]


def test_unit_hardening() -> None:
    """The unit binds privileged ports through an ambient capability only,
    and sets the hardening options; MemoryDenyWriteExecute is left out, with
    the reason in a comment."""
    service = _unit()["Service"]
    expected = {
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "LockPersonality": "yes",
        "SystemCallFilter": "@system-service",
    }
    for key, value in expected.items():
        assert service.get(key) == [value], f"{key}: {service.get(key)}"
    assert "MemoryDenyWriteExecute" not in service
    assert "MemoryDenyWriteExecute= is deliberately NOT set" in UNIT.read_text(encoding="utf-8")


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify finds nothing to report in the unit (the
    twistd path is pointed at this environment's, which must exist)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (usual in containers)")
    twistd = Path(sys.executable).with_name("twistd")
    executable = str(twistd) if twistd.is_file() else sys.executable
    unit = tmp_path / "mailgateway.service"
    unit.write_text(UNIT.read_text(encoding="utf-8").replace("/opt/mailgateway/bin/twistd", executable),
                    encoding="utf-8")
    result = subprocess.run([tool, "verify", str(unit)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    output = result.stdout + result.stderr
    about_unit = [line for line in output.splitlines() if "mailgateway.service" in line]
    assert not about_unit, output
    if result.returncode != 0:
        pytest.skip(f"systemd-analyze cannot run here: {output.strip()[:300]}")


# -- logrotate -----------------------------------------------------------------


def test_logrotate_rotates_the_production_log_file() -> None:
    """The logrotate snippet covers the production [log] file and rotates it
    without a signal (copytruncate) as the mailgateway user."""
    text = LOGROTATE.read_text(encoding="utf-8")
    doc = tomllib.loads(PRODUCTION.read_text(encoding="utf-8"))
    log_dir = os.path.dirname(doc["log"]["file"])
    assert re.search(rf"^{re.escape(log_dir)}/\*\.log\s*\{{", text, re.MULTILINE)
    active = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "copytruncate" in active
    assert "su mailgateway mailgateway" in active


def test_logrotate_snippet_parses(tmp_path: Path) -> None:
    """logrotate -d accepts the snippet (pointed at a temporary folder)."""
    tool = shutil.which("logrotate")
    if tool is None:
        pytest.skip("logrotate is not installed")
    logs = tmp_path / "log"
    logs.mkdir()
    (logs / "gateway.log").write_text("line\n")
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    conf = tmp_path / "mailgateway"
    conf.write_text(LOGROTATE.read_text(encoding="utf-8")
                    .replace("/var/log/mailgateway", str(logs))
                    .replace("su mailgateway mailgateway", f"su {user} {group}"), encoding="utf-8")
    result = subprocess.run([tool, "-d", "-s", str(tmp_path / "state"), str(conf)],
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "error:" not in output, output


# -- the Grafana dashboard -----------------------------------------------------


def test_dashboard_is_json_with_a_prometheus_datasource_variable() -> None:
    """The dashboard loads as JSON, has a Prometheus data source variable,
    and every panel with queries uses it."""
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource = [v for v in variables.values() if v["type"] == "datasource"]
    assert len(datasource) == 1 and datasource[0]["query"] == "prometheus"
    reference = "${%s}" % datasource[0]["name"]
    ids = [panel["id"] for panel in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels(dashboard["panels"]):
        if panel.get("targets"):
            assert panel["datasource"]["uid"] == reference, panel["title"]
            assert all(t["datasource"]["uid"] == reference for t in panel["targets"]), panel["title"]


def test_dashboard_queries_name_only_exported_metrics() -> None:
    """Every panel query (and every variable query) names at least one
    metric, and only metrics the gateway exports; histograms are read
    through their _bucket series with histogram_quantile."""
    dashboard = _dashboard()
    queries = _exprs(dashboard)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append((f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query))
    assert queries
    for title, expr in queries:
        names = _metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert names <= SERIES, f"{title}: unknown metric(s) {sorted(names - SERIES)} in {expr!r}"
        for name in names:
            if name.endswith("_bucket"):
                assert "histogram_quantile(" in expr, f"{title}: {name} outside histogram_quantile"


def test_dashboard_shows_every_metric() -> None:
    """Each exported metric appears in at least one panel; each histogram
    as a quantile over its buckets."""
    used: set[str] = set()
    for _, expr in _exprs(_dashboard()):
        used |= _metric_names(expr)
    wanted = METRICS | {f"{name}_bucket" for name in HISTOGRAMS}
    assert wanted <= used, f"no panel for {sorted(wanted - used)}"


def test_metric_name_extraction() -> None:
    """The PromQL scan used above finds metric names and ignores functions,
    label names, label values, ranges and Grafana variables."""
    expr = ('histogram_quantile(0.99, sum by (le) (rate(mailgateway_commit_seconds_bucket'
            '{instance=~"$instance", state="x_total"}[$__rate_interval]))) / on (instance) other_metric')
    assert _metric_names(expr) == {"mailgateway_commit_seconds_bucket", "other_metric"}
    variable = 'label_values(mailgateway_connections_total{instance=~"$instance"}, listener)'
    assert _metric_names(variable) == {"mailgateway_connections_total"}
