"""Speculative decoding on hearth's engine, against the same engine without it, in one run.

Each configuration is a `hearth engine` process on the default model (2 threads). A row is
batch-1 decode: one chat request at a time, greedy, its answer streamed; decode tokens/s is
(tokens - 1) / (time of the last token - time of the first), the median of the repeats. Two
tasks: a rewrite (the answer repeats a paragraph of the prompt, where prompt lookup finds its
drafts) and an open question (where it finds few). The acceptance rate is the engine's own
count (hearth_engine_spec_accepted_tokens_total / drafted) over the row. Every configuration
answers with the same tokens as the one without speculation (checked here too).

With --precision (a dense target, FP32 say) and --draft-model, rows with the draft model
proposing k = 2, 4 and 8 tokens follow: the default model's Q4_1 file drafting for its own
weights served in FP32, the pairing whose draft is cheap and agrees often. Without
--precision the draft would be the target itself, so those rows are left out.

Usage: scripts/bench-speculation [--repeats N] [--precision P] [--draft-model PATH]
"""
import argparse
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

PARAGRAPH = ("The lighthouse keeper climbed the stairs every evening at dusk, lit the great lamp, and wrote the "
             "weather in a worn leather book: wind from the west, waves high, two ships passing north. In winter "
             "the stairs were icy and the lamp took longer to catch, but he never missed a night in forty years, "
             "and the book grew into a shelf of books that the village keeps in its library.")
TASKS = {
    "rewrite": f"Repeat this paragraph exactly, word for word:\n\n{PARAGRAPH}",
    "question": "Write a short story about a robot who learns to paint.",
}
MAX_TOKENS = 160


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary, model, extra, logdir, label):
    port = free_port()
    env = dict(os.environ, RAYON_NUM_THREADS="2", RUST_LOG="warn")
    log = open(os.path.join(logdir, f"{label}.log"), "wb")
    argv = [binary, "engine", "--model", model, "--listen", f"127.0.0.1:{port}", "--served-model-name", "m",
            "--no-prefix-cache", *extra]
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{label} exited with {proc.returncode}; see {log.name}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"{label} did not start")


def counters(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    get = lambda name: int(float((re.search(rf"^{name} (\S+)$", text, re.M) or [0, 0])[1]))
    return get("hearth_engine_spec_drafted_tokens_total"), get("hearth_engine_spec_accepted_tokens_total")


def ask(port, prompt):
    """Streams one greedy answer; returns (tokens, decode tokens/s)."""
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": True, "logprobs": True}
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        sys.exit(f"HTTP {r.status}: {r.read()[:300]!r}")
    tokens, times = [], []
    for line in r:
        line = line.strip()
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        for choice in chunk.get("choices", []):
            for lp in ((choice.get("logprobs") or {}).get("content") or []):
                tokens.append(lp["token"])
                times.append(time.perf_counter())
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")
    return tokens, rate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hearth", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="")
    ap.add_argument("--logdir", required=True)
    ap.add_argument("--draft-model", default="")
    args = ap.parse_args()
    os.makedirs(args.logdir, exist_ok=True)
    base = ["--precision", args.precision] if args.precision else []
    configs = [("no speculation", []), *[(f"n-gram 3, k = {k}", ["--ngram-speculation", "3", "--draft-tokens", str(k)])
                                           for k in (2, 4, 8)]]
    if args.draft_model and args.precision:
        configs += [(f"draft model, k = {k}", ["--draft-model", args.draft_model, "--draft-tokens", str(k)])
                    for k in (2, 4, 8)]
    results, answers = {}, {}
    for label, extra in configs:
        proc, port = start(args.hearth, args.model, base + extra, args.logdir, re.sub(r"\W+", "-", label))
        try:
            ask(port, "Hello")  # warm-up
            for task, prompt in TASKS.items():
                d0, a0 = counters(port)
                rates = []
                for _ in range(args.repeats):
                    tokens, rate = ask(port, prompt)
                    rates.append(rate)
                    if answers.setdefault(task, tokens) != tokens:
                        sys.exit(f"{label} answered {task} differently from the run without speculation")
                d1, a1 = counters(port)
                results[(label, task)] = (statistics.median(rates), (a1 - a0) / (d1 - d0) if d1 > d0 else None,
                                          len(tokens))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    print(f"| configuration ({args.precision or 'checkpoint as stored'}) | task | decode tokens/s | vs none | acceptance |")
    print("| --- | --- | ---: | ---: | ---: |")
    for task in TASKS:
        none = results[("no speculation", task)][0]
        for label, _ in configs:
            rate, acc, n = results[(label, task)]
            print(f"| {label} | {task} ({n} tokens) | {rate:,.1f} | {rate / none:.2f} | "
                  f"{'—' if acc is None else f'{acc:.0%}'} |")


if __name__ == "__main__":
    main()
