"""What the tests of the models, corpus and CLI wings build: tiny Hugging Face models from a
config, a byte-level BPE tokenizer trained here on a word corpus, a trained Llama saved to disk,
and corpus files of every kind the reader takes (good and bad). Nothing is downloaded."""
from __future__ import annotations

import copy
import gzip
import json
import random
import textwrap

import torch

WORDS = (
    "the a model token scores every window long short text over under river stone light quick "
    "brown fox jumps lazy dog night day sea wind paper kernel vocab byte word line one two three "
    "über café naïve 東京 ✓"
).split()


def corpus(num_lines=200, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(num_lines)]


def train_tokenizer(vocab_size=320):
    """A byte-level BPE trained on the corpus above, wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def build_model(kind, vocab_size, context=128, hidden=32, seed=0):
    """kind: gpt2 | llama | gemma2 | cohere | granite; weights large enough that context matters."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, initializer_range=0.2, bos_token_id=0, eos_token_id=1,
                  pad_token_id=2)
    llama_like = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=context, **common)
    if kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_positions=context, n_embd=hidden, n_layer=2,
                                                 n_head=2, **common))
    elif kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(tie_word_embeddings=False, **llama_like))
    elif kind == "gemma2":
        config = tf.Gemma2Config(head_dim=8, final_logit_softcapping=4.0, **llama_like)
        config._attn_implementation = "eager"
        model = tf.Gemma2ForCausalLM(config)
        with torch.no_grad():  # logits well past the cap, so that capping changes the NLL
            model.get_output_embeddings().weight.mul_(4.0)
    elif kind == "cohere":
        model = tf.CohereForCausalLM(tf.CohereConfig(logit_scale=0.25, **llama_like))
    elif kind == "granite":
        model = tf.GraniteForCausalLM(tf.GraniteConfig(logits_scaling=3.0, **llama_like))
    else:
        raise ValueError(kind)
    return model.eval()


def rounded_copy(model, dtype=torch.bfloat16):
    """The model with every weight rounded to ``dtype`` (kept in float32)."""
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for p in copy_.parameters():
            p.copy_(p.to(dtype).float())
    return copy_


def save_tiny_llama(root, *, context=48):
    """A random tiny Llama and its trained tokenizer, saved together in ``root / "model"``;
    returns ``(model, tokenizer)``."""
    tokenizer = train_tokenizer()
    model = build_model("llama", len(tokenizer), context=context)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return model, tokenizer


def llamacpp_case():
    """``(model, tokenizer, ids)``: a tiny Llama of context 64 and one long text's ids, for
    llama.cpp's schedule."""
    tokenizer = train_tokenizer()
    model = build_model("llama", len(tokenizer), context=64)
    ids = torch.tensor(tokenizer(" ".join(corpus(30, seed=5)))["input_ids"])
    return model, tokenizer, ids


def save_trained_llama(root, *, context=64, steps=25, seed=0):
    """A tiny Llama and its tokenizer (:func:`build_model`, :func:`train_tokenizer`), trained
    ``steps`` Adam steps on the word corpus (:func:`corpus`) so that text off that corpus scores
    far worse; saved to ``root``.

    Returns ``(model, tokenizer)``, the model in eval mode.
    """
    tokenizer = train_tokenizer()
    model = build_model("llama", len(tokenizer), context=context, seed=seed)
    ids = torch.tensor(tokenizer(" ".join(corpus(400, seed=seed + 1)))["input_ids"])
    rows = ids[: len(ids) // context * context].view(-1, context)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        batch = rows[torch.randint(0, len(rows), (16,), generator=gen)]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return model, tokenizer


# ---- corpus files ----------------------------------------------------------------------------

def documents(count, seed, lines=(2, 6)):
    """``count`` texts of a few lines of the word corpus each."""
    rng = random.Random(seed)
    return [" ".join(corpus(rng.randint(*lines), seed=seed * 1000 + i)) for i in range(count)]


def write_jsonl(path, records):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def json_lines(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_every_kind(directory):
    """One file of every input kind the reader takes, in ``directory``; returns the paths and
    the documents in reading order as ``(id, text)`` (default ids: ``<file>:<line>`` for JSON
    lines, ``<file>:<element>`` for a JSON array, ``<file>:<row>`` for parquet, ``<file>`` for
    a text file)."""
    rng = random.Random(3)
    pool = iter(" ".join(corpus(rng.randint(1, 3), seed=900 + i)) for i in range(100))
    paths, expected = [], []

    def add(name, data, docs):
        path = directory / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        paths.append(str(path))
        expected.extend((str(path) if n is None else f"{path}:{n}", t) for n, t in docs)

    t = [next(pool) for _ in range(3)]
    # JSON lines: blank lines are counted in the line numbers; a null text is an empty document
    add("a.jsonl", json.dumps({"text": t[0], "n": 1}) + "\n\n  \n" + json_lines([{"text": t[1]},
        {"text": None, "meta": [1, 2]}, {"text": t[2]}]),
        [(1, t[0]), (4, t[1]), (5, ""), (6, t[2])])
    t = [next(pool) for _ in range(2)]
    add("b.jsonl.gz", gzip.compress(json_lines([{"text": x} for x in t]).encode()), [(1, t[0]), (2, t[1])])
    t = [next(pool) for _ in range(2)]
    add("c.json", json_lines([{"text": x} for x in t]), [(1, t[0]), (2, t[1])])
    t = [next(pool) for _ in range(3)]
    add("d.json", "\n  " + json.dumps([{"text": x, "k": i} for i, x in enumerate(t)], indent=2),
        [(1, t[0]), (2, t[1]), (3, t[2])])
    t = [next(pool) for _ in range(2)]
    add("e.json.gz", gzip.compress(json.dumps([{"text": x} for x in t]).encode()), [(1, t[0]), (2, t[1])])
    t = [next(pool) for _ in range(2)]
    add("f.ndjson", json_lines([{"text": x} for x in t]), [(1, t[0]), (2, t[1])])
    t = next(pool) + "\nsecond line ✓\n"
    add("g.txt", t, [(None, t)])
    t = next(pool)
    add("h.txt.gz", gzip.compress(t.encode()), [(None, t)])
    t = next(pool)
    add("i.txt", gzip.compress(t.encode()), [(None, t)])  # gzip whatever the name says
    t = [next(pool) for _ in range(2)]
    add("j.jsonl", gzip.compress(json_lines([{"text": x} for x in t]).encode()), [(1, t[0]), (2, t[1])])
    t = [next(pool) for _ in range(2)]
    add("k.json", "\ufeff" + json_lines([{"text": x} for x in t]), [(1, t[0]), (2, t[1])])  # a BOM
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return paths, expected
    t = [next(pool) for _ in range(3)]
    pq.write_table(pa.Table.from_pylist([{"text": x, "k": i} for i, x in enumerate(t)]),
                   directory / "l.parquet", row_group_size=2)
    paths.append(str(directory / "l.parquet"))
    expected.extend((f"{directory / 'l.parquet'}:{i + 1}", x) for i, x in enumerate(t))
    return paths, expected


BAD_FILES = {
    "bad-line.jsonl": (b'{"text": "ok"}\n{nope\n',
                       "bad-line.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes)"),
    "bad-array.json": (b'[{"text": "a"},\n {"text": "b"}\n {"text": "c"}]',
                       "bad-array.json:3: not valid JSON (Expecting ',' delimiter: line 3 column 2)"),
    "no-text.json": (b'[{"text": "a"}, {"body": "b"}]', "no-text.json:2: no string field 'text'"),
    "bad-utf8.txt": (b"fine words \xff\xfe", "bad-utf8.txt': 'utf-8' codec can't decode byte 0xff"),
    "cut.jsonl.gz": (gzip.compress(b'{"text": "a b c"}\n' * 200)[:60], "cut.jsonl.gz': Compressed file ended"),
    "bad-utf8-line.jsonl": (b'{"text": "a"}\n{"text": "\xff"}\n', "bad-utf8-line.jsonl:2: not valid UTF-8"),
}


def write_bad(directory, name):
    path = directory / name
    path.write_bytes(BAD_FILES[name][0])
    return str(path)


BAD_RECORDS = [  # (line, reason) in bad.jsonl, read with --id-field doc
    (2, "not valid JSON (Expecting property name enclosed in double quotes)"),
    (3, "not valid UTF-8 (invalid start byte at byte 10 of the line)"),
    (4, "no string field 'text'"),
    (5, "no string or integer field 'doc'"),  # 12.0
    (6, "no string or integer field 'doc'"),  # null
    (8, "duplicate id 'g1'"),
]


def write_bad_corpus(directory, texts):
    good = [{"text": t, "doc": f"g{i}"} for i, t in enumerate(texts)]
    lines = [json.dumps(good[0]).encode(), b'{nope', b'{"text": "\xff\xfe broken", "doc": "x"}',
             json.dumps({"body": "no text", "doc": "y"}).encode(),
             json.dumps({"text": "float id", "doc": 12.0}).encode(),
             json.dumps({"text": "null id", "doc": None}).encode(),
             json.dumps(good[1]).encode(), json.dumps({"text": "again", "doc": "g1"}).encode(),
             json.dumps(good[2]).encode()]
    path = directory / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    second = directory / "good.jsonl"
    write_jsonl(second, good[3:])
    return [str(path), str(second)], good


# ---- llama.cpp's perplexity, written from its definition -----------------------------------

def llamacpp_loop(model, ids, n_ctx, bos):
    """``llama-perplexity``'s per-token NLL of ``ids`` (``tools/perplexity/perplexity.cpp``):
    ``len // n_ctx`` chunks, BOS first in each when given, the second half of each scored."""
    first = n_ctx // 2
    nll = []
    with torch.no_grad():
        for i in range(len(ids) // n_ctx):
            chunk = ids[i * n_ctx : (i + 1) * n_ctx].clone()
            if bos is not None:
                chunk[0] = bos
            logprobs = model(chunk[None]).logits[0].double().log_softmax(-1)
            for j in range(first, n_ctx - 1):
                nll.append(-float(logprobs[j, ids[i * n_ctx + j + 1]]))
    return nll


ASCII_WORDS = [w for w in WORDS if w.isascii()]


def ascii_text(seed, words=260):
    rng = random.Random(seed)
    return " ".join(rng.choice(ASCII_WORDS) for _ in range(words))


def covered(tokenizer, ids, scored):
    """UTF-8 bytes and words of the scored tokens of an ASCII text with single spaces, token by
    token: there each token decodes to exactly its own text, and a word counts with the token
    that holds its first character."""
    text, num_bytes, num_words = "", 0, 0
    for token, is_scored in zip(ids.tolist(), scored.tolist()):
        for ch in tokenizer.decode([token]):
            num_words += is_scored and not ch.isspace() and (not text or text[-1].isspace())
            num_bytes += is_scored * len(ch.encode("utf-8"))
            text += ch
    return num_bytes, num_words


# ---- an lm-evaluation-harness task over a local file ------------------------------------------

TASK = textwrap.dedent("""\
    task: pplfast_local_text
    dataset_path: json
    dataset_kwargs:
      data_files:
        test: {data}
    test_split: test
    output_type: loglikelihood_rolling
    doc_to_text: ""
    doc_to_target: "{{{{text}}}}"
    should_decontaminate: false
    metric_list:
      - metric: word_perplexity
      - metric: byte_perplexity
      - metric: bits_per_byte
    metadata:
      version: 1.0
    """)


def local_task(root):
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(corpus(n, seed=n))}) + "\n"
                            for n in (2, 7, 20)))
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "local.yaml").write_text(TASK.format(data=data))
    return tasks
