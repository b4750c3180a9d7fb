"""Smoke tests of ``pplfast bench``: tiny shapes, JSON fields, selection, one-line errors."""
import json
import subprocess
import sys

import pytest
import torch

from pplfast import cli

FAST = ["--no-progress", "--bandwidth-mib", "8", "--reps", "2", "--warmup", "1"]


def bench_json(capsys, *argv):
    rc = cli.main(["bench", *argv, *FAST, "--json", "-"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out), err


def rows_of(record, path=None):
    return [r for r in record["results"] if path is None or r["path"] == path]


def test_logits_table_fields_and_selection(capsys):
    record, table = bench_json(capsys, "--shapes", "64x1000,33x507", "--dtypes", "fp32,bf16",
                               "--backend", "reference", "--device", "cpu", "--no-memory")
    assert record["schema"] == "pplfast-bench/1"
    for key in ("pplfast", "torch", "triton", "python"):
        assert record["versions"][key], key
    assert record["machine"]["cpu"] and record["machine"]["device"] == "cpu"
    assert "--shapes 33x507,64x1000" in record["command"] and "--backend reference" in record["command"]
    assert record["bandwidth"]["gbps"] > 0 and "torch.sum" in record["bandwidth"]["method"]
    rows = rows_of(record)
    cases = {(tuple(r["shape"]), r["dtype"]) for r in rows}
    assert cases == {((64, 1000), "fp32"), ((64, 1000), "bf16"), ((33, 507), "fp32"), ((33, 507), "bf16")}
    assert {r["impl"] for r in rows} == {"pplfast", "cross_entropy", "log_softmax_gather"}
    for r in rows:
        assert r["error"] is None, r
        assert len(r["ms_all"]) == 2 and r["ms"] > 0
        N, V = r["shape"]
        assert r["logits_bytes"] == N * V * (4 if r["dtype"] == "fp32" else 2)
        assert r["gbps"] == pytest.approx(r["logits_bytes"] / (r["ms"] * 1e-3) / 1e9)
        assert r["read_bw_fraction"] == pytest.approx(r["gbps"] / record["bandwidth"]["gbps"])
        assert r["peak_extra_bytes"] is None
        ref = next(p for p in rows if p["impl"] == "pplfast" and p["shape"] == r["shape"]
                   and p["dtype"] == r["dtype"])
        assert r["pplfast_speedup"] == pytest.approx(r["ms"] / ref["ms"])
    assert all(r["label"] == "pplfast[reference]" for r in rows if r["impl"] == "pplfast")
    # the human table went to stderr, with its header and one line per row
    assert "pplfast bench" in table and "GB/s" in table and "%read-BW" in table
    assert sum("pplfast[reference]" in line for line in table.splitlines()) == 4


def test_linear_path_rows(capsys):
    record, table = bench_json(capsys, "--path", "linear", "--shapes", "16x24x300",
                               "--dtypes", "fp32", "--backend", "reference", "--no-memory")
    rows = rows_of(record, "linear")
    assert len(rows) == len(record["results"])
    names = {r["impl"] for r in rows}
    assert {"pplfast", "linear_cross_entropy_unfused", "matmul"} <= names
    if hasattr(torch.nn.functional, "linear_cross_entropy"):
        assert "torch_linear_cross_entropy" in names
    matmul = next(r for r in rows if r["impl"] == "matmul")
    for r in rows:
        assert r["error"] is None, r
        assert r["flops"] == 2 * 16 * 24 * 300
        assert r["tflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e12)
        assert r["matmul_fraction"] == pytest.approx(matmul["ms"] / r["ms"])
    assert "TFLOP/s" in table and "%matmul" in table


def test_path_all_routes_shapes_by_form(capsys):
    record, _ = bench_json(capsys, "--path", "all", "--shapes", "16x300,8x16x300", "--dtypes", "fp32",
                           "--backend", "reference", "--no-memory")
    assert {tuple(r["shape"]) for r in rows_of(record, "logits")} == {(16, 300)}
    assert {tuple(r["shape"]) for r in rows_of(record, "linear")} == {(8, 16, 300)}


def test_json_file_and_memory_probe(capsys, tmp_path):
    # live control: log_softmax+gather materialises N x V fp32, pplfast must not. The kernel's
    # resident-size counters are approximate (per-CPU batches of pages), hence the 5% slack.
    N, V = 128, 30000
    path = tmp_path / "out.json"
    rc = cli.main(["bench", "--shapes", f"{N}x{V}", "--dtypes", "fp32", "--backend", "cpu",
                   "--device", "cpu", *FAST, "--json", str(path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "peak extra MiB" in out and "pplfast[cpu]" in out
    record = json.loads(path.read_text())
    by_impl = {r["impl"]: r for r in record["results"]}
    logits_bytes = N * V * 4
    assert by_impl["log_softmax_gather"]["peak_extra_bytes"] >= 0.95 * logits_bytes
    assert by_impl["cross_entropy"]["peak_extra_bytes"] >= 0.95 * logits_bytes
    assert by_impl["pplfast"]["peak_extra_bytes"] < logits_bytes // 20
    assert "clear_refs" in record["settings"]["memory_method"] or "fresh" in record["settings"]["memory_method"]


BAD = [
    (["--shapes", "4096x"], "bad shape"),
    (["--shapes", "4096xabc"], "bad shape"),
    (["--shapes", "0x100"], "bad shape"),
    (["--dtypes", "fp64"], "unknown dtype"),
    (["--backend", "nope"], "unknown --backend"),
    (["--path", "sideways"], "unknown --path"),
    (["--path", "linear", "--shapes", "4x100"], "NxDxV"),
    (["--device", "tpu"], "unknown --device"),
    (["--reps", "0"], "--reps"),
    (["--shapes", "4x10", "--json", "/nonexistent-dir/out.json"], "cannot write --json"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_argument_is_one_line(capsys, argv, message):
    rc = cli.main(["bench", *argv, "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pplfast bench: error:") and message in lines[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_unusable_backend_reports_library_error_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "pplfast.cli", "bench", "--backend", "cuda", "--shapes", "4x10",
         "--no-memory", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert 'backend="cuda" needs CUDA tensors' in lines[0]


# ---- the fused Triton kernel in IEEE float32, beside pplfast's routing (GPU only) ---------

FUSED_FP32 = "pplfast_triton_fused_fp32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_fused_fp32_peer_is_skipped_without_a_gpu(capsys):
    from pplfast.cli.bench import implementations

    impls, skipped = implementations("linear", torch.device("cpu"), "cpu")
    assert FUSED_FP32 not in {impl.name for impl in impls}
    assert (FUSED_FP32, "GPU only") in skipped
    record, table = bench_json(capsys, "--path", "linear", "--shapes", "8x16x100",
                               "--dtypes", "fp32", "--backend", "cpu", "--no-memory")
    assert {"impl": FUSED_FP32, "reason": "GPU only"} in record["skipped"]
    assert FUSED_FP32 not in {r["impl"] for r in record["results"]}
    assert f"{FUSED_FP32} (GPU only)" in table


@pytest.mark.cuda
def test_fused_fp32_peer_is_timed_on_a_gpu(capsys):
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the fused kernel needs CUDA capability >= 8.0")
    record, table = bench_json(capsys, "--path", "linear", "--shapes", "64x128x5000",
                               "--dtypes", "fp32", "--backend", "triton", "--device", "cuda")
    rows = {r["impl"]: r for r in record["results"]}
    fused = rows[FUSED_FP32]
    assert fused["error"] is None and fused["ms"] > 0 and fused["role"] == "baseline", fused
    assert fused["label"] == "pplfast[triton-fused-fp32]" and "pplfast[triton-fused-fp32]" in table
    assert fused["pplfast_speedup"] == pytest.approx(fused["ms"] / rows["pplfast"]["ms"])


@pytest.mark.interpreter
def test_fused_fp32_peer_computes_the_nll(monkeypatch):
    """The peer's call (below pplfast's routing) on small float32 inputs: the fused kernel, asked
    for IEEE products, against the float64 reference. Under the interpreter where there is no
    GPU."""
    from pplfast import reference
    from pplfast.cli.bench import peers
    from pplfast.kernels import linear_token_nll as fused_module

    from helpers import assert_nll_close, backend_device, row_lse

    real = fused_module.linear_token_nll_forward
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["allow_tf32"])
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_module, "linear_token_nll_forward", spy)
    device = backend_device("triton")
    N, D, V = 7, 24, 301
    hidden = torch.randn(N, D)
    weight = torch.randn(V, D) / D**0.5 * 3
    targets = torch.randint(0, V, (N,))
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 1
    got = peers.fused_fp32_nll(hidden.to(device), weight.to(device), targets.to(device),
                               sm_count=sm_count)
    assert calls == [False]
    want = reference.linear_token_nll(hidden, weight, targets)
    assert_nll_close(got.cpu(), want, row_lse(hidden.double() @ weight.double().T))


# ---- what the GPU session script needs: a plan without a GPU, results kept case by case --------

def test_dry_run_prints_the_plan_even_for_a_missing_gpu(capsys, tmp_path):
    out_file = tmp_path / "never.json"
    rc = cli.main(["bench", "--path", "logits", "--backend", "triton", "--device", "cuda",
                   "--shapes", "16384x128256,4096x50257", "--dtypes", "bf16", "--no-progress",
                   "--json", str(out_file), "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == ("would run: pplfast bench --path logits --shapes 4096x50257,16384x128256 "
                        "--dtypes bf16 --backend triton --device cuda")
    assert lines[1:] == ["  logits 16384x128256 bf16 on cuda, backend triton",
                         "  logits 4096x50257 bf16 on cuda, backend triton"]
    assert not out_file.exists()
    # a bad option is still refused
    rc = cli.main(["bench", "--path", "linear", "--shapes", "4x100", "--dry-run"])
    assert rc == 2 and "NxDxV" in capsys.readouterr().err


def test_json_file_keeps_the_cases_that_finished(capsys, tmp_path, monkeypatch):
    """A run cut off (here by Ctrl-C in its second case) leaves the first case's rows in the
    --json file, marked incomplete; a finished run's record says complete."""
    from pplfast.cli.bench import runner

    path = tmp_path / "run.json"
    argv = ["bench", "--shapes", "16x300,8x200", "--dtypes", "fp32", "--backend", "reference",
            "--device", "cpu", "--no-memory", *FAST, "--json", str(path)]
    real, calls = runner.make_inputs, []

    def interrupted(path_name, shape, *args, **kwargs):
        if tuple(shape) in ((16, 300), (8, 200)):  # not the preflight's tiny input
            calls.append(tuple(shape))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path_name, shape, *args, **kwargs)

    monkeypatch.setattr(runner, "make_inputs", interrupted)
    assert cli.main(argv) == 130
    record = json.loads(path.read_text())
    assert record["complete"] is False
    assert {tuple(r["shape"]) for r in record["results"]} == {tuple(calls[0])}
    assert all(r["ms"] > 0 for r in record["results"])
    monkeypatch.setattr(runner, "make_inputs", real)
    assert cli.main(argv) == 0
    record = json.loads(path.read_text())
    assert record["complete"] is True and len({tuple(r["shape"]) for r in record["results"]}) == 2
    capsys.readouterr()


def test_interleave_calls_every_implementation_once_per_round():
    from pplfast.cli.bench.measure import time_interleaved

    calls = []
    fns = [lambda name=name: calls.append(name) for name in "abc"]
    times = time_interleaved(fns, torch.device("cpu"), warmup=1, reps=3)
    assert calls == list("abc") * 4  # one warm-up round, then three timed rounds in turn
    assert [len(t) for t in times] == [3, 3, 3] and all(x >= 0 for t in times for x in t)


@pytest.mark.parametrize("path", ["stats", "compare"])
def test_interleave_rows_and_elements_per_second(capsys, path):
    record, table = bench_json(capsys, "--path", path, "--shapes", "40x300", "--dtypes", "fp32",
                               "--backend", "cpu", "--no-memory", "--interleave")
    assert record["settings"]["interleave"] is True and "--interleave" in record["command"]
    rows = rows_of(record, path)
    read = {r["read_gbps"] for r in rows}
    assert len(read) == 1 and read.pop() > 0  # one probe, timed in the case's own rounds
    for r in rows:
        assert r["error"] is None, r
        assert r["rounds"] == 2 and len(r["ms_all"]) == 2
        # compare's rows read both tensors, but the row of token_nll on one of them
        elements = 40 * 300 * (2 if path == "compare" and r["impl"] != "token_nll_one" else 1)
        assert r["gelems"] == pytest.approx(elements / (r["ms"] * 1e-3) / 1e9)
        assert r["read_bw_fraction"] == pytest.approx(r["gbps"] / r["read_gbps"])
    assert "G elem/s" in table and "interleaved rounds" in table and "read-BW" in table
