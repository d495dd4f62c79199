"""Hot load of model versions: a deployment with ``enableHotLoad`` serves the folder its
``targetModelVersion`` names under ``hotLoadBucketUrl`` (a local folder, then moto's S3), swapped
into its running replica without a restart while requests keep coming: every request succeeds
and gets one version's whole answer, never a mix; ``activeModelVersion`` says which version
serves; a version that cannot serve (another tokenizer) leaves the old one serving and says why
in ``status``.

The versions: v1 is the default model's GGUF, v2 the same file with its attention norms
scaled (same shape and tokenizer, other answers), v3 (on S3) the default model again, and
``other-tokenizer`` the tiny Llama fixture. This module starts its own ``hearth serve``
(``--runtime local``) whose environment points at the local S3 server."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import fireworks
import pytest
from openai import OpenAI

import fixtures
from conftest import _serve, make_client

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = REPO_ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def s3():
    yield from fixtures.moto_s3()


@pytest.fixture(scope="module")
def versions_root(tmp_path_factory):
    return tmp_path_factory.mktemp("versions")


@pytest.fixture(scope="module")
def hearth(s3, versions_root):
    env = {"AWS_ENDPOINT_URL": s3[0], "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "hearth",
           "AWS_SECRET_ACCESS_KEY": "hearth-secret", "HEARTH_HOT_LOAD_DIRS": str(versions_root)}
    yield from _serve("local", env)


@pytest.fixture(scope="module")
def versions(versions_root, s3):
    """The local bucket folder (v1, v2, other-tokenizer), and v3 on S3 under s3://versions/smol."""
    root = versions_root
    original = SMOLLM2.read_bytes()
    (root / "v1").mkdir()
    (root / "v1" / "model.gguf").symlink_to(SMOLLM2)
    (root / "v2").mkdir()
    (root / "v2" / "model.gguf").write_bytes(fixtures.perturb_gguf_norms(original))
    fixtures.write_tiny_llama_checkpoint(root / "other-tokenizer")
    _, client = s3
    client.create_bucket(Bucket="versions")
    client.put_object(Bucket="versions", Key="smol/v3/model.gguf", Body=original)
    return root


def _answer(oa: OpenAI, model: str) -> str:
    r = oa.chat.completions.create(model=model, messages=QUESTION, max_tokens=24, temperature=0)
    return r.choices[0].message.content


def test_versions_swap_in_place_under_load_and_a_bad_one_leaves_the_old_serving(hearth, versions):
    client = make_client(hearth)
    oa = OpenAI(api_key=hearth.api_key, base_url=f"{hearth.base_url}/inference/v1", max_retries=0)
    base_id = f"smol-hot-{int(time.time())}"
    client.models.create(model_id=base_id, model={"kind": "HF_BASE_MODEL", "baseModelDetails": {}})
    fixtures.upload_model_files(client, base_id, {"model.gguf": SMOLLM2.read_bytes()})
    client.models.validate_upload(base_id)
    base = client.models.get(base_id).name

    # Bad hot-load settings are refused, naming what to fix.
    for extra, code, word in [
        ({"hot_load_bucket_url": f"file://{versions}"}, 3, "enableHotLoad"),
        ({"enable_hot_load": True}, 3, "hotLoadBucketUrl"),
        ({"enable_hot_load": True, "hot_load_bucket_url": "gs://b/p"}, 12, "gs://"),
        ({"enable_hot_load": True, "hot_load_bucket_url": "s3://b/p", "hot_load_bucket_type": "FW_HOSTED"}, 12,
         "FW_HOSTED"),
        ({"enable_hot_load": True, "hot_load_bucket_url": f"file://{versions}", "target_model_version": "../x"}, 3,
         "targetModelVersion"),
        # A local directory the server's operator did not allow (it could be anyone's files).
        ({"enable_hot_load": True, "hot_load_bucket_url": f"file://{SMOLLM2.parent}"}, 7, "--hot-load-dir"),
    ]:
        with pytest.raises(fireworks.APIStatusError) as e:
            client.deployments.create(base_model=base, validate_only=True, **extra)
        status = {3: 400, 7: 403, 12: 501}[code]
        assert word in fixtures.assert_sdk_error(e.value, status, code)["message"], extra

    dep_id = f"hot-{int(time.time())}"
    dep = client.deployments.create(base_model=base, deployment_id=dep_id, min_replica_count=1, max_replica_count=1,
                                    enable_hot_load=True, hot_load_bucket_url=f"file://{versions}",
                                    target_model_version="v1")
    name = f"{base}#accounts/{hearth.account}/deployments/{dep_id}"
    stop = threading.Event()
    try:
        assert (dep.enable_hot_load, dep.hot_load_bucket_url, dep.target_model_version) == (
            True, f"file://{versions}", "v1")
        fixtures.wait_deployment(client, dep_id, lambda d: d.state == "READY" and d.active_model_version == "v1", "v1 active")
        old = _answer(oa, name)

        # Requests keep coming while v2 replaces v1.
        results = []

        def load():
            while not stop.is_set():
                try:
                    results.append(("ok", _answer(oa, name)))
                except Exception as e:  # noqa: BLE001 - every failure is reported below
                    results.append(("error", repr(e)))

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        client.deployments.update(dep_id, base_model=base, target_model_version="v2")
        fixtures.wait_deployment(client, dep_id, lambda d: d.active_model_version == "v2", "v2 active")
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        new = _answer(oa, name)
        assert new != old, "v2 answers differently from v1"
        errors = [r for r in results if r[0] == "error"]
        assert not errors, errors[:3]
        answers = {r[1] for r in results}
        assert answers <= {old, new}, f"an answer from neither version (a mix?): {answers - {old, new}}"
        assert old in answers and new in answers, "the load spanned the swap"
        dep = client.deployments.get(dep_id)
        assert dep.state == "READY" and dep.replica_count == 1

        # A version that cannot serve leaves v2 serving, and says why.
        client.deployments.update(dep_id, base_model=base, target_model_version="other-tokenizer")
        dep = fixtures.wait_deployment(client, dep_id, lambda d: d.status is not None and "other-tokenizer" in (d.status.message or ""),
                    "the refusal in status")
        assert "its tokenizer is not the one serving" in dep.status.message and dep.active_model_version == "v2", \
            dep.status
        assert _answer(oa, name) == new

        # A version from S3, fetched through the object store.
        client.deployments.update(dep_id, base_model=base, hot_load_bucket_url="s3://versions/smol", hot_load_bucket_type="S3",
                                  target_model_version="v3")
        dep = fixtures.wait_deployment(client, dep_id, lambda d: d.active_model_version == "v3", "v3 active from S3")
        assert dep.status is None or not dep.status.message, dep.status
        assert _answer(oa, name) == old, "v3 is v1's weights again"
        fetched = Path(hearth.data_dir) / "artifacts" / "hot-load" / dep.name.replace("/", "_")
        assert sorted(p.name for p in fetched.iterdir()) == ["v3"], "an S3 version is fetched once, whole"
        # A version that is not in the bucket is reported, v3 still serving.
        client.deployments.update(dep_id, base_model=base, target_model_version="v9")
        dep = fixtures.wait_deployment(client, dep_id, lambda d: d.status is not None and "v9" in (d.status.message or ""),
                    "the missing version in status")
        assert dep.active_model_version == "v3"
        # Purged, the deployment leaves no fetched version behind.
        client.deployments.delete(dep_id, hard=True, ignore_checks=True)
        dep_id = None
        assert not fetched.exists(), sorted(fetched.iterdir())
    finally:
        stop.set()
        if dep_id:
            client.deployments.delete(dep_id, hard=True, ignore_checks=True)
