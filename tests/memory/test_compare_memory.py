"""compare_models' peak memory has no tokens x vocabulary term; the two models' own forward
passes with labels do (the live control).

Each measurement runs in a fresh subprocess that reads its own high-water mark (VmHWM in
/proc/self/status) just before and just after the measured call (:mod:`memory_harness`). Doubling T at a large V must
add (almost) nothing to compare_models' peak, while the models' forwards with labels add at
least the extra logits, V * T * 4 bytes.

One figure by hand (peak growth and seconds, compare_models against the two models' forward
passes with labels), e.g.:
    python tests/memory/memory_harness.py tests/memory/test_compare_memory.py measure \
        path=compare_models token_counts=[4096] vocab=128256
(``path=model_loss`` for the control).
"""
import time

import pytest

from memory_harness import in_child, peak_growth


def measure(path: str, token_counts, vocab: int, hidden: int = 64) -> list:
    """In this process: two one-layer Llamas (the second: the first with bf16-rounded weights),
    run ``path`` once per T, return peak growths and seconds."""
    import copy

    import torch
    import transformers as tf

    import pplfast

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                            max_position_embeddings=max(max(token_counts), 64),
                            tie_word_embeddings=False)
    base = tf.LlamaForCausalLM(config).eval()
    test = copy.deepcopy(base)
    with torch.no_grad():
        for p in test.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    ids = torch.randint(0, vocab, (1, max(token_counts)))

    def run(x):
        if path == "model_loss":
            loss_b, loss_t = float(base(x, labels=x).loss), float(test(x, labels=x).loss)
            return loss_b, loss_t
        res = pplfast.compare_models(base, test, x, window=x.shape[1], batch_size=1)
        return res.token_comparison.nll_base[res.scored].double().mean().item(), \
            res.token_comparison.nll_test[res.scored].double().mean().item()

    results = []
    with torch.inference_mode():
        run(ids[:, :32])  # one-time allocations (thread pools, caches) are not counted
        for tokens in token_counts:
            x = ids[:, :tokens]
            start = time.perf_counter()
            (nll_b, nll_t), growth = peak_growth(lambda: run(x))
            seconds = time.perf_counter() - start
            results.append({"path": path, "tokens": tokens, "vocab": vocab, "seconds": seconds,
                            "peak_growth": growth, "mean_nll_base": nll_b,
                            "mean_nll_test": nll_t})
    return results


def run_measurement(path, token_counts, vocab) -> list:
    return in_child(__file__, "measure", path=path, token_counts=list(token_counts), vocab=vocab,
                    timeout=3600)


def test_compare_models_has_no_tokens_by_vocab_term():
    pytest.importorskip("transformers")
    V, T = 65536, 512
    logits_bytes = V * T * 4  # fp32 logits of T tokens
    # ours measures 2T first (its absolute figure is fresh), the control T first
    ours_2t, ours_t = run_measurement("compare_models", (2 * T, T), V)
    control_t, control_2t = run_measurement("model_loss", (T, 2 * T), V)
    for a, b in ((ours_t, control_t), (ours_2t, control_2t)):  # the same computations
        assert a["mean_nll_base"] == pytest.approx(b["mean_nll_base"], rel=1e-5)
        assert a["mean_nll_test"] == pytest.approx(b["mean_nll_test"], rel=1e-5)
    control_growth = control_2t["peak_growth"] - control_t["peak_growth"]
    ours_growth = ours_2t["peak_growth"] - ours_t["peak_growth"]
    assert control_growth >= logits_bytes, (control_t, control_2t, "control shows no T x V term")
    assert ours_growth <= logits_bytes / 4, (ours_t, ours_2t)
    assert ours_2t["peak_growth"] <= logits_bytes / 2, ours_2t

