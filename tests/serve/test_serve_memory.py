"""The server's memory is bounded by --max-batch-tokens, never by a document's length: scoring a
document of 2k, then 8k tokens grows the server's own high-water mark (``VmHWM`` of the server
process) by the same few MiB, far below one ``(tokens, V)`` float32 tensor. The live control is
the obvious path (``model(ids).logits`` and ``log_softmax``) on the 2k-token document, in a fresh
process, which exceeds the bound."""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("fastapi")

from test_serve_api import ServerProcess  # noqa: E402

V, CONTEXT = 32000, 256
# two windows of 256 tokens per pass: the body's activations and the head's tiles; the
# (tokens, V) float32 logits of one such pass alone would be 62.5 MiB
BOUND_MIB = 32
PASS_TOKENS = 512

CONTROL = """\
import sys, torch, transformers as tf
from pplfast._memprobe import reset_peak, status_bytes
model = tf.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.randint(0, {V}, (1, int(sys.argv[2])), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    model(ids[:, :8])
    reset_peak()
    before = status_bytes("VmHWM")
    logp = model(ids).logits.log_softmax(-1)
    print((status_bytes("VmHWM") - before) / 2**20)
"""


def status_mib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def reset_peak(pid):
    """VmHWM of ``pid`` back to its resident size (Linux >= 4.0), else skip."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the server's VmHWM: {exc}")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)).eval()
    from test_serve_api import train_tokenizer

    root = tmp_path_factory.mktemp("serve_memory")
    model.save_pretrained(root)
    train_tokenizer().save_pretrained(root)
    return root


def test_memory_bounded_by_the_batch_not_the_document(path):
    srv = ServerProcess([path, "--max-batch-tokens", str(PASS_TOKENS), "--max-wait-ms", "0"])
    try:
        pid = srv.proc.pid
        doc = torch.randint(0, V, (8192,), generator=torch.Generator().manual_seed(1)).tolist()
        options = {"mode": "rolling"}  # windows of the model's context, 256 tokens
        assert srv.post("/v1/score", {"input": doc[:600], **options}).status_code == 200  # warm
        growth = []
        for n in (2048, 8192):
            reset_peak(pid)
            before = status_mib(pid, "VmRSS")
            out = srv.post("/v1/score", {"input": doc[:n], **options}).json()
            assert out["data"][0]["num_tokens"] == n and out["usage"]["windows"] == n // CONTEXT
            growth.append(status_mib(pid, "VmHWM") - before)
    finally:
        assert srv.stop() == 0
    control = subprocess.run([sys.executable, "-c", CONTROL.format(V=V), str(path), "2048"],
                             capture_output=True, text=True, timeout=600)
    assert control.returncode == 0, control.stderr[-2000:]
    naive = float(control.stdout.strip().splitlines()[-1])
    logits_mib = 2048 * V * 4 / 2**20
    assert naive > logits_mib > BOUND_MIB  # the control's (tokens, V) tensors exceed the bound
    assert max(growth) <= BOUND_MIB < PASS_TOKENS * V * 4 / 2**20, (growth, naive)
