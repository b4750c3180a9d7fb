"""``pplfast doctor``: every public op on every backend against the float64 reference, streamed
one JSON line per check, and loud on a broken backend, whichever field it breaks."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pplfast import _cpu
from pplfast.cli import doctor
from pplfast.cli import main

OPS = ("token_nll", "linear_token_nll", "token_stats", "linear_token_stats", "compare",
       "linear_compare")


def _doctor_json(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "pplfast", "doctor", "--quick", "--json", *args],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    return proc, lines


@pytest.fixture(scope="module")
def cpu_run():
    """One full run of every check on the CPU backend (``python -m pplfast doctor --json``)."""
    return _doctor_json("--backend", "cpu")


@pytest.fixture(scope="module")
def triton_run():
    """The Triton backend through doctor, in the interpreter: the statistics and comparison
    kernels, bf16 (the fused hidden-states statistics kernel, whose bf16 tl.dot the interpreter
    gets wrong, is skipped; its chunked path with top_k > 0 runs)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return _doctor_json("--backend", "triton", "--op", "compare", "--op", "linear_token_stats",
                        "--dtype", "bf16", env=env)


def _failed(lines):
    return [c for c in lines if c["kind"] == "check" and not c["ok"]]


def test_json_lines_cover_every_op_case_and_dtype(cpu_run):
    proc, lines = cpu_run
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert lines[0]["kind"] == "machine" and lines[0]["machine"]["torch"] == torch.__version__
    assert lines[0]["backends"]["cpu"] is None
    checks = [c for c in lines if c["kind"] == "check"]
    assert lines[-1] == {"kind": "summary", "ok": not _failed(lines), "checks": len(checks),
                         "failed": len(_failed(lines)), "seconds": lines[-1]["seconds"]}
    assert proc.returncode == (1 if _failed(lines) else 0)
    seen = {(c["op"], c["case"], c["dtype"]) for c in checks}
    assert len(seen) == len(checks) == len(doctor.CASES) * 3
    assert {op for op, _, _ in seen} == set(OPS)
    for op in OPS:
        for dtype in ("fp32", "fp16", "bf16"):
            for case in ("special values", "special values, softcap",
                         "special values, temperature"):
                assert (op, case, dtype) in seen
            assert any(o == op and "extremes [M, M, -1]" in c and "temperature 0.5" in c
                       and "softcap" in c and d == dtype for o, c, d in seen)
            assert any(o == op and "300 equal" in c and d == dtype for o, c, d in seen)
    assert all(c["backend"] == "cpu" and c["seconds"] >= 0 for c in checks)


def test_triton_under_the_interpreter(triton_run):
    proc, lines = triton_run
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    checks = [c for c in lines if c["kind"] == "check"]
    assert {c["backend"] for c in checks} == {"triton"}
    assert {c["dtype"] for c in checks} == {"bf16"}
    stats_cases = {c["case"] for c in checks if c["op"] == "linear_token_stats"}
    assert "special values, softcap" in stats_cases and "special values" not in stats_cases
    assert sum(c["op"] == "compare" for c in checks) == sum(
        c.op == "compare" for c in doctor.CASES)
    assert lines[-1]["kind"] == "summary" and lines[-1]["checks"] == len(checks)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_every_check_passes_the_extremes_included(request, backend):
    proc, lines = request.getfixturevalue(f"{backend}_run")
    assert any("extremes" in c["case"] for c in lines if c["kind"] == "check")
    assert proc.returncode == 0 and lines[-1]["ok"], "\n".join(
        f"{c['op']} / {c['case']} / {c['dtype']}: {c['detail']}" for c in _failed(lines))


def test_text_output_one_line_per_check(capsys):
    rc = main(["doctor", "--quick", "--backend", "cpu", "--op", "token_nll", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert "backend cpu     available" in out
    rows = [line for line in out.splitlines() if line.startswith("cpu ") and " token_nll " in line]
    assert len(rows) == sum(c.op == "token_nll" for c in doctor.CASES)
    assert all(line.split()[1] == "token_nll" and " fp32 " in line for line in rows)
    bad = [line for line in rows if not line.endswith(" ok")]
    assert not bad, "\n".join(bad)
    assert rc == (1 if any("FAILED" in line for line in rows) else 0)
    assert out.strip().splitlines()[-1].endswith("checks FAILED" if rc else "s)")


def _broken(real, fault):
    """A CPU launcher with one fault planted in its result."""
    def token_nll(*args, **kwargs):
        out = real(*args, **kwargs)
        if fault == "off-by-1e-3":
            out[0] += 1e-3
            return out
        return torch.nan_to_num(out, nan=0.0)

    def token_stats(*args, **kwargs):
        nll, entropy, max_logprob, argmax, rank, top_ids, top_lp = real(*args, **kwargs)
        if fault == "entropy+1e-4":
            entropy = entropy + 1e-4
        elif fault == "argmax+1":
            argmax = torch.where(argmax >= 0, (argmax + 1) % args[0].shape[-1], argmax)
        elif fault == "rank+1":
            rank = torch.where(rank >= 0, rank + 1, rank)
        elif fault == "top-k ids reversed":
            top_ids = None if top_ids is None else top_ids.flip(-1)
        return nll, entropy, max_logprob, argmax, rank, top_ids, top_lp

    def compare(*args, **kwargs):
        kl, kl_reverse, nll_base, nll_test, argmax_base, argmax_test = real(*args, **kwargs)
        if fault == "kl+1e-3 relative":
            kl = kl * (1 + 1e-3)
        elif fault == "argmaxes swapped":
            argmax_base, argmax_test = argmax_test, argmax_base
        elif fault == "kl_reverse is kl":
            # a kernel that writes kl into kl_reverse (a copy: a custom op's outputs never alias)
            kl_reverse = kl.clone()
        return kl, kl_reverse, nll_base, nll_test, argmax_base, argmax_test

    return {"token_nll": token_nll, "token_stats": token_stats, "compare": compare}[real.__name__]


@pytest.mark.parametrize("op,fault,field", [
    ("token_nll", "off-by-1e-3", "nll"),
    ("token_nll", "nan-dropped", "nll"),
    ("token_stats", "entropy+1e-4", "entropy"),
    ("token_stats", "argmax+1", "argmax"),
    ("token_stats", "rank+1", "rank"),
    ("token_stats", "top-k ids reversed", "top_k_logprobs at position"),
    ("compare", "kl+1e-3 relative", "kl"),
    ("compare", "argmaxes swapped", "argmax_base"),
    ("compare", "kl_reverse is kl", "kl_reverse"),
])
def test_a_broken_backend_fails(monkeypatch, capsys, op, fault, field):
    monkeypatch.setattr(_cpu, op, _broken(getattr(_cpu, op), fault))
    rc = main(["doctor", "--quick", "--backend", "cpu", "--op", op, "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert rc == 1
    failed = [line for line in out.splitlines() if "FAILED" in line and line.startswith("cpu")]
    caught = [line for line in failed if "extremes" not in line]
    assert caught and all(line.split()[1] == op for line in failed), out
    assert any(f"FAILED {field} " in line for line in caught), "\n".join(caught)
    if fault == "nan-dropped":
        assert any("special values" in line and "reference nan" in line for line in caught)
    assert out.strip().splitlines()[-1].endswith("checks FAILED")


@pytest.mark.parametrize("op", ["token_nll", "linear_token_nll"])
def test_nan_dropped_only_under_softcap_fails(monkeypatch, capsys, op):
    """The CPU bug of issue 8: a NaN check placed after the tanh of the softcap loses the NaN
    (tanh maps it to +-1), so only runs with a softcap return a finite NLL for a NaN row."""
    real = getattr(_cpu, op)

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        softcap = args[3] if op == "token_nll" else args[5]
        return out if softcap is None else torch.nan_to_num(out, nan=31.15)

    monkeypatch.setattr(_cpu, op, broken)
    rc = main(["doctor", "--quick", "--backend", "cpu", "--op", op])
    out = capsys.readouterr().out
    assert rc == 1
    failed = [line for line in out.splitlines() if "FAILED" in line and line.startswith("cpu")
              and "extremes" not in line]
    assert len(failed) == 6, "\n".join(failed)  # two softcap cases, three dtypes
    for line in failed:
        assert line.split()[1] == op and "special values, softcap" in line, line
        assert "reference nan" in line
    assert "checks FAILED" in out.strip().splitlines()[-1]


def test_check_inputs_are_the_same_in_every_process():
    """Each check's inputs come from a seed that does not depend on the process (string hashes
    do, per PYTHONHASHSEED), so a failure on one machine reproduces on another."""
    code = ("from pplfast.cli import doctor; "
            "print([doctor.case_seed(c, d) for c in doctor.CASES for d in doctor.DTYPES])")
    seeds = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        seeds.append(proc.stdout.strip())
    here = [doctor.case_seed(c, d) for c in doctor.CASES for d in doctor.DTYPES]
    assert seeds[0] == seeds[1] == str(here)
    assert len(set(here)) == len(here)  # distinct inputs per check


@pytest.mark.parametrize("torch_cuda", [None, "12.4"], ids=["cpu-only-torch", "cuda-torch"])
def test_unavailable_backends_say_why_and_how_to_fix(monkeypatch, torch_cuda):
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    status = doctor._backend_status("cpu")
    assert status["cpu"] is None
    for name in ("cuda", "triton"):
        why = status[name]
        assert why and "need a GPU" in why, why
        if torch_cuda is None:
            assert "CPU-only build" in why and "install a CUDA build of PyTorch" in why, why
        else:
            assert "sees no GPU" in why and "nvidia-smi" in why and "CUDA_VISIBLE_DEVICES" in why
    assert "TRITON_INTERPRET=1" in status["triton"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs Triton on CPU tensors
    assert doctor._backend_status("cpu")["triton"] is None


@pytest.mark.parametrize("argv", [["--backend", "tpu"], ["--op", "token_mll"],
                                  ["--dtype", "fp64"]])
def test_unknown_choice_is_a_usage_error(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(["doctor", *argv])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_cpu_and_triton_run_without_the_cuda_extension():
    """A failed CUDA build (no pplfast._cuda_C) leaves the CPU and Triton backends running, and
    doctor says what is missing (the GPU session script goes on after such a build)."""
    code = ("import sys; sys.modules['pplfast._cuda_C'] = None; from pplfast.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code, "doctor", "--quick", "--json", "--op",
                           "token_nll", "--dtype", "fp32"], capture_output=True, text=True,
                          env=env, timeout=900)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert "pplfast._cuda_C is missing" in lines[0]["backends"]["cuda"]
    checks = [c for c in lines if c["kind"] == "check"]
    assert {c["backend"] for c in checks} == {"cpu", "triton"}
    failed = _failed(lines)
    assert not failed, "\n".join(json.dumps(c) for c in failed)
