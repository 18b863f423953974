"""The deployment files agree with embedcar itself: every manifest parses, probes hit the admin
endpoints on the admin port, the ports match the configuration the container sets, and that
configuration is one embedcar accepts."""

import json
import os
import re
import subprocess
from pathlib import Path

import yaml

from conftest import EMBEDCAR_BIN, ROOT

DEPLOY = ROOT / "deploy"


def dockerfile_env():
    text = (DEPLOY / "Dockerfile").read_text()
    env_block = re.search(r"^ENV (.+?)(?=^\S)", text, re.S | re.M).group(1)
    return dict(re.findall(r"(EMBEDCAR_\w+)=(\S+)", env_block)), text


def test_the_container_configuration_is_valid_and_its_ports_are_exposed():
    env, text = dockerfile_env()
    out = subprocess.run(
        [EMBEDCAR_BIN, "check-config", "--config", str(ROOT / "config/embedcar.toml")],
        env={**os.environ, **env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    printed = out.stdout
    assert 'listen = "0.0.0.0:8080"' in printed
    assert 'admin_listen = "0.0.0.0:9901"' in printed
    exposed = re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()
    assert exposed == ["8080", "9901"]


def dockerfile_healthcheck():
    text = (DEPLOY / "Dockerfile").read_text()
    cmd = re.search(r"^HEALTHCHECK .*?\bCMD (\[.*?\])$", text, re.S | re.M).group(1)
    return json.loads(cmd)


def test_the_image_and_compose_health_checks_probe_readiness_with_the_binary(spawn):
    argv = dockerfile_healthcheck()
    assert argv[0] == "/usr/local/bin/embedcar" and argv[-1] == "health"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose["services"]["embedcar"]["healthcheck"]["test"] == ["CMD", *argv]
    # Run it as the container would (its environment, its config file), against a live embedcar
    # whose admin listener is on the container's 0.0.0.0 address but this test's port.
    live = spawn.embedcar("http://127.0.0.1:9")
    live.wait_ready()
    admin_port = live.admin.rsplit(":", 1)[1]
    env, _ = dockerfile_env()
    env["EMBEDCAR_SERVER__ADMIN_LISTEN"] = f"0.0.0.0:{admin_port}"
    local = [EMBEDCAR_BIN] + [
        str(ROOT / "config/embedcar.toml") if a == "/etc/embedcar/embedcar.toml" else a
        for a in argv[1:]
    ]
    out = subprocess.run(local, env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=10)
    assert out.returncode == 0, out.stdout + out.stderr
    live.stop()
    out = subprocess.run(local, env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=10)
    assert out.returncode == 1, out.stdout + out.stderr


def test_the_kubernetes_sidecar_is_native_and_probes_the_admin_port():
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes/deployment.yaml").read_text()))
    pod = docs[0]["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "embedcar")
    assert sidecar["restartPolicy"] == "Always"
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    admin_port = int(env["EMBEDCAR_SERVER__ADMIN_LISTEN"].rsplit(":", 1)[1])
    assert sidecar["ports"][0]["containerPort"] == admin_port
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The pod gives embedcar longer than its own drain grace to stop.
    grace = int(env["EMBEDCAR_SERVER__SHUTDOWN_GRACE"].rstrip("s"))
    assert pod["terminationGracePeriodSeconds"] > grace
    app = pod["containers"][0]
    app_env = {e["name"]: e.get("value") for e in app["env"]}
    listen = env["EMBEDCAR_SERVER__LISTEN"]
    assert app_env["OPENAI_BASE_URL"] == f"http://{listen}/v1"


def test_the_kubernetes_manifest_names_a_pullable_image_and_ships_the_secret_it_reads():
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes/deployment.yaml").read_text()))
    pod = docs[0]["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "embedcar")
    assert sidecar["image"] == "REGISTRY/embedcar:VERSION"
    assert sidecar["imagePullPolicy"] == "IfNotPresent"
    key_ref = next(e for e in pod["containers"][0]["env"]
                   if e["name"] == "OPENAI_API_KEY")["valueFrom"]["secretKeyRef"]
    secret = yaml.safe_load((DEPLOY / "kubernetes/secret.example.yaml").read_text())
    assert secret["kind"] == "Secret"
    assert secret["metadata"]["name"] == key_ref["name"]
    assert key_ref["key"] in secret["stringData"]


def test_compose_and_prometheus_point_at_the_admin_port():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose["services"]["app"]["environment"]["OPENAI_BASE_URL"] == "http://embedcar:8080/v1"
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["embedcar:9901"]
