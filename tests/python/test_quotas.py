"""Quotas and inference rate limits, through the official clients: every account has every
quota (docs/quotas.md), an account may lower its own limits, a create past a limit is refused
with RESOURCE_EXHAUSTED naming the quota (and the SDK does not retry it), and inference past
the account's requests or tokens per minute gets 429 with a retry-after the `openai` client
honours. A server of its own, so lowered limits touch no other test's account."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Tuple

import fireworks
import httpx
import openai
import pytest
from openai import OpenAI

import fixtures
from conftest import _serve, make_client
from fixtures import RawApi, assert_rpc_error, assert_sdk_error

RESOURCE_EXHAUSTED = 8
ENGINE_FIXTURE = Path(__file__).resolve().parents[2] / "crates/hearth-engine/tests/fixtures/tiny_llama"
FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def server():
    yield from _serve("local")


@pytest.fixture(scope="module")
def api(server) -> RawApi:
    return RawApi(server.base_url, server.api_key, server.account)


def _quota(api: RawApi, qid: str) -> dict:
    return api.ok_json("GET", f"quotas/{qid}")


def _set(api: RawApi, qid: str, value: int) -> dict:
    q = api.ok_json("PATCH", f"quotas/{qid}", json={"value": str(value)})
    assert q["value"] == str(value), q
    return q


def _counting(server) -> Tuple[fireworks.Fireworks, List[str]]:
    sent: List[str] = []
    http = httpx.Client(timeout=30, event_hooks={"request": [lambda r: sent.append(f"{r.method} {r.url.path}")]})
    return make_client(server, http_client=http), sent


def test_every_quota_is_listed_and_only_its_value_can_change(api, server):
    listed = api.list_all("quotas", "quotas")
    ids = {q["name"].rsplit("/", 1)[1] for q in listed}
    assert {"models", "deployments", "replicas", "stored-bytes", "loaded-addons", "requests-per-minute",
            "tokens-per-minute", "accelerators-nvidia-h100-80gb"} <= ids, ids
    for q in listed:
        assert q["name"].startswith(f"accounts/{server.account}/quotas/")
        assert int(q["value"]) <= int(q["maxValue"]) and "usage" in q, q

    models = _quota(api, "models")
    assert_rpc_error(api.patch("quotas/models", json={"value": str(int(models["maxValue"]) + 1)}), 400, 3)
    assert_rpc_error(api.patch("quotas/models", json={"value": "-1"}), 400, 3)
    body = assert_rpc_error(api.patch("quotas/models", json={"value": "5", "maxValue": "999999"}), 403, 7)
    assert "--quota" in body["message"], body
    assert_rpc_error(api.patch("quotas/modles", json={"value": "5"}), 404, 5)
    assert_rpc_error(api.patch("quotas/models", json={"value": "5", "colour": "red"}), 400, 3)
    assert _quota(api, "models") == models, "refused updates change nothing"
    # Another account may not see or change them.
    other = RawApi(server.base_url, server.api_key2, server.account)
    assert_rpc_error(other.get("quotas/models"), 403, 7)
    assert_rpc_error(other.patch("quotas/models", json={"value": "1"}), 403, 7)


def test_a_create_past_the_models_quota_is_refused_and_not_retried(api, server):
    used = int(_quota(api, "models")["usage"])
    q = _set(api, "models", used + 2)
    assert q["usage"] == used and q.get("updateTime"), q
    client, sent = _counting(server)
    for i in range(2):
        client.models.create(model_id=f"q-model-{i}", model={"kind": "HF_BASE_MODEL", "baseModelDetails": {}})
    sent.clear()
    with pytest.raises(fireworks.APIStatusError) as e:
        client.models.create(model_id="q-model-2", model={"kind": "HF_BASE_MODEL", "baseModelDetails": {}})
    body = assert_sdk_error(e.value, 429, RESOURCE_EXHAUSTED)
    assert "quotas/models" in body["message"] and f"{used + 2} models allowed" in body["message"], body
    assert sent == [f"POST /v1/accounts/{server.account}/models"], f"the SDK retried a quota refusal: {sent}"
    assert_rpc_error(api.get("models/q-model-2"), 404, 5)
    assert _quota(api, "models")["usage"] == used + 2
    # Deleting one makes room.
    client.models.delete("q-model-0")
    client.models.create(model_id="q-model-2", model={"kind": "HF_BASE_MODEL", "baseModelDetails": {}})
    _set(api, "models", int(q["maxValue"]))


def test_replicas_are_counted_at_create_update_and_undelete(api, server, tmp_path):
    base = fixtures.create_ready_base_model(make_client(server), "q-base", tmp_path / "base")
    _set(api, "replicas", 2)
    _set(api, "accelerators-nvidia-h100-80gb", 2)
    body = {"baseModel": base.name, "minReplicaCount": 0, "maxReplicaCount": 2}
    api.ok_json("POST", "deployments", params={"deploymentId": "q-one"}, json=body)
    r = api.post("deployments", params={"deploymentId": "q-two"}, json={**body, "maxReplicaCount": 1})
    assert "quotas/replicas" in assert_rpc_error(r, 429, RESOURCE_EXHAUSTED)["message"]
    assert_rpc_error(api.post("deployments", params={"deploymentId": "q-two", "validateOnly": "true"},
                              json={**body, "maxReplicaCount": 1}), 429, RESOURCE_EXHAUSTED)
    assert_rpc_error(api.patch("deployments/q-one", json={"maxReplicaCount": 3}), 429, RESOURCE_EXHAUSTED)
    assert _quota(api, "replicas")["usage"] == 2
    # Lowering is always allowed; the freed replica can go to another deployment, with its
    # accelerators counted against their own quota.
    api.ok_json("PATCH", "deployments/q-one", json={"maxReplicaCount": 1})
    h100 = {**body, "maxReplicaCount": 1, "acceleratorType": "NVIDIA_H100_80GB", "acceleratorCount": 4}
    r = api.post("deployments", params={"deploymentId": "q-two"}, json=h100)
    assert "accelerators-nvidia-h100-80gb" in assert_rpc_error(r, 429, RESOURCE_EXHAUSTED)["message"]
    api.ok_json("POST", "deployments", params={"deploymentId": "q-two"}, json={**h100, "acceleratorCount": 2})
    assert _quota(api, "accelerators-nvidia-h100-80gb")["usage"] == 2
    # A deleted deployment holds nothing; undeleting it must fit again.
    api.ok_json("DELETE", "deployments/q-one")
    api.ok_json("POST", "deployments", params={"deploymentId": "q-three"}, json={**body, "maxReplicaCount": 1})
    assert_rpc_error(api.post("deployments/q-one:undelete", json={}), 429, RESOURCE_EXHAUSTED)
    for d in ("q-one", "q-two", "q-three"):
        api.ok_json("DELETE", f"deployments/{d}", params={"hard": "true"})
    _set(api, "replicas", int(_quota(api, "replicas")["maxValue"]))


def test_stored_bytes_and_loaded_addons_are_limited(api, server, tmp_path):
    used = int(_quota(api, "stored-bytes")["usage"])
    _set(api, "stored-bytes", used + 100)
    api.ok_json("POST", "models", json={"modelId": "q-bytes", "model": {"kind": "HF_BASE_MODEL", "baseModelDetails": {}}})
    r = api.post("models/q-bytes:getUploadEndpoint", json={"filenameToSize": {"a.bin": "60", "b.bin": "41"}})
    assert "quotas/stored-bytes" in assert_rpc_error(r, 429, RESOURCE_EXHAUSTED)["message"]
    api.ok_json("POST", "models/q-bytes:getUploadEndpoint", json={"filenameToSize": {"a.bin": "60", "b.bin": "40"}})
    _set(api, "stored-bytes", int(_quota(api, "stored-bytes")["maxValue"]))

    client = make_client(server)
    base = fixtures.create_ready_base_model(client, "q-lbase", tmp_path / "lbase")
    addon = fixtures.create_ready_addon(client, "q-lora", base.name, tmp_path / "lora")
    api.ok_json("POST", "deployments", params={"deploymentId": "q-addons"},
                json={"baseModel": base.name, "minReplicaCount": 0, "enableAddons": True})
    _set(api, "loaded-addons", 0)
    r = api.post("deployedModels", json={"model": addon.name, "deployment": f"accounts/{api.account}/deployments/q-addons"})
    assert "quotas/loaded-addons" in assert_rpc_error(r, 429, RESOURCE_EXHAUSTED)["message"]
    _set(api, "loaded-addons", 1)
    api.ok_json("POST", "deployedModels", json={"model": addon.name, "deployment": f"accounts/{api.account}/deployments/q-addons"})
    assert _quota(api, "loaded-addons")["usage"] == 1
    api.ok_json("DELETE", "deployments/q-addons", params={"hard": "true", "ignoreChecks": "true"})


@pytest.fixture(scope="module")
def served(server, api):
    client = make_client(server)
    client.models.create(model_id="q-tiny", model={"kind": "HF_BASE_MODEL", "baseModelDetails": {}})
    fixtures.upload_model_files(client, "q-tiny", {f: (ENGINE_FIXTURE / f).read_bytes() for f in FILES})
    client.models.validate_upload("q-tiny")
    name = client.models.get("q-tiny").name
    api.ok_json("POST", "deployments", params={"deploymentId": "q-live"},
                json={"baseModel": name, "minReplicaCount": 1, "maxReplicaCount": 1})
    deadline = time.monotonic() + 60
    while api.ok_json("GET", "deployments/q-live")["state"] != "READY":
        assert time.monotonic() < deadline, "q-live never became READY"
        time.sleep(0.2)
    yield name
    api.ok_json("DELETE", "deployments/q-live", params={"hard": "true"})


def _openai(server, retries: int) -> OpenAI:
    return OpenAI(api_key=server.api_key, base_url=f"{server.base_url}/inference/v1", max_retries=retries)


def test_requests_past_the_rate_get_429_with_retry_after_and_the_client_retries(api, server, served):
    _set(api, "requests-per-minute", 120)  # a burst of 120, then 2 a second
    bare = _openai(server, 0)
    served_ok, limited = 0, []
    for _ in range(200):
        try:
            bare.completions.create(model=served, prompt="Hi", max_tokens=1)
            served_ok += 1
        except openai.RateLimitError as e:
            limited.append(e)
    assert limited, "200 requests at 120 a minute: some must be refused"
    assert served_ok >= 120, served_ok
    e = limited[-1]
    assert int(e.response.headers["retry-after"]) >= 1, e.response.headers
    assert "requests-per-minute" in e.body["message"], e.body
    # The official client waits as told and gets through.
    patient = _openai(server, 3)
    t0 = time.monotonic()
    for _ in range(3):
        patient.completions.create(model=served, prompt="Hi", max_tokens=1)
    assert time.monotonic() - t0 >= 0.5, "the retries waited for the bucket to refill"
    assert float(_quota(api, "requests-per-minute")["usage"]) > 100
    _set(api, "requests-per-minute", int(_quota(api, "requests-per-minute")["maxValue"]))


def test_tokens_are_charged_from_usage_and_streams_keep_their_shape(api, server, served):
    _set(api, "tokens-per-minute", 1000)
    bare = _openai(server, 0)
    # A stream that did not ask for usage gets none; its tokens are charged all the same.
    chunks = list(bare.chat.completions.create(model=served, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=40, stream=True, extra_body={"ignore_eos": True}))
    assert chunks and all(c.usage is None for c in chunks), [c.usage for c in chunks if c.usage]
    used = float(_quota(api, "tokens-per-minute")["usage"])
    assert used >= 40, used
    # One that asks for it gets it, once, last.
    chunks = list(bare.chat.completions.create(model=served, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=40, stream=True, stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True}))
    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-1] and with_usage[0].usage.completion_tokens == 40
    assert float(_quota(api, "tokens-per-minute")["usage"]) >= used + 40

    # At 60 a minute, one generation of 100 puts the bucket in debt, and the next request waits
    # until it is paid off, told how long.
    _set(api, "tokens-per-minute", 60)
    bare.completions.create(model=served, prompt="Hi", max_tokens=100, extra_body={"ignore_eos": True})
    with pytest.raises(openai.RateLimitError) as e:
        bare.completions.create(model=served, prompt="Hi", max_tokens=1)
    assert "tokens-per-minute" in e.value.body["message"], e.value.body
    assert int(e.value.response.headers["retry-after"]) >= 30, e.value.response.headers
    _set(api, "tokens-per-minute", int(_quota(api, "tokens-per-minute")["maxValue"]))
