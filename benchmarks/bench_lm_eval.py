"""lm-eval ``loglikelihood_rolling``: model ``pplfast`` against lm-eval's ``hf`` on CPU.

A tiny random Llama with a 128,256-token vocabulary scores ~200 KB of text as rolling windows.
Each (model, batch size) runs in a fresh process that reports its wall time and the growth of its
own VmHWM during the run; ``--budget-mib`` marks the runs whose peak growth exceeds that budget.

    python benchmarks/bench_lm_eval.py --batch-sizes 4 16 --budget-mib 2048
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ("the a model token scores every window long short text over under river stone light "
         "quick brown fox jumps lazy dog night day sea wind paper kernel vocab byte word line").split()


def child(model_name, batch, kb, window, vocab, hidden, layers):
    import random
    import warnings

    import torch
    import transformers as tf
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pplfast._memprobe import reset_peak, status_bytes
    from pplfast.lm_eval import PplfastLM

    warnings.simplefilter("ignore")
    rng = random.Random(0)
    docs, size = [], 0
    while size < kb * 1000:
        doc = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
                        for _ in range(200))
        docs.append(doc)
        size += len(doc.encode())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(docs[:2], trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=window, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=1)).eval()
    cls = PplfastLM if model_name == "pplfast" else HFLM
    lm = cls(pretrained=model, tokenizer=tok, batch_size=batch, max_length=window, device="cpu")
    reqs = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    lm.loglikelihood_rolling(reqs[:1], disable_tqdm=True)
    reset_peak()
    before = status_bytes("VmHWM")
    start = time.perf_counter()
    ll = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    seconds = time.perf_counter() - start
    tokens = sum(len(lm.tok_encode(d)) for d in docs)
    print(json.dumps({"model": model_name, "batch_size": batch, "seconds": seconds,
                      "peak_growth_mib": (status_bytes("VmHWM") - before) / 2**20,
                      "tokens": tokens, "bytes": size, "sum_ll": float(sum(ll))}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    p.add_argument("--kb", type=int, default=200)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--budget-mib", type=float, default=2048)
    p.add_argument("--child", nargs=2, metavar=("MODEL", "BATCH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], int(a.child[1]), a.kb, a.window, a.vocab, a.hidden, a.layers)
    rows = []
    for batch in a.batch_sizes:
        for name in ("hf", "pplfast"):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", name, str(batch),
                   "--kb", str(a.kb), "--window", str(a.window), "--vocab", str(a.vocab),
                   "--hidden", str(a.hidden), "--layers", str(a.layers)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"model": name, "batch_size": batch, "error": proc.stderr[-300:]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"{'model':8} {'batch':>5} {'seconds':>8} {'peak MiB':>9} {'budget':>7} {'tokens':>7}  sum loglik")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:8} {r['batch_size']:5} failed: {r['error'].splitlines()[-1]}")
            continue
        over = "over" if r["peak_growth_mib"] > a.budget_mib else "ok"
        print(f"{r['model']:8} {r['batch_size']:5} {r['seconds']:8.2f} {r['peak_growth_mib']:9.1f} "
              f"{over:>7} {r['tokens']:7}  {r['sum_ll']:.6g}")


if __name__ == "__main__":
    main()
