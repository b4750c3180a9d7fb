"""``benchmarks/gpu_session.sh --dry-run`` on this machine, so that the GPU session script cannot
rot: every step runs what it can without a GPU (doctor for real, the test selection collected,
each bench's plan) and prints the rest, within the 9-minute budget, into at most eight files."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
BENCHES = {
    "bench-logits-triton": ("logits", "16384x128256,4096x50257", "bf16", "triton"),
    "bench-logits-cuda": ("logits", "16384x128256,4096x50257", "bf16", "cuda"),
    "bench-linear": ("linear", "8192x4096x131072", "bf16,fp32", "auto"),
    "bench-stats": ("stats", "16384x128256", "bf16", "auto"),
    "bench-compare": ("compare", "16384x128256", "bf16", "auto"),
}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-out")
    # the script's doctor sees this machine's backends only (not the tests' Triton interpreter)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)
    return proc, out


def _exits(log: str) -> dict:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^== ([a-z-]+): exit (\d+) ", log,
                                                            re.M)}


def test_every_step_runs_or_says_what_it_would_run(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "session.log").read_text()
    assert all(line in log for line in proc.stdout.splitlines())  # all it printed is logged
    budget = re.search(r"limits add up to (\d+)s of (\d+)s", log)
    assert budget and int(budget.group(1)) <= int(budget.group(2)) == 540
    exits = _exits(log)
    for name in ("machine", "import", "doctor", "tests-collect", *BENCHES):
        assert exits.get(name) == 0, f"{name}: {exits.get(name)}\n{log[-3000:]}"
    for name in ("build", "build-without-cuda", "tests"):
        assert re.search(rf"^== {name}: would run \(limit \d+s\): ", log, re.M), name
    assert "PPLFAST_CUDA_ARCHS=<capability of GPU 0>" in log
    assert len(list(out.iterdir())) <= 8


def test_doctor_streams_its_json_lines(dry_run):
    _, out = dry_run
    lines = [json.loads(line) for line in (out / "doctor.jsonl").read_text().splitlines()]
    assert lines[0]["kind"] == "machine" and lines[-1]["kind"] == "summary"
    checks = [c for c in lines if c["kind"] == "check"]
    assert checks and lines[-1]["checks"] == len(checks)
    assert {c["op"] for c in checks} == {"token_nll", "linear_token_nll", "token_stats",
                                         "linear_token_stats", "compare", "linear_compare"}


def test_gpu_test_selection_is_collected_from_the_listed_files(dry_run):
    proc, out = dry_run
    collected = (out / "tests.log").read_text()
    count = re.search(r"^(\d+)/\d+ tests collected", collected, re.M)
    assert count and int(count.group(1)) > 1000, collected[-2000:]
    assert not re.search(r"GPU tests outside GPU_TEST_FILES .*: tests/", proc.stdout)
    # the command that runs them on the GPU: parallel, stops at the first failure, lists it
    tests = re.search(r"^== tests: would run \(limit \d+s\): (.*)$", proc.stdout, re.M).group(1)
    assert " -m pytest " in tests and " -x -q -rfE " in tests
    assert "-k not compile_for and not compiles_for" in tests


def test_each_bench_plan_is_the_headline_shapes_on_cuda(dry_run):
    _, out = dry_run
    log = (out / "session.log").read_text()
    for name, (path, shapes, dtypes, backend) in BENCHES.items():
        plan = re.search(rf"^== {name} \(.*\): (.*)$\n(would run: .*)$", log, re.M)
        assert plan, name
        assert plan.group(1).endswith("--dry-run") and " -m pplfast bench " in plan.group(1)
        sorted_shapes = ",".join(sorted(shapes.split(","), key=lambda s: [int(v) for v in
                                                                          s.split("x")]))
        assert plan.group(2) == (f"would run: pplfast bench --path {path} --shapes "
                                 f"{sorted_shapes} --dtypes {dtypes} --backend {backend} "
                                 "--device cuda"), plan.group(2)


def test_the_script_never_calls_the_console_script():
    """Where the environment's bin is not on PATH, `pplfast` exits 127: `python -m pplfast`."""
    text = SCRIPT.read_text()
    code = "\n".join(line.split("  # ")[0] for line in text.splitlines()
                     if not line.lstrip().startswith("#"))
    assert not re.search(r"(?<!-m )(?<![\w./-])pplfast\s+(doctor|bench|score)", code)
    assert code.count("-m pplfast") >= 2


def test_the_wheel_folder_is_ignored_by_git():
    proc = subprocess.run(["git", "check-ignore", "-q", ".whl/peer.whl"], cwd=ROOT)
    assert proc.returncode == 0
