"""What applications need from the inference API, through the gateway with the official `openai`
client, on the default model (SmolLM2, GGUF) and on a LoRA of it in the same deployment: JSON
that always parses and validates, tool calls in OpenAI's shape (whole and streamed), the whole
tool flow back to a final answer, a shared system prompt computed once (the prefix cache), and
bad input refused with a message."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import fireworks
import jsonschema
import openai
import pytest
import requests
from openai import OpenAI

import fixtures
from conftest import make_client

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
PIRATE = ROOT / "crates/hearth-engine/tests/fixtures/lora/pirate"

pytestmark = pytest.mark.skipif(not SMOLLM2.exists(), reason="the default model is absent; scripts/fetch-model fetches it")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}}, "required": ["zone"]}}}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                         "population": {"type": "integer", "minimum": 0, "maximum": 10**9}},
        "required": ["city", "population"], "additionalProperties": False}


@pytest.fixture(scope="module")
def hearth(hearth_live):
    return hearth_live


@pytest.fixture(scope="module")
def served(hearth, uid):
    """SmolLM2 deployed with the pirate LoRA loaded: (base model name, LoRA model name)."""
    client = make_client(hearth)
    base_id = uid("smol-structured")
    client.models.create(model_id=base_id, model={"kind": "HF_BASE_MODEL", "baseModelDetails": {}})
    fixtures.upload_model_files(client, base_id, {"model.gguf": SMOLLM2.read_bytes()})
    client.models.validate_upload(base_id)
    base = client.models.get(base_id).name
    lora_id = uid("pirate-structured")
    client.models.create(model_id=lora_id, model={"kind": "HF_PEFT_ADDON", "peftDetails": {"baseModel": base}})
    fixtures.upload_model_files(client, lora_id, {f: (PIRATE / f).read_bytes()
                                                  for f in ("adapter_config.json", "adapter_model.safetensors")})
    client.models.validate_upload(lora_id)
    dep_id = uid("structured")
    client.deployments.create(base_model=base, deployment_id=dep_id, min_replica_count=1, max_replica_count=1,
                              enable_addons=True)
    deadline = time.monotonic() + 120
    while client.deployments.get(dep_id).state != "READY":
        assert time.monotonic() < deadline, client.deployments.get(dep_id).status
        time.sleep(0.2)
    lora = f"accounts/{hearth.account}/models/{lora_id}"
    dm = client.lora.load(model=lora, deployment=f"accounts/{hearth.account}/deployments/{dep_id}")
    while client.lora.get(dm.name.rsplit("/", 1)[1]).state != "DEPLOYED":
        assert time.monotonic() < deadline, client.lora.get(dm.name.rsplit("/", 1)[1]).status
        time.sleep(0.2)
    yield base, lora
    client.deployments.delete(dep_id, hard=True, ignore_checks=True)


@pytest.fixture(scope="module")
def oa(hearth) -> OpenAI:
    return OpenAI(api_key=hearth.api_key, base_url=f"{hearth.base_url}/inference/v1", max_retries=0)


def _ask(text: str):
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("which", ["base", "lora"])
def test_json_modes_always_parse_and_validate(oa, served, which):
    model = served[0] if which == "base" else served[1]
    r = oa.chat.completions.create(model=model, messages=_ask(
        'What is the capital of France? Answer as JSON with the key "capital".'), max_tokens=60,
                                   response_format={"type": "json_object"}, temperature=0)
    assert r.choices[0].finish_reason == "stop", r
    assert isinstance(json.loads(r.choices[0].message.content), dict), r.choices[0].message.content
    schema_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    for seed in range(4):
        r = oa.chat.completions.create(model=model, messages=_ask("Describe Paris."), max_tokens=120, seed=seed,
                                       temperature=0.9, response_format=schema_format)
        assert r.choices[0].finish_reason == "stop", r
        jsonschema.validate(json.loads(r.choices[0].message.content), CITY)
    # Streamed, the chunks join into the same valid document.
    chunks = oa.chat.completions.create(model=model, messages=_ask("Describe Rome."), max_tokens=80,
                                        temperature=0, response_format=schema_format, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), CITY)
    # On /completions too, Fireworks' form: the schema inside json_object.
    r = oa.completions.create(model=model, prompt="A city as JSON:", max_tokens=80, temperature=0,
                              extra_body={"response_format": {"type": "json_object", "schema": CITY}})
    jsonschema.validate(json.loads(r.choices[0].text), CITY)
    # Fireworks' grammar form: GBNF.
    gbnf = 'root ::= "The capital is " [A-Z] [a-z]{1,12} "."'
    r = oa.chat.completions.create(model=model, messages=_ask("What is the capital of France?"), max_tokens=20,
                                   temperature=0, response_format={"type": "grammar", "grammar": gbnf})
    assert re.fullmatch(r"The capital is [A-Z][a-z]{1,12}\.", r.choices[0].message.content), r


@pytest.mark.parametrize("which", ["base", "lora"])
def test_the_tool_flow_from_a_call_to_the_final_answer(oa, served, which):
    model = served[0] if which == "base" else served[1]
    messages = _ask("What is the weather in Paris?")
    # Several calls in one turn may come; each is whole and valid, and a call cut short by
    # max_tokens is left out (finish_reason "length").
    r = oa.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME], tool_choice="required",
                                   max_tokens=50, temperature=0)
    assert r.choices[0].finish_reason in ("tool_calls", "length") and r.choices[0].message.content is None
    assert r.choices[0].message.tool_calls, r
    for c in r.choices[0].message.tool_calls:
        jsonschema.validate(json.loads(c.function.arguments), {"get_weather": WEATHER, "get_time": TIME}[
            c.function.name]["function"]["parameters"])
    r = oa.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME], tool_choice="required",
                                   parallel_tool_calls=False, max_tokens=80, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(c.type == "function" and c.id for c in calls), calls
    for c in calls:
        args = json.loads(c.function.arguments)
        schema = {"get_weather": WEATHER, "get_time": TIME}[c.function.name]["function"]["parameters"]
        jsonschema.validate(args, schema)
    # The reply goes back as the client gives it, with each result as a `tool` message.
    messages.append(choice.message)
    for c in calls:
        messages.append({"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temperature": 18, "sky": "clear"})})
    final = oa.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME], tool_choice="none",
                                       max_tokens=40, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def test_a_named_function_is_called_and_streams_as_openai_deltas(oa, served):
    base, lora = served
    choice = {"type": "function", "function": {"name": "get_time"}}
    r = oa.chat.completions.create(model=lora, messages=_ask("What time is it in Tokyo?"), tools=[WEATHER, TIME],
                                   tool_choice=choice, parallel_tool_calls=False, max_tokens=60, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"], calls
    jsonschema.validate(json.loads(calls[0].function.arguments), TIME["function"]["parameters"])
    # Streamed: a call arrives as tool_calls deltas (index, id, name, arguments), then
    # finish_reason "tool_calls".
    stream = oa.chat.completions.create(model=base, messages=_ask("Weather in Oslo?"), tools=[WEATHER],
                                        tool_choice="required", parallel_tool_calls=False, max_tokens=60,
                                        temperature=0, stream=True)
    got, finish = {}, None
    for chunk in stream:
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                slot = got.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = slot["id"] or d.id
                slot["name"] += d.function.name or ""
                slot["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and list(got) == [0], (finish, got)
    assert got[0]["name"] == "get_weather" and got[0]["id"]
    jsonschema.validate(json.loads(got[0]["arguments"]), WEATHER["function"]["parameters"])


def test_a_shared_system_prompt_is_computed_once(oa, served):
    system = " ".join(f"Rule {i}: answer briefly and kindly." for i in range(60))
    for model in served:
        ask = lambda q, **kw: oa.chat.completions.create(  # noqa: E731
            model=model, messages=[{"role": "system", "content": system}, {"role": "user", "content": q}],
            max_tokens=4, temperature=0, **kw)
        ask("Hi")
        second = ask("Hello there")
        # All of the shared beginning but its last partial block (128 tokens) comes from the cache.
        assert second.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens - 128, second.usage
        # Streamed, the usage chunk says the same; another isolation key shares nothing.
        chunks = list(ask("Good morning", stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= chunks[-1].usage.prompt_tokens - 128
        apart = ask("Hi", extra_body={"prompt_cache_isolation_key": f"tenant-{model}"})
        assert apart.usage.prompt_tokens_details.cached_tokens == 0, apart.usage


def test_tools_and_schemas_that_cannot_be_used_are_refused_with_the_reason(oa, served):
    base, _ = served

    def refused(messages=None, **kw) -> str:
        with pytest.raises(openai.BadRequestError) as e:
            oa.chat.completions.create(model=base, messages=messages or _ask("hi"), max_tokens=4, **kw)
        return e.value.body["message"] if isinstance(e.value.body, dict) else str(e.value)

    assert "strnig" in refused(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "strict": True, "schema": {"type": "object", "properties": {"a": {"type": "strnig"}}}}})
    assert "name" in refused(tools=[{"type": "function", "function": {"name": ""}}])
    assert "name" in refused(tools=[{"type": "function", "function": {"description": "no name"}}])
    assert "not among the tools" in refused(tools=[WEATHER],
                                            tool_choice={"type": "function", "function": {"name": "launch"}})
    assert "no tools" in refused(tool_choice="required")
    assert "parameters" in refused(tools=[{"type": "function", "function": {"name": "f", "parameters": [1]}}])
    assert "line 1" in refused(response_format={"type": "grammar", "grammar": "root ::= missing"})
    # A prompt_cache_key is a session's name: 2 KB is refused by name, 10 MB by the body limit.
    assert "prompt_cache_key is 2048 bytes" in refused(extra_body={"prompt_cache_key": "k" * 2048})
    assert "larger than" in refused(extra_body={"prompt_cache_key": "k" * (10 << 20)})
    assert "tool_call_id" in refused(messages=[{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}])


def test_the_gateway_keeps_the_last_hour_by_deployment_and_model(oa, served, hearth):
    """`inferenceMetrics`: the requests above, per model (base and LoRA), with their tokens
    and, for streamed answers, the time to first token; another account sees none of it."""
    base, lora = served
    chunks = oa.chat.completions.create(model=lora, messages=_ask("Hello"), max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    api = fixtures.RawApi(hearth.base_url, hearth.api_key, hearth.account)
    series = {s["model"]: s for s in api.ok_json("GET", "inferenceMetrics")["series"]}
    assert {base, lora} <= set(series), sorted(series)
    assert series[lora]["adapter"] is True and series[base]["adapter"] is False
    for s in (series[base], series[lora]):
        assert sum(p["requests"] for p in s["points"]) >= 2, s
        assert sum(p["completionTokens"] for p in s["points"]) > 0, s
        assert all(p["timePerOutputTokenP50"] <= p["timePerOutputTokenP95"] for p in s["points"]
                   if "timePerOutputTokenP50" in p), s
    assert any("timeToFirstTokenP50" in p for p in series[lora]["points"]), series[lora]
    other = fixtures.RawApi(hearth.base_url, hearth.api_key2, hearth.account)
    fixtures.assert_rpc_error(other.get("inferenceMetrics"), 403, 7)


def test_a_deployment_with_prompt_lookup_speculation_answers_as_one_without(oa, served, hearth, uid):
    """`ngramSpeculationLength` and `draftTokenCount` reach the replicas: a second deployment
    of the same base with speculation on gives the same greedy answers, base and LoRA."""
    base, lora = served
    client = make_client(hearth)
    dep_id = uid("ngram")
    dep = client.deployments.create(base_model=base, deployment_id=dep_id, min_replica_count=1, max_replica_count=1,
                                    enable_addons=True, ngram_speculation_length=3, draft_token_count=4)
    try:
        assert (dep.ngram_speculation_length, dep.draft_token_count) == (3, 4)
        deadline = time.monotonic() + 120
        while client.deployments.get(dep_id).state != "READY":
            assert time.monotonic() < deadline, client.deployments.get(dep_id).status
            time.sleep(0.2)
        name = f"accounts/{hearth.account}/deployments/{dep_id}"
        ask = _ask("Repeat exactly: the quick brown fox jumps over the lazy dog, and the lazy dog sleeps on.")
        plain = oa.chat.completions.create(model=base, messages=ask, max_tokens=40, temperature=0)
        fast = oa.chat.completions.create(model=f"{base}#{name}", messages=ask, max_tokens=40, temperature=0)
        assert fast.choices[0].message.content == plain.choices[0].message.content
    finally:
        client.deployments.delete(dep_id, hard=True, ignore_checks=True)


def _spec_counts(hearth, deployment: str):
    """The gateway's Prometheus speculation figures for one deployment: (drafted, accepted, rate)."""
    text = requests.get(f"{hearth.base_url}/metrics", headers={"Authorization": f"Bearer {hearth.api_key}"},
                        timeout=10).text
    found = {}
    for name in ("drafted_tokens_total", "accepted_tokens_total", "acceptance_rate"):
        m = re.search(rf'^hearth_deployment_spec_{name}\{{deployment="{re.escape(deployment)}"\}} (\S+)$', text, re.M)
        found[name] = float(m.group(1)) if m else None
    return found["drafted_tokens_total"], found["accepted_tokens_total"], found["acceptance_rate"]


def test_a_deployment_with_a_draft_model_answers_as_one_without_and_reports_acceptance(oa, served, hearth, uid):
    """`draftModel` reaches the replicas: the base model drafting for itself (same tokenizer,
    every draft agrees) gives the same greedy answers, and the gateway's metrics show the
    deployment's drafted and accepted tokens."""
    base, _ = served
    client = make_client(hearth)
    dep_id = uid("drafted")
    dep = client.deployments.create(base_model=base, deployment_id=dep_id, min_replica_count=1, max_replica_count=1,
                                    draft_model=base, draft_token_count=3)
    name = f"accounts/{hearth.account}/deployments/{dep_id}"
    try:
        assert (dep.draft_model, dep.draft_token_count) == (base, 3)
        deadline = time.monotonic() + 120
        while client.deployments.get(dep_id).state != "READY":
            assert time.monotonic() < deadline, client.deployments.get(dep_id).status
            time.sleep(0.2)
        ask = _ask("Write two sentences about the sea.")
        plain = oa.chat.completions.create(model=base, messages=ask, max_tokens=40, temperature=0)
        fast = oa.chat.completions.create(model=f"{base}#{name}", messages=ask, max_tokens=40, temperature=0)
        assert fast.choices[0].message.content == plain.choices[0].message.content
        # The replica's counts reach the gateway with its next load probe.
        deadline = time.monotonic() + 30
        while True:
            drafted, accepted, rate = _spec_counts(hearth, name)
            if drafted:
                break
            assert time.monotonic() < deadline, "no speculation figures for the deployment in the gateway's /metrics"
            time.sleep(0.5)
        assert accepted and rate > 0.9, (drafted, accepted, rate)
    finally:
        client.deployments.delete(dep_id, hard=True, ignore_checks=True)


def test_draft_models_are_checked_and_a_models_default_applies(served, hearth, uid, tmp_path):
    """A draft with another tokenizer, or one that is not a READY base model, is refused saying
    why; a model's defaultDraftModel and defaultDraftTokenCount apply to its deployments
    unless disableSpeculativeDecoding is set; bad defaults are refused at the model."""
    base, lora = served
    client = make_client(hearth)
    tiny = fixtures.create_ready_base_model(client, uid("tiny-draft"), tmp_path / "tiny").name
    with pytest.raises(fireworks.APIStatusError) as e:
        client.deployments.create(base_model=base, draft_model=tiny, validate_only=True)
    body = fixtures.assert_sdk_error(e.value, 400, 9)
    assert "tokenizer" in body["message"] and tiny in body["message"], body
    with pytest.raises(fireworks.APIStatusError) as e:
        client.deployments.create(base_model=base, draft_model=lora, validate_only=True)
    assert "HF_BASE_MODEL" in fixtures.assert_sdk_error(e.value, 400, 9)["message"]
    with pytest.raises(fireworks.APIStatusError) as e:
        client.deployments.create(base_model=base, draft_model=base, validate_only=True,
                                  disable_speculative_decoding=True)
    assert "disableSpeculativeDecoding" in fixtures.assert_sdk_error(e.value, 400, 3)["message"]

    drafted_id = uid("smol-drafted")
    with pytest.raises(fireworks.APIStatusError) as e:
        client.models.create(model_id=drafted_id, model={"kind": "HF_BASE_MODEL", "baseModelDetails": {},
                                                         "defaultDraftModel": base, "defaultDraftTokenCount": 99})
    assert "defaultDraftTokenCount" in fixtures.assert_sdk_error(e.value, 400, 3)["message"]
    with pytest.raises(fireworks.APIStatusError) as e:
        client.models.create(model_id=drafted_id, model={"kind": "HF_BASE_MODEL", "baseModelDetails": {},
                                                         "defaultDraftTokenCount": 3})
    assert "set defaultDraftModel too" in fixtures.assert_sdk_error(e.value, 400, 3)["message"]
    client.models.create(model_id=drafted_id, model={"kind": "HF_BASE_MODEL", "baseModelDetails": {},
                                                     "defaultDraftModel": base, "defaultDraftTokenCount": 3})
    fixtures.upload_model_files(client, drafted_id, {"model.gguf": SMOLLM2.read_bytes()})
    client.models.validate_upload(drafted_id)
    drafted = client.models.get(drafted_id)
    assert (drafted.default_draft_model, drafted.default_draft_token_count) == (base, 3)
    # An update of the count alone keeps the draft model it belongs to.
    client.models.update(drafted_id, default_draft_token_count=3)
    dep = client.deployments.create(base_model=drafted.name, validate_only=True)
    assert (dep.draft_model, dep.draft_token_count) == (base, 3)
    dep = client.deployments.create(base_model=drafted.name, validate_only=True, disable_speculative_decoding=True)
    assert not dep.draft_model and not dep.draft_token_count
    # A default that no longer suits the model refuses the create, saying how to go without.
    client.models.update(drafted_id, default_draft_model=tiny)
    with pytest.raises(fireworks.APIStatusError) as e:
        client.deployments.create(base_model=drafted.name, validate_only=True)
    message = fixtures.assert_sdk_error(e.value, 400, 9)["message"]
    assert "defaultDraftModel" in message and "disableSpeculativeDecoding=true" in message, message
    client.models.delete(drafted_id)
