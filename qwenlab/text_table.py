"""One table formatter for every table qwenlab prints or writes: aligned plain text, or Markdown."""

from __future__ import annotations


def format_table(headers: list[str], rows: list[list], markdown: bool = False, align: str | None = None) -> str:
    """A plain-text (aligned) or Markdown table; align: one of 'l'/'r' per column."""
    cells = [[str(c) for c in row] for row in rows]
    align = align or "l" * len(headers)
    if markdown:
        sep = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
        lines = ["| " + " | ".join(headers) + " |", sep]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(values, widths, align)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])
