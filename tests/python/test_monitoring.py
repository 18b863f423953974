"""The monitoring files work against the real thing.

- deploy/prometheus/alerts.yml passes `promtool check rules` and its unit tests
  (alerts_test.yml); every alert has a summary, a description and a runbook in README.md; the
  PrometheusRule is alerts.yml, generated; the memory rule's limit is the container's.
- A live embedcar's /metrics, after traffic, passes `promtool check metrics` with no finding.
- A real Prometheus (Debian's `prometheus`, on a free port, its own temp dir, scraping embedcar's
  admin port every second and loading alerts.yml) scrapes an embedcar in front of the fake
  upstream; after traffic (distinct inputs, repeats, concurrent duplicates, upstream 500s, 429s,
  spent rate-limit budgets, refused inputs) every query of deploy/grafana/embedcar.json evaluates
  without error through /api/v1/query, most return data, and every alert rule evaluates.
- Every Kubernetes manifest passes `kubernetes-validate --strict`; the PodMonitor and the
  PrometheusRule, which it does not know, pass the strict schemas in deploy/kubernetes/schemas.
"""

import copy
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate.utils
import pytest
import referencing
import yaml

from conftest import ROOT

DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "embedcar.json"
K8S = DEPLOY / "kubernetes"
VENV_BIN = Path(sys.executable).parent

sys.path.insert(0, str(DEPLOY / "grafana"))
sys.path.insert(0, str(K8S))
import dashboard  # noqa: E402  deploy/grafana/dashboard.py
import make_prometheusrule  # noqa: E402  deploy/kubernetes/make_prometheusrule.py


def tool(name):
    path = shutil.which(name)
    assert path, f"{name} not found: scripts/test installs Debian's prometheus package"
    return path


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kw)


# ------------------------------------------------------------------------------------------
# Static checks
# ------------------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    out = run([tool("promtool"), "check", "rules", str(ALERTS)])
    assert out.returncode == 0, out.stdout + out.stderr
    out = run([tool("promtool"), "test", "rules", "alerts_test.yml"], cwd=ALERTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    out = run([tool("promtool"), "check", "config", "prometheus.yml"], cwd=ALERTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def github_anchor(heading):
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_a_summary_description_and_runbook_in_the_readme():
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    readme = (ROOT / "README.md").read_text()
    runbook = readme.split("\n## Runbook\n", 1)[1].split("\n## ", 1)[0]
    anchors = {github_anchor(h) for h in re.findall(r"^### (.+)$", runbook, re.M)}
    tested = (ALERTS.parent / "alerts_test.yml").read_text()
    for r in rules:
        a = r["annotations"]
        assert a.get("summary") and a.get("description"), r["alert"]
        assert a["runbook_url"] == f"README.md#{r['alert'].lower()}", r["alert"]
        assert r["alert"].lower() in anchors, f"no Runbook subsection for {r['alert']}"
        assert f"alertname: {r['alert']}\n" in tested, f"{r['alert']} has no unit test"
        assert r["labels"]["severity"] in ("critical", "warning")


def test_the_prometheusrule_is_alerts_yml_generated():
    assert (K8S / "prometheusrule.yaml").read_text() == make_prometheusrule.render(), (
        "deploy/kubernetes/prometheusrule.yaml is out of date: "
        "run python3 deploy/kubernetes/make_prometheusrule.py")
    wrapped = yaml.safe_load((K8S / "prometheusrule.yaml").read_text())
    assert wrapped["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


# The standard process metrics of the prometheus crate's ProcessCollector (Linux), registered
# beside embedcar's own in src/metrics.rs.
PROCESS_METRICS = {
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_virtual_memory_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_threads",
}


def test_the_dashboard_json_is_generated_and_names_only_exported_metrics():
    assert DASHBOARD.read_text() == dashboard.render(), (
        "deploy/grafana/embedcar.json is out of date: run python3 deploy/grafana/dashboard.py")
    exported = set(re.findall(r'"(embedcar_[a-z_]+)"', (ROOT / "src/metrics.rs").read_text()))
    histograms = {n for n in exported if n.endswith(("_seconds", "_inputs"))}
    names = (exported | {h + s for h in histograms for s in ("_bucket", "_sum", "_count")}
             | {"up"} | PROCESS_METRICS)
    for expr in dashboard_queries():
        for name in re.findall(r"\b((?:embedcar_|process_|up\b)[a-z_]*)", expr):
            assert name in names, f"{name} is not a metric embedcar exports: {expr}"


def test_the_dashboard_layout_is_well_formed():
    d = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p.get("targets", []):
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert 'job=~"$job"' in t["expr"] and 'instance=~"$instance"' in t["expr"], t["expr"]
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "job", "instance"]


def test_the_memory_rule_uses_the_container_memory_limit():
    pod = next(yaml.safe_load_all((K8S / "deployment.yaml").read_text()))["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "embedcar")
    limit = sidecar["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    rule = next(r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]
                if r["alert"] == "EmbedcarMemoryNearLimit")
    assert str(int(limit[:-2]) * 1024 * 1024) in rule["expr"]


def test_compose_provisions_grafana_and_mounts_the_rules():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    mounts = {}
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            src, dst = v.split(":")[:2]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), f"{name} mounts missing {src}"
                mounts[dst] = DEPLOY / src
    # Prometheus finds its rule files beside its config.
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    for rule_file in prom["rule_files"]:
        assert mounts[f"/etc/prometheus/{rule_file}"] == DEPLOY / "prometheus" / rule_file
    # Grafana: the data source is the compose Prometheus, the provider reads where the
    # dashboard is mounted, and the dashboard's uid is stable.
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    url = urllib.parse.urlsplit(ds["datasources"][0]["url"])
    assert url.hostname in services and url.port == 9090
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/embedcar.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert mounts[f"{path}/embedcar.json"] == DASHBOARD
    assert json.loads(DASHBOARD.read_text())["uid"] == "embedcar"


# ------------------------------------------------------------------------------------------
# Kubernetes manifests
# ------------------------------------------------------------------------------------------

CUSTOM_KINDS = {"PodMonitor", "PrometheusRule"}
OLDEST_KUBERNETES = "1.29.0"


def crd_validator(kind):
    """A validator for a prometheus-operator kind, from deploy/kubernetes/schemas, with
    Kubernetes' own definitions (ObjectMeta, LabelSelector) from kubernetes-validate."""
    kv = kubernetes_validate.utils
    version = kv.latest_version()
    defs = kv.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json",
                              version)
    schema = json.loads((K8S / "schemas" / f"{kind.lower()}-monitoring-v1.json").read_text())
    registry = referencing.Registry().with_resource(
        "https://kubernetes.io/api/_definitions.json", referencing.Resource.from_contents(defs))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def test_every_manifest_passes_kubernetes_validate_strict():
    manifests = sorted(K8S.glob("*.yaml"))
    assert {m.name for m in manifests} >= {"deployment.yaml", "podmonitor.yaml",
                                           "prometheusrule.yaml"}
    # Against the oldest Kubernetes with native sidecars (deployment.yaml needs 1.29) and the
    # newest kubernetes-validate knows.
    out = run([str(VENV_BIN / "kubernetes-validate"), "--strict", "-k", OLDEST_KUBERNETES,
               "-k", kubernetes_validate.utils.latest_version(), *map(str, manifests)])
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ERROR" not in out.stdout
    # It has no schema for the operator's kinds and passes them with a warning: those (and only
    # those) are validated here against deploy/kubernetes/schemas instead.
    warned = set(re.findall(r"Couldn't find schema for kind (\w+)", out.stdout))
    assert warned == CUSTOM_KINDS
    for m in manifests:
        for doc in yaml.safe_load_all(m.read_text()):
            if doc and doc["kind"] in CUSTOM_KINDS:
                crd_validator(doc["kind"]).validate(doc)


def test_the_custom_resource_schemas_are_strict():
    doc = yaml.safe_load((K8S / "podmonitor.yaml").read_text())
    v = crd_validator("PodMonitor")
    for path in (["spec"], ["spec", "podMetricsEndpoints", 0], ["metadata"]):
        bad = copy.deepcopy(doc)
        node = bad
        for p in path:
            node = node[p]
        node["unknownField"] = 1
        assert not v.is_valid(bad), f"an unknown field under {path} was accepted"
    rule = yaml.safe_load((K8S / "prometheusrule.yaml").read_text())
    bad = copy.deepcopy(rule)
    bad["spec"]["groups"][0]["rules"][0]["for"] = "two minutes"
    assert not crd_validator("PrometheusRule").is_valid(bad)


# ------------------------------------------------------------------------------------------
# Live: embedcar in front of the fake, Prometheus scraping it
# ------------------------------------------------------------------------------------------

RATE_INTERVAL = "1m"  # what $__rate_interval becomes: longer than the whole test's traffic


def dashboard_queries():
    d = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in d["panels"] for t in p.get("targets", [])]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post(url, body, headers=None, timeout=15):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json",
                                          "authorization": "Bearer sk-test", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def get(url, headers=None):
    req = urllib.request.Request(url, headers={"authorization": "Bearer sk-test", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def traffic(url, round_):
    """One round of varied traffic; round_ keeps inputs distinct between rounds."""
    emb = f"{url}/v1/embeddings"
    model = "text-embedding-3-small"
    statuses = []
    # Distinct inputs, then the same again (cache hits), and a request with duplicates.
    for i in range(10):
        statuses.append(post(emb, {"model": model, "input": [f"r{round_} input {i}", f"r{round_} extra {i}"]}))
    for i in range(5):
        statuses.append(post(emb, {"model": model, "input": f"r{round_} input {i}"}))
    statuses.append(post(emb, {"model": model, "input": ["dup", "dup", f"r{round_} dup"]}))
    # Concurrent identical inputs while the upstream is slow: coalesced into one call.
    slow = {"x-fake-delay-ms": "300"}
    threads = [threading.Thread(target=lambda: statuses.append(
        post(emb, {"model": model, "input": [f"r{round_} together", f"r{round_} t{k}"]}, slow)))
        for k in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    # Errors: a refused input (400, isolated), a bad request, upstream 500s (retried, then 500),
    # a 429 once (retried after the gate reopens), a spent rate-limit budget, a 404 elsewhere.
    statuses.append(post(emb, {"model": model, "input": "refused"}, {"x-fake-status": "400"}))
    statuses.append(post(emb, {"model": model}))
    statuses.append(post(f"{url}/v1/chat/completions",
                         {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                         {"x-fake-status": "500"}))
    statuses.append(post(emb, {"model": model, "input": f"r{round_} limited"},
                         {"authorization": f"Bearer sk-429-{round_}", "x-fake-status": "429",
                          "x-fake-retry-after": "0", "x-fake-times": "1",
                          "x-fake-key": f"429-{round_}"}))
    statuses.append(post(emb, {"model": model, "input": f"r{round_} budget"},
                         {"authorization": f"Bearer sk-budget-{round_}",
                          "x-fake-header": "x-ratelimit-remaining-requests: 0"}))
    statuses.append(get(f"{url}/v1/models"))
    statuses.append(get(f"{url}/v1/nowhere", {"x-fake-status": "404"}))
    return statuses


class Prometheus:
    """A Prometheus server in its own temp dir, scraping `target` every second."""

    def __init__(self, target):
        self.dir = tempfile.TemporaryDirectory(prefix="embedcar-prom-")
        d = Path(self.dir.name)
        (d / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "embedcar", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [target]}]}],
        }))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(d / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={d / 'prometheus.yml'}",
             f"--storage.tsdb.path={d / 'data'}", f"--web.listen-address={self.url[7:]}",
             "--web.enable-lifecycle"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (d / "prometheus.log").read_text()
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("prometheus did not become ready")

    def query(self, expr):
        q = urllib.parse.urlencode({"query": expr})
        try:
            return get_json(f"{self.url}/api/v1/query?{q}")
        except urllib.error.HTTPError as e:
            return json.loads(e.read())

    def wait_for(self, expr, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.query(expr)["data"]["result"]:
                return
            time.sleep(0.25)
        raise AssertionError(f"no data for {expr} after {timeout} s")

    def stop(self):
        """Stops the server by its own PID (never by name)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.dir.cleanup()


@pytest.fixture(scope="module")
def live(spawn_module):
    """(embedcar, prometheus, instance) after two rounds of traffic, scraped."""
    fake = spawn_module.fake()
    car = spawn_module.embedcar(fake)
    instance = car.admin.removeprefix("http://")
    prom = Prometheus(instance)
    try:
        prom.wait_for('up{job="embedcar"} == 1')
        statuses = traffic(car.url, 1)
        time.sleep(2.5)  # a few scrapes between the rounds, so counters rise within the window
        statuses += traffic(car.url, 2)
        time.sleep(2.5)  # and the last round scraped
        prom.wait_for('embedcar_requests_total{route="models"}')
        print("traffic statuses:", sorted(set(statuses)))
        yield car, prom, instance
    finally:
        prom.stop()


def test_the_traffic_reached_the_engine_and_the_upstream_paths(live):
    car, _, _ = live
    for name, labels in [
        ("embedcar_embeddings_cache_hits_total", {}),
        ("embedcar_embeddings_coalesced_total", {}),
        ("embedcar_retries_total", {"reason": "500"}),
        ("embedcar_upstream_requests_total", {"status": "429"}),
        ("embedcar_rate_gate_closures_total", {}),
        ("embedcar_upstream_ratelimit_exhausted_total", {"kind": "requests"}),
        ("embedcar_requests_total", {"status": "500"}),
        ("embedcar_errors_total", {"reason": "invalid_request"}),
    ]:
        assert car.metric(name, **labels) > 0, (name, labels)


def test_live_metrics_pass_promtool_check_metrics(live):
    car, _, _ = live
    text = car.metrics_text()
    assert "embedcar_embeddings_cache_hits_total" in text
    for name in PROCESS_METRICS:
        assert f"\n{name} " in text, f"{name} is missing from /metrics"
    out = subprocess.run([tool("promtool"), "check", "metrics"], input=text,
                         capture_output=True, text=True, timeout=30)
    findings = (out.stdout + out.stderr).strip()
    assert out.returncode == 0 and not findings, f"promtool check metrics:\n{findings}"


def test_every_dashboard_query_evaluates_and_most_return_data(live):
    _, prom, instance = live
    d = json.loads(DASHBOARD.read_text())
    # The template variables resolve to this embedcar.
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"].replace("$job", "embedcar")
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", q)
            params = urllib.parse.urlencode({"match[]": m.group(1)})
            values = get_json(f"{prom.url}/api/v1/label/{m.group(2)}/values?{params}")["data"]
            assert values == [{"job": "embedcar", "instance": instance}[var["name"]]], var["name"]
    empty, errors, with_data = [], [], 0
    for expr in dashboard_queries():
        q = (expr.replace("$job", "embedcar").replace("$instance", instance)
             .replace("$__rate_interval", RATE_INTERVAL))
        assert "$" not in q, q
        answer = prom.query(q)
        if answer.get("status") != "success":
            errors.append(f"{q}: {answer.get('error')}")
        elif answer["data"]["result"]:
            with_data += 1
        else:
            empty.append(q)
    total = len(dashboard_queries())
    print(f"\n{with_data} of {total} dashboard queries returned data; empty:")
    for q in empty:
        print("  ", q)
    assert not errors, "\n".join(errors)
    # The Process row's resident memory, CPU and fds are always there.
    assert not [q for q in empty if "process_" in q], "a process_* query returned no data"
    assert with_data > total / 2, f"only {with_data} of {total} queries returned data"


def test_every_alert_rule_evaluates_against_live_data(live):
    _, prom, _ = live
    time.sleep(1.5)  # one evaluation after the traffic
    groups = get_json(f"{prom.url}/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(ALERTS.read_text())["groups"])
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    firing = [r["name"] for r in rules if r["state"] != "inactive"]
    print("alerts pending or firing after the traffic:", firing)
    # Nothing is down and nothing is absent while Prometheus scrapes this embedcar.
    assert "EmbedcarDown" not in firing and "EmbedcarAbsent" not in firing
