"""pytest fixtures for the hearth end-to-end suite.

One ``hearth serve`` process per test session: a free port on 127.0.0.1, a fresh temporary
data dir, and two freshly named accounts (``acct-<random>``) with random API keys, so the suite
also runs against a shared PostgreSQL database (``HEARTH_DATABASE_URL``). The server's
stdout/stderr go to a log file; the part written during a failing test is attached to its
report.

Environment:
  HEARTH_BIN            the hearth binary (default <repo>/target/debug/hearth, then target/release/hearth)
  HEARTH_DATABASE_URL   passed to the server as --database-url (default: the server's own, under --data-dir)
  HEARTH_START_TIMEOUT  seconds to wait for GET /health to answer 200 (default 60)
  HEARTH_KEEP_TMP=1     keep the temporary data dir and server log after the session
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import httpx
import pytest
import requests

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import fireworks  # noqa: E402

import fixtures  # noqa: E402

# Variables the server reads that the fixture sets through flags instead; they are removed from
# the child's environment so a developer's shell cannot leak into the test server.
_SERVER_ENV_VARS = (
    "HEARTH_LISTEN",
    "HEARTH_DATA_DIR",
    "HEARTH_API_KEY",
    "HEARTH_ACCOUNT",
    "HEARTH_EXTRA_API_KEY",
    "HEARTH_DATABASE_URL",
)


def hearth_binary() -> Path:
    env = os.environ.get("HEARTH_BIN")
    if env:
        path = Path(env)
        if not path.is_file():
            pytest.fail(f"HEARTH_BIN={env} does not exist", pytrace=False)
        return path
    for profile in ("debug", "release"):
        path = REPO_ROOT / "target" / profile / "hearth"
        if path.is_file():
            return path
    pytest.fail(
        "no hearth binary: build it (cargo build -p hearth) or set HEARTH_BIN "
        f"(looked for {REPO_ROOT / 'target/debug/hearth'} and {REPO_ROOT / 'target/release/hearth'})",
        pytrace=False,
    )
    raise AssertionError("unreachable")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_account() -> str:
    return "acct-" + secrets.token_hex(5)


def _random_key() -> str:
    return "hk-" + secrets.token_hex(16)


@dataclass
class HearthServer:
    base_url: str
    port: int
    account: str
    api_key: str
    account2: str
    api_key2: str
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen
    command: List[str] = field(default_factory=list)

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int, max_lines: int = 300) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
        except OSError as e:
            return f"(cannot read {self.log_path}: {e})"
        lines = text.splitlines()
        if len(lines) > max_lines:
            lines = [f"... ({len(lines) - max_lines} earlier lines in {self.log_path})"] + lines[-max_lines:]
        return "\n".join(lines)


_SERVER: Optional[HearthServer] = None


def _start(binary: Path, workdir: Path, attempt: int, runtime: str = "none", extra_env: Optional[dict] = None) -> HearthServer:
    port = _free_port()
    data_dir = workdir / f"data-{attempt}"
    data_dir.mkdir()
    log_path = workdir / f"hearth-{attempt}.log"
    account, account2 = _random_account(), _random_account()
    key, key2 = _random_key(), _random_key()
    cmd = [
        str(binary),
        "serve",
        "--listen", f"127.0.0.1:{port}",
        "--data-dir", str(data_dir),
        "--api-key", key,
        "--account", account,
        "--extra-api-key", f"{key2}:{account2}",
        "--runtime", runtime,
    ]
    db_url = database_url(runtime)
    if db_url:
        cmd += ["--database-url", db_url]
    env = {k: v for k, v in os.environ.items() if k not in _SERVER_ENV_VARS}
    env.setdefault("RUST_BACKTRACE", "1")
    env.update(extra_env or {})
    log = open(log_path, "wb")
    try:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(workdir))
    finally:
        log.close()
    return HearthServer(
        base_url=f"http://127.0.0.1:{port}",
        port=port,
        account=account,
        api_key=key,
        account2=account2,
        api_key2=key2,
        data_dir=data_dir,
        log_path=log_path,
        proc=proc,
        command=cmd,
    )


def database_url(runtime: str) -> Optional[str]:
    """The store a server gets: ``HEARTH_DATABASE_URL`` when set (the suite's PostgreSQL run),
    else the server's own SQLite. A ``--runtime local`` or ``kubernetes`` server gets a fresh database of its own
    on that PostgreSQL: its reconciler manages every deployment in its store, so two of them
    must never share one (hearth runs one local-runtime gateway per store)."""
    url = os.environ.get("HEARTH_DATABASE_URL")
    if not url or runtime not in ("local", "kubernetes"):
        return url
    psql = shutil.which("psql") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"))), None)
    if psql is None:
        pytest.fail("HEARTH_DATABASE_URL is set but psql is not installed", pytrace=False)
    name = "hearth_e2e_" + secrets.token_hex(4)
    subprocess.run([str(psql), url, "-qc", f"CREATE DATABASE {name}"], check=True, capture_output=True, timeout=60)
    return url.split("?", 1)[0].rsplit("/", 1)[0] + "/" + name


def _wait_healthy(server: HearthServer, deadline: float) -> Optional[str]:
    """None once /health answers 200; otherwise why not."""
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return f"hearth exited with status {server.proc.returncode} before becoming healthy"
        try:
            r = requests.get(server.base_url + "/health", timeout=2)
            if r.status_code == 200:
                return None
            last = f"GET /health answered {r.status_code}: {r.text[:200]}"
        except requests.RequestException as e:
            last = f"GET /health failed: {e.__class__.__name__}"
        time.sleep(0.1)
    return f"hearth did not become healthy in time ({last})"


def _stop(server: HearthServer) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def hearth():
    """The running server: ``base_url``, ``account``/``api_key`` and a second
    ``account2``/``api_key2``. It runs no replicas (``--runtime none``): the control API is its
    subject, and deployment states stay where the API puts them."""
    yield from _serve("none")


@pytest.fixture(scope="session")
def hearth_live():
    """A server whose deployments run as local engine replicas (``--runtime local``)."""
    yield from _serve("local")


def _serve(runtime: str, extra_env: Optional[dict] = None):
    """Starts a server (retrying a port clash), yields it, stops it. ``extra_env`` is added to
    its environment (a module that needs, say, ``HF_ENDPOINT`` starts its own)."""
    global _SERVER
    binary = hearth_binary()
    workdir = Path(tempfile.mkdtemp(prefix="hearth-e2e-"))
    timeout = float(os.environ.get("HEARTH_START_TIMEOUT", "60"))
    server = None
    failure = ""
    for attempt in range(3):  # an early exit may be the probed port taken meanwhile: retry
        server = _start(binary, workdir, attempt, runtime, extra_env)
        why = _wait_healthy(server, time.monotonic() + timeout)
        if why is None:
            break
        exited = server.proc.poll() is not None
        _stop(server)
        failure = f"{why}\ncommand: {' '.join(server.command)}\n--- server log ---\n{server.log_since(0)}"
        server = None
        if not exited:
            break
    if server is None:
        if os.environ.get("HEARTH_KEEP_TMP") != "1":
            shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail(failure, pytrace=False)
    _SERVER = server
    try:
        yield server
    finally:
        _SERVER = None
        _stop(server)
        if os.environ.get("HEARTH_KEEP_TMP") == "1":
            sys.stderr.write(f"\nhearth test data kept in {workdir}\n")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Attach the server log written during a failing test to its report.
# ---------------------------------------------------------------------------------------------

_LOG_MARK = pytest.StashKey[int]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    item.stash[_LOG_MARK] = _SERVER.log_size() if _SERVER is not None else 0
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and _SERVER is not None and "hearth" in getattr(item, "fixturenames", ()):
        rep.sections.append(
            (f"hearth server log during this test ({_SERVER.log_path})", _SERVER.log_since(item.stash.get(_LOG_MARK, 0)) or "(empty)")
        )


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------


def make_client(server: HearthServer, *, api_key: Optional[str] = None, account_id: Optional[str] = None, **kw) -> fireworks.Fireworks:
    return fireworks.Fireworks(
        api_key=api_key if api_key is not None else server.api_key,
        account_id=account_id if account_id is not None else server.account,
        base_url=server.base_url,
        timeout=kw.pop("timeout", 30),
        **kw,
    )


@pytest.fixture(scope="session")
def client(hearth) -> fireworks.Fireworks:
    """The Fireworks SDK, as the first account (account_id set on the client)."""
    return make_client(hearth)


@pytest.fixture(scope="session")
def client2(hearth) -> fireworks.Fireworks:
    """The Fireworks SDK with the second account's key and account id."""
    return make_client(hearth, api_key=hearth.api_key2, account_id=hearth.account2)


@pytest.fixture
def counting_client(hearth) -> Iterator[Tuple[fireworks.Fireworks, List[Tuple[str, str]]]]:
    """An SDK client (default retry settings) and the list of HTTP requests it has sent."""
    sent: List[Tuple[str, str]] = []
    http = httpx.Client(timeout=30, event_hooks={"request": [lambda r: sent.append((r.method, r.url.path))]})
    c = make_client(hearth, http_client=http)
    yield c, sent
    http.close()


@pytest.fixture(scope="session")
def api(hearth) -> fixtures.RawApi:
    """Raw HTTP as the first account."""
    return fixtures.RawApi(hearth.base_url, hearth.api_key, hearth.account)


@pytest.fixture(scope="session")
def uid() -> Callable[[str], str]:
    """``uid("base")`` -> a fresh valid resource id such as ``base-3f9a1c7e``."""

    def make(prefix: str) -> str:
        return f"{prefix}-{secrets.token_hex(4)}"

    return make


# ---------------------------------------------------------------------------------------------
# Shared READY models (tests that delete or change models create their own)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ready_base(client, uid, tmp_path_factory):
    """A READY HF_BASE_MODEL holding the tiny Llama."""
    return fixtures.create_ready_base_model(client, uid("shared-base"), tmp_path_factory.mktemp("shared-base"))


@pytest.fixture(scope="session")
def ready_addon(client, uid, ready_base, tmp_path_factory):
    """A READY HF_PEFT_ADDON on ``ready_base``."""
    return fixtures.create_ready_addon(client, uid("shared-lora"), ready_base.name, tmp_path_factory.mktemp("shared-lora"))


# ---------------------------------------------------------------------------------------------
# Figures a test wants in the run's summary (pytest -q hides what tests print).
# ---------------------------------------------------------------------------------------------

SUMMARY: List[str] = []


def pytest_terminal_summary(terminalreporter):
    for line in SUMMARY:
        terminalreporter.write_line(line)
