#!/usr/bin/env python3
"""hearth's engine against llama.cpp on the same GGUF, on this machine's CPU.

Driven by scripts/bench-engine, which builds both; this starts and stops every server itself
(127.0.0.1 only), measures, and prints a Markdown table. Standard library only (matplotlib is
imported only for --plot).

What each number is (every one the median of --repeats runs):
  * prefill, through the server: one POST /v1/completions with a 512-token prompt given as a
    token-id list and max_tokens 1, timed end to end by the client (HTTP, queueing, the
    prefill and one sampled token): prompt_tokens / seconds. Every repeat uses different
    random token ids, and llama-server gets "cache_prompt": false, so nothing is reused.
  * batch-1 decode, through the server: one POST with an 8-token prompt, max_tokens 128,
    ignore_eos, temperature 0, timed end to end (includes the 8-token prefill and HTTP):
    completion_tokens / seconds.
  * aggregate decode: N clients released together, each one request (own 8-token prompt,
    max_tokens 64, ignore_eos); sum(completion_tokens) / (last response - release).
  * llama-bench column: llama.cpp without a server (`llama-bench -p 512 -n 128 -t T -r 3`,
    once per thread count T): pp512 is the prefill alone, tg128 the decode alone from an empty cache; no HTTP, no
    sampling. There is no such engine-only harness for hearth, so its ratio compares
    hearth-through-the-server with llama.cpp's best case.
  * long prompts (2 threads): prefill as above with prompts of 2,048, 4,000 and 8,000 tokens;
    batch-1 decode at a long context: one streamed request with a 4,000-token prompt and
    max_tokens 64, (chunks - 1) / (last chunk - first chunk), so the prefill is left out;
    a short request during a long prefill: an 8-token prompt (max_tokens 1) sent at 10%,
    25%, 40%, 55% and 70% of the time a 4,000-token prompt takes alone, while that prompt is
    being prefilled; its time to the response (the median of the 5). llama-server runs these
    with 2 slots of 8,192 tokens (-np 2 -c 16384), so it can take the short request at all.
  * structured output (--rows structured, 2 threads, 32 streams as above): each request once
    free and once constrained to JSON_SCHEMA below (an array of at least 50 small objects, so
    no output completes within 64 tokens and every stream runs its full length), through
    `response_format` on hearth and `json_schema` on llama-server (which compiles it to a GBNF
    grammar); the table gives each server's constrained rate and its ratio to its own free
    rate, measured on the same server process in the same run.
  * prefix cache (--rows prefix, 2 threads): requests that begin with the same 1,000 prompt
    tokens (a shared system prompt), each with its own 8-token tail, max_tokens 1 for the time
    to first token: "cold" is the first request with a new prefix, "warm" the next one with
    the same prefix (a fresh prefix per repeat). Then 32 streams released together, each
    the shared prefix plus its own tail, 64 tokens each (ignore_eos): aggregate tokens/s and
    the server's peak RSS meanwhile (sampled every 20 ms), hearth with its prefix cache and
    again with --no-prefix-cache. llama-server gets "cache_prompt": true here (its slots keep
    their last prompt) and -np 32 for the streams.
  * RSS: VmRSS from /proc of the server process, once /health answers and before any
    request ("after load"), and again after one warm-up request ("idle, warm").
  * other load: CPUs that other processes used meanwhile (this machine is shared); a figure
    taken beside too much other work is taken again while the --quiet-wait budget lasts.
"""

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

SERVED = "bench"
PREFILL_TOKENS = 512
DECODE_TOKENS = 128
STREAM_TOKENS = 64
SHORT_PROMPT = 8
LONG_PROMPTS = (2048, 4000, 8000)
LONG_CONTEXT = 4000
LONG_DECODE_TOKENS = 64
# When the short request is sent, as fractions of the long prompt's time alone.
DURING = (0.10, 0.25, 0.40, 0.55, 0.70)
# Token ids drawn for prompts: clear of SmolLM2's special tokens (0..16) and inside every
# vocabulary this harness is meant for (SmolLM2's is 49152).
TOKEN_RANGE = (1000, 30000)
REQUEST_TIMEOUT = 300
# A measurement taken beside other work (see CpuWatch) is taken again, this many times at most.
MAX_ATTEMPTS = 4

_children = []


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def kill_all():
    for p in list(_children):
        stop(p)


def stop(p):
    if p in _children:
        _children.remove(p)
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def _on_signal(signum, _frame):
    kill_all()
    sys.exit(128 + signum)


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def check(self, what):
        if time.monotonic() > self.end:
            raise SystemExit(f"time limit for the whole benchmark reached before {what}")


def rss_kib(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[k] = int(v.split()[0])
    return out


TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_s():
    """CPU-seconds the whole machine has spent busy (steal included: the hypervisor's other guests)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / TICK


def proc_cpu_s(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except OSError:
        return 0.0


def own_cpu_s():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuWatch:
    """How much CPU other processes took while a measurement ran, in CPUs (0 = none, 2 = both
    cores of a 2-vCPU machine): the machine's busy time less this script's, its reaped
    children's and the live server's."""

    def __init__(self, pid=None):
        self.pid = pid
        self.t0, self.busy0, self.own0 = time.monotonic(), machine_busy_s(), own_cpu_s()
        self.srv0 = proc_cpu_s(pid) if pid else 0.0

    def other(self):
        dt = max(time.monotonic() - self.t0, 1e-3)
        srv = proc_cpu_s(self.pid) - self.srv0 if self.pid else 0.0
        return max(0.0, (machine_busy_s() - self.busy0 - (own_cpu_s() - self.own0) - srv) / dt)


class Quiet:
    """Waits, within a budget for the whole run, until other processes leave the CPUs alone:
    below `threshold` CPUs for `samples` consecutive 2-second samples."""

    def __init__(self, budget, threshold=0.15, samples=3):
        self.left, self.threshold, self.samples = budget, threshold, samples

    def wait(self, what, pid=None):
        first, calm = True, 0
        while calm < self.samples:
            w = CpuWatch(pid)
            time.sleep(2)
            load = w.other()
            if load < self.threshold:
                calm += 1
                continue
            calm = 0
            if self.left <= 0:
                log(f"other processes use {load:.2f} CPUs; measuring {what} anyway (quiet-wait budget spent)")
                return
            if first:
                log(f"other processes use {load:.2f} CPUs; waiting for quiet before {what}")
                first = False
            time.sleep(8)
            self.left -= 10

    def retry(self, load, what):
        """After a measurement beside `load` CPUs of other work: whether to measure it again."""
        if load <= self.threshold or self.left <= 0:
            return False
        log(f"{what} was measured beside {load:.2f} CPUs of other work; measuring it again")
        return True


def request(port, body, timeout=REQUEST_TIMEOUT):
    """POST /v1/completions; returns (seconds, response JSON). The clock covers connect to body read."""
    data = json.dumps(body).encode()
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    elapsed = time.perf_counter() - t0
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status} from :{port}: {raw[:300]!r}")
    return elapsed, json.loads(raw)


def request_stream(port, body, timeout=REQUEST_TIMEOUT):
    """POST /v1/completions with stream on; returns the arrival time of every chunk that
    carries a choice (one per token on both servers)."""
    data = json.dumps(dict(body, stream=True)).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    times = []
    try:
        conn.request("POST", "/v1/completions", data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status} from :{port}: {resp.read()[:300]!r}")
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            if json.loads(payload).get("choices"):
                times.append(time.perf_counter())
    finally:
        conn.close()
    return times


class Server:
    """One server process: hearth's engine or llama-server."""

    def __init__(self, kind, argv, env, port, logdir, label):
        self.kind, self.port, self.label = kind, port, label
        self.logpath = os.path.join(logdir, f"{label}.log")
        self.logf = open(self.logpath, "wb")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _children.append(self.proc)
        self.extra = {"cache_prompt": False} if kind == "llama.cpp" else {}

    def wait_ready(self, timeout=180):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}; log: {self.logpath}\n{self.tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                ok = conn.getresponse().status == 200
                conn.close()
                if ok:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.label} not ready after {timeout}s; log: {self.logpath}\n{self.tail()}")

    def tail(self):
        self.logf.flush()
        with open(self.logpath, "rb") as f:
            return f.read()[-2000:].decode(errors="replace")

    def body(self, prompt, max_tokens):
        return {"model": SERVED, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": False, **self.extra}

    def close(self):
        stop(self.proc)
        self.logf.close()


def prompt_ids(seed, n):
    rng = random.Random(seed)
    return [rng.randrange(*TOKEN_RANGE) for _ in range(n)]


def check_usage(resp, want_completion, label):
    usage = resp.get("usage") or {}
    got = usage.get("completion_tokens")
    if got != want_completion:
        raise RuntimeError(f"{label}: asked for {want_completion} tokens with ignore_eos, usage says {got}")
    return usage


def measure_decode(srv, repeats, deadline):
    rates = []
    for r in range(repeats):
        deadline.check(f"decode on {srv.label}")
        t, resp = request(srv.port, srv.body(prompt_ids(2000 + r, SHORT_PROMPT), DECODE_TOKENS))
        check_usage(resp, DECODE_TOKENS, srv.label)
        rates.append(DECODE_TOKENS / t)
    return statistics.median(rates), rates


def released_together(n, work, label):
    """Runs work(i) for i in 0..n, each on its own thread, all released at one instant.
    Returns (results, seconds from the release to the last one done); raises the first error."""
    gate = threading.Event()
    results = [None] * n

    def client(i):
        gate.wait()
        try:
            results[i] = work(i)
        except Exception as e:  # reported below, after every thread is joined
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for th in threads:
        th.start()
    time.sleep(0.2)  # every thread parked on the gate
    t0 = time.perf_counter()
    gate.set()
    for th in threads:
        th.join(REQUEST_TIMEOUT + 10)
    wall = time.perf_counter() - t0
    bad = [x for x in results if x is None or isinstance(x, Exception)]
    if bad:
        raise RuntimeError(f"{label}: {bad[0]!r}")
    return results, wall


def measure_concurrent(srv, streams, repeats, deadline):
    rates = []
    for r in range(repeats):
        deadline.check(f"{streams} streams on {srv.label}")

        def one(i):
            _, resp = request(srv.port, srv.body(prompt_ids(10_000 * (r + 1) + i, SHORT_PROMPT), STREAM_TOKENS))
            return check_usage(resp, STREAM_TOKENS, srv.label)["completion_tokens"]

        tokens, wall = released_together(streams, one, f"{srv.label}, {streams} streams")
        rates.append(sum(tokens) / wall)
    return statistics.median(rates), rates


# What the structured rows constrain output to: structure-heavy JSON, every token masked.
JSON_SCHEMA = {"type": "array", "minItems": 50, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"], "additionalProperties": False}}


def measure_constrained(srv, streams, repeats, deadline):
    """measure_concurrent with every request's output constrained to JSON_SCHEMA."""
    extra = ({"response_format": {"type": "json_schema", "json_schema": JSON_SCHEMA}} if srv.kind == "hearth"
             else {"json_schema": JSON_SCHEMA})
    rates = []
    for r in range(repeats):
        deadline.check(f"{streams} constrained streams on {srv.label}")

        def one(i):
            body = dict(srv.body(prompt_ids(30_000 * (r + 1) + i, SHORT_PROMPT), STREAM_TOKENS), **extra)
            _, resp = request(srv.port, body)
            # Cut at 64 tokens the JSON is unfinished, but its start shows the constraint held.
            text = resp["choices"][0]["text"]
            if not "".join(text.split()).startswith("[{"):
                raise RuntimeError(f"{srv.label}: constrained output does not start the array: {text[:80]!r}")
            return check_usage(resp, STREAM_TOKENS, srv.label)["completion_tokens"]

        tokens, wall = released_together(streams, one, f"{srv.label}, {streams} constrained streams")
        rates.append(sum(tokens) / wall)
    return statistics.median(rates), rates


PREFIX_TOKENS = 1000


def prefix_body(srv, prefix, tail_seed, max_tokens):
    """A request of the shared prefix and its own 8-token tail; llama-server keeps its cache."""
    body = srv.body(prefix + prompt_ids(tail_seed, SHORT_PROMPT), max_tokens)
    if srv.kind == "llama.cpp":
        body["cache_prompt"] = True
    return body


def measure_prefix_ttft(srv, warm, repeats, deadline):
    """Seconds to the response of a 1,000-token-prefix request, the prefix new ("cold") or
    just used by another request ("warm")."""
    times = []
    for r in range(repeats):
        deadline.check(f"prefix TTFT on {srv.label}")
        prefix = prompt_ids(70_000 + r * 10 + int(warm), PREFIX_TOKENS)
        t, resp = request(srv.port, prefix_body(srv, prefix, 80_000 + r, 1))
        check_usage(resp, 1, srv.label)
        if warm:
            t, resp = request(srv.port, prefix_body(srv, prefix, 90_000 + r, 1))
            check_usage(resp, 1, srv.label)
        times.append(t)
    return statistics.median(times), times


class PeakRss:
    """The highest VmRSS of a process while it is watched."""

    def __init__(self, pid):
        self.pid, self.peak, self.stop = pid, 0, threading.Event()
        self.th = threading.Thread(target=self.run, daemon=True)
        self.th.start()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid).get("VmRSS", 0))
            time.sleep(0.02)

    def done(self):
        self.stop.set()
        self.th.join()
        return self.peak / 1024


def measure_prefix_streams(srv, streams, peaks, repeats, deadline):
    """32 streams sharing one prefix: aggregate tokens/s; the peak RSS goes into `peaks`."""
    rates = []
    for r in range(repeats):
        deadline.check(f"{streams} prefix-sharing streams on {srv.label}")
        prefix = prompt_ids(100_000 + r, PREFIX_TOKENS)
        # One request first, as a deployment's first user would: the prefix is then known.
        request(srv.port, prefix_body(srv, prefix, 110_000 + r, 1))
        watch = PeakRss(srv.proc.pid)

        def one(i):
            _, resp = request(srv.port, prefix_body(srv, prefix, 120_000 + 100 * r + i, STREAM_TOKENS))
            return check_usage(resp, STREAM_TOKENS, srv.label)["completion_tokens"]

        try:
            tokens, wall = released_together(streams, one, f"{srv.label}, {streams} prefix streams")
        finally:
            peaks.append(watch.done())
        rates.append(sum(tokens) / wall)
    return statistics.median(rates), rates


def measure_prefill(srv, n, repeats, deadline):
    rates = []
    for r in range(repeats):
        deadline.check(f"a {n}-token prefill on {srv.label}")
        t, resp = request(srv.port, srv.body(prompt_ids(1000 + 17 * n + r, n), 1))
        usage = check_usage(resp, 1, srv.label)
        if usage.get("prompt_tokens") != n:
            raise RuntimeError(f"{srv.label}: sent {n} prompt tokens, usage says {usage.get('prompt_tokens')}")
        rates.append(n / t)
    return statistics.median(rates), rates


def measure_long_decode(srv, repeats, deadline):
    rates = []
    for r in range(repeats):
        deadline.check(f"decode at {LONG_CONTEXT} tokens of context on {srv.label}")
        times = request_stream(srv.port, srv.body(prompt_ids(4000 + r, LONG_CONTEXT), LONG_DECODE_TOKENS))
        if len(times) < LONG_DECODE_TOKENS // 2:
            raise RuntimeError(f"{srv.label}: {len(times)} streamed chunks for {LONG_DECODE_TOKENS} tokens")
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    return statistics.median(rates), rates


def measure_ttft_during(srv, alone, repeats, deadline):
    """The short request's time to its response, sent at each fraction of DURING of the long
    prompt's time `alone` (the repeats argument is unused: the 5 sends are the samples)."""
    del repeats
    waits = []
    for i, frac in enumerate(DURING):
        deadline.check(f"a short request during a long prefill on {srv.label}")
        long_done = {}

        def long_prompt():
            long_done["t"] = request(srv.port, srv.body(prompt_ids(5000 + i, LONG_CONTEXT), 1))[0]

        th = threading.Thread(target=long_prompt, daemon=True)
        th.start()
        time.sleep(alone * frac)
        t, resp = request(srv.port, srv.body(prompt_ids(6000 + i, SHORT_PROMPT), 1))
        check_usage(resp, 1, srv.label)
        th.join(REQUEST_TIMEOUT)
        if "t" not in long_done:
            raise RuntimeError(f"{srv.label}: the long prompt did not finish")
        waits.append(t)
    return statistics.median(waits), waits


def warm_up(srv):
    request(srv.port, srv.body(prompt_ids(7, SHORT_PROMPT), 8))
    request(srv.port, srv.body(prompt_ids(8, 64), 1))


def run_llama_bench(binary, model, threads, repeats, no_repack, logdir):
    """llama-bench pp512 and tg128 at `threads` threads. Returns ({"pp"|"tg": median t/s}, repack flag used)."""
    argv = [binary, "-m", model, "-p", str(PREFILL_TOKENS), "-n", str(DECODE_TOKENS), "-t", str(threads),
            "-r", str(repeats), "-o", "json"]
    for attempt_no_repack in ([True] if no_repack else [False, True]):
        cmd = argv + (["--repack", "0"] if attempt_no_repack else [])
        log("running " + " ".join(cmd))
        with open(os.path.join(logdir, "llama-bench.err"), "wb") as err:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, timeout=1800)
        if p.returncode == -signal.SIGILL and not attempt_no_repack:
            log("llama-bench died of SIGILL; retrying with --repack 0")
            continue
        if p.returncode != 0:
            raise RuntimeError(f"llama-bench exited with {p.returncode}; see {logdir}/llama-bench.err")
        out = {}
        for rec in json.loads(p.stdout):
            test = "pp" if rec["n_gen"] == 0 else "tg"
            samples = rec.get("samples_ts") or [rec["avg_ts"]]
            out[test] = statistics.median(samples)
        return out, attempt_no_repack
    raise RuntimeError("llama-bench died of SIGILL even with --repack 0")


def start_hearth(binary, model, threads, logdir, extra=()):
    port = free_port()
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    argv = [binary, "engine", "--model", model, "--listen", f"127.0.0.1:{port}", "--served-model-name", SERVED,
            *extra]
    return Server("hearth", argv, env, port, logdir, f"hearth-t{threads}{''.join(extra)}")


def start_llama(binary, model, threads, slots, no_repack, logdir, ctx=None):
    port = free_port()
    ctx = ctx or max(1024, slots * 256)
    argv = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads), "-tb", str(threads),
            "-np", str(slots), "-c", str(ctx), "-a", SERVED] + (["-nr"] if no_repack else [])
    return Server("llama.cpp", argv, dict(os.environ), port, logdir, f"llama-server-t{threads}-np{slots}-c{ctx}")


def started(srv):
    """Waits for /health; a llama-server that died of SIGILL is reported as such."""
    try:
        srv.wait_ready()
    except RuntimeError:
        if srv.proc.returncode == -signal.SIGILL:
            raise RuntimeError(f"{srv.label} died of SIGILL (try scripts/bench-engine --no-repack)") from None
        raise
    return srv


def fmt_rate(x):
    return "—" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:,.1f}")


def ratio(a, b):
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hearth", required=True)
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-repack", action="store_true", help="llama.cpp without weight repacking (--repack 0 / -nr)")
    ap.add_argument("--time-limit", type=float, default=3600, help="seconds for the whole run")
    ap.add_argument("--quiet-wait", type=float, default=900,
                    help="seconds, over the whole run, to wait for other processes to leave the CPUs alone")
    ap.add_argument("--rows", default="short,long",
                    help="which rows: short (512-token prefill, decode, streams), long (long prompts), or both")
    ap.add_argument("--json", help="also write the raw figures here")
    ap.add_argument("--plot", help="also draw a PNG bar chart here (needs matplotlib)")
    ap.add_argument("--logdir", help="where the servers' and llama-bench's logs go (default: a new temporary directory)")
    ap.add_argument("--note", default="", help="a line printed under the table (build details)")
    args = ap.parse_args()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    deadline = Deadline(args.time_limit)
    logdir = args.logdir or tempfile.mkdtemp(prefix="bench-engine-")
    os.makedirs(logdir, exist_ok=True)
    log(f"server logs in {logdir}")
    rows = {}  # key -> {"hearth": x, "server": y, "bench": z}
    busy = {}  # key -> {"hearth": CPUs other processes used meanwhile, "server": ...}
    cpus = {}  # key -> {"hearth": CPUs the server itself kept busy, "server": ...}
    raw = {}
    rss = {}
    prefix_rss = {}  # column -> median peak RSS (MiB) during the prefix-sharing streams
    no_repack = args.no_repack
    quiet = Quiet(args.quiet_wait)

    def measured(key, col, srv, fn, *a):
        what = f"{srv.label}: {key[0]} {key[1]}"
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if attempt > 1:
                quiet.wait(what, srv.proc.pid)
            log(what)
            w = CpuWatch(srv.proc.pid)
            cpu0, t0 = proc_cpu_s(srv.proc.pid), time.monotonic()
            med, samples = fn(srv, *a, args.repeats, deadline)
            load = w.other()
            server_cpus = (proc_cpu_s(srv.proc.pid) - cpu0) / (time.monotonic() - t0)
            if attempt == MAX_ATTEMPTS or not quiet.retry(load, what):
                break
        rows.setdefault(key, {})[col] = med
        busy.setdefault(key, {})[col] = load
        cpus.setdefault(key, {})[col] = server_cpus
        raw.setdefault(srv.label, {})[f"{key[0]}_{key[1]}"] = {
            "samples": samples, "attempts": attempt, "server_cpus": server_cpus}

    wanted = set(args.rows.split(","))

    def long_rows(srv, col):
        for n in LONG_PROMPTS:
            measured(("long", n), col, srv, measure_prefill, n)
        measured(("tgctx", LONG_CONTEXT), col, srv, measure_long_decode)
        alone = LONG_CONTEXT / rows[("long", LONG_CONTEXT)][col]
        measured(("ttft", LONG_CONTEXT), col, srv, measure_ttft_during, alone)

    try:
        if "short" in wanted:
            for threads in (1, 2):
                what = f"llama-bench at {threads} threads"
                for attempt in range(1, MAX_ATTEMPTS + 1):
                    deadline.check(what)
                    quiet.wait(what)
                    w = CpuWatch()
                    res, no_repack = run_llama_bench(args.llama_bench, args.model, threads, args.repeats, no_repack, logdir)
                    load = w.other()
                    if attempt == MAX_ATTEMPTS or not quiet.retry(load, what):
                        break
                for test, v in res.items():
                    rows.setdefault((test, threads), {})["bench"] = v
                    busy.setdefault((test, threads), {})["bench"] = load
                    raw.setdefault("llama-bench", {})[f"{test}_{threads}"] = {"median": v, "attempts": attempt}

            for kind in ("hearth", "llama.cpp"):
                col = "hearth" if kind == "hearth" else "server"
                for threads in (1, 2):
                    deadline.check(f"{kind} at {threads} threads")
                    quiet.wait(f"{kind} at {threads} threads")
                    srv = (start_hearth(args.hearth, args.model, threads, logdir) if kind == "hearth"
                           else start_llama(args.llama_server, args.model, threads, 1, no_repack, logdir))
                    try:
                        started(srv)
                        if threads == 2:
                            time.sleep(1)
                            rss[(kind, "load")] = rss_kib(srv.proc.pid)
                        warm_up(srv)
                        if threads == 2:
                            time.sleep(1)
                            rss[(kind, "warm")] = rss_kib(srv.proc.pid)
                        measured(("pp", threads), col, srv, measure_prefill, PREFILL_TOKENS)
                        measured(("tg", threads), col, srv, measure_decode)
                        if kind == "hearth" and threads == 2:
                            for n in (8, 32):
                                measured(("agg", n), col, srv, measure_concurrent, n)
                    finally:
                        srv.close()
            for n in (8, 32):
                deadline.check(f"llama-server with {n} slots")
                quiet.wait(f"llama-server with {n} slots")
                srv = start_llama(args.llama_server, args.model, 2, n, no_repack, logdir)
                try:
                    started(srv)
                    warm_up(srv)
                    measured(("agg", n), "server", srv, measure_concurrent, n)
                finally:
                    srv.close()
        if "structured" in wanted:
            for kind in ("hearth", "llama.cpp"):
                col = "hearth" if kind == "hearth" else "server"
                deadline.check(f"{kind} on structured output")
                quiet.wait(f"{kind} on structured output")
                srv = (start_hearth(args.hearth, args.model, 2, logdir) if kind == "hearth"
                       else start_llama(args.llama_server, args.model, 2, 32, no_repack, logdir))
                try:
                    started(srv)
                    warm_up(srv)
                    measured(("free", 32), col, srv, measure_concurrent, 32)
                    measured(("json", 32), col, srv, measure_constrained, 32)
                finally:
                    srv.close()
        if "prefix" in wanted:
            for kind, extra in (("hearth", ()), ("hearth", ("--no-prefix-cache",)), ("llama.cpp", ())):
                col = ("hearth" if not extra else "nocache") if kind == "hearth" else "server"
                deadline.check(f"{kind} on shared prefixes")
                quiet.wait(f"{kind} on shared prefixes")
                srv = (start_hearth(args.hearth, args.model, 2, logdir, extra) if kind == "hearth"
                       else start_llama(args.llama_server, args.model, 2, 32, no_repack, logdir, ctx=32 * 1200))
                try:
                    started(srv)
                    warm_up(srv)
                    if not extra:
                        measured(("pfx_cold", PREFIX_TOKENS), col, srv, measure_prefix_ttft, False)
                        measured(("pfx_warm", PREFIX_TOKENS), col, srv, measure_prefix_ttft, True)
                    peaks = []
                    measured(("pfx_agg", 32), col, srv, measure_prefix_streams, 32, peaks)
                    prefix_rss[col] = statistics.median(peaks)
                finally:
                    srv.close()
        if "long" in wanted:
            for kind in ("hearth", "llama.cpp"):
                deadline.check(f"{kind} on long prompts")
                quiet.wait(f"{kind} on long prompts")
                srv = (start_hearth(args.hearth, args.model, 2, logdir) if kind == "hearth"
                       else start_llama(args.llama_server, args.model, 2, 2, no_repack, logdir, ctx=16384))
                try:
                    started(srv)
                    warm_up(srv)
                    long_rows(srv, "hearth" if kind == "hearth" else "server")
                finally:
                    srv.close()
    finally:
        kill_all()

    labels = {
        ("pp", 1): f"prefill, {PREFILL_TOKENS}-token prompt, 1 thread (tokens/s)",
        ("pp", 2): f"prefill, {PREFILL_TOKENS}-token prompt, 2 threads (tokens/s)",
        ("tg", 1): f"decode, batch 1, {DECODE_TOKENS} tokens, 1 thread (tokens/s)",
        ("tg", 2): f"decode, batch 1, {DECODE_TOKENS} tokens, 2 threads (tokens/s)",
        ("agg", 8): f"aggregate decode, 8 streams × {STREAM_TOKENS} tokens, 2 threads (tokens/s)",
        ("agg", 32): f"aggregate decode, 32 streams × {STREAM_TOKENS} tokens, 2 threads (tokens/s)",
        **{("long", n): f"prefill, {n:,}-token prompt, 2 threads (tokens/s)" for n in LONG_PROMPTS},
        ("tgctx", LONG_CONTEXT): f"decode, batch 1, at {LONG_CONTEXT:,} tokens of context, 2 threads (tokens/s)",
        ("free", 32): f"32 streams × {STREAM_TOKENS} tokens, free, beside the constrained row (tokens/s)",
        ("json", 32): f"32 streams × {STREAM_TOKENS} tokens, all constrained to a JSON schema (tokens/s)",
        ("ttft", LONG_CONTEXT): f"short request's response during a {LONG_CONTEXT:,}-token prefill, 2 threads (s, lower is better)",
    }
    order = [k for k in [("pp", 1), ("pp", 2), ("tg", 1), ("tg", 2), ("agg", 8), ("agg", 32),
                         ("free", 32), ("json", 32),
                         *[("long", n) for n in LONG_PROMPTS], ("tgctx", LONG_CONTEXT), ("ttft", LONG_CONTEXT)]
             if k in rows]
    lines = [
        "| measurement | hearth (server) | llama.cpp (llama-server) | hearth / llama-server "
        "| llama.cpp (llama-bench) | hearth / llama-bench | other load, CPUs (hearth / llama-server / llama-bench) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in order:
        r, o = rows.get(key, {}), busy.get(key, {})
        h, s, b = r.get("hearth"), r.get("server"), r.get("bench")
        load = " / ".join("—" if o.get(c) is None else f"{o[c]:.2f}" for c in ("hearth", "server", "bench"))
        if key[0] == "ttft":
            # Seconds: the ratio is how many times sooner hearth answers.
            lines.append(f"| {labels[key]} | {h:.2f} | {s:.2f} | {ratio(s, h)} (× sooner) | — | — | {load} |")
            continue
        lines.append(f"| {labels[key]} | {fmt_rate(h)} | {fmt_rate(s)} | {ratio(h, s)} | {fmt_rate(b)} | {ratio(h, b)} "
                     f"| {load} |")
    mib = lambda kind, when, k="VmRSS": rss.get((kind, when), {}).get(k, 0) / 1024  # noqa: E731
    for when, what in [] if not rss else (("load", "after load, before any request"), ("warm", "idle after one warm-up request")):
        h, s = mib("hearth", when), mib("llama.cpp", when)
        lines.append(f"| resident memory (RSS), {what} (MiB) | {h:,.0f} | {s:,.0f} | {ratio(h, s)} | — | — | |")
    if ("json", 32) in rows and ("free", 32) in rows:
        j, f = rows[("json", 32)], rows[("free", 32)]
        h, s = ratio(j.get("hearth"), f.get("hearth")), ratio(j.get("server"), f.get("server"))
        lines.append(f"| constrained / free, 32 streams (each server against itself) | {h} | {s} | — | — | — | |")
    if ("pfx_warm", PREFIX_TOKENS) in rows:
        c, w, a = rows[("pfx_cold", PREFIX_TOKENS)], rows[("pfx_warm", PREFIX_TOKENS)], rows[("pfx_agg", 32)]
        lines += [
            "",
            f"| prefix cache: {PREFIX_TOKENS:,}-token shared prompt, 2 threads | hearth | llama.cpp (llama-server)"
            " | hearth / llama-server | hearth without its cache |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| time to first token, cold (s) | {c.get('hearth', 0):.3f} | {c.get('server', 0):.3f} "
            f"| {ratio(c.get('server'), c.get('hearth'))} (× sooner) | — |",
            f"| time to first token, warm (s) | {w.get('hearth', 0):.3f} | {w.get('server', 0):.3f} "
            f"| {ratio(w.get('server'), w.get('hearth'))} (× sooner) | — |",
            f"| warm speed-up (cold / warm) | {ratio(c.get('hearth'), w.get('hearth'))} "
            f"| {ratio(c.get('server'), w.get('server'))} | — | — |",
            f"| 32 streams sharing it × {STREAM_TOKENS} tokens (tokens/s) | {fmt_rate(a.get('hearth'))} "
            f"| {fmt_rate(a.get('server'))} | {ratio(a.get('hearth'), a.get('server'))} | {fmt_rate(a.get('nocache'))} |",
            f"| peak RSS during those streams (MiB) | {prefix_rss.get('hearth', 0):,.0f} "
            f"| {prefix_rss.get('server', 0):,.0f} | {ratio(prefix_rss.get('hearth'), prefix_rss.get('server'))} "
            f"| {prefix_rss.get('nocache', 0):,.0f} |",
        ]
    table = "\n".join(lines)
    print(table)
    print()
    breakdown = "; ".join(
        f"{kind} {mib(kind, 'warm', 'RssAnon'):,.0f} MiB anonymous + {mib(kind, 'warm', 'RssFile'):,.0f} MiB file-backed"
        for kind in ("hearth", "llama.cpp"))
    print(f"RSS when warm: {breakdown} (llama.cpp maps the GGUF; its weights count as file-backed pages).")
    print(f"Every figure is the median of {args.repeats} runs. llama.cpp weight repacking: "
          f"{'off (--repack 0 / -nr)' if no_repack else 'default (on)'}.")
    short = {("pp", 1): "prefill 1T", ("pp", 2): "prefill 2T", ("tg", 1): "decode 1T", ("tg", 2): "decode 2T",
             ("agg", 8): "8 streams", ("agg", 32): "32 streams", ("free", 32): "32 free", ("json", 32): "32 JSON", ("tgctx", LONG_CONTEXT): f"decode at {LONG_CONTEXT}",
             ("ttft", LONG_CONTEXT): "short during long", **{("long", n): f"prefill {n}" for n in LONG_PROMPTS}}
    used = ", ".join(f"{short[k]} {cpus[k].get('hearth', 0):.2f} / {cpus[k].get('server', 0):.2f}" for k in order if k in cpus)
    print(f"CPUs each server kept busy while measured (hearth / llama-server): {used}.")
    worst = max(v for o in busy.values() for v in o.values())
    print(f"Other load: CPUs that other processes used while each figure was measured (a figure taken beside more"
          f" than {quiet.threshold} CPUs of other work is measured again, {MAX_ATTEMPTS} times at most, while the"
          f" quiet-wait budget lasts); such figures are not comparable."
          + (f" WARNING: up to {worst:.2f} CPUs were busy elsewhere in this run." if worst > quiet.threshold else ""))
    if args.note:
        print(args.note)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": {f"{k[0]}_{k[1]}": v for k, v in rows.items()},
                       "other_load_cpus": {f"{k[0]}_{k[1]}": v for k, v in busy.items()},
                       "server_cpus": {f"{k[0]}_{k[1]}": v for k, v in cpus.items()},
                       "rss_kib": {f"{k[0]}_{k[1]}": v for k, v in rss.items()}, "raw": raw}, f, indent=1)
    if args.plot:
        plot(args.plot, [(labels[k], rows.get(k, {})) for k in order if k[0] != "ttft"])


def plot(path, data):
    """Horizontal bars, hearth against llama-server, one pair per throughput row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = [lab.split(" (")[0].replace(f", {STREAM_TOKENS} tokens", "").replace(", batch 1,", ",")
             .replace("aggregate decode, ", "").replace("-token prompt", " tokens") for lab, _ in data]
    fig, ax = plt.subplots(figsize=(8, 3.4), dpi=80)
    ys = range(len(data))
    h = [r.get("hearth") or 0 for _, r in data]
    s = [r.get("server") or 0 for _, r in data]
    ax.barh([y - 0.2 for y in ys], h, 0.4, label="hearth", color="#d9622b")
    ax.barh([y + 0.2 for y in ys], s, 0.4, label="llama.cpp (llama-server)", color="#4a7ab5")
    for y, (a, b) in enumerate(zip(h, s)):
        ax.text(a, y - 0.2, f" {a:,.0f}", va="center", fontsize=7)
        ax.text(b, y + 0.2, f" {b:,.0f}" + (f"   hearth ×{a / b:.2f}" if b else ""), va="center", fontsize=7)
    ax.set_yticks(list(ys), short, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, max(h + s) * 1.25)
    ax.set_xlabel("tokens/s through each server's /v1/completions, 2 vCPUs (median of 3)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    log(f"plot written to {path}")


if __name__ == "__main__":
    try:
        main()
    finally:
        kill_all()
