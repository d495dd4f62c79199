"""hearth on Kubernetes: ``hearth serve --runtime kubernetes`` against the real kube-apiserver and
etcd of ``scripts/dev-cluster``, whose test kubelet runs the pods as local processes on their own
loopback addresses. The gateway talks to the API server only (a watch on its pods, creates and
deletes), never to the kubelet; the pods fetch their model and adapters through the gateway's
signed manifest URLs into their own cache volume, never from the gateway's artifact directory,
and derive their token from their address and the key in a Secret.

Scenarios: a deployment becomes pods that become ready and serve; LoRA addons reach every pod,
one started later included; a pod whose engine is killed is replaced and requests resume; a model
that cannot load fails its deployment with the engine's own reason; a hard delete leaves no pod;
the manifest route refuses an unsigned or altered URL. The manifests in ``deploy/kubernetes`` pass
the API server's dry run, and a gateway holding only the RBAC they grant runs deployments. Two
gateways on one store: both serve
the API and route inference, model files live in S3 (moto) and neither gateway's disk is the
other's, one runs the reconciler, a request at the other wakes a deployment from zero, and when
the leader is killed with -9 the other takes over within 15 s with no duplicate pod and nothing
lost."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml
from openai import OpenAI

import fixtures
from conftest import _SERVER_ENV_VARS, _free_port, _serve, database_url, hearth_binary, make_client
from test_dev_cluster import Kube, kube  # noqa: F401 - the cluster fixture

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "crates/hearth-engine/tests/fixtures/tiny_llama"
SMOLLM2 = ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
LORA = ROOT / "crates/hearth-engine/tests/fixtures/lora"
SELECTOR = "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dhearth"


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """A hot-load bucket folder: v1 the default model's GGUF, v2 the same with its attention
    norms scaled (same shape and tokenizer, other answers)."""
    root = tmp_path_factory.mktemp("kube-versions")
    (root / "v1").mkdir()
    (root / "v1" / "model.gguf").symlink_to(SMOLLM2)
    (root / "v2").mkdir()
    (root / "v2" / "model.gguf").write_bytes(fixtures.perturb_gguf_norms(SMOLLM2.read_bytes()))
    return root


@pytest.fixture(scope="module")
def gateway(kube, versions):  # noqa: F811 - the fixture imported above
    yield from _serve("kubernetes", {"KUBECONFIG": kube.kubeconfig, "HEARTH_KUBE_IMAGE": "hearth",
                                     "HEARTH_RECONCILE_INTERVAL_MS": "500", "HEARTH_HOT_LOAD_DIRS": str(versions),
                                     "HEARTH_KUBE_NODE_SELECTORS": "NVIDIA_H100_80GB=hearth.dev/gpu=h100"})


@pytest.fixture(scope="module")
def client(gateway):
    return make_client(gateway)


def pods(kube: Kube, deployment: str | None = None) -> list:
    items = kube.call("GET", f"/api/v1/namespaces/default/pods?{SELECTOR}").json()["items"]
    return [p for p in items if deployment is None
            or p["metadata"]["annotations"].get("hearth.dev/deployment") == deployment]


def ready_pods(kube: Kube, deployment: str) -> list:
    return [p for p in pods(kube, deployment) if not p["metadata"].get("deletionTimestamp")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]


def wait(check, what: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.3)


def upload_tiny(client, model_id: str) -> str:
    client.models.create(model_id=model_id, model={"kind": "HF_BASE_MODEL", "baseModelDetails": {}})
    fixtures.upload_model_files(client, model_id, {f: (TINY / f).read_bytes() for f in TINY_FILES})
    client.models.validate_upload(model_id)
    return client.models.get(model_id).name


def upload_addon(client, base: str, model_id: str, fixture: str) -> str:
    """The engine's LoRA fixture ``fixture`` as a READY addon of ``base``; returns its name."""
    client.models.create(model_id=model_id, model={"kind": "HF_PEFT_ADDON", "peftDetails": {"baseModel": base}})
    fixtures.upload_model_files(client, model_id, {f: (LORA / fixture / f).read_bytes()
                                                  for f in ("adapter_config.json", "adapter_model.safetensors")})
    client.models.validate_upload(model_id)
    return client.models.get(model_id).name


def wait_ready_pods(kube: Kube, deployment: str, n: int, timeout: float = 120) -> list:
    return wait(lambda: (lambda r: r if len(r) == n else None)(ready_pods(kube, deployment)),
                f"{n} ready pods", timeout)


def hard_delete(client, kube: Kube, dep_id: str, deployment: str):
    """Deletes the deployment for good and waits for its pods to go."""
    client.deployments.delete(dep_id, hard=True, ignore_checks=True)
    wait(lambda: not pods(kube, deployment), "every pod gone", 60)


def replica_token(kube: Kube, pod: dict, endpoint: str) -> str:
    """What a gateway presents to a pod: the HMAC of its endpoint under the key in the Secret."""
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    name = env["HEARTH_ENGINE_TOKEN_KEY"]["valueFrom"]["secretKeyRef"]["name"]
    secret = kube.call("GET", f"/api/v1/namespaces/default/secrets/{name}").json()
    key = bytes.fromhex(base64.b64decode(secret["data"]["key"]).decode())
    return hmac.new(key, b"hearth replica\n" + endpoint.encode(), hashlib.sha256).hexdigest()


def adapters_on(kube: Kube, pod: dict) -> set:
    endpoint = f"http://{pod['status']['podIP']}:8080"
    assert requests.get(endpoint + "/v1/lora_adapters", timeout=10).status_code == 401, "a pod requires its token"
    r = requests.get(endpoint + "/v1/lora_adapters", timeout=10,
                     headers={"Authorization": f"Bearer {replica_token(kube, pod, endpoint)}"})
    assert r.status_code == 200, r.text
    return {a["name"] for a in r.json()["adapters"]}


def test_a_deployment_runs_as_pods_that_fetch_their_files_serve_addons_and_are_replaced(gateway, client, kube, uid):
    base = upload_tiny(client, uid("kube-tiny"))
    dep_id = uid("kube")
    dep_name = f"accounts/{gateway.account}/deployments/{dep_id}"
    client.deployments.create(base_model=base, deployment_id=dep_id, min_replica_count=1, max_replica_count=1,
                              enable_addons=True)
    fixtures.wait_deployment(client, dep_id, lambda d: d.state == "READY", "READY", timeout=120)
    [pod] = wait(lambda: ready_pods(kube, dep_name), "a ready pod")
    meta, container = pod["metadata"], pod["spec"]["containers"][0]
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "hearth" and meta["labels"]["hearth.dev/fingerprint"]
    assert pod["spec"]["restartPolicy"] == "Never" and container["image"] == "hearth"
    # Owned by the installation's Lease: deleting it has the garbage collector remove the pods.
    [owner] = meta["ownerReferences"]
    lease = kube.call("GET", f"/apis/coordination.k8s.io/v1/namespaces/default/leases/{owner['name']}").json()
    assert owner["kind"] == "Lease" and owner["name"] == f"hearth-{meta['labels']['hearth.dev/installation']}"
    assert owner["uid"] == lease["metadata"]["uid"]
    # The model comes through a signed manifest URL, never the gateway's directory, and the
    # pod's key from a Secret, never the pod spec.
    args = " ".join(container["args"])
    assert "/replica-files/" in args and str(gateway.data_dir) not in args, args
    env = {e["name"]: e for e in container["env"]}
    secret = env["HEARTH_ENGINE_TOKEN_KEY"]["valueFrom"]["secretKeyRef"]["name"]
    assert secret == f"hearth-replica-token-key-{meta['labels']['hearth.dev/installation']}"
    assert "value" not in env["HEARTH_ENGINE_TOKEN_KEY"]
    assert container["resources"]["requests"]["memory"].endswith("Mi")

    oa = OpenAI(api_key=gateway.api_key, base_url=f"{gateway.base_url}/inference/v1", max_retries=0)

    def complete(model: str) -> str:
        return oa.completions.create(model=model, prompt="Hello", max_tokens=6, temperature=0, timeout=60).choices[0].text

    base_text = complete(base)
    chat = oa.chat.completions.create(model=base, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                      temperature=0)
    assert chat.usage.completion_tokens == 4

    # Two addons, fetched by the pod through manifest URLs too: DEPLOYED, each its own answer.
    addons = [upload_addon(client, base, uid(f"kube-{f.replace('_', '-')}"), f) for f in ("attn_only", "all_linear")]
    dms = [client.lora.load(model=a, deployment=dep_name) for a in addons]
    for dm in dms:
        wait(lambda: client.lora.get(dm.name.rsplit("/", 1)[1]).state == "DEPLOYED", f"{dm.name} DEPLOYED", 60)
    texts = [complete(a) for a in addons]
    assert len({base_text, *texts}) == 3, (base_text, texts)
    assert adapters_on(kube, pod) == set(addons)

    # A second pod, started later, gets the addons too.
    client.deployments.update(dep_id, base_model=base, min_replica_count=2, max_replica_count=2)
    two = wait_ready_pods(kube, dep_name, 2)
    wait(lambda: all(adapters_on(kube, p) == set(addons) for p in two), "the addons on both pods", 60)
    assert {p["status"]["podIP"] for p in two} == {p["status"]["podIP"] for p in two} and len(
        {p["status"]["podIP"] for p in two}) == 2

    # A pod's engine killed: the pod fails, a new one replaces it, requests resume within 10 s.
    victim = two[0]
    out = subprocess.run(["pgrep", "-f", f"engine --model http://.*/replica-files/{gateway.account}/"],
                         capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out
    for pid in pids:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"HEARTH_ENGINE_ENDPOINT=http://{victim['status']['podIP']}:8080".encode() in f.read():
                os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    answers = [complete(base) for _ in range(6)]
    assert answers == [base_text] * 6 and time.monotonic() - killed < 10
    wait(lambda: victim["metadata"]["name"] not in {p["metadata"]["name"] for p in ready_pods(kube, dep_name)}
         and len(ready_pods(kube, dep_name)) == 2, "the killed pod replaced", 60)
    wait(lambda: all(adapters_on(kube, p) == set(addons) for p in ready_pods(kube, dep_name)),
         "the addons on the replacement", 60)
    fixtures.wait_deployment(client, dep_id, lambda d: d.state == "READY" and d.replica_count == 2, "READY at 2")

    # A hard delete leaves no pod.
    hard_delete(client, kube, dep_id, dep_name)


def test_merged_mode_merges_the_addon_into_the_pod(gateway, client, kube, uid):
    base = upload_tiny(client, uid("kube-merge"))
    dep_id = uid("kube-merge")
    dep_name = f"accounts/{gateway.account}/deployments/{dep_id}"
    client.deployments.create(base_model=base, deployment_id=dep_id, min_replica_count=1, max_replica_count=1,
                              enable_hot_reload_latest_addon=True)
    fixtures.wait_deployment(client, dep_id, lambda d: d.state == "READY", "READY", timeout=120)
    addon = upload_addon(client, base, uid("kube-merge-lora"), "all_linear")
    dm = client.lora.load(model=addon, deployment=dep_name, replace_merged_addon=True)
    wait(lambda: client.lora.get(dm.name.rsplit("/", 1)[1]).state == "DEPLOYED", "merged addon DEPLOYED", 60)
    [pod] = ready_pods(kube, dep_name)
    endpoint = f"http://{pod['status']['podIP']}:8080"
    listed = requests.get(endpoint + "/v1/lora_adapters", timeout=10,
                          headers={"Authorization": f"Bearer {replica_token(kube, pod, endpoint)}"}).json()
    assert listed["merged"]["name"] == addon and listed["adapters"] == [], listed
    oa = OpenAI(api_key=gateway.api_key, base_url=f"{gateway.base_url}/inference/v1", max_retries=0)
    assert oa.completions.create(model=addon, prompt="Hi", max_tokens=3, temperature=0).usage.completion_tokens == 3
    hard_delete(client, kube, dep_id, dep_name)


def test_a_hot_loaded_version_reaches_every_pod_and_new_pods_start_on_it(gateway, client, kube, uid, versions):
    base_id = uid("kube-smol")
    client.models.create(model_id=base_id, model={"kind": "HF_BASE_MODEL", "baseModelDetails": {}})
    fixtures.upload_model_files(client, base_id, {"model.gguf": SMOLLM2.read_bytes()})
    client.models.validate_upload(base_id)
    base = client.models.get(base_id).name
    dep_id = uid("kube-hot")
    dep_name = f"accounts/{gateway.account}/deployments/{dep_id}"
    client.deployments.create(base_model=base, deployment_id=dep_id, min_replica_count=1, max_replica_count=1,
                              enable_hot_load=True, hot_load_bucket_url=f"file://{versions}", target_model_version="v1")
    fixtures.wait_deployment(client, dep_id, lambda d: d.state == "READY" and d.active_model_version == "v1",
                             "v1 active", 120)
    oa = OpenAI(api_key=gateway.api_key, base_url=f"{gateway.base_url}/inference/v1", max_retries=0)

    def answer() -> str:
        r = oa.chat.completions.create(model=f"{base}#{dep_name}", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=12, temperature=0)
        return r.choices[0].message.content

    v1 = answer()
    [first] = ready_pods(kube, dep_name)
    client.deployments.update(dep_id, base_model=base, target_model_version="v2")
    fixtures.wait_deployment(client, dep_id, lambda d: d.active_model_version == "v2", "v2 active", 120)
    v2 = answer()
    assert v2 != v1
    assert [p["metadata"]["name"] for p in ready_pods(kube, dep_name)] == [first["metadata"]["name"]], "swapped in place"
    # A pod started now starts on v2, fetched through its version manifest.
    client.deployments.update(dep_id, base_model=base, min_replica_count=2, max_replica_count=2)
    two = wait_ready_pods(kube, dep_name, 2)
    new = next(p for p in two if p["metadata"]["name"] != first["metadata"]["name"])
    args = new["spec"]["containers"][0]["args"]
    assert "/replica-versions/" in args[args.index("--model") + 1] and args[args.index("--model-version") + 1] == "v2"
    fixtures.wait_deployment(client, dep_id, lambda d: d.state == "READY" and d.active_model_version == "v2",
                             "READY on v2 with two pods", 60)
    assert {answer() for _ in range(4)} == {v2}
    hard_delete(client, kube, dep_id, dep_name)


def test_a_rolling_update_under_load_fails_no_request(gateway, client, kube, uid):
    import threading
    base = upload_tiny(client, uid("kube-roll"))
    dep_id = uid("kube-roll")
    dep_name = f"accounts/{gateway.account}/deployments/{dep_id}"
    client.deployments.create(base_model=base, deployment_id=dep_id, min_replica_count=2, max_replica_count=2)
    fixtures.wait_deployment(client, dep_id, lambda d: d.state == "READY" and d.replica_count == 2, "READY", 120)
    before = {p["metadata"]["name"] for p in pods(kube, dep_name)}
    oa = OpenAI(api_key=gateway.api_key, base_url=f"{gateway.base_url}/inference/v1", max_retries=0)
    results, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                r = oa.completions.create(model=base, prompt="Hello", max_tokens=8, temperature=0, timeout=60)
                results.append(("ok", r.choices[0].text))
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                results.append(("error", repr(e)))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        # Another context length is another replica spec: every pod is replaced, one by one.
        client.deployments.update(dep_id, base_model=base, max_context_length=1024)
        wait(lambda: (lambda now: len(now) == 2 and not now & before)(
            {p["metadata"]["name"] for p in ready_pods(kube, dep_name)}), "both pods replaced", 120)
        fixtures.wait_deployment(client, dep_id, lambda d: d.state == "READY", "READY after the roll", 60)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    errors = [r for r in results if r[0] == "error"]
    assert not errors and len(results) > 10, (len(results), errors[:3])
    assert len({text for _, text in results}) == 1, "every answer the same model's"
    hard_delete(client, kube, dep_id, dep_name)


def test_a_model_that_cannot_load_fails_its_deployment_with_the_engines_reason(gateway, client, kube, uid):
    # Damaged on disk after validation, outside any API (as a failing disk would): the pod
    # fetches what is there, fails to load it, and its last words are the deployment's status.
    model_id = uid("kube-broken")
    upload_tiny(client, model_id)
    weights = gateway.data_dir / "artifacts" / gateway.account / "models" / model_id / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    dep_id = uid("kube-broken")
    client.deployments.create(base_model=f"accounts/{gateway.account}/models/{model_id}", deployment_id=dep_id,
                              min_replica_count=1, max_replica_count=1)
    d = fixtures.wait_deployment(client, dep_id, lambda d: d.state == "FAILED", "FAILED", timeout=120)
    assert "engine exited" in d.status.message and "model.safetensors" in d.status.message, d.status
    hard_delete(client, kube, dep_id, f"accounts/{gateway.account}/deployments/{dep_id}")


def test_accelerators_become_gpu_resources_on_the_nodes_of_their_type(gateway, client, kube, uid):
    base = upload_tiny(client, uid("kube-gpu"))
    dep_id = uid("kube-gpu")
    dep_name = f"accounts/{gateway.account}/deployments/{dep_id}"
    client.deployments.create(base_model=base, deployment_id=dep_id, min_replica_count=1, max_replica_count=1,
                              accelerator_type="NVIDIA_H100_80GB", accelerator_count=2)
    [pod] = wait(lambda: pods(kube, dep_name), "a pod")
    spec = pod["spec"]
    resources = spec["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "2" and resources["requests"]["nvidia.com/gpu"] == "2"
    assert spec["nodeSelector"] == {"hearth.dev/gpu": "h100"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    # Another count is another replica spec: the pod is replaced.
    client.deployments.update(dep_id, base_model=base, accelerator_count=1)
    wait(lambda: [p for p in pods(kube, dep_name) if not p["metadata"].get("deletionTimestamp")
                  and p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"], "a pod with 1 GPU")
    hard_delete(client, kube, dep_id, dep_name)


def test_the_manifest_route_refuses_unsigned_and_altered_urls(gateway, client, uid):
    base = upload_tiny(client, uid("kube-manifest"))
    account, model_id = base.split("/")[1], base.split("/")[3]
    url = f"{gateway.base_url}/replica-files/{account}/{model_id}"
    assert "signature" in fixtures.assert_rpc_error(requests.get(url, timeout=10), 403, 7)["message"]
    expires = int(time.time()) + 600
    r = requests.get(f"{url}?expires={expires}&sig={'0' * 64}", timeout=10)
    assert "signature" in fixtures.assert_rpc_error(r, 403, 7)["message"]


def start_gateway(kube: Kube, workdir: Path, name: str, db: str | None, account: str, key: str, s3: str):
    port = _free_port()
    log = workdir / f"{name}.log"
    data = workdir / f"data-{name}"
    data.mkdir()
    cmd = [str(hearth_binary()), "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data),
           "--api-key", key, "--account", account, "--runtime", "kubernetes", "--reconcile-interval-ms", "500",
           "--min-scale-to-zero-window", "5", "--artifact-store", "s3://hearth-artifacts/pair"]
    if db:
        cmd += ["--database-url", db]
    env = {k: v for k, v in os.environ.items() if k not in _SERVER_ENV_VARS}
    env.update(KUBECONFIG=kube.kubeconfig, HEARTH_KUBE_IMAGE="hearth", RUST_BACKTRACE="1", AWS_ENDPOINT_URL=s3,
               AWS_REGION="us-east-1", AWS_ACCESS_KEY_ID="hearth", AWS_SECRET_ACCESS_KEY="hearth-secret")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    g = SimpleNamespace(base_url=f"http://127.0.0.1:{port}", api_key=key, account=account, proc=proc, log=log,
                        data=data)
    wait(lambda: proc.poll() is not None or requests.get(g.base_url + "/health", timeout=2).ok
         if _listening(port) else proc.poll() is not None, f"gateway {name} healthy", 60)
    assert proc.poll() is None, log.read_text()[-3000:]
    return g


def _listening(port: int) -> bool:
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def leads(g) -> bool:
    return "holds the runtime lease" in g.log.read_text()


@pytest.fixture(scope="module")
def s3():
    yield from fixtures.moto_s3()


def test_two_gateways_share_the_work_and_one_takes_over_when_the_leader_dies(kube, s3, tmp_path):  # noqa: F811
    # One store, one bucket for model files, and no disk in common.
    if not os.environ.get("HEARTH_DATABASE_URL"):
        pytest.skip("several gateways share a PostgreSQL store: this runs in the suite's PostgreSQL pass")
    endpoint, bucket = s3
    bucket.create_bucket(Bucket="hearth-artifacts")
    db = database_url("kubernetes")
    account, key = "kube-pair-" + secrets.token_hex(3), "hk-" + secrets.token_hex(16)
    a = start_gateway(kube, tmp_path, "a", db, account, key, endpoint)
    wait(lambda: leads(a), "gateway a leading", 30)
    b = start_gateway(kube, tmp_path, "b", db, account, key, endpoint)
    try:
        ca, cb = make_client(a), make_client(b)
        # Uploaded and validated through b; a (which makes the pods, whose manifests point at
        # it) has never seen the files: it gets them from the bucket.
        base = upload_tiny(cb, "kube-pair-tiny")
        stored = {o["Key"] for o in bucket.list_objects_v2(Bucket="hearth-artifacts")["Contents"]}
        assert {f"pair/{account}/models/kube-pair-tiny/{f}" for f in TINY_FILES + [".sealed"]} == stored, stored
        assert not (a.data / "artifacts" / account / "models" / "kube-pair-tiny").exists()
        dep_name = f"accounts/{account}/deployments/pair"
        ca.deployments.create(base_model=base, deployment_id="pair", min_replica_count=1, max_replica_count=1)
        fixtures.wait_deployment(cb, "pair", lambda d: d.state == "READY", "READY (read at b)", timeout=120)
        assert not leads(b)

        def complete(g, model=base) -> str:
            oa = OpenAI(api_key=g.api_key, base_url=f"{g.base_url}/inference/v1", max_retries=0)
            return oa.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0, timeout=90).choices[0].text

        # Both gateways route (b follows the pods it sees).
        text = complete(a)
        assert wait(lambda: _try(lambda: complete(b)), "b routing", 20) == text

        # Scaled to zero, woken by a request that arrives at the follower.
        cb.deployments.create(base_model=base, deployment_id="sleepy", min_replica_count=0, max_replica_count=1)
        sleepy = f"accounts/{account}/deployments/sleepy"
        time.sleep(2)
        assert not pods(kube, sleepy)
        woke = time.monotonic()
        assert complete(b, f"{base}#{sleepy}") == text
        waking = time.monotonic() - woke
        assert waking < 60
        assert len(pods(kube, sleepy)) == 1

        # The leader killed with -9: b takes over (the installation's Lease) within 15 s.
        before = {d.name for d in cb.deployments.list()}
        models_before = {m.name for m in cb.models.list()}
        a.proc.kill()
        killed = time.monotonic()
        wait(lambda: leads(b), "gateway b leading", 20)
        took = time.monotonic() - killed
        assert took < 15, took
        leases = kube.call("GET", "/apis/coordination.k8s.io/v1/namespaces/default/leases").json()["items"]
        holders = [lease["spec"].get("holderIdentity", "") for lease in leases]
        assert any(h.endswith(f":{b.proc.pid}") for h in holders), holders
        print(f"\nwoken from zero through the follower in {waking:.1f} s; leader taken over {took:.1f} s after kill -9")
        # It acts: a change made now is carried out; nothing was duplicated or lost.
        cb.deployments.update("pair", base_model=base, min_replica_count=2, max_replica_count=2)
        wait(lambda: len(ready_pods(kube, dep_name)) == 2, "pair at two pods", 120)
        time.sleep(2)
        assert len(pods(kube, dep_name)) == 2, [p["metadata"]["name"] for p in pods(kube, dep_name)]
        assert len(pods(kube, sleepy)) <= 1
        assert {d.name for d in cb.deployments.list()} == before
        assert {m.name for m in cb.models.list()} == models_before
        assert complete(b) == text

        for dep in ("pair", "sleepy"):
            cb.deployments.delete(dep, hard=True, ignore_checks=True)
        wait(lambda: not pods(kube, dep_name) and not pods(kube, sleepy), "every pod gone", 60)
        # A deleted model leaves nothing in the bucket.
        cb.models.delete("kube-pair-tiny")
        assert not bucket.list_objects_v2(Bucket="hearth-artifacts").get("Contents")
    finally:
        for g in (a, b):
            if g.proc.poll() is None:
                g.proc.terminate()
                g.proc.wait(timeout=20)


def _try(f):
    try:
        return f()
    except Exception:  # noqa: BLE001 - retried until it works or the wait ends
        return None


DEPLOY = ROOT / "deploy/kubernetes"
COLLECTIONS = {
    ("v1", "ServiceAccount"): "/api/v1/namespaces/{ns}/serviceaccounts",
    ("v1", "Service"): "/api/v1/namespaces/{ns}/services",
    ("rbac.authorization.k8s.io/v1", "Role"): "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
    ("apps/v1", "Deployment"): "/apis/apps/v1/namespaces/{ns}/deployments",
}


def manifests() -> list:
    """The kustomize base, rendered: its resources with its labels added."""
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    labels = {k: v for entry in kustomization.get("labels", []) for k, v in entry["pairs"].items()}
    docs = [d for r in kustomization["resources"] for d in yaml.safe_load_all((DEPLOY / r).read_text()) if d]
    for d in docs:
        d["metadata"].setdefault("labels", {}).update(labels)
    return docs


def apply(kube: Kube, ns: str, doc: dict, dry_run: bool):
    path = COLLECTIONS[(doc["apiVersion"], doc["kind"])].format(ns=ns) + ("?dryRun=All" if dry_run else "")
    r = kube.call("POST", path, doc)
    assert r.status_code in (200, 201), f"{doc['kind']} {doc['metadata']['name']}: {r.status_code} {r.text[:500]}"


def test_the_manifests_apply_and_a_gateway_works_with_only_their_rbac(kube, tmp_path, uid):  # noqa: F811
    ns = "hearth-rbac"
    kube.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    docs = manifests()
    assert {d["kind"] for d in docs} == {"ServiceAccount", "Role", "RoleBinding", "Deployment", "Service"}
    for d in docs:
        apply(kube, ns, d, dry_run=True)
    for d in docs:
        if d["kind"] in ("ServiceAccount", "Role", "RoleBinding"):
            apply(kube, ns, d, dry_run=False)
    r = kube.call("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/hearth-gateway/token",
                  {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                   "spec": {"expirationSeconds": 3600}})
    assert r.status_code == 201, r.text
    token = r.json()["status"]["token"]
    as_gateway = {"Authorization": f"Bearer {token}"}
    # Only its namespace, only what the Role names.
    assert requests.get(f"{kube.server}/api/v1/namespaces/default/pods", headers=as_gateway,
                        verify=kube.verify, timeout=10).status_code == 403
    assert requests.get(f"{kube.server}/api/v1/namespaces/{ns}/secrets", headers=as_gateway,
                        verify=kube.verify, timeout=10).status_code == 403
    kubeconfig = tmp_path / "gateway.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "gateway",
        "clusters": [{"name": "dev", "cluster": {"server": kube.server, "certificate-authority": kube.verify}}],
        "users": [{"name": "gateway", "user": {"token": token}}],
        "contexts": [{"name": "gateway", "context": {"cluster": "dev", "user": "gateway", "namespace": ns}}],
    }))
    served = _serve("kubernetes", {"KUBECONFIG": str(kubeconfig), "HEARTH_KUBE_IMAGE": "hearth"})
    gateway = next(served)
    try:
        client = make_client(gateway)
        base = upload_tiny(client, uid("rbac-tiny"))
        dep_id = uid("rbac")
        client.deployments.create(base_model=base, deployment_id=dep_id, min_replica_count=1, max_replica_count=1)
        fixtures.wait_deployment(client, dep_id, lambda d: d.state == "READY", "READY", timeout=120)
        listed = kube.call("GET", f"/api/v1/namespaces/{ns}/pods?{SELECTOR}").json()["items"]
        assert len(listed) == 1, [p["metadata"]["name"] for p in listed]
        oa = OpenAI(api_key=gateway.api_key, base_url=f"{gateway.base_url}/inference/v1", max_retries=0)
        assert oa.completions.create(model=base, prompt="Hi", max_tokens=3, temperature=0).usage.completion_tokens == 3
        client.deployments.delete(dep_id, hard=True, ignore_checks=True)
        wait(lambda: not kube.call("GET", f"/api/v1/namespaces/{ns}/pods?{SELECTOR}").json()["items"],
             "every pod gone", 60)
        assert "forbidden" not in gateway.log_since(0).lower(), gateway.log_since(0)[-3000:]
    finally:
        served.close()
