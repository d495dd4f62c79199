"""A replica's ``/metrics`` carries what the Kubernetes Gateway API Inference Extension's
endpoint picker reads, in vLLM's names: ``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc`` and ``vllm:lora_requests_info`` with its ``max_lora``,
``running_lora_adapters`` and ``waiting_lora_adapters`` labels. Scraped from a running
``hearth engine`` while one LoRA request runs and another waits, and parsed with the
Prometheus client library's own parser."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import hearth_binary

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
PIRATE = ROOT / "crates/hearth-engine/tests/fixtures/lora/pirate"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """``hearth engine`` on the default model with the pirate adapter, one sequence at a time
    (so a second request waits), at most 4 adapters per step."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("engine") / "engine.log", "wb")
    env = {k: v for k, v in os.environ.items() if k != "HEARTH_ENGINE_TOKEN"}
    proc = subprocess.Popen(
        [hearth_binary(), "engine", "--model", str(SMOLLM2), "--listen", f"127.0.0.1:{port}",
         "--served-model-name", "smol", "--lora", f"pirate={PIRATE}", "--max-running", "1",
         "--max-loras-per-step", "4"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"the engine exited; see {log.name}"
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the engine did not start"
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _scrape(url: str) -> dict:
    """Every sample of the vllm: families, by family name: [(labels, value)]."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {f.name: (f.type, [(s.labels, s.value) for s in f.samples])
            for f in text_string_to_metric_families(text) if f.name.startswith("vllm:")}


def _ask(url: str, model: str, max_tokens: int, out: list):
    r = requests.post(f"{url}/v1/completions", timeout=120, data=json.dumps(
        {"model": model, "prompt": "Tell me about the sea", "max_tokens": max_tokens, "temperature": 0,
         "ignore_eos": True}), headers={"Content-Type": "application/json"})
    out.append(r.status_code)


def test_the_endpoint_pickers_metrics_follow_running_and_waiting_adapters(engine):
    idle = _scrape(engine)
    assert idle["vllm:num_requests_waiting"] == ("gauge", [({"model_name": "smol"}, 0.0)])
    assert idle["vllm:kv_cache_usage_perc"][1][0][1] == 0.0
    kind, [(labels, value)] = idle["vllm:lora_requests_info"]
    assert kind == "gauge" and labels == {"max_lora": "4", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert abs(value - time.time()) < 60, "the value is the time of the reading"

    # One pirate request runs (about 2 s of tokens), a second one waits behind it.
    codes: list = []
    first = threading.Thread(target=_ask, args=(engine, "pirate", 600, codes))
    first.start()
    second = None
    seen = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = _scrape(engine)
        info = m["vllm:lora_requests_info"][1][0][0]
        if second is None and info["running_lora_adapters"] == "pirate":
            second = threading.Thread(target=_ask, args=(engine, "pirate", 8, codes))
            second.start()
        if info["waiting_lora_adapters"] == "pirate":
            seen = m
            break
        time.sleep(0.02)
    first.join(timeout=120)
    if second:
        second.join(timeout=120)
    assert seen, "never saw a pirate request waiting behind a running one"
    info = seen["vllm:lora_requests_info"][1][0][0]
    assert info == {"max_lora": "4", "running_lora_adapters": "pirate", "waiting_lora_adapters": "pirate"}, info
    assert seen["vllm:num_requests_waiting"][1][0][1] == 1.0
    assert seen["vllm:num_requests_running"][1][0][1] == 1.0
    assert 0.0 < seen["vllm:kv_cache_usage_perc"][1][0][1] <= 1.0
    assert codes == [200, 200]
    after = _scrape(engine)["vllm:lora_requests_info"][1][0][0]
    assert after["running_lora_adapters"] == "" and after["waiting_lora_adapters"] == ""
