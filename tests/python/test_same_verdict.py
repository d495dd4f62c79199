"""What validates is what serves. `:validateUpload` and the engine's loader run the same checks
(hearth-formats), so a file gets one verdict. These are the five cases where the two used to
disagree, each uploaded, validated and deployed (or refused) through the gateway, with the
served answers held to transformers' and PEFT's reference outputs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

import fixtures
from conftest import make_client

FIXTURES = Path(__file__).resolve().parents[2] / "crates/hearth-engine/tests/fixtures"
HF_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def hearth(hearth_live):
    return hearth_live


@pytest.fixture(scope="module")
def client(hearth):
    return make_client(hearth)


def _model(client, model_id: str, kind: str, files: dict, base: str | None = None):
    body = {"kind": kind, "baseModelDetails": {}} if kind == "HF_BASE_MODEL" else {
        "kind": kind, "peftDetails": {"baseModel": base}}
    client.models.create(model_id=model_id, model=body)
    fixtures.upload_model_files(client, model_id, files)


def _ready(client, model_id: str, kind: str, files: dict, base: str | None = None) -> str:
    _model(client, model_id, kind, files, base)
    client.models.validate_upload(model_id)
    m = client.models.get(model_id)
    assert m.state == "READY", m
    return m.name


def _wait(get, state: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        r = get()
        if r.state == state:
            return r
        assert time.monotonic() < deadline, f"stayed {r.state}: {r.status}"
        time.sleep(0.2)


def _deploy(client, dep_id: str, base: str, **fields) -> None:
    client.deployments.create(base_model=base, deployment_id=dep_id, min_replica_count=1, max_replica_count=1,
                              **fields)
    _wait(lambda: client.deployments.get(dep_id), "READY")


def _greedy_text(hearth, model: str, prompt_ids: list, n: int) -> str:
    """The greedy continuation of token ids, through the gateway's completions route."""
    r = requests.post(f"{hearth.base_url}/inference/v1/completions",
                      headers={"Authorization": f"Bearer {hearth.api_key}"},
                      json={"model": model, "prompt": prompt_ids, "max_tokens": n, "temperature": 0,
                            "ignore_eos": True},
                      timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _reference(path: Path) -> list:
    return [p for p in json.loads(path.read_text())["prompts"] if p["greedy"]["finish"] == "length"]


@pytest.mark.parametrize("layout", ["config.json rope_scaling", "GGUF rope_freqs.weight"])
def test_llama3_rope_scaling_validates_and_serves_what_transformers_computes(hearth, client, uid, layout):
    # Refused when deployed before, after validating; and in GGUF, validated and then served
    # with unscaled RoPE.
    d = FIXTURES / "tiny_llama3"
    files = ({f: (d / f).read_bytes() for f in HF_FILES} if layout.startswith("config")
             else {"model.gguf": (d / "model.gguf").read_bytes()})
    name = _ready(client, uid("llama3"), "HF_BASE_MODEL", files)
    dep_id = uid("llama3")
    _deploy(client, dep_id, name)
    prompts = _reference(d / "reference.json")
    assert prompts
    for p in prompts:
        want = p["greedy"]["text_skip_special"]
        assert _greedy_text(hearth, name, p["token_ids"], len(p["greedy"]["token_ids"])) == want, p["name"]
    client.deployments.delete(dep_id, hard=True)


@pytest.fixture(scope="module")
def tiny(client, uid):
    """The tiny Llama, deployed with addons enabled."""
    name = _ready(client, uid("tiny"), "HF_BASE_MODEL",
                  {f: (FIXTURES / "tiny_llama" / f).read_bytes() for f in HF_FILES})
    dep_id = uid("addons")
    _deploy(client, dep_id, name, enable_addons=True)
    yield name, dep_id
    client.deployments.delete(dep_id, hard=True, ignore_checks=True)


def _adapter(config: dict, weights_from: str) -> dict:
    return {"adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": (FIXTURES / "lora" / weights_from / "adapter_model.safetensors").read_bytes()}


def _load(hearth, client, tiny, addon_name: str) -> str:
    base, dep_id = tiny
    dm = client.lora.load(model=addon_name, deployment=f"accounts/{hearth.account}/deployments/{dep_id}")
    dm_id = dm.name.rsplit("/", 1)[1]
    _wait(lambda: client.lora.get(dm_id), "DEPLOYED")
    return dm_id


def test_peft_defaults_are_pefts_in_both(hearth, client, uid, tiny):
    # The engine required `r` and took lora_alpha = r; validation took PEFT's defaults (8 and
    # 8). An adapter with neither is PEFT's r = 8, alpha = 8: the same as one that says so.
    base, _ = tiny
    config = json.loads((FIXTURES / "lora/attn_only/adapter_config.json").read_text())
    assert config["r"] == 8
    explicit = dict(config, r=8, lora_alpha=8)
    defaults = {k: v for k, v in config.items() if k not in ("r", "lora_alpha")}
    names = []
    for tag, cfg in (("explicit", explicit), ("defaults", defaults)):
        name = _ready(client, uid(f"lora-{tag}"), "HF_PEFT_ADDON", _adapter(cfg, "attn_only"), base)
        _load(hearth, client, tiny, name)
        names.append(name)
    ids = [431, 474, 81, 263, 287, 350]
    texts = [_greedy_text(hearth, n, ids, 16) for n in names]
    assert texts[0] == texts[1]
    assert texts[0] != _greedy_text(hearth, base, ids, 16), "the adapter changes the answer"


def test_rank_pattern_resolves_in_file_order_in_both(hearth, client, uid, tiny):
    # PEFT takes the first rank_pattern key, in file order, that names a module; the engine
    # took them in sorted order. This config names layer 0's q_proj twice: first as `q_proj`
    # (rank 4, as its weights are), then by its full name with rank 8.
    base, _ = tiny
    config = json.loads((FIXTURES / "lora/rank_pattern/adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj": 4, "model.layers.0.self_attn.q_proj": 8, "model.layers.1.mlp.down_proj": 12}
    name = _ready(client, uid("lora-order"), "HF_PEFT_ADDON", _adapter(config, "rank_pattern"), base)
    _load(hearth, client, tiny, name)
    for p in _reference(FIXTURES / "lora/rank_pattern/reference.json"):
        want = p["greedy"]["text_skip_special"]
        assert _greedy_text(hearth, name, p["token_ids"], len(p["greedy"]["token_ids"])) == want, p["name"]
    # The other order makes layer 0's q_proj rank 8, which its weights are not: refused.
    config["rank_pattern"] = {"model.layers.0.self_attn.q_proj": 8, "q_proj": 4, "model.layers.1.mlp.down_proj": 12}
    model_id = uid("lora-order-bad")
    _model(client, model_id, "HF_PEFT_ADDON", _adapter(config, "rank_pattern"), base)
    with pytest.raises(Exception) as e:
        client.models.validate_upload(model_id)
    assert 'rank 4 but adapter_config.json says rank_pattern["model.layers.0.self_attn.q_proj"] = 8' in str(e.value)


def test_a_missing_peft_type_is_refused_by_both(client, uid, tiny):
    # PEFT itself cannot load such a config; validation refused it and the engine loaded it.
    base, _ = tiny
    config = json.loads((FIXTURES / "lora/attn_only/adapter_config.json").read_text())
    del config["peft_type"]
    model_id = uid("lora-no-type")
    _model(client, model_id, "HF_PEFT_ADDON", _adapter(config, "attn_only"), base)
    with pytest.raises(Exception) as e:
        client.models.validate_upload(model_id)
    assert "peft_type missing" in str(e.value)
