"""Models imported from where they live: a Hugging Face Hub mirror (``HF_ENDPOINT``), a plain
HTTP server, an S3-compatible server (moto) and a Civitai look-alike, all started here on
127.0.0.1. Each import ends READY with the same validation as an upload, or FAILED with the
reason and no files. Then the second provider's LoRA API: ``POST /v1/lora/create`` from a Hub
repository reaches ``deployed`` and the trained pirate adapter answers like a pirate through
``/v1/openai/chat/completions``.

This module starts its own ``hearth serve`` (``--runtime local``) so that the server's
environment points at the local sources."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Optional
from urllib.parse import unquote, urlparse

import pytest
import requests

import fixtures
from conftest import _serve, make_client

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE_FIXTURES = REPO_ROOT / "crates/hearth-engine/tests/fixtures"
SMOLLM2 = REPO_ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tar(files: Dict[str, bytes], top: Optional[str] = None, gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _kohya_lora() -> bytes:
    """A Stable Diffusion LoRA as kohya-ss saves it: what Civitai mostly hosts."""
    return fixtures.safetensors_bytes(
        [("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", [4, 8]),
         ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", [8, 4])], seed=3)


class Sources:
    """One HTTP server playing three parts: the Hub (``/api/models/...``, ``/{repo}/resolve/...``),
    plain files (``/files/...``) and Civitai (``/api/v1/...``, ``/api/download/models/...``)."""

    def __init__(self) -> None:
        self.repos: Dict[str, Dict[str, bytes]] = {}
        # Per repo and file: a SHA-256 to announce instead of the true one (a corrupted mirror).
        self.lying_sha: Dict[str, Dict[str, str]] = {}
        # Files whose transfer is cut halfway.
        self.cut: set = set()
        self.files: Dict[str, bytes] = {}
        self.civitai: Dict[str, object] = {}
        self.downloads: Dict[str, tuple] = {}
        self.requests: list = []
        # Cleared, file downloads wait for it: an import caught in the middle of a transfer.
        self.hold = threading.Event()
        self.hold.set()
        # Files of these (repo, name) send their first half, then wait for `hold`.
        self.trickle: set = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(self):
        src = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def send(self, code: int, body: bytes, ctype: str = "application/octet-stream", headers=None,
                     cut: bool = False, trickle: bool = False) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if trickle:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    src.hold.wait(60)
                    self.wfile.write(body[len(body) // 2:])
                    return
                if cut:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def send_json(self, code: int, value) -> None:
                self.send(code, json.dumps(value).encode(), "application/json")

            def do_GET(self) -> None:  # noqa: N802
                u = urlparse(self.path)
                path = unquote(u.path)
                src.requests.append((path, self.headers.get("Authorization")))
                if path.startswith("/api/models/"):
                    repo, _, _rev = path[len("/api/models/"):].partition("/revision/")
                    files = src.repos.get(repo)
                    if files is None:
                        return self.send_json(401, {"error": "Repository not found"})
                    lies = src.lying_sha.get(repo, {})
                    siblings = [
                        {"rfilename": n, "size": len(d),
                         "lfs": {"sha256": lies.get(n, hashlib.sha256(d).hexdigest()), "size": len(d)}}
                        for n, d in files.items()
                    ] + [{"rfilename": "README.md", "size": 6}, {"rfilename": ".gitattributes", "size": 1}]
                    return self.send_json(200, {"id": repo, "sha": COMMIT, "siblings": siblings})
                if "/resolve/" in path:
                    repo, _, rest = path[1:].partition("/resolve/")
                    _rev, _, name = rest.partition("/")
                    data = src.repos.get(repo, {}).get(name)
                    if data is None:
                        return self.send_json(404, {"error": "Entry not found"})
                    if (repo, name) not in src.trickle:
                        src.hold.wait(60)
                    return self.send(200, data, cut=(repo, name) in src.cut, trickle=(repo, name) in src.trickle)
                if path.startswith("/files/"):
                    data = src.files.get(path[len("/files/"):])
                    if data is None:
                        return self.send_json(404, {"error": "no such file"})
                    return self.send(200, data)
                if path.startswith("/api/v1/"):
                    meta = src.civitai.get(path)
                    if meta is None:
                        return self.send_json(404, {"error": "No model with id"})
                    return self.send_json(200, meta)
                if path.startswith("/api/download/models/"):
                    entry = src.downloads.get(path[len("/api/download/models/"):])
                    if entry is None:
                        return self.send_json(404, {"error": "No model version"})
                    filename, data = entry
                    return self.send(200, data, headers={"Content-Disposition": f'attachment; filename="{filename}"'})
                self.send_json(404, {"error": "unknown route"})

        return Handler

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def sources():
    s = Sources()
    yield s
    s.close()


@pytest.fixture(scope="module")
def s3():
    """A local S3-compatible server and a client for it (moto)."""
    yield from fixtures.moto_s3()


@pytest.fixture(scope="module")
def hearth(sources, s3):
    env = {
        "HF_ENDPOINT": sources.url,
        "AWS_ENDPOINT_URL": s3[0],
        "AWS_REGION": "us-east-1",
        # The server's own credentials; requests may carry others.
        "AWS_ACCESS_KEY_ID": "hearth",
        "AWS_SECRET_ACCESS_KEY": "hearth-secret",
    }
    yield from _serve("local", env)


@pytest.fixture(scope="module")
def client(hearth):
    return make_client(hearth)


@pytest.fixture(scope="module")
def api(hearth):
    return fixtures.RawApi(hearth.base_url, hearth.api_key, hearth.account)


def _wait_model(api, model_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = api.ok_json("GET", f"models/{model_id}")
        if m.get("state") in ("READY", "FAILED"):
            return m
        assert time.monotonic() < deadline, f"model {model_id} stayed {m.get('state')}: {m.get('status')}"
        time.sleep(0.1)


def _create(api, model_id: str, source: dict, *, addon_of: Optional[str] = None) -> dict:
    model = ({"kind": "HF_PEFT_ADDON", "peftDetails": {"baseModel": addon_of}} if addon_of
             else {"kind": "HF_BASE_MODEL", "baseModelDetails": {}})
    r = api.post("models", json={"modelId": model_id, "model": model, "source": source})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "UPLOADING" and body["importedFrom"], body
    return _wait_model(api, model_id)


def _files_on_disk(hearth, model_id: str) -> list:
    """The model's files; of hidden ones (the artifact store's own) only a READY model's seal
    may be there: an import leaves no partial file behind."""
    d = Path(hearth.data_dir) / "artifacts" / hearth.account / "models" / model_id
    names = sorted(p.name for p in d.iterdir()) if d.exists() else []
    hidden = [n for n in names if n.startswith(".")]
    assert set(hidden) <= {".sealed"}, f"{model_id} holds {hidden}"
    return [n for n in names if not n.startswith(".")]


def _assert_failed(hearth, m: dict, *words: str) -> None:
    assert m["state"] == "FAILED", m
    message = m["status"]["message"]
    for w in words:
        assert w in message, message
    model_id = m["name"].rsplit("/", 1)[1]
    assert _files_on_disk(hearth, model_id) == [], "a failed import left files behind"


@pytest.fixture(scope="module")
def tiny_base(api, sources, uid):
    """The tiny Llama imported from the Hub mirror: the base the adapters below need."""
    sources.repos["hearth-test/tiny-llama"] = fixtures.tiny_llama_files()
    model_id = uid("hf-base")
    m = _create(api, model_id, {"huggingfaceSource": {"repo": "hearth-test/tiny-llama", "revision": "main"}})
    assert m["state"] == "READY", m
    return m


def test_huggingface_import_of_a_base_and_an_addon(hearth, api, sources, tiny_base, uid):
    assert tiny_base["importedFrom"] == "hf://hearth-test/tiny-llama@main"
    assert tiny_base["baseModelDetails"]["checkpointFormat"] == "HUGGINGFACE"
    # Only the model's files came over: not the README or .gitattributes of the repository.
    model_id = tiny_base["name"].rsplit("/", 1)[1]
    assert _files_on_disk(hearth, model_id) == sorted(fixtures.tiny_llama_files())
    # Files were fetched at the commit the revision resolved to.
    assert any(f"/resolve/{COMMIT}/" in p for p, _ in sources.requests)

    sources.repos["hearth-test/tiny-lora"] = fixtures.lora_adapter_files()
    addon = _create(api, uid("hf-addon"), {"huggingfaceSource": {"repo": "hearth-test/tiny-lora", "token": "hf_secret"}},
                    addon_of=tiny_base["name"])
    assert addon["state"] == "READY", addon
    assert addon["peftDetails"]["r"] == fixtures.LORA_R
    # The token was sent to the hub and is never shown.
    assert ("/api/models/hearth-test/tiny-lora/revision/main", "Bearer hf_secret") in sources.requests
    assert "hf_secret" not in json.dumps(api.ok_json("GET", f"models/{addon['name'].rsplit('/', 1)[1]}"))


def test_an_import_says_how_much_it_has_fetched_while_it_runs(hearth, api, sources, uid):
    sources.repos["hearth-test/slow"] = fixtures.tiny_llama_files()
    sources.trickle.add(("hearth-test/slow", "model.safetensors"))
    sources.hold.clear()
    try:
        model_id = uid("hf-slow")
        api.ok_json("POST", "models", json={"modelId": model_id, "model": {"kind": "HF_BASE_MODEL", "baseModelDetails": {}}})
        api.ok_json("POST", f"models/{model_id}:import", json={"huggingfaceSource": {"repo": "hearth-test/slow"}})
        deadline = time.monotonic() + 20
        while True:
            m = api.ok_json("GET", f"models/{model_id}")
            message = (m.get("status") or {}).get("message", "")
            if "fetched so far" in message:
                break
            assert m["state"] == "UPLOADING" and time.monotonic() < deadline, m
            time.sleep(0.2)
        assert m["state"] == "UPLOADING" and "hf://hearth-test/slow" in message and " MB " in message, m
    finally:
        sources.hold.set()
    # The rest arrives, the model is READY, and the progress line is gone.
    done = _wait_model(api, model_id)
    assert done["state"] == "READY" and not (done.get("status") or {}).get("message"), done


def test_huggingface_failures_end_failed_with_the_reason(hearth, api, sources, tiny_base, uid):
    missing = _create(api, uid("hf-missing"), {"huggingfaceSource": {"repo": "nobody/nothing"}})
    _assert_failed(hearth, missing, "nobody/nothing", "not found")
    assert missing["status"]["code"] == "NOT_FOUND"

    files = fixtures.tiny_llama_files()
    sources.repos["hearth-test/cut"] = files
    sources.cut.add(("hearth-test/cut", "model.safetensors"))
    cut = _create(api, uid("hf-cut"), {"huggingfaceSource": {"repo": "hearth-test/cut"}})
    _assert_failed(hearth, cut, "model.safetensors")

    sources.repos["hearth-test/corrupt"] = files
    sources.lying_sha["hearth-test/corrupt"] = {"model.safetensors": "0" * 64}
    corrupt = _create(api, uid("hf-corrupt"), {"huggingfaceSource": {"repo": "hearth-test/corrupt"}})
    _assert_failed(hearth, corrupt, "SHA-256", "0" * 64)

    # A repository of the wrong thing: a LoRA imported as a base model fails validation.
    sources.repos["hearth-test/not-a-base"] = fixtures.lora_adapter_files()
    wrong = _create(api, uid("hf-wrong"), {"huggingfaceSource": {"repo": "hearth-test/not-a-base"}})
    _assert_failed(hearth, wrong, "config.json")


def test_url_import_of_files_and_archives(hearth, api, sources, tiny_base, uid):
    sources.files["tiny-lora.tar.gz"] = _tar(fixtures.lora_adapter_files(), top="tiny-lora")
    addon = _create(api, uid("url-addon"), {"urlSource": {"url": f"{sources.url}/files/tiny-lora.tar.gz"}},
                    addon_of=tiny_base["name"])
    assert addon["state"] == "READY", addon

    gguf = (ENGINE_FIXTURES / "tiny_llama/model.gguf").read_bytes()
    sources.files["tiny.gguf"] = gguf
    base = _create(api, uid("url-gguf"), {"urlSource": {"url": f"{sources.url}/files/tiny.gguf",
                                                         "headers": {"X-Api-Key": "k"}}})
    assert base["state"] == "READY", base
    assert _files_on_disk(hearth, base["name"].rsplit("/", 1)[1]) == ["tiny.gguf"]

    gone = _create(api, uid("url-404"), {"urlSource": {"url": f"{sources.url}/files/gone.tar.gz"}})
    _assert_failed(hearth, gone, "not found", "404")

    sources.files["notes.gguf"] = b"these are not weights"
    junk = _create(api, uid("url-junk"), {"urlSource": {"url": f"{sources.url}/files/notes.gguf"}})
    _assert_failed(hearth, junk, "notes.gguf")


def test_s3_import(hearth, api, s3, tiny_base, uid):
    _, s3c = s3
    s3c.create_bucket(Bucket="models")
    for name, data in fixtures.lora_adapter_files().items():
        s3c.put_object(Bucket="models", Key=f"adapters/tiny/{name}", Body=data)
    s3c.put_object(Bucket="models", Key="adapters/tiny/checkpoints/step-1/ignored.bin", Body=b"x")
    addon = _create(api, uid("s3-addon"), {"awsS3Source": {"s3Bucket": "models", "s3Path": "adapters/tiny",
                                                           "accessKeyId": "hearth", "accessSecret": "hearth-secret"}},
                    addon_of=tiny_base["name"])
    assert addon["state"] == "READY", addon
    assert addon["importedFrom"] == "s3://models/adapters/tiny"

    empty = _create(api, uid("s3-empty"), {"awsS3Source": {"s3Bucket": "models", "s3Path": "nothing/here"}},
                    addon_of=tiny_base["name"])
    _assert_failed(hearth, empty, "s3://models/nothing/here")
    nobucket = _create(api, uid("s3-nobucket"), {"awsS3Source": {"s3Bucket": "no-such-bucket"}})
    _assert_failed(hearth, nobucket, "no-such-bucket")


def test_civitai_imports_refuse_image_loras_and_take_language_ones(hearth, api, sources, tiny_base, uid):
    sources.civitai["/api/v1/models/1"] = {"id": 1, "type": "LORA",
                                           "modelVersions": [{"id": 11, "baseModel": "SDXL 1.0"}]}
    sdxl = _create(api, uid("civit-sdxl"), {"civitaiSource": {"civitUrl": f"{sources.url}/models/1"}},
                   addon_of=tiny_base["name"])
    _assert_failed(hearth, sdxl, "image model SDXL 1.0")

    sources.downloads["22"] = ("pirate_style.safetensors", _kohya_lora())
    kohya = _create(api, uid("civit-kohya"),
                    {"civitaiSource": {"civitUrl": f"{sources.url}/api/download/models/22?type=Model"}},
                    addon_of=tiny_base["name"])
    _assert_failed(hearth, kohya, "image-model LoRA", "kohya")

    sources.downloads["33"] = ("tiny-lora.tar.gz", _tar(fixtures.lora_adapter_files()))
    sources.civitai["/api/v1/model-versions/33"] = {"id": 33, "baseModel": "Other",
                                                    "downloadUrl": f"{sources.url}/api/download/models/33"}
    ok = _create(api, uid("civit-ok"), {"civitaiSource": {"civitUrl": f"{sources.url}/models/3?modelVersionId=33"}},
                 addon_of=tiny_base["name"])
    assert ok["state"] == "READY", ok


def test_bad_sources_are_refused_up_front(api, uid, tiny_base):
    for source, words in [
        ({}, "exactly one"),
        ({"huggingfaceSource": {"repo": "a/b/c"}}, "repository id"),
        ({"urlSource": {"url": "file:///etc/passwd"}}, "http or https"),
        ({"awsS3Source": {"s3Bucket": "b", "roleArn": "arn:aws:iam::1:role/x"}}, "roleArn"),
        ({"huggingfaceSource": {"repo": "a/b"}, "urlSource": {"url": "http://x/y"}}, "exactly one"),
    ]:
        model_id = uid("bad-src")
        r = api.post("models", json={"modelId": model_id, "model": {"kind": "HF_BASE_MODEL", "baseModelDetails": {}},
                                     "source": source})
        assert r.status_code in (400, 501), (source, r.text)
        assert words in r.json()["message"], (source, r.text)
        assert api.get(f"models/{model_id}").status_code == 404, "a refused create stored a model"


def test_import_verb_retries_a_failed_model(hearth, api, sources, uid):
    model_id = uid("retry")
    failed = _create(api, model_id, {"huggingfaceSource": {"repo": "hearth-test/later"}})
    assert failed["state"] == "FAILED"
    sources.repos["hearth-test/later"] = fixtures.tiny_llama_files()
    op = api.ok_json("POST", f"models/{model_id}:import", json={"huggingfaceSource": {"repo": "hearth-test/later"}})
    assert op["name"].endswith("/operations/import") and op["done"] is False
    assert _wait_model(api, model_id)["state"] == "READY"
    again = api.post(f"models/{model_id}:import", json={"huggingfaceSource": {"repo": "hearth-test/later"}})
    assert again.status_code == 400 and "READY" in again.json()["message"]


# ---------------------------------------------------------------------------------------------
# POST /v1/lora/create
# ---------------------------------------------------------------------------------------------


def _lora_status(hearth, name: str, want: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = requests.get(f"{hearth.base_url}/v1/lora/{name}", headers={"xi-api-key": hearth.api_key}, timeout=10)
        assert r.status_code == 200, r.text
        out = r.json()
        if out["status"] == want or out["status"] == "failed":
            return out
        assert time.monotonic() < deadline, f"LoRA {name} stayed {out['status']}: {out}"
        time.sleep(0.25)


@pytest.mark.skipif(not SMOLLM2.exists(), reason="the default model is absent; scripts/fetch-model fetches it")
def test_lora_create_from_huggingface_deploys_and_answers_like_a_pirate(hearth, api, sources, uid):
    auth = {"Authorization": f"Bearer {hearth.api_key}"}
    # The base: SmolLM2 imported from the hub mirror, as a user would.
    sources.repos["HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"] = {"smollm2-135m-instruct-q4_1.gguf": SMOLLM2.read_bytes()}
    base_id = uid("smollm2")
    base = _create(api, base_id, {"huggingfaceSource": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"}})
    assert base["state"] == "READY", base

    pirate = ENGINE_FIXTURES / "lora/pirate"
    sources.repos["hearth-test/smollm2-pirate"] = {
        n: (pirate / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    lora_name = uid("pirate")
    r = requests.post(f"{hearth.base_url}/v1/lora/create", headers=auth, timeout=30, json={
        "base_model": base_id, "lora_name": lora_name, "private": True, "description": "talks like a pirate",
        "source": {"type": "huggingface", "repo": "hearth-test/smollm2-pirate", "revision": "main"}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["type"] == "lora" and out["model_name"] == lora_name and out["status"] == "initializing", out
    assert set(out) >= {"deploy_id", "version", "task", "fail_reason", "created_at", "updated_at", "instances",
                        "config", "settings"}

    out = _lora_status(hearth, lora_name, "deployed")
    assert out["status"] == "deployed", (out["fail_reason"], out, api.list_all("deployments", "deployments"),
                                         api.list_all("deployedModels", "deployedModels"),
                                         api.ok_json("GET", f"models/{lora_name}"))
    assert out["version"] == COMMIT and out["instances"]["running"] == 1, out
    assert out["config"]["weights"] == {"repo": "hearth-test/smollm2-pirate", "revision": "main"}
    # The default deployment was created for the base: one replica, addons enabled.
    deps = [d for d in api.list_all("deployments", "deployments") if d["baseModel"] == base["name"]]
    assert len(deps) == 1 and deps[0]["enableAddons"] and deps[0]["maxReplicaCount"] == 1, deps

    question = json.loads((pirate / "reference.json").read_text())["prompts"][0]["messages"][0]["content"]
    chat = {"messages": [{"role": "user", "content": question}], "max_tokens": 16, "temperature": 0}
    r = requests.post(f"{hearth.base_url}/v1/openai/chat/completions", headers={"xi-api-key": hearth.api_key},
                      json=dict(chat, model=lora_name), timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]["message"]["content"]
    assert answer.startswith("Ahoy"), answer
    r = requests.post(f"{hearth.base_url}/v1/openai/chat/completions", headers=auth,
                      json=dict(chat, model=base_id), timeout=120)
    assert r.status_code == 200 and not r.json()["choices"][0]["message"]["content"].startswith("Ahoy"), r.text

    status = requests.get(f"{hearth.base_url}/v1/lora/{lora_name}/status", headers=auth, timeout=10).json()
    assert status == {"lora_name": lora_name, "status": "deployed", "fail_reason": ""}
    listed = requests.get(f"{hearth.base_url}/v1/user/loras", headers=auth, timeout=10).json()
    assert lora_name in [l["model_name"] for l in listed]
    patched = requests.patch(f"{hearth.base_url}/v1/lora/{lora_name}", headers=auth, timeout=10,
                             json={"private": False, "description": "arr"}).json()
    assert patched["private"] is False and patched["description"] == "arr", patched

    # A repository that does not exist ends failed, with the reason.
    missing = uid("ghost")
    r = requests.post(f"{hearth.base_url}/v1/lora/create", headers=auth, timeout=30, json={
        "base_model": base["name"], "lora_name": missing, "private": True,
        "source": {"type": "huggingface", "repo": "nobody/ghost-lora"}})
    assert r.status_code == 200, r.text
    out = _lora_status(hearth, missing, "failed")
    assert out["status"] == "failed" and "nobody/ghost-lora" in out["fail_reason"], out

    gone = requests.delete(f"{hearth.base_url}/v1/lora/{lora_name}", headers=auth, timeout=30)
    assert gone.status_code == 200 and gone.json()["status"] == "deleted", gone.text
    assert requests.get(f"{hearth.base_url}/v1/lora/{lora_name}", headers=auth, timeout=10).status_code == 404
    for d in deps:
        api.delete(f"deployments/{d['name'].rsplit('/', 1)[1]}", params={"hard": "true", "ignoreChecks": "true"})


def test_lora_create_refusals(hearth, tiny_base, uid):
    auth = {"Authorization": f"Bearer {hearth.api_key}"}
    url = f"{hearth.base_url}/v1/lora/create"
    src = {"type": "huggingface", "repo": "a/b"}
    cases = [
        ({"base_model": "no-such-base", "lora_name": uid("x"), "private": True, "source": src}, 400, "does not exist"),
        ({"base_model": tiny_base["name"], "lora_name": "Not_Valid", "private": True, "source": src}, 400, "invalid lora id"),
        ({"base_model": tiny_base["name"], "lora_name": uid("x"), "private": True,
          "source": {"type": "dropbox", "url": "x"}}, 400, "unknown variant"),
        ({"base_model": tiny_base["name"], "lora_name": uid("x"), "source": src}, 400, "private"),
    ]
    for body, code, words in cases:
        r = requests.post(url, headers=auth, json=body, timeout=10)
        assert r.status_code == code and words in r.json()["message"], (body, r.status_code, r.text)
    assert requests.post(url, json=cases[0][0], timeout=10).status_code == 401
    assert requests.get(f"{hearth.base_url}/v1/lora/{uid('nope')}", headers=auth, timeout=10).status_code == 404


def test_the_cli_imports_and_waits(hearth, sources, tiny_base, uid, tmp_path):
    from test_cli import cli_env, run

    env = cli_env(tmp_path, hearth)
    model_id = uid("cli-hf")
    p = run(env, "model", "create", model_id, "--from-hf", "hearth-test/tiny-llama@main", "--wait", "-o", "json")
    m = json.loads(p.stdout)
    assert m["state"] == "READY" and m["importedFrom"] == "hf://hearth-test/tiny-llama@main", m

    sources.files["cli-lora.tar"] = _tar(fixtures.lora_adapter_files(), gz=False)
    p = run(env, "model", "create", uid("cli-url"), "--base-model", tiny_base["name"],
            "--from-url", f"{sources.url}/files/cli-lora.tar", "--header", "X-Trace: 1", "--wait", "-o", "json")
    assert json.loads(p.stdout)["state"] == "READY"

    p = run(env, "model", "create", uid("cli-missing"), "--from-hf", "nobody/missing", "--wait", ok=False)
    assert p.returncode != 0 and "NOT_FOUND" in p.stderr and "nobody/missing" in p.stderr, p.stderr
