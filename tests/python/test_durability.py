"""Crash durability: every create that hearth acknowledged survives `kill -9` of the server.

The server is killed while clients are still creating, then restarted on the same data
directory (or the same PostgreSQL database), and every acknowledged resource must be there,
with the uploaded model still READY and its files still downloadable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import requests

import fixtures
from fireworks import Fireworks

from conftest import _free_port, _random_account, _random_key, _wait_healthy, hearth_binary


def _serve(binary: Path, data_dir: Path, port: int, key: str, account: str, log: Path,
           env: dict | None = None) -> subprocess.Popen:
    cmd = [str(binary), "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir),
           "--api-key", key, "--account", account, "--runtime", "none"]
    if os.environ.get("HEARTH_DATABASE_URL"):
        cmd += ["--database-url", os.environ["HEARTH_DATABASE_URL"]]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=None if env is None else {**os.environ, **env})


class _Server:
    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.base_url = proc, f"http://127.0.0.1:{port}"


def test_kill_9_keeps_every_acknowledged_create(tmp_path):
    binary = hearth_binary()
    data_dir, log = tmp_path / "data", tmp_path / "hearth.log"
    data_dir.mkdir()
    key, account = _random_key(), _random_account()
    port = _free_port()
    server = _Server(_serve(binary, data_dir, port, key, account, log), port)
    assert _wait_healthy(server, time.monotonic() + 60) is None, log.read_text()

    client = Fireworks(api_key=key, account_id=account, base_url=server.base_url, max_retries=0)
    base = fixtures.create_ready_base_model(client, "durable-base", tmp_path / "base")

    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def create_loop(worker: int) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {key}"
        i = 0
        while not stop.is_set():
            dep_id = f"d{worker}-{i}"
            i += 1
            try:
                r = session.post(f"{server.base_url}/v1/accounts/{account}/deployments",
                                 params={"deploymentId": dep_id},
                                 json={"baseModel": base.name, "displayName": f"worker {worker}"}, timeout=5)
            except requests.RequestException:
                return  # the server is gone: this request was never acknowledged
            if r.status_code == 200:
                with lock:
                    acknowledged.append(dep_id)

    workers = [threading.Thread(target=create_loop, args=(w,)) for w in range(4)]
    for t in workers:
        t.start()
    time.sleep(1.5)
    os.kill(server.proc.pid, signal.SIGKILL)  # no chance to flush anything
    server.proc.wait(timeout=10)
    stop.set()
    for t in workers:
        t.join(timeout=10)
    assert len(acknowledged) > 20, f"too few creates were acknowledged before the kill: {len(acknowledged)}"

    port = _free_port()
    server = _Server(_serve(binary, data_dir, port, key, account, log), port)
    try:
        assert _wait_healthy(server, time.monotonic() + 60) is None, log.read_text()
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {key}"
        listed = set()
        token = None
        while True:
            params = {"pageSize": 200, **({"pageToken": token} if token else {})}
            page = session.get(f"{server.base_url}/v1/accounts/{account}/deployments", params=params, timeout=10).json()
            listed |= {d["name"].rsplit("/", 1)[1] for d in page.get("deployments", [])}
            token = page.get("nextPageToken")
            if not token:
                break
        missing = [d for d in acknowledged if d not in listed]
        assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged deployments were lost: {missing[:10]}"

        model = session.get(f"{server.base_url}/v1/accounts/{account}/models/durable-base", timeout=10).json()
        assert model["state"] == "READY"
        urls = session.get(f"{server.base_url}/v1/accounts/{account}/models/durable-base:getDownloadEndpoint",
                           timeout=10).json()["filenameToSignedUrls"]
        assert set(urls) == {"config.json", "model.safetensors", "tokenizer.json"}
        assert requests.get(urls["config.json"], timeout=10).json()["model_type"] == "llama"
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=10)


def test_an_import_cut_by_kill_9_starts_again_with_the_server(tmp_path):
    """The model's record keeps its source until the import ends, so a gateway killed in the
    middle of a transfer fetches the files again when it comes back, and the model ends READY."""
    from test_sources import Sources

    sources = Sources()
    sources.repos["hearth-test/resumed"] = fixtures.tiny_llama_files()
    sources.hold.clear()
    binary = hearth_binary()
    data_dir, log = tmp_path / "data", tmp_path / "hearth.log"
    data_dir.mkdir()
    key, account = _random_key(), _random_account()
    env = {"HF_ENDPOINT": sources.url}
    try:
        port = _free_port()
        server = _Server(_serve(binary, data_dir, port, key, account, log, env), port)
        assert _wait_healthy(server, time.monotonic() + 60) is None, log.read_text()
        api = fixtures.RawApi(server.base_url, key, account)
        r = api.post("models", json={"modelId": "resumed", "model": {"kind": "HF_BASE_MODEL", "baseModelDetails": {}},
                                     "source": {"huggingfaceSource": {"repo": "hearth-test/resumed"}}})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 30
        while not any("/resolve/" in p for p, _ in sources.requests):
            assert time.monotonic() < deadline, "the import never asked for a file"
            time.sleep(0.05)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
        sources.hold.set()

        port = _free_port()
        server = _Server(_serve(binary, data_dir, port, key, account, log, env), port)
        assert _wait_healthy(server, time.monotonic() + 60) is None, log.read_text()
        api = fixtures.RawApi(server.base_url, key, account)
        deadline = time.monotonic() + 60
        while True:
            m = api.ok_json("GET", "models/resumed")
            if m["state"] != "UPLOADING":
                break
            assert time.monotonic() < deadline, f"the import did not resume: {m}"
            time.sleep(0.1)
        assert m["state"] == "READY", m
        assert "resuming an unfinished import" in log.read_text()
        server.proc.terminate()
        server.proc.wait(timeout=10)
    finally:
        sources.hold.set()
        sources.close()
