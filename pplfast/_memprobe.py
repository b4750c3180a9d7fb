"""This process's resident-memory high-water mark, for ``pplfast bench`` and the memory tests.

``VmHWM`` in ``/proc/self/status`` is the process's own peak resident size. Writing ``5`` to
``/proc/self/clear_refs`` (Linux >= 4.0) resets it to the current resident size, so one process
can measure several calls in turn. ``ru_maxrss`` is not used: a child process can carry its
parent's high-water mark and hide or invent gigabytes.
"""
from __future__ import annotations


def status_bytes(field: str) -> int:
    """``field`` (e.g. ``"VmHWM"``, ``"VmRSS"``) of ``/proc/self/status``, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current resident size; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
