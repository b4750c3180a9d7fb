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
    assert len(ops) == 24


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
