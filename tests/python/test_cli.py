"""The `hearth` client commands, run as a user runs them: the built binary as a subprocess,
pointed at a real `hearth serve` through flags, the environment or a config file. Models are
uploaded from the engine's fixtures (the tiny Llama and a LoRA adapter trained for it); the
live part deploys them, loads the adapter and chats through the gateway; a 2 GiB upload checks
that neither the client nor the server holds a file (or a part of one) in memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import requests

from conftest import hearth_binary

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "crates/hearth-engine/tests/fixtures/tiny_llama"
TINY_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
# A LoRA adapter of the tiny Llama (q, k, v and o projections).
LORA = REPO / "crates/hearth-engine/tests/fixtures/lora/attn_only"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """An empty HOME / XDG_CONFIG_HOME, so no config file of the machine is read."""
    return tmp_path_factory.mktemp("cli-home")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny Llama in Hugging Face layout (the fixture directory holds GGUF variants and
    reference outputs beside it)."""
    d = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    d.mkdir()
    for f in TINY_FILES:
        shutil.copy(TINY / f, d / f)
    return d


def cli_env(home: Path, server=None, **extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / "xdg"), NO_COLOR="1")
    if server is not None:
        env.update(HEARTH_BASE_URL=server.base_url, HEARTH_API_KEY=server.api_key, HEARTH_ACCOUNT=server.account)
    env.update(extra)
    return env


def run(env: Dict[str, str], *args: str, ok: bool = True, stdin: Optional[str] = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run([str(hearth_binary()), *args], env=env, input=stdin, capture_output=True, text=True,
                       timeout=timeout)
    if ok:
        assert p.returncode == 0, f"hearth {' '.join(args)} exited {p.returncode}\n{p.stderr}\n{p.stdout}"
    return p


def run_json(env, *args: str, **kw):
    return json.loads(run(env, *args, "-o", "json", **kw).stdout)


def test_models_upload_in_parts_and_every_output_format(hearth, home, tiny_dir, uid):
    env = cli_env(home, hearth)
    model_id = uid("cli-tiny")
    # Parts of 100 KiB: model.safetensors (547 KiB) goes up in six, its digest with the last.
    up = run(env, "model", "upload", str(tiny_dir), "--model-id", model_id, "--part-size", "100KiB", "--wait",
             "-o", "json")
    model = json.loads(up.stdout)
    assert model["name"] == f"accounts/{hearth.account}/models/{model_id}"
    assert model["state"] == "READY" and model["kind"] == "HF_BASE_MODEL"
    assert "uploaded model.safetensors" in up.stderr
    # The server has exactly the local bytes.
    stored = hearth.data_dir / "artifacts" / hearth.account / "models" / model_id
    for f in TINY_FILES:
        assert (stored / f).read_bytes() == (tiny_dir / f).read_bytes(), f

    listed = run_json(env, "model", "list")
    assert model["name"] in [m["name"] for m in listed]
    table = run(env, "model", "list").stdout.splitlines()
    assert table[0].split() == ["ID", "KIND", "STATE", "BASE", "MODEL", "CREATED"]
    assert any(line.split()[:3] == [model_id, "HF_BASE_MODEL", "READY"] for line in table[1:]), table
    yaml = run(env, "model", "get", model_id, "-o", "yaml").stdout
    assert f"name: accounts/{hearth.account}/models/{model_id}\n" in yaml
    assert "  huggingfaceFiles:\n" in yaml or "huggingfaceFiles:\n" in yaml, yaml
    assert "    - model.safetensors\n" in yaml, yaml
    got = run(env, "model", "get", model_id).stdout
    assert any(line.split() == ["state", "READY"] for line in got.splitlines()), got

    updated = run_json(env, "model", "update", model_id, "--display-name", "Tiny from the CLI")
    assert updated["displayName"] == "Tiny from the CLI"
    # A READY model is not uploaded over.
    again = run(env, "model", "upload", str(tiny_dir), "--model-id", model_id, ok=False)
    assert again.returncode == 1 and "already exists and is READY" in again.stderr, again.stderr

    assert run(env, "model", "delete", model_id).stdout.strip() == f"deleted model {model['name']}"
    gone = run(env, "model", "get", model_id, ok=False)
    assert gone.returncode == 1
    assert gone.stderr.startswith("error: NOT_FOUND: ") and model_id in gone.stderr, gone.stderr
    assert not stored.exists()


def test_an_upload_resumes_where_an_earlier_one_stopped(hearth, home, tiny_dir, uid, api):
    env = cli_env(home, hearth)
    model_id = uid("cli-resume")
    run(env, "model", "create", model_id, "--kind", "base")
    # An earlier upload that stopped after 100 KiB of the weights: the part is on the server.
    weights = (tiny_dir / "model.safetensors").read_bytes()
    # enableResumableUpload asks for what every signed URL does anyway.
    urls = api.ok_json("POST", f"models/{model_id}:getUploadEndpoint",
                       json={"filenameToSize": {"model.safetensors": str(len(weights))}, "enableResumableUpload": True})
    url = urls["filenameToSignedUrls"]["model.safetensors"]
    part = 100 << 10
    r = requests.put(url, data=weights[:part], headers={"Content-Range": f"bytes 0-{part - 1}/{len(weights)}"},
                     timeout=30)
    assert r.status_code == 308 and r.headers["Range"] == f"bytes=0-{part - 1}", (r.status_code, r.text)

    up = run(env, "model", "upload", str(tiny_dir), "--model-id", model_id, "-o", "json")
    assert "continuing its upload" in up.stderr, up.stderr
    assert f"model.safetensors: the server has {part} of {len(weights)} bytes; resuming there" in up.stderr, up.stderr
    assert json.loads(up.stdout)["state"] == "READY"
    stored = hearth.data_dir / "artifacts" / hearth.account / "models" / model_id / "model.safetensors"
    assert stored.read_bytes() == weights
    run(env, "model", "delete", model_id)


def test_errors_are_the_servers_status_and_a_nonzero_exit(hearth, home, uid):
    env = cli_env(home, hearth)
    p = run(env, "model", "get", uid("nope"), ok=False)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith("error: NOT_FOUND: model accounts/") and "not found" in p.stderr, p.stderr
    p = run(env, "deployment", "create", uid("nope"), ok=False)
    assert p.returncode == 1 and "FAILED_PRECONDITION" in p.stderr or "NOT_FOUND" in p.stderr, p.stderr
    p = run(cli_env(home, hearth, HEARTH_API_KEY="wrong"), "model", "list", ok=False)
    assert p.returncode == 1 and p.stderr.startswith("error: UNAUTHENTICATED: "), p.stderr
    p = run(cli_env(home, hearth, HEARTH_BASE_URL="http://127.0.0.1:9"), "model", "list", ok=False)
    assert p.returncode == 1 and "cannot reach hearth at http://127.0.0.1:9" in p.stderr, p.stderr
    # Usage errors are clap's (exit 2).
    assert run(env, "model", "frobnicate", ok=False).returncode == 2


def test_flags_beat_the_environment_which_beats_the_config_file(hearth, home, tmp_path, uid):
    config = tmp_path / "config.toml"
    # The file names the second account's key; the account is then the key's own.
    config.write_text(f'# hearth\nbase_url = "{hearth.base_url}"\napi_key = "{hearth.api_key2}"\n')
    file_only = cli_env(home, HEARTH_CONFIG=str(config))
    model_id = uid("cli-cfg")
    made = run_json(file_only, "model", "create", model_id, "--kind", "base")
    assert made["name"] == f"accounts/{hearth.account2}/models/{model_id}"

    # The environment's key wins over the file's: the model is not in the first account.
    env_over_file = cli_env(home, HEARTH_CONFIG=str(config), HEARTH_API_KEY=hearth.api_key)
    p = run(env_over_file, "model", "get", model_id, ok=False)
    assert p.returncode == 1 and "NOT_FOUND" in p.stderr and hearth.account in p.stderr, p.stderr
    # A flag wins over both.
    assert run_json(env_over_file, "model", "get", model_id, "--api-key", hearth.api_key2)["name"] == made["name"]
    p = run(env_over_file, "model", "list", "--api-key", "not-a-key", ok=False)
    assert p.stderr.startswith("error: UNAUTHENTICATED"), p.stderr

    # The XDG location is read when HEARTH_CONFIG is unset.
    xdg = home / "xdg-test"
    (xdg / "hearth").mkdir(parents=True)
    shutil.copy(config, xdg / "hearth" / "config.toml")
    assert run_json(cli_env(home, XDG_CONFIG_HOME=str(xdg)), "model", "get", model_id)["name"] == made["name"]
    # A broken file is reported with its line; a named file that is missing too.
    broken = tmp_path / "broken.toml"
    broken.write_text("api_key = unquoted\n")
    p = run(cli_env(home, HEARTH_CONFIG=str(broken)), "model", "list", ok=False)
    assert p.returncode == 1 and f"{broken}:1" in p.stderr, p.stderr
    p = run(cli_env(home, HEARTH_CONFIG=str(tmp_path / "missing.toml")), "model", "list", ok=False)
    assert p.returncode == 1 and "missing.toml" in p.stderr, p.stderr
    run(file_only, "model", "delete", model_id)


def test_deployment_verbs_on_a_control_plane_only_server(hearth, home, tiny_dir, uid):
    env = cli_env(home, hearth)
    model_id = uid("cli-dep-base")
    run(env, "model", "upload", str(tiny_dir), "--model-id", model_id)
    dep_id = uid("cli-dep")
    # No replica is wanted (min 0): --wait ends once it is created, saying it starts on demand.
    p = run(env, "deployment", "create", model_id, "--deployment-id", dep_id, "--min-replica-count", "0",
            "--max-replica-count", "2", "--enable-addons", "--wait", "-o", "json")
    d = json.loads(p.stdout)
    assert d["name"] == f"accounts/{hearth.account}/deployments/{dep_id}" and d["enableAddons"] is True
    assert "starts on its first request" in p.stderr
    table = run(env, "deployment", "list").stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "BASE", "MODEL"]
    assert any(line.split()[:2] == [dep_id, model_id] for line in table[1:]), table

    scaled = run_json(env, "deployment", "scale", dep_id, "--replica-count", "2")
    assert scaled["desiredReplicaCount"] == 2
    updated = run_json(env, "deployment", "update", dep_id, "--display-name", "cli", "--max-replica-count", "3")
    assert updated["displayName"] == "cli" and updated["maxReplicaCount"] == 3
    p = run(env, "deployment", "update", dep_id, ok=False)
    assert p.returncode == 1 and "nothing to update" in p.stderr
    # Speculation and hot load: a draft model by id, a versions bucket and its version.
    updated = run_json(env, "deployment", "update", dep_id, "--draft-model", model_id, "--draft-token-count", "3",
                       "--hot-load-bucket-url", "s3://versions/smol", "--target-model-version", "v2")
    assert updated["draftModel"] == f"accounts/{hearth.account}/models/{model_id}", updated
    assert (updated["draftTokenCount"], updated["enableHotLoad"], updated["targetModelVersion"]) == (
        3, True, "v2"), updated
    updated = run_json(env, "deployment", "update", dep_id, "--hot-load-bucket-url", "", "--draft-model", "",
                       "--draft-token-count", "0")
    assert "enableHotLoad" not in updated and "targetModelVersion" not in updated and "draftModel" not in updated

    assert run(env, "deployment", "delete", dep_id, "--wait").stdout.strip().startswith("deleted deployment")
    assert dep_id not in run(env, "deployment", "list").stdout
    deleted = [x for x in run_json(env, "deployment", "list", "--show-deleted") if x["name"].endswith(dep_id)]
    assert deleted and deleted[0]["state"] == "DELETED"
    assert run_json(env, "deployment", "undelete", dep_id)["state"] == "CREATING"
    run(env, "deployment", "delete", dep_id, "--hard", "--wait")
    p = run(env, "deployment", "get", dep_id, ok=False)
    assert p.stderr.startswith("error: NOT_FOUND"), p.stderr
    run(env, "model", "delete", model_id)


def test_completions(home):
    out = run(cli_env(home), "completions", "bash").stdout
    assert "_hearth()" in out and "deployment" in out


# ---------------------------------------------------------------------------------------------
# Live: deployments that run replicas
# ---------------------------------------------------------------------------------------------


def test_deploy_load_a_lora_chat_and_tear_down(hearth_live, home, tiny_dir, uid):
    server = hearth_live
    env = cli_env(home, server)
    base_id, lora_id, dep_id = uid("cli-live-base"), uid("cli-live-lora"), uid("cli-live")
    run(env, "model", "upload", str(tiny_dir), "--model-id", base_id, "--wait")
    lora = run_json(env, "model", "upload", str(LORA), "--model-id", lora_id, "--base-model", base_id, "--wait")
    assert lora["kind"] == "HF_PEFT_ADDON" and lora["peftDetails"]["baseModel"].endswith(f"/models/{base_id}")

    d = run_json(env, "deployment", "create", base_id, "--deployment-id", dep_id, "--min-replica-count", "1",
                 "--max-replica-count", "1", "--enable-addons", "--wait", "--timeout", "90s")
    assert d["state"] == "READY" and d["replicaCount"] == 1
    dm = run_json(env, "lora", "load", lora_id, "--deployment", dep_id, "--wait", "--timeout", "60s")
    assert dm["state"] == "DEPLOYED"
    listed = run(env, "lora", "list", "--deployment", dep_id).stdout.splitlines()
    assert listed[0].split() == ["ID", "MODEL", "DEPLOYMENT", "STATE", "DEFAULT"]
    assert listed[1].split()[1:4] == [lora_id, dep_id, "DEPLOYED"], listed

    # One-shot, streamed: the answer is on stdout, ending with a newline.
    base_answer = run(env, "chat", base_id, "Hello", "--max-tokens", "8", "--temperature", "0").stdout
    assert base_answer.endswith("\n") and base_answer.strip()
    lora_answer = run(env, "chat", lora_id, "--message", "Hello", "--max-tokens", "8", "--temperature", "0",
                      "--no-stream").stdout
    assert lora_answer.strip() and lora_answer != base_answer, (base_answer, lora_answer)
    # The same answer whether streamed or not.
    assert run(env, "chat", base_id, "Hello", "--max-tokens", "8", "--temperature", "0",
               "--no-stream").stdout == base_answer
    # A session: each line of input is a turn; the conversation carries over.
    session = run(env, "chat", base_id, "--max-tokens", "4", "--temperature", "0", stdin="Hello\n/reset\nHi there\n")
    assert len([line for line in session.stdout.splitlines() if line.strip()]) >= 1
    p = run(env, "chat", uid("nope"), "hi", ok=False)
    assert p.returncode == 1 and "NOT_FOUND" in p.stderr, p.stderr

    assert run(env, "lora", "unload", lora_id, "--deployment", dep_id, "--wait").stdout.startswith("unloaded ")
    assert run_json(env, "lora", "list", "--deployment", dep_id) == []
    run(env, "deployment", "delete", dep_id, "--wait", "--timeout", "30s")
    assert run_json(env, "deployment", "get", dep_id)["replicaCount"] == 0
    run(env, "deployment", "delete", dep_id, "--hard")
    run(env, "model", "delete", lora_id)
    run(env, "model", "delete", base_id)


# ---------------------------------------------------------------------------------------------
# Memory: a 2 GiB file streams through both sides
# ---------------------------------------------------------------------------------------------


def _kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field}")


def _peak_rss_kib(env, *args: str) -> tuple[int, subprocess.CompletedProcess]:
    """Runs the CLI and returns its peak RSS in KiB (wait4 reports the child's own) and its
    outcome."""
    proc = subprocess.Popen([str(hearth_binary()), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out: Dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, s=s: out.__setitem__(k, s.read()))
               for k, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in readers:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    for t in readers:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss, subprocess.CompletedProcess(args, proc.returncode, out["stdout"], out["stderr"])


def test_a_2_gib_upload_streams_through_client_and_server(hearth, home, tmp_path, uid):
    env = cli_env(home, hearth)
    big = tmp_path / "huge.gguf"
    size = 2 << 30
    with open(big, "wb") as f:  # sparse: no disk used on this side
        f.truncate(size)
    model_id = uid("cli-huge")
    server_pid = hearth.proc.pid
    baseline_cli, _ = _peak_rss_kib(env, "model", "list")
    baseline_server = _kib(server_pid, "VmRSS")
    peak_server = baseline_server
    stop = threading.Event()

    def sample():
        nonlocal peak_server
        while not stop.is_set():
            peak_server = max(peak_server, _kib(server_pid, "VmRSS"))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        # 1 GiB parts: a side that buffered a part would show it.
        peak_cli, p = _peak_rss_kib(env, "model", "upload", str(big), "--model-id", model_id, "--part-size", "1GiB")
    finally:
        stop.set()
        sampler.join()
        big.unlink()
    stored = hearth.data_dir / "artifacts" / hearth.account / "models" / model_id / "huge.gguf"
    try:
        # Every byte arrived and was verified; the zeros are then no GGUF, which validation says.
        assert stored.stat().st_size == size
        assert p.returncode == 1 and "FAILED_PRECONDITION" in p.stderr and "GGUF" in p.stderr, p.stderr
        assert peak_cli - baseline_cli < 100 << 10, f"the CLI grew by {(peak_cli - baseline_cli) >> 10} MiB"
        assert peak_server - baseline_server < 100 << 10, \
            f"the server grew by {(peak_server - baseline_server) >> 10} MiB"
    finally:
        run(env, "model", "delete", model_id)
    assert not stored.exists()
