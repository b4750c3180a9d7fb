"""The one memory harness of the tests: a measured call in a fresh process, read from that
process's own high-water mark.

A memory test keeps what runs in the child as a plain function of its own module (its inputs are
built there, so the parent's memory never counts) and calls :func:`in_child`, which runs that
function in a fresh Python process (``python memory_harness.py FILE FUNCTION ARGS``) and returns
its JSON result. Inside, :func:`peak_growth` resets the process's peak (``/proc/self/clear_refs``),
reads ``VmHWM`` from ``/proc/self/status`` before and after the measured call and returns the
growth. ``ru_maxrss`` is not used: a child can carry its parent's high-water mark and hide or
invent gigabytes. Every memory test has a live control (the naive path, exceeding the bound) so
that it can fail.

The same command measures one figure by hand, arguments as ``NAME=VALUE`` (VALUE read as JSON
when it parses, else as a string), e.g.::

    python tests/memory/memory_harness.py tests/memory/test_score_memory.py measure \\
        path=score_model token_counts=[32768] vocab=128256
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_child(module_file: str, function: str, /, *, env=None, timeout: float = 300, **kwargs):
    """``function(**kwargs)`` of the module at ``module_file``, run in a fresh process; its JSON
    result. A failed child fails the calling test with the tail of its stderr."""
    sys.path.insert(0, TESTS)
    from helpers import run_json_child

    return run_json_child([os.path.abspath(__file__), os.path.abspath(module_file), function,
                           json.dumps(kwargs)], env=env, timeout=timeout)


def peak_growth(run, *, strict: bool = True):
    """``(run(), bytes this process's peak grew during it)``, the peak reset first. ``strict``:
    RuntimeError where the kernel does not let the peak be reset (measuring several calls in
    turn needs it); else the growth is over the peak so far (a live control shows the probe
    still sees)."""
    from pplfast._memprobe import reset_peak, status_bytes

    if not reset_peak() and strict:
        raise RuntimeError("cannot reset VmHWM through /proc/self/clear_refs")
    before = status_bytes("VmHWM")
    out = run()
    return out, status_bytes("VmHWM") - before


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv) -> None:
    path, function, *args = argv
    kwargs = {}
    for arg in args:
        if arg.startswith("{"):
            kwargs.update(json.loads(arg))
        else:
            name, _, value = arg.partition("=")
            kwargs[name] = _value(value)
    sys.path[:0] = [os.path.dirname(os.path.abspath(path)), TESTS]
    spec = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(json.dumps(getattr(module, function)(**kwargs)))


if __name__ == "__main__":
    main(sys.argv[1:])
