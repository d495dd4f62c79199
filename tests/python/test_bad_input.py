"""Raw HTTP for what the SDK would not send or would check itself: unknown fields and enum
values, over-long names, wrong model-kind details, malformed JSON, bad uploads (wrong size,
tampered signatures, broken checkpoints, an adapter that does not fit), and authentication.
After every refused request the resource (or the list) is read back and must be unchanged."""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import pytest
import requests

import fixtures
from fixtures import (
    ALREADY_EXISTS,
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    PERMISSION_DENIED,
    UNAUTHENTICATED,
    RawApi,
    assert_rpc_error,
    put_signed,
)

BASE_DETAILS = {"checkpointFormat": "HUGGINGFACE"}


def base_body(model_id: str, **model) -> dict:
    return {"modelId": model_id, "model": {"kind": "HF_BASE_MODEL", "displayName": model_id, "baseModelDetails": BASE_DETAILS, **model}}


def addon_body(model_id: str, base_name: str, **model) -> dict:
    return {
        "modelId": model_id,
        "model": {
            "kind": "HF_PEFT_ADDON",
            "displayName": model_id,
            "peftDetails": {"baseModel": base_name, "r": 8, "targetModules": ["q_proj", "v_proj"]},
            **model,
        },
    }


def model_names(api: RawApi) -> list:
    return api.names("models", "models")


def create_model(api: RawApi, body: dict) -> dict:
    return api.ok_json("POST", "models", json=body)


def upload_urls(api: RawApi, model_id: str, files: dict) -> dict:
    body = api.ok_json("POST", f"models/{model_id}:getUploadEndpoint", json={"filenameToSize": {n: str(len(b)) for n, b in files.items()}})
    urls = body["filenameToSignedUrls"]
    assert sorted(urls) == sorted(files)
    return urls


def with_query(url: str, **changes) -> str:
    u = urlparse(url)
    q = dict(parse_qsl(u.query, keep_blank_values=True))
    q.update(changes)
    return urlunparse(u._replace(query=urlencode(q)))


def flip_last(s: str) -> str:
    return s[:-1] + ("0" if s[-1] != "0" else "1")


# ---------------------------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------------------------


def test_unknown_json_fields_are_400(api, uid):
    before = model_names(api)
    mid = uid("unk")
    body = base_body(mid)
    body["notAField"] = 1
    assert_rpc_error(api.post("models", json=body), 400, INVALID_ARGUMENT)
    body = base_body(mid, notAModelField=True)
    assert_rpc_error(api.post("models", json=body), 400, INVALID_ARGUMENT)
    assert model_names(api) == before

    create_model(api, base_body(mid, description="kept"))
    snapshot = api.ok_json("GET", f"models/{mid}")
    assert_rpc_error(api.patch(f"models/{mid}", json={"displayName": "changed", "bogus": 1}), 400, INVALID_ARGUMENT)
    assert api.ok_json("GET", f"models/{mid}") == snapshot


def test_unknown_enum_values_are_400(api, uid, ready_base):
    before = model_names(api)
    assert_rpc_error(api.post("models", json=base_body(uid("enum"), kind="HF_MAGIC_MODEL")), 400, INVALID_ARGUMENT)
    assert_rpc_error(
        api.post("models", json=base_body(uid("enum"), baseModelDetails={"checkpointFormat": "PICKLE_JAR"})), 400, INVALID_ARGUMENT
    )
    assert model_names(api) == before

    deps_before = api.names("deployments", "deployments", showDeleted="true")
    r = api.post(
        "deployments",
        params={"deploymentId": uid("enum")},
        json={"baseModel": ready_base.name, "acceleratorType": "NVIDIA_QUANTUM_1TB"},
    )
    assert_rpc_error(r, 400, INVALID_ARGUMENT)
    assert api.names("deployments", "deployments", showDeleted="true") == deps_before


def test_display_name_must_be_under_64_chars(api, uid):
    before = model_names(api)
    assert_rpc_error(api.post("models", json=base_body(uid("long"), displayName="x" * 64)), 400, INVALID_ARGUMENT)
    assert_rpc_error(api.post("models", json=base_body(uid("long"), displayName="y" * 200)), 400, INVALID_ARGUMENT)
    assert model_names(api) == before

    mid = uid("long")
    created = create_model(api, base_body(mid, displayName="z" * 63))
    assert created["displayName"] == "z" * 63
    snapshot = api.ok_json("GET", f"models/{mid}")
    assert_rpc_error(api.patch(f"models/{mid}", json={"displayName": "w" * 64}), 400, INVALID_ARGUMENT)
    assert api.ok_json("GET", f"models/{mid}") == snapshot


def test_kind_details_must_match_kind(api, uid, ready_base):
    before = model_names(api)
    body = base_body(uid("mixed"), peftDetails={"baseModel": ready_base.name, "r": 8, "targetModules": ["q_proj"]})
    assert_rpc_error(api.post("models", json=body), 400, INVALID_ARGUMENT)

    body = addon_body(uid("nopeft"), ready_base.name)
    del body["model"]["peftDetails"]
    assert_rpc_error(api.post("models", json=body), 400, INVALID_ARGUMENT)
    assert model_names(api) == before


def test_malformed_json_is_400(api, uid, ready_base):
    before = model_names(api)
    for raw in (b'{"modelId": "broken", "model": {', b"not json at all", b'["an", "array"]'):
        r = api.post("models", data=raw, headers={"Content-Type": "application/json"})
        assert_rpc_error(r, 400, INVALID_ARGUMENT)
    assert model_names(api) == before

    deps_before = api.names("deployments", "deployments", showDeleted="true")
    r = api.post("deployments", params={"deploymentId": uid("bad")}, data=b'{"baseModel": ', headers={"Content-Type": "application/json"})
    assert_rpc_error(r, 400, INVALID_ARGUMENT)
    assert api.names("deployments", "deployments", showDeleted="true") == deps_before


def test_invalid_model_id_is_400(api):
    before = model_names(api)
    for bad in ("Bad_ID", "-leading-hyphen", "9lives", "a" * 64, ""):
        assert_rpc_error(api.post("models", json=base_body(bad)), 400, INVALID_ARGUMENT)
    assert model_names(api) == before


def test_duplicate_model_is_409_and_not_retryable(api, uid):
    mid = uid("dup")
    create_model(api, base_body(mid, description="original"))
    snapshot = api.ok_json("GET", f"models/{mid}")
    r = api.post("models", json=base_body(mid, description="second"))
    assert_rpc_error(r, 409, ALREADY_EXISTS)
    assert r.headers.get("x-should-retry") == "false"
    assert api.ok_json("GET", f"models/{mid}") == snapshot


def test_delete_with_json_content_type_and_no_body(api, uid, ready_base):
    # The SDK sends DELETE with Content-Type: application/json and an empty body.
    mid = uid("deljson")
    create_model(api, base_body(mid))
    r = api.delete(f"models/{mid}", headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert_rpc_error(api.get(f"models/{mid}"), 404, 5)

    dep_id = uid("deljson")
    api.ok_json("POST", "deployments", params={"deploymentId": dep_id}, json={"baseModel": ready_base.name})
    r = api.delete(f"deployments/{dep_id}", headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert api.ok_json("GET", f"deployments/{dep_id}")["state"] == "DELETED"
    r = api.delete(f"deployments/{dep_id}", params={"hard": "true"}, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert_rpc_error(api.get(f"deployments/{dep_id}"), 404, 5)


def test_deployment_raw_create_and_refusals(api, hearth, uid, ready_base):
    dep_id = uid("raw")
    body = {"baseModel": ready_base.name, "minReplicaCount": 0, "maxReplicaCount": 1, "enableAddons": True}
    dep = api.ok_json("POST", "deployments", params={"deploymentId": dep_id}, json=body)
    assert dep["name"] == f"accounts/{hearth.account}/deployments/{dep_id}"
    assert dep["state"] == "CREATING"
    assert dep["baseModel"] == ready_base.name
    assert dep["enableAddons"] is True
    assert dep["maxReplicaCount"] == 1
    assert dep.get("minReplicaCount", 0) == 0
    assert dep["autoscalingPolicy"] == {
        "scaleUpWindow": "30s",
        "scaleDownWindow": "600s",
        "scaleToZeroWindow": "3600s",
        "loadTargets": {"default": 0.8},
    }
    snapshot = api.ok_json("GET", f"deployments/{dep_id}")

    assert_rpc_error(api.patch(f"deployments/{dep_id}", json={"displayName": "x", "noSuchField": 1}), 400, INVALID_ARGUMENT)
    assert_rpc_error(api.patch(f"deployments/{dep_id}", json={"displayName": "d" * 64}), 400, INVALID_ARGUMENT)
    # AIP-164: undeleting what is not deleted is ALREADY_EXISTS, and not worth a retry.
    r = api.post(f"deployments/{dep_id}:undelete", json={})
    assert_rpc_error(r, 409, ALREADY_EXISTS)
    assert r.headers.get("x-should-retry") == "false"
    r = api.post("deployments", params={"deploymentId": dep_id}, json=body)
    assert_rpc_error(r, 409, ALREADY_EXISTS)
    assert r.headers.get("x-should-retry") == "false"
    assert api.ok_json("GET", f"deployments/{dep_id}") == snapshot

    assert api.ok_json("PATCH", f"deployments/{dep_id}", json={"displayName": "patched"})["displayName"] == "patched"
    api.ok_json("DELETE", f"deployments/{dep_id}", params={"hard": "true"})
    assert_rpc_error(api.get(f"deployments/{dep_id}"), 404, 5)


def test_list_page_size_bounds(api):
    for collection in ("models", "deployments", "deployedModels"):
        assert_rpc_error(api.get(collection, params={"pageSize": -1}), 400, INVALID_ARGUMENT)
        r = api.get(collection, params={"pageSize": 1000})
        assert r.status_code == 200, f"{collection}: pageSize 1000 must be coerced to 200, got {r.status_code} {r.text[:300]}"


# ---------------------------------------------------------------------------------------------
# Authentication and authorisation
# ---------------------------------------------------------------------------------------------


def test_health_needs_no_key(hearth):
    assert requests.get(hearth.base_url + "/health", timeout=10).status_code == 200


def test_missing_or_bad_key_is_401(hearth, api, uid):
    before = model_names(api)
    anon = RawApi(hearth.base_url, None, hearth.account)
    for method, path in (("GET", "models"), ("GET", "deployments"), ("GET", "deployedModels"), ("GET", "models/anything")):
        assert_rpc_error(anon.request(method, path), 401, UNAUTHENTICATED)
    assert_rpc_error(anon.post("models", json=base_body(uid("anon"))), 401, UNAUTHENTICATED)
    for header in ("Bearer hk-wrong", "Bearer ", "Basic dXNlcjpwYXNz"):
        r = anon.post("models", json=base_body(uid("anon")), headers={"Authorization": header})
        assert_rpc_error(r, 401, UNAUTHENTICATED)
    assert model_names(api) == before


def test_other_accounts_key_is_403(hearth, api, uid):
    mid = uid("guarded")
    create_model(api, base_body(mid))
    snapshot = api.ok_json("GET", f"models/{mid}")
    other = RawApi(hearth.base_url, hearth.api_key2, hearth.account)  # key of account2, path of account1
    assert_rpc_error(other.get(f"models/{mid}"), 403, PERMISSION_DENIED)
    assert_rpc_error(other.patch(f"models/{mid}", json={"displayName": "mine now"}), 403, PERMISSION_DENIED)
    assert_rpc_error(other.delete(f"models/{mid}"), 403, PERMISSION_DENIED)
    assert_rpc_error(other.post(f"models/{mid}:getUploadEndpoint", json={"filenameToSize": {"config.json": "2"}}), 403, PERMISSION_DENIED)
    assert_rpc_error(other.post("models", json=base_body(uid("theirs"))), 403, PERMISSION_DENIED)
    assert api.ok_json("GET", f"models/{mid}") == snapshot
    # The key itself is fine on its own account.
    own = RawApi(hearth.base_url, hearth.api_key2, hearth.account2)
    assert own.get("models").status_code == 200


# ---------------------------------------------------------------------------------------------
# Uploads
# ---------------------------------------------------------------------------------------------


def test_upload_with_wrong_size_is_400(api, uid, tmp_path):
    mid = uid("size")
    create_model(api, base_body(mid))
    files = fixtures.read_dir(fixtures.write_tiny_llama_checkpoint(tmp_path / "ckpt"))
    urls = upload_urls(api, mid, files)
    snapshot = api.ok_json("GET", f"models/{mid}")

    cfg = files["config.json"]
    r = put_signed(urls["config.json"], cfg[:-1], declared_size=len(cfg))
    assert r.status_code == 400, f"short body: {r.status_code} {r.text[:300]}"
    r = put_signed(urls["config.json"], cfg + b" ", declared_size=len(cfg))
    assert r.status_code == 400, f"long body: {r.status_code} {r.text[:300]}"
    # An honest length header that differs from the size the URL was signed for: refused as
    # a size mismatch (400) or as a header that does not match the signature (403).
    r = put_signed(urls["config.json"], cfg[:-1])
    assert r.status_code in (400, 403), f"short body, matching header: {r.status_code} {r.text[:300]}"
    assert api.ok_json("GET", f"models/{mid}") == snapshot

    # The refused PUTs stored nothing usable; the proper bytes still go through.
    for name, data in files.items():
        r = put_signed(urls[name], data)
        assert 200 <= r.status_code < 300, f"{name}: {r.status_code} {r.text[:300]}"
    assert api.ok_json("GET", f"models/{mid}:validateUpload") is not None
    assert api.ok_json("GET", f"models/{mid}")["state"] == "READY"


def test_tampered_signature_is_refused(api, uid, tmp_path):
    mid = uid("sig")
    create_model(api, base_body(mid))
    files = fixtures.read_dir(fixtures.write_tiny_llama_checkpoint(tmp_path / "ckpt"))
    urls = upload_urls(api, mid, files)
    snapshot = api.ok_json("GET", f"models/{mid}")

    url = urls["config.json"]
    sig = dict(parse_qsl(urlparse(url).query))["sig"]
    tampered = with_query(url, sig=flip_last(sig))
    r = put_signed(tampered, files["config.json"])
    assert r.status_code in (401, 403), f"tampered sig: {r.status_code} {r.text[:300]}"
    assert "signature" in r.text.lower(), f"the refusal should say the signature is bad: {r.text[:300]}"

    # A valid signature for one file does not authorise another path.
    other_path = url.replace("/config.json", "/tokenizer.json", 1)
    assert other_path != url
    r = put_signed(other_path, files["config.json"])
    assert r.status_code in (401, 403), f"sig reused for another file: {r.status_code} {r.text[:300]}"

    # Without the signature at all.
    u = urlparse(url)
    r = put_signed(urlunparse(u._replace(query="")), files["config.json"])
    assert r.status_code in (401, 403), f"no sig: {r.status_code} {r.text[:300]}"

    assert api.ok_json("GET", f"models/{mid}") == snapshot
    # Nothing was stored: validation still finds no config.json.
    body = assert_rpc_error(api.get(f"models/{mid}:validateUpload"), 400, FAILED_PRECONDITION)
    assert "config.json" in body["message"]
    assert api.ok_json("GET", f"models/{mid}")["state"] == "UPLOADING"


def test_tampered_download_signature_is_refused(api, uid, ready_base):
    mid = ready_base.name.rsplit("/", 1)[1]
    urls = api.ok_json("GET", f"models/{mid}:getDownloadEndpoint")["filenameToSignedUrls"]
    url = urls["config.json"]
    assert requests.get(url, timeout=30).status_code == 200
    sig = dict(parse_qsl(urlparse(url).query))["sig"]
    r = requests.get(with_query(url, sig=flip_last(sig)), timeout=30)
    assert r.status_code in (401, 403), f"{r.status_code} {r.text[:300]}"


def test_expired_upload_url_is_refused(tmp_path):
    """A server whose signed URLs live one second refuses an upload made after that."""
    import signal
    import subprocess
    import time

    from conftest import _free_port, _random_account, _random_key, _wait_healthy, hearth_binary

    key, account, port = _random_key(), _random_account(), _free_port()
    cmd = [str(hearth_binary()), "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "data"),
           "--api-key", key, "--account", account, "--signed-url-ttl", "1", "--runtime", "none"]
    if os.environ.get("HEARTH_DATABASE_URL"):
        cmd += ["--database-url", os.environ["HEARTH_DATABASE_URL"]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    class _S:
        base_url = f"http://127.0.0.1:{port}"

    _S.proc = proc
    try:
        assert _wait_healthy(_S, time.monotonic() + 60) is None
        api = RawApi(_S.base_url, key, account)
        api.ok_json("POST", "models", json={"modelId": "late", "model": {"kind": "HF_BASE_MODEL", "baseModelDetails": {}}})
        url = upload_urls(api, "late", {"config.json": b"{}"})["config.json"]
        time.sleep(2.1)
        r = put_signed(url, b"{}")
        assert r.status_code == 403, r.text
        assert r.json()["code"] == PERMISSION_DENIED
        assert "expired" in r.json()["message"]
        assert api.ok_json("GET", "models/late")["state"] == "UPLOADING"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def _refused_validation(api: RawApi, mid: str, files: dict) -> dict:
    upload_urls_ = upload_urls(api, mid, files)
    for name, data in files.items():
        r = put_signed(upload_urls_[name], data)
        assert 200 <= r.status_code < 300, f"{name}: {r.status_code} {r.text[:300]}"
    snapshot = api.ok_json("GET", f"models/{mid}")
    assert snapshot["state"] == "UPLOADING"
    body = assert_rpc_error(api.get(f"models/{mid}:validateUpload"), 400, FAILED_PRECONDITION)
    after = api.ok_json("GET", f"models/{mid}")
    assert after == snapshot, "a refused validateUpload changed the model"
    return body


def test_validate_without_upload_is_400(api, uid):
    mid = uid("empty")
    create_model(api, base_body(mid))
    snapshot = api.ok_json("GET", f"models/{mid}")
    assert_rpc_error(api.get(f"models/{mid}:validateUpload"), 400, FAILED_PRECONDITION)
    assert api.ok_json("GET", f"models/{mid}") == snapshot


def test_bad_base_checkpoints_fail_validation(api, uid):
    # No config.json.
    mid = uid("nocfg")
    create_model(api, base_body(mid))
    files = fixtures.tiny_llama_files()
    del files["config.json"]
    body = _refused_validation(api, mid, files)
    assert "config.json" in body["message"], body

    # A tensor missing from model.safetensors.
    missing = "model.layers.1.mlp.down_proj.weight"
    mid = uid("notensor")
    create_model(api, base_body(mid))
    body = _refused_validation(api, mid, fixtures.tiny_llama_files(omit_tensors=[missing]))
    assert missing in body["message"], body

    # A truncated safetensors file.
    mid = uid("trunc")
    create_model(api, base_body(mid))
    files = fixtures.tiny_llama_files()
    files["model.safetensors"] = files["model.safetensors"][:-1000]
    body = _refused_validation(api, mid, files)
    assert "model.safetensors" in body["message"], body


def test_bad_adapter_fails_validation_naming_the_tensor(api, uid, ready_base, tmp_path):
    mid = uid("badlora")
    create_model(api, addon_body(mid, ready_base.name))
    files = fixtures.read_dir(fixtures.write_bad_lora_adapter(tmp_path / "bad"))
    body = _refused_validation(api, mid, files)
    assert "q_proj" in body["message"], f"the message should name the tensor or module: {body}"

    # Loading it is refused too (not READY), and nothing gets loaded.
    dep_id = uid("badlora")
    api.ok_json("POST", "deployments", params={"deploymentId": dep_id}, json={"baseModel": ready_base.name, "enableAddons": True})
    loaded = api.names("deployedModels", "deployedModels")
    r = api.post("deployedModels", json={"model": f"accounts/{api.account}/models/{mid}", "deployment": f"accounts/{api.account}/deployments/{dep_id}"})
    assert_rpc_error(r, 400, FAILED_PRECONDITION)
    assert api.names("deployedModels", "deployedModels") == loaded
    api.ok_json("DELETE", f"deployments/{dep_id}", params={"hard": "true"})


def test_base_model_change_is_refused_while_addons_are_loaded(api, client, uid, ready_base, ready_addon, tmp_path):
    """Loading an addon onto a deployment of another base is refused; a PATCH of the
    deployment's baseModel must not get around that while addons of the old base are loaded."""
    other = fixtures.create_ready_base_model(client, uid("other-base"), tmp_path / "other")
    dep_id = uid("rebase")
    api.ok_json("POST", "deployments", params={"deploymentId": dep_id}, json={"baseModel": ready_base.name, "enableAddons": True})
    dm = api.ok_json("POST", "deployedModels", json={"model": ready_addon.name, "deployment": f"accounts/{api.account}/deployments/{dep_id}"})
    before = api.ok_json("GET", f"deployments/{dep_id}")

    body = assert_rpc_error(api.patch(f"deployments/{dep_id}", json={"baseModel": other.name}), 400, FAILED_PRECONDITION)
    assert dm["name"] in body["message"] and "unload" in body["message"], body
    assert api.ok_json("GET", f"deployments/{dep_id}") == before

    # Unloaded, the change goes through.
    api.ok_json("DELETE", dm["name"].split("/", 2)[2])
    assert api.ok_json("PATCH", f"deployments/{dep_id}", json={"baseModel": other.name})["baseModel"] == other.name
    api.ok_json("DELETE", f"deployments/{dep_id}", params={"hard": "true"})


# The request bodies the API's documentation shows (../reference: documented-examples.md), with
# their placeholders filled in. No field of them is unknown; a value hearth cannot honour is
# refused as UNIMPLEMENTED naming its field.
DOCUMENTED_DEPLOYMENT = {
    "displayName": "documented", "description": "as the docs show it", "expireTime": "2099-11-07T05:31:56Z",
    "minReplicaCount": 0, "maxReplicaCount": 1,
    "autoscalingPolicy": {"scaleUpWindow": "30s", "scaleDownWindow": "600s", "scaleToZeroWindow": "3600s",
                          "loadTargets": {}},
    "acceleratorCount": 1, "acceleratorType": "ACCELERATOR_TYPE_UNSPECIFIED", "precision": "PRECISION_UNSPECIFIED",
    "enableAddons": True, "draftTokenCount": 4, "draftModel": "accounts/fireworks/models/x",
    "ngramSpeculationLength": 3, "deploymentTemplate": "t", "autoTune": {"longPrompt": True},
    "engine": "ENGINE_UNSPECIFIED", "forTraining": True,
}

DOCUMENTED_MODEL = {
    "displayName": "documented", "description": "as the docs show it", "kind": "HF_BASE_MODEL",
    "githubUrl": "https://github.com/x/y", "huggingFaceUrl": "https://huggingface.co/x/y",
    "baseModelDetails": {"worldSize": 1, "checkpointFormat": "CHECKPOINT_FORMAT_UNSPECIFIED", "parameterCount": "1",
                         "moe": False, "tunable": True, "modelType": "llama", "supportsFireattention": True,
                         "supportsMtp": False},
    "teftDetails": {}, "public": False,
    "conversationConfig": {"style": "", "system": "", "template": ""},
    "contextLength": 512, "supportsImageInput": False, "supportsTools": False,
    "defaultDraftModel": "", "defaultDraftTokenCount": 0,
    "deprecationDate": {"year": 2099, "month": 1, "day": 1}, "supportsLora": True,
    "useHfApplyChatTemplate": False, "trainingContextLength": 512, "snapshotType": "FULL_SNAPSHOT",
}


def test_the_documented_example_bodies_have_no_unknown_field(api, uid, ready_base):
    refused = []
    # The draft model's placeholder filled with a valid value: the base model drafting for itself.
    body = dict(DOCUMENTED_DEPLOYMENT, baseModel=ready_base.name, draftModel=ready_base.name)
    # Each refusal names one field; drop it and send the rest, until the body is accepted.
    for _ in range(len(body)):
        r = api.post("deployments", params={"deploymentId": uid("documented")}, json=body)
        if r.status_code == 200:
            break
        err = assert_rpc_error(r, 501, 12)
        field = next((f for f in body if f"`{f}`" in err["message"] or f" {f} " in err["message"]
                      or f"{f}." in err["message"] or f"field {f}" in err["message"]), None)
        assert field, f"the refusal names no field of the body: {err}"
        refused.append(field)
        body.pop(field)
    dep = r.json()
    assert dep["engine"] == "ENGINE_UNSPECIFIED" and "forTraining" in refused, (dep, refused)
    assert set(refused) <= {"deploymentTemplate", "autoTune", "forTraining"}, refused
    assert dep["draftModel"] == ready_base.name and dep["ngramSpeculationLength"] == 3, dep
    api.ok_json("DELETE", dep["name"].split("/", 2)[2], params={"hard": "true"})
    # forTraining: false is echoed; another engine is refused by name.
    dep = api.ok_json("POST", "deployments", params={"deploymentId": uid("documented")},
                      json={"baseModel": ready_base.name, "engine": "ENGINE_UNSPECIFIED", "forTraining": False})
    assert dep["forTraining"] is False
    api.ok_json("DELETE", dep["name"].split("/", 2)[2], params={"hard": "true"})
    r = api.post("deployments", params={"deploymentId": uid("documented")},
                 json={"baseModel": ready_base.name, "engine": "VLLM"})
    assert "engine" in assert_rpc_error(r, 501, 12)["message"]

    r = api.post("models", json={"modelId": uid("documented"), "model": DOCUMENTED_MODEL, "cluster": ""})
    assert r.status_code == 200 or "unknown" not in r.text, r.text


def test_scaling_schedules_are_stored_echoed_and_checked(api, uid, ready_base):
    schedules = {
        "weekdays": {"schedule": "0 8 * * Mon-Fri", "duration": "36000s", "timezone": "America/New_York",
                     "minReplicaCount": 1, "description": "business hours"},
        "peak": {"schedule": "30 12 * * Wed", "duration": "3600s", "timezone": "Europe/London",
                 "minReplicaCount": 2, "disabled": True},
    }
    dep_id = uid("sched")
    dep = api.ok_json("POST", "deployments", params={"deploymentId": dep_id},
                      json={"baseModel": ready_base.name, "minReplicaCount": 0, "maxReplicaCount": 2,
                            "autoscalingPolicy": {"scalingSchedules": schedules}})
    got = dep["autoscalingPolicy"]["scalingSchedules"]
    assert got["weekdays"] == {**schedules["weekdays"], "disabled": False}, got
    assert got["peak"] == schedules["peak"], got
    assert api.ok_json("GET", f"deployments/{dep_id}")["autoscalingPolicy"]["scalingSchedules"] == got
    before = api.ok_json("GET", f"deployments/{dep_id}")
    for bad, field in [
        ({"schedule": "0 8 * *", "duration": "3600s", "timezone": "UTC"}, "scalingSchedules.x.schedule"),
        ({"schedule": "61 8 * * *", "duration": "3600s", "timezone": "UTC"}, "scalingSchedules.x.schedule"),
        ({"schedule": "0 8 * * *", "duration": "60s", "timezone": "UTC"}, "scalingSchedules.x.duration"),
        ({"schedule": "0 8 * * *", "duration": "3600s", "timezone": "Nowhere/Land"}, "scalingSchedules.x.timezone"),
        ({"schedule": "0 8 * * *", "duration": "3600s", "timezone": "UTC", "minReplicaCount": 3},
         "scalingSchedules.x.minReplicaCount"),
        ({"schedule": "0 8 * * *", "duration": "3600s", "timezone": "UTC", "colour": "red"}, "colour"),
    ]:
        r = api.patch(f"deployments/{dep_id}", json={"autoscalingPolicy": {"scalingSchedules": {"x": bad}}})
        assert field in assert_rpc_error(r, 400, INVALID_ARGUMENT)["message"], (bad, r.text)
    six = {f"s{i}": {"schedule": "0 8 * * *", "duration": "3600s", "timezone": "UTC"} for i in range(6)}
    r = api.patch(f"deployments/{dep_id}", json={"autoscalingPolicy": {"scalingSchedules": six}})
    assert "at most 5" in assert_rpc_error(r, 400, INVALID_ARGUMENT)["message"]
    assert api.ok_json("GET", f"deployments/{dep_id}") == before
    api.ok_json("DELETE", f"deployments/{dep_id}", params={"hard": "true"})


# ---------------------------------------------------------------------------------------------
# The fields table (docs/fields.md): refused fields are refused by name, echoed ones come back
# as given, refused flags say why. Every refusal leaves nothing behind.
# ---------------------------------------------------------------------------------------------

REFUSED_DEPLOYMENT_FIELDS = {
    "maxWithRevocableReplicaCount": 2,
    "directRouteType": "AWS_PRIVATELINK",
    "deploymentTemplate": "t",
    "autoTune": {"longPrompt": True},
    "hotLoadTrainerJob": "j",
    "pricingPlanId": "p",
    "enableMtp": True,
    "precision": "FP8",
}

ECHOED_DEPLOYMENT_FIELDS = {
    "annotations": {"team": "search"},
    "acceleratorType": "NVIDIA_H100_80GB",
    "acceleratorCount": 2,
    "placement": {"region": "US_IOWA_1"},
    "deploymentShape": "accounts/fireworks/deploymentShapes/x",
    "disableDeploymentSizeValidation": True,
    "displayName": "shown",
    "description": "as given",
}


def test_the_deployment_fields_table(api, uid, ready_base):
    before = api.names("deployments", "deployments")
    for field, value in REFUSED_DEPLOYMENT_FIELDS.items():
        r = api.post("deployments", params={"deploymentId": uid("refused")},
                     json={"baseModel": ready_base.name, field: value})
        body = assert_rpc_error(r, 501, 12)
        assert field in body["message"], (field, body)
    r = api.post("deployments", params={"deploymentId": uid("refused"), "disableAutoDeploy": "true"},
                 json={"baseModel": ready_base.name})
    assert "disableAutoDeploy" in assert_rpc_error(r, 501, 12)["message"]
    # Speculation's numbers are checked: in range, and a draft size only with something to draft.
    for bad, words in [({"ngramSpeculationLength": 99}, "between 1 and 16"), ({"draftTokenCount": -1}, "between"),
                       ({"draftTokenCount": 4}, "ngramSpeculationLength")]:
        r = api.post("deployments", params={"deploymentId": uid("refused")}, json={"baseModel": ready_base.name, **bad})
        assert words in assert_rpc_error(r, 400, 3)["message"], bad
    assert api.names("deployments", "deployments") == before
    dep_id = uid("echo")
    created = api.ok_json("POST", "deployments", params={"deploymentId": dep_id, "skipShapeValidation": "true",
                                                         "disableSpeculativeDecoding": "true"},
                          json={"baseModel": ready_base.name, **ECHOED_DEPLOYMENT_FIELDS})
    got = api.ok_json("GET", f"deployments/{dep_id}")
    for field, value in ECHOED_DEPLOYMENT_FIELDS.items():
        assert created[field] == value and got[field] == value, field
    api.ok_json("DELETE", f"deployments/{dep_id}", params={"hard": "true"})


ECHOED_MODEL_FIELDS = {
    "githubUrl": "https://example.com/repo",
    "huggingFaceUrl": "https://example.com/hf",
    "supportsImageInput": False,
    "supportsTools": True,
    "supportsLora": True,
    "deprecationDate": {"year": 2030, "month": 1, "day": 2},
    "trainingContextLength": 2048,
    "snapshotType": "FULL_SNAPSHOT",
    "useHfApplyChatTemplate": True,
    "description": "as given",
}


def test_the_model_fields_table(api, uid, ready_base):
    before = model_names(api)
    for field, value in {"conversationConfig": {"style": "x"}, "teftDetails": {},
                         "useHfApplyChatTemplate": False}.items():
        r = api.post("models", json=base_body(uid("refused"), **{field: value}))
        assert field in assert_rpc_error(r, 501, 12)["message"], field
    assert model_names(api) == before
    model_id = uid("echo")
    create_model(api, base_body(model_id, **ECHOED_MODEL_FIELDS))
    got = api.ok_json("GET", f"models/{model_id}")
    for field, value in ECHOED_MODEL_FIELDS.items():
        assert got[field] == value, (field, got)
    assert got["baseModelDetails"]["checkpointFormat"] == "HUGGINGFACE"
    # Validation's checks cannot be skipped, nor code run.
    ready_id = ready_base.name.rsplit("/", 1)[1]
    for flag in ("skipHfConfigValidation", "configOnly", "trustRemoteCode"):
        r = api.get(f"models/{ready_id}:validateUpload", params={flag: "true"})
        assert flag in assert_rpc_error(r, 501, 12)["message"], flag
    # A read mask applies to the download endpoint's answer too.
    masked = api.ok_json("GET", f"models/{ready_id}:getDownloadEndpoint", params={"readMask": "name"})
    assert "filenameToSignedUrls" not in masked
    full = api.ok_json("GET", f"models/{ready_id}:getDownloadEndpoint")
    assert full["filenameToSignedUrls"]
    api.ok_json("DELETE", f"models/{model_id}")
