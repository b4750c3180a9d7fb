"""`pplfast serve` under faults, each followed by a request the server must still answer: the
bearer key, malformed and wrong requests (4xx in OpenAI's error shape naming the field), body and
token limits, a full queue (503 with Retry-After, no accepted answer lost), a client that leaves,
an exception inside a pass (500, the worker survives), SIGTERM (drain, exit 0), and the command
line's one-line errors. The server runs through a launcher that makes any pass holding token
``FAULT`` raise; the batcher's own rules are also tested in process."""
import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("fastapi")
requests = pytest.importorskip("requests")

from test_serve_api import ServerProcess, save_models  # noqa: E402

KEY = "s3cret"
FAULT = 7
LAUNCHER = f"""\
import sys

import pplfast.serve.engine as engine
from pplfast.cli import main

real = engine.ModelEngine.run


def run(self, p):
    if any({FAULT} in s.ids.tolist() for s in p.sequences):
        raise RuntimeError("injected fault")
    return real(self, p)


engine.ModelEngine.run = run
sys.exit(main(["serve", *sys.argv[1:]]))
"""
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return save_models(tmp_path_factory.mktemp("serve_faults"), seeds=(0, 1))


@pytest.fixture(scope="module")
def path(paths):
    return paths[0]


@pytest.fixture(scope="module")
def server(path, tmp_path_factory):
    launcher = tmp_path_factory.mktemp("launcher") / "launch.py"
    launcher.write_text(LAUNCHER)
    srv = ServerProcess([path, "--api-key", KEY, "--max-body-mb", "0.05",
                         "--max-request-tokens", "300", "--max-queue", "3",
                         "--max-batch-tokens", "64", "--max-wait-ms", "300"],
                        launcher=str(launcher), headers=AUTH)
    yield srv
    assert srv.stop() == 0


def ids(seed, n):
    return torch.randint(10, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def body(prompt, **extra):
    return {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1, **extra}


def post(server, payload, **kwargs):
    headers = kwargs.pop("headers", AUTH)
    return requests.post(server.url + "/v1/completions", json=payload, headers=headers,
                         timeout=120, **kwargs)


def still_answers(server):
    r = post(server, body([ids(0, 12)]))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["token_logprobs"]


def error_of(r, status):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_bearer_key(server):
    assert error_of(post(server, body([ids(1, 5)]), headers={}), 401)["code"] == "invalid_api_key"
    error_of(post(server, body([ids(1, 5)]), headers={"Authorization": "Bearer nope"}), 401)
    error_of(requests.get(server.url + "/v1/models", timeout=30), 401)
    error_of(requests.get(server.url + "/metrics", timeout=30), 401)
    assert requests.get(server.url + "/health", timeout=30).status_code == 200  # open
    assert requests.get(server.url + "/v1/models", headers=AUTH, timeout=30).status_code == 200
    still_answers(server)


@pytest.mark.parametrize("raw, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps(body([[1, 2, 3]], logprobs="one")), 400, "logprobs"),
    (json.dumps(body([[1, 2, 3]], echo="yes")), 400, "echo"),
    (json.dumps(body([[1, 2, 99999]])), 400, "prompt"),
    (json.dumps(body([[1, 2, -1]])), 400, "prompt"),
    (json.dumps(body([[1, 2.5]])), 400, "prompt"),
    (json.dumps(body({"a": 1})), 400, "prompt"),
    (json.dumps(body([])), 400, "prompt"),
    (json.dumps(body([[]])), 400, "prompt"),
    (json.dumps({"echo": True, "max_tokens": 0}), 400, "prompt"),
    (json.dumps(body([[1, 2]], model="elsewhere")), 404, "model"),
    (json.dumps(body([[1, 2]], logprobs=-1)), 400, "logprobs"),
], ids=["malformed", "not-an-object", "logprobs-type", "echo-type", "id-too-large",
        "id-negative", "id-float", "prompt-type", "prompt-empty", "prompt-no-tokens",
        "prompt-missing", "unknown-model", "logprobs-range"])
def test_bad_requests_get_4xx_naming_the_field(server, raw, status, param):
    r = requests.post(server.url + "/v1/completions", data=raw, timeout=60,
                      headers={**AUTH, "Content-Type": "application/json"})
    error = error_of(r, status)
    assert error["param"] == param, error
    still_answers(server)


def test_a_request_never_loads_a_model(server, paths):
    """A saved model that is not served, named by its path, is an unknown model."""
    error = error_of(post(server, body([[1, 2, 3]], model=paths[1])), 404)
    assert error["param"] == "model" and error["code"] == "model_not_found"
    r = requests.get(server.url + "/tokenizer_info", params={"model": paths[1]}, headers=AUTH,
                     timeout=30)
    error_of(r, 404)
    still_answers(server)


def test_unknown_paths_and_methods(server):
    error_of(requests.get(server.url + "/v2/nothing", headers=AUTH, timeout=30), 404)
    error_of(requests.get(server.url + "/v1/completions", headers=AUTH, timeout=30), 405)
    still_answers(server)


def test_body_and_token_limits(server):
    big = body([[5] * 20000])  # ~60 KB of JSON, over --max-body-mb 0.05
    error = error_of(post(server, big), 413)
    assert "--max-body-mb" in error["message"]

    def chunks():  # no Content-Length: the limit holds while the body streams in
        data = json.dumps(big).encode()
        for i in range(0, len(data), 4096):
            yield data[i : i + 4096]

    r = requests.post(server.url + "/v1/completions", data=chunks(), timeout=60,
                      headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413
    error = error_of(post(server, body([ids(2, 200), ids(3, 101)])), 400)
    assert "--max-request-tokens=300" in error["message"] and error["param"] == "prompt"
    still_answers(server)


def test_full_queue_answers_503_and_loses_no_accepted_answer(server):
    prompts = [[ids(100 + i, 40)] for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: post(server, body(p)), prompts))
    busy = [r for r in results if r.status_code == 503]
    done = [(p, r) for p, r in zip(prompts, results) if r.status_code == 200]
    assert busy and done and len(busy) + len(done) == len(prompts)
    for r in busy:
        assert r.headers["Retry-After"] == "1" and error_of(r, 503)["code"] == "queue_full"
    for p, r in done:  # every accepted request has its own answer
        alone = post(server, body(p)).json()["choices"][0]["logprobs"]["token_logprobs"]
        got = r.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert got[0] is None and all(abs(a - b) <= 2e-5 * max(1, abs(b))
                                      for a, b in zip(got[1:], alone[1:]))
    still_answers(server)


def test_client_that_leaves_loses_only_its_rows(server):
    before = server.metric("pplfast_cancelled_requests_total")
    other = {}

    def send_other():
        other["response"] = post(server, body([ids(4, 20)]))

    payload = json.dumps(body([ids(5, 30)])).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
    host, port = server.url.rsplit("/", 1)[-1].split(":")
    thread = threading.Thread(target=send_other)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + payload)
        thread.start()  # the two requests share the batcher's 300 ms gathering window
        time.sleep(0.1)
    thread.join()
    assert other["response"].status_code == 200
    alone = post(server, body([ids(4, 20)])).json()["choices"][0]["logprobs"]["token_logprobs"]
    got = other["response"].json()["choices"][0]["logprobs"]["token_logprobs"]
    assert all(abs(a - b) <= 2e-5 * max(1, abs(b)) for a, b in zip(got[1:], alone[1:]))
    deadline = time.time() + 10
    while server.metric("pplfast_cancelled_requests_total") == before and time.time() < deadline:
        time.sleep(0.1)
    assert server.metric("pplfast_cancelled_requests_total") == before + 1
    still_answers(server)


def test_exception_inside_a_pass_fails_its_requests_and_the_worker_survives(server):
    before = server.metric("pplfast_failed_passes_total")
    expected = still_answers(server)
    error = error_of(post(server, body([ids(6, 10) + [FAULT]])), 500)
    assert "injected fault" in error["message"] and error["code"] == "scoring_failed"
    assert server.metric("pplfast_failed_passes_total") == before + 1
    assert still_answers(server) == expected


# ---------------------------------------------------------------- the batcher in process


class FakeRun:
    """A pass runner that records which sequences ran, optionally raising on one of them."""

    def __init__(self, fail_on=None, delay=0.0):
        self.ran, self.fail_on, self.delay = [], fail_on, delay

    def plan(self, kind, seqs):
        from pplfast.serve.packing import plan_passes

        return plan_passes(seqs, max_tokens=8)  # one 8-token sequence per pass

    def run(self, kind, p):
        for s in p.sequences:
            if s is self.fail_on:
                raise RuntimeError("boom")
            self.ran.append(s)
        time.sleep(self.delay)  # the pass "runs" after it is recorded
        for s in p.sequences:
            s.result = {"nll": torch.zeros(len(s.positions))}


def sequences(n):
    from pplfast.serve.packing import Sequence

    return [Sequence(torch.full((8,), i), torch.arange(7), torch.full((7,), i)) for i in range(n)]


def test_batcher_skips_the_rows_of_a_cancelled_job_and_fails_only_the_failed_pass():
    from pplfast.serve.batcher import Batcher, Job, QueueFull

    async def main():
        loop = asyncio.get_running_loop()
        seqs = sequences(9)
        fake = FakeRun(fail_on=seqs[7], delay=0.05)
        batcher = Batcher("m", fake.plan, fake.run, max_batch_tokens=1000, max_wait_ms=50,
                          max_queue=3)
        leaving, staying, failing = (Job("score", seqs[i : i + 3], loop) for i in (0, 3, 6))
        for job in (leaving, staying, failing):
            batcher.submit(job)
        with pytest.raises(QueueFull, match="--max-queue"):
            batcher.submit(Job("score", sequences(1), loop))
        batcher.start()
        while not fake.ran:  # the first pass of the gathered batch ran
            await asyncio.sleep(0.01)
        batcher.cancel(leaving)
        assert await staying.future is staying.sequences
        with pytest.raises(RuntimeError, match="boom"):
            await failing.future
        batcher.stop(10)
        return seqs, fake.ran, leaving

    seqs, ran, leaving = asyncio.run(main())
    assert ran[0] is seqs[0] and not any(s in ran for s in seqs[1:3])  # left: its rows skipped
    assert all(s in ran for s in seqs[3:7])  # the other jobs' passes all ran
    assert seqs[8] not in ran  # the failed job's later rows are not run for nothing
    assert not leaving.future.done()


# ---------------------------------------------------------------- SIGTERM and the command line


def test_sigterm_finishes_the_request_in_flight_then_exits_0(path):
    srv = ServerProcess([path, "--max-wait-ms", "2000"])
    try:
        expected = srv.post("/v1/completions", body([ids(8, 10)])).json()
        result = {}
        thread = threading.Thread(target=lambda: result.update(
            r=srv.post("/v1/completions", body([ids(8, 10)]))))
        thread.start()
        time.sleep(0.5)  # the request waits in the batcher for 2 s
        srv.proc.send_signal(15)
        time.sleep(0.5)
        with pytest.raises(requests.ConnectionError):  # no new connection is accepted
            requests.get(srv.url + "/health", timeout=5)
        thread.join(60)
        assert result["r"].status_code == 200
        got = result["r"].json()["choices"][0]
        assert got["logprobs"] == expected["choices"][0]["logprobs"]
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()


def serve(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pplfast.cli", "serve", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_command_line_mistakes_are_one_line(path, tmp_path):
    missing = tmp_path / "nope"
    proc = serve(missing, "--port", "0")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr == f"pplfast serve: error: model directory '{missing}' does not exist\n"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = serve(path, "--port", busy.getsockname()[1])
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("pplfast serve: error: cannot listen on 127.0.0.1:")
    proc = serve(path, "--model", "nameless", "--max-batch-tokens", "0")
    assert proc.returncode == 1 and proc.stderr == ("pplfast serve: error: --model takes "
                                                    "NAME=PATH, got 'nameless'\n")
    proc = serve(path, "--max-batch-tokens", "0")
    assert proc.stderr == "pplfast serve: error: --max-batch-tokens must be >= 1, got 0\n"
