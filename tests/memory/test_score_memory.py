"""score_model's peak memory has no tokens x vocabulary term; the model's own loss does (control).

Each measurement runs in a fresh subprocess that reads its own high-water mark (VmHWM in
/proc/self/status) just before and just after the measured call (:mod:`memory_harness`). Doubling T at a large V must
add (almost) nothing to score_model's peak, while the model's forward with labels (the live
control) adds at least the extra logits, V * T * 4 bytes.

One figure by hand, e.g. the 32k-token one:
    python tests/memory/memory_harness.py tests/memory/test_score_memory.py measure \
        path=score_model token_counts=[32768] vocab=128256
"""
import pytest

from memory_harness import in_child, peak_growth


def measure(path: str, token_counts, vocab: int, hidden: int = 64, window=None) -> list:
    """In this process: build a one-layer Llama, run ``path`` once per T, return peak growths."""
    import torch
    import transformers as tf

    import pplfast

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                            max_position_embeddings=max(max(token_counts), 64),
                            tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, vocab, (1, max(token_counts)))
    results = []
    with torch.inference_mode():
        warm = ids[:, :32]  # one-time allocations (thread pools, caches) are not counted
        model(warm, labels=warm) if path == "model_loss" else pplfast.score_model(model, warm)
        for tokens in token_counts:
            x = ids[:, :tokens]

            def run():
                if path == "model_loss":
                    return float(model(x, labels=x).loss)
                return pplfast.score_model(model, x, window=window, batch_size=1).mean_nll

            # each T is measured in turn: the mark must restart (strict)
            nll, growth = peak_growth(run)
            results.append({"path": path, "tokens": tokens, "vocab": vocab,
                            "peak_growth": growth, "mean_nll": nll})
    return results


def run_measurement(path, token_counts, vocab, window=None) -> list:
    return in_child(__file__, "measure", path=path, token_counts=list(token_counts), vocab=vocab,
                    window=window, timeout=3600)


def test_peak_memory_has_no_tokens_by_vocab_term():
    pytest.importorskip("transformers")
    V, T = 65536, 512
    logits_bytes = V * T * 4  # fp32 logits of T tokens
    # memory a finished call leaves cached can only hide growth in a later call: ours measures
    # 2T first (its absolute figure is fresh), the control T first (its growth is understated)
    ours_2t, ours_t = run_measurement("score_model", (2 * T, T), V)
    control_t, control_2t = run_measurement("model_loss", (T, 2 * T), V)
    for a, b in ((ours_t, control_t), (ours_2t, control_2t)):
        assert a["mean_nll"] == pytest.approx(b["mean_nll"], rel=1e-5)  # equal computations
    control_growth = control_2t["peak_growth"] - control_t["peak_growth"]
    ours_growth = ours_2t["peak_growth"] - ours_t["peak_growth"]
    assert control_growth >= logits_bytes, (control_t, control_2t, "control shows no T x V term")
    # what does grow with T (activations, the chunked path's tile up to its fixed budget) is
    # far below one T x V tensor, even in 16-bit
    assert ours_growth <= logits_bytes / 4, (ours_t, ours_2t)
    assert ours_2t["peak_growth"] <= logits_bytes / 4, ours_2t


@pytest.mark.slow
def test_peak_memory_32k_tokens():
    """The figure quoted for T = 32k at a Llama-3-sized vocabulary (minutes on a laptop CPU)."""
    pytest.importorskip("transformers")
    V, T = 128256, 32768
    (res,) = run_measurement("score_model", (T,), V)
    # the logits alone would be V * T * 4 bytes = 15.7 GiB
    assert res["peak_growth"] < V * T * 4 / 16, res

