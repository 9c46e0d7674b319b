"""Plain-text tables for the CLI's reports (smoke, parity, bench)."""

from __future__ import annotations


def format_table(headers: list[str], rows: list[list], align: str = "left") -> str:
    """Columns as wide as their widest cell, two spaces apart, a dashed rule under the headers.
    align: "left" for labels, "right" for columns of numbers."""
    widths = [max(len(str(r[c])) for r in [headers, *rows]) for c in range(len(headers))]
    pad = str.ljust if align == "left" else str.rjust

    def line(r: list) -> str:
        return "  ".join(pad(str(x), w) for x, w in zip(r, widths)).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])
