"""Vocab-parallel scoring on CPU with gloo (docs/vocab_parallel.md): every op x option x special
value over 2 and 3 processes (uneven slices of V = 1001, slices in reverse rank order, an empty
slice) against the float64 reference on the whole vocabulary; the collectives each call makes and
the bytes they carry; bad layouts and inputs (the same one-line error on every rank); DTensor
inputs; torch.compile; no float32 copy of the slice; the metrics under tensor x data parallelism.

The processes start once per world size (``vocab_parallel_ranks.py``, run for the cases this
session selected) and run every case in turn; each test reads its case's outcome on every rank.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

import vocab_parallel_ranks as ranks

HERE = os.path.dirname(os.path.abspath(__file__))
_RESULTS: dict = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _selected(session, world: int) -> list:
    names = []
    for item in session.items:
        spec = getattr(item, "callspec", None)
        if spec is not None and spec.params.get("world") == world and item.fspath == __file__:
            names.append(spec.params["case"])
    return names or ranks.case_names(world)


def _outcomes(request, world: int, tmp_path_factory) -> dict:
    if world not in _RESULTS:
        names = _selected(request.session, world)
        out = str(tmp_path_factory.mktemp(f"vp{world}") / "result")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "vocab_parallel_ranks.py"), str(world), out,
             str(_free_port()), *names], capture_output=True, text=True, timeout=1200, env=env)
        results = {}
        for rank in range(world):
            path = f"{out}.rank{rank}.json"
            if not os.path.exists(path):
                results = None
                break
            for name, error in json.load(open(path)).items():
                if error:
                    results.setdefault(name, []).append(error)
                else:
                    results.setdefault(name, [])
        _RESULTS[world] = (results, proc.stderr[-4000:])
    return _RESULTS[world]


def _params(world: int) -> list:
    return [pytest.param(world, name, id=f"P{world}-{name}") for name in ranks.case_names(world)]


@pytest.mark.parametrize("world, case", _params(2) + _params(3) + _params(4))
def test_vocab_parallel(request, tmp_path_factory, world, case):
    results, stderr = _outcomes(request, world, tmp_path_factory)
    assert results is not None, f"the {world} processes did not finish:\n{stderr}"
    assert case in results, f"{case} did not run:\n{stderr}"
    errors = results[case]
    assert not errors, "\n".join(errors)
