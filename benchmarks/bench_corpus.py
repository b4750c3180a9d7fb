"""`pplfast score-corpus` against a per-document loop and `pplfast score`, and its peak memory as
the corpus grows tenfold. A script (each measurement is minutes of CPU), not a pytest case:

    python benchmarks/bench_corpus.py                          # 2000 documents, 20-2000 tokens
    python benchmarks/bench_corpus.py --docs 500 --lengths loguniform --json out.json

Model: a random Llama (V = 32000, D = 128, 2 layers, 4 heads, MLP 512, context 2048, fp32)
saved with a word-level tokenizer of 32000 words, so that a document of n words is n tokens.
Documents: random words, lengths drawn uniformly (or log-uniformly) from 20..2000 tokens.

Each implementation runs in its own fresh process, one after the other; its time covers loading
the model from disk, reading the corpus, scoring every document (one window each) and writing
its output, not the Python and library imports. Peak memory is that process's VmHWM.

- ``loop``: per document, ``model(ids, labels=ids).loss`` under ``torch.inference_mode()``.
- ``score``: ``pplfast score --batch-size 8`` (its default) on the same file.
- ``score-corpus``: ``pplfast score-corpus`` with its defaults (``--batch-tokens 16384``).
- memory: ``score-corpus`` on the first tenth of the documents, against the full run.
"""
import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time

VOCAB, WIDTH, LAYERS, CONTEXT = 32000, 128, 2, 2048


def build(root, docs, lengths, seed):
    """Save the model, its tokenizer and ``corpus.jsonl`` / ``tenth.jsonl`` under ``root``."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    tf.logging.set_verbosity_error()
    words = [f"w{i}" for i in range(VOCAB - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                            num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
                            max_position_embeddings=CONTEXT, tie_word_embeddings=False,
                            bos_token_id=0, eos_token_id=0)
    tf.LlamaForCausalLM(config).save_pretrained(os.path.join(root, "model"))
    tokenizer.save_pretrained(os.path.join(root, "model"))
    rng = random.Random(seed)
    counts = []
    for _ in range(docs):
        if lengths == "uniform":
            counts.append(rng.randint(20, 2000))
        else:
            counts.append(int(round(math.exp(rng.uniform(math.log(20), math.log(2000))))))
    with open(os.path.join(root, "corpus.jsonl"), "w") as full, open(os.path.join(root, "tenth.jsonl"), "w") as tenth:
        for i, n in enumerate(counts):
            line = json.dumps({"text": " ".join(rng.choice(words) for _ in range(n))}) + "\n"
            full.write(line)
            if i < docs // 10:
                tenth.write(line)
    return counts


def child(kind, root, inp):
    """In a fresh process: run ``kind`` once; print seconds, peak memory and total NLL as JSON."""
    import contextlib
    import io

    import torch
    import transformers  # noqa: F401  (imports are not timed)

    from pplfast._memprobe import status_bytes
    from pplfast.cli import main

    model_dir = os.path.join(root, "model")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_start = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    if kind == "loop":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        total = tokens = 0.0
        with open(inp) as f, torch.inference_mode():
            for line in f:
                ids = torch.tensor([tokenizer(json.loads(line)["text"])["input_ids"]])
                loss = model(ids, labels=ids).loss
                total += float(loss) * (ids.shape[1] - 1)
                tokens += ids.shape[1] - 1
        figures = {"sum_nll": total, "num_tokens": int(tokens)}
    else:
        out = io.StringIO()
        argv = [kind, "--model", model_dir, "--input", inp, "--window", str(CONTEXT), "--json",
                "--no-progress", "--device", "cpu"]
        if kind == "score-corpus":
            argv += ["--output", os.path.join(root, f"scores-{os.getpid()}.jsonl")]
        with contextlib.redirect_stdout(out):
            assert main(argv) == 0
        res = json.loads(out.getvalue())
        figures = {"num_tokens": res["num_tokens"],
                   "sum_nll": math.log(res["perplexity"]) * res["num_tokens"]}
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu_start
    print(json.dumps({"kind": kind, "seconds": seconds, "cpu_seconds": cpu,
                      "peak_bytes": status_bytes("VmHWM"), **figures}))


def run_child(kind, root, inp):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, "--root", root,
                           "--input", inp], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--lengths", choices=("uniform", "loguniform"), default="uniform")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=("loop", "score", "memory"),
                        help="measurements to leave out")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the record here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--input", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.root, args.input)

    import torch

    import pplfast

    with tempfile.TemporaryDirectory() as root:
        counts = build(root, args.docs, args.lengths, args.seed)
        full, tenth = os.path.join(root, "corpus.jsonl"), os.path.join(root, "tenth.jsonl")
        results = {"score-corpus": run_child("score-corpus", root, full)}
        if "score" not in args.skip:
            results["score"] = run_child("score", root, full)
        if "loop" not in args.skip:
            results["loop"] = run_child("loop", root, full)
        if "memory" not in args.skip:
            results["score-corpus (tenth)"] = run_child("score-corpus", root, tenth)
    ours = results["score-corpus"]
    rows = []
    for name, r in results.items():
        docs = args.docs // 10 if "tenth" in name else args.docs
        rows.append((name, docs, r["seconds"], docs / r["seconds"], r["num_tokens"] / r["seconds"],
                     r["peak_bytes"] / 2 ** 20))
    print(f"{args.docs} documents, {sum(counts)} tokens ({args.lengths} 20..2000), random Llama "
          f"V={VOCAB} D={WIDTH} L={LAYERS}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'implementation':<22}{'docs':>6}{'seconds':>10}{'CPU s':>8}{'docs/s':>9}{'tokens/s':>10}{'peak MiB':>10}")
    for (name, docs, sec, dps, tps, mib), r in zip(rows, results.values()):
        print(f"{name:<22}{docs:>6}{sec:>10.1f}{r['cpu_seconds']:>8.1f}{dps:>9.2f}{tps:>10.0f}{mib:>10.1f}")
    record = {"docs": args.docs, "lengths": args.lengths, "tokens": sum(counts),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "pplfast": pplfast.__version__,
              "command": " ".join(sys.argv), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "results": results}
    for name in ("loop", "score"):
        if name in results:
            ratio = results[name]["seconds"] / ours["seconds"]
            cpu_ratio = results[name]["cpu_seconds"] / ours["cpu_seconds"]
            record[f"speedup_vs_{name}"] = ratio
            record[f"cpu_speedup_vs_{name}"] = cpu_ratio
            drift = abs(results[name]["sum_nll"] - ours["sum_nll"]) / ours["sum_nll"]
            print(f"score-corpus documents/s = {ratio:.2f}x {name}'s ({cpu_ratio:.2f}x in CPU time; "
                  f"total NLL differs by {drift:.1e})")
    if "score-corpus (tenth)" in results:
        growth = ours["peak_bytes"] / results["score-corpus (tenth)"]["peak_bytes"] - 1
        record["peak_growth_10x"] = growth
        print(f"score-corpus peak memory, 10x the documents: {growth:+.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
