"""Deployments come alive: a deployment created through the API becomes engine replicas, and
the gateway routes OpenAI-style requests to them, through the official `openai` and
`fireworks-ai` clients. The model is the tiny Llama checkpoint of the engine's fixtures (a real
tokenizer and chat template, fast on CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from openai import OpenAI

import fixtures
from conftest import make_client

ENGINE_FIXTURE = Path(__file__).resolve().parents[2] / "crates/hearth-engine/tests/fixtures/tiny_llama"
FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def _upload_tiny(client, model_id: str) -> str:
    client.models.create(model_id=model_id, model={"kind": "HF_BASE_MODEL", "baseModelDetails": {}})
    fixtures.upload_model_files(client, model_id, {f: (ENGINE_FIXTURE / f).read_bytes() for f in FILES})
    client.models.validate_upload(model_id)
    model = client.models.get(model_id)
    assert model.state == "READY"
    return model.name


def _wait_state(client, dep_id: str, state: str, timeout: float = 60) -> object:
    deadline = time.monotonic() + timeout
    while True:
        d = client.deployments.get(dep_id)
        if d.state == state:
            return d
        assert time.monotonic() < deadline, f"deployment {dep_id} stayed {d.state}: {d.status}"
        time.sleep(0.2)


def _replica_pids(model_id: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"engine --model .*/models/{model_id} "], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.fixture(scope="module")
def hearth(hearth_live):
    """This module's server runs replicas."""
    return hearth_live


@pytest.fixture(scope="module")
def client(hearth):
    return make_client(hearth)


@pytest.fixture(scope="module")
def served(client, hearth, uid):
    model_id = uid("tiny-serve")
    name = _upload_tiny(client, model_id)
    dep_id = uid("live")
    client.deployments.create(base_model=name, deployment_id=dep_id, min_replica_count=1, max_replica_count=1,
                              enable_addons=True)
    d = _wait_state(client, dep_id, "READY")
    assert d.replica_count == 1
    yield model_id, name, dep_id
    client.deployments.delete(dep_id, hard=True, ignore_checks=True)


def _openai(hearth) -> OpenAI:
    return OpenAI(api_key=hearth.api_key, base_url=f"{hearth.base_url}/inference/v1", max_retries=0)


def test_a_deployment_serves_chat_and_completions_through_the_gateway(hearth, served):
    model_id, name, dep_id = served
    oa = _openai(hearth)
    chat = oa.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                      temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str)
    assert chat.usage.completion_tokens >= 1
    # The same through the explicit deployment, and under /v1 as the Fireworks SDK sends it.
    again = oa.chat.completions.create(model=f"{name}#accounts/{hearth.account}/deployments/{dep_id}",
                                       messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0)
    assert again.choices[0].message.content == chat.choices[0].message.content
    v1 = OpenAI(api_key=hearth.api_key, base_url=f"{hearth.base_url}/v1", max_retries=0)
    comp = v1.completions.create(model=name, prompt="Hello", max_tokens=4, temperature=0)
    assert comp.usage.completion_tokens == 4
    # Streaming passes through chunk by chunk and adds up to the same answer.
    stream = oa.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                        temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.choices[0].message.content
    models = [m.id for m in oa.models.list()]
    assert name in models


def test_the_fireworks_sdk_chats_through_the_gateway(hearth, client, served):
    model_id, name, dep_id = served
    resp = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0)
    assert resp.choices[0].message.role == "assistant"
    # The Fireworks SDK gets the answer the openai client gets for the same greedy request.
    same = _openai(hearth).chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=4, temperature=0)
    assert resp.choices[0].message.content == same.choices[0].message.content
    assert resp.choices[0].message.content
    assert resp.usage.completion_tokens == same.usage.completion_tokens >= 1
    assert resp.choices[0].finish_reason == same.choices[0].finish_reason


def test_inference_refusals(hearth, served):
    model_id, name, dep_id = served
    oa = _openai(hearth)
    import openai
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model=f"accounts/{hearth.account}/models/nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        OpenAI(api_key="wrong", base_url=f"{hearth.base_url}/inference/v1", max_retries=0).completions.create(
            model=name, prompt="x")
    # Another account may not use this account's deployment.
    other = OpenAI(api_key=hearth.api_key2, base_url=f"{hearth.base_url}/inference/v1", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        other.completions.create(model=f"{name}#accounts/{hearth.account}/deployments/{dep_id}", prompt="x")


def test_a_killed_replica_is_replaced_and_serves_again(hearth, client, served):
    model_id, name, dep_id = served
    pids = _replica_pids(model_id)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    start = time.monotonic()
    oa = _openai(hearth)
    # The request waits for the replacement rather than failing or hanging.
    out = oa.completions.create(model=name, prompt="Hello", max_tokens=2, temperature=0, timeout=30)
    assert out.usage.completion_tokens == 2
    assert time.monotonic() - start < 10
    new = _replica_pids(model_id)
    assert len(new) == 1 and new != pids
    assert client.deployments.get(dep_id).replica_count == 1


def test_a_deployment_at_zero_wakes_on_request_and_deletion_stops_replicas(hearth, client, uid):
    model_id = uid("tiny-zero")
    name = _upload_tiny(client, model_id)
    dep_id = uid("zero")
    client.deployments.create(base_model=name, deployment_id=dep_id, min_replica_count=0, max_replica_count=1)
    time.sleep(1.5)
    d = client.deployments.get(dep_id)
    assert (d.replica_count or 0) == 0 and not _replica_pids(model_id)
    out = _openai(hearth).completions.create(model=name, prompt="Hi", max_tokens=2, temperature=0, timeout=60)
    assert out.usage.completion_tokens == 2
    assert _wait_state(client, dep_id, "READY").replica_count == 1
    client.deployments.delete(dep_id)
    deadline = time.monotonic() + 10
    while _replica_pids(model_id):
        assert time.monotonic() < deadline, "replicas of a deleted deployment kept running"
        time.sleep(0.2)
    assert client.deployments.get(dep_id).state == "DELETED"
    client.deployments.delete(dep_id, hard=True)


def test_load_scales_a_deployment_up_after_its_window_and_back_down_after_its_own(hearth, client, uid):
    """Autoscaling from observed load: with a load target of one request per replica, steady
    concurrent traffic holds the recommendation at the maximum for the 1 s scale-up window,
    so a second replica starts; once traffic stops, the 3 s scale-down window brings it back
    to one (recently used: it stays warm rather than going to zero)."""
    import threading

    model_id = uid("tiny-scale")
    name = _upload_tiny(client, model_id)
    dep_id = uid("scale")
    api = fixtures.RawApi(hearth.base_url, hearth.api_key, hearth.account)
    api.ok_json("POST", "deployments", params={"deploymentId": dep_id}, json={
        "baseModel": name, "minReplicaCount": 1, "maxReplicaCount": 2,
        "autoscalingPolicy": {"scaleUpWindow": "1s", "scaleDownWindow": "3s", "loadTargets": {"default": 1 / 64}}})
    _wait_state(client, dep_id, "READY")
    oai = _openai(hearth)
    stop = threading.Event()
    errors: list = []

    def traffic() -> None:
        while not stop.is_set():
            try:
                oai.completions.create(model=name, prompt="Once", max_tokens=200, temperature=0,
                                       extra_body={"ignore_eos": True}, timeout=60)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    workers = [threading.Thread(target=traffic) for _ in range(6)]
    for w in workers:
        w.start()
    try:
        deadline = time.monotonic() + 30
        while (client.deployments.get(dep_id).replica_count or 0) < 2:
            assert not errors, errors
            assert time.monotonic() < deadline, f"load did not scale the deployment up: {client.deployments.get(dep_id)}"
            time.sleep(0.2)
        assert client.deployments.get(dep_id).desired_replica_count == 2
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert not errors, errors
    quiet = time.monotonic()
    while (client.deployments.get(dep_id).replica_count or 0) > 1:
        assert time.monotonic() < quiet + 30, "the deployment did not scale back down"
        time.sleep(0.2)
    # Not before its window: the last requests ended at `quiet`.
    assert time.monotonic() - quiet >= 2.5, "scaled down before the scale-down window held"
    d = client.deployments.get(dep_id)
    assert d.replica_count == 1 and d.desired_replica_count == 1 and d.state == "READY"
    client.deployments.delete(dep_id, hard=True, ignore_checks=True)


def test_a_model_that_cannot_load_fails_the_deployment_with_the_reason(hearth, client, uid, tmp_path):
    # What validates is what serves, so this model is damaged after validation, on disk and
    # outside any API (as a failing disk would): the replica refuses to start, with a reason.
    model_id = uid("tiny-broken")
    client.models.create(model_id=model_id, model={"kind": "HF_BASE_MODEL", "baseModelDetails": {}})
    files = {f: (ENGINE_FIXTURE / f).read_bytes() for f in FILES}
    fixtures.upload_model_files(client, model_id, files)
    client.models.validate_upload(model_id)
    weights = hearth.data_dir / "artifacts" / hearth.account / "models" / model_id / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    dep_id = uid("broken")
    client.deployments.create(base_model=f"accounts/{hearth.account}/models/{model_id}", deployment_id=dep_id,
                              min_replica_count=1, max_replica_count=1)
    d = _wait_state(client, dep_id, "FAILED")
    assert d.status and "model.safetensors" in d.status.message, d
    assert not _replica_pids(model_id)
    client.deployments.delete(dep_id, hard=True)


LORA_FIXTURES = Path(__file__).resolve().parents[2] / "crates/hearth-engine/tests/fixtures/lora"


def _wait_dm(client, dm_id: str, state: str, timeout: float = 30) -> object:
    deadline = time.monotonic() + timeout
    while True:
        dm = client.lora.get(dm_id)
        if dm.state == state:
            return dm
        assert time.monotonic() < deadline, f"deployed model {dm_id} stayed {dm.state}: {dm.status}"
        time.sleep(0.2)


def test_lora_addons_load_onto_replicas_and_answer_in_the_same_deployment(hearth, client, served, uid):
    model_id, base_name, dep_id = served
    dep_name = f"accounts/{hearth.account}/deployments/{dep_id}"
    addon_ids = []
    for fixture in ("attn_only", "all_linear"):
        addon_id = uid(f"lora-{fixture.replace('_', '-')}")
        client.models.create(model_id=addon_id, model={"kind": "HF_PEFT_ADDON", "peftDetails": {"baseModel": base_name}})
        files = {f: (LORA_FIXTURES / fixture / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}
        fixtures.upload_model_files(client, addon_id, files)
        client.models.validate_upload(addon_id)
        addon_ids.append(addon_id)
    dms = [client.lora.load(model=f"accounts/{hearth.account}/models/{a}", deployment=dep_name) for a in addon_ids]
    for dm in dms:
        _wait_dm(client, dm.name.rsplit("/", 1)[1], "DEPLOYED")

    oa = _openai(hearth)
    prompt = "Hello"
    def answer(model: str) -> str:
        return oa.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    base_text = answer(base_name)
    texts = [answer(f"accounts/{hearth.account}/models/{a}") for a in addon_ids]
    # Each adapter answers in its own way, and differently from the base model.
    assert texts[0] != base_text and texts[1] != base_text and texts[0] != texts[1], (base_text, texts)
    # Through the deployed model's own name, the same answer.
    assert answer(dms[0].name) == texts[0]
    # Base and adapters concurrently, in shared batches: each keeps its own answer.
    import concurrent.futures as cf
    models = [base_name] + [f"accounts/{hearth.account}/models/{a}" for a in addon_ids]
    with cf.ThreadPoolExecutor(12) as ex:
        got = list(ex.map(answer, models * 4))
    assert got == [base_text, *texts] * 4

    # Unloading removes the adapter from the replica; its model is then not servable there.
    client.lora.unload(dms[1].name.rsplit("/", 1)[1])
    import openai
    deadline = time.monotonic() + 10
    while True:
        try:
            answer(f"accounts/{hearth.account}/models/{addon_ids[1]}")
        except (openai.BadRequestError, openai.NotFoundError):
            break
        assert time.monotonic() < deadline, "an unloaded adapter kept answering"
        time.sleep(0.2)
    client.lora.unload(dms[0].name.rsplit("/", 1)[1])


def test_the_whole_flow_through_the_official_clients(hearth, client, uid):
    """Upload a base and two LoRAs, deploy, load both, chat with the base and both adapters at
    once (each answers its own way), stream, unload one, soft delete, undelete, hard delete:
    the control plane through the fireworks-ai SDK, inference through the openai client."""
    import concurrent.futures as cf
    import openai

    base_id = uid("flow-base")
    base = _upload_tiny(client, base_id)
    addons = []
    for fixture in ("attn_only", "all_linear"):
        addon_id = uid(f"flow-{fixture.replace('_', '-')}")
        client.models.create(model_id=addon_id, model={"kind": "HF_PEFT_ADDON", "peftDetails": {"baseModel": base}})
        fixtures.upload_model_files(client, addon_id, {f: (LORA_FIXTURES / fixture / f).read_bytes()
                                                       for f in ("adapter_config.json", "adapter_model.safetensors")})
        client.models.validate_upload(addon_id)
        assert client.models.get(addon_id).state == "READY"
        addons.append(f"accounts/{hearth.account}/models/{addon_id}")
    dep_id = uid("flow")
    client.deployments.create(base_model=base, deployment_id=dep_id, min_replica_count=1, max_replica_count=1,
                              enable_addons=True)
    _wait_state(client, dep_id, "READY")
    dep_name = f"accounts/{hearth.account}/deployments/{dep_id}"
    dms = [client.lora.load(model=a, deployment=dep_name) for a in addons]
    for dm in dms:
        _wait_dm(client, dm.name.rsplit("/", 1)[1], "DEPLOYED")

    oa = _openai(hearth)

    def chat(model: str) -> str:
        r = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
                                       temperature=0)
        return r.choices[0].message.content

    alone = {m: chat(m) for m in [base, *addons]}
    assert len(set(alone.values())) == 3, alone
    with cf.ThreadPoolExecutor(9) as ex:
        together = list(ex.map(chat, [base, *addons] * 3))
    assert together == [alone[base], alone[addons[0]], alone[addons[1]]] * 3
    stream = oa.chat.completions.create(model=addons[0], messages=[{"role": "user", "content": "Hello"}],
                                        max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == alone[addons[0]]

    client.lora.unload(dms[1].name.rsplit("/", 1)[1])
    with pytest.raises((openai.BadRequestError, openai.NotFoundError)):
        chat(addons[1])
    assert chat(addons[0]) == alone[addons[0]]

    # Soft delete with the adapter still loaded (ignoreChecks, which unloads it too).
    client.deployments.delete(dep_id, ignore_checks=True)
    assert client.deployments.get(dep_id).state == "DELETED"
    deadline = time.monotonic() + 15
    while _replica_pids(base_id):
        assert time.monotonic() < deadline, "replicas of a deleted deployment kept running"
        time.sleep(0.2)
    with pytest.raises(openai.BadRequestError, match="no deployment"):
        chat(base)
    assert client.lora.list().deployed_models in (None, []) or all(
        d.deployment != dep_name for d in client.lora.list().deployed_models)
    client.deployments.undelete(dep_id, body={})
    _wait_state(client, dep_id, "READY")
    again = client.lora.load(model=addons[0], deployment=dep_name)
    _wait_dm(client, again.name.rsplit("/", 1)[1], "DEPLOYED")
    assert chat(addons[0]) == alone[addons[0]] and chat(base) == alone[base]

    client.deployments.delete(dep_id, hard=True, ignore_checks=True)
    with pytest.raises(Exception) as gone:
        client.deployments.get(dep_id)
    assert getattr(gone.value, "status_code", None) == 404


def test_a_models_conversation_config_renders_its_chats(client, hearth, uid):
    """A model's conversationConfig: its template replaces the checkpoint's chat template, and
    its system message is what a conversation without one gets, through the SDK and the gateway."""
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    system = "Answer in one short sentence, always."
    plain_id, styled_id = uid("conv-plain"), uid("conv-styled")
    plain = _upload_tiny(client, plain_id)
    client.models.create(model_id=styled_id, model={"kind": "HF_BASE_MODEL", "baseModelDetails": {},
                                                    "conversationConfig": {"template": template, "system": system}})
    fixtures.upload_model_files(client, styled_id, {f: (ENGINE_FIXTURE / f).read_bytes() for f in FILES})
    client.models.validate_upload(styled_id)
    styled = client.models.get(styled_id)
    assert styled.conversation_config.template == template and styled.conversation_config.system == system
    deps = []
    for name in (plain, styled.name):
        dep_id = uid("conv")
        client.deployments.create(base_model=name, deployment_id=dep_id, min_replica_count=1, max_replica_count=1)
        deps.append(dep_id)
    for dep_id in deps:
        _wait_state(client, dep_id, "READY")
    oa = _openai(hearth)

    def prompt_tokens(model, messages):
        r = oa.chat.completions.create(model=model, messages=messages, max_tokens=1, temperature=0)
        return r.usage.prompt_tokens

    hi = [{"role": "user", "content": "hi"}]
    with_system = [{"role": "system", "content": system}] + hi
    # Without a system message of its own, the styled model's conversation gets the model's:
    # the same prompt as when the request sends it.
    assert prompt_tokens(styled.name, hi) == prompt_tokens(styled.name, with_system)
    assert prompt_tokens(styled.name, [{"role": "system", "content": "Be long."}] + hi) != prompt_tokens(styled.name, hi)
    # Its template is not the checkpoint's: the same conversation renders differently.
    assert prompt_tokens(styled.name, with_system) != prompt_tokens(plain, with_system)
    # The plain model adds no system message of its own.
    assert prompt_tokens(plain, hi) != prompt_tokens(plain, with_system)

    # A template that does not compile fails the deployment, saying why.
    broken_id = uid("conv-broken")
    client.models.create(model_id=broken_id, model={"kind": "HF_BASE_MODEL", "baseModelDetails": {},
                                                    "conversationConfig": {"template": "{% for m in messages %}"}})
    fixtures.upload_model_files(client, broken_id, {f: (ENGINE_FIXTURE / f).read_bytes() for f in FILES})
    client.models.validate_upload(broken_id)
    dep_id = uid("conv-broken")
    client.deployments.create(base_model=client.models.get(broken_id).name, deployment_id=dep_id,
                              min_replica_count=1, max_replica_count=1)
    d = _wait_state(client, dep_id, "FAILED")
    assert "chat-template" in d.status.message, d.status
    for dep in deps + [dep_id]:
        client.deployments.delete(dep, hard=True)


def test_a_checkpoints_sampling_defaults_apply_to_requests_that_leave_them_unset(client, hearth, uid, served):
    """generation_config.json's sampling parameters are the model's defaultSamplingParams, and
    what a request that does not set them gets."""
    model_id = uid("gen-config")
    client.models.create(model_id=model_id, model={"kind": "HF_BASE_MODEL", "baseModelDetails": {}})
    files = {f: (ENGINE_FIXTURE / f).read_bytes() for f in FILES}
    files["generation_config.json"] = json.dumps({"do_sample": True, "top_k": 1, "temperature": 0.7}).encode()
    fixtures.upload_model_files(client, model_id, files)
    client.models.validate_upload(model_id)
    model = client.models.get(model_id)
    assert model.default_sampling_params == {"top_k": 1.0, "temperature": 0.7}, model.default_sampling_params
    dep_id = uid("gen-config")
    client.deployments.create(base_model=model.name, deployment_id=dep_id, min_replica_count=1, max_replica_count=1)
    _wait_state(client, dep_id, "READY")
    oa = _openai(hearth)

    def text(name, seed, **extra):
        return oa.completions.create(model=name, prompt="Once", max_tokens=12, seed=seed,
                                     extra_body={"ignore_eos": True, **extra}).choices[0].text

    # top_k 1 by default: every seed gives the one most likely text.
    assert text(model.name, 1) == text(model.name, 2) == text(model.name, 3)
    # A request that sets top_k samples as it asks.
    assert len({text(model.name, s, top_k=0) for s in (1, 2, 3)}) > 1
    # The same checkpoint without the file samples from the whole distribution by default.
    _, plain, _ = served
    assert len({text(plain, s) for s in (1, 2, 3)}) > 1
    client.deployments.delete(dep_id, hard=True)


def test_a_direct_route_serves_its_deployment_with_its_own_keys(client, hearth, uid, served):
    """directRouteType INTERNET: the deployment gets an endpoint of its own (directRouteHandle,
    host:port) that answers the OpenAI routes with its directRouteApiKeys only; the keys are
    never shown again, and a new list takes effect at once."""
    import openai as openai_module
    import requests

    model_id = uid("direct")
    name = _upload_tiny(client, model_id)
    dep_id = uid("direct")
    client.deployments.create(base_model=name, deployment_id=dep_id, min_replica_count=1, max_replica_count=1,
                              direct_route_type="INTERNET", direct_route_api_keys=["dk-one-secret"])
    _wait_state(client, dep_id, "READY")
    deadline = time.monotonic() + 10
    while not (dep := client.deployments.get(dep_id)).direct_route_handle:
        assert time.monotonic() < deadline, "no directRouteHandle"
        time.sleep(0.2)
    handle = dep.direct_route_handle
    assert dep.direct_route_type == "INTERNET" and not dep.direct_route_api_keys, dep
    direct = lambda key: OpenAI(api_key=key, base_url=f"http://{handle}/v1", max_retries=0)
    chat = direct("dk-one-secret").chat.completions.create(
        model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].message.content is not None
    # The account's own key does not open it, nor a guess; another model is not served there.
    for key in (hearth.api_key, "dk-guess"):
        with pytest.raises(openai_module.AuthenticationError):
            direct(key).completions.create(model=name, prompt="Hi", max_tokens=1)
    _, other, _ = served
    with pytest.raises(openai_module.BadRequestError) as e:
        direct("dk-one-secret").completions.create(model=other, prompt="Hi", max_tokens=1)
    assert dep_id in str(e.value), e.value
    # A new list of keys: the old one is refused at once, the new one works.
    client.deployments.update(dep_id, base_model=name, direct_route_api_keys=["dk-two-secret"])
    with pytest.raises(openai_module.AuthenticationError):
        direct("dk-one-secret").completions.create(model=name, prompt="Hi", max_tokens=1)
    direct("dk-two-secret").completions.create(model=name, prompt="Hi", max_tokens=1)
    # An update that does not send keys keeps them.
    client.deployments.update(dep_id, base_model=name, display_name="renamed")
    direct("dk-two-secret").completions.create(model=name, prompt="Hi", max_tokens=1)
    # Deleted, the route closes.
    client.deployments.delete(dep_id, hard=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            requests.post(f"http://{handle}/v1/completions", timeout=2)
        except requests.ConnectionError:
            break
        assert time.monotonic() < deadline, "the direct route stayed open"
        time.sleep(0.2)


def test_session_affinity_keeps_each_session_on_one_of_three_replicas(client, hearth, uid):
    """enableSessionAffinity: requests with the same prompt_cache_key (else user, else the
    x-session-affinity header) go to the same replica, and sessions spread over the replicas."""
    import requests

    name = _upload_tiny(client, uid("affinity"))
    dep_id = uid("affinity")
    client.deployments.create(base_model=name, deployment_id=dep_id, min_replica_count=3, max_replica_count=3,
                              enable_session_affinity=True)
    d = _wait_state(client, dep_id, "READY")
    deadline = time.monotonic() + 60
    while client.deployments.get(dep_id).replica_count != 3:
        assert time.monotonic() < deadline, "three replicas never became ready"
        time.sleep(0.2)
    assert d.enable_session_affinity is True
    url = f"{hearth.base_url}/inference/v1/completions"
    auth = {"Authorization": f"Bearer {hearth.api_key}"}

    def replica(body_extra=None, headers=None):
        body = {"model": name, "prompt": "Hi", "max_tokens": 1, **(body_extra or {})}
        r = requests.post(url, json=body, headers={**auth, **(headers or {})}, timeout=30)
        assert r.status_code == 200, r.text
        return r.headers["x-hearth-replica"]

    for make in (lambda k: ({"prompt_cache_key": k}, None), lambda k: ({"user": k}, None),
                 lambda k: (None, {"x-session-affinity": k})):
        homes = {}
        for i in range(12):
            body, headers = make(f"session-{i}")
            seen = {replica(body, headers) for _ in range(3)}
            assert len(seen) == 1, f"session-{i} moved between replicas: {seen}"
            homes[i] = seen.pop()
        assert len(set(homes.values())) >= 2, f"12 sessions all on one replica: {homes}"
    # prompt_cache_key outranks user.
    assert replica({"prompt_cache_key": "session-1", "user": "session-2"}) == replica({"prompt_cache_key": "session-1"})
    client.deployments.delete(dep_id, hard=True)
