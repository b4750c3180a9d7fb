"""``pplfast doctor``: passes here, reports in JSON, and fails loudly on a broken backend."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pplfast import _cpu
from pplfast.cli import main


def test_passes_on_this_machine(capsys):
    rc = main(["doctor", "--quick"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "backend cpu     available" in out and out.strip().endswith("checks ok")
    assert "FAILED" not in out


def test_json_lists_every_check(capsys):
    assert main(["doctor", "--quick", "--backend", "cpu", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["ok"] is True and record["machine"]["torch"] == torch.__version__
    ops = {(c["op"], c["case"], c["dtype"]) for c in record["checks"]}
    assert ("token_nll", "special values", "bf16") in ops
    assert ("linear_token_nll", "special values", "fp16") in ops
    for op in ("token_nll", "linear_token_nll"):
        assert (op, "special values, softcap+temperature", "fp32") in ops
    assert len(ops) == 30


@pytest.mark.parametrize("fault", ["off-by-1e-3", "nan-dropped"])
def test_a_broken_backend_fails(monkeypatch, capsys, fault):
    real = _cpu.token_nll

    def broken(logits3, targets, *args, **kwargs):
        out = real(logits3, targets, *args, **kwargs)
        if fault == "off-by-1e-3":
            out[0] += 1e-3
        else:
            out = torch.nan_to_num(out, nan=0.0)
        return out

    monkeypatch.setattr(_cpu, "token_nll", broken)
    rc = main(["doctor", "--quick", "--backend", "cpu"])
    out = capsys.readouterr().out
    assert rc == 1
    failed = [line for line in out.splitlines() if "FAILED" in line and line.startswith("cpu")]
    assert failed and all(line.split()[1] == "token_nll" for line in failed)
    if fault == "nan-dropped":
        assert any("special values" in line and "nan" in line for line in failed)
    assert "checks FAILED" in out.strip().splitlines()[-1]


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
    rc = main(["doctor", "--quick", "--backend", "cpu"])
    out = capsys.readouterr().out
    assert rc == 1
    failed = [line for line in out.splitlines() if "FAILED" in line and line.startswith("cpu")]
    assert len(failed) == 3, "\n".join(failed)  # one per dtype
    for line in failed:
        assert line.split()[1] == op and "special values, softcap+temperature" in line, line
        assert "reference nan" in line
    assert "checks FAILED" in out.strip().splitlines()[-1]


def test_check_inputs_are_the_same_in_every_process():
    """Each check's inputs come from a seed that does not depend on the process (string hashes
    do, per PYTHONHASHSEED), so a failure on one machine reproduces on another."""
    from pplfast import doctor

    code = ("from pplfast import doctor; "
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
    from pplfast import doctor

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


def test_unknown_backend_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["doctor", "--backend", "tpu"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_triton_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pplfast.cli", "doctor", "--backend", "triton",
                           "--quick", "--json"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    record = json.loads(proc.stdout)
    assert record["ok"] and {c["backend"] for c in record["checks"]} == {"triton"}
