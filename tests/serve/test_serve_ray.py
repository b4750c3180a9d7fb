"""`pplfast serve --ray`: the same app as a Ray Serve deployment of 2 CPU replicas on a local Ray
instance (started by the server process, once for this module), answering on one address."""
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("ray.serve")

from test_serve_api import ServerProcess, reference, save_models  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    path = save_models(tmp_path_factory.mktemp("serve_ray"))[0]
    # a RAY_ADDRESS left by another module's instance would send the server to a dead cluster
    srv = ServerProcess([path, "--ray", "--replicas", "2", "--port", free_port(),
                         "--max-wait-ms", "100"], env={"RAY_ADDRESS": ""}, timeout=600)
    yield path, srv
    assert srv.stop(timeout=120) == 0


def test_two_replicas_answer_on_one_address(ray_server):
    import transformers as tf

    path, srv = ray_server
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    prompts = [torch.randint(10, 300, (12 + i,), generator=torch.Generator().manual_seed(i))
               .tolist() for i in range(24)]

    def ask(ids):
        r = srv.post("/v1/completions", {"prompt": [ids], "echo": True, "logprobs": 1,
                                         "max_tokens": 1})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["logprobs"]

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, prompts))
        replicas = set(pool.map(lambda _: srv.get("/health").json()["replica"], range(48)))
    assert len(replicas) == 2
    for ids, lp in zip(prompts, answers):
        logp = reference(model, ids)
        assert lp["token_logprobs"][0] is None
        for j in range(1, len(ids)):
            assert abs(lp["token_logprobs"][j] - float(logp[j - 1, ids[j]])) <= 1e-4
        assert lp["tokens"][-1] == tokenizer.decode([int(logp[-1].argmax())])
        assert abs(lp["token_logprobs"][-1] - float(logp[-1].max())) <= 1e-4
