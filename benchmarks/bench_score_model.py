"""score_model against the model's own forward with labels, on a small random Llama.

Both score the same tokens in one window: ``model(ids, labels=ids).loss`` builds the (T, V) logits
and their log-softmax; ``pplfast.score_model`` runs the model body and applies the output layer
through ``linear_token_nll``. Compare the two rows of each group (pytest-benchmark prints the
ratio). Small (CPU) shapes by default; ``PPLFAST_BENCH_SIZE=full`` adds a Llama-3-sized
vocabulary.
"""
import pytest
import torch

from conftest import DEVICE, SIZE, synced

transformers = pytest.importorskip("transformers")

# (vocabulary, hidden width, layers, tokens)
SHAPES = [(32000, 256, 4, 1024)] + ([(128256, 256, 2, 2048)] if SIZE == "full" else [])


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: "V{}-D{}-L{}-T{}".format(*s))
def model_and_ids(request):
    V, D, L, T = request.param
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=4 * D, num_hidden_layers=L,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=T,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).to(DEVICE).eval()
    ids = torch.randint(0, V, (1, T), device=DEVICE)
    return model, ids, request.param


@pytest.mark.parametrize("implementation", ["model_loss", "score_model"])
def test_score_model(benchmark, model_and_ids, implementation):
    import pplfast

    model, ids, shape = model_and_ids

    def model_loss():
        with torch.inference_mode():
            return float(model(ids, labels=ids).loss)

    def score_model():
        return pplfast.score_model(model, ids).mean_nll

    fn = {"model_loss": model_loss, "score_model": score_model}[implementation]
    benchmark.group = "score_model V{}-D{}-L{}-T{}".format(*shape)
    benchmark.extra_info["tokens"] = shape[3]
    mean_nll = benchmark.pedantic(synced(fn), rounds=3, warmup_rounds=1)
    assert abs(mean_nll - model_loss()) <= 1e-4 * abs(mean_nll)
