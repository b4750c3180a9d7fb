"""``benchmarks/bench_vocab_parallel.py`` at a tiny shape (2 gloo processes, spawned once), so that
the benchmark behind docs/vocab_parallel.md's figures cannot rot: its record's fields, the bytes
its collective counter sees for each implementation, and the implementations' agreement."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pplfast import _vocab_merge

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_vocab_parallel.py"
N, V = 48, 1000


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-vp") / "record.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--shape", f"{N}x{V}",
                           "--rounds", "2", "--json", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_record_fields(record):
    rec, stdout = record
    assert rec["command"].startswith("python benchmarks/bench_vocab_parallel.py --quick")
    assert rec["machine"]["cpus"] >= 1 and rec["torch"] and rec["pplfast"]
    settings = rec["settings"]
    assert settings["shape"] == [N, V] and settings["dtype"] == "bf16"
    assert settings["ranks"] == 2 == rec["world"] and settings["threads"] == 1
    assert rec["slice_width"] == V // 2 and rec["backend"] in ("cpu", "reference", "triton")
    assert set(rec["rows"]) == {"vocab-parallel", "gather-then-score", "megatron-style",
                                "single-process half", "bare all_gather"}
    for name, row in rec["rows"].items():
        assert len(row["rounds_ms"]) == 2 and all(t > 0 for t in row["rounds_ms"]), name
        assert row["min_ms"] <= row["median_ms"], name
    assert set(rec["targets"]) == {"nll bytes per row per rank <= 64",
                                   "gather-then-score / vocab-parallel >= 5",
                                   "vocab-parallel / (half + all_gather) <= 1.3"}
    for name, target in rec["targets"].items():
        assert isinstance(target["met"], bool) and target["value"] > 0, name
        assert ("met" if target["met"] else "NOT met") in stdout
    ratios = rec["ratios"]
    rows = rec["rows"]
    assert ratios["gather-then-score / vocab-parallel"] == pytest.approx(
        rows["gather-then-score"]["median_ms"] / rows["vocab-parallel"]["median_ms"])
    assert len(ratios["per-round vocab-parallel / (single-process half + bare all_gather)"]) == 2


def test_bytes_counted(record):
    rec, _ = record
    rows = rec["rows"]
    per_row = _vocab_merge.bytes_per_row("token_nll")
    header = 4 * _vocab_merge.HEADER
    vp = rows["vocab-parallel"]
    assert len(vp["collectives"]) == 1 and vp["collectives"][0].startswith("all_gather")
    assert vp["bytes_per_call"] == per_row * N + header
    assert rec["bytes_per_row"]["vocab-parallel"]["without_header"] == per_row == 12
    assert rec["targets"]["nll bytes per row per rank <= 64"]["met"]
    assert rows["bare all_gather"]["bytes_per_call"] == vp["bytes_per_call"]
    assert rows["megatron-style"]["collectives"] == ["all_reduce"] * 3
    assert rows["megatron-style"]["bytes_per_row"] == 12
    assert rows["gather-then-score"]["bytes_per_row"] == V // 2 * 2  # bf16


def test_implementations_agree(record):
    rec, _ = record
    rows = rec["rows"]
    assert rows["gather-then-score"]["max_abs_diff_vs_gather"] == 0
    assert rows["vocab-parallel"]["max_abs_diff_vs_gather"] <= 1e-4
    assert rows["megatron-style"]["max_abs_diff_vs_gather"] <= 1e-4
