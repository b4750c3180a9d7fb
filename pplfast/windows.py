"""``pplfast.windows``: the window schedules, at the path docs/models.md names; they live in
:mod:`pplfast.models.windows`."""
from .models.windows import (MODES, Window, chunk_windows, llamacpp_windows, make_windows,
                             rolling_windows, sliding_windows)

__all__ = ["MODES", "Window", "chunk_windows", "llamacpp_windows", "make_windows",
           "rolling_windows", "sliding_windows"]
