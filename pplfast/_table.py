"""Plain-text tables for the CLI: one formatter shared by ``pplfast bench``, ``score`` and ``doctor``."""
from __future__ import annotations

from typing import Sequence


def table(head: Sequence[str], rows: Sequence[Sequence[object]], *, left: int = 1) -> list:
    """Lines of a table: ``head``, a rule, then ``rows``; the first ``left`` columns are
    left-aligned, the others right-aligned. A row shorter than ``head`` spills its last cell
    past the column widths (for error messages) instead of widening them."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in head]
    for row in cells:
        if len(row) == len(head):
            widths = [max(w, len(c)) for w, c in zip(widths, row)]

    def line(row):
        parts = [c.ljust(widths[j]) if j < left else c.rjust(widths[j])
                 for j, c in enumerate(row[: len(head)])]
        if len(row) < len(head):
            parts[-1] = row[-1]
        return "  ".join(parts).rstrip()

    return [line(list(head)), "  ".join("-" * w for w in widths)] + [line(r) for r in cells]


def key_values(rows: Sequence[Sequence[object]]) -> str:
    """``key  value`` lines with the keys padded to one width."""
    width = max((len(str(k)) for k, _ in rows), default=0)
    return "\n".join(f"{str(k):<{width}}  {v}" for k, v in rows)
