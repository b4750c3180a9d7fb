"""`pplfast serve` against the obvious HTTP scoring server and lm-eval's in-process `hf` model
(CPU). A script (minutes of CPU), not a pytest case:

    python benchmarks/bench_serve.py                              # 1000 questions, the targets
    python benchmarks/bench_serve.py --questions 40 --json out.json

Model: a random Llama with Llama 3's vocabulary size (V = 128256; D = 128, 2 layers, 4 heads,
2 KV heads, MLP 384, context 4096, fp32), saved with a word-level tokenizer of V words, so that
n words are n tokens.

Throughput: an lm-eval multiple-choice workload, ``--questions`` questions of 4 continuations
(1 to 5 tokens each, as ARC's or HellaSwag's) after a context of 100 to 1000 tokens. The two
servers get exactly what lm-eval's ``local-completions`` sends (one prompt per request, ``echo``,
``logprobs: 1``, ``max_tokens: 1``), from ``--clients`` concurrent clients taking the prompts in
lm-eval's order (longest first), and answers are read with lm-eval's own parser; ``hf`` is
lm-eval's HFLM called in process on the same requests (``--hf-batch-size``). The questions are
cut into ``--rounds`` rounds and the three run in turn on each round, so that a noisy neighbour
lands on all of them alike. requests/s counts loglikelihood requests (4 per question).

- ``pplfast``: ``pplfast serve`` (``--max-batch-tokens``, default ``--max-wait-ms``).
- ``pplfast-unshared``: the same with ``--no-prefix-sharing`` (not run by default: ``--peers``),
  to measure what scoring shared prefixes once gives.
- ``naive``: FastAPI, per request ``model(ids).logits``, ``log_softmax``, the same answer fields;
  one request per forward pass.
- ``hf``: ``HFLM.loglikelihood``.

Each peer answers one question before the timed rounds (first-call allocations, caches).

Memory: the growth of the server process's high-water mark (``VmHWM``, reset to the resident
size through ``/proc/PID/clear_refs`` at idle) while it scores one ``--memory-tokens`` document
(``/v1/score``, rolling windows of the model's context), after one warm-up window of the same
size; against the model's activations at ``--max-batch-tokens`` (the body's forward pass over
that many tokens in a fresh process, measured the same way: its second call, and also its
first); and the naive server's growth on one ``--naive-memory-tokens`` prompt (its ``(tokens, V)``
logits and their log-softmax, 2 x 4 bytes x tokens x V). The server is measured with pplfast's
default budget for the CPU head's temporaries (``PPLFAST_CPU_CHUNK_MB``, 32 MiB) and with
``--head-budget-mb``. Every measured process runs with glibc told to give freed blocks back at
once (``MALLOC_MMAP_THRESHOLD_=65536``, ``MALLOC_TRIM_THRESHOLD_=0``, as ``pplfast bench``), so
that memory kept from an earlier call hides nothing.
"""
import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

VOCAB = 128256
# glibc gives freed blocks back at once: a growth of VmHWM is then each call's own peak
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def build(root, args):
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    tf.logging.set_verbosity_error()
    words = ["<s>"] + [f"w{i}" for i in range(1, VOCAB)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                           eos_token="<s>", unk_token="<s>")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden,
                            intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                            num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=args.context, tie_word_embeddings=False,
                            bos_token_id=0, eos_token_id=0)
    path = os.path.join(root, "model")
    tf.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def workload(n, low, high, seed=0):
    """lm-eval loglikelihood requests: (context, continuation) strings, 4 per question."""
    rng = random.Random(seed)
    word = lambda: f"w{rng.randrange(1, VOCAB)}"  # noqa: E731
    out = []
    for _ in range(n):
        context = " ".join(word() for _ in range(rng.randint(low, high)))
        for _ in range(4):
            out.append((context, " " + " ".join(word() for _ in range(rng.randint(1, 5)))))
    return out


# ---------------------------------------------------------------- the obvious server


def naive_app(path):
    import threading

    import torch
    import transformers as tf
    from fastapi import FastAPI

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    app, lock = FastAPI(), threading.Lock()

    @app.post("/v1/completions")
    def completions(body: dict):
        choices = []
        for i, ids in enumerate(body["prompt"]):
            with lock, torch.inference_mode():  # one request per pass
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
                token_lp = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
                top_lp, top_id = logp.max(-1)
            top_lp, top_id = top_lp.tolist(), top_id.tolist()
            text = [tokenizer.decode([t]) for t in ids + [top_id[-1]]]
            tops = [None] + [{text[j + 1]: token_lp[j], tokenizer.decode([top_id[j]]): top_lp[j]}
                             for j in range(len(ids) - 1)]
            tops.append({text[-1]: top_lp[-1]})
            offsets = [sum(len(t) for t in text[:j]) for j in range(len(text))]
            choices.append({"index": i, "text": " ".join(text), "finish_reason": "length",
                            "logprobs": {"tokens": text, "token_logprobs": [None] + token_lp
                                         + [top_lp[-1]], "top_logprobs": tops,
                                         "text_offset": offsets}})
        return {"object": "text_completion", "model": body.get("model"), "choices": choices}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    return app


def run_naive(path, port):
    import uvicorn

    uvicorn.run(naive_app(path), host="127.0.0.1", port=port, log_level="warning")


# ---------------------------------------------------------------- clients and servers


class Server:
    def __init__(self, cmd, env=None):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=env)

    def wait(self, url, timeout=600):
        import requests

        start = time.time()
        while time.time() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if requests.get(url + "/health", timeout=2).ok:
                    return self
            except requests.RequestException:  # pplfast binds its port before loading
                time.sleep(0.5)
        raise RuntimeError("server did not start")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(url, path, prompts, clients):
    """lm-eval's payloads from ``clients`` threads, prompts taken in lm-eval's order; per prompt
    (loglikelihood, is_greedy) read by lm-eval's parser, and each request's latency."""
    import requests
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i][0]))
    results, latency, lock = [None] * len(prompts), [], threading.Lock()
    local = threading.local()

    def one(i):
        ids, ctxlen = prompts[i]
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        payload = {"model": path, "prompt": [ids], "temperature": 0, "max_tokens": 1,
                   "logprobs": 1, "seed": 1234, "echo": True}
        start = time.perf_counter()
        r = session.post(url + "/v1/completions", json=payload, timeout=600)
        r.raise_for_status()
        seconds = time.perf_counter() - start
        results[i] = LocalCompletionsAPI.parse_logprobs(r.json(), ctxlens=[ctxlen])[0]
        with lock:
            latency.append(seconds)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, order))
    return results, latency


def prompts_of(tokenizer, pairs, max_length):
    """What local-completions sends: context + continuation, left-truncated, and ctxlen."""
    out = []
    for context, cont in pairs:
        c, x = tokenizer(context)["input_ids"], tokenizer(cont)["input_ids"]
        inp = (c + x)[-max_length:]
        out.append((inp, len(c) - max(0, len(c) + len(x) - max_length)))
    return out


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def throughput(path, args):
    import transformers as tf
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    pairs = workload(args.questions, args.context_min, args.context_max)
    prompts = prompts_of(tokenizer, pairs, args.context)
    names = args.peers.split(",")
    commands = {
        "pplfast": ["-m", "pplfast.cli", "serve", path, "--max-batch-tokens",
                    str(args.max_batch_tokens)],
        "pplfast-unshared": ["-m", "pplfast.cli", "serve", path, "--max-batch-tokens",
                             str(args.max_batch_tokens), "--no-prefix-sharing"],
        "naive": [__file__, "--naive-server", path]}
    servers, urls = {}, {}
    for name in names:
        if name in commands:
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            servers[name] = Server([sys.executable, *commands[name], "--port", str(port)])
    for name, s in servers.items():
        s.wait(urls[name])
    hf = HFLM(pretrained=path, dtype="float32", device="cpu", batch_size=args.hf_batch_size,
              max_length=args.context - 1) if "hf" in names else None

    def score(name, part):
        if name == "hf":
            return hf.loglikelihood([Instance("loglikelihood", {}, pairs[i], i) for i in part],
                                    disable_tqdm=True), []
        return ask(urls[name], path, [prompts[i] for i in part], args.clients)

    for name in names:  # warm-up: one question each, not timed
        score(name, range(4))
    rows = {n: {"seconds": 0.0, "latency": [], "answers": [None] * len(pairs)} for n in names}
    per_round = -(-args.questions // args.rounds) * 4
    for r, start in enumerate(range(0, len(pairs), per_round)):
        part = range(start, min(start + per_round, len(pairs)))
        for name in names[r % len(names):] + names[: r % len(names)]:
            began = time.perf_counter()
            answers, latency = score(name, part)
            rows[name]["seconds"] += time.perf_counter() - began
            rows[name]["latency"] += latency
            for i, a in zip(part, answers):
                rows[name]["answers"][i] = a
        print(f"round {r + 1}: " + ", ".join(f"{n} {rows[n]['seconds']:.1f} s" for n in names),
              file=sys.stderr)
    for s in servers.values():
        s.stop()
    report, ref = {}, rows[names[-1]]["answers"]
    for name, row in rows.items():
        diff = max(abs(a[0] - b[0]) for a, b in zip(row["answers"], ref))
        greedy = sum(a[1] == b[1] for a, b in zip(row["answers"], ref))
        report[name] = {"seconds": row["seconds"], "requests_per_s": len(pairs) / row["seconds"],
                        f"max_abs_diff_vs_{names[-1]}": diff,
                        f"is_greedy_equal_to_{names[-1]}": greedy,
                        "p50_ms": 1e3 * percentile(row["latency"], 50) if row["latency"] else None,
                        "p99_ms": 1e3 * percentile(row["latency"], 99) if row["latency"] else None}
    return report


# ---------------------------------------------------------------- memory


def status_mib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def growth_while(pid, call):
    """VmHWM growth of ``pid`` over ``call()``, its mark reset to the resident size first."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    before = status_mib(pid, "VmRSS")
    call()
    return status_mib(pid, "VmHWM") - before


def activations(path, tokens):
    """Growth of this process's VmHWM over the model body's forward pass on ``tokens`` tokens."""
    import torch
    import transformers as tf

    from pplfast._memprobe import reset_peak, status_bytes

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(1, VOCAB, (1, tokens))
    growth = []
    with torch.inference_mode():
        model.model(input_ids=ids[:, :16])
        for _ in range(2):  # the first call at this size, then the steady state
            reset_peak()
            before = status_bytes("VmRSS")
            model.model(input_ids=ids)
            growth.append((status_bytes("VmHWM") - before) / 2**20)
    print(*growth)


def memory(path, args):
    import requests

    rng = random.Random(1)
    doc = [rng.randrange(1, VOCAB) for _ in range(args.memory_tokens)]
    out = subprocess.run([sys.executable, __file__, "--activations", path, "--tokens",
                          str(args.max_batch_tokens)], capture_output=True, text=True, check=True,
                         env={**os.environ, **MALLOC})
    first, steady = map(float, out.stdout.split()[-2:])
    report = {"activations_mib": steady, "activations_first_call_mib": first}
    for label, budget in (("pplfast", None), ("pplfast_head_budget", args.head_budget_mb)):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, **MALLOC,
               **({"PPLFAST_CPU_CHUNK_MB": str(budget)} if budget else {})}
        srv = Server([sys.executable, "-m", "pplfast.cli", "serve", path, "--port", str(port),
                      "--max-batch-tokens", str(args.max_batch_tokens)], env=env).wait(url)
        try:
            warm = {"input": doc[: args.context], "mode": "rolling"}  # one full window
            requests.post(url + "/v1/score", json=warm, timeout=3600).raise_for_status()
            idle_peak = status_mib(srv.proc.pid, "VmHWM")

            def score():
                r = requests.post(url + "/v1/score", json={"input": doc, "mode": "rolling"},
                                  timeout=3600)
                r.raise_for_status()
                report["windows"] = r.json()["usage"]["windows"]

            report[f"{label}_growth_mib"] = growth_while(srv.proc.pid, score)
            report[f"{label}_peak_minus_idle_peak_mib"] = (status_mib(srv.proc.pid, "VmHWM")
                                                           - idle_peak)
        finally:
            srv.stop()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    srv = Server([sys.executable, __file__, "--naive-server", path, "--port", str(port)],
                 env={**os.environ, **MALLOC}).wait(url)
    try:
        requests.post(url + "/v1/completions", json={"prompt": [doc[:600]]})  # warm
        n = args.naive_memory_tokens
        report["naive_tokens"] = n
        report["naive_growth_mib"] = growth_while(srv.proc.pid, lambda: requests.post(
            url + "/v1/completions", json={"prompt": [doc[:n]]}, timeout=3600).raise_for_status())
    finally:
        srv.stop()
    report["naive_at_memory_tokens_mib"] = 2 * 4 * args.memory_tokens * VOCAB / 2**20
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=1000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--context-min", type=int, default=100)
    p.add_argument("--context-max", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--hf-batch-size", type=int, default=1)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--max-batch-tokens", type=int, default=4096)
    p.add_argument("--memory-tokens", type=int, default=16384)
    p.add_argument("--naive-memory-tokens", type=int, default=16384)
    p.add_argument("--head-budget-mb", type=float, default=4,
                   help="PPLFAST_CPU_CHUNK_MB of the second memory run of pplfast")
    p.add_argument("--peers", default="pplfast,naive,hf",
                   help="comma list among pplfast, pplfast-unshared, naive, hf; the last is the "
                        "reference of the max |diff| column")
    p.add_argument("--skip", choices=("throughput", "memory"), action="append", default=[])
    p.add_argument("--json", help="write the record to this file")
    p.add_argument("--naive-server", help=argparse.SUPPRESS)
    p.add_argument("--activations", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.naive_server:
        return run_naive(a.naive_server, a.port)
    if a.activations:
        return activations(a.activations, a.tokens)
    import torch

    record = {"command": " ".join(["python", "benchmarks/bench_serve.py"] + sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with tempfile.TemporaryDirectory() as root:
        path = build(root, a)
        if "throughput" not in a.skip:
            record["throughput"] = throughput(path, a)
        if "memory" not in a.skip:
            record["memory"] = memory(path, a)
    print(json.dumps(record, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1)
    t = record.get("throughput")
    if t:
        names = list(t)
        bases = [b for b in ("naive", "hf") if b in t]
        print(f"\n{'peer':16} {'req/s':>7} " + " ".join(f"{'vs ' + b:>8}" for b in bases)
              + f" {'p50 ms':>8} {'p99 ms':>8} {'max |diff| vs ' + names[-1]:>18}")
        for name, row in t.items():
            p50 = f"{row['p50_ms']:.0f}" if row["p50_ms"] else "-"
            p99 = f"{row['p99_ms']:.0f}" if row["p99_ms"] else "-"
            ratios = " ".join(f"{row['requests_per_s'] / t[b]['requests_per_s']:7.2f}x"
                              for b in bases)
            print(f"{name:16} {row['requests_per_s']:7.2f} {ratios} {p50:>8} {p99:>8} "
                  f"{row[f'max_abs_diff_vs_{names[-1]}']:18.2e}")
    m = record.get("memory")
    if m:
        print(f"\nmemory: pplfast +{m['pplfast_growth_mib']:.1f} MiB scoring {a.memory_tokens} "
              f"tokens ({m['windows']} windows), +{m['pplfast_head_budget_growth_mib']:.1f} MiB "
              f"with PPLFAST_CPU_CHUNK_MB={a.head_budget_mb:g}; activations at "
              f"{a.max_batch_tokens} tokens {m['activations_mib']:.1f} MiB (+10%: "
              f"{1.1 * m['activations_mib']:.1f}; first call {m['activations_first_call_mib']:.1f})"
              f"; naive "
              f"+{m['naive_growth_mib']:.0f} MiB on {m['naive_tokens']} tokens "
              f"({m['naive_at_memory_tokens_mib']:.0f} MiB of logits and log-softmax at "
              f"{a.memory_tokens})")


if __name__ == "__main__":
    main()
