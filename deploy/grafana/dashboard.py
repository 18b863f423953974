#!/usr/bin/env python3
"""Writes deploy/grafana/embedcar.json, the embedcar Grafana dashboard, from the panel list below.

    python3 deploy/grafana/dashboard.py            # rewrite embedcar.json
    python3 deploy/grafana/dashboard.py --check    # exit 1 if embedcar.json differs from the script

Edit the panels here, not the JSON: tests/python/test_monitoring.py checks that the two agree and
runs every query against a real Prometheus scraping a real embedcar. Every query reads metrics
embedcar exports (README "Admin endpoints and metrics"): its own embedcar_* ones, the standard
process_* ones (resident memory, CPU, fds; Linux) and Prometheus' own `up`.
"""

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("embedcar.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$instance"'
RI = "$__rate_interval"
FIVE_XX = 'status=~"5.."'  # "5xx" is the class label of rare codes: the regex takes it too


def rate(metric, extra="", by=None):
    labels = SEL + (", " + extra if extra else "")
    inner = f"rate({metric}{{{labels}}}[{RI}])"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def quantile(q, metric, by=""):
    by = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{{{SEL}}}[{RI}])))"


EMB_REQUESTS = rate("embedcar_requests_total", 'route="embeddings"')
EMB_UPSTREAM = rate("embedcar_upstream_requests_total", 'route="embeddings"')


def gauge(metric, agg="sum", by="instance"):
    return f"{agg} by ({by}) ({metric}{{{SEL}}})"


# Each panel: (title, kind, unit, [(expr, legend)], description). kind: "ts" (time series),
# "stat", "text" (markdown: the description). A row starts with ("row", title).
PANELS = [
    ("row", "At a glance"),
    ("Requests / s", "stat", "reqps", [(rate("embedcar_requests_total"), "")],
     "Requests answered, every route."),
    ("5xx share", "stat", "percentunit",
     [(rate("embedcar_requests_total", FIVE_XX) + " / " + rate("embedcar_requests_total"), "")],
     "Share of requests answered 5xx (embedcar's own 502/503/504 and the upstream's)."),
    ("Embeddings p99", "stat", "s",
     [(f'histogram_quantile(0.99, sum by (le) (rate(embedcar_request_duration_seconds_bucket{{{SEL}, route="embeddings"}}[{RI}])))', "")],
     "99th percentile of embeddings request duration, head to end of body."),
    ("Cache hit ratio", "stat", "percentunit",
     [(f'{rate("embedcar_embeddings_cache_hits_total")} / {rate("embedcar_embeddings_inputs_total")}', "")],
     "Embeddings inputs answered from the cache."),
    ("Breaker open", "stat", "none", [(gauge("embedcar_circuit_breaker_state", "max", "job"), "")],
     "1 while the circuit breaker refuses everyone's calls (any selected instance)."),
    ("Instances up", "stat", "none", [(f'sum(up{{{SEL}}})', "")],
     "Scraped targets answering (Prometheus' own `up`)."),

    ("row", "Traffic, errors and latency per route"),
    ("Requests / s by route", "ts", "reqps",
     [(rate("embedcar_requests_total", by="route"), "{{route}}")], ""),
    ("Errors / s by route and status", "ts", "reqps",
     [(rate("embedcar_requests_total", 'status=~"4..|5..|499"', by="route, status"), "{{route}} {{status}}")],
     "4xx, 5xx and 499 (caller left before its answer)."),
    ("Latency by route (p50, p99)", "ts", "s",
     [(quantile(0.5, "embedcar_request_duration_seconds", "route"), "p50 {{route}}"),
      (quantile(0.99, "embedcar_request_duration_seconds", "route"), "p99 {{route}}")],
     "Head to end of response body (a stream counts whole)."),
    ("In flight and connections", "ts", "short",
     [(gauge("embedcar_requests_in_flight"), "requests in flight {{instance}}"),
      (gauge("embedcar_open_connections"), "open connections {{instance}}"),
      (rate("embedcar_connections_total", by="instance"), "connections accepted/s {{instance}}"),
      (rate("embedcar_connections_reclaimed_total", by="instance"), "idle reclaimed/s {{instance}}")],
     ""),

    ("row", "Embeddings engine: what it saves"),
    ("Inputs / s", "ts", "short",
     [(rate("embedcar_embeddings_inputs_total"), "received"),
      (rate("embedcar_embeddings_cache_hits_total"), "cache hits"),
      (rate("embedcar_embeddings_coalesced_total"), "coalesced"),
      (rate("embedcar_embeddings_abandoned_inputs_total"), "abandoned (callers left)")],
     "Inputs received, answered from the cache, joined to an identical one in flight, dropped unsent."),
    ("Inputs per upstream call", "ts", "short",
     [(f'{rate("embedcar_embeddings_batch_inputs_sum")} / {rate("embedcar_embeddings_batch_inputs_count")}', "mean"),
      (quantile(0.99, "embedcar_embeddings_batch_inputs"), "p99")],
     ""),
    ("Upstream calls avoided / s", "ts", "reqps",
     [(EMB_REQUESTS + " - " + EMB_UPSTREAM, "avoided"),
      (EMB_REQUESTS, "embeddings requests received"),
      (EMB_UPSTREAM, "upstream embeddings calls")],
     "Embeddings requests received minus upstream embeddings exchanges (retries included): the "
     "calls the applications would have made calling the API directly, less what embedcar sent."),
    ("Cache hit ratio and coalesced share", "ts", "percentunit",
     [(f'{rate("embedcar_embeddings_cache_hits_total")} / {rate("embedcar_embeddings_inputs_total")}', "cache hits"),
      (f'{rate("embedcar_embeddings_coalesced_total")} / {rate("embedcar_embeddings_inputs_total")}', "coalesced")],
     ""),
    ("Tokens / s by source", "ts", "short",
     [(rate("embedcar_embeddings_tokens_total", by="source"), "{{source}}")],
     "upstream: billed; cache: saved."),
    ("Cache size", "ts", "bytes",
     [(gauge("embedcar_cache_bytes"), "bytes {{instance}}"),
      (gauge("embedcar_cache_entries"), "entries {{instance}}")],
     "Entries are plotted on the right axis."),

    ("row", "Upstream"),
    ("Upstream latency (p50, p99)", "ts", "s",
     [(quantile(0.5, "embedcar_upstream_duration_seconds", "route"), "p50 {{route}}"),
      (quantile(0.99, "embedcar_upstream_duration_seconds", "route"), "p99 {{route}}")],
     "Time to the upstream's response head."),
    ("Upstream replies / s by status", "ts", "reqps",
     [(rate("embedcar_upstream_requests_total", by="status"), "{{status}}")],
     "A status code, or connect_error, timeout, io_error, abandoned."),
    ("Retries / s by reason, budget exhausted", "ts", "short",
     [(rate("embedcar_retries_total", by="reason"), "retry {{reason}}"),
      (rate("embedcar_retry_budget_exhausted_total"), "refused: budget spent")],
     ""),
    ("Circuit breaker", "ts", "short",
     [(gauge("embedcar_circuit_breaker_state", "max"), "open (everyone) {{instance}}"),
      (gauge("embedcar_circuit_breaker_open_credentials"), "open credentials {{instance}}"),
      (rate("embedcar_circuit_breaker_transitions_total", by="state"), "entered {{state}}/s")],
     ""),
    ("Rate gates", "ts", "short",
     [(quantile(0.99, "embedcar_rate_gate_wait_seconds"), "wait p99 (s)"),
      (rate("embedcar_rate_gate_closures_total"), "closures/s"),
      (rate("embedcar_rate_gate_rejections_total"), "rejections/s (429 rate_limited)"),
      (rate("embedcar_upstream_ratelimit_exhausted_total", by="kind"), "budget spent/s {{kind}}")],
     ""),
    ("Adaptive concurrency", "ts", "short",
     [(gauge("embedcar_upstream_concurrency_limit"), "limit {{instance}}"),
      (gauge("embedcar_upstream_in_flight"), "in flight {{instance}}")],
     "The learnt limit on embeddings calls in flight, against the upstream slots in use."),
    ("Latency baseline and decisions", "ts", "short",
     [(gauge("embedcar_upstream_latency_baseline_seconds", "max"), "baseline s {{instance}}"),
      (rate("embedcar_upstream_concurrency_decisions_total", by="decision"), "{{decision}}/s")],
     ""),

    ("row", "Queues and shedding"),
    ("Embeddings queue depth", "ts", "short",
     [(gauge("embedcar_embeddings_queue_depth"), "{{instance}}")],
     "Inputs waiting for an upstream call; bounded by limits.max_queued_inputs."),
    ("Wait for an upstream slot (p50, p99)", "ts", "s",
     [(quantile(0.5, "embedcar_concurrency_wait_seconds"), "p50"),
      (quantile(0.99, "embedcar_concurrency_wait_seconds"), "p99")],
     ""),
    ("Shed by embedcar / s by reason", "ts", "reqps",
     [(rate("embedcar_shed_requests_total", by="reason"), "{{reason}}")],
     "Requests embedcar refused to protect itself or the upstream: queue_full, proxy_overloaded, request_buffers_full, rate_limited, upstream_circuit_open, proxy_shutting_down."),
    ("Errors answered by embedcar / s by reason", "ts", "reqps",
     [(rate("embedcar_errors_total", by="reason"), "{{reason}}")],
     "embedcar's other error replies: the caller's (invalid_request, request_too_large, request_body_timeout), the upstream's or a deadline's (upstream_unreachable, upstream_timeout, upstream_invalid_reply, deadline_exceeded), internal_error. The upstream's own errors are under Errors / s by route and status."),
    ("Deadlines expired / s by kind", "ts", "short",
     [(rate("embedcar_deadline_expired_total", by="kind"), "{{kind}}")],
     ""),

    ("row", "Process"),
    ("Resident memory", "ts", "bytes",
     [(gauge("process_resident_memory_bytes"), "resident {{instance}}")],
     "The process's resident set (process_resident_memory_bytes, from /proc/self/stat): what "
     "the container's memory limit and the EmbedcarMemoryNearLimit alert (80% of it) are about."),
    ("CPU", "ts", "short",
     [(rate("process_cpu_seconds_total", by="instance"), "cores {{instance}}")],
     "CPU time used per second (user + system), in cores: 1 is one core kept busy."),
    ("Open file descriptors", "ts", "short",
     [(gauge("process_open_fds"), "open {{instance}}"),
      (gauge("process_max_fds", "max"), "max {{instance}}")],
     "Open fds (client and upstream connections, listeners, files) against the soft limit "
     "(RLIMIT_NOFILE): at the limit, accept() and upstream connects fail."),
    ("Memory held in bounded stores", "ts", "bytes",
     [(gauge("embedcar_cache_bytes"), "cache {{instance}}"),
      (gauge("embedcar_request_buffer_bytes"), "request bodies {{instance}}")],
     "The part of resident memory embedcar bounds itself: the vector cache (cache.max_bytes) "
     "and request bodies held whole (server.max_buffered_request_bytes). Resident memory well "
     "above their sum is the rest: connections, the allocator, code."),
]


def build():
    panels, x, y, pid, h = [], 0, 0, 1, 0
    for p in PANELS:
        if p[0] == "row":
            if x:
                x, y = 0, y + h
            panels.append({"type": "row", "title": p[1], "id": pid, "collapsed": False,
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
            pid, y = pid + 1, y + 1
            continue
        title, kind, unit, queries, desc = p
        w, h = (4, 4) if kind == "stat" else (12, 8)
        if x + w > 24:
            x, y = 0, y + h
        panel = {
            "id": pid, "title": title, "description": desc,
            "gridPos": {"h": h, "w": w, "x": x, "y": y},
        }
        if kind == "text":
            panel.update(type="text", options={"mode": "markdown", "content": desc})
        else:
            panel.update(
                type="stat" if kind == "stat" else "timeseries",
                datasource=DS,
                fieldConfig={"defaults": {"unit": unit}, "overrides": []},
                targets=[{"refId": chr(ord("A") + i), "datasource": DS, "expr": e,
                          "legendFormat": legend or "__auto", "range": True}
                         for i, (e, legend) in enumerate(queries)],
            )
            if kind == "stat":
                panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"}
            if title == "Cache size":
                panel["fieldConfig"]["overrides"] = [{
                    "matcher": {"id": "byRegexp", "options": "entries.*"},
                    "properties": [{"id": "unit", "value": "short"},
                                   {"id": "custom.axisPlacement", "value": "right"}]}]
        panels.append(panel)
        pid, x = pid + 1, x + w
        if x >= 24:
            x, y = 0, y + h
    var = {"type": "query", "datasource": DS, "refresh": 2, "includeAll": True,
           "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"}}
    return {
        "title": "embedcar",
        "uid": "embedcar",
        "description": "embedcar sidecar: traffic, embeddings engine savings, upstream state, queues.",
        "tags": ["embedcar"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "",
        "graphTooltip": 1,
        "annotations": {"list": []},
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "label": "Data source",
             "query": "prometheus", "current": {}},
            {**var, "name": "job", "label": "job",
             "definition": "label_values(embedcar_requests_in_flight, job)",
             "query": {"query": "label_values(embedcar_requests_in_flight, job)", "refId": "job"}},
            {**var, "name": "instance", "label": "instance",
             "definition": 'label_values(embedcar_requests_in_flight{job=~"$job"}, instance)',
             "query": {"query": 'label_values(embedcar_requests_in_flight{job=~"$job"}, instance)',
                       "refId": "instance"}},
        ]},
        "panels": panels,
    }


def render():
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if OUT.read_text() != text:
            sys.exit(f"{OUT} is out of date: run python3 {sys.argv[0]}")
    else:
        OUT.write_text(text)
