"""The table ``pplfast bench`` prints from a record."""
from __future__ import annotations

from typing import Dict

from .._common import table
from .options import MiB

def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def render(record: Dict[str, object]) -> str:
    m, v, bw = record["machine"], record["versions"], record["bandwidth"]
    s = record["settings"]
    lines = [
        f"pplfast bench  {record['timestamp']}",
        f"command:   {record['command']}",
        f"machine:   {m['cpu']}, {m['cpu_count']} logical cores ({m['torch_threads']} torch threads), "
        + (f"{m['memory_gib']:.1f} GiB RAM, " if m.get("memory_gib") else "") + f"{m['os']}",
    ]
    if m["device"] == "cuda":
        lines.append(f"gpu:       {m['gpu']} ({m['gpu_memory_gib']:.0f} GiB), driver {m.get('driver') or 'unknown'}, "
                     f"CUDA runtime {m.get('cuda_runtime')}")
    lines.append("versions:  " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
    if s.get("interleave"):
        lines.append(f"timing:    {s['timer']}, median of {s['reps']} interleaved rounds (each "
                     f"implementation and the bandwidth probe called once per round, in turn) "
                     f"after {s['warmup']} warm-up round(s)")
    else:
        lines.append(f"timing:    {s['timer']}, median of {s['reps']} reps after {s['warmup']} "
                     "warm-up call(s)")
    what = "copy" if m["device"] == "cuda" else "read"
    lines.append(f"{what} bandwidth: {bw['gbps']:.1f} GB/s ({bw['method']})"
                 + ("; %read-BW uses the probe of each case's own rounds (read-BW column)"
                    if s.get("interleave") else ""))
    if s["memory"]:
        lines.append(f"peak memory: {s['memory_method']}")
    for path in ("logits", "linear", "stats", "compare"):
        rows = [r for r in record["results"] if r["path"] == path]
        if not rows:
            continue
        lines.append("")
        if path in ("logits", "stats", "compare"):
            lines.append({
                "logits": "logits path: token_nll(logits (N, V), targets (N,))",
                "stats": "statistics path: token_stats(logits (N, V), targets (N,)); "
                         "speed-up over token_stats(top_k=0)",
                "compare": "compare path: compare(logits_base (N, V), logits_test (N, V), "
                           "targets (N,)); GB/s counts both tensors",
            }[path])
            head = ["shape NxV", "dtype", "implementation", "ms", "GB/s", "G elem/s", "%read-BW",
                    "pplfast speed-up", "peak extra MiB"]
            if s.get("interleave"):
                head.insert(7, "read-BW")
        else:
            lines.append("hidden path: linear_token_nll(hidden (N, D), weight (V, D), targets (N,))")
            head = ["shape NxDxV", "dtype", "implementation", "ms", "TFLOP/s", "%matmul",
                    "pplfast speed-up", "peak extra MiB"]
        table_rows = []
        for r in rows:
            shape = "x".join(map(str, r["shape"]))
            if r["error"]:
                table_rows.append([shape, r["dtype"], r["label"], "error: " + r["error"]])
                continue
            mem = r["peak_extra_bytes"]
            mem_text = _fmt(None if mem is None else mem / MiB, ".1f",
                            "error" if r.get("memory_error") else "-")
            if r.get("memory_note"):
                mem_text += "*"
            if path in ("logits", "stats", "compare"):
                rate = [_fmt(r.get("gbps"), ".1f"), _fmt(r.get("gelems"), ".2f"),
                        _fmt(100 * r["read_bw_fraction"], ".0f") + "%"]
                if s.get("interleave"):
                    rate.append(_fmt(r.get("read_gbps"), ".1f"))
            else:
                frac = r.get("matmul_fraction")
                rate = [_fmt(r.get("tflops"), ".3f" if r["tflops"] < 10 else ".1f"),
                        _fmt(None if frac is None else 100 * frac, ".0f") + ("%" if frac is not None else "")]
            table_rows.append([shape, r["dtype"], r["label"], _fmt(r["ms"], ".2f"), *rate,
                          _fmt(r.get("pplfast_speedup"), ".2f") + ("x" if r.get("pplfast_speedup") else ""),
                          mem_text])
        body = [row[:4] if str(row[3]).startswith("error") else row for row in table_rows]
        lines.extend(table(head, body, left=3))
    notes = [r for r in record["results"] if r.get("memory_note") or r.get("memory_error")]
    for r in notes:
        lines.append(f"* {r['label']} {'x'.join(map(str, r['shape']))} {r['dtype']}: "
                     f"{r.get('memory_error') or r.get('memory_note')}")
    if record["skipped"]:
        lines.append("not timed: " + "; ".join(f"{s['impl']} ({s['reason']})" for s in record["skipped"]))
    return "\n".join(lines)

