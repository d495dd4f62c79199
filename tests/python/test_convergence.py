"""The reconciler converges: a gateway killed with its deployments running comes back to the
same replicas (one per desired replica, no duplicates) with their LoRA addons, nothing
stored is lost; and a changed deployment rolls (UPDATING) with a new replica ready before
the old one stops, while requests keep being answered.

Each test starts its own ``hearth serve --runtime local`` on a data directory it owns, so it
can kill and restart it; one hands a stopped gateway's store over to a second gateway."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence

import pytest
import requests
from openai import OpenAI

import fixtures
from conftest import _free_port, _random_account, _random_key, _wait_healthy, database_url, hearth_binary

ENGINE_FIXTURES = Path(__file__).resolve().parents[2] / "crates/hearth-engine/tests/fixtures"
TINY_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
LORA_FILES = ["adapter_config.json", "adapter_model.safetensors"]


class Gateway:
    """One `hearth serve` on a fixed data directory; `start` may be called again after a kill."""

    def __init__(self, tmp: Path, db_url: Optional[str] = None, extra: Sequence[str] = ()):
        tmp.mkdir(exist_ok=True)
        self.data_dir = tmp / "data"
        self.data_dir.mkdir()
        self.log = tmp / "hearth.log"
        self.key, self.account = _random_key(), _random_account()
        self.proc = None
        self.base_url = ""
        # One database for this gateway across its restarts (PostgreSQL run), shared with no other
        # unless a test hands it another gateway's store.
        self.db_url = db_url or database_url("local")
        self.extra = list(extra)

    @property
    def store(self) -> str:
        """What another gateway passes as --database-url to share this one's store."""
        return self.db_url or str(self.data_dir / "hearth.db")

    def start(self) -> None:
        port = _free_port()
        cmd = [str(hearth_binary()), "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(self.data_dir),
               "--api-key", self.key, "--account", self.account, "--runtime", "local",
               "--reconcile-interval-ms", "200", "--min-scale-to-zero-window", "1", *self.extra]
        if self.db_url:
            cmd += ["--database-url", self.db_url]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.base_url = f"http://127.0.0.1:{port}"
        assert _wait_healthy(self, time.monotonic() + 60) is None, self.log.read_text()[-3000:]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)

    @property
    def api(self) -> fixtures.RawApi:
        return fixtures.RawApi(self.base_url, self.key, self.account)

    def openai(self) -> OpenAI:
        return OpenAI(api_key=self.key, base_url=f"{self.base_url}/inference/v1", max_retries=0)


@pytest.fixture
def gateway(tmp_path):
    g = Gateway(tmp_path)
    g.start()
    yield g
    g.stop(signal.SIGKILL)
    # Its replicas notice within half a second; the next test must not count them.
    _wait("this gateway's replicas to exit", lambda: subprocess.run(
        ["pgrep", "-f", f"engine --model {g.data_dir}/"], capture_output=True).returncode != 0, timeout=15)


def _replica_pids(model_id: str) -> List[int]:
    out = subprocess.run(["pgrep", "-f", f"engine --model .*/models/{model_id} "], capture_output=True, text=True)
    return sorted(int(p) for p in out.stdout.split())


def _replica_endpoint(pid: int) -> str:
    """The address a replica process listens on, from its command line."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return "http://" + args[args.index("--listen") + 1]


def _replica_auth(pid: int) -> dict:
    """The header a replica's own gateway sends it: its token, from the replica's environment
    (readable by the user who started it, as this test did)."""
    env = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
    return {"Authorization": f"Bearer {env[b'HEARTH_ENGINE_TOKEN'].decode()}"}


def _assert_replicas_refuse_strangers(pids: List[int], model: str) -> None:
    """A replica serves only its gateway: straight to it, chat and the admin routes get 401
    without the token the gateway gave it (in its environment, never on its command line)."""
    for pid in pids:
        endpoint = _replica_endpoint(pid)
        assert "HEARTH_ENGINE_TOKEN" not in Path(f"/proc/{pid}/cmdline").read_text()
        assert requests.get(endpoint + "/health", timeout=5).status_code == 200
        for method, path, body in (
            ("POST", "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]}),
            ("POST", "/v1/completions", {"model": model, "prompt": "hi"}),
            ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
            ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"}),
            ("GET", "/v1/lora_adapters", None),
        ):
            for headers in ({}, {"Authorization": "Bearer guessed"}):
                r = requests.request(method, endpoint + path, json=body, headers=headers, timeout=5)
                assert r.status_code == 401, f"{method} {endpoint}{path}: {r.status_code} {r.text[:300]}"
                assert r.json()["error"]["type"] == "authentication_error", r.text


def _wait(what: str, check, timeout: float = 60, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def _upload(api: fixtures.RawApi, model_id: str, directory: Path, files: List[str], base: str = "") -> str:
    model = ({"kind": "HF_PEFT_ADDON", "peftDetails": {"baseModel": base}} if base
             else {"kind": "HF_BASE_MODEL", "baseModelDetails": {}})
    api.ok_json("POST", "models", json={"modelId": model_id, "model": model})
    urls = api.ok_json("POST", f"models/{model_id}:getUploadEndpoint",
                       json={"filenameToSize": {f: str((directory / f).stat().st_size) for f in files}})
    for f, url in urls["filenameToSignedUrls"].items():
        r = fixtures.put_signed(url, (directory / f).read_bytes())
        assert r.status_code == 200, r.text
    api.ok_json("GET", f"models/{model_id}:validateUpload")
    return f"accounts/{api.account}/models/{model_id}"


def _state(api: fixtures.RawApi, dep_id: str) -> dict:
    return api.ok_json("GET", f"deployments/{dep_id}")


def _everything(api: fixtures.RawApi) -> dict:
    """What the store holds, by collection, without the fields the reconciler keeps updating."""
    out = {}
    for collection, key in (("models", "models"), ("deployments", "deployments"), ("deployedModels", "deployedModels")):
        out[collection] = sorted(i["name"] for i in api.list_all(collection, key))
    return out


def test_a_restarted_gateway_converges_to_the_same_replicas_and_adapters(gateway):
    api = gateway.api
    base = _upload(api, "tiny", ENGINE_FIXTURES / "tiny_llama", TINY_FILES)
    addon = _upload(api, "tiny-lora", ENGINE_FIXTURES / "lora/attn_only", LORA_FILES, base=base)
    api.ok_json("POST", "deployments", params={"deploymentId": "live"},
                json={"baseModel": base, "minReplicaCount": 2, "maxReplicaCount": 2, "enableAddons": True})
    _wait("READY with 2 replicas", lambda: _state(api, "live").get("replicaCount") == 2)
    dm = api.ok_json("POST", "deployedModels", json={"model": addon, "deployment": f"accounts/{api.account}/deployments/live"})
    dm_id = dm["name"].rsplit("/", 1)[1]
    _wait("the addon DEPLOYED", lambda: api.ok_json("GET", f"deployedModels/{dm_id}")["state"] == "DEPLOYED")

    def answers(client: OpenAI) -> tuple:
        ask = lambda m: client.completions.create(model=m, prompt="Hello", max_tokens=8, temperature=0).choices[0].text
        return ask(base), ask(addon)

    before = answers(gateway.openai())
    stored = _everything(api)
    old_pids = _replica_pids("tiny")
    assert len(old_pids) == 2, old_pids
    _assert_replicas_refuse_strangers(old_pids, base)

    gateway.stop(signal.SIGKILL)
    # Replicas do not outlive their gateway (they watch their parent), so nothing is orphaned.
    _wait("the old replicas to exit", lambda: not _replica_pids("tiny"), timeout=15)

    gateway.start()
    api = gateway.api
    _wait("READY with 2 replicas again",
          lambda: (lambda d: d["state"] == "READY" and d["replicaCount"] == 2)(_state(api, "live")), timeout=60)
    _wait("the addon DEPLOYED again", lambda: api.ok_json("GET", f"deployedModels/{dm_id}")["state"] == "DEPLOYED")
    # Converged, and it stays converged: two replicas, never more, for a few passes.
    for _ in range(15):
        pids = _replica_pids("tiny")
        assert len(pids) == 2 and not set(pids) & set(old_pids), pids
        time.sleep(0.2)
    assert _everything(api) == stored
    assert answers(gateway.openai()) == before


def test_a_changed_deployment_rolls_without_failing_a_request(gateway):
    api = gateway.api
    base = _upload(api, "tiny", ENGINE_FIXTURES / "tiny_llama", TINY_FILES)
    api.ok_json("POST", "deployments", params={"deploymentId": "roll"},
                json={"baseModel": base, "minReplicaCount": 1, "maxReplicaCount": 1})
    _wait("READY", lambda: _state(api, "roll")["state"] == "READY")
    old = _replica_pids("tiny")
    assert len(old) == 1

    client = gateway.openai()
    stop = threading.Event()
    served, failures = [0], []

    def traffic() -> None:
        while not stop.is_set():
            try:
                # Long enough that requests are in flight on the old replica when it is retired.
                client.completions.create(model=base, prompt="Hi", max_tokens=120, temperature=0, timeout=30,
                                          extra_body={"ignore_eos": True})
                served[0] += 1
            except Exception as e:  # noqa: BLE001 - every failure is reported
                failures.append(repr(e))

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.5)
        # A changed context length changes what the replica runs: it must be replaced.
        api.ok_json("PATCH", "deployments/roll", json={"maxContextLength": 128})
        seen_states, most_replicas = set(), 0
        deadline = time.monotonic() + 60
        while True:
            d = _state(api, "roll")
            seen_states.add(d["state"])
            most_replicas = max(most_replicas, len(_replica_pids("tiny")))
            pids = _replica_pids("tiny")
            if d["state"] == "READY" and len(pids) == 1 and pids != old:
                break
            assert time.monotonic() < deadline, f"the roll did not finish: {d}"
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert "UPDATING" in seen_states, seen_states
    assert most_replicas == 2, "the new replica was not started beside the old one"
    assert not failures, failures[:3]
    assert served[0] > 0


def test_num_peft_device_cached_reaches_the_replicas(gateway):
    """A deployment's numPeftDeviceCached is its replicas' hot-adapter limit: with 1, two
    adapters still both answer (each its own way, as when alone), one at a time hot."""
    api = gateway.api
    base = _upload(api, "tiny", ENGINE_FIXTURES / "tiny_llama", TINY_FILES)
    addons = [_upload(api, f"lora-{i}", ENGINE_FIXTURES / "lora" / f, LORA_FILES, base=base)
              for i, f in enumerate(("attn_only", "all_linear"))]
    api.ok_json("POST", "deployments", params={"deploymentId": "cached"},
                json={"baseModel": base, "minReplicaCount": 1, "maxReplicaCount": 1, "enableAddons": True,
                      "numPeftDeviceCached": 1})
    _wait("READY", lambda: _state(api, "cached")["state"] == "READY")
    for a in addons:
        dm = api.ok_json("POST", "deployedModels", json={"model": a, "deployment": f"accounts/{api.account}/deployments/cached"})
        dm_id = dm["name"].rsplit("/", 1)[1]
        _wait("DEPLOYED", lambda: api.ok_json("GET", f"deployedModels/{dm_id}")["state"] == "DEPLOYED")
    [pid] = _replica_pids("tiny")
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[cmdline.index(b"--max-hot-loras") + 1] == b"1", cmdline

    client = gateway.openai()
    ask = lambda m: client.completions.create(model=m, prompt="Hello", max_tokens=8, temperature=0).choices[0].text
    alone = [ask(a) for a in addons]
    assert alone[0] != alone[1]
    import concurrent.futures as cf
    with cf.ThreadPoolExecutor(8) as ex:
        together = list(ex.map(ask, addons * 4))
    assert together == alone * 4
    endpoint = cmdline[cmdline.index(b"--listen") + 1].decode()
    listed = requests.get(f"http://{endpoint}/v1/lora_adapters", headers=_replica_auth(pid), timeout=10).json()["adapters"]
    assert len(listed) == 2 and sum(a["hot"] for a in listed) == 1, listed


def test_merged_mode_replaces_the_merged_addon(gateway):
    """enableHotReloadLatestAddon: the addon is merged into the replica's weights, and loading
    another with replaceMergedAddon swaps it; the old DeployedModel is gone and requests for
    the new one answer in its own way."""
    api = gateway.api
    base = _upload(api, "tiny", ENGINE_FIXTURES / "tiny_llama", TINY_FILES)
    addons = [_upload(api, f"lora-{i}", ENGINE_FIXTURES / "lora" / f, LORA_FILES, base=base)
              for i, f in enumerate(("attn_only", "all_linear"))]
    api.ok_json("POST", "deployments", params={"deploymentId": "merged"},
                json={"baseModel": base, "minReplicaCount": 1, "maxReplicaCount": 1,
                      "enableHotReloadLatestAddon": True})
    _wait("READY", lambda: _state(api, "merged")["state"] == "READY")
    [pid] = _replica_pids("tiny")
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    endpoint = "http://" + cmdline[cmdline.index(b"--listen") + 1].decode()
    auth = _replica_auth(pid)
    client = gateway.openai()
    ask = lambda m: client.completions.create(model=m, prompt="Hello", max_tokens=8, temperature=0).choices[0].text
    base_answer = ask(base)

    answers, dm_ids = [], []
    for addon in addons:
        dm = api.ok_json("POST", "deployedModels", params={"replaceMergedAddon": "true"},
                         json={"model": addon, "deployment": f"accounts/{api.account}/deployments/merged"})
        dm_ids.append(dm["name"].rsplit("/", 1)[1])
        _wait("DEPLOYED", lambda: api.ok_json("GET", f"deployedModels/{dm_ids[-1]}")["state"] == "DEPLOYED")
        listed = requests.get(f"{endpoint}/v1/lora_adapters", headers=auth, timeout=10).json()
        assert listed["merged"]["name"] == addon and listed["adapters"] == [], listed
        answers.append(ask(addon))
    assert len({base_answer, *answers}) == 3, (base_answer, answers)
    assert api.get(f"deployedModels/{dm_ids[0]}").status_code == 404, "the replaced addon is still loaded"
    # While an addon is merged, the base alone is not served by this deployment.
    r = requests.post(f"{gateway.base_url}/inference/v1/completions", headers={"Authorization": f"Bearer {gateway.key}"},
                      json={"model": base, "prompt": "Hello", "max_tokens": 2}, timeout=30)
    assert r.status_code == 404 and "merged" in r.text, r.text
    # Unloading the merged addon restores the base, answering exactly as before.
    api.delete(f"deployedModels/{dm_ids[1]}")
    _wait("the base restored",
          lambda: requests.get(f"{endpoint}/v1/lora_adapters", headers=auth, timeout=10).json()["merged"] is None)
    assert ask(base) == base_answer


def test_an_idle_deployment_falls_to_zero_and_a_request_wakes_it(gateway):
    """With a 2 s scale-to-zero window: a request wakes the deployment from zero and is served;
    two idle seconds later its replica is gone; the next request wakes it again."""
    api = gateway.api
    base = _upload(api, "tiny", ENGINE_FIXTURES / "tiny_llama", TINY_FILES)
    api.ok_json("POST", "deployments", params={"deploymentId": "idle"},
                json={"baseModel": base, "minReplicaCount": 0, "maxReplicaCount": 1,
                      "autoscalingPolicy": {"scaleToZeroWindow": "2s"}})
    time.sleep(1)
    assert not _replica_pids("tiny") and (_state(api, "idle").get("replicaCount") or 0) == 0
    client = gateway.openai()
    for _ in range(2):
        out = client.completions.create(model=base, prompt="Hi", max_tokens=2, temperature=0, timeout=60)
        assert out.usage.completion_tokens == 2
        served = time.monotonic()
        assert len(_replica_pids("tiny")) == 1
        _wait("the replica to stop", lambda: not _replica_pids("tiny"), timeout=20)
        idle = time.monotonic() - served
        assert idle >= 1.5, f"scaled to zero after {idle:.1f}s, before its 2 s window"
        _wait("replicaCount 0", lambda: (_state(api, "idle").get("replicaCount") or 0) == 0)


def test_a_replica_killed_under_load_is_replaced_with_its_adapter_and_no_request_hangs(gateway):
    api = gateway.api
    base = _upload(api, "tiny", ENGINE_FIXTURES / "tiny_llama", TINY_FILES)
    addon = _upload(api, "tiny-lora", ENGINE_FIXTURES / "lora/attn_only", LORA_FILES, base=base)
    api.ok_json("POST", "deployments", params={"deploymentId": "load"},
                json={"baseModel": base, "minReplicaCount": 1, "maxReplicaCount": 1, "enableAddons": True})
    _wait("READY", lambda: _state(api, "load")["state"] == "READY")
    dm = api.ok_json("POST", "deployedModels", json={"model": addon, "deployment": f"accounts/{api.account}/deployments/load"})
    dm_id = dm["name"].rsplit("/", 1)[1]
    _wait("DEPLOYED", lambda: api.ok_json("GET", f"deployedModels/{dm_id}")["state"] == "DEPLOYED")
    client = gateway.openai()
    ask = lambda m: client.completions.create(model=m, prompt="Hello", max_tokens=8, temperature=0, timeout=30).choices[0].text
    expected = {base: ask(base), addon: ask(addon)}

    stop = threading.Event()
    outcomes: list = []  # (seconds, ok)

    def traffic(model: str) -> None:
        while not stop.is_set():
            t = time.monotonic()
            try:
                ok = ask(model) == expected[model]
            except Exception:  # noqa: BLE001 - a request cut by the kill may fail; it must not hang
                ok = False
            outcomes.append((time.monotonic() - t, ok))

    workers = [threading.Thread(target=traffic, args=(m,)) for m in (base, addon, base, addon)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.5)
        [pid] = _replica_pids("tiny")
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        # Recovered: a new replica answers the adapter's requests as before, within 10 s.
        while True:
            try:
                if ask(addon) == expected[addon]:
                    break
            except Exception:  # noqa: BLE001 - retried until the deadline
                pass
            assert time.monotonic() - killed < 10, "the adapter was not served again within 10 s"
            time.sleep(0.1)
        recovered = time.monotonic() - killed
        time.sleep(0.5)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)
    assert not any(w.is_alive() for w in workers), "a client request hung"
    assert recovered < 10
    assert max(d for d, _ in outcomes) < 30, "a request took its whole timeout"
    failed = sum(1 for _, ok in outcomes if not ok)
    assert failed <= 2 * len(workers) and len(outcomes) > 20, (failed, len(outcomes))
    assert len(_replica_pids("tiny")) == 1


def test_a_second_local_gateway_on_the_same_store_is_refused(gateway, tmp_path):
    """Two --runtime local gateways on one store would both start replicas for every
    deployment: the second is refused at start, naming the first."""
    other = tmp_path / "other"
    other.mkdir()
    db = gateway.store
    p = subprocess.run([str(hearth_binary()), "serve", "--listen", f"127.0.0.1:{_free_port()}", "--data-dir", str(other),
                        "--runtime", "local", "--database-url", db], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0, p.stderr
    assert "managed by the gateway at" in p.stderr and str(gateway.data_dir.resolve()) in p.stderr, p.stderr
    # The first gateway still manages its deployments.
    api = gateway.api
    base = _upload(api, "tiny", ENGINE_FIXTURES / "tiny_llama", TINY_FILES)
    api.ok_json("POST", "deployments", params={"deploymentId": "still"},
                json={"baseModel": base, "minReplicaCount": 1, "maxReplicaCount": 1})
    _wait("READY", lambda: _state(api, "still")["state"] == "READY")


def test_a_gateway_that_lost_its_lease_stops_its_replicas(tmp_path):
    """A gateway that makes no reconciler pass for longer than its runtime lease (here it is
    stopped with SIGSTOP past a 2 s lease) loses the store to another gateway, which starts
    replicas of its own. Once it runs again it finds the lease taken and stops its replicas
    instead of serving duplicates; the deployment goes on answering through the new gateway."""
    a = Gateway(tmp_path / "a", extra=["--runtime-lease-ttl", "2"])
    b = None
    a.start()
    try:
        api = a.api
        base = _upload(api, "tiny", ENGINE_FIXTURES / "tiny_llama", TINY_FILES)
        api.ok_json("POST", "deployments", params={"deploymentId": "handover"},
                    json={"baseModel": base, "minReplicaCount": 1, "maxReplicaCount": 1})
        _wait("READY", lambda: _state(api, "handover")["state"] == "READY")
        (old,) = _replica_pids("tiny")

        a.proc.send_signal(signal.SIGSTOP)
        time.sleep(3)
        # The new gateway shares the store and has the artifacts (as a standby with the same
        # volume would), and the same key and account, which the store already holds.
        b = Gateway(tmp_path / "b", db_url=a.store, extra=["--runtime-lease-ttl", "2"])
        b.key, b.account = a.key, a.account
        shutil.copytree(a.data_dir / "artifacts", b.data_dir / "artifacts")
        b.start()
        new = _wait("the new gateway's replica", lambda: [p for p in _replica_pids("tiny") if p != old])
        assert old in _replica_pids("tiny"), "the stopped gateway's replica runs on until it finds out"

        a.proc.send_signal(signal.SIGCONT)
        _wait("the old gateway's replica to stop", lambda: old not in _replica_pids("tiny"), timeout=30)
        assert _replica_pids("tiny") == new
        assert "lost the runtime lease" in a.log.read_text()
        out = b.openai().completions.create(model=base, prompt="Hi", max_tokens=2, temperature=0, timeout=60)
        assert out.usage.completion_tokens == 2
    finally:
        for g in (a, b):
            if g is not None:
                if g.proc and g.proc.poll() is None:
                    g.proc.send_signal(signal.SIGCONT)
                g.stop(signal.SIGKILL)
        _wait("both gateways' replicas to exit", lambda: not _replica_pids("tiny"), timeout=15)


def _write_junk_into_row(g: Gateway, kind: str, dep_id: str) -> None:
    """Junk over a stored row, straight in the database, as a failing disk or a hand would."""
    junk = "\u0000 not a deployment"
    if g.db_url:
        psql = shutil.which("psql") or str(next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/psql")))))
        sql = f"UPDATE objects SET body = '{junk[1:]}' WHERE kind = '{kind}' AND account = '{g.account}' AND id = '{dep_id}'"
        subprocess.run([psql, g.db_url, "-qc", sql], check=True, capture_output=True, timeout=30)
    else:
        import sqlite3
        with sqlite3.connect(str(g.data_dir / "hearth.db"), timeout=30) as db:
            changed = db.execute("UPDATE objects SET body = ? WHERE kind = ? AND account = ? AND id = ?",
                                 (junk, kind, g.account, dep_id)).rowcount
            assert changed == 1


def test_a_corrupted_record_leaves_every_replica_running_and_its_status_says_why(gateway, tmp_path):
    api = gateway.api
    base = _upload(api, "tiny", ENGINE_FIXTURES / "tiny_llama", TINY_FILES)
    for dep_id in ("good", "bad"):
        api.ok_json("POST", "deployments", params={"deploymentId": dep_id},
                    json={"baseModel": base, "minReplicaCount": 1, "maxReplicaCount": 2})
    for dep_id in ("good", "bad"):
        _wait(f"{dep_id} READY", lambda: _state(api, dep_id)["state"] == "READY")
    replicas = _replica_pids("tiny")
    assert len(replicas) == 2

    _write_junk_into_row(gateway, "deployments", "bad")
    bad = _wait("the status to say why", lambda: (lambda d: d if d.get("status", {}).get("code") == "DATA_LOSS" else None)(
        _state(api, "bad")), timeout=30)
    assert "unreadable" in bad["status"]["message"], bad
    # Nothing else changed: the listing still works, the other deployment still follows its
    # spec, and no replica was stopped, several resyncs later.
    assert sorted(d["name"].rsplit("/", 1)[1] for d in api.list_all("deployments", "deployments")) == ["bad", "good"]
    api.ok_json("PATCH", "deployments/good:scale", json={"replicaCount": 2})
    _wait("good at 2 replicas", lambda: _state(api, "good")["replicaCount"] == 2)
    assert set(replicas) <= set(_replica_pids("tiny")), "a replica of the corrupted deployment was stopped"
    # Requests cannot be routed by a record that cannot be read: refused at once, saying why.
    r = requests.post(f"{gateway.base_url}/inference/v1/completions", headers={"Authorization": f"Bearer {gateway.key}"},
                      json={"model": f"{base}#accounts/{gateway.account}/deployments/bad", "prompt": "Hello",
                            "max_tokens": 4}, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["code"] == "DATA_LOSS", r.text
    assert "unreadable" in r.json()["error"]["message"]
    # A hard delete still removes it, and then its replica goes.
    api.ok_json("DELETE", "deployments/bad", params={"hard": "true"})
    _wait("the corrupted deployment's replica to stop", lambda: len(_replica_pids("tiny")) == 2)
