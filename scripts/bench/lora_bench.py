#!/usr/bin/env python3
"""Multi-LoRA serving on this machine's CPU: hearth's engine against llama-server, in one run.

Driven by scripts/bench-lora, which builds both; this generates the adapters (cached), converts
the ones llama.cpp needs, starts and stops every server itself (127.0.0.1 only), measures, and
prints a Markdown table. Needs numpy (adapter generation); the conversion for llama.cpp runs
llama.cpp's own convert_lora_to_gguf.py under a Python that has torch, safetensors and
transformers (--convert-python, else a virtual environment made under the cache on first use).
Server handling, prompts and load accounting come from engine_vs_llamacpp.py beside this file.

Every throughput row is aggregate decode: --streams clients released together, one request
each (own 8-token random prompt, --tokens generated, ignore_eos, temperature 0);
sum(completion_tokens) / (last response - release), the median of --repeats runs. The runs of
(a), (b) and (c), one server's rows, are taken in turn (a, b, c, a, b, c, ...), so that a drift
in the machine's speed weighs on all three alike.
  (a) hearth, base model only.
  (b) hearth, every stream on the same adapter.
  (c) hearth, one distinct adapter per stream (--max-hot-loras = streams; all of them hot:
      a warm-up request per adapter precedes the measurement).
  (d) hearth with --pool adapters registered (POST /v1/load_lora_adapter),
      --max-hot-loras --pool-hot and --max-loras-per-step = streams; each request picks one of
      them uniformly at random, so nearly every request finds its adapter cold. On the CPU a
      cold adapter is servable as loaded (the hot form shares its bytes), so the per-step cap,
      not the hot set, bounds how many distinct adapters (so streams) run together.
  (e0) llama-server, base only (context for (e): the same server, no adapter applied).
  (e) llama-server with the same adapters as (c), converted by convert_lora_to_gguf.py (F16),
      all loaded at start with --lora and --lora-init-without-apply, their global scale then
      set to 0 (POST /lora-adapters: the flag leaves it at 1), one per stream selected per
      request with "lora": [{"id": i, "scale": 1.0}]; -np = streams.
  For (c), the bytes of adapter weights one decode step reads (every stream's adapter, all
  its matrices: streams x adapter size), the bandwidth they were read at (those bytes over
  the time a step of (c) takes beyond one of (a)), and the ceiling on (c)/(a) were they read
  at the memory's speed after the base step's work: t(a) / (t(a) + bytes / bandwidth), the
  bandwidth measured by examples/membw with --threads threads. hearth reads them on one
  thread while another computes the base products, so (c) can pass that ceiling.
  (f) load latency of one adapter (as (c)'s) into a warm hearth engine: the time
      POST /v1/load_lora_adapter takes (it answers once the adapter is loaded), and that plus
      one request with max_tokens 1 naming it (its 8-token prefill, preparing the adapter for
      compute, one sampled token); unloaded after each, --loads times, median.

Adapters are synthetic PEFT adapters (adapter_config.json + adapter_model.safetensors, F16):
A [r, in] and B [out, r] drawn from normal distributions (B not zero), lora_alpha 2r, for every
layer and every projection (for (d), those of --pool-targets). When the disk has no room for
--pool distinct files, (d) registers 100 files under several names each (see choose_pool).
"""

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_vs_llamacpp import (  # noqa: E402
    REQUEST_TIMEOUT,
    SERVED,
    SHORT_PROMPT,
    CpuWatch,
    Deadline,
    Quiet,
    Server,
    free_port,
    kill_all,
    proc_cpu_s,
    prompt_ids,
    released_together,
    request,
    rss_kib,
    started,
)

# SmolLM2-135M-Instruct, the default model (scripts/fetch-model).
SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_ATTEMPTS = 4
HEAVY = re.compile(r"rustc|cargo|pytest|bench-deploy|llama-server|cc1plus")


def log(msg):
    print(f"[bench-lora] {msg}", file=sys.stderr, flush=True)


# --- adapters -------------------------------------------------------------------------------


def module_shape(target, c=SMOLLM2):
    """(out, in) of a projection."""
    h, hd = c["hidden_size"], c["head_dim"]
    q, kv, i = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd, c["intermediate_size"]
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}[target]


def adapter_bytes(rank, targets, c=SMOLLM2):
    """Bytes of an F16 adapter's tensors (what hearth counts against --max-lora-mb)."""
    per_layer = sum(rank * (o + i) for o, i in (module_shape(t, c) for t in targets))
    return 2 * per_layer * c["num_hidden_layers"]


def write_safetensors(path, tensors):
    """tensors: list of (name, numpy array); the format is an 8-byte header length, a JSON
    header (padded with spaces to a multiple of 8) and the raw little-endian data."""
    header, offset = {}, 0
    for name, arr in tensors:
        dtype = {"float16": "F16", "float32": "F32"}[arr.dtype.name]
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, arr in tensors:
            f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())


def make_adapter(path, rank, targets, seed):
    """A synthetic PEFT LoRA adapter directory, written atomically (a temporary name, then
    renamed), so an interrupted run never leaves a half-written one behind."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tensors = []
    for layer in range(SMOLLM2["num_hidden_layers"]):
        for t in targets:
            out_f, in_f = module_shape(t)
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{t}"
            a = (rng.standard_normal((rank, in_f), dtype=np.float32) / math.sqrt(in_f)).astype(np.float16)
            b = (rng.standard_normal((out_f, rank), dtype=np.float32) * 0.02).astype(np.float16)
            tensors += [(f"{prefix}.lora_A.weight", a), (f"{prefix}.lora_B.weight", b)]
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    config = {"peft_type": "LORA", "base_model_name_or_path": BASE_ID, "r": rank,
              "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": list(targets), "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True}
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    write_safetensors(os.path.join(tmp, "adapter_model.safetensors"), tensors)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)


def adapter_set(cache, rank, targets):
    tag = "all" if list(targets) == ALL_TARGETS else "-".join(t.split("_")[0] for t in targets)
    return os.path.join(cache, "adapters", f"r{rank}-{tag}")


def ensure_adapters(cache, rank, targets, count):
    """Directories of `count` adapters (seeded by index: the same files on every machine)."""
    root = adapter_set(cache, rank, targets)
    os.makedirs(root, exist_ok=True)
    dirs = [os.path.join(root, f"{i:04d}") for i in range(count)]
    missing = [d for d in dirs if not os.path.exists(os.path.join(d, "adapter_model.safetensors"))]
    if missing:
        log(f"generating {len(missing)} rank-{rank} adapters ({adapter_bytes(rank, targets) / 1e6:.1f} MB each) in {root}")
        t0 = time.monotonic()
        for k, d in enumerate(missing):
            make_adapter(d, rank, targets, seed=int(os.path.basename(d)) + 1000 * rank)
            if (k + 1) % 100 == 0:
                log(f"  {k + 1}/{len(missing)} ({time.monotonic() - t0:.0f}s)")
    return dirs


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def choose_pool(cache, pool, targets, ranks, files=None):
    """(rank, distinct files) for (d). hearth holds every registered adapter in host memory, so
    the whole pool must fit the free memory: the largest rank in `ranks` that does. The files
    must fit the free disk (beyond those already generated): all `pool` of them if they do, else
    100, each registered under several names (every name is its own adapter in hearth: loaded,
    counted, prepared and evicted on its own; only the bytes repeat). A margin is left for
    everything else on the machine."""
    margin, disk_margin = 6 << 30, 10 << 30  # the disk is shared with other work's builds
    for rank in ranks:
        size = adapter_bytes(rank, targets)
        if pool * size + margin > mem_available():
            log(f"{pool} rank-{rank} adapters ({pool * size / 1e9:.1f} GB) do not fit the "
                f"{mem_available() / 1e9:.1f} GB of memory available (with a 6 GiB margin)")
            continue
        root = adapter_set(cache, rank, targets)
        st = os.statvfs(cache)
        disk_free = st.f_bavail * st.f_frsize
        for n in ([files] if files else [pool, min(pool, 100)]):
            have = sum(os.path.exists(os.path.join(root, f"{i:04d}", "adapter_model.safetensors")) for i in range(n))
            if (n - have) * size + disk_margin <= disk_free or files:
                return rank, n
            log(f"{n} rank-{rank} adapter files ({n * size / 1e9:.1f} GB) do not fit the {disk_free / 1e9:.1f} GB "
                f"of free disk (with a 10 GiB margin)")
    raise SystemExit("no adapter rank fits the pool on this machine; lower --pool")


# --- llama.cpp conversion --------------------------------------------------------------------


def base_config_dir(cache):
    """A minimal Hugging Face directory for SmolLM2 (config.json only), which is all
    convert_lora_to_gguf.py --base reads."""
    d = os.path.join(cache, "smollm2-config")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(SMOLLM2, f, indent=1)
    return d


CONVERT_PACKAGES = ["torch", "safetensors", "transformers", "sentencepiece", "numpy", "pyyaml", "tqdm", "requests"]


def converter_python(given, cache):
    """A Python that can run convert_lora_to_gguf.py: `given`, else a virtual environment under
    the cache, made on first use (torch from the package index is its CUDA build: ~5 GB)."""
    probe = "import torch, safetensors, transformers, numpy, yaml"
    if given:
        subprocess.run([given, "-c", probe], check=True)
        return given
    venv = os.path.join(cache, "convert-venv")
    py = os.path.join(venv, "bin", "python")
    if os.path.exists(py) and subprocess.run([py, "-c", probe], stderr=subprocess.DEVNULL).returncode == 0:
        return py
    log(f"making a virtual environment for convert_lora_to_gguf.py in {venv} ({', '.join(CONVERT_PACKAGES)}; ~5 GB)")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", *CONVERT_PACKAGES], check=True)
    return py


def ensure_gguf_adapters(cache, dirs, script, python):
    """convert_lora_to_gguf.py for each adapter directory (F16), cached next to the adapters."""
    out_dir = os.path.join(cache, "gguf", os.path.basename(os.path.dirname(dirs[0])))
    os.makedirs(out_dir, exist_ok=True)
    outs = [os.path.join(out_dir, os.path.basename(d) + ".gguf") for d in dirs]
    todo = [(d, o) for d, o in zip(dirs, outs) if not os.path.exists(o)]
    if todo:
        py = converter_python(python, cache)
        base = base_config_dir(cache)
        log(f"converting {len(todo)} adapters with {os.path.basename(script)} (F16) into {out_dir}")
        logpath = os.path.join(out_dir, "convert.log")
        script, base = os.path.abspath(script), os.path.abspath(base)
        for d, o in todo:
            with open(logpath, "ab") as lf:
                p = subprocess.run([py, script, "--base", base, "--outtype", "f16", "--outfile",
                                    os.path.abspath(o + ".partial"), os.path.abspath(d)],
                                   stdout=lf, stderr=subprocess.STDOUT, cwd=os.path.dirname(script))
            if p.returncode != 0:
                with open(logpath, "rb") as lf:
                    tail = lf.read()[-3000:].decode(errors="replace")
                raise RuntimeError(f"convert_lora_to_gguf.py failed on {d} (log {logpath}):\n{tail}")
            os.replace(o + ".partial", o)
    return outs


# --- quiet machine ---------------------------------------------------------------------------


def own_family():
    """This process, its ancestors and its descendants: their command lines may match HEAVY."""
    parents = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    fam, p = set(), os.getpid()
    while p > 1 and p not in fam:
        fam.add(p)
        p = parents.get(p, 0)
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in fam and pid not in fam and ppid != 1:
                fam.add(pid)
                grew = True
    return fam


def heavy_others():
    """Other processes that build, test or benchmark: a compiler, cargo, pytest, another
    benchmark's script, a llama-server. Matched on the program and its first two arguments
    (basenames), so that a long environment passed on a command line does not count."""
    fam, found = own_family(), []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in fam:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        head = [os.path.basename(a) for a in argv[:3]]
        if any(HEAVY.search(h) for h in head):
            found.append(f"{pid} {' '.join(head)[:60]}")
    return found


class QuietMachine(Quiet):
    """engine_vs_llamacpp's CPU-based wait, preceded by a wait (30-second polls, within
    --heavy-wait over the whole run) until no other build, test or benchmark process runs."""

    def __init__(self, budget, heavy_budget):
        super().__init__(budget)
        self.heavy_left = heavy_budget
        self.seen = {}

    def wait(self, what, pid=None):
        first = True
        while True:
            others = heavy_others()
            if not others:
                break
            if self.heavy_left <= 0:
                log(f"other work still runs ({'; '.join(others[:4])}); measuring {what} anyway")
                self.seen[what] = others
                break
            if first:
                log(f"waiting for other work to finish before {what}: {'; '.join(others[:4])}")
                first = False
            time.sleep(30)
            self.heavy_left -= 30
        super().wait(what, pid)


# --- servers and measurements ---------------------------------------------------------------


def http_json(port, method, path, body=None, timeout=REQUEST_TIMEOUT):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, None if body is None else json.dumps(body).encode(),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {raw[:400]!r}")
    return json.loads(raw) if raw else None


def start_hearth(binary, model, threads, logdir, label, loras=(), max_hot=32, per_step=32, max_lora_mb=1024):
    port = free_port()
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    argv = [binary, "engine", "--model", model, "--listen", f"127.0.0.1:{port}", "--served-model-name", SERVED,
            "--max-hot-loras", str(max_hot), "--max-loras-per-step", str(per_step), "--max-lora-mb", str(max_lora_mb)]
    for name, path in loras:
        argv += ["--lora", f"{name}={path}"]
    return Server("hearth", argv, env, port, logdir, label)


def start_llama(binary, model, threads, slots, gguf_loras, no_repack, logdir, label):
    port = free_port()
    ctx = max(1024, slots * 256)
    argv = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads), "-tb", str(threads),
            "-np", str(slots), "-c", str(ctx), "-a", SERVED] + (["-nr"] if no_repack else [])
    for g in gguf_loras:
        argv += ["--lora", g]
    if gguf_loras:
        argv.append("--lora-init-without-apply")
    return Server("llama.cpp", argv, dict(os.environ), port, logdir, label)


def body(srv, prompt, max_tokens, model=SERVED, lora_id=None):
    b = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
         "stream": False, **srv.extra}
    if lora_id is not None:
        b["lora"] = [{"id": lora_id, "scale": 1.0}]
    return b


def streams_once(srv, bodies):
    """Every body sent by its own client, all released together; (tokens/s, per-response text)."""

    def one(i):
        _, resp = request(srv.port, bodies[i])
        got = (resp.get("usage") or {}).get("completion_tokens")
        if got != bodies[i]["max_tokens"]:
            raise RuntimeError(f"asked for {bodies[i]['max_tokens']} tokens with ignore_eos, usage says {got}")
        return got, resp["choices"][0].get("text", "")

    results, wall = released_together(len(bodies), one, srv.label)
    return sum(n for n, _ in results) / wall, [t for _, t in results]


def metric(port, name):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hearth", required=True)
    ap.add_argument("--membw", help="examples/membw, to measure this machine's memory bandwidth")
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--convert-script", required=True, help="llama.cpp's convert_lora_to_gguf.py")
    ap.add_argument("--convert-python", help="a Python with torch, safetensors and transformers for the conversion")
    ap.add_argument("--model", required=True)
    ap.add_argument("--cache", required=True, help="where adapters, converted adapters and the converter's venv live")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64, help="tokens each stream generates")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16, help="rank of the adapters of (b), (c), (e) and (f)")
    ap.add_argument("--pool", type=int, default=1000, help="adapters registered for (d)")
    ap.add_argument("--pool-hot", type=int, default=8, help="--max-hot-loras for (d)")
    ap.add_argument("--pool-rank", type=int, help="rank of (d)'s adapters (default: 16, else the largest of 8, 4 that fits)")
    ap.add_argument("--pool-files", type=int, help="distinct adapter files behind (d)'s names (default: --pool, "
                    "else 100 when the disk has no room for that many)")
    ap.add_argument("--pool-targets", default=",".join(ALL_TARGETS), help="projections (d)'s adapters patch")
    ap.add_argument("--loads", type=int, default=20, help="loads timed for (f)")
    ap.add_argument("--rows", default="a,b,c,d,e,f", help="rows to measure (e includes e0)")
    ap.add_argument("--no-repack", action="store_true", help="llama-server with -nr")
    ap.add_argument("--time-limit", type=float, default=5400, help="seconds for the whole run")
    ap.add_argument("--quiet-wait", type=float, default=900,
                    help="seconds, over the whole run, to wait for other processes to leave the CPUs alone")
    ap.add_argument("--heavy-wait", type=float, default=1800,
                    help="seconds, over the whole run, to wait for other builds, tests and benchmarks to end")
    ap.add_argument("--logdir")
    ap.add_argument("--json")
    ap.add_argument("--note", default="")
    args = ap.parse_args()

    def on_signal(signum, _frame):
        kill_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    rows_wanted = set(args.rows.split(","))
    deadline = Deadline(args.time_limit)
    logdir = args.logdir or tempfile.mkdtemp(prefix="bench-lora-")
    os.makedirs(logdir, exist_ok=True)
    os.makedirs(args.cache, exist_ok=True)
    log(f"server logs in {logdir}")
    quiet = QuietMachine(args.quiet_wait, args.heavy_wait)
    n = args.streams

    # Adapters first (no measurement runs meanwhile).
    dirs = ensure_adapters(args.cache, args.rank, ALL_TARGETS, max(n, 1))
    pool_targets = [t for t in args.pool_targets.split(",") if t]
    pool_rank = pool_files = None
    if "d" in rows_wanted:
        pool_rank, pool_files = choose_pool(args.cache, args.pool, pool_targets,
                                            [args.pool_rank] if args.pool_rank else [16, 8, 4], args.pool_files)
        pool_dirs = ensure_adapters(args.cache, pool_rank, pool_targets, pool_files)
    gguf = ensure_gguf_adapters(args.cache, dirs, args.convert_script, args.convert_python) if "e" in rows_wanted else []

    res = {}  # row -> {"value", "samples", "load", "cpus", "attempts", ...}

    def measured(row, srv, fn):
        """fn() -> (median, samples, extra dict); retaken if other work was busy meanwhile."""
        measured_together([row], srv, lambda: {row: fn()})

    def measured_together(rows, srv, fn):
        """fn() -> {row: (median, samples, extra dict)}, the rows measured in one stretch (and
        retaken together) on one server."""
        what = f"({', '.join(rows)}) on {srv.label}"
        for attempt in range(1, MAX_ATTEMPTS + 1):
            deadline.check(what)
            quiet.wait(what, srv.proc.pid)
            log(f"measuring {what}")
            w = CpuWatch(srv.proc.pid)
            cpu0, t0 = proc_cpu_s(srv.proc.pid), time.monotonic()
            got = fn()
            load = w.other()
            cpus = (proc_cpu_s(srv.proc.pid) - cpu0) / (time.monotonic() - t0)
            if attempt == MAX_ATTEMPTS or not quiet.retry(load, what):
                break
        for row in rows:
            med, samples, extra = got[row]
            res[row] = {"value": med, "samples": samples, "load": load, "cpus": cpus, "attempts": attempt,
                        "heavy_beside": quiet.seen.get(what, []), **extra}
            log(f"({row}) {med:,.1f} (samples {', '.join(f'{s:,.1f}' for s in samples)}), other load {load:.2f} CPUs")

    def throughput(srv, make_bodies):
        def fn():
            rates, texts = [], None
            for r in range(args.repeats):
                rate, texts = streams_once(srv, make_bodies(r))
                rates.append(rate)
            return statistics.median(rates), rates, {"texts": texts}
        return fn

    def interleaved(srv, bodies_by_row):
        """Like throughput for several rows of one server, their runs taken in turn (a, b, c,
        a, b, c, ...): the machine's speed drifts over minutes on a shared host, and rows
        measured one after the other would carry that drift into their ratios."""
        def fn():
            rates = {row: [] for row in bodies_by_row}
            texts = {row: [] for row in bodies_by_row}
            for r in range(args.repeats):
                for row, make_bodies in bodies_by_row.items():
                    rate, got = streams_once(srv, make_bodies(r))
                    rates[row].append(rate)
                    texts[row].append(got)
            # "texts": the last run's, as throughput keeps; "all_texts": every run's, in order.
            return {row: (statistics.median(rates[row]), rates[row],
                          {"texts": texts[row][-1], "all_texts": [t for run in texts[row] for t in run]})
                    for row in rates}
        return fn

    prompts = lambda r: [prompt_ids(10_000 * (r + 1) + i, SHORT_PROMPT) for i in range(n)]  # noqa: E731
    adapters = [(f"lora-{i:02d}", d) for i, d in enumerate(dirs[:n])]
    step = adapter_bytes(args.rank, ALL_TARGETS)

    try:
        # (a), (b), (c), (f): one hearth with the stream adapters registered at start.
        if rows_wanted & {"a", "b", "c", "f"}:
            quiet.wait("starting hearth")
            srv = start_hearth(args.hearth, args.model, args.threads, logdir, "hearth-abcf", adapters, max_hot=n,
                               per_step=n, max_lora_mb=max(1024, math.ceil((n + 1) * step / (1 << 20)) + 64))
            try:
                started(srv)
                request(srv.port, body(srv, prompt_ids(7, SHORT_PROMPT), 8))
                abc = {}
                if "a" in rows_wanted:
                    abc["a"] = lambda r: [body(srv, p, args.tokens) for p in prompts(r)]
                if "b" in rows_wanted:
                    request(srv.port, body(srv, prompt_ids(7, SHORT_PROMPT), 8, model=adapters[0][0]))
                    abc["b"] = lambda r: [body(srv, p, args.tokens, model=adapters[0][0]) for p in prompts(r)]
                if "c" in rows_wanted:
                    # Warm: every adapter hot, as in steady serving with --max-hot-loras = streams.
                    streams_once(srv, [body(srv, prompt_ids(7, SHORT_PROMPT), 2, model=a) for a, _ in adapters])
                    abc["c"] = lambda r: [body(srv, p, args.tokens, model=adapters[i][0]) for i, p in enumerate(prompts(r))]
                if abc:
                    measured_together(list(abc), srv, interleaved(srv, abc))
                if "c" in rows_wanted:
                    res["c"]["hot"] = sum(a["hot"] for a in http_json(srv.port, "GET", "/v1/lora_adapters")["adapters"])
                if "f" in rows_wanted:
                    def load_latency():
                        calls, totals = [], []
                        for k in range(args.loads):
                            name = f"latency-{k}"
                            t0 = time.perf_counter()
                            http_json(srv.port, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": dirs[0]})
                            t1 = time.perf_counter()
                            _, resp = request(srv.port, body(srv, prompt_ids(5000 + k, SHORT_PROMPT), 1, model=name))
                            t2 = time.perf_counter()
                            if (resp.get("usage") or {}).get("completion_tokens") != 1:
                                raise RuntimeError(f"(f): the first request on {name} did not return one token")
                            http_json(srv.port, "POST", "/v1/unload_lora_adapter", {"lora_name": name})
                            calls.append((t1 - t0) * 1000)
                            totals.append((t2 - t0) * 1000)
                        return statistics.median(calls), calls, {"first_token_ms": statistics.median(totals),
                                                                 "first_token_samples": totals}
                    measured("f", srv, load_latency)
                res.setdefault("_rss", {})["hearth-abcf"] = rss_kib(srv.proc.pid)
            finally:
                srv.close()

        # (d): many registered adapters, a few hot.
        if "d" in rows_wanted:
            pbytes = adapter_bytes(pool_rank, pool_targets)
            mb = math.ceil(args.pool * pbytes / (1 << 20)) + 16
            quiet.wait("starting hearth for (d)")
            srv = start_hearth(args.hearth, args.model, args.threads, logdir, "hearth-d", max_hot=args.pool_hot,
                               per_step=n, max_lora_mb=mb)
            try:
                started(srv)
                log(f"(d): registering {args.pool} rank-{pool_rank} adapters ({pbytes / 1e6:.1f} MB each, "
                    f"from {len(pool_dirs)} distinct files, --max-lora-mb {mb})")
                t0 = time.monotonic()
                for i in range(args.pool):
                    if i % 100 == 0:
                        deadline.check("registering (d)'s adapters")
                    http_json(srv.port, "POST", "/v1/load_lora_adapter",
                              {"lora_name": f"pool-{i:04d}", "lora_path": pool_dirs[i % len(pool_dirs)]})
                register_s = time.monotonic() - t0
                listed = http_json(srv.port, "GET", "/v1/lora_adapters")["adapters"]
                if len(listed) != args.pool:
                    raise RuntimeError(f"(d): {len(listed)} adapters listed, {args.pool} registered")
                log(f"(d): {len(listed)} adapters registered in {register_s:.0f}s; "
                    f"hearth RSS {rss_kib(srv.proc.pid)['VmRSS'] / (1 << 20):.1f} GiB")
                request(srv.port, body(srv, prompt_ids(7, SHORT_PROMPT), 8))
                rng = random.Random(4242)
                picks = {}

                def pool_bodies(r):
                    picks[r] = [rng.randrange(args.pool) for _ in range(n)]
                    return [body(srv, p, args.tokens, model=f"pool-{picks[r][i]:04d}") for i, p in enumerate(prompts(r))]

                evictions = {}

                def pool_run():
                    picks.clear()
                    ev0 = metric(srv.port, "hearth_engine_adapter_evictions_total") or 0
                    out = throughput(srv, pool_bodies)()
                    evictions["n"] = (metric(srv.port, "hearth_engine_adapter_evictions_total") or 0) - ev0
                    return out

                measured("d", srv, pool_run)
                listed = http_json(srv.port, "GET", "/v1/lora_adapters")["adapters"]
                res["d"].update(rank=pool_rank, targets=pool_targets, files=len(pool_dirs), adapter_mb=pbytes / 1e6, max_lora_mb=mb,
                                register_s=register_s, registered=len(listed), hot=sum(a["hot"] for a in listed),
                                distinct_per_run=[len(set(p)) for p in picks.values()],
                                evictions=evictions["n"], rss_kib=rss_kib(srv.proc.pid))
            finally:
                srv.close()

        # (e0), (e): llama-server with the converted adapters.
        if "e" in rows_wanted:
            quiet.wait("starting llama-server")
            srv = start_llama(args.llama_server, args.model, args.threads, n, gguf, args.no_repack, logdir,
                              f"llama-server-np{n}-lora{n}")
            try:
                started(srv)
                # --lora-init-without-apply leaves the adapters out of the context at start but
                # keeps their global scale at 1, which every request without a "lora" field
                # would then use: set it to 0, so such a request runs the base model alone.
                http_json(srv.port, "POST", "/lora-adapters", [{"id": i, "scale": 0.0} for i in range(n)])
                loaded = http_json(srv.port, "GET", "/lora-adapters")
                if len(loaded) != n or any(a.get("scale", 0) != 0 for a in loaded):
                    raise RuntimeError(f"llama-server lists {len(loaded)} adapters (want {n}, all at scale 0): {loaded[:2]}")
                request(srv.port, body(srv, prompt_ids(7, SHORT_PROMPT), 8))
                measured("e0", srv, throughput(srv, lambda r: [body(srv, p, args.tokens) for p in prompts(r)]))
                streams_once(srv, [body(srv, prompt_ids(7, SHORT_PROMPT), 2, lora_id=i) for i in range(n)])
                measured("e", srv, throughput(
                    srv, lambda r: [body(srv, p, args.tokens, lora_id=i) for i, p in enumerate(prompts(r))]))
            finally:
                srv.close()
    finally:
        kill_all()

    if args.membw and "c" in res:
        quiet.wait("measuring memory bandwidth")
        out = subprocess.run([args.membw], env=dict(os.environ, RAYON_NUM_THREADS=str(args.threads)),
                             capture_output=True, text=True, check=True).stdout
        found = re.findall(r"threads (\d+): ([\d.]+) GB/s", out)
        res["membw_gbs"] = {int(t): float(g) for t, g in found}
    report(args, res, pool_rank, pool_files, pool_targets)


def report(args, res, pool_rank, pool_files, pool_targets):
    n, t = args.streams, args.tokens
    v = lambda k: res.get(k, {}).get("value")  # noqa: E731

    def rate(x):
        return "—" if x is None else f"{x:,.0f} tokens/s"

    def ratio(num, den, goal=None):
        if num is None or den is None or den == 0:
            return "—", "—"
        r = num / den
        return f"{r:.2f}", "—" if goal is None else ("met" if r >= goal else f"not met ({r / goal:.0%} of the goal)")

    def load(k):
        r = res.get(k)
        return "—" if r is None else f"{r['load']:.2f} / {r['cpus']:.2f}"

    d = res.get("d", {})
    drow = (f"(d) hearth, {args.pool:,} registered adapters (rank {pool_rank}, "
            f"{'all seven projections' if pool_targets == ALL_TARGETS else ', '.join(pool_targets)}"
            f"{'' if pool_files in (None, args.pool) else f'; {pool_files} distinct files, each under {args.pool // pool_files} names'}), "
            f"--max-hot-loras {args.pool_hot}, --max-loras-per-step {n}, uniform random pick")
    rows = [
        ("a", "(a) hearth, base only", rate(v("a")), "—", "—", "—"),
        ("b", f"(b) hearth, all {n} streams on one adapter", rate(v("b")), "(b)/(a) " + ratio(v("b"), v("a"))[0], "—", "—"),
        ("c", f"(c) hearth, {n} distinct adapters, one per stream, --max-hot-loras {n}, --max-loras-per-step {n}", rate(v("c")),
         "(c)/(a) " + ratio(v("c"), v("a"))[0], "≥ 0.76", ratio(v("c"), v("a"), 0.76)[1]),
        ("d", drow, rate(v("d")), "(d)/(a) " + ratio(v("d"), v("a"))[0], "≥ 0.8", ratio(v("d"), v("a"), 0.8)[1]),
        ("e0", "(e0) llama-server, base only (context)", rate(v("e0")), "(a)/(e0) " + ratio(v("a"), v("e0"))[0], "—", "—"),
        ("e", f"(e) llama-server, the {n} adapters of (c) as GGUF, one per stream", rate(v("e")),
         "(c)/(e) " + ratio(v("c"), v("e"))[0], "≥ 3", ratio(v("c"), v("e"), 3)[1]),
    ]
    lines = [f"| row ({n} streams × {t} tokens, {args.threads} threads) | figure | ratio | goal | goal met "
             "| other load / server CPUs |", "| --- | ---: | ---: | ---: | --- | ---: |"]
    for key, label, fig, rat, goal, met in rows:
        if key in res:
            lines.append(f"| {label} | {fig} | {rat} | {goal} | {met} | {load(key)} |")
    if "f" in res:
        f = res["f"]
        p50, ft = f["value"], f["first_token_ms"]
        lines.append(f"| (f) load one {adapter_bytes(args.rank, ALL_TARGETS) / 1e6:.1f} MB adapter (rank {args.rank}, "
                     f"F16), POST /v1/load_lora_adapter, p50 of {args.loads} | {p50:.1f} ms | — | < 100 ms "
                     f"| {'met' if p50 < 100 else f'not met ({p50 / 100:.1f}× the goal)'} | {load('f')} |")
        lines.append(f"| (f) the same load + one request with max_tokens 1 on it, p50 of {args.loads} | {ft:.1f} ms "
                     f"| — | < 100 ms | {'met' if ft < 100 else f'not met ({ft / 100:.1f}× the goal)'} | {load('f')} |")
    print("\n".join(lines))
    print()
    notes = []
    for k in ("a", "b", "c", "d", "e0", "e"):
        if k in res and res[k]["value"]:
            notes.append(f"({k}) {1000 * n / res[k]['value']:.1f}")
    if notes:
        print(f"Time per generated token of one stream ({n} / figure, ms; about the time of one decode step when "
              f"all streams decode together): {', '.join(notes)}.")
    if d:
        print(f"(d): {d['registered']:,} adapters of {d['adapter_mb']:.2f} MB registered in {d['register_s']:.0f} s "
              f"(--max-lora-mb {d['max_lora_mb']}); hearth RSS {d['rss_kib']['VmRSS'] / (1 << 20):.1f} GiB; "
              f"distinct adapters per run of {n} requests: {d['distinct_per_run']}; "
              f"{d['evictions']:.0f} hot-set evictions while measured; {d['hot']} hot at the end.")
    if "c" in res:
        print(f"(c): {res['c'].get('hot')} adapters hot after the measurement.")
    if v("a") and v("c"):
        step_bytes = n * adapter_bytes(args.rank, ALL_TARGETS)
        ta, tc = n / v("a"), n / v("c")
        read_at = step_bytes / (tc - ta) / 1e9 if tc > ta else float("inf")
        line = (f"(c) adapter weights per decode step: {step_bytes / 1e6:.0f} MB ({n} adapters × "
                f"{adapter_bytes(args.rank, ALL_TARGETS) / 1e6:.1f} MB), read in the {1000 * (tc - ta):.1f} ms a step "
                f"of (c) takes beyond one of (a) ({1000 * ta:.1f} ms): {read_at:.1f} GB/s.")
        bw = res.get("membw_gbs", {}).get(args.threads)
        if bw:
            ceiling = ta / (ta + step_bytes / (bw * 1e9))
            line += (f" This machine streams {bw:.1f} GB/s from memory with {args.threads} threads "
                     f"(examples/membw): read after the base step's work at that speed, the adapters would "
                     f"hold (c)/(a) to {ceiling:.2f} here; measured {v('c') / v('a'):.2f} "
                     f"({v('c') / v('a') / ceiling:.0%} of that), the reads overlapping the base products.")
        print(line)
    if "f" in res:
        f = res["f"]
        print(f"(f) samples, ms: load {', '.join(f'{x:.1f}' for x in f['samples'])}; "
              f"load + first token {', '.join(f'{x:.1f}' for x in f['first_token_samples'])}.")
    # Rows measured in turn with (a) compare every run's texts, the others their last run's.
    texts = {k: res[k].get("all_texts") if k in ("b", "c") and "all_texts" in res.get("a", {}) else res[k].get("texts")
             for k in ("b", "c", "d", "e0", "e") if k in res}
    if "a" in res:
        texts["a"] = res["a"]["texts"]
        texts["a*"] = res["a"].get("all_texts")
    checks = [f"({k}) {sum(x != y for x, y in zip(texts[k], texts[base]))} of {len(texts[k])}"
              for k, base in (("b", "a*"), ("c", "a*"), ("d", "a"), ("e", "e0"))
              if texts.get(k) and texts.get(base)]
    if checks:
        print(f"Streams whose text differs from the base model's on the same prompt (the adapters do change the "
              f"output; (b) and (c) over all their runs): {', '.join(checks)}.")
    if v("a") and v("c") and len(res["a"]["samples"]) == len(res["c"]["samples"]):
        paired = [c / a for a, c in zip(res["a"]["samples"], res["c"]["samples"])]
        print(f"(c)/(a) run by run (each (c) run against the (a) run just before it): "
              f"{', '.join(f'{x:.2f}' for x in paired)}.")
    print(f"Every throughput figure is the median of {args.repeats} runs. Other load: CPUs that other processes used "
          f"while the figure was measured (retaken, {MAX_ATTEMPTS} times at most, above {Quiet(0).threshold}); server "
          f"CPUs: what the server process itself kept busy.")
    heavy = {k: r["heavy_beside"] for k, r in res.items() if isinstance(r, dict) and r.get("heavy_beside")}
    if heavy:
        print(f"WARNING: measured beside other build/test/benchmark processes: {heavy}")
    if args.note:
        print(args.note)
    if args.json:
        with open(args.json, "w") as fj:
            json.dump(res, fj, indent=1, default=str)


if __name__ == "__main__":
    try:
        main()
    finally:
        kill_all()
