#!/usr/bin/env python3
"""Writes deploy/kubernetes/prometheusrule.yaml: deploy/prometheus/alerts.yml wrapped in a
PrometheusRule for the prometheus-operator. alerts.yml is the one source of the rules.

    python3 deploy/kubernetes/make_prometheusrule.py           # rewrite prometheusrule.yaml
    python3 deploy/kubernetes/make_prometheusrule.py --check   # exit 1 if it is out of date

Needs PyYAML (tests/python/requirements.txt).
"""

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parent / "prometheus" / "alerts.yml"
OUT = HERE / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by deploy/kubernetes/make_prometheusrule.py: edit
# alerts.yml and rerun the script (tests/python/test_monitoring.py checks the two agree).
# The Prometheus custom resource selects rules by its ruleSelector: add the labels yours asks
# for (kube-prometheus-stack: release: <its release name>).
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper, value):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render():
    rules = yaml.safe_load(ALERTS.read_text())
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "embedcar", "labels": {"app": "embeddings-app"}},
        "spec": {"groups": rules["groups"]},
    }
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if OUT.read_text() != text:
            sys.exit(f"{OUT} is out of date: run python3 {sys.argv[0]}")
    else:
        OUT.write_text(text)
