"""``scripts/dev-cluster``: a real kube-apiserver and etcd on loopback, and the test kubelet that
runs pods as local processes. Two engine pods get their own loopback addresses on the same
port, become Ready through their readiness probes and answer there; a pod whose process exits
is Failed (restartPolicy Never); a deleted pod's process is stopped and the pod is gone; ``down``
leaves nothing running. Everything goes through the API server's REST API, as hearth will."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests

from conftest import hearth_binary

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"


class Kube:
    def __init__(self, kubeconfig: str):
        self.kubeconfig = kubeconfig
        text = Path(kubeconfig).read_text()
        self.server = re.search(r"server: (\S+)", text).group(1)
        token = re.search(r"token: (\S+)", text).group(1)
        self.headers = {"Authorization": f"Bearer {token}"}
        self.verify = re.search(r"certificate-authority: (\S+)", text).group(1)

    def call(self, method: str, path: str, body=None) -> requests.Response:
        return requests.request(method, self.server + path, json=body, headers=self.headers, verify=self.verify,
                                timeout=30)

    def pod(self, name: str):
        r = self.call("GET", f"/api/v1/namespaces/default/pods/{name}")
        return r.json() if r.status_code == 200 else None


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    state = tmp_path_factory.mktemp("dev-cluster")
    env = dict(os.environ, HEARTH_DEV_CLUSTER_DIR=str(state), HEARTH_BIN=str(hearth_binary()))
    up = subprocess.run([str(ROOT / "scripts/dev-cluster"), "up"], env=env, capture_output=True, text=True,
                        timeout=1200)
    assert up.returncode == 0, up.stderr[-3000:]
    kubeconfig = re.search(r"export KUBECONFIG=(\S+)", up.stdout).group(1)
    yield Kube(kubeconfig)
    subprocess.run([str(ROOT / "scripts/dev-cluster"), "down"], env=env, timeout=120, check=True)
    assert not state.exists() or not any(state.iterdir()), "down removes the cluster's state"


def engine_pod(name: str, extra_args=()) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "hearth-test"}},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "engine", "image": "hearth", "command": ["hearth", "engine"],
            "args": ["--model", str(SMOLLM2), "--listen", "$(POD_IP):8000", "--served-model-name", "m",
                     *extra_args],
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            "ports": [{"name": "http", "containerPort": 8000}],
            "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}},
        }]},
    }


def wait_pod(kube: Kube, name: str, check, what: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        pod = kube.pod(name)
        if check(pod):
            return pod
        assert time.monotonic() < deadline, f"pod {name} never {what}: {json.dumps((pod or {}).get('status'))}"
        time.sleep(0.3)


def ready(pod) -> bool:
    return bool(pod) and any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def test_pods_run_on_their_own_addresses_and_stop_when_deleted(kube):
    version = kube.call("GET", "/version").json()
    assert version["major"] == "1", version
    node = kube.call("GET", "/api/v1/nodes/hearth-dev-node").json()
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])

    for name in ("e1", "e2"):
        r = kube.call("POST", "/api/v1/namespaces/default/pods", engine_pod(name))
        assert r.status_code == 201, r.text
    pods = [wait_pod(kube, n, ready, "Ready") for n in ("e1", "e2")]
    ips = [p["status"]["podIP"] for p in pods]
    assert len(set(ips)) == 2 and all(ip.startswith("127.0.0.") for ip in ips), ips
    assert all(p["spec"]["nodeName"] == "hearth-dev-node" and p["status"]["phase"] == "Running" for p in pods)
    for ip in ips:
        r = requests.post(f"http://{ip}:8000/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 3},
                          timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    listed = kube.call("GET", "/api/v1/namespaces/default/pods?labelSelector=app%3Dhearth-test").json()
    assert sorted(p["metadata"]["name"] for p in listed["items"]) == ["e1", "e2"]

    # Deleted: its process stops, and the pod is gone; the other serves on.
    assert kube.call("DELETE", "/api/v1/namespaces/default/pods/e1").status_code == 200
    wait_pod(kube, "e1", lambda p: p is None, "gone")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://{ips[0]}:8000/health", timeout=5)
    assert requests.get(f"http://{ips[1]}:8000/health", timeout=5).status_code == 200

    # A process that exits: the pod fails, saying how.
    r = kube.call("POST", "/api/v1/namespaces/default/pods", engine_pod("broken", ["--no-such-flag"]))
    assert r.status_code == 201, r.text
    pod = wait_pod(kube, "broken", lambda p: p and p["status"].get("phase") == "Failed", "Failed")
    state = pod["status"]["containerStatuses"][0]["state"]
    assert state["terminated"]["exitCode"] != 0, state
    for name in ("e2", "broken"):
        kube.call("DELETE", f"/api/v1/namespaces/default/pods/{name}")
        wait_pod(kube, name, lambda p: p is None, "gone")
