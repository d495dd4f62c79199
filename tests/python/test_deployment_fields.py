"""Deployment fields that hearth accepts are acted on: `maxContextLength` bounds what a replica
serves, prompt and generation together, and `expireTime` deletes the deployment when it comes."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
import requests

import fixtures
from conftest import make_client

TINY = Path(__file__).resolve().parents[2] / "crates/hearth-engine/tests/fixtures/tiny_llama"
HF_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def hearth(hearth_live):
    return hearth_live


@pytest.fixture(scope="module")
def client(hearth):
    return make_client(hearth)


def _complete(hearth, model: str, prompt: list, max_tokens: int) -> requests.Response:
    return requests.post(f"{hearth.base_url}/inference/v1/completions",
                         headers={"Authorization": f"Bearer {hearth.api_key}"},
                         json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                               "ignore_eos": True},
                         timeout=60)


def test_max_context_length_bounds_prompt_and_generation(hearth, client, uid):
    model_id = uid("ctx")
    client.models.create(model_id=model_id, model={"kind": "HF_BASE_MODEL", "baseModelDetails": {}})
    fixtures.upload_model_files(client, model_id, {f: (TINY / f).read_bytes() for f in HF_FILES})
    client.models.validate_upload(model_id)
    name = f"accounts/{hearth.account}/models/{model_id}"
    dep_id = uid("ctx")
    # The model's own context is 256 tokens.
    client.deployments.create(base_model=name, deployment_id=dep_id, min_replica_count=1, max_replica_count=1,
                              max_context_length=64)
    fixtures.wait_deployment(client, dep_id, lambda d: d.state == "READY", "READY")
    model = f"{name}#accounts/{hearth.account}/deployments/{dep_id}"
    # A prompt that does not fit is refused, saying so.
    r = _complete(hearth, model, [5] * 80, 4)
    assert r.status_code == 400, r.text
    assert "80 tokens; this deployment serves at most 64 tokens" in r.json()["error"]["message"]
    # A max_tokens beyond the whole bound can never be honoured: refused, naming it.
    r = _complete(hearth, model, [5, 6, 7, 8, 9, 10], 200)
    assert r.status_code == 400 and "max_tokens is 200" in r.json()["error"]["message"], r.text
    # One that fits generates up to the bound, not beyond (max_tokens lowered to fit, as
    # context_length_exceeded_behavior "truncate", the default, says).
    r = _complete(hearth, model, [5, 6, 7, 8, 9, 10], 60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == 64
    # Raised by an update, the replicas roll to the new bound.
    client.deployments.update(dep_id, base_model=name, max_context_length=128)
    deadline = time.monotonic() + 60
    while True:
        r = _complete(hearth, model, [5] * 80, 4)
        if r.status_code == 200:
            break
        assert time.monotonic() < deadline, f"the new bound never took effect: {r.text}"
        time.sleep(0.2)
    client.deployments.delete(dep_id, hard=True)


def test_a_deployment_past_its_expire_time_is_deleted(hearth, client, uid, tmp_path):
    base = fixtures.create_ready_base_model(client, uid("expire-base"), tmp_path)
    dep_id = uid("expire")
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2)
    client.deployments.create(base_model=base.name, deployment_id=dep_id, min_replica_count=0, max_replica_count=1,
                              expire_time=soon.isoformat())
    d = client.deployments.get(dep_id)
    assert d.state != "DELETED"
    d = fixtures.wait_deployment(client, dep_id, lambda d: d.state == "DELETED", "DELETED at its expireTime", timeout=30)
    assert d.delete_time is not None
    # Soft-deleted, as a user's delete is: it can be brought back, and the expireTime that
    # has passed goes with the undelete (else it would be deleted again at once).
    client.deployments.undelete(dep_id, body={})
    d = client.deployments.get(dep_id)
    assert d.state != "DELETED" and d.expire_time is None, d
    client.deployments.delete(dep_id, hard=True)


def test_a_public_deployed_model_serves_other_accounts(hearth, client, uid, tmp_path):
    base = fixtures.create_ready_base_model(client, uid("pub-base"), tmp_path / "base")
    addon = fixtures.create_ready_addon(client, uid("pub-lora"), base.name, tmp_path / "lora")
    dep_id = uid("pub")
    client.deployments.create(base_model=base.name, deployment_id=dep_id, min_replica_count=1, max_replica_count=1,
                              enable_addons=True)
    fixtures.wait_deployment(client, dep_id, lambda d: d.state == "READY", "READY")
    deployment = f"accounts/{hearth.account}/deployments/{dep_id}"
    r = requests.post(f"{hearth.base_url}/v1/accounts/{hearth.account}/deployedModels",
                      headers={"Authorization": f"Bearer {hearth.api_key}"},
                      json={"model": addon.name, "deployment": deployment, "public": True},
                      timeout=30)
    assert r.status_code == 200, r.text
    dm_name = r.json()["name"]
    deadline = time.monotonic() + 60
    while client.lora.get(dm_name.rsplit("/", 1)[1]).state != "DEPLOYED":
        assert time.monotonic() < deadline
        time.sleep(0.2)

    def ask(key: str) -> requests.Response:
        return requests.post(f"{hearth.base_url}/inference/v1/completions",
                             headers={"Authorization": f"Bearer {key}"},
                             json={"model": dm_name, "prompt": "Hello", "max_tokens": 4, "temperature": 0},
                             timeout=60)

    mine, theirs = ask(hearth.api_key), ask(hearth.api_key2)
    assert mine.status_code == 200 and theirs.status_code == 200, (mine.text, theirs.text)
    assert mine.json()["choices"][0]["text"] == theirs.json()["choices"][0]["text"]
    # Made private, it serves its own account only.
    r = requests.patch(f"{hearth.base_url}/v1/{dm_name}", headers={"Authorization": f"Bearer {hearth.api_key}"},
                       json={"public": False}, timeout=30)
    assert r.status_code == 200, r.text
    assert ask(hearth.api_key2).status_code == 403
    assert ask(hearth.api_key).status_code == 200
    client.deployments.delete(dep_id, hard=True, ignore_checks=True)
