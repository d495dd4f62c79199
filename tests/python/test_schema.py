"""The API as its OpenAPI document (`GET /openapi.json`) describes it: schemathesis generates
requests for every operation from the document, valid and invalid, against a real `hearth
serve` with a live deployment of the tiny Llama, and checks each answer: no server error (a
5xx other than UNIMPLEMENTED naming what hearth does not do), a status and content type the
document declares, a body that matches the declared schema, and invalid data refused.

Bounded and seeded: `HEARTH_SCHEMA_EXAMPLES` examples per operation (default 25) from
hypothesis's derandomized generator, so a run is repeatable. The account path parameter is the
test's own account and an inference body's `model` the live deployment's, so requests reach
hearth's logic and its engine rather than stopping at 403 and 404."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi import checks

import conftest
from conftest import _serve, make_client
import fixtures

ENGINE_FIXTURE = Path(__file__).resolve().parents[2] / "crates/hearth-engine/tests/fixtures/tiny_llama"
FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
EXAMPLES = int(os.environ.get("HEARTH_SCHEMA_EXAMPLES", "25"))
UNIMPLEMENTED = 12

# What every answer is checked for besides not being a server error (checked below, where 501
# UNIMPLEMENTED is told apart from a failure).
CHECKS = [
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]

COUNTS = {"requests": 0, "by_status": {}, "answered": set()}


@pytest.fixture(scope="module")
def server():
    yield from _serve("local")


@pytest.fixture(scope="module")
def live(server):
    """A READY deployment of the tiny Llama; returns the model name requests use."""
    client = make_client(server)
    client.models.create(model_id="schema-tiny", model={"kind": "HF_BASE_MODEL", "baseModelDetails": {}})
    fixtures.upload_model_files(client, "schema-tiny", {f: (ENGINE_FIXTURE / f).read_bytes() for f in FILES})
    client.models.validate_upload("schema-tiny")
    model = client.models.get("schema-tiny").name
    client.deployments.create(base_model=model, deployment_id="schema-live", min_replica_count=1, max_replica_count=1)
    deadline = time.monotonic() + 60
    while client.deployments.get("schema-live").state != "READY":
        assert time.monotonic() < deadline, "schema-live never became READY"
        time.sleep(0.2)
    return model


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")


def _check(case, server, live) -> None:
    if "account" in (case.path_parameters or {}):
        case.path_parameters["account"] = server.account
    # A generated update must not switch the account's inference off for the operations after it.
    if (case.path_parameters or {}).get("quota") in ("requests-per-minute", "tokens-per-minute"):
        case.path_parameters["quota"] = "models"
    if isinstance(case.body, dict) and "model" in case.body and case.path.endswith("completions"):
        # The live model, and generations short enough that the run stays quick (the tiny
        # model's context is 512 tokens; a longer max_tokens is refused, which is tested too).
        case.body["model"] = live
        for k in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(k), int) and case.body[k] > 4:
                case.body[k] = 4
        if isinstance(case.body.get("n"), int) and case.body["n"] > 2:
            case.body["n"] = 2
    headers = {"Authorization": f"Bearer {server.api_key}"}
    response = case.call(headers=headers, timeout=60)
    COUNTS["requests"] += 1
    COUNTS["by_status"][response.status_code] = COUNTS["by_status"].get(response.status_code, 0) + 1
    if response.status_code == 400 and os.environ.get("HEARTH_SCHEMA_DEBUG"):
        print(case.method, case.path, response.text[:200])
    if response.status_code == 200:
        COUNTS["answered"].add(f"{case.method.upper()} {case.operation.path}")
    if response.status_code >= 500:
        try:
            body = response.json()
        except ValueError:
            body = {}
        code = body.get("code", (body.get("error") or {}).get("code")) if isinstance(body, dict) else None
        assert response.status_code == 501 and code in (UNIMPLEMENTED, "UNIMPLEMENTED"), (
            f"server error: {case.method} {case.formatted_path} -> {response.status_code} {response.text[:500]}\n"
            f"reproduce: {case.as_curl_command(headers=headers)}"
        )
    case.validate_response(response, checks=CHECKS, headers=headers)


def _operations(api_schema) -> list:
    return [result.ok() for result in api_schema.get_all_operations()]


# schemathesis's pytest plugin does not run under this pytest; hypothesis drives each
# operation's strategy directly instead, one test item per operation.
def pytest_generate_tests(metafunc):
    if "operation_label" in metafunc.fixturenames:
        import json
        doc = json.loads((Path(__file__).resolve().parents[2] / "docs/openapi.json").read_text())
        labels = [f"{m.upper()} {p}" for p, ops in doc["paths"].items() for m in ops]
        metafunc.parametrize("operation_label", labels)


def test_every_operation_answers_as_documented(operation_label, api_schema, server, live):
    op = api_schema.find_operation_by_label(operation_label)
    assert op is not None, f"{operation_label} is in docs/openapi.json but not in the served document"

    @given(case=op.as_strategy())
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    def run(case):
        _check(case, server, live)

    run()


def test_the_run_reached_hearth_logic(server):
    """The counts of the run above, for the record; and proof that it did more than bounce."""
    conftest.SUMMARY.append(
        f"schemathesis: {COUNTS['requests']} requests ({EXAMPLES} examples per operation), by status "
        f"{dict(sorted(COUNTS['by_status'].items()))}; {len(COUNTS['answered'])} operations answered 200"
    )
    assert COUNTS["requests"] > 0
    # The inference bodies reached the engine and were served.
    for op in ("POST /inference/v1/chat/completions", "POST /inference/v1/completions", "POST /v1/chat/completions"):
        assert op in COUNTS["answered"], (op, sorted(COUNTS["answered"]))
