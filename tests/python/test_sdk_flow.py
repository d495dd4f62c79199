"""The whole flow through the official Fireworks Python SDK (fireworks-ai 1.2.28) against hearth:
models (create, upload through signed URLs, validate, download, list, update, delete),
the error surface (409 without retries, 404, 400, 401, 403), pagination, deployments
(create, validate-only, get, list, update, scale, soft delete, undelete, hard delete) and
LoRA load/unload (DeployedModels)."""

from __future__ import annotations

import math
import re
import time
from datetime import datetime
from urllib.parse import parse_qs, urlparse

import fireworks
import pytest
import requests
from fireworks import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
)

import fixtures
from fixtures import (
    ALREADY_EXISTS,
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    NOT_FOUND,
    PERMISSION_DENIED,
    UNAUTHENTICATED,
    assert_sdk_error,
)

DEFAULT_AUTOSCALING = {
    "scaleUpWindow": "30s",
    "scaleDownWindow": "600s",
    "scaleToZeroWindow": "3600s",
    "loadTargets": {"default": 0.8},
}


def all_model_names(client, **kw):
    return [m.name for m in client.models.list(page_size=200, **kw)]


def all_deployment_names(client, **kw):
    return [d.name for d in client.deployments.list(page_size=200, **kw)]


def all_deployed_model_names(client):
    return [d.name for d in client.lora.list(page_size=200)]


def total_size(page) -> int:
    extra = page.model_extra or {}
    assert "totalSize" in extra, f"list response has no totalSize: {page.to_dict()}"
    return int(extra["totalSize"])


def autoscaling_dict(dep) -> dict:
    assert dep.autoscaling_policy is not None, f"{dep.name} has no autoscalingPolicy"
    return dep.autoscaling_policy.to_dict()


def new_base_model(client, model_id: str, **extra):
    return client.models.create(
        model_id=model_id,
        model={
            "kind": "HF_BASE_MODEL",
            "display_name": extra.pop("display_name", model_id),
            "base_model_details": {"checkpoint_format": "HUGGINGFACE"},
            **extra,
        },
    )


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def test_base_model_upload_validate_download(client, hearth, uid, tmp_path):
    mid = uid("base")
    name = f"accounts/{hearth.account}/models/{mid}"
    created = client.models.create(
        model_id=mid,
        model={
            "kind": "HF_BASE_MODEL",
            "display_name": "Tiny Llama",
            "description": "a two-layer llama written by the test",
            "base_model_details": {"checkpoint_format": "HUGGINGFACE"},
        },
    )
    assert created.name == name
    assert created.kind == "HF_BASE_MODEL"
    assert created.state == "UPLOADING"
    assert created.display_name == "Tiny Llama"
    assert created.description == "a two-layer llama written by the test"
    assert isinstance(created.create_time, datetime)

    got = client.models.get(mid)
    assert (got.name, got.kind, got.state, got.display_name) == (name, "HF_BASE_MODEL", "UPLOADING", "Tiny Llama")

    files = fixtures.read_dir(fixtures.write_tiny_llama_checkpoint(tmp_path / "tiny-llama"))
    assert sorted(files) == ["config.json", "model.safetensors", "tokenizer.json"]
    urls = fixtures.upload_model_files(client, mid, files)
    for fname, url in urls.items():
        u = urlparse(url)
        assert u.scheme in ("http", "https") and u.netloc, f"{fname}: not an absolute URL: {url}"
        assert u.path.startswith("/upload/"), url
        assert "sig" in parse_qs(u.query), f"{fname}: no sig parameter in {url}"

    # Uploaded but not validated: still UPLOADING.
    assert client.models.get(mid).state == "UPLOADING"

    validated = client.models.validate_upload(mid)
    assert validated.warnings is None or all(isinstance(w, str) for w in validated.warnings)

    ready = client.models.get(mid)
    assert ready.state == "READY"
    assert ready.kind == "HF_BASE_MODEL"
    assert ready.base_model_details is not None
    assert ready.base_model_details.checkpoint_format == "HUGGINGFACE"
    assert ready.base_model_details.parameter_count == str(fixtures.TINY_LLAMA_PARAMETER_COUNT)
    assert ready.context_length == fixtures.TINY_LLAMA_CONTEXT_LENGTH
    assert ready.display_name == "Tiny Llama"

    download = client.models.get_download_endpoint(mid)
    dl_urls = download.filename_to_signed_urls or {}
    assert sorted(dl_urls) == sorted(files)
    for fname, url in dl_urls.items():
        r = requests.get(url, timeout=30)  # no Authorization: the signature authorises
        assert r.status_code == 200, f"GET {fname}: {r.status_code} {r.text[:300]}"
        assert r.content == files[fname], f"{fname}: downloaded bytes differ from the upload"


def test_addon_model_upload_validate(client, hearth, uid, ready_base, tmp_path):
    mid = uid("lora")
    created = client.models.create(
        model_id=mid,
        model={
            "kind": "HF_PEFT_ADDON",
            "display_name": "my lora",
            "peft_details": {"base_model": ready_base.name, "r": 8, "target_modules": ["q_proj", "v_proj"]},
        },
    )
    assert created.name == f"accounts/{hearth.account}/models/{mid}"
    assert created.kind == "HF_PEFT_ADDON"
    assert created.state == "UPLOADING"
    assert created.peft_details is not None and created.peft_details.base_model == ready_base.name

    files = fixtures.read_dir(fixtures.write_lora_adapter(tmp_path / "lora"))
    fixtures.upload_model_files(client, mid, files)
    client.models.validate_upload(mid)

    ready = client.models.get(mid)
    assert ready.state == "READY"
    assert ready.kind == "HF_PEFT_ADDON"
    assert ready.peft_details is not None
    assert ready.peft_details.base_model == ready_base.name
    assert ready.peft_details.r == fixtures.LORA_R
    assert sorted(ready.peft_details.target_modules) == sorted(fixtures.LORA_TARGET_MODULES)

    dl = client.models.get_download_endpoint(mid).filename_to_signed_urls or {}
    assert sorted(dl) == sorted(files)
    for fname, url in dl.items():
        assert requests.get(url, timeout=30).content == files[fname]


def test_model_update(client, uid):
    mid = uid("upd")
    before = new_base_model(client, mid, display_name="before", description="old description")
    updated = client.models.update(mid, display_name="after", description="new description")
    assert updated.name == before.name
    assert updated.display_name == "after"
    assert updated.description == "new description"
    assert updated.kind == "HF_BASE_MODEL"
    assert updated.state == "UPLOADING"
    got = client.models.get(mid)
    assert (got.display_name, got.description, got.kind, got.state) == ("after", "new description", "HF_BASE_MODEL", "UPLOADING")

    # Only the fields sent change.
    client.models.update(mid, description="third")
    got = client.models.get(mid)
    assert (got.display_name, got.description) == ("after", "third")


def test_model_delete(client, uid):
    mid = uid("del")
    created = new_base_model(client, mid)
    assert created.name in all_model_names(client)
    client.models.delete(mid)
    with pytest.raises(NotFoundError) as e:
        client.models.get(mid)
    assert_sdk_error(e.value, 404, NOT_FOUND)
    assert created.name not in all_model_names(client)
    with pytest.raises(NotFoundError) as e:
        client.models.delete(mid)
    assert_sdk_error(e.value, 404, NOT_FOUND)


def test_model_list_filters(client, uid, ready_base, ready_addon):
    uploading = new_base_model(client, uid("filt"))

    addons = list(client.models.list(filter="kind=HF_PEFT_ADDON", page_size=200))
    assert addons, "filter kind=HF_PEFT_ADDON returned nothing"
    assert {m.kind for m in addons} == {"HF_PEFT_ADDON"}
    addon_names = {m.name for m in addons}
    assert ready_addon.name in addon_names
    assert ready_base.name not in addon_names and uploading.name not in addon_names

    bases = {m.name for m in client.models.list(filter="kind=HF_BASE_MODEL", page_size=200)}
    assert {ready_base.name, uploading.name} <= bases
    assert ready_addon.name not in bases

    ready = list(client.models.list(filter='state="READY"', page_size=200))
    assert {m.state for m in ready} == {"READY"}
    ready_names = {m.name for m in ready}
    assert {ready_base.name, ready_addon.name} <= ready_names
    assert uploading.name not in ready_names

    everything = set(all_model_names(client))
    assert {ready_base.name, ready_addon.name, uploading.name} <= everything
    assert ready_names | {uploading.name} <= everything


# ---------------------------------------------------------------------------------------------
# Errors through the SDK
# ---------------------------------------------------------------------------------------------


def test_duplicate_model_is_409_without_retries(counting_client, uid):
    c, sent = counting_client
    mid = uid("dup")
    first = new_base_model(c, mid, display_name="first")
    sent.clear()
    t0 = time.monotonic()
    with pytest.raises(ConflictError) as e:
        new_base_model(c, mid, display_name="second")
    elapsed = time.monotonic() - t0
    assert_sdk_error(e.value, 409, ALREADY_EXISTS)
    assert e.value.response.headers.get("x-should-retry") == "false"
    # The SDK retries a bare 409 (after >= 0.375 s); one request proves the header stopped it.
    assert sent == [("POST", f"/v1/accounts/{c.account_id}/models")], sent
    assert elapsed < 2.0, f"ConflictError took {elapsed:.2f}s"
    got = c.models.get(mid)
    assert got.display_name == "first" and got.create_time == first.create_time


def test_unknown_resources_are_404(client, uid):
    missing = uid("nope")
    with pytest.raises(NotFoundError) as e:
        client.models.get(missing)
    body = assert_sdk_error(e.value, 404, NOT_FOUND)
    assert missing in body["message"]
    with pytest.raises(NotFoundError) as e:
        client.deployments.get(missing)
    assert_sdk_error(e.value, 404, NOT_FOUND)
    with pytest.raises(NotFoundError) as e:
        client.lora.get("0123abcd")
    assert_sdk_error(e.value, 404, NOT_FOUND)
    with pytest.raises(NotFoundError) as e:
        client.models.update(missing, display_name="x")
    assert_sdk_error(e.value, 404, NOT_FOUND)


@pytest.mark.parametrize(
    "bad_id",
    ["Upper-Case", "1starts-with-digit", "ends-with-", "under_score", pytest.param("a" * 64, id="64-chars"), "dots.in.id"],
)
def test_invalid_model_id_is_400(client, hearth, bad_id):
    before = all_model_names(client)
    with pytest.raises(BadRequestError) as e:
        new_base_model(client, bad_id)
    assert_sdk_error(e.value, 400, INVALID_ARGUMENT)
    assert all_model_names(client) == before


def test_bad_or_missing_key_is_401(hearth, client):
    bad = fireworks.Fireworks(api_key="hk-not-a-real-key", account_id=hearth.account, base_url=hearth.base_url, timeout=30)
    with pytest.raises(AuthenticationError) as e:
        bad.models.list()
    assert_sdk_error(e.value, 401, UNAUTHENTICATED)
    with pytest.raises(AuthenticationError) as e:
        new_base_model(bad, "never-created")
    assert_sdk_error(e.value, 401, UNAUTHENTICATED)
    assert f"accounts/{hearth.account}/models/never-created" not in all_model_names(client)

    # The SDK always sends a key; without one at all, raw HTTP.
    r = requests.get(f"{hearth.base_url}/v1/accounts/{hearth.account}/models", timeout=30)
    fixtures.assert_rpc_error(r, 401, UNAUTHENTICATED)


def test_other_accounts_key_is_403(hearth, client, client2, uid):
    mid = uid("mine")
    mine = new_base_model(client, mid)

    # The second key works on its own account ...
    assert isinstance(all_model_names(client2), list)
    # ... and not on the first account's paths (account_id given per call).
    with pytest.raises(PermissionDeniedError) as e:
        client2.models.get(mid, account_id=hearth.account)
    assert_sdk_error(e.value, 403, PERMISSION_DENIED)
    with pytest.raises(PermissionDeniedError) as e:
        client2.models.list(account_id=hearth.account)
    assert_sdk_error(e.value, 403, PERMISSION_DENIED)
    with pytest.raises(PermissionDeniedError) as e:
        client2.models.update(mid, account_id=hearth.account, display_name="hijacked")
    assert_sdk_error(e.value, 403, PERMISSION_DENIED)
    with pytest.raises(PermissionDeniedError) as e:
        client2.models.delete(mid, account_id=hearth.account)
    assert_sdk_error(e.value, 403, PERMISSION_DENIED)
    intruder = uid("intruder")
    with pytest.raises(PermissionDeniedError) as e:
        client2.models.create(
            account_id=hearth.account,
            model_id=intruder,
            model={"kind": "HF_BASE_MODEL", "base_model_details": {"checkpoint_format": "HUGGINGFACE"}},
        )
    assert_sdk_error(e.value, 403, PERMISSION_DENIED)
    with pytest.raises(PermissionDeniedError) as e:
        client2.deployments.list(account_id=hearth.account)
    assert_sdk_error(e.value, 403, PERMISSION_DENIED)
    with pytest.raises(PermissionDeniedError) as e:
        client2.lora.list(account_id=hearth.account)
    assert_sdk_error(e.value, 403, PERMISSION_DENIED)
    # And the other way round.
    with pytest.raises(PermissionDeniedError) as e:
        client.models.list(account_id=hearth.account2)
    assert_sdk_error(e.value, 403, PERMISSION_DENIED)

    got = client.models.get(mid)
    assert got.display_name == mine.display_name and got.update_time == mine.update_time
    with pytest.raises(NotFoundError):
        client.models.get(intruder)
    assert mine.name not in all_model_names(client2)


# ---------------------------------------------------------------------------------------------
# Pagination
# ---------------------------------------------------------------------------------------------


def test_model_pagination(client, uid):
    baseline = all_model_names(client)
    prefix = uid("pg")
    mine = [new_base_model(client, f"{prefix}-{i:02d}").name for i in range(7)]
    expected_total = len(baseline) + 7

    pages = []
    token = None
    for _ in range(100):
        kw = {"page_size": 3}
        if token:
            kw["page_token"] = token
        page = client.models.list(**kw)
        pages.append(page)
        assert total_size(page) == expected_total
        token = page.next_page_token
        if not token:
            break
    else:
        pytest.fail("pagination never ended")

    assert len(pages) == math.ceil(expected_total / 3)
    sizes = [len(p.models) for p in pages]
    assert all(s == 3 for s in sizes[:-1]) and 1 <= sizes[-1] <= 3, sizes
    collected = [m.name for p in pages for m in p.models]
    assert len(collected) == len(set(collected)), "duplicates across pages"
    assert sorted(collected) == sorted(baseline + mine), "omissions or strangers across pages"
    # Default order is by name: the ids differ only in the last digits, so any collation agrees.
    positions = [collected.index(n) for n in mine]
    assert positions == sorted(positions), "models not listed in name order"

    # The SDK's auto-pagination walks the same pages.
    assert [m.name for m in client.models.list(page_size=3)] == collected

    desc = [m.name for m in client.models.list(page_size=4, order_by="name desc")]
    assert sorted(desc) == sorted(collected)
    desc_positions = [desc.index(n) for n in mine]
    assert desc_positions == sorted(desc_positions, reverse=True), "order_by='name desc' not descending"

    # pageSize above 200 is coerced, not refused.
    big = client.models.list(page_size=1000)
    assert total_size(big) == expected_total
    assert len(big.models) == min(expected_total, 200)

    with pytest.raises(BadRequestError) as e:
        client.models.list(page_size=-1)
    assert_sdk_error(e.value, 400, INVALID_ARGUMENT)

    for name in mine:
        client.models.delete(name.rsplit("/", 1)[1])
    after = client.models.list(page_size=3)
    assert total_size(after) == len(baseline)
    assert sorted(all_model_names(client)) == sorted(baseline)


# ---------------------------------------------------------------------------------------------
# Deployments
# ---------------------------------------------------------------------------------------------


def test_deployment_defaults_validate_only_and_random_id(client, hearth, uid, ready_base):
    dep_id = uid("vo")
    before = all_deployment_names(client, show_deleted=True)
    would_be = client.deployments.create(base_model=ready_base.name, deployment_id=dep_id, validate_only=True)
    assert would_be.name == f"accounts/{hearth.account}/deployments/{dep_id}"
    assert would_be.base_model == ready_base.name
    assert (would_be.min_replica_count or 0) == 0
    assert would_be.max_replica_count == 1
    assert autoscaling_dict(would_be) == DEFAULT_AUTOSCALING
    with pytest.raises(NotFoundError):
        client.deployments.get(dep_id)
    assert all_deployment_names(client, show_deleted=True) == before

    # No deploymentId: hearth picks one. Defaults: min 0, max max(min, 1), the default policy.
    dep = client.deployments.create(base_model=ready_base.name)
    try:
        assert re.fullmatch(rf"accounts/{re.escape(hearth.account)}/deployments/[a-z0-9][a-z0-9-]{{0,62}}", dep.name), dep.name
        assert dep.state == "CREATING"
        assert dep.base_model == ready_base.name
        assert (dep.min_replica_count or 0) == 0
        assert dep.max_replica_count == 1
        assert not dep.enable_addons
        assert autoscaling_dict(dep) == DEFAULT_AUTOSCALING
        assert isinstance(dep.create_time, datetime)
        assert dep.name in all_deployment_names(client)

        dep_min2 = client.deployments.create(base_model=ready_base.name, min_replica_count=2)
        try:
            assert dep_min2.min_replica_count == 2
            assert dep_min2.max_replica_count == 2
        finally:
            client.deployments.delete(dep_min2.name.rsplit("/", 1)[1], hard=True, ignore_checks=True)
    finally:
        client.deployments.delete(dep.name.rsplit("/", 1)[1], hard=True, ignore_checks=True)

    # The validate-only id was never taken.
    real = client.deployments.create(base_model=ready_base.name, deployment_id=dep_id)
    assert real.name == would_be.name
    client.deployments.delete(dep_id, hard=True)


def test_deployment_preconditions(counting_client, client, uid, ready_base, ready_addon):
    before = all_deployment_names(client, show_deleted=True)

    uploading = new_base_model(client, uid("notready"))
    with pytest.raises(BadRequestError) as e:
        client.deployments.create(base_model=uploading.name, deployment_id=uid("dep"))
    assert_sdk_error(e.value, 400, FAILED_PRECONDITION)

    with pytest.raises(BadRequestError) as e:
        client.deployments.create(base_model=ready_addon.name, deployment_id=uid("dep"))
    assert_sdk_error(e.value, 400, FAILED_PRECONDITION)
    assert all_deployment_names(client, show_deleted=True) == before

    c, sent = counting_client
    dep_id = uid("dup")
    first = c.deployments.create(base_model=ready_base.name, deployment_id=dep_id, display_name="first")
    sent.clear()
    with pytest.raises(ConflictError) as e:
        c.deployments.create(base_model=ready_base.name, deployment_id=dep_id, display_name="second")
    assert_sdk_error(e.value, 409, ALREADY_EXISTS)
    assert e.value.response.headers.get("x-should-retry") == "false"
    assert len(sent) == 1, sent
    got = c.deployments.get(dep_id)
    assert got.display_name == "first" and got.create_time == first.create_time
    c.deployments.delete(dep_id, hard=True)


def test_deployment_and_lora_lifecycle(client, hearth, uid, ready_base, tmp_path):
    acct = hearth.account
    dep_id = uid("dep")
    dep_name = f"accounts/{acct}/deployments/{dep_id}"

    # --- create / get / list -----------------------------------------------------------------
    dep = client.deployments.create(
        deployment_id=dep_id,
        base_model=ready_base.name,
        min_replica_count=0,
        max_replica_count=1,
        enable_addons=True,
        display_name="e2e deployment",
        accept_shapeless_risk=True,  # the SDK's own CLI flow sends it; hearth must accept it
    )
    assert dep.name == dep_name
    assert dep.state == "CREATING"
    assert dep.base_model == ready_base.name
    assert dep.display_name == "e2e deployment"
    assert dep.enable_addons is True
    assert (dep.min_replica_count or 0) == 0
    assert dep.max_replica_count == 1
    assert autoscaling_dict(dep) == DEFAULT_AUTOSCALING
    assert dep.delete_time is None

    got = client.deployments.get(dep_id)
    assert (got.name, got.state, got.base_model, got.enable_addons, got.max_replica_count) == (
        dep_name, "CREATING", ready_base.name, True, 1)
    assert dep_name in all_deployment_names(client)

    # --- update --------------------------------------------------------------------------------
    # The SDK's update() requires base_model and sends it along (unchanged).
    upd = client.deployments.update(
        dep_id, base_model=ready_base.name, display_name="renamed", description="patched", min_replica_count=1, max_replica_count=3
    )
    assert (upd.display_name, upd.description, upd.min_replica_count, upd.max_replica_count) == ("renamed", "patched", 1, 3)
    assert upd.base_model == ready_base.name and upd.enable_addons is True
    got = client.deployments.get(dep_id)
    assert (got.display_name, got.description, got.min_replica_count, got.max_replica_count) == ("renamed", "patched", 1, 3)

    # --- scale ---------------------------------------------------------------------------------
    client.deployments.scale(dep_id, replica_count=2)
    assert client.deployments.get(dep_id).desired_replica_count == 2

    # --- LoRA load -------------------------------------------------------------------------
    dep2 = client.deployments.create(base_model=ready_base.name, enable_addons=True)
    dep2_id = dep2.name.rsplit("/", 1)[1]
    no_addons_id = uid("noaddons")
    no_addons = client.deployments.create(deployment_id=no_addons_id, base_model=ready_base.name)
    addon = fixtures.create_ready_addon(client, uid("lora"), ready_base.name, tmp_path / "lora")

    loaded_before = all_deployed_model_names(client)
    dm = client.lora.load(model=addon.name, deployment=dep_name, display_name="lora on dep")
    assert re.fullmatch(rf"accounts/{re.escape(acct)}/deployedModels/[a-z0-9][a-z0-9-]{{0,62}}", dm.name or ""), dm.name
    assert dm.state == "DEPLOYING"
    assert dm.default is True
    assert dm.model == addon.name
    assert dm.deployment == dep_name
    assert dm.display_name == "lora on dep"
    dm_id = dm.name.rsplit("/", 1)[1]

    got_dm = client.lora.get(dm_id)
    assert (got_dm.name, got_dm.model, got_dm.deployment, got_dm.default, got_dm.state) == (
        dm.name, addon.name, dep_name, True, "DEPLOYING")
    assert sorted(all_deployed_model_names(client)) == sorted(loaded_before + [dm.name])

    dm2 = client.lora.load(model=addon.name, deployment=dep2.name)
    assert dm2.name != dm.name
    assert not dm2.default, "only the first deployment a model is loaded onto is its default"
    assert dm2.deployment == dep2.name and dm2.state == "DEPLOYING"

    patched = client.lora.update(dm_id, display_name="renamed lora", description="loaded by the e2e test")
    assert (patched.display_name, patched.description) == ("renamed lora", "loaded by the e2e test")
    got_dm = client.lora.get(dm_id)
    assert (got_dm.display_name, got_dm.description, got_dm.model, got_dm.deployment) == (
        "renamed lora", "loaded by the e2e test", addon.name, dep_name)

    # --- LoRA load refusals ----------------------------------------------------------------
    loaded = sorted(all_deployed_model_names(client))
    with pytest.raises(BadRequestError) as e:  # deployment without enableAddons
        client.lora.load(model=addon.name, deployment=no_addons.name)
    assert_sdk_error(e.value, 400, FAILED_PRECONDITION)
    with pytest.raises(BadRequestError) as e:  # a base model is no addon
        client.lora.load(model=ready_base.name, deployment=dep_name)
    assert_sdk_error(e.value, 400, FAILED_PRECONDITION)
    not_ready = client.models.create(
        model_id=uid("lora-uploading"),
        model={"kind": "HF_PEFT_ADDON", "peft_details": {"base_model": ready_base.name, "r": 8, "target_modules": ["q_proj", "v_proj"]}},
    )
    with pytest.raises(BadRequestError) as e:  # addon not READY
        client.lora.load(model=not_ready.name, deployment=dep_name)
    assert_sdk_error(e.value, 400, FAILED_PRECONDITION)
    other_base = fixtures.create_ready_base_model(client, uid("other-base"), tmp_path / "other-base")
    foreign = fixtures.create_ready_addon(client, uid("lora-foreign"), other_base.name, tmp_path / "foreign")
    with pytest.raises(BadRequestError) as e:  # addon of another base model
        client.lora.load(model=foreign.name, deployment=dep_name)
    assert_sdk_error(e.value, 400, FAILED_PRECONDITION)
    assert sorted(all_deployed_model_names(client)) == loaded

    # --- what a loaded LoRA blocks -----------------------------------------------------------
    with pytest.raises(BadRequestError) as e:
        client.models.delete(addon.name.rsplit("/", 1)[1])
    assert_sdk_error(e.value, 400, FAILED_PRECONDITION)
    assert client.models.get(addon.name.rsplit("/", 1)[1]).state == "READY"

    with pytest.raises(BadRequestError) as e:
        client.deployments.delete(dep_id)
    assert_sdk_error(e.value, 400, FAILED_PRECONDITION)
    got = client.deployments.get(dep_id)
    assert got.state == "CREATING" and got.delete_time is None

    # --- unload --------------------------------------------------------------------------------
    client.lora.unload(dm_id)
    with pytest.raises(NotFoundError) as e:
        client.lora.get(dm_id)
    assert_sdk_error(e.value, 404, NOT_FOUND)
    assert dm.name not in all_deployed_model_names(client)

    # ignoreChecks deletes a deployment that still has a LoRA loaded.
    client.deployments.delete(dep2_id, ignore_checks=True)
    assert client.deployments.get(dep2_id).state == "DELETED"
    try:
        client.lora.unload(dm2.name.rsplit("/", 1)[1])
    except NotFoundError:
        pass  # hearth may have unloaded it with its deployment
    assert dm2.name not in all_deployed_model_names(client)

    # Nothing loaded any more: the addon can go.
    client.models.delete(addon.name.rsplit("/", 1)[1])
    with pytest.raises(NotFoundError):
        client.models.get(addon.name.rsplit("/", 1)[1])

    # --- soft delete ---------------------------------------------------------------------------
    client.deployments.delete(dep_id)
    deleted = client.deployments.get(dep_id)
    assert deleted.state == "DELETED"
    assert isinstance(deleted.delete_time, datetime)
    assert isinstance(deleted.purge_time, datetime)
    assert deleted.purge_time > deleted.delete_time
    assert dep_name not in all_deployment_names(client)
    with_deleted = {d.name: d for d in client.deployments.list(show_deleted=True, page_size=200)}
    assert dep_name in with_deleted and with_deleted[dep_name].state == "DELETED"

    # --- undelete --------------------------------------------------------------------------------
    back = client.deployments.undelete(dep_id, body={})
    assert back.name == dep_name
    assert back.state == "CREATING"
    assert back.display_name == "renamed"
    assert client.deployments.get(dep_id).state == "CREATING"
    assert dep_name in all_deployment_names(client)
    # AIP-164: undeleting a deployment that is not deleted is ALREADY_EXISTS.
    with pytest.raises(ConflictError) as e:
        client.deployments.undelete(dep_id, body={})
    assert_sdk_error(e.value, 409, ALREADY_EXISTS)
    assert client.deployments.get(dep_id).state == "CREATING"

    # --- scale to zero ----------------------------------------------------------------------
    client.deployments.scale(dep_id, replica_count=0)
    assert (client.deployments.get(dep_id).desired_replica_count or 0) == 0

    # --- hard delete ---------------------------------------------------------------------------
    client.deployments.delete(dep_id, hard=True, ignore_checks=True)
    with pytest.raises(NotFoundError) as e:
        client.deployments.get(dep_id)
    assert_sdk_error(e.value, 404, NOT_FOUND)
    assert dep_name not in all_deployment_names(client, show_deleted=True)

    for leftover in (dep2_id, no_addons_id):
        client.deployments.delete(leftover, hard=True, ignore_checks=True)
        with pytest.raises(NotFoundError):
            client.deployments.get(leftover)


def test_deployment_pagination_and_show_deleted(client, uid, ready_base):
    baseline = all_deployment_names(client)
    baseline_deleted = all_deployment_names(client, show_deleted=True)
    prefix = uid("dpg")
    mine = []
    for i in range(5):
        d = client.deployments.create(deployment_id=f"{prefix}-{i}", base_model=ready_base.name)
        mine.append(d.name)

    pages = []
    token = None
    for _ in range(100):
        kw = {"page_size": 2}
        if token:
            kw["page_token"] = token
        page = client.deployments.list(**kw)
        pages.append(page)
        assert total_size(page) == len(baseline) + 5
        token = page.next_page_token
        if not token:
            break
    collected = [d.name for p in pages for d in p.deployments]
    assert len(collected) == len(set(collected))
    assert sorted(collected) == sorted(baseline + mine)

    # Soft-delete two: hidden from the plain list, counted and shown with showDeleted.
    for name in mine[:2]:
        client.deployments.delete(name.rsplit("/", 1)[1])
    plain = client.deployments.list(page_size=200)
    assert sorted(d.name for d in plain.deployments) == sorted(baseline + mine[2:])
    assert total_size(plain) == len(baseline) + 3
    shown = client.deployments.list(page_size=200, show_deleted=True)
    assert sorted(d.name for d in shown.deployments) == sorted(baseline_deleted + mine)
    assert total_size(shown) == len(baseline_deleted) + 5
    assert {d.name: d.state for d in shown.deployments if d.name in mine[:2]} == {n: "DELETED" for n in mine[:2]}

    for name in mine:
        client.deployments.delete(name.rsplit("/", 1)[1], hard=True, ignore_checks=True)
    assert sorted(all_deployment_names(client, show_deleted=True)) == sorted(baseline_deleted)
