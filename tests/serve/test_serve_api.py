"""`pplfast serve` as a real process on a loopback port: every endpoint's wire format, the
numbers against the models' own logits and pplfast's in-process scorers, the ``openai`` client,
and a bounded load test. One server (two tiny models) for the module; the other server modules
import :class:`ServerProcess` and the model builders from here."""
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

from builders import build_model, corpus  # noqa: E402

CONTEXT = 64
READY = re.compile(r"listening on (http://[^ ]+)")


def train_tokenizer(vocab_size=320):
    """builders' byte-level BPE, with BOS at id 1: lm-eval's remote tokenizer takes EOS as the
    prefix token when the BOS id is 0 (``bos_token_id or eos_token_id``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def save_models(root, seeds=(0,), context=CONTEXT):
    """Tiny Llamas (one per seed) sharing the tokenizer above, saved under ``root``."""
    tokenizer = train_tokenizer()
    paths = []
    for seed in seeds:
        model = build_model("llama", len(tokenizer), context=context, seed=seed)
        model.config.bos_token_id, model.config.eos_token_id = 1, 2
        path = root / f"model{seed}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths


class ServerProcess:
    """``pplfast serve ARGS --port 0`` (or a launcher script taking the same arguments),
    started and read until it says where it listens."""

    def __init__(self, args, *, launcher=None, timeout=300, env=None, headers=None):
        self.headers = headers or {}
        head = [launcher] if launcher else ["-m", "pplfast.cli", "serve"]
        cmd = [sys.executable, *head, *map(str, args)]
        if "--port" not in args:
            cmd += ["--port", "0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                     **(env or {})})
        self.stderr = []
        found = threading.Event()
        self.url = None

        def read():
            for line in self.proc.stderr:
                self.stderr.append(line)
                match = READY.search(line)
                if match and not found.is_set():
                    self.url = match.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        found.wait(timeout)
        if self.url is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.stderr)[-3000:])

    def post(self, path, body, **kwargs):
        return requests.post(self.url + path, json=body, timeout=120, headers=self.headers,
                             **kwargs)

    def get(self, path, **kwargs):
        return requests.get(self.url + path, timeout=60, headers=self.headers, **kwargs)

    def metric(self, name, **labels):
        """Sum of a metric's samples whose labels include ``labels``."""
        total = 0.0
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
                if all(found.get(k) == v for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_models(tmp_path_factory.mktemp("serve"), seeds=(0, 1))


@pytest.fixture(scope="module")
def server(saved):
    srv = ServerProcess([saved[0], "--model", f"b={saved[1]}", "--max-wait-ms", "20",
                         "--max-batch-tokens", "256"])
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def loaded(saved):
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(saved[0])
    models = [tf.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
              for p in saved]
    return tokenizer, models


def reference(model, ids):
    """float64 log-probabilities of every position's next token from the model's own logits."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def close(a, b, tol=1e-4):
    return a is not None and b is not None and abs(a - b) <= tol * max(1.0, abs(b))


def text(seed, lines=2):
    return " ".join(corpus(lines, seed=seed))


# ---------------------------------------------------------------- OpenAI completions


def test_openai_client_echo_logprobs_greedy_token(server, saved, loaded):
    openai = pytest.importorskip("openai")
    tokenizer, (model, _) = loaded
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    prompt = text(1)
    out = client.completions.create(model=saved[0], prompt=prompt, echo=True, logprobs=1,
                                    max_tokens=1)
    ids = tokenizer(prompt)["input_ids"]
    logp = reference(model, ids)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None
    for j in range(1, len(ids)):
        assert close(lp.token_logprobs[j], float(logp[j - 1, ids[j]]))
        top_id = int(logp[j - 1].argmax())
        assert tokenizer.decode([top_id]) in lp.top_logprobs[j]
        assert tokenizer.decode([ids[j]]) in lp.top_logprobs[j]  # the token itself, always
    greedy = int(logp[-1].argmax())
    assert lp.tokens[-1] == tokenizer.decode([greedy])
    assert close(lp.token_logprobs[-1], float(logp[-1].max()))
    assert out.choices[0].text == prompt + tokenizer.decode([greedy])
    assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 1
    assert out.choices[0].finish_reason == "length"


def test_greedy_prompt_tokens_match_their_top_logprob_exactly(server, saved, loaded):
    """lm-eval's is_greedy compares a token's log-probability with the largest of its
    top_logprobs: a greedy prompt (each token the argmax of the one before) must compare equal."""
    tokenizer, (model, _) = loaded
    ids = tokenizer(text(2))["input_ids"][:5]
    while len(ids) < 20:
        ids.append(int(reference(model, ids)[-1].argmax()))
    body = {"model": saved[0], "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1}
    lp = server.post("/v1/completions", body).json()["choices"][0]["logprobs"]
    for j in range(5, len(ids)):
        assert lp["token_logprobs"][j] == max(lp["top_logprobs"][j].values())


def test_prompt_forms_give_the_same_numbers(server, saved, loaded):
    tokenizer, _ = loaded
    texts = [text(3), text(4, lines=1)]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    base = {"model": saved[0], "echo": True, "logprobs": 0, "max_tokens": 0}
    answers = {}
    for name, prompt in (("texts", texts), ("ids", ids)):
        answers[name] = server.post("/v1/completions", {**base, "prompt": prompt}).json()
    one_text = server.post("/v1/completions", {**base, "prompt": texts[1]}).json()
    one_ids = server.post("/v1/completions", {**base, "prompt": ids[1]}).json()
    for a, b in zip(answers["texts"]["choices"], answers["ids"]["choices"]):
        assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
        assert a["text"] == b["text"]
        for x, y in zip(a["logprobs"]["token_logprobs"][1:], b["logprobs"]["token_logprobs"][1:]):
            assert close(x, y, 1e-5)
    for one in (one_text, one_ids):
        got = one["choices"][0]["logprobs"]["token_logprobs"]
        want = answers["ids"]["choices"][1]["logprobs"]["token_logprobs"]
        assert got[0] is None and all(close(x, y, 1e-5) for x, y in zip(got[1:], want[1:]))
    assert answers["ids"]["usage"]["prompt_tokens"] == sum(map(len, ids))
    # logprobs: 0 gives the token alone; max_tokens 0 generates nothing
    assert all(len(t) == 1 for t in answers["ids"]["choices"][0]["logprobs"]["top_logprobs"][1:])
    assert answers["ids"]["usage"]["completion_tokens"] == 0


def test_vllm_prompt_logprobs(server, saved, loaded):
    tokenizer, (model, _) = loaded
    ids = tokenizer(text(5))["input_ids"][:24]
    body = {"model": saved[0], "prompt": [ids], "max_tokens": 0, "prompt_logprobs": 3}
    choice = server.post("/v1/completions", body).json()["choices"][0]
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None and choice["logprobs"] is None
    logp = reference(model, ids)
    for j in range(1, len(ids)):
        entry, row = entries[j], logp[j - 1]
        top = row.topk(3).indices.tolist()
        assert [int(k) for k in entry][:3] == top
        assert [v["rank"] for v in entry.values()][:3] == [1, 2, 3]
        mine = entry[str(ids[j])]
        assert close(mine["logprob"], float(row[ids[j]]))
        assert mine["rank"] == int((row > row[ids[j]]).sum()) + 1
        assert mine["decoded_token"] == tokenizer.decode([ids[j]])


def test_generation_options_are_refused(server, saved):
    base = {"model": saved[0], "prompt": "the fox"}
    cases = [({"max_tokens": 2}, "max_tokens"), ({}, "max_tokens"),
             ({"max_tokens": 1, "temperature": 0.7}, "temperature"),
             ({"max_tokens": 1, "n": 2}, "n"), ({"max_tokens": 0, "stream": True}, "stream"),
             ({"max_tokens": 1, "stop": ["x"]}, "stop"),
             ({"max_tokens": 1, "logit_bias": {"5": 3.0}}, "logit_bias"),
             ({"max_tokens": 0, "logprobs": 21}, "logprobs"),
             ({"max_tokens": 1, "prompt": [[5] * CONTEXT + [6]]}, "prompt")]
    for extra, param in cases:
        r = server.post("/v1/completions", {**base, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param, r.text
    # the longest prompt that fits: the model reads len - 1 + max_tokens tokens
    assert server.post("/v1/completions", {**base, "max_tokens": 1,
                                           "prompt": [[5] * CONTEXT]}).status_code == 200
    assert server.post("/v1/completions", {**base, "max_tokens": 0, "echo": True, "logprobs": 0,
                                           "prompt": [[5] * (CONTEXT + 1)]}).status_code == 200


# ---------------------------------------------------------------- SGLang generate


def test_sglang_generate(server, saved, loaded):
    tokenizer, (model, _) = loaded
    ids = tokenizer(text(6))["input_ids"][:30]
    logp = reference(model, ids)
    body = {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
            "top_logprobs_num": 2, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    out = server.post("/generate", body).json()
    meta = out["meta_info"]
    assert meta["input_token_logprobs"][0] == [None, ids[0], None]
    assert len(meta["input_token_logprobs"]) == len(ids) and meta["input_top_logprobs"][0] is None
    for j in range(1, len(ids)):
        lp, token, _ = meta["input_token_logprobs"][j]
        assert token == ids[j] and close(lp, float(logp[j - 1, ids[j]]))
        top = logp[j - 1].topk(2).indices.tolist()
        assert [t for _, t, _ in meta["input_top_logprobs"][j]] == top
    greedy = int(logp[-1].argmax())
    assert meta["output_token_logprobs"][0][1] == greedy
    assert out["text"] == tokenizer.decode([greedy])
    assert meta["prompt_tokens"] == len(ids) and meta["completion_tokens"] == 1
    # a batch, from a later start, with texts in the triples
    body.update(input_ids=[ids, ids[:10]], logprob_start_len=4, return_text_in_logprobs=True)
    batch = server.post("/generate", body).json()
    assert isinstance(batch, list) and len(batch) == 2
    first = batch[0]["meta_info"]["input_token_logprobs"]
    assert len(first) == len(ids) - 4 and first[0][1] == ids[4]
    assert close(first[0][0], float(logp[3, ids[4]])) and first[0][2] == tokenizer.decode([ids[4]])
    assert len(batch[1]["meta_info"]["input_token_logprobs"]) == 6
    # text input, no generated token, SGLang's default start (-1): no input log-probabilities
    out = server.post("/generate", {"text": text(6), "return_logprob": True,
                                    "sampling_params": {"max_new_tokens": 0}}).json()
    assert out["text"] == "" and out["meta_info"]["input_token_logprobs"] == []
    bad = server.post("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 8}})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "sampling_params.max_new_tokens"


# ---------------------------------------------------------------- native score and compare


@pytest.mark.parametrize("options", [{}, {"window": 32, "mode": "rolling"},
                                     {"window": 24, "stride": 8},
                                     {"window": 16, "mode": "llamacpp"}],
                         ids=["default", "rolling", "sliding", "llamacpp"])
def test_score_equals_score_texts(server, saved, loaded, options):
    import pplfast

    tokenizer, (model, _) = loaded
    texts = [text(7, lines=1), text(8, lines=12), text(9, lines=6)]
    assert len(tokenizer(texts[1])["input_ids"]) > 2 * CONTEXT  # several windows
    out = server.post("/v1/score", {"model": saved[0], "input": texts, "stats": True,
                                    "top_k": 2, **options}).json()
    want = pplfast.score_texts(model, tokenizer, texts, stats=True, top_k=2, **options)
    for got, doc, t in zip(out["data"], want.documents, texts):
        # the bytes of the text the scored tokens cover: the whole text where every token is
        # scored (rolling), less where windows leave tokens unscored (llamacpp: half of it)
        assert got["num_tokens"] == doc.num_tokens and got["num_bytes"] == doc.num_bytes
        if options.get("mode") in ("rolling", "llamacpp"):
            assert (doc.num_bytes == len(t.encode())) == (options["mode"] == "rolling")
        assert close(got["sum_nll"], doc.sum_nll, 1e-5)
        assert close(got["perplexity"], doc.perplexity, 1e-5)
        assert close(got["bits_per_byte"], doc.sum_nll / math.log(2) / doc.num_bytes, 1e-5)
        tokens = got["tokens"]
        assert tokens["token_ids"] == doc.token_ids.tolist()
        assert tokens["scored"] == doc.scored.tolist()
        for name in ("nll", "entropy", "max_logprob"):
            for g, w, s in zip(tokens[name], getattr(doc.stats, name).tolist(), tokens["scored"]):
                assert (g is None) if not s else close(g, w, 1e-5), name
        scored = doc.scored
        for name in ("argmax", "rank", "top_k_ids"):
            got_scored = [a for a, s in zip(tokens[name], scored) if s]
            assert got_scored == getattr(doc.stats, name)[scored].tolist(), name


def test_score_token_ids_and_errors(server, saved, loaded):
    tokenizer, _ = loaded
    ids = tokenizer(text(10))["input_ids"]
    by_text = server.post("/v1/score", {"input": text(10)}).json()["data"][0]
    by_ids = server.post("/v1/score", {"input": ids}).json()["data"][0]
    assert by_ids["sum_nll"] == pytest.approx(by_text["sum_nll"], rel=1e-6)
    # sliding windows leave the first token unscored: its bytes are not counted, by text
    # (the tokenizer's offsets) or by ids (the decoded runs of scored tokens) alike
    assert by_ids["num_bytes"] == by_text["num_bytes"] < len(tokenizer.decode(ids).encode())
    for body, param in (({"input": "x", "window": CONTEXT + 1}, "window"),
                        ({"input": "x", "mode": "nope"}, "mode"),
                        ({"input": "x", "window": 8, "stride": 8}, "stride"),
                        ({"input": "x", "top_k": 2}, "top_k"),
                        ({"input": "x", "per_tokn": True}, "per_tokn"),
                        ({"input": [[1, 2, 9999]]}, "input")):
        r = server.post("/v1/score", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_compare_equals_compare_models(server, saved, loaded):
    import pplfast

    tokenizer, (base, test) = loaded
    texts = [text(11, lines=3), text(12, lines=10)]
    out = server.post("/v1/compare", {"model": "b", "base": saved[0], "input": texts,
                                      "window": 32, "mode": "rolling", "per_token": True}).json()
    ids = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    per_doc = [pplfast.compare_models(base, test, x, window=32, mode="rolling") for x in ids]
    for got, want in zip(out["data"], per_doc):
        assert got["num_tokens"] == want.num_tokens
        for key in ("kl_mean", "ppl_ratio", "top1_agreement", "delta_p_rms", "nll_correlation"):
            assert close(got[key], getattr(want, key), 1e-5), key
        assert close(got["kl_percentiles"]["99.0"], want.kl_percentiles[99.0], 1e-5)
        kl = [k for k, s in zip(got["tokens"]["kl"], got["tokens"]["scored"]) if s]
        assert all(close(a, b, 1e-5) for a, b in zip(kl, want.token_comparison.kl.tolist()))
    whole = pplfast.compare_models(base, test, torch.cat(ids), window=32, mode="rolling")
    assert out["summary"]["num_tokens"] == sum(d.num_tokens for d in per_doc)
    assert out["base"] == saved[0] and out["model"] == "b"
    assert whole.num_tokens == out["summary"]["num_tokens"]
    r = server.post("/v1/compare", {"model": "b", "base": "b", "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "base"


def test_models_health_and_tokenizer_endpoints(server, saved, loaded):
    tokenizer, _ = loaded
    models = server.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == [saved[0], "b"] and models[0]["max_model_len"] == CONTEXT
    assert server.get("/health").json()["status"] == "ok"
    info = server.get("/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"]) == ("<s>", "</s>")
    out = server.post("/tokenize", {"prompt": "the fox", "add_special_tokens": False}).json()
    assert out["tokens"] == tokenizer("the fox", add_special_tokens=False)["input_ids"]
    assert server.post("/detokenize", {"tokens": out["tokens"]}).json()["prompt"] == "the fox"
    assert server.get("/metrics").text.count("pplfast_requests_total") > 1


# ---------------------------------------------------------------- load


def load_requests(tokenizer, n=64, seed=3):
    """Mixed lengths, and groups of four continuations of one context (multiple choice)."""
    rng = random.Random(seed)
    words = " ".join(corpus(80, seed=seed)).split()
    out = []
    for i in range(n):
        start = rng.randrange(300)
        context = " ".join(words[start : start + rng.randint(3, 40)])
        if i % 2:
            choices = [context + " " + " ".join(words[k : k + 1 + k % 3]) for k in range(4)]
            out.append({"prompt": [tokenizer(c)["input_ids"][:CONTEXT] for c in choices]})
        else:
            out.append({"prompt": tokenizer(context)["input_ids"][:CONTEXT]})
    return [{**r, "echo": True, "logprobs": 1, "max_tokens": 1} for r in out]


def answers(resp):
    assert resp.status_code == 200, resp.text
    return [(c["logprobs"]["token_logprobs"], c["logprobs"]["tokens"])
            for c in resp.json()["choices"]]


def test_64_concurrent_clients_equal_one_at_a_time(server, loaded):
    tokenizer, _ = loaded
    bodies = load_requests(tokenizer)
    shared_before = server.metric("pplfast_shared_prefix_tokens_total")
    alone = [answers(server.post("/v1/completions", b)) for b in bodies]
    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(lambda b: answers(server.post("/v1/completions", b)), bodies))
    for a, t in zip(alone, together):
        for (lps_a, toks_a), (lps_t, toks_t) in zip(a, t):
            assert toks_a == toks_t  # the same greedy tokens
            assert lps_a[0] is None and lps_t[0] is None
            assert all(close(x, y, 2e-5) for x, y in zip(lps_a[1:], lps_t[1:]))
    assert server.metric("pplfast_shared_prefix_tokens_total") > shared_before  # trees ran
    passes = server.metric("pplfast_batch_tokens_count")
    assert passes < 2 * len(bodies) + 20  # the concurrent requests shared passes
