#!/usr/bin/env python3
"""The test kubelet of scripts/dev-cluster: a Kubernetes node without a container runtime.

It registers a Node, binds every pod that has no node to itself (the cluster runs no
scheduler), and runs each pod bound to it as local processes: the first container's command
and args (`$(VAR)` expanded as Kubernetes does), its environment (values, the pod's name,
namespace and IP through `fieldRef`, Secret keys through `secretKeyRef`), its `emptyDir`
volumes as directories of its own (paths under a mount rewritten in its command and
environment, there being no mount namespace), on a loopback address of its own (127.0.0.N, so
every pod has its own IP and the same port, as in a cluster). The `hearth` command runs the
local hearth binary (HEARTH_BIN). It reports the pod's IP, phase and readiness (from the
container's HTTP readiness probe) through the status subresource, restarts or fails a pod
whose process exits as its restartPolicy says (with the log's tail as the termination message
under `FallbackToLogsOnError`), and stops the process when the pod is deleted.

With --no-engines (a test double for scale benchmarks only, never for functional tests) a pod
bound to the node is marked Running and Ready at once, on an address of 127.1/16 where
nothing listens, and no process runs.

Only the standard library: it runs wherever the cluster is started.

Usage: dev-cluster-kubelet.py --kubeconfig PATH --node NAME
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def log(*args):
    print(now(), *args, file=sys.stderr, flush=True)


class Api:
    """The API server, from the kubeconfig scripts/dev-cluster writes."""

    def __init__(self, kubeconfig: str):
        text = Path(kubeconfig).read_text()
        self.server = re.search(r"server: (\S+)", text).group(1)
        self.token = re.search(r"token: (\S+)", text).group(1)
        ca = re.search(r"certificate-authority: (\S+)", text).group(1)
        self.ssl = ssl.create_default_context(cafile=ca)

    def call(self, method: str, path: str, body=None, content_type="application/json", timeout=30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.ssl, timeout=timeout) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code == 404 and method in ("DELETE", "GET"):
                return None
            raise RuntimeError(f"{method} {path}: {e.code} {e.read()[:300]!r}") from None

    def watch(self, path: str, rv: str):
        """Yields watch events until the server ends the stream."""
        sep = "&" if "?" in path else "?"
        url = f"{self.server}{path}{sep}watch=1&resourceVersion={rv}&timeoutSeconds=60&allowWatchBookmarks=true"
        req = urllib.request.Request(url)
        req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, context=self.ssl, timeout=90) as r:
            for line in r:
                if line.strip():
                    yield json.loads(line)


class Pod:
    def __init__(self, ns: str, name: str, ip: str):
        self.ns, self.name, self.ip = ns, name, ip
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self.restarts = 0
        self.stopping = False


class Kubelet:
    def __init__(self, api: Api, node: str, logdir: Path, no_engines: bool = False):
        self.api, self.node, self.logdir = api, node, logdir
        self.no_engines = no_engines
        self.pods: dict[str, Pod] = {}
        # Without engines nothing listens, so addresses come from all of 127.1/16 (a
        # connection there is refused at once, as to a pod that does not answer).
        self.free_ips = ([f"127.{1 + n // 65536}.{n // 256 % 256}.{n % 256}" for n in range(1, 60000)]
                         if no_engines else [f"127.0.0.{n}" for n in range(2, 255)])
        self.lock = threading.Lock()
        self.hearth = os.environ.get("HEARTH_BIN", "hearth")

    # The node.
    def register(self):
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node, "labels": {"kubernetes.io/hostname": self.node}}}
        if self.api.call("GET", f"/api/v1/nodes/{self.node}") is None:
            self.api.call("POST", "/api/v1/nodes", node)
        cpus = str(os.cpu_count() or 1)
        status = {"status": {
            "capacity": {"cpu": cpus, "memory": "16Gi", "pods": "250"},
            "allocatable": {"cpu": cpus, "memory": "16Gi", "pods": "250"},
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.node}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "the hearth test kubelet is running", "lastHeartbeatTime": now(),
                            "lastTransitionTime": now()}],
        }}
        self.api.call("PATCH", f"/api/v1/nodes/{self.node}/status", status, "application/merge-patch+json")

    # Scheduling: this is the only node.
    def bind(self, pod: dict):
        meta = pod["metadata"]
        binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"]},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": self.node}}
        try:
            self.api.call("POST", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding", binding)
        except RuntimeError as e:
            log("bind failed:", e)

    # Running.
    def key(self, pod: dict) -> str:
        return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"

    def sync(self, kind: str, pod: dict):
        key = self.key(pod)
        gone = kind == "DELETED" or pod["metadata"].get("deletionTimestamp")
        with self.lock:
            running = self.pods.get(key)
        if gone:
            if running:
                self.stop(running)
            if kind != "DELETED":
                # Nothing runs it any more: let the API server forget it now.
                self.api.call("DELETE", f"/api/v1/namespaces/{running.ns if running else pod['metadata']['namespace']}"
                              f"/pods/{pod['metadata']['name']}", {"gracePeriodSeconds": 0})
            return
        if running is None and pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
            self.start(pod)

    def start(self, pod: dict):
        meta, spec = pod["metadata"], pod["spec"]
        with self.lock:
            if not self.free_ips:
                log("no loopback address left for", self.key(pod))
                return
            ip = self.free_ips.pop(0)
            p = Pod(meta["namespace"], meta["name"], ip)
            self.pods[self.key(pod)] = p
        if self.no_engines:
            # The scale double: Running and Ready at once, with nothing behind it.
            p.ready = True
            self.status(p, "Running", now())
            return
        threading.Thread(target=self.run, args=(p, pod), daemon=True).start()

    def environment(self, p: Pod, container: dict) -> dict:
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
        fields = {"metadata.name": p.name, "metadata.namespace": p.ns, "status.podIP": p.ip,
                  "spec.nodeName": self.node, "status.hostIP": "127.0.0.1"}
        for e in container.get("env", []):
            source = e.get("valueFrom") or {}
            if "value" in e:
                env[e["name"]] = expand(e["value"], env)
            elif "fieldRef" in source:
                env[e["name"]] = fields.get(source["fieldRef"]["fieldPath"], "")
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = self.api.call("GET", f"/api/v1/namespaces/{p.ns}/secrets/{ref['name']}") or {}
                value = (secret.get("data") or {}).get(ref["key"])
                if value is None:
                    raise RuntimeError(f"secret {ref['name']} has no key {ref['key']}")
                env[e["name"]] = base64.b64decode(value).decode()
        return env

    def mounts(self, p: Pod, pod: dict, container: dict) -> dict:
        """emptyDir volumes as directories of the pod's own: {mountPath: directory}. With no
        mount namespace, a path under a mount is rewritten where the container's command and
        environment name it."""
        empty = {v["name"] for v in pod["spec"].get("volumes", []) if "emptyDir" in v}
        out = {}
        for m in container.get("volumeMounts", []):
            if m["name"] in empty:
                d = self.logdir / "volumes" / f"{p.ns}_{p.name}" / m["name"]
                d.mkdir(parents=True, exist_ok=True)
                out[m["mountPath"].rstrip("/")] = str(d)
        return out

    def command(self, container: dict, env: dict) -> list:
        argv = [expand(a, env) for a in container.get("command", []) + container.get("args", [])]
        if argv and argv[0] == "hearth":
            argv[0] = self.hearth
        return argv

    def run(self, p: Pod, pod: dict):
        container = pod["spec"]["containers"][0]
        policy = pod["spec"].get("restartPolicy", "Always")
        try:
            env = self.environment(p, container)
        except RuntimeError as e:
            self.status(p, "Failed", now(), terminated=(1, "CreateContainerConfigError", str(e)))
            return
        mounts = self.mounts(p, pod, container)

        def mounted(v: str) -> str:
            for path, d in mounts.items():
                if v == path or v.startswith(path + "/"):
                    return d + v[len(path):]
            return v
        env = {k: mounted(v) for k, v in env.items()}
        argv = [mounted(a) for a in self.command(container, env)]
        fallback = container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        probe = (container.get("readinessProbe") or {}).get("httpGet")
        started = now()
        while not p.stopping:
            out = open(self.logdir / f"{p.ns}_{p.name}.log", "ab")
            try:
                # Under the lock stop() takes: a pod deleted as it starts either never starts
                # or has its process seen, and killed, by stop().
                with self.lock:
                    if p.stopping:
                        return
                    p.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:
                self.status(p, "Failed", started, terminated=(127, "StartError", f"could not start {argv[:1]}: {e}"))
                return
            log("started", p.ns, p.name, "on", p.ip, "pid", p.proc.pid)
            self.status(p, "Running", started)
            while p.proc.poll() is None and not p.stopping:
                ready = probe is None or self.probe(p, probe, container)
                if ready != p.ready:
                    p.ready = ready
                    self.status(p, "Running", started)
                time.sleep(0.5)
            code = p.proc.wait()
            p.ready = False
            if p.stopping:
                return
            log("exited", p.ns, p.name, "code", code)
            if policy == "Always" or (policy == "OnFailure" and code != 0):
                p.restarts += 1
                time.sleep(min(10, p.restarts))
                continue
            message = ""
            if code != 0 and fallback:
                # As a kubelet does: the log's tail is the termination message.
                text = (self.logdir / f"{p.ns}_{p.name}.log").read_bytes()[-2048:].decode(errors="replace")
                message = "\n".join(text.splitlines()[-80:])
            self.status(p, "Succeeded" if code == 0 else "Failed", started, terminated=(code, "Error", message))
            return

    def probe(self, p: Pod, probe: dict, container: dict) -> bool:
        port = probe.get("port")
        if isinstance(port, str):
            port = next((c["containerPort"] for c in container.get("ports", []) if c.get("name") == port), 0)
        try:
            with urllib.request.urlopen(f"http://{p.ip}:{port}{probe.get('path', '/')}", timeout=2) as r:
                return 200 <= r.status < 400
        except (OSError, urllib.error.URLError):
            return False

    def status(self, p: Pod, phase: str, started: str, terminated=None):
        ready = "True" if p.ready else "False"
        state = ({"terminated": {"exitCode": terminated[0], "reason": terminated[1], "message": terminated[2],
                                 "finishedAt": now()}}
                 if terminated else {"running": {"startedAt": started}})
        body = {"status": {
            "phase": phase, "podIP": p.ip, "podIPs": [{"ip": p.ip}], "hostIP": "127.0.0.1", "startTime": started,
            "conditions": [{"type": t, "status": s, "lastTransitionTime": now()} for t, s in
                           [("PodScheduled", "True"), ("Initialized", "True"), ("ContainersReady", ready),
                            ("Ready", ready)]],
            "containerStatuses": [{"name": "engine", "ready": p.ready, "restartCount": p.restarts, "image": "hearth",
                                   "imageID": "", "started": not terminated, "state": state}],
        }}
        try:
            self.api.call("PATCH", f"/api/v1/namespaces/{p.ns}/pods/{p.name}/status", body,
                          "application/merge-patch+json")
        except RuntimeError as e:
            log("status update failed:", e)

    def stop(self, p: Pod):
        with self.lock:
            p.stopping = True
            proc = p.proc
        if proc and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log("stopped", p.ns, p.name)
        with self.lock:
            self.pods.pop(f"{p.ns}/{p.name}", None)
            self.free_ips.append(p.ip)

    def stop_all(self):
        for p in list(self.pods.values()):
            self.stop(p)

    # The loops, as an informer runs them: list, then watch from there; when a watch ends,
    # watch again from the last version seen; list again only when that version is gone.
    def loop(self, path: str, handle):
        rv = None
        while True:
            try:
                if rv is None:
                    listed = self.api.call("GET", path)
                    for item in listed["items"]:
                        handle("ADDED", item)
                    rv = listed["metadata"]["resourceVersion"]
                for event in self.api.watch(path, rv):
                    if event["type"] == "ERROR":
                        rv = None  # 410 Gone: too old to resume from
                        break
                    rv = event["object"]["metadata"].get("resourceVersion", rv)
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        handle(event["type"], event["object"])
            except Exception as e:  # noqa: BLE001 - the loop must outlive any one failure
                log("watch", path, "ended:", e)
                rv = None
                time.sleep(1)


def expand(text: str, env: dict) -> str:
    """Kubernetes' `$(VAR)` expansion: known variables replaced, `$$` an escaped `$`."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--node", required=True)
    ap.add_argument("--no-engines", action="store_true",
                    help="a test double for scale only: pods are Ready at once and run nothing")
    args = ap.parse_args()
    kubelet = Kubelet(Api(args.kubeconfig), args.node, Path(args.kubeconfig).parent, args.no_engines)

    def bye(*_):
        kubelet.stop_all()
        sys.exit(0)

    signal.signal(signal.SIGTERM, bye)
    signal.signal(signal.SIGINT, bye)
    kubelet.register()
    threading.Thread(target=kubelet.loop, daemon=True,
                     args=("/api/v1/pods?fieldSelector=spec.nodeName%3D", lambda kind, pod: kind != "DELETED"
                           and not pod["metadata"].get("deletionTimestamp") and kubelet.bind(pod))).start()
    threading.Thread(target=kubelet.loop, daemon=True,
                     args=(f"/api/v1/pods?fieldSelector=spec.nodeName%3D{args.node}", kubelet.sync)).start()
    while True:
        time.sleep(10)
        try:
            kubelet.register()  # the heartbeat
        except Exception as e:  # noqa: BLE001
            log("heartbeat failed:", e)


if __name__ == "__main__":
    main()
